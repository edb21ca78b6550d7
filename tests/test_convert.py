"""python -m llama.convert: GGUF and Hugging Face checkpoints -> Meta layout at several MP sizes,
loaded back at MP 1; idempotence, --overwrite, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_gguf import write_gguf
from tiny import hf_model, hf_states, make_hf, tokens

from llama.checkpoint import load_meta_state, load_model
from llama.convert import convert
from llama.errors import LlamaError
from llama.gguf import default_model_path
from llama.tokenizer import load_tokenizer


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(*args):
    return subprocess.Popen([sys.executable, "-m", "llama.convert", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def one_error_line(proc, *words):
    out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not out.strip()
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_gguf_to_meta_mp1_and_mp3(tmp_path, dist1):
    gguf = default_model_path()
    cli = run(gguf, tmp_path / "mp3", "--mp", "3")  # the command line, alongside the in-process one
    convert(gguf, tmp_path / "mp1")
    direct = load_model(gguf, dist1)
    tok = load_tokenizer(direct.tokenizer_path)
    ids = torch.tensor([tok.encode("The Eiffel Tower is in the city of")])
    ref = direct.model(ids, logits=True)
    out, err = cli.communicate(timeout=300)
    assert cli.returncode == 0, err
    assert sorted(f for f in os.listdir(tmp_path / "mp3") if f.endswith(".pth")) == [
        "consolidated.00.pth", "consolidated.01.pth", "consolidated.02.pth"]
    for name in ("mp1", "mp3"):
        loaded = load_model(tmp_path / name, dist1)
        assert loaded.fingerprint == direct.fingerprint and loaded.source == "meta"
        got = loaded.model(ids, logits=True)
        for layer in range(31):
            assert rel(got[layer], ref[layer]) < 1e-6, (name, layer)
        assert torch.equal(got["logits"][0, -1].argmax(), ref["logits"][0, -1].argmax())
        assert load_tokenizer(tmp_path / name).encode("Hello world 123") == tok.encode("Hello world 123")


@pytest.mark.parametrize("kind,mp", [("gqa", 2), ("tied", 4)])  # tied: 2 kv heads replicated at MP 4
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
        assert one[name].dtype == torch.bfloat16 and torch.equal(one[name], full[name].bfloat16()), name


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
        (run(tmp_path / "nope", tmp_path / "x"), ("nope",)),
        (run(truncated, tmp_path / "x"), ("truncated",)),
        (run(a, tmp_path / "x", "--dtype", "float8"), ("float8",)),
    ]
    for proc, words in procs:
        one_error_line(proc, *words)
    assert os.stat(shard).st_mtime_ns == first and (stuff / "notes.txt").read_text() == "mine"
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(LlamaError, match="does not divide n_heads"):
        convert(a, tmp_path / "x", mp=3)
    convert(b, dst, overwrite=True)
    with open(dst / "convert.json") as f:
        assert json.load(f)["source"] == str(b)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "dst", "stuff", "t.gguf", "t0.gguf"]  # no temp dirs left
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
