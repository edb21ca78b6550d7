"""Outputs of a probe run: eval.csv (every layer), summary.csv (each method at its layer chosen
on validation rows), split.csv, the printed table, saved probes (standardised and raw space),
plots."""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import torch

from activations.cache import ActivationCache

from .data import Part
from .methods import METHODS, base, input_name, orientation
from .metrics import evaluate, resamples
from .train import Fitted, single_threaded

INTERVALS = [k + s for k in ("accuracy", "balanced_accuracy", "auroc") for s in ("", "_lo", "_hi")]
COLUMNS = ["layer", "method", "split", "n", *INTERVALS, "calibrated_accuracy", "val_n",
           "val_accuracy", "val_auroc", "chosen", "train_loss", "orientation"]
SUMMARY = ["method", "layer", "split", "n", "val_accuracy", *INTERVALS, "calibrated_accuracy",
           "orientation"]
NO_LAYER = "-"  # summary.csv's layer of a method without layers (zero_shot, majority), everywhere
AUROC_NOTE = "AUROC oriented like accuracy (an unsigned method's max(acc, 1-acc) row flips both)"


def evaluate_all(scores: Dict[str, torch.Tensor], y, pos_rate, boot, seed, workers) -> dict:
    """{row: evaluate(...)} for eval.csv rows (`m`, `m_signed`) of scores {method: [L, n]}."""
    counts = resamples(len(y), boot, seed)
    rows = [(r, m) for m in scores for r in ([m, m + "_signed"] if METHODS[m].unsigned else [m])]

    def one(rm):
        r, m = rm
        return evaluate(scores[m], METHODS[m].threshold, y, pos_rate, counts,
                        unsigned=METHODS[m].unsigned and r == m)

    with single_threaded(), ThreadPoolExecutor(workers) as pool:
        return dict(zip([r for r, _ in rows], pool.map(one, rows)))


def tables(fitted: List[Fitted], parts: List[Part], y: np.ndarray, layers: List[int], split: str,
           boot: int, seed: int, workers: int):
    """(eval rows, summary rows, {row: selected test scores [n], oriented like the row's
    metrics}, their labels [n]): every layer's
    test metrics (test rows of every part together) and validation metrics (mean over parts);
    each part's layer chosen on its validation rows, its test scores at that layer."""
    pos_rate = float(y[parts[0].fit].mean())
    yt = np.concatenate([y[p.test] for p in parts])
    methods = list(fitted[0].test)
    test = {m: torch.cat([f.test[m] for f in fitted], 1) for m in methods}
    ev = evaluate_all(test, yt, pos_rate, boot, seed, workers)
    vals = [evaluate_all(f.val, y[p.val], pos_rate, 0, seed, workers)
            for f, p in zip(fitted, parts)]
    rows, summary, selected = [], [], {}
    for r, e in ev.items():
        m = base(r).name
        chosen = [int(np.argmax(v[r]["accuracy"])) for v in vals]
        loss = [f.params[m].get("train_loss") for f in fitted]
        loss = torch.stack(loss).mean(0) if loss[0] is not None else None
        for i, layer in enumerate(layers):
            row = dict(layer=layer, method=r, split=split, n=len(yt))
            row.update({k: float(e[k][i]) for k in INTERVALS + ["calibrated_accuracy"] if k in e})
            row.update(val_n=sum(len(p.val) for p in parts),
                       val_accuracy=float(np.mean([v[r]["accuracy"][i] for v in vals])),
                       val_auroc=float(np.mean([v[r]["auroc"][i] for v in vals])),
                       chosen=chosen.count(i) if METHODS[m].layered else 0,
                       train_loss=float(loss[i]) if loss is not None else float("nan"),
                       orientation=orientation(r))
            rows.append(row)
        sel = torch.cat([f.test[m][c] for f, c in zip(fitted, chosen)])
        thr = METHODS[m].threshold
        one = evaluate(sel[None], thr, yt, pos_rate, resamples(len(yt), boot, seed),
                       unsigned=METHODS[m].unsigned and r == m)
        selected[r] = 2 * thr - sel if one["flipped"][0] else sel  # oriented like its metrics
        picked = sorted({layers[c] for c in chosen})
        layer = ",".join(map(str, picked)) if METHODS[m].layered else NO_LAYER
        summary.append(dict(method=r, layer=layer, split=split, n=len(yt),
                            val_accuracy=float(np.mean([v[r]["accuracy"][c]
                                                        for v, c in zip(vals, chosen)])),
                            **{k: float(one[k][0]) for k in INTERVALS + ["calibrated_accuracy"]
                               if k in one},
                            orientation=orientation(r)))
    return rows, summary, selected, yt


def frame(rows, columns) -> pd.DataFrame:
    return pd.DataFrame(rows).reindex(columns=columns)


def print_table(df: pd.DataFrame, summary: pd.DataFrame, positive: str) -> None:
    methods = list(dict.fromkeys(df["method"]))
    acc = df.pivot(index="layer", columns="method", values="accuracy")
    chosen = df.pivot(index="layer", columns="method", values="chosen")
    w = {m: max(7, len(m) + 1) for m in methods}
    print(f"test accuracy by layer (* = the layer chosen on validation rows); positive class: "
          f"{positive}")
    unsigned = [m for m in methods if METHODS.get(m) and METHODS[m].unsigned]
    if unsigned:
        print(f"{', '.join(unsigned)}: unsigned, max(acc, 1-acc) (AUROC oriented the same way); "
              "*_signed: sign fixed on training labels")
    flat = [m for m in methods if not base(m).layered]
    if flat:
        print(f"{', '.join(flat)}: no layer (the same at every layer, never starred)")
    print("layer" + "".join(f"{m:>{w[m]}}" for m in methods))
    for layer, r in acc.iterrows():
        star = {m: "*" if chosen.loc[layer, m] else " " for m in methods}
        print(f"{layer:5d}" + "".join(f"{r[m]:>{w[m] - 1}.3f}{star[m]}" for m in methods))
    print(f"{'method':<16}{'layer':>8}  {'val acc':>7}  {'test accuracy [95% CI]':<24}"
          f"{'test AUROC [95% CI]':<24}")
    for _, r in summary.iterrows():
        def ci(k):
            return f"{r[k]:.3f} [{r.get(k + '_lo', np.nan):.3f}, {r.get(k + '_hi', np.nan):.3f}]"

        layer = str(r.layer)  # NO_LAYER for a method that is the same at every layer
        print(f"{r.method:<16}{layer:>8}  {r.val_accuracy:>7.3f}  {ci('accuracy'):<24}"
              f"{ci('auroc'):<24}")


def write_split(path: str, cache: ActivationCache, names: np.ndarray) -> None:
    pd.DataFrame({"idx": [str(i) for i in cache.ids], "split": names}).to_csv(path, index=False)


# ---------------------------------------------------------------- saved probes


def chosen_layers(df: pd.DataFrame) -> Dict[str, int]:
    """{method: the layer chosen on validation rows} from eval.csv's rows (with folds: the layer
    most folds chose); an unsigned method's from its _signed row, the orientation its saved probe
    carries; methods without layers (zero_shot, majority) left out."""
    out = {}
    for name, m in METHODS.items():
        rows = df[df.method == (name + "_signed" if m.unsigned else name)]
        if m.layered and len(rows) and rows.chosen.max() > 0:
            out[name] = int(rows.layer.iloc[int(np.argmax(rows.chosen.to_numpy()))])
    return out


def trained_text(cache: ActivationCache) -> str:
    """What a probe on this cache was trained on, for a reader of its scores: the prompt file,
    which states, and the first prompt as written (chat template and all)."""
    data = cache.meta.get("data", {})
    path = data.get("path", "") if isinstance(data, dict) else str(data or "")
    kind = "contrast pairs (plus and minus prompts)" if cache.is_contrast else "single prompts"
    where = {"last": "each prompt's last token", "mean": "the mean over each prompt's tokens",
             "all": "every token"}.get(cache.token, f"token {cache.token}")
    text = f"{short_name(path)}, {kind}, the state at {where}"
    try:
        first = pd.read_csv(path, nrows=1, keep_default_na=False)
        column = "plus_prompt" if "plus_prompt" in first else "prompt"
        example = str(first[column].iloc[0])
    except (OSError, ValueError, KeyError, IndexError):
        return text
    cut = example if len(example) <= 240 else "..." + example[-237:]
    return f"{text}; its first prompt: {cut!r}"


def save_probes(folder: str, fitted: Fitted, layers: List[int], cache: ActivationCache,
                info: dict, chosen: Optional[Dict[str, int]] = None) -> None:
    """RUN/probes/METHOD.safetensors (+ METHOD.json describing every tensor). Each records the
    layer chosen on validation rows (`chosen`: {method: layer}; METHOD.json "chosen_layer" and
    the safetensors metadata) and, per layer, the decision threshold of one state's read-out
    (tensor read_threshold [L], llama.vectors.read_out: 0 for a single-prompt probe's own score,
    the midpoint of the training classes' mean scores on a contrast probe's direction)."""
    from safetensors.torch import save_file

    from llama.vectors import read_out

    os.makedirs(folder, exist_ok=True)
    chosen = chosen or {}
    text = trained_text(cache)
    for name, p in fitted.params.items():
        m = METHODS[name]
        tensors = {k: v.contiguous() for k, v in p.items()}
        tensors.update(mean=fitted.mean.contiguous(), std=fitted.std.contiguous(),
                       layers=torch.tensor(layers))
        has_raw = m.raw_space is not None and "w" in p
        if has_raw:
            tensors.update(m.raw_space(m, p, fitted.mean, fitted.std, cache.is_contrast))
            numpy = {k: v.numpy() for k, v in tensors.items()}
            tensors["read_threshold"] = torch.from_numpy(read_out(numpy, m.threshold)[2])
        layer = chosen.get(name)
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"),
                  metadata={"method": name, "chosen_layer": "" if layer is None else str(layer)})
        meta = dict(
            info, method=name, input=input_name(m, cache.is_contrast), layers=layers,
            chosen_layer=layer, text=text,
            sides=cache.sides, hidden_dim=cache.hidden_dim, fingerprint=cache.fingerprint,
            cache=os.path.abspath(cache.path),
            normalisation="z = (x - mean[layer, side]) / std[layer, side], statistics of the "
            "training rows only", raw_score=m.formula, threshold=m.threshold,
            orientation="score = threshold + sign * (raw - threshold); label 1 when score > "
            "threshold; " + ("sign fixed on training labels (eval.csv row '" + name
                             + "' reports max(acc, 1-acc) instead)" if m.unsigned else
                             "fixed" if m.fixed else "supervised"))
        if has_raw:
            meta["raw_space"] = (
                "x: raw activations [layer, side, d], no standardisation. " + m.raw_doc
                + "; direction [layer, d]: the residual-stream direction that raises the oriented "
                "score, (g_plus - g_minus) / 2 for contrast pairs (g: the score's gradient on a "
                "side), g for single prompts")
            meta["conventions"] = conventions(tensors["direction"], layers, cache, info)
            meta["read_out"] = (
                "one hidden state h [d] at layer L (the server's probe read-out, the report's "
                "heat-map): score = h . w_raw[L, 0] + b_raw[L] for a single-prompt probe, "
                "h . direction[L] for a contrast probe; the probe's positive class when score > "
                "read_threshold[L] (0 for a single-prompt probe's own score; for a contrast "
                "probe the midpoint of the training classes' mean scores, direction . (mean_plus "
                "+ mean_minus) / 2); margin = score - read_threshold")
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(meta, f, indent=1)


def conventions(direction: torch.Tensor, layers: List[int], cache: ActivationCache,
                info: dict) -> Dict[str, dict]:
    """{layer: what a steering user needs to know of the probe's raw-space direction there}
    (llama.vectors.describe_vector: operation, layer convention, read position, norm, source
    data, fingerprint, which class the plus side stands for), as every vectors folder states it.
    direction: [layer, d]. residual_norm is left empty: probes read the states, not their norms
    (steer.py --scale residual measures it on its own prompts)."""
    from llama.vectors import describe_vector

    keep = cache.mean_keep_first if cache.token == "mean" else None
    source = str(cache.meta.get("data", {}).get("path", ""))
    return {str(layer): describe_vector(
        layer, float(direction[i].double().norm()), None, cache.token, keep, source,
        cache.fingerprint or "", str(info.get("positive_class", "")),
        vector="the probe's raw-space direction (the oriented score's gradient)")
        for i, layer in enumerate(layers)}


# ---------------------------------------------------------------- plots


def colours(rows: List[str]) -> Dict[str, dict]:
    """One colour per method in every plot (fixed by the registry's order, so it never depends on
    which methods ran), its _signed twin dotted; gray and black dashed for the baselines."""
    import matplotlib.pyplot as plt

    palette = [c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] if c != "#7f7f7f"]
    order = [name for name, m in METHODS.items() if m.colour is None]
    out = {}
    for r in rows:
        m = base(r)
        colour = m.colour or palette[order.index(m.name) % len(palette)]
        out[r] = dict(color=colour, ls="--" if m.baseline else ":" if r.endswith("_signed")
                      else "-")
    return out


def gaps(layers, *cols):
    """Arrays with NaN inserted between layers that are not neighbours: a line never crosses a
    layer that was not measured."""
    layers = np.asarray(layers, dtype=float)
    cut = np.flatnonzero(np.diff(layers) > 1) + 1
    return [np.insert(np.asarray(c, dtype=float), cut, np.nan) for c in (layers, *cols)]


def title(cache: ActivationCache, split: str) -> str:
    meta = cache.meta
    model = meta.get("model", {}).get("path") or meta.get("model", {}).get("name") or "model ?"
    data = meta.get("data", {})
    data = data.get("path") if isinstance(data, dict) else data
    return f"model {short_name(model)}, data {short_name(data)}, {split} split"


def short_name(path) -> str:
    """A file's name, with its folder's when the name alone says little ('boolq/prompts.csv')."""
    if not path:
        return "?"
    parts = os.path.normpath(str(path)).split(os.sep)
    generic = parts[-1] in ("prompts.csv", "data.csv", "train.csv", "test.csv", "tokenizer.model")
    return "/".join(parts[-2:]) if generic and len(parts) > 1 else parts[-1]


def plot(run: str, *args) -> list:
    """Write figures(*args) as RUN/NAME.png -> their paths."""
    import matplotlib.pyplot as plt

    paths = []
    for name, fig in figures(*args).items():
        paths.append(os.path.join(run, f"{name}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def figures(df: pd.DataFrame, summary: pd.DataFrame, selected, y, cache: ActivationCache,
            positive: str) -> dict:
    """{name: figure}: layers (test accuracy and AUROC by layer, 95% bands, the chosen layer
    starred with its interval), roc and hist (each method's test scores at its chosen layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from sklearn.metrics import roc_curve

    split = df.split.iloc[0]
    head = title(cache, split)
    rows = list(dict.fromkeys(df["method"]))
    style = colours(rows)
    best = summary.set_index("method")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key in zip(axes, ("accuracy", "auroc")):
        for r in rows:
            g = df[df.method == r].sort_values("layer")
            xs, ys, lo, hi = gaps(g.layer, g[key], g.get(key + "_lo", g[key]),
                                  g.get(key + "_hi", g[key]))
            ax.plot(xs, ys, marker=".", label=r, gid=r, **style[r])
            ax.fill_between(xs, lo, hi, color=style[r]["color"], alpha=0.12, lw=0)
            at = g[g.chosen > 0]
            ax.errorbar(at.layer, at[key], yerr=[at[key] - at.get(key + "_lo", at[key]),
                                                 at.get(key + "_hi", at[key]) - at[key]],
                        fmt="*", ms=11, color=style[r]["color"], capsize=3)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"test {key}" + (" (oriented like accuracy)" if key == "auroc" else ""))
        ax.axhline(0.5, color="lightgray", lw=0.8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{head}; * = layer chosen on validation rows, bands: 95% bootstrap\n"
                 f"positive class: {positive}; {AUROC_NOTE}", fontsize=9)
    fig.tight_layout()
    out = {"layers": fig}

    fig, ax = plt.subplots(figsize=(6, 5.5))
    for r, s in selected.items():
        fpr, tpr, _ = roc_curve(y, s.numpy())
        ax.plot(fpr, tpr, label=f"{r} (layer {best.loc[r, 'layer']})", gid=r, **style[r])
    ax.plot([0, 1], [0, 1], color="lightgray")
    ax.set(xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"ROC at each method's chosen layer\n{head}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["roc"] = fig

    cols = 4
    nrow = (len(selected) + cols - 1) // cols
    fig, axes = plt.subplots(nrow, cols, figsize=(3.3 * cols, 2.8 * nrow), squeeze=False)
    for ax, (r, s) in zip(axes.flat, selected.items()):
        for cls, shade in ((0, "lightgray"), (1, style[r]["color"])):
            ax.hist(s.numpy()[y == cls], bins=30, alpha=0.7, color=shade, label=f"label {cls}")
        ax.axvline(METHODS[base(r).name].threshold, color="black", lw=0.7)
        ax.set_title(f"{r}, layer {best.loc[r, 'layer']}", fontsize=9)
        ax.set_xlabel("oriented score (above the line: label 1)", fontsize=8)
        ax.set_ylabel("test rows", fontsize=8)
    for ax in list(axes.flat)[len(selected):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"test scores by class at each method's chosen layer; {head}", fontsize=9)
    fig.tight_layout()
    out["hist"] = fig
    return out
