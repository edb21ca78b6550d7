"""Qwen2, Qwen3 and Mistral (llama.model.FAMILIES) against transformers, on tiny random models
built here (2 layers, dim 64; biases and norm weights drawn away from 0 and 1): every layer's
states from a Hugging Face folder, a cached model id, a GGUF in llama.cpp's converter layout and
a Meta conversion; the activation cache of contrast pairs; greedy generation; steering; the
sliding window and the refused families; chat templates and end ids in each family's format.
Model parallel 2 under torchrun: the `heavy` tests at the end."""
import csv
import json
import os
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import ROOT, in_process, one_line_error
from test_extract import pair_rows, write_csv
from test_generation import hf_greedy, prompts
from tiny import FAMILIES, WINDOW, hf_model, hf_states, make_hf, make_tokenizer, meta_state

from activations.cache import ActivationCache
from activations.extract import Extraction, run
from llama.checkpoint import (declared_end_ids, load_meta_state, load_model, merge_shards,
                              read_args, shard_state_dict)
from llama.convert import convert
from llama.errors import LlamaError
from llama.generation import Generator, Sampling, end_tokens
from llama.gguf import read_gguf
from llama.model import Steer, Transformer
from llama.tokenizer import load_tokenizer

import llama.checkpoint as checkpoint_cmd
import steering.generate as generate_cmd

LENGTHS = (13, 7, 3)  # one batch of prompts of different lengths, right-padded


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def fam(tmp_path_factory, dist1):
    """{family: (hf dir, transformers model, our Loaded)}"""
    base = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        path = make_hf(base / family, family)
        out[family] = (path, hf_model(path), load_model(path, dist1))
    return out


def padded_batch(lengths=LENGTHS, seed=5):
    """(tokens [B, S] right-padded with 0, attention mask [B, S])"""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(3, 259, (n,), generator=g)
        mask[row, :n] = 1
    return tokens, mask


def assert_states_match(ours, ref, mask, n_layers):
    """Every layer and the logits within 1e-5 relative (norm-wise, padding excluded)."""
    keep = mask.bool()
    for key in [*range(n_layers + 1), "logits"]:
        err = rel(ours[key][keep], ref[key][keep])
        assert err < 1e-5, (key, err)


@pytest.mark.parametrize("family", FAMILIES)
def test_states_match_transformers(fam, family):
    path, hf, lm = fam[family]
    assert lm.args.family == family and lm.source == "hf"
    tokens, mask = padded_batch()
    ours = lm.model(tokens, logits=True)
    assert_states_match(ours, hf_states(hf, tokens, mask), mask, lm.args.n_layers)


def test_family_options_read_from_the_config(fam):
    qwen2, qwen3, mistral = (fam[f][2].args for f in ("qwen2", "qwen3", "mistral"))
    assert qwen2.options.qkv_bias and not qwen2.options.qk_norm and qwen2.rope_theta == 1e6
    assert qwen3.options.qk_norm and not qwen3.options.qkv_bias
    assert qwen3.head_dim == 24 != qwen3.dim // qwen3.n_heads  # head size from the config
    assert mistral.sliding_window == WINDOW and mistral.max_seq_len == WINDOW
    assert qwen2.sliding_window is None and qwen2.max_seq_len == 4096
    model = fam["qwen2"][2].model
    assert model.layers[0].attention.wq.bias.shape == (64,)
    assert fam["qwen3"][2].model.layers[0].attention.q_norm.weight.shape == (24,)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_biases_and_head_norms_are_permuted_and_used(fam, family, dist1):
    """The loader's layout equals one written independently (tiny.meta_state: q/k weights, q/k
    biases and q/k norm weights in interleaved rotary order); the forward uses them: the HF
    (rotate-half) order, or none at all, no longer matches."""
    path, hf, lm = fam[family]
    args, sd = load_meta_state(path)
    theirs = meta_state(hf)
    assert sd.keys() == theirs.keys() and all(torch.equal(sd[k], theirs[k]) for k in sd)
    extra = [k for k in sd if k.endswith(".bias") or "q_norm" in k or "k_norm" in k]
    assert len(extra) == (6 if family == "qwen2" else 4)
    tokens, mask = padded_batch()
    ref = hf_states(hf, tokens, mask)
    hf_attn = hf.model.layers[0].self_attn
    if family == "qwen2":  # the q bias in HF's order, or none
        values, where = (hf_attn.q_proj.bias, torch.zeros(64)), lambda a: a.wq.bias
    else:  # the q norm's weight in HF's order, or ones
        values, where = (hf_attn.q_norm.weight, torch.ones(24)), lambda a: a.q_norm.weight
    for value in values:
        fresh = load_model(path, dist1)
        with torch.no_grad():
            where(fresh.model.layers[0].attention).copy_(value)
        got = fresh.model(tokens, layers=[1])[1]
        assert rel(got[mask.bool()], ref[1][mask.bool()]) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_model_id(fam, family, dist1, tmp_path, monkeypatch):
    path, hf, _ = fam[family]
    snap = tmp_path / "hub" / f"models--tiny-org--tiny-{family}" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    os.symlink(path, snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    lm = load_model(f"tiny-org/tiny-{family}", dist1)
    tokens, mask = padded_batch()
    assert lm.args.family == family
    assert_states_match(lm.model(tokens, logits=True), hf_states(hf, tokens, mask), mask, 2)


def test_meta_conversion_splits_biases_and_keeps_the_family(fam, tmp_path, dist1):
    """convert to Meta layout with 2 shards: column-parallel biases split with their weights,
    per-head norms whole in each shard; params.json keeps family and head size."""
    for family in ("qwen2", "qwen3"):
        path, hf, _ = fam[family]
        dst = tmp_path / family
        convert(path, dst, mp=2)
        shard = torch.load(dst / "consolidated.01.pth", weights_only=True)
        if family == "qwen2":
            assert shard["layers.0.attention.wq.bias"].shape == (32,)
            assert shard["layers.0.attention.wk.bias"].shape == (16,)
        else:
            assert shard["layers.0.attention.q_norm.weight"].shape == (24,)
            assert shard["layers.0.attention.wq.weight"].shape == (48, 64)
        params = json.loads((dst / "params.json").read_text())
        assert params["family"] == family
        args, sd = load_meta_state(path)  # mp 4 > 2 kv heads: each rank one whole kv head
        shards = [shard_state_dict(sd, args, 4, r) for r in range(4)]
        assert all(x["layers.1.attention.wk.weight"].shape[0] == args.head_dim for x in shards)
        if family == "qwen2":
            assert torch.equal(shards[1]["layers.1.attention.wk.bias"],
                               sd["layers.1.attention.wk.bias"][: args.head_dim])
        merged = merge_shards(shards, args)
        assert merged.keys() == sd.keys() and all(torch.equal(merged[k], sd[k]) for k in sd)
        lm = load_model(dst, dist1)
        tokens, mask = padded_batch()
        assert lm.source == "meta" and lm.fingerprint == load_model(path, dist1).fingerprint
        assert_states_match(lm.model(tokens, logits=True), hf_states(hf, tokens, mask), mask, 2)


# ---- the activation cache: contrast pairs sharing a prefix, several lengths per batch ----

def hf_prompt_states(hf, tok, text):
    ids = torch.tensor([tok.encode(text, bos=True)])
    return {k: v[0] for k, v in hf_states(hf, ids).items() if k != "logits"}


def assert_cache_matches_transformers(cache_dir, hf, tok, data):
    c = ActivationCache(str(cache_dir))
    rows = list(csv.DictReader(open(data)))
    assert c.token == "all" and c.layers == [0, 1, 2]
    for side in c.sides:
        off = c.offsets(side)
        for i, row in enumerate(rows):
            want = hf_prompt_states(hf, tok, row[f"{side}_prompt"])
            for layer in c.layers:
                got = torch.tensor(np.asarray(c.array(layer, side)[off[i]: off[i + 1]]))
                assert rel(got, want[layer]) < 1e-5, (side, i, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_of_contrast_pairs_matches_transformers(fam, family, tmp_path):
    path, hf, lm = fam[family]
    data = write_csv(tmp_path / "pairs.csv", pair_rows(5, seed=3))
    out = run(Extraction(path, data, str(tmp_path / "c"), token="all", batch_size=3,
                         layers="0-2"), lm)
    assert_cache_matches_transformers(out, hf, load_tokenizer(lm.tokenizer_path), data)


# ---- generation and steering ----

def ours(row, stop_id=2):
    """Our (ids, logprobs, finish) as transformers' tokens (which end with the stop token)."""
    ids, _, finish = row
    return ids + ([stop_id] if finish == "stop" else [])


def adding(vec, m):
    def hook(module, inputs, out):
        h = out[0] if isinstance(out, tuple) else out
        return (h + m * vec, *out[1:]) if isinstance(out, tuple) else h + m * vec
    return hook


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_32_tokens_and_steering_match_transformers(fam, family):
    """Greedy: 32 tokens (no stop: transformers is told to go on too). Steering at layer L
    (hidden_states[L], the output of transformers' layers[L - 1]): a forward hook adding the
    same vector."""
    path, hf, lm = fam[family]
    gen = Generator(lm.model, load_tokenizer(lm.tokenizer_path))
    batch = prompts()
    rows = gen.generate(batch, Sampling(max_gen_len=32))
    for p, row in zip(batch, rows):
        assert ours(row) == hf_greedy(hf, p, 32)
    assert max(len(ids) for ids, _, _ in rows) == 32
    layer, m = 1, 4.0
    vec = torch.randn(64, generator=torch.Generator().manual_seed(7))
    steer = Steer({layer: vec}, m)
    tokens = torch.tensor(batch[1])[None]
    got = lm.model(tokens, layers=[], logits=True, steer=steer)["logits"]
    plain = lm.model(tokens, layers=[], logits=True)["logits"]
    hook = hf.model.layers[layer - 1].register_forward_hook(adding(vec, m))
    try:
        with torch.no_grad():
            want = hf(tokens).logits
    finally:
        hook.remove()
    assert (got - plain).abs().max() > 1e-2  # the vector moves the logits
    assert rel(got, want) < 1e-5
    rows = gen.generate(batch, Sampling(max_gen_len=16), steer=steer)
    for p, row in zip(batch, rows):
        assert ours(row) == hf_greedy(hf, p, 16, [(hf.model.layers[layer - 1], adding(vec, m))])


# ---- sliding window, refused families and options ----

def test_sliding_window_refusals(fam, dist1, tmp_path):
    path, _, lm = fam["mistral"]
    assert read_args(path).max_seq_len == WINDOW  # the context the engine serves exactly
    with pytest.raises(LlamaError, match=f"--max_seq_len needs a context of {WINDOW + 1}.*"
                                         f"sliding window of {WINDOW}"):
        load_model(path, dist1, max_seq_len=WINDOW + 1)
    assert load_model(path, dist1, max_seq_len=WINDOW).args.max_seq_len == WINDOW
    with pytest.raises(LlamaError, match=f"longest prompt needs a context of {WINDOW + 2}"):
        lm.model(torch.full((1, WINDOW + 2), 5))
    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("hello\n")
    r = in_process(["generate.py", "--model", path, "--prompts", prompts_file, "--max_gen_len",
                    4, "--max_seq_len", 100], lambda: generate_cmd.command(generate_cmd.main))
    one_line_error(r, "--max_seq_len", f"sliding window of {WINDOW}")
    data = write_csv(tmp_path / "long.csv", [{"idx": "a", "plus_prompt": "x" * (WINDOW + 1),
                                              "minus_prompt": "y", "label": 1}])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cache_activations.py"),
                        "--model", path, "--data", data, "--output", tmp_path / "c"],
                       capture_output=True, text=True, timeout=300)
    one_line_error(r, "tokens, longer than", f"max_seq_len {WINDOW}")


def test_states_at_the_full_window_match_transformers(fam):
    """A context of exactly the window: transformers' windowed attention still sees every
    position, and so does ours; the states agree to the last position."""
    path, hf, lm = fam["mistral"]
    tokens = torch.randint(3, 259, (1, WINDOW), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(tokens)
    assert_states_match(lm.model(tokens, logits=True), hf_states(hf, tokens, mask), mask, 2)


def edited(src, dst, **changes):
    """A copy of the HF dir `src` with config.json keys changed (None: removed)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


REFUSALS = {
    "qwen2_moe": (dict(model_type="qwen2_moe"), "'qwen2_moe' is refused: it has a mixture"),
    "qwen3_moe": (dict(model_type="qwen3_moe"), "'qwen3_moe' is refused: it has a mixture"),
    "gemma2": (dict(model_type="gemma2"), "'gemma2' is refused: it has Gemma's block"),
    "unknown": (dict(model_type="phi3"), "model_type 'phi3' is not supported"),
    "yarn": (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e6,
                                       original_max_position_embeddings=4096)),
             "rope type 'yarn' is not supported"),
    "o_bias": (dict(attention_bias=True), "attention_bias True is not supported for qwen3"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    "partial": (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_by_name_in_one_line(fam, tmp_path, case):
    changes, words = REFUSALS[case]
    bad = edited(fam["qwen3"][0], tmp_path / case, **changes)
    with pytest.raises(LlamaError, match=words.replace("(", r"\(")):
        read_args(bad)
    if case in ("qwen2_moe", "yarn"):  # the command line says it in one line
        r = in_process(["checkpoint.py", bad], checkpoint_cmd.cli)
        one_line_error(r, "config.json", words)


# ---- GGUF in llama.cpp's converter layout ----

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensor_name(hf_name):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module>.<sub>.weight|bias
    return f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_llama_cpp_gguf(path, hf_dir, name=None, metadata=None):
    """The tiny model as llama.cpp's convert_hf_to_gguf.py writes it: its tensor names; q/k rows
    permuted to interleaved pairs for the `llama` architecture (LlamaModel.permute) and left in
    HF's order for `qwen2` / `qwen3` (Qwen2Model does not permute); no output.weight when the
    embeddings are tied; key/value length when the config gives head_dim."""
    cfg = json.loads(open(os.path.join(hf_dir, "config.json")).read())
    arch = {"mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[cfg["model_type"]]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    if name:
        w.add_name(name)
    if metadata:
        metadata(w)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    for hf_name, t in hf_model(hf_dir).state_dict().items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        t = t.float()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if "q_proj" in hf_name else kv
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).transpose(1, 2) \
                .reshape(t.shape)
        w.add_tensor(gguf_tensor_name(hf_name), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_in_llama_cpp_layout_loads_to_the_same_states(fam, family, tmp_path, dist1):
    path, hf, lm = fam[family]
    file = write_llama_cpp_gguf(tmp_path / f"{family}.gguf", path)
    args, sd, _ = read_gguf(file, tokenizer=False)
    assert args.family == family if family != "mistral" else args.family == "llama"
    assert (args.head_dim, args.kv_heads, args.rope_theta) == (lm.args.head_dim, 2,
                                                              lm.args.rope_theta)
    _, want = load_meta_state(path)
    assert sorted(sd) == sorted(want) and all(torch.equal(sd[k], want[k]) for k in sd)
    model = Transformer(args)
    model.load_state_dict(sd, strict=True)
    tokens, mask = padded_batch()
    assert_states_match(model(tokens, logits=True), hf_states(hf, tokens, mask), mask, 2)


def test_mistral_v01_gguf_gets_its_window(fam, tmp_path, dist1):
    """A GGUF carries no window: a `llama` file named Mistral v0.1 is refused above 4096 tokens;
    a later Mistral is not."""
    path = fam["mistral"][0]
    big = edited(path, tmp_path / "long", max_position_embeddings=32768)
    old = write_llama_cpp_gguf(tmp_path / "v01.gguf", big, "Mistral-7B-Instruct-v0.1")
    def sentencepiece(w):  # Mistral's vocabulary type in llama.cpp's files
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
    new = write_llama_cpp_gguf(tmp_path / "v03.gguf", big, "Mistral-7B-Instruct-v0.3",
                               sentencepiece)
    a = read_args(old)
    assert (a.family, a.sliding_window, a.max_seq_len) == ("mistral", 4096, 4096)
    b = read_args(new)
    assert (b.family, b.sliding_window, b.max_seq_len) == ("llama", None, 32768)
    lm = load_model(new, dist1)  # weights load; the sentencepiece tokenizer is --tokenizer_path's
    assert lm.source == "gguf" and lm.tokenizer_path is None
    tokens, mask = padded_batch()
    assert_states_match(lm.model(tokens, logits=True), hf_states(fam["mistral"][1], tokens, mask),
                        mask, 2)
    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("hello\n")
    r = in_process(["generate.py", "--model", old, "--prompts", prompts_file, "--max_gen_len",
                    4, "--max_seq_len", 8192], lambda: generate_cmd.command(generate_cmd.main))
    one_line_error(r, "8192", "sliding window of 4096")


# Qwen2's tokenizer.json pre-tokenizer, as its files write it
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_TEXTS = ["Hello world 12345 and 2024-01-01", "I'LL don't\n\n  x", "a+b=3.14\r\nok",
              "naïve café 日本語 😀", "   spaces   3 4\t\tend", "the cat sat on the mat 42"]


def qwen_style_tokenizer(d):
    """A byte-level BPE trained here with Qwen2's split (merges in token-id order, as a trainer
    appends them), then <|endoftext|> <|im_start|> <|im_end|>; saved as tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    corpus = [t * 3 for t in QWEN_TEXTS] + ["the 12 cats, 345 dogs; don't!"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, show_progress=False,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())))
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    d.mkdir(exist_ok=True)
    tk.save(str(d / "tokenizer.json"))
    return tk


def test_qwen_gguf_with_its_tokenizer_chat_template_and_end_ids(fam, tmp_path, dist1):
    """A qwen2 GGUF as llama.cpp writes one with its tokenizer (pre-tokenizer `qwen2`, ChatML
    markers as control tokens, eos <|im_end|>, no BOS): the whole load_model path (tokenizer
    built from the GGUF) gives the HF tokenizer's ids, transformers' chat rendering and the end
    ids, and the same states."""
    path, hf, _ = fam["qwen2"]
    tk = qwen_style_tokenizer(tmp_path / "tok")
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tk.to_str())["model"]["merges"]]
    im_end, endoftext = vocab["<|im_end|>"], vocab["<|endoftext|>"]

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_eos_token_id(im_end)
        w.add_pad_token_id(endoftext)
        w.add_bos_token_id(endoftext)
        w.add_add_bos_token(False)
        w.add_chat_template(QWEN_TEMPLATE)
    file = write_llama_cpp_gguf(tmp_path / "qwen.gguf", path, "Qwen2.5-tiny-Instruct", add)
    lm = load_model(file, dist1)
    tok = load_tokenizer(lm.tokenizer_path)
    assert lm.source == "gguf" and lm.args.family == "qwen2"
    assert lm.end_ids == [im_end] and im_end in end_tokens(tok) and tok.bos_id is None
    for text in QWEN_TEXTS:
        assert tok.encode(text) == tk.encode(text).ids, text
    conversation = [{"role": "user", "content": "Is Paris in France?"}]
    rendered = tok.render_chat(conversation)
    assert rendered == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                        "helpful assistant.<|im_end|>\n<|im_start|>user\nIs Paris in France?"
                        "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(rendered) == tk.encode(rendered).ids
    tokens_in, mask = padded_batch()
    assert_states_match(lm.model(tokens_in, logits=True), hf_states(hf, tokens_in, mask), mask, 2)


# ---- chat templates and end ids from the model's own files ----

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}")
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}")
CHAT = {  # family -> (extra special tokens, tokenizer_config.json, generation_config eos ids)
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
               "chat_template": QWEN_TEMPLATE}, [261, 259]),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
               "chat_template": QWEN3_TEMPLATE}, [261, 259]),
    "mistral": ([], {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                     "chat_template": MISTRAL_TEMPLATE}, 2),
}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_chat_template_and_end_ids_from_the_models_files(fam, family, tmp_path, dist1):
    from transformers import AutoTokenizer

    extra, config, eos = CHAT[family]
    d = tmp_path / family
    shutil.copytree(fam[family][0], d)
    make_tokenizer(d, extra=extra, config=config)
    gen_cfg = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen_cfg, "eos_token_id": eos}))
    model_cfg = json.loads((d / "config.json").read_text())  # Qwen's: <|endoftext|> alone
    (d / "config.json").write_text(json.dumps({**model_cfg, "eos_token_id": eos[-1]
                                               if isinstance(eos, list) else eos}))
    lm = load_model(d, dist1)
    tok = load_tokenizer(lm.tokenizer_path)
    theirs = AutoTokenizer.from_pretrained(str(d))
    conversation = [{"role": "user", "content": "Is Paris in France?"},
                    {"role": "assistant", "content": "Yes."},
                    {"role": "user", "content": "And Rome?"}]
    want = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(conversation) == want
    if family.startswith("qwen"):
        assert want.startswith("<|im_start|>system\nYou are Qwen" if family == "qwen2"
                               else "<|im_start|>user\nIs Paris")
        im_end = tok.encode("<|im_end|>")
        assert im_end == [261] and lm.end_ids == [261, 259] and 261 in end_tokens(tok)
        ids = tok.encode(want, bos=True)
        assert ids == theirs(want, add_special_tokens=True)["input_ids"]
    else:
        assert want == "<s>[INST] Is Paris in France? [/INST]Yes.</s>[INST] And Rome? [/INST]"
        assert lm.end_ids == [2] and end_tokens(tok)[0] == 2
        assert tok.encode(want, bos=True)[0] == 1 and tok.encode(want, bos=True).count(1) == 1
    assert declared_end_ids(d) == lm.end_ids


# ---- the server's native engine ----

def test_server_serves_qwen3_greedy_and_steered_as_transformers(fam, tmp_path):
    """scripts/serve.py on the Qwen3 model (q/k norms, head size 24): greedy completions, plain
    and with a steering vector at layer 1, are transformers' tokens (with the hook adding it)."""
    from safetensors.numpy import save_file
    from serving import Served

    path, hf, lm = fam["qwen3"]
    vec = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    (tmp_path / "push").mkdir()
    save_file({"vector": vec}, str(tmp_path / "push" / "layer_1.safetensors"))
    tok = load_tokenizer(lm.tokenizer_path)
    hook = [(hf.model.layers[0], adding(torch.from_numpy(vec), 3.0))]
    seen = []
    with Served(["--model", path, "--vectors", tmp_path / "push", "--threads", "1",
                 "--device", "cpu"]) as server:
        for steer, hooks in ((None, ()), ({"vector": "push", "layers": [1], "multiplier": 3.0},
                                          hook)):
            for prompt in ("hello there", "the quick brown fox"):
                body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
                r = server.post("/v1/completions", {**body, "steering": steer})
                assert r.status_code == 200, r.text
                got = r.json()["choices"][0]
                want = hf_greedy(hf, tok.encode(prompt, bos=True), 12, hooks)
                assert got["token_ids"] + ([2] if got["finish_reason"] == "stop" else []) == want
                seen.append(want)
    assert seen[:2] != seen[2:]  # the vector changed the completions


# ---- model parallel 2 under torchrun (gloo) ----

@pytest.mark.heavy
@pytest.mark.parametrize("family", FAMILIES)
def test_torchrun_mp2_cache_matches_transformers(fam, family, tmp_path):
    path, hf, lm = fam[family]
    data = write_csv(tmp_path / "pairs.csv", pair_rows(6, seed=4))
    cmd = ["timeout", "400", sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", os.path.join(ROOT, "scripts", "cache_activations.py"),
           "--model", path, "--data", data, "--output", tmp_path / "c", "--mp", "2",
           "--token", "all", "--batch_size", "3", "--layers", "0-2"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    c = ActivationCache(str(tmp_path / "c"))
    assert c.meta["parallel"] == {"world": 2, "mp": 2, "dp": 1}
    assert_cache_matches_transformers(tmp_path / "c", hf, load_tokenizer(lm.tokenizer_path),
                                      data)
