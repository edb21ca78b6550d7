"""Tokenizers made inside the tests: sentencepiece (trained here), tiktoken (written here),
tokenizer.json (built with `tokenizers`); round trips, BOS/EOS, special tokens, chat formats, bad
files."""
import base64
import json
import random
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from llama.errors import LlamaError
from llama.tokenizer import CHAT_FORMATS, format_chat, load_tokenizer

WORDS = ("the cat sat on a mat while dogs ran over green hills and rivers to find bread cheese "
         "apples every morning evening city country capital river mountain question answer true "
         "false yes no Paris France Tokyo Japan number seven twelve 42 1999 café naïve "
         "über").split()
TEXTS = ["hello world", "The capital of France is Paris.", "  two  spaces\tand a tab\nnew line",
         "naïve café über 日本 😀", "digits 0123456789 and 3.14159", ""]


def corpus(n=3000, seed=0):
    """Real words and made-up ones from syllables, so the trainers have enough to merge."""
    rng = random.Random(seed)
    syll = "ka to ri mu se na lo pe ti ba do fu gi ze ro".split()
    words = list(WORDS) + ["".join(rng.choices(syll, k=rng.randint(1, 4))) for _ in range(400)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A Llama-like sentencepiece BPE: <unk> 0, <s> 1, </s> 2, byte fallback, no normalisation."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(d / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1)
    return d


MERGED = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world"]


@pytest.fixture(scope="module")
def tt_dir(tmp_path_factory):
    """A Llama-3-style tiktoken file: the 256 bytes then a few merges; no side file, so the
    Llama 3 special tokens follow at 256 + len(MERGED)."""
    d = tmp_path_factory.mktemp("tt")
    ranks = [bytes([b]) for b in range(256)] + MERGED
    (d / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                               for i, t in enumerate(ranks)))
    return d


def make_hf(d, template=None, config=None):
    """A byte-level BPE tokenizer.json trained here; `template` is a TemplateProcessing single
    spec."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, show_progress=False,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())))
    if template:
        tk.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<|begin_of_text|>", 3)])
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_sentencepiece(sp_dir):
    tok = load_tokenizer(sp_dir)  # the directory
    assert type(tok).__name__ == "SentencePieceTokenizer"
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.chat_format) == (400, 1, 2, "llama2")
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    ids = tok.encode("hello world", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    # special-token strings are tokens, not text; BOS never doubled
    assert tok.encode("<s>hello</s>") == [1] + tok.encode("hello") + [2]
    assert tok.encode("<s>hello", bos=True) == tok.encode("hello", bos=True)
    assert tok.decode(tok.encode("<s>[INST] hi [/INST] yes</s>")) == "<s>[INST] hi [/INST] yes</s>"


def test_sentencepiece_llama2_chat(sp_dir):
    tok = load_tokenizer(sp_dir / "tokenizer.model")
    text = format_chat("llama2", "Is Paris in France?", system="Answer truthfully.", answer="Yes")
    assert (text == "<s>[INST] <<SYS>>\nAnswer truthfully.\n<</SYS>>\n\nIs Paris in France? "
                    "[/INST] Yes")
    ids = tok.encode(text, bos=True)
    assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids
    # as Meta's reference tokenizes it: BOS, then the text after it encoded whole
    assert ids == [1] + tok.sp.encode(text[len("<s>"):])


def test_tiktoken_llama3(tt_dir):
    tok = load_tokenizer(tt_dir / "tokenizer.model")
    base = 256 + len(MERGED)
    bot, eot_text, start, end, eot = base, base + 1, base + 6, base + 7, base + 9
    assert ((tok.n_words, tok.bos_id, tok.eos_id, tok.chat_format)
            == (base + 256, bot, eot_text, "llama3"))
    assert tok.encode("hello world") == [256 + MERGED.index(b"hello"),
                                         256 + MERGED.index(b" world")]
    rng = random.Random(1)
    for t in TEXTS + ["".join(chr(rng.randint(32, 0x2FFF)) for _ in range(40)) for _ in range(50)]:
        assert tok.decode(tok.encode(t)) == t
    text = format_chat("llama3", "Is Paris in France?", system="Answer truthfully.", answer="Yes")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Answer truthfully.<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nYes")
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == bot and ids.count(bot) == 1 and ids[-1] == eot_text
    assert [i for i in ids if i >= base] == [bot, start, end, eot, start, end, eot, start, end,
                                             eot_text]
    assert tok.decode(ids[:-1]) == text


def test_side_file_overrides_llama3(tt_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((tt_dir / "tokenizer.model").read_bytes())
    side = dict(special_tokens={"<|im_start|>": 300, "<|im_end|>": 301}, pattern=r"\s+|\S+",
                bos_id=None, eos_id=301, n_words=302, chat_format="chatml")
    (tmp_path / "tokenizer_special.json").write_text(json.dumps(side))
    tok = load_tokenizer(tmp_path)
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.chat_format) == (302, None, 301, "chatml")
    assert tok.encode("hello", bos=True) == tok.encode("hello")  # no BOS to add
    ids = tok.encode(format_chat("chatml", "hi", answer="yes"))
    assert [i for i in ids if i >= 300] == [300, 301, 300]
    assert max(tok.encode("<|begin_of_text|>")) < 256 + len(MERGED)  # not special here: plain text


def test_hf_tokenizer_chatml(tmp_path):
    d = make_hf(tmp_path / "chatml",
                config={"eos_token": "<|im_end|>", "chat_template": "{{'<|im_start|>' + m}}"})
    tok = load_tokenizer(d / "tokenizer.json")
    assert ((tok.n_words, tok.bos_id, tok.eos_id, tok.chat_format)
            == (tok.tk.get_vocab_size(), None, 2, "chatml"))
    assert tok.n_words > 300
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    text = format_chat("chatml", "Is Paris in France?", system="Be brief.", answer="Yes")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs Paris in "
                    "France?<|im_end|>\n<|im_start|>assistant\nYes")
    ids = tok.encode(text, bos=True, eos=True)
    assert [i for i in ids if i < 7] == [1, 2, 1, 2, 1, 2]
    assert tok.decode(ids) == text + "<|im_end|>"


def test_hf_tokenizer_bos_from_post_processor(tmp_path):
    d = make_hf(tmp_path / "l3", template="<|begin_of_text|> $A")  # no tokenizer_config.json
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.chat_format) == (3, 0, "llama3")
    ids = tok.encode(format_chat("llama3", "hi"), bos=True)
    assert ids[0] == 3 and ids.count(3) == 1 and [i for i in ids if i < 7] == [3, 4, 5, 6, 4, 5]
    assert tok.encode("hello", bos=True) == [3] + tok.encode("hello")


def test_format_none_and_families():
    assert CHAT_FORMATS == ("none", "llama2", "llama3", "chatml")
    assert format_chat("none", "Is Paris in France?") == "Is Paris in France?"
    assert format_chat("none", "Q?", system="S.", answer="Yes") == "S.\n\nQ? Yes"
    for fam, sep in zip(CHAT_FORMATS, (" ", " ", "", "")):  # the answer opens the assistant turn
        assert format_chat(fam, "Q?", answer="Yes") == format_chat(fam, "Q?") + sep + "Yes"


@pytest.mark.parametrize("content",
                         [b"\x00\x01garbage bytes\xff" * 20, b"", b"   \n", b"{not json",
                          b"aGk= 0\n!!! x\n",
                                     b"aGk= 0\n"])
def test_bad_tokenizer_files(tmp_path, content):
    p = tmp_path / "tokenizer.model"
    p.write_bytes(content)
    with pytest.raises(LlamaError, match=re.escape(str(p))):
        load_tokenizer(p)


def test_bad_paths_and_family(tmp_path, tt_dir):
    with pytest.raises(LlamaError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.model")
    with pytest.raises(LlamaError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)  # a directory without a tokenizer
    (tmp_path / "tokenizer.model").write_bytes((tt_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_special.json").write_text('{"pattern": "x"}')
    with pytest.raises(LlamaError, match="tokenizer_special.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_special.json").write_text(json.dumps(dict(
        special_tokens={"<x>": 5}, pattern="x", bos_id=None, eos_id=None, n_words=300,
        chat_format="chatml")))
    with pytest.raises(LlamaError, match="share a rank"):  # 5 is the byte \x05's rank
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_special.json").write_text(json.dumps(dict(
        special_tokens={}, pattern="x", bos_id=None, eos_id=None, n_words=300,
        chat_format="vicuna")))
    with pytest.raises(LlamaError, match="tokenizer_special.json: unknown chat_format 'vicuna'"):
        load_tokenizer(tmp_path)
    with pytest.raises(LlamaError, match="vicuna"):
        format_chat("vicuna", "hi")


def test_bad_file_cli_one_line(tmp_path):
    p = tmp_path / "tokenizer.model"
    p.write_bytes(b"\x08\x01junk that is not a model proto" * 10)
    code = ("from llama.errors import cli; from llama.tokenizer import load_tokenizer; "
            f"cli(load_tokenizer, {str(p)!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and str(p) in r.stderr


LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
    "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set sys = '' %}"
    "{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first %}{{ sys }}{% endif %}{{ m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_render_chat_template_sources_and_fallback(sp_dir, tmp_path, tt_dir):
    """The model's own template from tokenizer_config.json (a string or named list) or
    chat_template.jinja beside a sentencepiece or HF tokenizer; the hand-written family without."""
    plain = load_tokenizer(sp_dir)
    assert plain.chat_template is None and plain.chat_source == "llama2"
    assert plain.render_chat("Q?", system="S.") == format_chat("llama2", "Q?", system="S.")
    with pytest.raises(LlamaError, match="no chat template"):
        plain.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}])
    for how in ("string", "list", "jinja"):
        d = tmp_path / how
        d.mkdir()
        (d / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
        config = {"string": {"chat_template": LLAMA2_TEMPLATE},
                  "list": {"chat_template": [{"name": "tool_use", "template": "x"},
                                             {"name": "default", "template": LLAMA2_TEMPLATE}]},
                  "jinja": {}}[how]
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        if how == "jinja":
            (d / "chat_template.jinja").write_text(LLAMA2_TEMPLATE)
        tok = load_tokenizer(d)
        assert tok.chat_source == "template" and (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
        conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Q?"}]
        assert tok.render_chat(conv, system="S.") == \
            "<s>[INST] <<SYS>>\nS.\n<</SYS>>\n\nHi [/INST] Yo </s><s>[INST] Q? [/INST]"
        ids = tok.encode(tok.render_chat("Q?"), bos=True)
        assert ids.count(tok.bos_id) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "bad" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ raise_exception('only user turns') }}"}))
    with pytest.raises(LlamaError, match="template refused the conversation: only user turns"):
        load_tokenizer(tmp_path / "bad").render_chat("Q?")
    assert load_tokenizer(tt_dir).chat_template is None  # a tiktoken file without side file
