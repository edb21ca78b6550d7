"""How extraction cuts its work: prompts tokenized, each contrast pair's shared token prefix run
once, examples sorted by length and packed into batches of at most `max_batch_tokens` padded
tokens; then one batch through the model, the states read where activations/readout.py says."""
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from . import readout
from llama.errors import LlamaError
from .promptfile import Prompts


@dataclass
class Plan:
    seqs: List[List[np.ndarray]]  # [side][example] token ids
    lengths: np.ndarray  # [N, sides]
    shared: np.ndarray  # [N] tokens run once for all sides
    answer: np.ndarray  # [N] where the sides start to differ: their answer tokens follow
    batches: List[np.ndarray]  # example numbers, in processing order

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def tokenize(prompts: Prompts, tok, vocab: int, max_len: int) -> List[List[np.ndarray]]:
    seqs = []
    for s, col in zip(prompts.sides, prompts.texts):
        side = []
        for i, text in enumerate(col):
            ids = np.asarray(tok.encode(text, bos=True), dtype=np.int32)
            where = f"{prompts.path}, row {i + 1} (idx {prompts.ids[i]}), {s} prompt"
            if len(ids) > max_len:
                raise LlamaError(f"{where}: {len(ids)} tokens, longer than the model's "
                                 f"max_seq_len {max_len}")
            if len(ids) and ids.max() >= vocab:
                raise LlamaError(f"{where}: token id {ids.max()} is outside the model's "
                                 f"vocabulary ({vocab}): wrong tokenizer?")
            side.append(ids)
        seqs.append(side)
    return seqs


def plan(seqs, zero_shot: bool, max_batch_tokens: int, batch_size: Optional[int]) -> Plan:
    k, n = len(seqs), len(seqs[0])
    lengths = np.array([[len(seqs[s][i]) for s in range(k)] for i in range(n)], dtype=np.int64)
    answer = np.zeros(n, dtype=np.int64)
    shared = np.zeros(n, dtype=np.int64)
    if k > 1:
        for i in range(n):
            a, b = seqs[0][i], seqs[1][i]
            m = min(len(a), len(b))
            diff = np.flatnonzero(a[:m] != b[:m])
            answer[i] = diff[0] if len(diff) else m
        # every side keeps a token of its own; zero-shot also needs the last shared token's logits
        shared = np.minimum(answer - (1 if zero_shot else 0), lengths.min(1) - 1).clip(min=0)
    rest = (lengths - shared[:, None]).max(1)
    order = np.lexsort((rest, shared))
    batches, cur, top_p, top_s = [], [], 0, 0
    for i in order:
        p, r = max(top_p, shared[i]), max(top_s, rest[i])
        cost = (len(cur) + 1) * (p + k * r)
        if cur and (cost > max_batch_tokens or (batch_size and len(cur) >= batch_size)):
            batches.append(np.array(cur))
            cur, p, r = [], shared[i], rest[i]
        cur.append(i)
        top_p, top_s = p, r
    batches.append(np.array(cur))
    return Plan(seqs, lengths, shared, answer, batches)


def _pad(rows, device) -> torch.Tensor:
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for j, r in enumerate(rows):
        out[j, : len(r)] = torch.from_numpy(r.astype(np.int64))
    return out.to(device)


def forward_batch(model, batch_plan: Plan, idx: np.ndarray, layers: List[int], cfg, device,
                  steer=None):
    """One batch through the model -> ({layer: states}, logprobs [B, sides] or None).

    cfg: the run's activations.extract.Extraction (token, zero_shot, mean_keep_first
    read here). Each
    example's shared prefix [B, P] runs once and each side's own tokens [B * sides, S] on top of
    its keys and values; the states are read at the positions of cfg.token
    (activations/readout.py):
    float32 [B, sides, dim] for a mode with one row per prompt, [side][example] tensors
    [length, dim] for a per-token one. Zero-shot: each side's log-probability of its answer
    tokens (those after the sides first differ), from the logits before each."""
    sides, B = len(batch_plan.seqs), len(idx)
    shared, lengths = batch_plan.shared[idx], batch_plan.lengths[idx]  # [B], [B, sides]
    suffix = _pad([batch_plan.seqs[s][i][batch_plan.shared[i]:] for i in idx
                   for s in range(sides)], device)  # [B * sides, S], example-major
    S = suffix.shape[1]
    read_at = readout.split(readout.positions(cfg.token, lengths, cfg.mean_keep_first), shared, S)
    prefix, start, past = None, None, None
    if shared.max() > 0:
        tokens = _pad([batch_plan.seqs[0][i][: batch_plan.shared[i]] for i in idx], device)
        deepest = model.params.n_layers if cfg.zero_shot else max(layers)
        need = sorted(set(layers if read_at[0].any() else []) | {deepest})
        prefix = model(tokens, layers=need, return_kv=True, steer=steer)
        start = torch.from_numpy(shared).to(device).repeat_interleave(sides)
        past = [(k.repeat_interleave(sides, 0), v.repeat_interleave(sides, 0))
                for k, v in prefix["kv"]]
    out = model(suffix, layers=layers, logits=cfg.zero_shot, start=start, past=past, steer=steer)
    res = {layer: readout.read(cfg.token, read_at, out[layer].view(B, sides, S, -1),
                               prefix[layer] if prefix is not None and layer in prefix else None)
           for layer in layers}
    logp = None
    if cfg.zero_shot:  # the logits at suffix position j score the token at j + 1
        scores = readout.answer_scores(lengths, batch_plan.answer[idx])
        at = torch.from_numpy(readout.split(scores, shared, S)[1][..., :-1]).to(device)
        lp = out["logits"].log_softmax(-1).view(B, sides, S, -1)[:, :, :-1]
        nxt = suffix.view(B, sides, S)[:, :, 1:, None]
        logp = torch.where(at, lp.gather(-1, nxt)[..., 0], 0.0).sum(-1).cpu()
        finite = torch.isfinite(out["logits"].view(B, sides, S, -1)[:, :, :-1]).all(-1)
        bad = (at & ~finite).any(-1).cpu()  # [B, sides]: an answer position's logits not finite
        logp = logp.masked_fill(bad, float("nan"))  # never a number from non-finite logits
        for b, s in bad.nonzero().tolist():
            _warn_nonfinite(int(idx[b]), s)
    return res, logp


def _warn_nonfinite(example: int, side: int) -> None:
    """One line (global rank 0) for an example whose answer positions had NaN or infinite
    logits: its zero-shot log-probability is stored as NaN, which ccs.py refuses (naming the row)
    unless --drop_nonfinite."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: example {example} (prompt-file row {example + 1}), side {side}: "
              "non-finite logits at its answer; zero-shot log-probability stored as NaN "
              "(ccs.py refuses it unless --drop_nonfinite)", file=sys.stderr, flush=True)
