"""server/vllm_steer.py without vLLM: the per-token buffers a batch fills (requests of different
lengths, a prefill chunk that crosses the prompt's end with positions "generated", ablation, an
unsteered row left bit-identical), the push it measures, and the request arguments. The same plugin
inside vLLM's compiled model is tested against the native engine in tests/on_vllm/ (heavy)."""
from types import SimpleNamespace

import numpy as np
import torch

from llama.model import Steer
from server.vllm_steer import SteeredLayer, Steering, cache_salt, request_args

DIM = 8


class Block(torch.nn.Module):
    """A stand-in decoder layer: returns (h, r) whose sum is a fixed residual stream."""

    def forward(self, positions, hidden_states, residual):
        return hidden_states * 0.5, hidden_states * 0.5 + 1.0


def runner(reqs, computed, prompt_lens, steered_layers):
    """A model runner's view of one batch: reqs [(id, n_scheduled, extra_args)]."""
    sizes = [n for _, n, _ in reqs]
    return SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=len(reqs), req_ids=[r for r, _, _ in reqs],
                                    num_prompt_tokens=np.array(prompt_lens),
                                    num_computed_tokens_cpu=np.array(computed)),
        query_start_loc=SimpleNamespace(np=np.concatenate([[0], np.cumsum(sizes)])),
        requests={r: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=x))
                  for r, _, x in reqs})


def test_buffers_follow_the_batch_layout_and_match_llama_steer():
    g = torch.Generator().manual_seed(0)
    v10, u = torch.randn(DIM, generator=g), torch.randn(DIM, generator=g)
    wrap = SteeredLayer(Block(), 64, DIM, torch.float32, "cpu")
    steering = Steering({10: wrap})
    add = request_args({10: v10}, 2.0, positions="generated", tag="a")
    abl = request_args({10: u}, 1.0, ablate=True, tag="b")
    # a: a chunk of positions 3..8 of a 6-token prompt (steered from 6 on); b: a 4-token
    # prefill, ablated; c: unsteered, 2 tokens
    batch = runner([("a-x", 6, add), ("b-y", 4, abl), ("c-z", 2, None)], [3, 0, 5],
                   [6, 4, 1], [10])
    steering.fill(batch)
    h = torch.randn(12, DIM, generator=g)
    out_h, out_r = wrap(None, h, None)
    got = out_h + out_r
    stream = sum(Block()(None, h, None))  # the unsteered residual stream, as vLLM sums it
    pos_a = torch.arange(3, 9)[None]
    want_a = Steer({10: v10}, 2.0, positions="generated").apply(
        10, stream[None, 0:6], pos_a, torch.tensor([6]))[0]
    want_b = Steer({10: u}, 1.0, ablate=True).apply(10, stream[None, 6:10], None, None)[0]
    assert torch.allclose(got[0:6], want_a, atol=1e-6)
    assert torch.equal(got[0:3], stream[0:3])  # prompt positions of a: untouched
    assert torch.allclose(got[6:10], want_b, atol=1e-6)
    assert float((got[6:10] @ (u / u.norm())).abs().max()) < 1e-5  # u removed
    assert torch.equal(got[10:12], stream[10:12])  # unsteered: bit-identical
    steering.collect()
    # a: 3 steered rows (positions 6..8); push = |m| |v| / mean |s| over them
    push_a = steering.take("a")["push"]["10"]
    assert abs(push_a - 2.0 * float(v10.norm()) / float(stream[3:6].norm(dim=-1).mean())) < 1e-6
    # b: position 0 left out; ablation push = |m| mean |s . u| / mean |s|
    s_b = stream[7:10]
    along = (s_b @ (u / u.norm())).abs().mean()
    assert abs(steering.take("b")["push"]["10"] - float(along / s_b.norm(dim=-1).mean())) < 1e-6
    assert steering.take("a") is None  # taken once

    # the next batch without steering: the buffers are cleared, every row bit-identical
    steering.fill(runner([("c-z", 1, None)], [7], [1], [10]))
    h2 = torch.randn(12, DIM, generator=g)
    out_h, out_r = wrap(None, h2, None)
    assert torch.equal(out_h + out_r, sum(Block()(None, h2, None)))


def test_a_vector_at_a_layer_not_wrapped_is_reported_missing():
    wrap = SteeredLayer(Block(), 16, DIM, torch.float32, "cpu")
    steering = Steering({10: wrap})
    args = request_args({10: torch.ones(DIM), 12: torch.ones(DIM)}, 1.0, tag="m")
    steering.fill(runner([("m-1", 3, args)], [0], [3], [10]))
    wrap(None, torch.randn(16, DIM), None)
    steering.collect()
    got = steering.take("m")
    assert got["missing"] == [12] and set(got["push"]) == {"10"}


def test_cache_salt_is_the_steering_not_the_tag():
    v = torch.ones(DIM)
    one, two = request_args({10: v}, 1.0, tag="x"), request_args({10: v}, 1.0, tag="y")
    assert cache_salt(one) == cache_salt(two)
    assert cache_salt(one) != cache_salt(request_args({10: v}, 1.5))
    assert cache_salt(one) != cache_salt(request_args({10: v}, 1.0, positions="generated"))
