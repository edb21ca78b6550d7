"""server/vllm_steer.py without vLLM: the per-token buffers a batch fills (requests of different
lengths, a prefill chunk that crosses the prompt's end with positions "generated", ablation, an
unsteered row left bit-identical), the push it measures, and the request arguments. The same plugin
inside vLLM's compiled model is tested against the native engine in tests/on_vllm/ (heavy)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llama.model import Steer
from server.vllm_steer import ProbedLayer, SteeredLayer, Steering, cache_salt, request_args

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


def test_probe_scores_are_kept_per_position_from_the_last_prompt_token_on():
    """A probed request's rows: a prefill chunk (positions 0..4 of a 7-token prompt: nothing
    kept), the last chunk (positions 5..6: 6 kept, the prompt's last token), then a decode step
    (position 7); scores are s . w + b on the layer's output stream, the steered one when the
    layer is steered too; an unprobed request's rows are not kept."""
    g = torch.Generator().manual_seed(1)
    v, w = torch.randn(DIM, generator=g), torch.randn(DIM, generator=g)
    steered = SteeredLayer(Block(), 32, DIM, torch.float32, "cpu")
    probed = ProbedLayer(steered, 32, DIM, "cpu")
    probed.set_probe(w.tolist(), 0.5)
    steering = Steering({10: steered}, probed)
    both = request_args({10: v}, 1.0, tag="p", probe=True)
    plain = request_args(None, tag="q")
    assert plain == {"llama_ccs": {"id": "q"}} and not steering.spec("q-1", SimpleNamespace(
        extra_args=plain))  # nothing to do for it: no spec
    rounds = [([("p-1", 5, both), ("q-1", 3, plain)], [0, 0], [7, 3]),
              ([("p-1", 2, both), ("q-1", 1, plain)], [5, 3], [7, 3]),
              ([("q-1", 1, plain), ("p-1", 1, both)], [4, 7], [3, 7])]
    kept = {}
    for reqs, computed, plens in rounds:
        steering.fill(runner(reqs, computed, plens, [10]))
        n = sum(k for _, k, _ in reqs)
        h = torch.randn(n, DIM, generator=g)
        out_h, out_r = probed(None, h, None)
        want = (out_h + out_r) @ w + 0.5  # the steered stream
        steering.collect()
        lo = 0
        for (req, k, _), start in zip(reqs, computed):
            if req == "p-1":
                kept.update({start + j: float(want[lo + j]) for j in range(k)})
            lo += k
        if reqs[0][0] == "p-1" and computed[0] == 0:
            assert steering.take_scores(["p"]) == {"p": []}  # prompt rows before the last one
            kept.clear()
    got = steering.take_scores(["p", "q"])
    assert got["q"] == [] and [pos for pos, _ in got["p"]] == [6, 7]
    for pos, score in got["p"]:
        assert abs(score - kept[pos]) < 1e-5
    assert steering.take_scores(["p"]) == {"p": []}  # taken once
    assert cache_salt(both) == cache_salt(request_args({10: v}, 1.0))  # the probe: no salt


def test_measure_sums_the_residual_norm_at_every_wrapped_layer():
    """A "measure" request: per wrapped layer, the sum of |s| over its positions but 0 and their
    count; the buffers stay zero (nothing steered)."""
    one = SteeredLayer(Block(), 16, DIM, torch.float32, "cpu")
    two = SteeredLayer(Block(), 16, DIM, torch.float32, "cpu")
    steering = Steering({10: one, 20: two})
    steering.fill(runner([("m-1", 5, request_args(None, tag="m", measure=True))], [0], [5],
                         [10, 20]))
    h = torch.randn(5, DIM)
    s1 = sum(one(None, h, None))
    s2 = sum(two(None, h * 2, None))
    assert torch.equal(s1, sum(Block()(None, h, None)))  # unsteered
    steering.collect()
    got = steering.take("m")
    assert got["push"] == {} and set(got["sums"]) == {"10", "20"}
    assert got["sums"]["10"][1] == 4 and abs(got["sums"]["10"][0] - float(
        s1[1:].norm(dim=-1).sum())) < 1e-4
    assert abs(got["sums"]["20"][0] - float(s2[1:].norm(dim=-1).sum())) < 1e-4


@pytest.mark.parametrize("streamed", [True, False])
def test_probe_hold_emits_each_token_once_its_score_is_in(streamed):
    """vllm_engine.ProbeHold: token events wait for their position's score; the prompt's score
    is set before the first; a finished job waits until its last token has been fed. A job that
    is not streamed asks for scores only once it has finished (here twice: its last token is
    fed by the token after it)."""
    import asyncio

    from server.vllm_engine import ProbeHold

    scores = {4: 0.1, 5: 1.5, 6: 2.5, 7: 3.5}  # prompt of 5 tokens: its last at position 4

    class Scheduler:
        probe = SimpleNamespace(threshold=1.0)
        asked = 0

        async def scores_of(self, tag):
            self.asked += 1
            return [[p, scores[p]] for p in sorted(scores) if p < self.fed]

    out = []
    job = SimpleNamespace(prompt_ids=[1] * 5, emit=out.append, prompt_probe=None,
                          streamed=streamed)
    sched = Scheduler()
    hold = ProbeHold(sched, job, "t")

    def token(t):
        job.emit({"type": "token", "token": t, "probe": None})

    async def play():
        sched.fed = 5  # vLLM produced token 0: the prompt's last position was fed
        token(10)
        assert not await hold.advance(1, False) and out == []
        assert job.prompt_probe == (0.1 if streamed else None)
        assert sched.asked == (1 if streamed else 0)
        sched.fed = 7  # tokens 1 and 2 produced: tokens 0 and 1 fed
        token(11)
        token(12)  # the job ends at its third token (a stop string): not fed yet
        assert not await hold.advance(2, True)
        assert [(e["token"], e["probe"]) for e in out] == [(10, 1.5), (11, 2.5)]
        assert job.prompt_probe == 0.1
        sched.fed = 8
        assert await hold.advance(1, True)
        assert [e["probe"] for e in out] == [1.5, 2.5, 3.5]
        assert sched.asked == (3 if streamed else 2)
        hold.release(final=True)
        job.emit({"type": "done"})
        assert out[-1] == {"type": "done"} and "position" not in out[0]

    asyncio.run(play())
    assert job.probe_threshold == 1.0


def test_layer_0_is_steered_and_probed_where_it_enters_the_first_layer():
    """Layer 0 (the embedding output): SteeredInput steers the first decoder layer's input (the
    stream: hidden_states, residual None) as llama.model.Steer does at layer 0, then the layer
    runs on it; ProbedInput inside it scores the steered input."""
    from server.vllm_steer import ProbedInput, SteeredInput

    g = torch.Generator().manual_seed(2)
    v, w = torch.randn(DIM, generator=g), torch.randn(DIM, generator=g)
    probed = ProbedInput(Block(), 16, DIM, "cpu")
    probed.set_probe(w.tolist(), -1.0)
    first = SteeredInput(probed, 16, DIM, torch.float32, "cpu")
    steering = Steering({0: first}, probed)
    steering.fill(runner([("a-1", 4, request_args({0: v}, 3.0, tag="a", probe=True))], [0],
                         [4], [0]))
    emb = torch.randn(4, DIM, generator=g)
    out_h, out_r = first(None, emb, None)
    want_in = Steer({0: v}, 3.0).apply(0, emb[None], None, None)[0]
    assert torch.allclose(want_in, emb + 3.0 * v)
    assert torch.allclose(out_h + out_r, sum(Block()(None, want_in, None)), atol=1e-6)
    steering.collect()
    scores = steering.take_scores(["a"])["a"]
    assert [p for p, _ in scores] == [3] and abs(scores[0][1] - float(want_in[3] @ w - 1)) < 1e-5
    push = steering.take("a")["push"]["0"]  # positions 1..3 of the unsteered input
    assert abs(push - 3.0 * float(v.norm()) / float(emb[1:].norm(dim=-1).mean())) < 1e-5


def test_ranks_answers_merge_into_one_push_and_one_score_per_position():
    """vllm_engine.merged_push / merged_scores: pipeline stages each report their own layers
    (merged), tensor-parallel ranks report the same scores (kept once, by position)."""
    from server.vllm_engine import merged_push, merged_scores

    stages = [{"a": {"push": {"10": 0.5}}, "b": None}, {"a": {"push": {"2": 0.25}}}]
    assert merged_push(stages, "a") == {"2": 0.25, "10": 0.5}
    assert list(merged_push(stages, "a")) == ["2", "10"]
    assert merged_push(stages, "b") == {}
    ranks = [{"a": [[5, 1.5], [4, 0.5]]}, {"a": [[4, 0.5], [5, 1.5]], "c": [[7, 2.0]]}, {}]
    assert merged_scores(ranks) == {"a": [[4, 0.5], [5, 1.5]], "c": [[7, 2.0]]}
