"""The legacy completions request beyond one text prompt, as OpenAI and vLLM take it: the forms
of `prompt`, `n`, and `echo` with the prompt's own log-probabilities.

    prompts = read_prompts(body["prompt"], tok, vocab)   # [Prompt(text, ids)], one per prompt
    n = choices_per_prompt(body, len(prompts))
    logprobs = echo_logprobs(tok, prompt, scores, generated)   # the choice's "logprobs"

`prompt` is a string, a list of strings, a list of token ids or a list of lists of token ids.
Text is read as scripts/generate.py reads it (marked as text, BOS added when the model adds one);
token ids are used verbatim (no BOS added), as a client that tokenized for itself (lm-eval's
`local-completions`) means them. The answer has one choice per prompt and sample, prompt i's
sample j at index i * n + j (OpenAI's order).

With `echo`, a choice's text is the prompt's text followed by the completion, and with
`logprobs: k` its `logprobs` cover the prompt's tokens too: per prompt token its log-probability
given the tokens before it (`null` for the first, which has no context), with `top_logprobs`
holding the k most likely tokens there (at least the most likely one) and the prompt's own token.
Those scores come from the prefill the request runs anyway (server/engine.py `score_prompt`).
"""
from dataclasses import dataclass
from typing import List, Optional

from .schemas import ApiError, bad

MAX_N = 16  # samples per prompt
MAX_CHOICES = 256  # prompts x n in one request


@dataclass
class Prompt:
    text: str  # what echo returns: the prompt as given, or its ids decoded
    ids: List[int]  # what the model reads


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _token_prompt(ids: List[int], param: str, tok, vocab: int) -> Prompt:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise bad(param, f"token {i} is {t}: not in the vocabulary (0..{vocab - 1})")
    return Prompt(tok.decode(ids), list(ids))


def _text_prompt(text: str, param: str, tok) -> Prompt:
    if not text:
        raise bad(param, "the prompt is empty")
    return Prompt(text, tok.encode(tok.as_text(text), bos=True))


def read_prompts(prompt, tok, vocab: int) -> List[Prompt]:
    """`prompt` in any of its four forms -> one Prompt per prompt. vocab: the model's vocabulary
    size (token ids must lie in 0..vocab-1). ApiError 400 naming `prompt` or `prompt.I` when a
    form is wrong or empty."""
    if isinstance(prompt, str):
        return [_text_prompt(prompt, "prompt", tok)]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "expected a string, a list of strings, a list of token ids or a "
                  "list of lists of token ids")
    if _is_ids(prompt):
        return [_token_prompt(prompt, "prompt", tok, vocab)]
    if len(prompt) > MAX_CHOICES:
        raise bad("prompt", f"{len(prompt)} prompts: at most {MAX_CHOICES} in one request")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(_text_prompt(p, f"prompt.{i}", tok))
        elif _is_ids(p):
            out.append(_token_prompt(p, f"prompt.{i}", tok, vocab))
        else:
            raise bad(f"prompt.{i}", "expected a non-empty string or a non-empty list of token "
                      "ids")
    return out


def choices_per_prompt(body: dict, n_prompts: int) -> int:
    """`n`: samples per prompt (1..MAX_N; prompts x n at most MAX_CHOICES)."""
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise bad("n", f"{n!r} is not an integer from 1 to {MAX_N}")
    if n * n_prompts > MAX_CHOICES:
        raise bad("n", f"{n_prompts} prompts x n {n} = {n * n_prompts} choices: at most "
                  f"{MAX_CHOICES} in one request")
    return n


def echo_flag(body: dict, stream: bool, n_choices: int) -> bool:
    """`echo`; streaming is refused with echo or with several choices (one choice per stream)."""
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise bad("echo", f"{echo!r} is not true or false")
    if stream and echo:
        raise ApiError(400, "stream: not supported with echo (send stream: false)", "stream")
    if stream and n_choices > 1:
        raise ApiError(400, "stream: one prompt and n = 1 only (send several prompts or n > 1 "
                       "with stream: false)", "stream")
    return echo


def _top(tok, pairs, own: Optional[int], own_logprob: Optional[float]) -> dict:
    """{token text: logprob} of the most likely tokens, most likely first, and the position's
    own token; tokens of the same text keep the larger log-probability."""
    out = {}
    for t, v in pairs:
        out.setdefault(tok.decode([t]), v)
    if own is not None:
        out.setdefault(tok.decode([own]), own_logprob)
    return out


def echo_logprobs(tok, prompt: Prompt, scores: Optional[list],
                  generated: Optional[dict]) -> Optional[dict]:
    """A choice's `logprobs` with echo: the prompt's tokens (scores: Engine.score_prompt's
    [logprob, [[token, logprob], ...]] for positions 1..S-1; None when logprobs were not asked
    for) followed by the generated ones (`generated`: the completion's own logprobs object, or
    None when nothing was generated). `text_offset`: each token's start in the choice's text."""
    if scores is None:
        return None
    tokens = [tok.decode([t]) for t in prompt.ids]
    token_logprobs = [None] + [s[0] for s in scores]
    tops = [None] + [_top(tok, s[1], t, s[0]) for s, t in zip(scores, prompt.ids[1:])]
    offsets, at = [], 0
    for piece in tokens:
        offsets.append(at)
        at += len(piece)
    at = len(prompt.text)
    if generated:
        for piece in generated["tokens"]:
            offsets.append(at)
            at += len(piece)
        tokens += generated["tokens"]
        token_logprobs += generated["token_logprobs"]
        tops += generated["top_logprobs"]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}
