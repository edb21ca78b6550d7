"""Where hidden states are read: the token modes, in one place.

A token mode names, for each prompt, the positions whose residual-stream states are read, and
whether they are kept one row per token or averaged into one row per prompt (as steering-vectors
makes the read position a parameter). Extraction, the cache layout and the scripts that average a
token "all" cache ask this module; a new mode is one entry of `Token` and of `positions`.

Positions are absolute (0: the BOS token). Extraction runs a contrast pair's shared prefix once
and each side's own tokens (its suffix) on top: `split` cuts a mask of absolute positions into the
prefix's frame and the suffix's, and `read` takes the states of both.
"""
from typing import Literal, Tuple, get_args

import numpy as np

Token = Literal["last", "mean", "all"]  # the read-position modes: every --token flag's type
# mode -> whether its rows are per token (True) or one per prompt (False, the positions averaged)
TOKEN_MODES = {mode: mode == "all" for mode in get_args(Token)}


def per_token(token: str) -> bool:
    """Whether a cache of this token mode holds one row per token (offsets_SIDE.npy) rather than
    one per prompt."""
    return TOKEN_MODES[token]


def mean_start(lengths, keep_first: bool = False) -> np.ndarray:
    """The one rule for an example's mean state, in extraction (token "mean") and in every script
    that averages a token "all" cache: the first position averaged, per example. 1 leaves out
    position 0, the attention sink (on SmolLM2 a ~25,000 activation in one dimension where every
    other position stays under ~150, so a mean over it is mostly that dimension); a one-token
    prompt keeps its token (0), and keep_first keeps position 0 everywhere.
    lengths: int or array of prompt lengths in tokens -> int64 array of the same shape."""
    lengths = np.asarray(lengths)
    return np.where(keep_first | (lengths <= 1), 0, 1).astype(np.int64)


def positions(token: str, lengths: np.ndarray, keep_first: bool = False) -> np.ndarray:
    """The positions read: lengths int [...] (tokens per prompt) -> bool [..., max length],
    True at each prompt's read positions. last: its last token; mean: from mean_start on; all:
    every token."""
    at = np.arange(int(lengths.max()) if lengths.size else 0)
    lengths = lengths[..., None]
    if token == "last":
        return at == lengths - 1
    if token == "mean":
        return (at < lengths) & (at >= mean_start(lengths, keep_first))
    if token == "all":
        return at < lengths
    raise ValueError(f"unknown token mode {token!r}")


def answer_scores(lengths: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """Zero-shot scoring's read positions: lengths [N, sides], answer [N] (where the sides start
    to differ) -> bool [N, sides, max length], True at the positions whose next-token logits score
    an answer token (the token at t + 1 is an answer token: t + 1 >= max(answer, 1))."""
    at = np.arange(int(lengths.max()))
    nxt = at + 1
    return (nxt >= np.maximum(answer, 1)[:, None, None]) & (nxt < lengths[..., None])


def split(mask: np.ndarray, shared: np.ndarray, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """A mask of absolute positions [B, sides, T] -> (its prefix part [B, sides, max shared],
    its suffix part [B, sides, width]): example b's prefix holds positions [0, shared[b]), its
    suffix's position j is the absolute position shared[b] + j."""
    B, k, T = mask.shape
    top = int(shared.max()) if B else 0
    wide = np.concatenate([mask, np.zeros((B, k, top + width), dtype=bool)], axis=2)
    pre = wide[:, :, :top] & (np.arange(top) < shared[:, None])[:, None, :]
    at = np.broadcast_to((shared[:, None] + np.arange(width))[:, None, :], (B, k, width))
    return pre, np.take_along_axis(wide, at, axis=2)


def read(token: str, masks: Tuple[np.ndarray, np.ndarray], suffix, prefix=None):
    """The states at the read positions. masks: `split`'s (prefix, suffix) parts; suffix: states
    [B, sides, S, dim] of each side's own tokens; prefix: states [B, P, dim] of the shared
    prefixes (None when no example has one). -> float32 [B, sides, dim] (the read positions
    averaged, summed in float32), or for a per-token mode [side][example] tensors [length, dim]
    (prefix rows, then the side's own)."""
    import torch

    if per_token(token):
        B, k = masks[1].shape[:2]
        head = [prefix[b] if prefix is not None else suffix[b, 0, :0] for b in range(B)]
        return [[torch.cat([_rows(head[b], masks[0][b, s]), _rows(suffix[b, s], masks[1][b, s])])
                 .float() for b in range(B)] for s in range(k)]
    pre_mask, suf_mask = (torch.from_numpy(m).to(suffix.device) for m in masks)
    B, k = suf_mask.shape[:2]
    if not pre_mask.any() and bool((suf_mask.sum(2) == 1).all()):  # one position a row: gather
        at = suf_mask.to(torch.uint8).argmax(2)[..., None, None].expand(B, k, 1, suffix.shape[-1])
        return suffix.gather(2, at)[:, :, 0].float()
    total = torch.einsum("bks,bksd->bkd", suf_mask.float(), suffix.float())
    count = suf_mask.sum(2).float()
    if prefix is not None and pre_mask.any():
        total = total + torch.einsum("bkp,bpd->bkd", pre_mask.float(), prefix.float())
        count = count + pre_mask.sum(2).float()
    return total / count[..., None]


def _rows(states, mask: np.ndarray):
    """states [T, dim] at the positions of mask [T]: a slice when they are one run (the usual
    case, no copy), else an index."""
    at = np.flatnonzero(mask)
    if len(at) == 0 or at[-1] - at[0] + 1 == len(at):
        return states[at[0]: at[-1] + 1] if len(at) else states[:0]
    import torch

    return states[torch.from_numpy(at).to(states.device)]
