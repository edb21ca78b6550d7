"""python -m llama.convert: Hugging Face and Meta checkpoints -> Meta layout at several MP sizes,
loaded back at MP 1; idempotence, --overwrite, bad input. SmolLM2 GGUF -> Meta is in test_gguf.py
(it reuses the model loaded there)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_gguf import write_gguf
from tiny import hf_model, hf_states, make_hf, make_meta, tokens

from llama.checkpoint import load_meta_state, load_model
from llama.convert import convert
from llama.errors import LlamaError


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(*args):
    return subprocess.Popen([sys.executable, "-m", "llama.convert", *map(str, args)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def one_error_line(proc, *words):
    out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not out.strip()
    for w in words:
        assert w in lines[0], (w, lines[0])


# tied: 2 kv heads replicated at MP 4
@pytest.mark.parametrize("kind,mp", [("gqa", 2), ("tied", 4)])
def test_hf_to_meta_and_back_to_one_shard(tmp_path, dist1, kind, mp):
    hf = make_hf(tmp_path / "hf", kind)
    ids = tokens()
    ref = hf_states(hf_model(hf), ids)
    convert(hf, tmp_path / "meta", mp=mp)
    convert(tmp_path / "meta", tmp_path / "one", dtype="bfloat16")  # Meta -> Meta reshard
    with open(tmp_path / "meta" / "params.json") as f:
        params = json.load(f)
    assert params.get("rope_scale_factor") == (32.0 if kind == "gqa" else None)
    assert os.path.isfile(tmp_path / "meta" / "tokenizer.json")
    got = load_model(tmp_path / "meta", dist1).model(ids)
    for layer in range(len(ref) - 1):
        assert rel(got[layer], ref[layer]) < 1e-5, layer
    _, one = load_meta_state(tmp_path / "one")
    _, full = load_meta_state(hf)
    assert one.keys() == full.keys()
    for name in full:
        assert (one[name].dtype == torch.bfloat16
                and torch.equal(one[name], full[name].bfloat16())), name


def test_llama3_vocab_split_kept(tmp_path, dist1):
    hf = make_hf(tmp_path / "hf", "mha")
    args, sd = load_meta_state(hf)
    args.vocab_parallel_embedding = True
    src = make_meta(tmp_path / "src", sd, args, shards=2, tokenizer_from=hf)
    convert(src, tmp_path / "dst", mp=4)
    with open(tmp_path / "dst" / "params.json") as f:
        assert json.load(f)["vocab_parallel_embedding"] is True
    shard = torch.load(tmp_path / "dst" / "consolidated.03.pth", weights_only=True)
    assert shard["tok_embeddings.weight"].shape == (args.vocab_size // 4, args.dim)
    ids = tokens()
    got, ref = load_model(tmp_path / "dst", dist1).model(ids), hf_states(hf_model(hf), ids)
    for layer in range(args.n_layers + 1):
        assert rel(got[layer], ref[layer]) < 1e-5, layer


def test_idempotent_and_overwrite(tmp_path, capsys):
    a, b = make_hf(tmp_path / "a", "mha"), make_hf(tmp_path / "b", "tied", seed=1)
    dst = tmp_path / "dst"
    convert(a, dst)
    shard = dst / "consolidated.00.pth"
    first = os.stat(shard).st_mtime_ns
    capsys.readouterr()
    convert(a, dst)
    assert "already converted" in capsys.readouterr().out and os.stat(shard).st_mtime_ns == first
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    (stuff / "notes.txt").write_text("mine")
    truncated = tmp_path / "t.gguf"
    data = open(write_gguf(tmp_path / "t0.gguf", *load_meta_state(a)), "rb").read()
    truncated.write_bytes(data[:-100])
    procs = [
        (run(b, dst), ("--overwrite",)),
        (run(a, dst, "--mp", "2"), ("--overwrite", "mp 1")),
        (run(b, stuff, "--overwrite"), ("not a converted model",)),
        (run(tmp_path / "nope", tmp_path / "x"), ("nope: no such checkpoint",)),
        (run(truncated, tmp_path / "x"), ("truncated",)),
        (run(a, tmp_path / "x", "--dtype", "float8"), ("float8",)),
    ]
    for proc, words in procs:
        one_error_line(proc, *words)
    assert os.stat(shard).st_mtime_ns == first and (stuff / "notes.txt").read_text() == "mine"
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(LlamaError, match="does not divide n_heads.* pass --mp 1 .*data parallel"):
        convert(a, tmp_path / "x", mp=3)
    convert(b, dst, overwrite=True)
    with open(dst / "convert.json") as f:
        assert json.load(f)["source"] == str(b)
    # no temp dirs left
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "dst", "stuff", "t.gguf", "t0.gguf"]
    with pytest.raises(LlamaError, match="inside"):
        convert(a, tmp_path / "a" / "meta")


def test_hf_model_id_from_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = make_hf(repo / "snapshots" / "abc123", "mha")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    convert("org/tiny", tmp_path / "dst")
    with open(tmp_path / "dst" / "convert.json") as f:
        assert json.load(f)["source"] == snap
    with pytest.raises(LlamaError, match="download"):
        convert("org/absent", tmp_path / "dst2")
