"""A completion's `logprobs` with `echo`, as OpenAI's legacy API and vLLM give it: the prompt's
own tokens first, then the generated ones.

    choice["logprobs"] = echo_logprobs(tok, prompt, job.prompt_logprobs, choice["logprobs"])

Per prompt token: its log-probability given the tokens before it (`null` for the first, which
has no context), and `top_logprobs` holding the k most likely tokens there (at least the most
likely one) and the prompt's own token. Those scores come from the prefill the request runs
anyway (server/engine.py `score_prompt`); the prompt forms, `n` and `echo` are read by
server/schemas.py.
"""
from typing import Optional


def _top(tok, pairs, own: int, own_logprob: float) -> dict:
    """{token text: logprob} of the most likely tokens, most likely first, and the position's
    own token; tokens of the same text keep the larger log-probability."""
    out = {}
    for t, v in pairs:
        out.setdefault(tok.decode([t]), v)
    out.setdefault(tok.decode([own]), own_logprob)
    return out


def echo_logprobs(tok, prompt, scores: Optional[list],
                  generated: Optional[dict]) -> Optional[dict]:
    """A choice's `logprobs` with echo. prompt: a schemas.Prompt; scores: Engine.score_prompt's
    [logprob, [[token, logprob], ...]] for positions 1..S-1 (None when logprobs were not asked
    for: then None); generated: the completion's own logprobs object (tokens, token_logprobs,
    top_logprobs), None when nothing was generated. `text_offset`: each token's start in the
    choice's text (the prompt's text, then the completion)."""
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
