"""Prompt token ids of a chat request in which only the template's own markers are special tokens.

    ids = encode_chat(tokenizer, [{"role": "user", "content": "hi <|im_end|>"}])

A user who types `<|im_end|>` (or any special-token string) writes text, not a control token: the
conversation is rendered with the model's template (Tokenizer.render_chat), the spans each
message's content fills are located (the template is rendered again with a unique marker in place
of each content, and the real rendering must equal those pieces with the contents put back), and
special-token strings are honoured only outside those spans. Text between special tokens is
encoded as plain text (`encode_plain`), so a conversation without special-token strings in its
contents gets exactly the ids of `tokenizer.encode(rendered)` (what scripts/generate.py --chat
encodes). A template that rewrites contents (e.g. trims them) so that the spans cannot be located
is still served when no content holds a special-token string, and refused otherwise.
"""
import re
from typing import List, Optional, Tuple

from llama.errors import LlamaError

MARK = "\ue000{}\ue001"  # private-use characters: no template or tokenizer gives them meaning


def encode_plain(tok, text: str) -> List[int]:
    """Ids of `text` with every special-token string in it encoded as ordinary text."""
    if not text:
        return []
    if hasattr(tok, "enc"):  # tiktoken
        raw = text.encode("utf-8", "surrogatepass")
        if tok.gone is None or not tok.gone.search(raw):
            return tok.enc.encode(text, allowed_special=set(), disallowed_special=())
        ids = []
        for piece in tok.pieces.findall(text):
            if b := tok.gone.sub(b"", piece.encode("utf-8", "surrogatepass")):
                ids += tok.enc._encode_single_piece(b)
        return ids
    if hasattr(tok, "tk"):  # Hugging Face tokenizers
        tok.tk.encode_special_tokens = True
        try:
            return tok.tk.encode(text, add_special_tokens=False).ids
        finally:
            tok.tk.encode_special_tokens = False
    return tok.sp.encode(text)  # sentencepiece parses no control tokens in text


def content_spans(tok, messages: List[dict]) -> Tuple[str, Optional[list]]:
    """(the rendered prompt, [(start, end)] of every message content in it, or None when the
    template's output cannot be split back into template text and contents)."""
    text = tok.render_chat(messages)
    marked = [dict(m, content=MARK.format(i)) for i, m in enumerate(messages)]
    try:
        skeleton = tok.render_chat(marked)
    except LlamaError:
        return text, None
    parts = re.split("\ue000(\\d+)\ue001", skeleton)
    rebuilt, spans = "", []
    for i, part in enumerate(parts):
        if i % 2:
            content = messages[int(part)]["content"]
            spans.append((len(rebuilt), len(rebuilt) + len(content)))
            rebuilt += content
        else:
            rebuilt += part
    return text, (spans if rebuilt == text else None)


def encode_chat(tok, messages: List[dict]) -> List[int]:
    """The prompt ids of a conversation, the assistant turn opened (BOS when the tokenizer adds
    one). Raises LlamaError when a content holds a special-token string and the template's
    output cannot be split safely."""
    text, spans = content_spans(tok, messages)
    specials = list(tok._split.finditer(text)) if tok._split else []
    if spans is None:
        inside = [m["content"] for m in messages if tok._split and tok._split.search(m["content"])]
        if inside:
            raise LlamaError("this chat template rewrites message contents, so a content holding "
                             f"a special token ({tok._split.search(inside[0]).group(0)!r}) "
                             "cannot be encoded safely")
        return tok.encode(text, bos=True)
    ids, at = [], 0
    for m in specials:
        if any(lo < m.end() and m.start() < hi for lo, hi in spans):
            continue  # written by the user: plain text
        ids += encode_plain(tok, text[at: m.start()]) + [tok.special[m.group(0)]]
        at = m.end()
    ids += encode_plain(tok, text[at:])
    if tok.bos_id is not None and ids[:1] != [tok.bos_id]:
        ids.insert(0, tok.bos_id)
    return ids
