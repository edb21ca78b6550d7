"""A steering sweep's outputs: steering.csv (one row per layer x multiplier, the baseline first as
layer "none"), items.csv (per item and setting), samples.jsonl, the printed summary and the plot.

steering.csv columns: layer, multiplier, n, p_positive (mean over items) with its bootstrap 95%
interval (p_positive_lo/hi, items resampled), answer_matches_positive (sampled items whose parsed
answer is the positive one), vector_norm (|vector as applied| at multiplier 1), residual_norm
(mean unsteered residual norm at the steered positions), push (|multiplier| x vector_norm /
residual_norm; ablation: x the mean |h . u| removed), p_a (A/B items: mean p(A) / (p(A) + p(B))),
p_positive_when_a / p_positive_when_b (mean p_positive over the items whose positive option is A,
resp. B), nll_delta (with capability texts: NLL per token steered - unsteered, nats).
items.csv: idx, layer, multiplier, positive (the letter, or the positive word), p_positive, p_a.

An item whose logits were not finite at a setting (steering/sweep.py: its scores are NaN there)
is left out of that setting's means, intervals and letter diagnostics; n counts the items kept
(0: the means are "nan"). items.csv keeps it, as "nan".
"""
import csv
import json
import os
import re
from typing import List, Optional

import numpy as np

LETTER = re.compile(r"\(([AB])\)")
LETTER_FLOOR = 0.02  # a p_a range under this is noise, not a letter effect

COLUMNS = ["layer", "multiplier", "n", "p_positive", "p_positive_lo", "p_positive_hi",
           "answer_matches_positive", "vector_norm", "residual_norm", "push", "p_a",
           "p_positive_when_a", "p_positive_when_b", "nll_delta"]


def bootstrap(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple:
    """95% percentile interval of the mean, items resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def finite_mean(values: np.ndarray, axis=None):
    """Mean over the finite entries (along axis); NaN where there are none, without a warning."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    count = ok.sum(axis)
    total = np.where(ok, values, 0.0).sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def parse_answer(completion: str):
    """The letter of the first "(A)"/"(B)" in "(" + completion, or None."""
    m = LETTER.search("(" + completion)
    return m.group(1) if m else None


def p_a_of(two: np.ndarray, letters: List[Optional[str]]) -> Optional[np.ndarray]:
    """[N, ...] p(A) from [N, ..., 2] (positive, negative) scores; None without letters."""
    if any(x is None for x in letters):
        return None
    is_a = np.array([x == "A" for x in letters]).reshape(-1, *[1] * (two.ndim - 2))
    return np.where(is_a, two[..., 0], two[..., 1])


def letter_verdict(layer, p_a: np.ndarray, p_positive: np.ndarray) -> Optional[str]:
    """The summary line when, across the multipliers of a layer, the mean p_a moves more than
    the mean p_positive (and by more than LETTER_FLOOR): the vector moves the letter."""
    keep = np.isfinite(p_a) & np.isfinite(p_positive)  # multipliers with any finite item
    if keep.sum() < 2:
        return None
    p_a, p_positive = p_a[keep], p_positive[keep]
    da, dp = float(np.ptp(p_a)), float(np.ptp(p_positive))
    if da <= dp or da <= LETTER_FLOOR:
        return None
    return (f"layer {layer}: the vector moves the letter, not the behaviour: p(A) "
            f"{p_a.min():.2f}..{p_a.max():.2f} across the multipliers, p(positive) "
            f"{p_positive.min():.2f}..{p_positive.max():.2f}")


class Result:
    """Everything a sweep measured, in arrays: base [N, 2], table {layer: [N, M, 2]} (p of the
    positive and the negative candidate, renormalised), letters [N] (None for word items),
    push {layer: [M]}, vector_norm / residual_norm {layer: float}, cost (base NLL,
    {layer: [M] nll_delta}) or None, samples [(idx, letter, {layer: [texts]})]."""

    def __init__(self, layers, mults, base, table, letters, push, vector_norm, residual_norm,
                 cost=None, samples=()):
        self.layers, self.mults = layers, list(mults)
        self.base, self.letters = np.asarray(base), letters
        self.table = {l: np.asarray(table[l]) for l in layers}
        self.push, self.vector_norm, self.residual_norm = push, vector_norm, residual_norm
        self.cost, self.samples = cost, list(samples)
        self.p_a = {l: p_a_of(self.table[l], letters) for l in layers}
        self.base_p_a = p_a_of(self.base, letters)

    def verdicts(self) -> List[str]:
        if self.base_p_a is None:
            return []
        found = (letter_verdict(l, finite_mean(self.p_a[l], 0),
                                finite_mean(self.table[l][..., 0], 0))
                 for l in self.layers)
        return [v for v in found if v]


def fmt(x, digits=6) -> str:
    return "" if x is None else f"{round(float(x), digits) + 0.0:.{digits}f}"  # no "-0.000000"


def write_outputs(output: str, res: Result, n_boot: int = 1000, seed: int = 0) -> None:
    """items.csv, samples.jsonl, then steering.csv (written last: it marks a complete run)."""
    os.makedirs(output, exist_ok=True)
    labels = [x if x is not None else "" for x in res.letters]
    with open(os.path.join(output, "items.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "layer", "multiplier", "positive", "p_positive", "p_a"])
        pa = res.base_p_a
        w.writerows([i, "none", 0.0, labels[i], fmt(p), "" if pa is None else fmt(pa[i])]
                    for i, p in enumerate(res.base[:, 0]))
        for l in res.layers:
            pa = res.p_a[l]
            for i in range(len(res.base)):
                w.writerows([i, l, m, labels[i], fmt(res.table[l][i, j, 0]),
                             "" if pa is None else fmt(pa[i, j])]
                            for j, m in enumerate(res.mults))
    matches = {}
    with open(os.path.join(output, "samples.jsonl"), "w", encoding="utf-8") as f:
        for i, letter, done in res.samples:
            for l, texts in done.items():
                scores = res.base[i][None] if l == "none" else res.table[l][i]
                for m, text, two in zip([0.0] if l == "none" else res.mults, texts, scores):
                    ans = parse_answer(text) if letter else None
                    if np.isfinite(two).all():  # else its logits were not finite: left out
                        matches.setdefault((l, m), []).append(ans == letter)
                    row = {"idx": i, "layer": l, "multiplier": m, "positive": letter,
                           "completion": ("(" if letter else "") + text, "answer": ans}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    is_a = np.array([x == "A" for x in res.letters])

    def row(layer, j, m, two, p_a, push, vnorm, rnorm, cost):
        ok = np.isfinite(two).all(-1)  # non-finite logits: left out (sweep.warn_nonfinite)
        values = two[ok, 0]
        lo, hi = bootstrap(values, n_boot, seed) if ok.any() else (np.nan, np.nan)
        hits = matches.get((layer, m))
        split = [fmt(finite_mean(two[sel & ok, 0])) if p_a is not None and sel.any() else ""
                 for sel in (is_a, ~is_a)]
        return [layer, m, int(ok.sum()), fmt(finite_mean(values)), fmt(lo), fmt(hi),
                "" if hits is None else f"{np.mean(hits):.3f}", fmt(vnorm), fmt(rnorm),
                fmt(push), "" if p_a is None else fmt(finite_mean(p_a[ok])), *split,
                fmt(cost)]

    tmp = os.path.join(output, "steering.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerow(row("none", 0, 0.0, res.base, res.base_p_a, 0.0, None, None,
                       0.0 if res.cost else None))
        for l in res.layers:
            for j, m in enumerate(res.mults):
                pa = None if res.p_a[l] is None else res.p_a[l][:, j]
                w.writerow(row(l, j, m, res.table[l][:, j], pa, res.push[l][j],
                               res.vector_norm[l], res.residual_norm[l],
                               res.cost[1][l][j] if res.cost else None))
    os.replace(tmp, os.path.join(output, "steering.csv"))


def summary(res: Result) -> List[str]:
    """Printed lines: per layer x multiplier the push, p_positive, p_a and nll_delta; then the
    letter verdicts."""
    lines = [f"unsteered: p_positive {finite_mean(res.base[:, 0]):.3f}"
             + ("" if res.base_p_a is None else f"  p_a {finite_mean(res.base_p_a):.3f}")
             + ("" if res.cost is None else f"  NLL/token {res.cost[0]:.3f}")]
    lines.append(f"{'layer':>5} {'mult':>6} {'push':>6} {'p_pos':>6} {'p_a':>6} {'nll_d':>7}")
    for l in res.layers:
        for j, m in enumerate(res.mults):
            pa = "" if res.p_a[l] is None else f"{finite_mean(res.p_a[l][:, j]):.3f}"
            cost = ("" if res.cost is None  # + 0.0: no "-0.000"
                    else f"{round(float(res.cost[1][l][j]), 3) + 0.0:+.3f}")
            lines.append(f"{l:5d} {m:6g} {res.push[l][j]:6.3f} "
                         f"{finite_mean(res.table[l][:, j, 0]):6.3f} {pa:>6} {cost:>7}")
    return lines + res.verdicts()


def plot(output: str, res: Result, title: str = "") -> None:
    """steering.png: p_positive (solid) and p_a (dotted, A/B items) against the signed push;
    with capability texts, a second panel: nll_delta against the signed push."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if res.cost else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    sign = np.sign(res.mults)
    for l in res.layers:
        x = sign * np.asarray(res.push[l])
        order = np.argsort(x)
        line, = ax.plot(x[order], finite_mean(res.table[l][:, :, 0], 0)[order], marker="o",
                        label=f"layer {l}")
        if res.p_a[l] is not None:
            ax.plot(x[order], finite_mean(res.p_a[l], 0)[order], ls=":",
                    color=line.get_color())
    base = float(finite_mean(res.base[:, 0]))
    if np.isfinite(base):
        ax.axhline(base, color="black", linestyle="--", label="unsteered")
    ax.set(xlabel="push (signed fraction of the residual norm)", ylabel="p(positive)",
           ylim=(0, 1), title="behaviour" + (" (dotted: p(A))" if res.base_p_a is not None
                                             else ""))
    ax.legend(fontsize=8)
    if res.cost:
        ax = axes[0, 1]
        for l in res.layers:
            x = sign * np.asarray(res.push[l])
            order = np.argsort(x)
            ax.plot(x[order], np.asarray(res.cost[1][l])[order], marker="o", label=f"layer {l}")
        ax.axhline(0, color="black", linestyle="--")
        ax.set(xlabel="push (signed fraction of the residual norm)",
               ylabel="NLL/token steered - unsteered (nats)",
               title="capability cost on neutral text")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "steering.png"), dpi=120)
    plt.close(fig)
