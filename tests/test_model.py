"""The Transformer itself: rope table, right padding, the prefix KV path, early stop, parallel
checks."""
import pytest
import torch
from tiny import CONFIGS, make_hf, tokens

from llama.checkpoint import load_model
from llama.errors import LlamaError
from llama.model import ModelArgs, allowed_mp, check_parallel, rope_frequencies


@pytest.fixture(scope="module")
def model(tmp_path_factory, dist1):
    return load_model(make_hf(tmp_path_factory.mktemp("model") / "gqa", "gqa"), dist1).model


def close(a, b, tol=1e-5):
    return ((a - b).norm() / b.norm()).item() < tol


def test_rope_table_matches_transformers_factor_32(model):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(**CONFIGS["gqa"])
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_frequencies(model.params)
    assert model.params.rope_scale_factor == 32.0
    assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0)
    eight = ModelArgs(**{**vars(model.params), "rope_scale_factor": 8.0})
    # the table sees the factor
    assert not torch.allclose(rope_frequencies(eight), theirs.float(), rtol=1e-3)


def test_right_padding_matches_each_row_alone(model):
    toks = tokens(3, 14)
    lengths = [14, 9, 4]
    batch = toks.clone()
    for b, n in enumerate(lengths):
        batch[b, n:] = 0
    out = model(batch)
    for b, n in enumerate(lengths):
        alone = model(toks[b : b + 1, :n])
        for k in alone:
            assert close(out[k][b, :n], alone[k][0]), (b, k)


def test_prefix_kv_matches_whole_sequence(model):
    toks = tokens(2, 16, seed=5)
    start = torch.tensor([6, 3])  # row 1's prefix is right-padded
    prefix = toks[:, :6].clone()
    prefix[1, 3:] = 0
    rest = torch.stack([toks[b, s : s + 8] for b, s in enumerate(start.tolist())])
    pre = model(prefix, layers=[3], return_kv=True)
    assert len(pre["kv"]) == 3 and pre["kv"][0][0].shape == (2, 6, 2, 16)
    with pytest.raises(LlamaError,
                       match="past holds keys and values for 2 blocks, this call runs 3"):
        model(rest, layers=[3], start=start, past=pre["kv"][:2])
    out = model(rest, layers=[2], logits=True, start=start, past=pre["kv"])
    for b, s in enumerate(start.tolist()):
        whole = model(toks[b : b + 1, : s + 8], layers=[2], logits=True)
        assert (close(out[2][b], whole[2][0, s:])
                and close(out["logits"][b], whole["logits"][0, s:]))


def test_stops_after_deepest_layer(model):
    ran = []
    hook = model.layers[2].register_forward_hook(lambda *a: ran.append(1))
    try:
        out = model(tokens(), layers=[0, 2])
        assert set(out) == {0, 2} and not ran
        model(tokens(), layers=[1], logits=True)
        assert ran
    finally:
        hook.remove()
    with pytest.raises(LlamaError, match="layer 4 out of range"):
        model(tokens(), layers=[4])


def test_parallel_checks(dist1):
    from llama.dist import setup

    with pytest.raises(LlamaError, match="unknown device 'tpu'"):
        setup(1, "tpu")
    with pytest.raises(LlamaError, match="model-parallel size 3 does not divide the world size 1"):
        setup(3, "cpu")
    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=320)
    assert (check_parallel(args, 2) == 2 and check_parallel(args, 4) == 4
            and check_parallel(args, 8) == 8)
    with pytest.raises(LlamaError, match="does not divide n_heads=8"):
        check_parallel(args, 3)
    with pytest.raises(LlamaError, match="neither divides n_kv_heads=4 nor is a multiple"):
        check_parallel(ModelArgs(dim=96, n_layers=1, n_heads=12, n_kv_heads=4, vocab_size=96), 6)
    with pytest.raises(LlamaError, match="does not divide vocab_size=321"):
        check_parallel(ModelArgs(dim=64, n_layers=1, n_heads=8, vocab_size=321), 2)
    # SmolLM2's shape (9 heads, 3 kv heads, vocab 49152): 9 would fit the heads, not the
    # output layer's rows; the error lists what fits and how to use more processes
    smol = ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, vocab_size=49152)
    assert allowed_mp(smol) == [1, 3] and allowed_mp(args) == [1, 2, 4, 8]
    for mp, fit in [(2, 1), (9, 3), (6, 3)]:
        with pytest.raises(LlamaError) as e:
            check_parallel(smol, mp)
        assert f"splits only to --mp 1 or 3; to run {mp} processes, pass --mp {fit} " \
            in str(e.value) and "data parallel" in str(e.value), str(e.value)
    with pytest.raises(LlamaError, match="unknown model parameter 'moe'"):
        ModelArgs.from_dict({"dim": 64, "moe": True})
