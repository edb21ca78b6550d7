"""vLLM's tokenizer routes, so a client needs no tokenizer of its own (lm-eval's
`local-completions` asks `GET /tokenizer_info`, then sends `POST /tokenize` and `/detokenize`):

    GET  /tokenizer_info   -> {"tokenizer_class", "bos_token", "eos_token", "pad_token",
                               "model_max_length", "chat_template", ...} (tokenizer_config.json's
                               keys; a name is null when the tokenizer has none)
    POST /tokenize         {"prompt": text, "add_special_tokens": true, "return_token_strs": false}
                           or {"messages": [...]} -> {"count", "max_model_len", "tokens",
                           "token_strs"}
    POST /detokenize       {"tokens": [ids]} -> {"prompt": text}

`/tokenize` reads special-token strings in the text as control tokens and, with
`add_special_tokens` (default true), puts the BOS first when the model's tokenizer adds one, as a
Hugging Face tokenizer's `encode` does by default. `messages` are the chat route's tokens: the
model's chat template rendered as /v1/chat/completions renders it (the contents marked as text).
Field names and defaults follow vLLM's entrypoints (TokenizeCompletionRequest, TokenizeResponse,
DetokenizeRequest, TokenizerInfoResponse).
"""
from typing import List

from llama.errors import LlamaError

from .schemas import ApiError, Limits, bad, boolean, chat_messages


def tokenizer_info(tok, limits: Limits) -> dict:
    """GET /tokenizer_info: the tokenizer's settings as tokenizer_config.json spells them."""
    return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token or None,
            "eos_token": tok.eos_token or None, "pad_token": None, "unk_token": None,
            "add_bos_token": tok.bos_id is not None, "add_eos_token": False,
            "model_max_length": limits.context, "chat_template": tok.chat_template,
            "vocab_size": tok.n_words}


def tokenize(body: dict, tok, limits: Limits) -> dict:
    """POST /tokenize: `prompt` (text) or `messages` (a chat) -> its token ids."""
    special = boolean(body, "add_special_tokens", True)
    if body.get("messages") is not None:
        if tok.chat_source == "none":
            raise ApiError(400, "messages: this model's tokenizer has no chat format", "messages")
        try:
            ids = tok.encode(tok.render_chat(chat_messages(body)), bos=special)
        except LlamaError as e:
            raise ApiError(400, str(e), "messages") from None
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("prompt", "expected a string (or send messages)")
        ids = tok.encode(prompt, bos=special)
    out = {"count": len(ids), "max_model_len": limits.context, "tokens": ids,
           "token_strs": None}
    if boolean(body, "return_token_strs"):
        out["token_strs"] = [tok.decode([t]) for t in ids]
    return out


def detokenize(body: dict, tok, vocab: int) -> dict:
    """POST /detokenize: `tokens` (ids in 0..vocab-1) -> {"prompt": their text}."""
    ids: List[int] = body.get("tokens")
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int)
                                        for t in ids):
        raise bad("tokens", "expected a list of token ids")
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise bad("tokens", f"token {i} is {t}: not in the vocabulary (0..{vocab - 1})")
    return {"prompt": tok.decode(ids)}
