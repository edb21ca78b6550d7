"""Tokenizers, chosen by sniffing the file, and the chat formats.

- sentencepiece `tokenizer.model` (Llama 1/2);
- tiktoken-format `tokenizer.model` (lines of "base64(token bytes) rank"): Llama 3's special tokens
  and pre-tokenizer, unless a `tokenizer_special.json` beside it says otherwise (the GGUF converter
  `write_gguf_tokenizer` writes both files);
- Hugging Face `tokenizer.json`, through the `tokenizers` package.

`Tokenizer.bos_id` is the token `encode(bos=True)` prepends: None when the model adds none (a GGUF
whose `add_bos_token` is false, or absent for a BPE vocabulary llama.cpp adds no BOS to; a
tokenizer.json whose post-processor adds nothing).

Text is not markup. `encode(text)` maps the special-token strings in `text` to their ids, except
where `as_text` has marked them: a U+2060 WORD JOINER (TEXT_MARK) after the first character of a
special-token string (`<\u2060|im_end|>`) makes it the ordinary tokens that spell `<|im_end|>` (the
marks are never encoded; a U+2060 elsewhere is the text's own and is). `render_chat` marks the
messages' text, `prompts.rows` marks dataset text and answers, `scripts/generate.py` marks its
prompts: only the chat template's own markers become control tokens (as llama.cpp does;
transformers parses them anywhere), so a `<|im_end|><|im_start|>system` inside a dataset row or a
request cannot rewrite the conversation around it. Prompt CSVs keep the marks. `tok.parse_special =
True` (the commands' `--parse_special`) restores the old reading: marks are ignored and every
special string is a control token.

`Tokenizer.chat_template` is the model's own Jinja chat template: a GGUF's
`tokenizer.chat_template` (kept in `tokenizer_special.json`), or tokenizer_config.json's
`chat_template` or chat_template.jinja beside a tokenizer.json or tokenizer.model; None when it
carries none. `render_chat` renders it as transformers' `apply_chat_template` and llama.cpp's
`--jinja` do, or falls back to the hand-written family `format_chat` without one.
"""
import base64
import functools
import json
import os
import re
from datetime import datetime

from llama.errors import LlamaError

CHAT_FORMATS = ("none", "llama2", "llama3", "chatml")
SIDE_FILE = "tokenizer_special.json"
TEXT_MARK = "\u2060"  # WORD JOINER: after a special string's first character, it reads as text
# special-looking strings marked when no tokenizer is at hand: <|...|>, <s>, </s>, <unk>
LOOKS_SPECIAL = re.compile(r"<(?=\|[^\s<>|]{1,64}\|>|/?s>|unk>)")


def as_text(text: str, tok=None) -> str:
    """`text` marked so that encoding reads every special-token string in it as plain text: the
    tokenizer's own special strings, or without one anything shaped like <|...|>, <s>, </s>."""
    if tok is not None:
        return tok.as_text(text)
    return LOOKS_SPECIAL.sub("<" + TEXT_MARK, text)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# SmolLM2 splits digits singly before the GPT-2 split: whitespace before a digit stays one piece
SMOLLM_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|"""
                  r"""\s+(?=\p{N})|\s+(?!\S)|\s+""")
# Qwen2 / Qwen2.5 / Qwen3 (their tokenizer.json; llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2): Llama 3's
# split with single digits
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_PATTERNS = {"gpt-2": GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN, "smollm": SMOLLM_PATTERN,
                "qwen2": QWEN2_PATTERN}
# llama.cpp's default when a GGUF has no tokenizer.ggml.add_bos_token (src/llama-vocab.cpp, load):
# BPE vocabularies add no BOS except with these pre-tokenizers; sentencepiece ones always add it
BOS_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
           "lfm2", "tekken", "chameleon"}


def _llama3_special(n_base: int) -> dict[str, int]:
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]
    return {s: n_base + i for i, s in enumerate(names)}


def guess_chat_format(text: str) -> str:
    """The chat family whose marker appears in `text` (a chat template or a list of tokens)."""
    for marker, family in (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"),
                           ("[INST]", "llama2")):
        if marker in text:
            return family
    return "none"


class Tokenizer:
    """Shared by the three kinds: BOS/EOS handling, chat rendering. Subclasses give n_words,
    bos_id, eos_id, chat_format, `_encode(text)` (special-token strings mapped to their ids),
    `decode`, and may set chat_template and the texts bos_token / eos_token it uses."""
    n_words: int
    bos_id: int | None
    eos_id: int | None
    chat_format: str
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    parse_special: bool = False  # True: special strings are control tokens even where marked

    def _set_special(self, special: dict[str, int]):
        self.special = special
        names = sorted(special, key=len, reverse=True)  # the longest special string wins
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if special else None
        # the marks as_text (or the generic as_text without a tokenizer) puts in
        marked = [re.escape(n[0] + TEXT_MARK + n[1:]) for n in names if len(n) > 1]
        self._marked = re.compile("|".join(marked + [LOOKS_SPECIAL.pattern[:1] + TEXT_MARK
                                                     + LOOKS_SPECIAL.pattern[1:]]))

    def _parts(self, text: str):
        """(plain text, None) and ("", special id), in the order they appear in `text`; marked
        special strings (as_text) are plain text, unmarked."""
        parts = self._split.split(text) if self._split else [text]
        for i, part in enumerate(parts):
            yield ("", self.special[part]) if i % 2 else (self._unmark(part), None)

    def _unmark(self, part: str) -> str:
        """Plain text without as_text's marks (any other U+2060 is the text's own and stays)."""
        if TEXT_MARK not in part:
            return part
        return self._marked.sub(lambda m: m.group(0).replace(TEXT_MARK, "", 1), part)

    def as_text(self, text: str) -> str:
        """`text` marked so that encode() reads its special-token strings as plain text (the
        tokens that spell them). Unchanged when parse_special is set."""
        if self.parse_special or self._split is None:
            return text
        return self._split.sub(lambda m: m.group(0)[0] + TEXT_MARK + m.group(0)[1:], text)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`: special-token strings are control tokens, except those as_text
        marked (read as text); with parse_special every one is a control token."""
        if self.parse_special:
            text = self._unmark(text)
        ids = self._encode(text)
        if bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    @property
    def chat_source(self) -> str:
        """What render_chat uses: "template" (the model's own) or the hand-written family."""
        return "template" if self.chat_template else self.chat_format

    def render_chat(self, messages, system: str | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, special tokens as text (a template's BOS included,
        so encode(bos=True) adds no second one). `messages`: one user turn's text, or a list of
        {"role", "content"} dicts; `system` goes first, replacing any default system turn the
        template adds. With the model's own template: its Jinja rendering (add_generation_prompt
        opens the assistant turn). Without one: format_chat's family, one user turn only.
        Append an answer to the result to get a prompt that ends in it."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        # the messages' text is text: only the template's own markers become control tokens
        messages = [{**m, "content": self.as_text(m["content"])}
                    if isinstance(m.get("content"), str) else m for m in messages]
        if self.chat_template:
            return render_template(self.chat_template, messages, add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
        roles = [m.get("role") for m in messages]
        if roles not in (["user"], ["system", "user"]) or not add_generation_prompt:
            raise LlamaError(f"this tokenizer has no chat template: the {self.chat_format!r} "
                             "format renders one user turn (and a system turn) with the assistant "
                             "turn opened, not this conversation")
        return format_chat(self.chat_format, messages[-1]["content"],
                           system=messages[0]["content"] if len(messages) == 2 else None)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A chat template compiled as transformers compiles it: a sandbox, trim_blocks and
    lstrip_blocks, loop controls, raise_exception, tojson and strftime_now."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise LlamaError(f"the chat template does not parse: {e}") from None


def render_template(template: str, messages: list, add_generation_prompt: bool = True,
                    **special) -> str:
    """A Jinja chat template rendered over `messages` (special: bos_token, eos_token texts)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template).render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **special)
    except TemplateError as e:
        raise LlamaError(f"the chat template refused the conversation: {e}") from None


def _template_beside(folder: str, config: dict) -> str | None:
    """The chat template of tokenizer_config.json (a string, or a list of named templates whose
    "default" is taken) or of chat_template.jinja in `folder`; None when there is none."""
    t = config.get("chat_template")
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    jinja = os.path.join(folder, "chat_template.jinja")
    if not t and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            t = f.read()
    return t if isinstance(t, str) and t.strip() else None


def _token_text(t) -> str:
    """tokenizer_config.json's bos_token / eos_token: a string or an {"content": ...} object."""
    t = t.get("content") if isinstance(t, dict) else t
    return t if isinstance(t, str) else ""


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        from sentencepiece import SentencePieceProcessor

        try:
            self.sp = SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise LlamaError(f"{path}: not a sentencepiece or tiktoken tokenizer.model "
                             f"({e})") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        # the only chat format of sentencepiece LLaMAs ([INST] is text)
        self.chat_format = "llama2"
        self._set_special({self.sp.id_to_piece(i): i for i in range(self.n_words)
                           if self.sp.is_control(i)})
        folder = os.path.dirname(path)
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        self.chat_template = _template_beside(folder, config)
        self.bos_token, self.eos_token = (self.sp.id_to_piece(i) if i is not None else ""
                                          for i in (self.bos_id, self.eos_id))

    def _encode(self, text):
        ids = []
        for part, special in self._parts(text):
            ids += [special] if special is not None else self.sp.encode(part) if part else []
        return ids

    def decode(self, ids):
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)


class TiktokenTokenizer(Tokenizer):
    def __init__(self, path: str):
        import regex  # tiktoken's own dependency; \p{L} and the same \s as tiktoken's regex
        import tiktoken

        ranks = {}
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:
                    raise LlamaError(f"{path}: line {n} is not 'base64-token rank'") from None
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:  # tiktoken would panic (an uncatchable PanicException) on such a byte
            raise LlamaError(f"{path}: no rank for the bytes {missing[:8]}...: every byte needs "
                             "one")
        side = os.path.join(os.path.dirname(path), SIDE_FILE)
        if os.path.exists(side):
            info = _read_side(side)
        else:
            special = _llama3_special(len(ranks))
            info = dict(special_tokens=special, pattern=LLAMA3_PATTERN,
                        bos_id=special["<|begin_of_text|>"],
                        eos_id=special["<|end_of_text|>"], n_words=len(ranks) + len(special),
                        chat_format="llama3")
        special = info["special_tokens"]
        if len(set(ranks.values()) | set(special.values())) != len(ranks) + len(special):
            if not os.path.exists(side):  # read as Llama 3's: its special tokens collide
                raise LlamaError(
                    f"{path}: not a Llama 3 tokenizer on its own: it needs its companion "
                    f"{SIDE_FILE} beside it ({side} is missing; llama.convert writes the two "
                    "together: copy both)")
            raise LlamaError(f"{path}: two tokens share a rank (with {side})")
        self._set_special(special)
        self.enc = tiktoken.Encoding(path, pat_str=info["pattern"], mergeable_ranks=ranks,
                                     special_tokens=special)
        self.n_words, self.bos_id, self.eos_id = info["n_words"], info["bos_id"], info["eos_id"]
        self.chat_format = info["chat_format"]
        self.chat_template = info.get("chat_template") or None
        names = {i: t for t, i in special.items()}
        self.bos_token = info.get("bos_token", names.get(self.bos_id, ""))
        self.eos_token = info.get("eos_token", names.get(self.eos_id, ""))
        # bytes the model has no token for sit past n_words (see write_gguf_tokenizer). Its own BPE
        # drops them before merging, so their neighbours may merge: text holding one is split here
        # and each piece BPE'd without them
        gone = [b for b in range(256) if ranks[bytes([b])] >= self.n_words]
        self.gone = (re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in gone) + b"]")
                     if gone else None)
        self.pieces = regex.compile(info["pattern"])

    def _encode(self, text):
        if self.gone is None or not self.gone.search(text.encode("utf-8", "surrogatepass")):
            if TEXT_MARK not in text:
                return self.enc.encode(text, allowed_special="all")
            ids = []
            for part, special in self._parts(text):
                ids += [special] if special is not None else self.enc.encode(
                    part, allowed_special=set(), disallowed_special=())
            return ids
        ids = []
        for part, special in self._parts(text):
            ids += [] if special is None else [special]
            for piece in self.pieces.findall(part):
                if b := self.gone.sub(b"", piece.encode("utf-8", "surrogatepass")):
                    # no public call for one piece in tiktoken 0.14
                    ids += self.enc._encode_single_piece(b)
        return ids

    def decode(self, ids):
        return self.enc.decode(ids)


def _read_side(path: str) -> dict:
    keys = ("special_tokens", "pattern", "bos_id", "eos_id", "n_words", "chat_format")
    info = _read_json(path)
    if any(k not in info for k in keys):
        raise LlamaError(f"{path}: needs the keys {', '.join(keys)}")
    if info["chat_format"] not in CHAT_FORMATS:
        raise LlamaError(f"{path}: unknown chat_format {info['chat_format']!r}")
    return info


class HFTokenizer(Tokenizer):
    def __init__(self, path: str):
        from tokenizers import Tokenizer as Tk

        try:
            self.tk = Tk.from_file(path)
        except Exception as e:  # the tokenizers package raises bare Exceptions on bad JSON
            raise LlamaError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.n_words = self.tk.get_vocab_size(with_added_tokens=True)
        config = _read_json(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        bos, eos = (_token_text(config.get(k)) for k in ("bos_token", "eos_token"))
        self.bos_token, self.eos_token = bos, eos
        # BOS is what the post-processor puts first (Llama's "<s> $A"; SmolLM2's adds nothing), or
        # tokenizer_config.json's bos_token when it says add_bos_token
        plain, full = (self.tk.encode("x", add_special_tokens=a).ids for a in (False, True))
        if full[:1] != plain[:1]:
            self.bos_id = full[0]
        else:
            self.bos_id = vocab.get(bos) if config.get("add_bos_token") else None
        names = [eos, "</s>", "<|end_of_text|>", "<|endoftext|>"]
        self.eos_id = next((vocab[s] for s in names if s in vocab), None)
        self.chat_template = _template_beside(os.path.dirname(path), config)
        self.chat_format = guess_chat_format(self.chat_template or " ".join(vocab))
        self._set_special({t.content: i for i, t in self.tk.get_added_tokens_decoder().items()
                           if t.special})

    def _encode(self, text):
        if TEXT_MARK not in text:
            return self.tk.encode(text, add_special_tokens=False).ids
        ids = []
        for part, special in self._parts(text):
            if special is not None:
                ids.append(special)
            elif part:
                self.tk.encode_special_tokens = True  # the part's special strings are text
                try:
                    ids += self.tk.encode(part, add_special_tokens=False).ids
                finally:
                    self.tk.encode_special_tokens = False
        return ids

    def decode(self, ids):
        return self.tk.decode(ids, skip_special_tokens=False)


def _read_json(path: str) -> dict:
    """A JSON object; {} when the file is absent."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            d = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise LlamaError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise LlamaError(f"{path}: not a JSON object")
    return d


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer.model (sentencepiece or tiktoken), a tokenizer.json, a directory holding one,
    or a .gguf file (the byte-level BPE it holds, gguf_tokenizer_dir)."""
    path = os.fspath(path)
    if path.endswith(".gguf") and os.path.isfile(path):
        return load_tokenizer(os.path.join(gguf_tokenizer_dir(path), "tokenizer.model"))
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise LlamaError(f"{path}: no tokenizer.model or tokenizer.json in this directory")
    if not os.path.isfile(path):
        raise LlamaError(f"{path}: no such tokenizer file")
    with open(path, "rb") as f:
        head = f.read(512)
    if not head.strip():
        raise LlamaError(f"{path}: empty tokenizer file")
    if head.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    if re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", head):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)


def format_chat(family: str, user: str, system: str | None = None,
                answer: str | None = None) -> str:
    """The prompt text of one user turn, the assistant turn opened, `answer` (if any) appended.
    Special tokens are written as text (BOS included, so encode(bos=True) adds no second one).
    "none": system and user joined by a blank line; the answer follows after a space."""
    if family == "none":
        text = f"{system}\n\n{user}" if system else user
        return text + (" " + answer if answer else "")
    if family == "llama2":  # Meta's reference strips the contents and spaces the answer
        sys = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n" if system else ""
        return f"<s>[INST] {sys}{user.strip()} [/INST]" + (f" {answer.strip()}" if answer else "")
    if family == "llama3":
        def turn(role, text):
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>"
        head = turn("system", system) if system else ""
        return (f"<|begin_of_text|>{head}{turn('user', user)}"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{answer or ''}")
    if family == "chatml":
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer or ''}"
    raise LlamaError(f"unknown chat format {family!r}: expected one of {', '.join(CHAT_FORMATS)}")


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest move to 256+."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(moved)}


def gguf_tokenizer_dir(path, reader=None):
    """-> pathlib.Path of the folder holding the tokenizer.model + tokenizer_special.json of the
    GGUF at `path` (write_gguf_tokenizer; reader: its gguf.GGUFReader, opened here when needed),
    built once per GGUF file (keyed by its size and mtime, and by this file's source, so a fixed
    builder rebuilds) in ~/.cache/llama-ccs/gguf-tokenizers; concurrent ranks race safely through
    a rename. LlamaError (one line) for a GGUF whose tokenizer is not byte-level BPE."""
    import hashlib
    import shutil
    import tempfile
    from pathlib import Path

    from .staging import user_cache

    st = os.stat(path)
    with open(__file__, "rb") as f:
        key = hashlib.sha1(f"{st.st_size} {st.st_mtime_ns} ".encode() + f.read())
    root = user_cache("gguf-tokenizers")
    out = root / f"{Path(path).stem}-{key.hexdigest()[:12]}"
    if (out / "tokenizer.model").is_file() and (out / "tokenizer_special.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=root))
    try:
        write_gguf_tokenizer(reader if reader is not None else path, tmp)
        os.rename(tmp, out)
    except OSError:
        if not (out / "tokenizer.model").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_gguf_tokenizer(gguf, out_dir: str) -> str:
    """Write the byte-level BPE of a GGUF (a path or a gguf.GGUFReader) as a tiktoken-format
    `tokenizer.model` (rank = token id) and `tokenizer_special.json` into `out_dir`."""
    from gguf import GGUFReader

    if isinstance(gguf, GGUFReader):
        r, name = gguf, getattr(gguf.data, "filename", "GGUF")
    else:
        name = os.fspath(gguf)
        if not os.path.isfile(name):
            raise LlamaError(f"{name}: no such GGUF file")
        try:
            r = GGUFReader(name)
        except (ValueError, IndexError, KeyError) as e:
            raise LlamaError(f"{name}: not a readable GGUF file ({e})") from None

    def field(key, default=None):
        if key in r.fields:
            return r.fields[key].contents()
        if default is None:
            raise LlamaError(f"{name}: no {key} in the GGUF metadata")
        return default

    kind, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "")
    if kind != "gpt2":
        raise LlamaError(f"{name}: tokenizer model {kind!r} is not byte-level BPE ('gpt2'); "
                         "only those convert to tiktoken")
    if pre not in PRE_PATTERNS:
        raise LlamaError(f"{name}: unknown pre-tokenizer {pre!r}: known are "
                         f"{', '.join(PRE_PATTERNS)}")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    if len(types) != len(tokens):
        raise LlamaError(f"{name}: {len(tokens)} tokens but {len(types)} token types")
    byte = _byte_of_char()
    ranks, special, ids = {}, {}, {}
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ != 1:  # control, user-defined, unknown, unused: matched whole, never merged
            special[tok] = i
        elif any(c not in byte for c in tok):
            raise LlamaError(f"{name}: token {i} {tok!r} is not in GPT-2's byte-level alphabet")
        else:
            ranks[bytes(byte[c] for c in tok)] = ids[tok] = i
    # tiktoken merges the adjacent pair of lowest rank; that is the GGUF's BPE only if merge order
    # follows token ids
    last = -1
    for m in field("tokenizer.ggml.merges", []):
        t = ids.get(m.replace(" ", ""), -1)  # GPT-2's alphabet has no space: it separates the pair
        if t <= last:
            raise LlamaError(f"{name}: merge {m!r} makes no token or is out of token-id order; "
                             "tiktoken cannot express this BPE")
        last = t
    # bytes without a token get ranks past the vocabulary (tiktoken panics on a byte without one)
    for b in range(256):
        ranks.setdefault(bytes([b]), len(tokens) + b)
    add_bos = field("tokenizer.ggml.add_bos_token", pre in BOS_PRE)
    bos, eos = field("tokenizer.ggml.bos_token_id", -1), field("tokenizer.ggml.eos_token_id", -1)
    template = field("tokenizer.chat_template", "")
    text = lambda i: tokens[i] if 0 <= i < len(tokens) else ""  # noqa: E731  {{ bos_token }}
    info = dict(special_tokens=special, pattern=PRE_PATTERNS[pre],
                bos_id=int(bos) if add_bos and bos >= 0 else None,
                eos_id=int(eos) if eos >= 0 else None,
                n_words=len(tokens), chat_format=guess_chat_format(template), pre=pre,
                chat_template=template, bos_token=text(int(bos)), eos_token=text(int(eos)))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {i}\n"
                     for t, i in sorted(ranks.items(), key=lambda x: x[1]))
    with open(os.path.join(out_dir, SIDE_FILE), "w") as f:
        json.dump(info, f, indent=1, ensure_ascii=False)
    return out_dir
