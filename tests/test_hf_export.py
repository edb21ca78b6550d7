"""python -m llama.convert SRC DST --to hf: a Meta dir and the SmolLM2 GGUF -> a Hugging Face
folder that transformers loads to our native model's hidden states, with the same tokenizer, chat
template and end ids; each family (Qwen2, Qwen3, Mistral) HF -> Meta -> HF and HF -> HF as its own
architecture; bad flags and a family the exporter cannot write."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, in_process, one_line_error
from tiny import FAMILIES, WINDOW, hf_model, hf_states, make_hf, make_meta, tokens

from llama.checkpoint import load_meta_state, load_model, open_source
from llama.convert import cli, convert
from llama.errors import LlamaError
from llama.layout import interleave_rotary, rotate_half_rotary
from llama.gguf import default_model_path
from llama.tokenizer import load_tokenizer

TEXTS = ["Hello world 123", "The capital of France is", "  two  spaces\tand a tab\n",
         "digits 1234567 and 3.14159", "café, naïve, 日本語, emoji 🙂",
         "<|im_start|>user\nHi<|im_end|>\n", "don't won't I'M", "x" * 40]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind", ["gqa", "tied"])
def test_meta_dir_to_hf_loads_to_the_same_states(tmp_path, dist1, kind):
    hf = make_hf(tmp_path / "hf", kind)
    args, sd = load_meta_state(hf)
    meta = make_meta(tmp_path / "meta", sd, args, shards=2, tokenizer_from=hf)
    convert(meta, tmp_path / "out", to="hf")
    ids = tokens()
    native = load_model(meta, dist1).model(ids, logits=True)
    exported = hf_states(hf_model(tmp_path / "out"), ids)
    for layer in range(args.n_layers + 1):
        assert rel(exported[layer], native[layer]) < 1e-5, layer
    assert rel(exported["logits"], native["logits"]) < 1e-5
    with open(tmp_path / "out" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["tie_word_embeddings"] == (kind == "tied")
    assert (cfg.get("rope_scaling") or {}).get("factor") == (32.0 if kind == "gqa" else None)
    assert (load_tokenizer(tmp_path / "out" / "tokenizer.json").encode("Hello world")
            == load_tokenizer(hf).encode("Hello world"))


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "hf"
    proc = subprocess.run([sys.executable, "-m", "llama.convert", str(default_model_path()),
                           str(out), "--to", "hf"], cwd=ROOT, text=True, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0 and "tied embeddings" in proc.stdout, proc.stderr
    return out


def test_smollm2_gguf_to_hf_matches_native(smol_hf, dist1):
    assert sorted(os.listdir(smol_hf)) == ["config.json", "generation_config.json",
                                          "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json"]
    native = load_model(default_model_path(), dist1)
    tok = load_tokenizer(native.tokenizer_path)
    model = hf_model(smol_hf)
    prompt = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    for text in ("The capital of France is", prompt):
        ids = torch.tensor([tok.encode(text)])
        ours, theirs = native.model(ids, logits=True), hf_states(model, ids)
        for layer in range(31):
            assert rel(theirs[layer], ours[layer]) < 1e-5, (text, layer)
        assert rel(theirs["logits"], ours["logits"]) < 1e-5
    with open(smol_hf / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] in (native.end_ids, native.end_ids[0])


def test_smollm2_hf_tokenizer_and_template_are_the_gguf_ones(smol_hf):
    from transformers import AutoTokenizer

    ours = load_tokenizer(open_source(str(default_model_path()))[2])
    theirs = AutoTokenizer.from_pretrained(str(smol_hf))
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=True) == ours.encode(text, bos=True), text
        assert theirs.decode(ours.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a colour."}]
    assert (theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == ours.render_chat(messages[1:], system="Be brief."))
    assert theirs.eos_token == "<|im_end|>" and theirs.bos_token == "<|im_start|>"


def test_bad_target_and_mp_are_one_line(tmp_path):
    hf = make_hf(tmp_path / "hf", "tied")
    one_line_error(in_process(["convert", hf, tmp_path / "a", "--to", "onnx"], cli), "--to")
    one_line_error(in_process(["convert", hf, tmp_path / "b", "--to", "hf", "--mp", "2"], cli),
                   "--mp")
    convert(hf, tmp_path / "c", to="hf")
    one_line_error(in_process(["convert", hf, tmp_path / "c", "--to", "hf"], cli), "--overwrite")
    convert(hf, tmp_path / "c", to="hf", overwrite=True)
    assert os.path.isfile(tmp_path / "c" / "model.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_hf_to_meta_to_hf_and_hf_to_hf_match_transformers(tmp_path, family):
    """A transformers-made folder -> Meta (mp 1) -> --to hf, and -> --to hf directly: the family's
    own class, every layer's states and the logits of the original (padded batch), its biases /
    head norms / head size / window in config.json and model.safetensors."""
    from safetensors.torch import load_file

    hf = make_hf(tmp_path / "hf", family)
    for argv in ([hf, tmp_path / "meta", "--mp", 1], [tmp_path / "meta", tmp_path / "via_meta",
                                                      "--to", "hf"], [hf, tmp_path / "direct",
                                                                      "--to", "hf"]):
        r = in_process(["convert", *argv], cli)
        assert r.returncode in (0, None), r.stderr
    original = hf_model(hf)
    ids = tokens(n_rows=3, length=11)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    ref = hf_states(original, ids, mask)
    for out in ("via_meta", "direct"):
        model = hf_model(tmp_path / out)
        assert type(model) is type(original), out
        got = hf_states(model, ids, mask)
        for key in [*range(original.config.num_hidden_layers + 1), "logits"]:
            assert rel(got[key][mask.bool()], ref[key][mask.bool()]) < 1e-5, (out, key)
        cfg = json.loads((tmp_path / out / "config.json").read_text())
        weights = load_file(tmp_path / out / "model.safetensors")
        theirs = original.state_dict()
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                     "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                     "self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            key = f"model.layers.1.{name}"
            assert (key in weights) == (key in theirs), key
            if key in weights:  # the same rows in the same (rotate-half) order
                assert torch.equal(weights[key], theirs[key]), key
        theta = original.config.rope_parameters["rope_theta"]
        assert cfg["model_type"] == family and cfg["rope_theta"] == theta
        assert model.config.rope_parameters["rope_theta"] == theta
        assert ("lm_head.weight" in weights) != cfg["tie_word_embeddings"]
        if family == "qwen3":
            assert cfg["head_dim"] == model.config.head_dim == 24
        if family == "mistral":
            assert cfg["sliding_window"] == model.config.sliding_window == WINDOW
        else:
            assert cfg.get("use_sliding_window") is False and cfg["sliding_window"] is None


def test_rotate_half_rotary_inverts_interleave_rotary():
    """weights [n * hd, in], biases [n * hd] and a head norm [hd] come back unchanged; the
    permutation is not the identity; rows that are not whole heads are refused."""
    for t, hd in ((torch.randn(48, 5), 24), (torch.randn(48), 24), (torch.randn(8), 8)):
        meta = interleave_rotary(t, hd)
        assert not torch.equal(meta, t)
        assert torch.equal(rotate_half_rotary(meta, hd), t)
        assert torch.equal(interleave_rotary(rotate_half_rotary(t, hd), hd), t)
    with pytest.raises(LlamaError, match="not whole heads of 24"):
        rotate_half_rotary(torch.randn(30, 4), 24)


def test_family_without_an_architecture_is_one_line(tmp_path, monkeypatch):
    """A family the loader reads but the exporter has no transformers class for: refused by name
    in one line, DST not written."""
    import llama.hf_export as hf_export

    hf = make_hf(tmp_path / "hf", "qwen3")
    monkeypatch.delitem(hf_export.ARCHITECTURES, "qwen3")
    r = in_process(["convert", hf, tmp_path / "out", "--to", "hf"], cli)
    one_line_error(r, "family 'qwen3' cannot be written", "llama, mistral, qwen2")
    assert not os.path.exists(tmp_path / "out")


def test_windowed_qwen_keeps_its_window(tmp_path):
    """A Qwen3 with use_sliding_window: --to hf writes the switch and the window, every layer
    windowed as the loader reads it, and loads to the original's states within the window."""
    hf = make_hf(tmp_path / "hf", "qwen3")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)
    cfg.pop("layer_types", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    convert(hf, tmp_path / "out", to="hf")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (out["use_sliding_window"], out["sliding_window"]) == (True, WINDOW)
    assert out["max_position_embeddings"] == WINDOW
    original, model = hf_model(hf), hf_model(tmp_path / "out")
    assert model.config.layer_types == ["sliding_attention"] * 2 == original.config.layer_types
    ids = tokens(n_rows=1, length=WINDOW)
    ref, got = hf_states(original, ids), hf_states(model, ids)
    assert all(rel(got[k], ref[k]) < 1e-5 for k in [0, 1, 2, "logits"])
