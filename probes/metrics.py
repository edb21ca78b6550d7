"""Metrics of oriented scores: accuracy, balanced accuracy, AUROC, calibrated accuracy, bootstrap
95% intervals. Label 1 is the positive class; a score above the threshold predicts it."""
from typing import Optional

import numpy as np
import torch

METRICS = ("accuracy", "balanced_accuracy", "auroc")


def metrics(s, thr: float, y, w):
    """Accuracy, balanced accuracy and AUROC (label 1 positive; a tie counts half) of scores
    s [L, n] under row weights w [B, n] (ones: the plain metric; bootstrap counts: one resample a
    row) -> three [B, L] tensors. float32 sums: exact for integer weights up to ~5,000 rows."""
    s = torch.as_tensor(s, dtype=torch.float32)
    wt = torch.as_tensor(w, dtype=torch.float32).T.contiguous()  # [n, B]: rows are cheap to gather
    pos = torch.as_tensor(y) == 1
    neg = ~pos
    correct = ((s > thr) == pos).float()  # [L, n]
    acc = (correct @ wt / wt.sum(0)).T
    npos, nneg = pos.float() @ wt, neg.float() @ wt  # [B]
    bacc = ((correct * pos) @ wt / npos + (correct * neg) @ wt / nneg).T / 2
    auc = torch.empty_like(acc)
    wn, wp = wt[neg], wt[pos]
    for l in range(s.shape[0]):
        # a positive beats the negatives scored below it and half of those tied with it: its weight
        # goes in the bins at both ends of its tie among the sorted negatives
        sn, o = torch.sort(s[l, neg])
        below = torch.cumsum(wn.index_select(0, o), 0)  # [negatives, B]
        lo, hi = torch.searchsorted(sn, s[l, pos]), torch.searchsorted(sn, s[l, pos], right=True)
        bins = torch.zeros(len(sn) + 1, wt.shape[1]).index_add_(0, lo, wp).index_add_(0, hi, wp)
        auc[:, l] = (below * bins[1:]).sum(0) / (2 * npos * nneg)
    return acc, bacc, auc


def resamples(n: int, boot: int, seed: int) -> Optional[np.ndarray]:
    """Bootstrap counts [boot, n] (how often each row is drawn), shared by every method and layer
    (Efron & Tibshirani 1993, percentile intervals)."""
    if not boot:
        return None
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=boot)


def evaluate(scores, thr: float, y, pos_rate: float, counts=None, unsigned: bool = False):
    """{name: [L] array} of point metrics and bootstrap 95% intervals (percentile) for scores
    [L, n], and `flipped` [L]. unsigned: the sign of the scores is unidentified, so each layer
    reports max(acc, 1 - acc): where acc < 0.5 every metric is that of the opposite orientation
    (1 - accuracy, 1 - balanced accuracy, 1 - AUROC, intervals mirrored), taken on the metric, not
    by reflecting scores (scores tied at the threshold are wrong either way). calibrated_accuracy:
    the threshold put where the share of rows above it equals pos_rate (training's positive rate),
    so no held-out label is used."""
    n = len(y)
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if len(scores) > 1 and bool((scores == scores[:1]).all()):  # the same on every layer: once
        one = evaluate(scores[:1], thr, y, pos_rate, counts, unsigned)
        return {k: np.repeat(v, len(scores)) for k, v in one.items()}
    point = metrics(scores, thr, y, torch.ones(1, n))
    out = {k: v[0].double() for k, v in zip(METRICS, point)}
    if counts is not None:
        q = torch.tensor([0.025, 0.975], dtype=torch.float64)
        for k, v in zip(METRICS, metrics(scores, thr, y, counts)):
            lo, hi = torch.quantile(v.double(), q, dim=0)
            out[k + "_lo"], out[k + "_hi"] = lo, hi
    flip = out["accuracy"] < 0.5 if unsigned else torch.zeros(len(scores), dtype=torch.bool)
    for k in METRICS:
        out[k] = torch.where(flip, 1 - out[k], out[k])
        if counts is not None:
            lo, hi = out[k + "_lo"], out[k + "_hi"]
            out[k + "_lo"] = torch.where(flip, 1 - hi, lo)
            out[k + "_hi"] = torch.where(flip, 1 - lo, hi)
    oriented = torch.where(flip[:, None], 2 * thr - scores, scores).double()
    cut = torch.quantile(oriented, 1 - pos_rate, dim=1)
    yt = torch.as_tensor(y) == 1
    out["calibrated_accuracy"] = ((oriented > cut[:, None]) == yt[None]).double().mean(1)
    out["flipped"] = flip
    return {k: np.asarray(v) for k, v in out.items()}

