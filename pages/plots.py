"""The report's figures, drawn with matplotlib from a run's tables and returned as SVG text
(inline in the page: no image files, no network). Every value drawn is a cell of the run's CSVs;
only the cached workflow's AUROC is computed here, from probe_stats_layer{L}.csv's mean_score and
type, exactly as analyze_probe_from_cache.py prints it (sklearn's roc_auc_score)."""
import io
import itertools
import re
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

_salt = itertools.count()


def svg(fig) -> str:
    """A figure as an <svg> element (ids salted per figure: several SVGs share one page without
    clashing clip paths), the figure closed."""
    import matplotlib.pyplot as plt

    with plt.rc_context({"svg.hashsalt": f"fig{next(_salt)}", "svg.fonttype": "none"}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # creator, date: not data
    return text[text.index("<svg"):]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style(methods: List[str]) -> Dict[str, dict]:
    """One colour per method, as the run's own PNGs use (probes.report.colours); unknown method
    names get the next colours of the cycle."""
    plt = _plt()  # the Agg backend before probes.report imports pyplot
    from probes.methods import METHODS
    from probes.report import colours

    known = [m for m in methods if m.removesuffix("_signed") in METHODS]
    out = colours(known) if known else {}
    cycle = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for m in methods:
        out.setdefault(m, dict(color=next(cycle), ls="-"))
    return out


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _gaps(layers, *cols):
    """NaN where the layers jump by more than their usual step (10, 14, 18, 30: a break before
    30): a line never crosses a stretch of layers that was skipped."""
    layers = np.asarray(layers, dtype=float)
    step = np.diff(layers)
    cut = np.flatnonzero(step > step.min()) + 1 if len(step) else np.array([], dtype=int)
    return [np.insert(np.asarray(c, dtype=float), cut, np.nan) for c in (layers, *cols)]


def banded(method: str) -> bool:
    """Whether a method's 95% band is drawn: not for the baselines, the methods without layers
    nor the _signed twins (ten overlapping bands merge into one grey block)."""
    from probes.methods import METHODS

    m = METHODS.get(method.removesuffix("_signed"))
    return m is None or not (m.baseline or not m.layered or method.endswith("_signed"))


def probe_layers(ev: pd.DataFrame, title: str) -> str:
    """Test accuracy and AUROC by layer for every method of eval.csv, 95% bands (*_lo, *_hi) of
    the methods that are neither baselines nor _signed twins (`banded`), the validation-chosen
    layer starred (column `chosen` > 0)."""
    plt = _plt()
    methods = list(dict.fromkeys(ev["method"]))
    look = style(methods)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key in zip(axes, ("accuracy", "auroc")):
        for m in methods:
            g = ev[ev.method == m].sort_values("layer")
            lo = g[key + "_lo"] if key + "_lo" in g else g[key]
            hi = g[key + "_hi"] if key + "_hi" in g else g[key]
            xs, ys, ls, hs = _gaps(g.layer, g[key], lo, hi)
            ax.plot(xs, ys, marker=".", label=m, **look[m])
            if banded(m):
                ax.fill_between(xs, ls, hs, color=look[m]["color"], alpha=0.10, lw=0)
            at = g[g.chosen > 0]
            ax.plot(at.layer, at[key], "*", ms=12, color=look[m]["color"])
        ax.axhline(0.5, color="lightgray", lw=0.8)
        ax.set(xlabel="layer", ylabel=f"test {key}")
        _integer_x(ax)
    axes[1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title + "\n* = layer chosen on validation rows; bands: 95% bootstrap interval "
                 "(not drawn for the baselines and _signed rows)", fontsize=10)
    fig.tight_layout()
    return svg(fig)


def transfer_matrix(tr: pd.DataFrame, key: str = "auroc") -> str:
    """Methods x test sets: `key` at each method's chosen layer (transfer.csv rows with chosen >
    0), annotated; the first column is the training cache's own test split."""
    plt = _plt()
    at = tr[tr.chosen > 0]
    methods = list(dict.fromkeys(at["method"]))
    tests = list(dict.fromkeys(tr["test"]))
    grid = np.full((len(methods), len(tests)), np.nan)
    for _, r in at.iterrows():
        grid[methods.index(r.method), tests.index(r.test)] = r[key]
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(tests), 1.0 + 0.38 * len(methods)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdBu_r", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(v - 0.5) > 0.3 else "black")
    names = [short(t) + (" (own test split)" if j == 0 else "") for j, t in enumerate(tests)]
    ax.set_xticks(range(len(tests)), names, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    fig.colorbar(im, ax=ax, label=f"test {key} at the chosen layer")
    fig.tight_layout()
    return svg(fig)


def short(path) -> str:
    parts = str(path).rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]


def auroc(types: pd.Series, score: pd.Series, positive: str) -> float:
    """roc_auc_score((types == positive), score), NaN when one class is missing: the number
    analyze_probe_from_cache.py prints."""
    from sklearn.metrics import roc_auc_score

    y = (types.astype(str) == positive).astype(int).to_numpy()
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def cached_table(stats: pd.DataFrame) -> pd.DataFrame:
    """layer, n, auroc with 'testing' positive and with 'deployment' positive, per layer."""
    rows = []
    for layer, g in stats.groupby("layer"):
        rows.append(dict(layer=int(layer), n=len(g),
                         auroc_testing=auroc(g["type"], g.mean_score, "testing"),
                         auroc_deployment=auroc(g["type"], g.mean_score, "deployment")))
    return pd.DataFrame(rows)


def cached_auroc(table: pd.DataFrame) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(table.layer, table.auroc_testing, marker=".", label="positive class: testing")
    ax.plot(table.layer, table.auroc_deployment, marker=".", ls="--",
            label="positive class: deployment")
    ax.axhline(0.5, color="lightgray")
    ax.set(xlabel="layer", ylabel="AUROC of mean_score", ylim=(-0.02, 1.02))
    _integer_x(ax)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return svg(fig)


def score_hist(stats: pd.DataFrame, layer: int) -> str:
    """mean_score by type at one layer (probe_stats_layer{layer}.csv)."""
    plt = _plt()
    g = stats[stats.layer == layer]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bins = np.histogram_bin_edges(g.mean_score.to_numpy(dtype=float), bins=30)
    for t, part in g.groupby("type"):
        ax.hist(part.mean_score, bins=bins, alpha=0.6, label=f"{t} ({len(part)})")
    ax.set(xlabel=f"mean_score at layer {layer}", ylabel="prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return svg(fig)


def steering_metrics(st: pd.DataFrame) -> List[str]:
    """The numeric columns of steering.csv worth a panel: all but the grid and the intervals."""
    skip = {"layer", "multiplier", "n", "push"}
    out = []
    for c in st.columns:
        if c in skip or c.endswith(("_lo", "_hi")):
            continue
        if pd.to_numeric(st[c], errors="coerce").notna().any():
            out.append(c)
    return out


def steering(st: pd.DataFrame, metric: str, x: Optional[str] = None) -> str:
    """`metric` against the push (if steering.csv has it) or the multiplier, one line per layer,
    95% band from METRIC_lo/_hi when present, the unsteered row (layer "none") dashed."""
    plt = _plt()
    x = x or ("push" if "push" in st.columns else "multiplier")
    layer = st.layer.astype(str)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name in dict.fromkeys(layer[layer != "none"]):
        g = st[layer == name].sort_values(x)
        xs = pd.to_numeric(g[x], errors="coerce")
        ys = pd.to_numeric(g[metric], errors="coerce")
        line, = ax.plot(xs, ys, marker="o", ms=3, label=f"layer {name}")
        if metric + "_lo" in g and metric + "_hi" in g:
            ax.fill_between(xs, pd.to_numeric(g[metric + "_lo"], errors="coerce"),
                            pd.to_numeric(g[metric + "_hi"], errors="coerce"),
                            color=line.get_color(), alpha=0.15, lw=0)
    base = pd.to_numeric(st.loc[layer == "none", metric], errors="coerce").dropna()
    if len(base):
        ax.axhline(float(base.iloc[0]), color="black", ls="--", lw=1, label="unsteered")
    ax.set(xlabel=x, ylabel=metric)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return svg(fig)
