"""Checkpoint loading against transformers: Hugging Face and Meta layouts, resharding, bad
input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from tiny import VOCAB, hf_model, hf_states, make_hf, make_meta, make_tokenizer, meta_state, tokens

from llama.checkpoint import load_meta_state, load_model, merge_shards, shard_state_dict
from llama.errors import LlamaError

KINDS = ("mha", "gqa", "tied")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (hf dir, meta dir of 2 shards, transformers' states on tokens())"""
    base = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind in KINDS:
        hf = make_hf(base / kind, kind)
        args, sd = load_meta_state(hf)
        model = hf_model(hf)
        theirs = meta_state(model)
        assert sd.keys() == theirs.keys() and all(torch.equal(sd[k], theirs[k]) for k in sd)
        args.vocab_parallel_embedding = kind == "gqa"  # Llama 3 splits the embedding by vocab
        meta = make_meta(base / f"{kind}-meta2", theirs, args, shards=2, tokenizer_from=hf)
        out[kind] = (hf, meta, hf_states(model, tokens()))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_states_match_transformers(tiny, dist1, kind, layout):
    hf, meta, ref = tiny[kind]
    m = load_model(hf if layout == "hf" else meta, dist1)
    assert m.source == layout
    out = m.model(tokens(), logits=True)
    assert set(out) == set(ref)
    for k in ref:
        assert rel(out[k], ref[k]) < 1e-5, (kind, layout, k)


def test_fingerprint_ignores_layout_and_sees_weights(tiny, dist1, tmp_path):
    hf, meta, _ = tiny["gqa"]
    a, b = load_model(hf, dist1), load_model(meta, dist1)
    assert a.fingerprint == b.fingerprint
    assert load_model(tiny["mha"][0], dist1).fingerprint != a.fingerprint
    args, sd = load_meta_state(meta)
    sd["layers.0.attention.wk.weight"][0, 0] += 1
    assert (load_model(make_meta(tmp_path / "m", sd, args, tokenizer_from=hf), dist1).fingerprint
            != a.fingerprint)


def test_hub_style_rope_config(tmp_path, tiny):
    hub = make_hf(tmp_path / "hub", "gqa", hub_style=True)
    with open(os.path.join(hub, "config.json")) as f:
        cfg = json.load(f)
    assert "rope_scaling" in cfg and "rope_parameters" not in cfg
    a, _ = load_meta_state(hub)
    b, _ = load_meta_state(tiny["gqa"][0])
    assert (a == b and a.use_scaled_rope and a.rope_scale_factor == 32.0
            and a.rope_theta == 500000.0)


def test_shard_merge_round_trip(tiny, tmp_path):
    # 8 heads, 2 kv heads: mp 8 replicates each kv head 4 times
    args, sd = load_meta_state(tiny["tied"][0])
    for mp in (1, 2, 4, 8):
        shards = [shard_state_dict(sd, args, mp, r) for r in range(mp)]
        assert (shards[0]["layers.0.attention.wk.weight"].shape[0]
                == args.head_dim * max(1, args.kv_heads // mp))
        merged = merge_shards(shards, args)
        assert merged.keys() == sd.keys() and all(torch.equal(merged[k], sd[k]) for k in sd)
    # slices are copies: the file holds 1/8 of the weights
    torch.save(shards[0], tmp_path / "s.pth")
    full = sum(t.numel() * 4 for t in sd.values())
    assert os.path.getsize(tmp_path / "s.pth") < full / 4


def test_eight_shards_load_at_mp1(tiny, dist1, tmp_path):
    hf, _, ref = tiny["tied"]
    args, sd = load_meta_state(hf)
    m = load_model(make_meta(tmp_path / "m8", sd, args, shards=8, tokenizer_from=hf), dist1)
    out = m.model(tokens(), layers=[args.n_layers])
    assert rel(out[args.n_layers], ref[args.n_layers]) < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes(tiny, dist1, dtype):
    with pytest.raises(LlamaError, match="unknown dtype 'half'"):
        load_model(tiny["gqa"][0], dist1, "half")
    hf, _, ref = tiny["gqa"]
    m = load_model(hf, dist1, dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in m.model.parameters())
    assert m.model.freqs.dtype == torch.float32
    h = m.model(tokens(), layers=[3])[3]
    assert h.dtype == getattr(torch, dtype)
    assert torch.nn.functional.cosine_similarity(h.float().flatten(), ref[3].flatten(), 0) > 0.99
    assert m.fingerprint == load_model(hf, dist1).fingerprint


def test_model_id_from_local_cache(tiny, dist1, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    os.symlink(tiny["mha"][0], snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    m = load_model("tiny-org/tiny-llama", dist1)
    assert m.source == "hf" and m.args.n_layers == 2
    with pytest.raises(LlamaError, match="not-cached/model.*download"):
        load_model("not-cached/model", dist1)


# ---- bad input: one line on stderr, non-zero exit, no traceback ----

def run_cli(path, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "llama.checkpoint", str(path), *extra],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    return p.returncode, p.stderr.strip().splitlines()


def truncate(d):
    f = d / "consolidated.01.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def unknown_key(d):
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps({**params, "n_experts": 8}))


W3, BIAS = "layers.1.feed_forward.w3.weight", "layers.0.attention.bias"
# case: (change to the full state dict, change to the written 2-shard dir, expected message)
BAD = {
    "missing": (lambda sd: sd.pop(W3), None, f"missing weight {W3!r}"),
    "extra": (lambda sd: sd.update({BIAS: torch.zeros(4)}), None, f"unexpected weight {BIAS!r}"),
    "shape": (lambda sd: sd.update({"norm.weight": torch.ones(65)}), None,
              "norm.weight has shape (65,)"),
    "truncated": (None, truncate, "consolidated.01.pth: unreadable or truncated"),
    "unknown key": (None, unknown_key, "params.json: unknown model parameter 'n_experts'"),
    "tokenizer too big": (None, lambda d: make_tokenizer(d, vocab=VOCAB + 5),
                          f"tokenizer has {VOCAB + 5} tokens, the model's embedding only {VOCAB}"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_is_one_line(tiny, tmp_path, case):
    edit_sd, edit_dir, msg = BAD[case]
    hf = tiny["gqa"][0]
    args, sd = load_meta_state(hf)
    if edit_sd:
        edit_sd(sd)
    d = make_meta(tmp_path / "bad", sd, args, shards=2, tokenizer_from=hf)
    if edit_dir:
        edit_dir(Path(d))
    code, err = run_cli(d)
    assert code != 0 and len(err) == 1 and err[0].startswith("error:") and msg in err[0], err


def test_bad_mp_is_one_line(tiny):
    code, err = run_cli(tiny["gqa"][1], "--mp", "3")
    assert code != 0 and err == [
        "error: model-parallel size 3 does not divide n_heads=4: this model splits only to "
        "--mp 1, 2 or 4; to run 3 processes, pass --mp 1 (processes beyond one model-parallel "
        "group run data parallel, each group taking a share of the prompts)"], err


def test_bad_hf_checkpoint(dist1, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "hf"
    make_hf(d, "mha")
    sd = load_file(d / "model.safetensors")
    save_file({**sd, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, d / "model.safetensors")
    with pytest.raises(LlamaError, match="unexpected weight 'model.layers.0.mlp.extra.weight'"):
        load_model(d, dist1)
    del sd["lm_head.weight"]  # not tied: the output projection is missing
    save_file(sd, d / "model.safetensors")
    with pytest.raises(LlamaError, match="missing weight 'output.weight'"):
        load_model(d, dist1)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000])
    code, err = run_cli(d)
    assert (code != 0 and len(err) == 1
            and "model.safetensors: unreadable or truncated" in err[0]), err


def test_llama2_style_shards(tiny, dist1, tmp_path):
    """vocab_size -1 in params.json (taken from the embedding) and rope.freqs in every shard
    (ignored)."""
    hf, _, ref = tiny["mha"]
    args, sd = load_meta_state(hf)
    sd["rope.freqs"] = torch.ones(args.head_dim // 2)
    d = make_meta(tmp_path / "l2", sd, args, shards=2, tokenizer_from=hf)
    with open(os.path.join(d, "params.json")) as f:
        params = json.load(f)
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump({**params, "vocab_size": -1}, f)
    m = load_model(d, dist1)
    assert m.args.vocab_size == args.vocab_size and not m.args.vocab_parallel_embedding
    assert rel(m.model(tokens(), layers=[2])[2], ref[2]) < 1e-5


def test_llama32_params_get_factor_32(tmp_path):
    from llama.checkpoint import meta_args

    params = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                  ffn_dim_multiplier=1.5,
                  multiple_of=256, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert meta_args(str(tmp_path), None, 1).rope_scale_factor == 32.0  # Meta's file omits it
    llama31 = {**params, "dim": 4096, "n_layers": 32, "ffn_dim_multiplier": 1.3}
    (tmp_path / "params.json").write_text(json.dumps(llama31))
    assert meta_args(str(tmp_path), None, 1).rope_scale_factor == 8.0  # Llama 3.1 8B
    (tmp_path / "params.json").write_text(json.dumps({**params, "rope_scaling_factor": 16.0}))
    assert meta_args(str(tmp_path), None, 1).rope_scale_factor == 16.0


def test_cli_summary(tiny):
    p = subprocess.run([sys.executable, "-m", "llama.checkpoint", tiny["gqa"][1]],
                       capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert (p.returncode == 0 and "meta" in p.stdout
            and "3 layers, dim 64, 4 heads (2 kv)" in p.stdout), p.stderr


def test_sharded_safetensors(tiny, dist1, tmp_path):
    hf, _, ref = tiny["tied"]
    hf_model(hf).save_pretrained(tmp_path, max_shard_size="60KB")
    make_tokenizer(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    out = load_model(tmp_path, dist1).model(tokens(), logits=True)
    assert rel(out[2], ref[2]) < 1e-5 and rel(out["logits"], ref["logits"]) < 1e-5
