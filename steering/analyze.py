"""Project cached activations onto probe vectors; per-question score statistics per layer.

    python scripts/analyze_probe_from_cache.py --cache DIR --vectors RUN/normalized_vectors \
        --data FILE --output DIR [--visualize]

Writes DIR/probe_stats_layer{L}.csv with columns question_id, question, type, max_score, min_score,
mean_score, std_score: the projections of every token of a question (token "all" caches; its
first token left out by activations.cache.mean_start's rule unless --mean_keep_first) or of its one
cached vector (then max = min = mean and std = 0). --data is the {question, type} JSON (or JSON
lines) the cache was built from; its rows are matched to the cache's ids (a row's "idx" or "id",
else its position). It prints a per-layer AUROC table of mean_score with BOTH directions:
positive class "deployment" (what
`roc_auc_score((df['type']=='deployment').astype(int), df['mean_score'])` computes) and "testing".
Which one the vector was built to give is read from its metadata (`plus_class`, written by
generate_vectors_from_cache.py from the data's own keys: "testing" for validation sets, the A/B
sets' "positive"/"test" option, i.e. the testing answer): that orientation is printed first and
marked "*". A vector built as mean(testing) - mean(deployment) works when the "testing" column is
high, i.e. when the users' snippet gives LOW values.
With --visualize: auroc_by_layer.png (titled with the model, data and n; bootstrap 95% intervals,
questions resampled) and scores_by_type.png (mean_score histograms per type and layer).
"""
import glob
import json
import os
import sys

import numpy as np


from probes.data import cache_layers, refuse_nonfinite
from activations.cache import ActivationCache, mean_start
from llama.cli import command
from llama.errors import LlamaError
from llama.vectors import read_vectors_folder
from pages.build import write_run_report


def no_vectors(folder: str) -> LlamaError:
    """The error for a missing vectors folder, naming the timestamped runs that exist
    (generate_vectors_from_cache.py --output NAME writes NAME_TIMESTAMP/)."""
    head, tail = os.path.split(os.path.normpath(folder))
    runs = sorted(glob.glob(glob.escape(head) + "_*" + os.sep + glob.escape(tail))) if head else []
    hint = f"; did you mean {' or '.join(runs[-3:])}?" if runs else ""
    return LlamaError(f"no vectors folder {folder}{hint}")


# what a vectors' plus_class means as a validation type ("positive": the evaluation-awareness A/B
# sets' positive option is the testing answer; "label 1": label 1 is type testing)
INTENDED = {"testing": "testing", "test": "testing", "positive": "testing", "label 1": "testing",
            "deployment": "deployment", "deploy": "deployment"}


def intended_class(folder: str) -> tuple:
    """(the type the vectors' plus side stands for or None, the metadata's sentence)."""
    metas = [m for _, m in read_vectors_folder(folder).values()]
    classes = {m.get("plus_class", "") for m in metas}
    if len(classes) != 1 or not classes.pop():
        return None, ""
    plus = metas[0]["plus_class"]
    return INTENDED.get(plus), metas[0].get("plus_side", plus)


def read_vectors(folder: str, cache: ActivationCache) -> dict:
    """{layer: unit-or-not vector [d]} from layer_{L}.safetensors files, checked against the
    cache."""
    if not os.path.isdir(folder):
        raise no_vectors(folder)
    out = {}
    for layer, (v, meta) in sorted(read_vectors_folder(folder).items()):
        path = os.path.join(folder, f"layer_{layer}.safetensors")
        v = v.astype(np.float32)
        if v.shape != (cache.hidden_dim,):
            raise LlamaError(f"{path}: vector of shape {list(v.shape)}, but cache {cache.path} "
                             f"has hidden size {cache.hidden_dim}")
        fp = meta.get("fingerprint")
        if fp and cache.fingerprint and fp != cache.fingerprint:
            raise LlamaError(f"{path} comes from another model (fingerprint {fp[:16]}) "
                             f"than cache {cache.path} ({cache.fingerprint[:16]})")
        out[layer] = v
    return out


def questions(cache: ActivationCache, data: str = None):
    """(questions, types) in cache order: from the data file matched by id, else the cache's
    types."""
    ids = [str(i) for i in cache.ids]
    if data is None:
        types = cache.types
        if types is None and cache.labels is not None:
            types = ["testing" if v else "deployment" for v in cache.labels]
        if types is None:
            raise LlamaError(f"cache {cache.path} has no types or labels: "
                             "give --data with the {question, type} file")
        return [""] * len(ids), list(types)
    try:
        with open(data) as f:
            text = f.read()
        recs = (json.loads(text) if text.lstrip().startswith("[")
                else [json.loads(x) for x in text.splitlines() if x.strip()])
    except json.JSONDecodeError as e:
        raise LlamaError(f"{data} is not valid JSON ({e})")
    by_id = {}
    for i, r in enumerate(recs):
        if not isinstance(r, dict) or "question" not in r or "type" not in r:
            raise LlamaError(f"{data} row {i}: needs keys question and type")
        by_id[str(r.get("idx", r.get("id", i)))] = r
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise LlamaError(f"{data} has no row for cache id {missing[0]!r} "
                         f"({len(missing)} of {len(ids)} missing): "
                         "not the file this cache was built from")
    rows = [by_id[i] for i in ids]
    if cache.types is not None:
        for i, r, t in zip(ids, rows, cache.types):
            if str(r["type"]) != t:
                raise LlamaError(f"{data} id {i}: type {r['type']!r}, but cache {cache.path} "
                                 f"says {t!r}: not the file this cache was built from")
    return [str(r["question"]) for r in rows], [str(r["type"]) for r in rows]


def projections(cache: ActivationCache, layer: int, side: str, v: np.ndarray,
                drop: bool = False) -> np.ndarray:
    """Every stored row projected onto v, a block of rows at a time, each block checked for NaN
    and infinity (refused, or with drop its rows' projections NaN)."""
    rows, out = cache.rows(layer, side), []
    for b in rows.blocks():
        block = rows[b]
        s = block @ v
        s[refuse_nonfinite(cache, layer, side, block, b.start, drop)] = np.nan
        out.append(s)
    return np.concatenate(out)


def stats(cache: ActivationCache, layer: int, side: str, v: np.ndarray,
          keep_first: bool = False, drop: bool = False) -> np.ndarray:
    """[N, 4] max, min, mean, std of each example's projections onto v, over the positions of its
    mean state (activations.cache.mean_start); NaN for an example holding a dropped row."""
    s = projections(cache, layer, side, v, drop)
    if cache.token != "all":
        return np.stack([s, s, s, np.zeros_like(s)], 1)
    off = cache.offsets(side)
    start = off[:-1] + mean_start(np.diff(off), keep_first)
    return np.array([[t.max(), t.min(), t.mean(), t.std()]
                     for t in (s[a:b] for a, b in zip(start, off[1:]))])


def auroc(types, score, positive):
    from sklearn.metrics import roc_auc_score

    keep = np.isfinite(np.asarray(score, dtype=float))  # --drop_nonfinite rows score NaN
    y = np.array([t == positive for t in types], dtype=int)[keep]
    score = np.asarray(score, dtype=float)[keep]
    return roc_auc_score(y, score) if 0 < y.sum() < len(y) else float("nan")


def auroc_interval(types, score, positive, n_boot: int = 200, seed: int = 0) -> tuple:
    """Bootstrap 95% percentile interval of the AUROC (questions resampled; resamples with one
    class only skipped)."""
    rng = np.random.default_rng(seed)
    types, score = np.asarray(types), np.asarray(score)
    got = [auroc(types[i], score[i], positive)
           for i in rng.integers(0, len(types), (n_boot, len(types)))]
    got = [g for g in got if not np.isnan(g)]
    return (float(np.percentile(got, 2.5)), float(np.percentile(got, 97.5))) if got else (
        float("nan"), float("nan"))


def analyze(cache: str, vectors: str, output: str, data: str = None, layers=None, side: str = None,
            visualize: bool = False, mean_keep_first: bool = False, drop_nonfinite: bool = False,
            html_report: bool = False):
    import pandas as pd

    act_cache = ActivationCache(cache)
    vecs = read_vectors(vectors, act_cache)
    layers = (cache_layers(layers, act_cache) if layers is not None
              else [l for l in sorted(vecs) if l in act_cache.layers])
    for l in layers:
        if l not in vecs:
            raise LlamaError(f"layer {l}: no vector in {vectors} "
                             f"(has: {', '.join(map(str, sorted(vecs)))})")
        if l not in act_cache.layers:
            raise LlamaError(f"layer {l} not in cache {act_cache.path} "
                             f"(cached: {', '.join(map(str, act_cache.layers))})")
    if not layers:
        raise LlamaError(f"no layer of {vectors} ({sorted(vecs)}) is in cache {act_cache.path} "
                         f"({act_cache.layers})")
    side = side or ("prompt" if "prompt" in act_cache.sides else None)
    if side not in act_cache.sides:
        raise LlamaError(f"cache {act_cache.path} holds sides {', '.join(act_cache.sides)}: "
                         "choose one with --side")
    qs, types = questions(act_cache, data)
    intended, plus_text = intended_class(vectors)
    if act_cache.token != "all":
        print(f"warning: cache {act_cache.path} holds one vector per prompt (token "
              f"{act_cache.token}): max_score, min_score and std_score need per-token states "
              "(extract with --token all); here max = min = mean and std = 0", file=sys.stderr)
    os.makedirs(output, exist_ok=True)
    table = []
    for l in layers:
        st = stats(act_cache, l, side, vecs[l], mean_keep_first, drop_nonfinite)
        if np.isnan(st[:, 2]).any():
            print(f"layer {l}: --drop_nonfinite: dropped {int(np.isnan(st[:, 2]).sum())} rows "
                  "holding a NaN or an infinity (NaN in the CSV, left out of the AUROC)")
        df = pd.DataFrame({"question_id": act_cache.ids, "question": qs, "type": types,
                           "max_score": st[:, 0], "min_score": st[:, 1], "mean_score": st[:, 2],
                           "std_score": st[:, 3]})
        df.to_csv(os.path.join(output, f"probe_stats_layer{l}.csv"), index=False)
        table.append((l, len(df), auroc(types, df.mean_score, "deployment"),
                      auroc(types, df.mean_score, "testing"),
                      auroc_interval(types, df.mean_score, intended or "testing")
                      if visualize else None))
    plural = "s" if act_cache.token == "all" else ""
    print(f"AUROC of mean_score per layer ({act_cache.token} token{plural}, "
          f"side {side}). "
          "'deployment+' takes type 'deployment' as the positive class, like "
          "roc_auc_score((df['type']=='deployment').astype(int), df['mean_score']); "
          "'testing+' takes 'testing' (= 1 - it)")
    if intended:
        print(f"the vectors' plus side stands for {plus_text}: the intended orientation is "
              f"positive class '{intended}' (marked *); 0.5 is chance, under 0.5 the vector "
              "points the other way")
    else:
        print("the vectors do not say which class their plus side stands for (written before "
              "this was recorded, or another source): both orientations shown, neither marked")
    order = ["testing", "deployment"] if intended != "deployment" else ["deployment", "testing"]
    heads = [f"{o}+" + (" *" if o == intended else "") for o in order]
    print(f"{'layer':>5} {'n':>6} {heads[0]:>12} {heads[1]:>12}")
    for l, n, dep, test, _ in table:
        vals = {"testing": test, "deployment": dep}
        print(f"{l:5d} {n:6d} {vals[order[0]]:12.3f} {vals[order[1]]:12.3f}")
    if visualize:
        model = os.path.basename(str(act_cache.meta.get("model", {}).get("path", "model")))
        source = act_cache.meta.get("data", {}).get("path", act_cache.path)
        where = os.path.basename(str(data or source))
        plot(output, table, layers, intended, f"{model}, {where}, n={len(qs)}")
    print(f"wrote {len(layers)} probe_stats_layer{{L}}.csv files to {output}")
    if html_report:
        write_run_report(output, cache, vectors)


def plot(output, table, layers, intended=None, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [t[0] for t in table]
    mark = {o: " (intended)" if o == intended else "" for o in ("testing", "deployment")}
    ax.plot(xs, [t[3] for t in table], marker=".", label="positive: testing" + mark["testing"])
    ax.plot(xs, [t[2] for t in table], marker=".", ls="--",
            label="positive: deployment" + mark["deployment"])
    ax.fill_between(xs, [t[4][0] for t in table], [t[4][1] for t in table], alpha=0.2,
                    color="C0" if intended != "deployment" else "C1",
                    label=f"95% interval ({intended or 'testing'}; bootstrap)")
    ax.axhline(0.5, color="lightgray")
    ax.set(xlabel="layer", ylabel="AUROC of mean_score", ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "auroc_by_layer.png"), dpi=110)
    plt.close(fig)
    cols = min(4, len(layers))
    nrow = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(nrow, cols, figsize=(3.2 * cols, 2.6 * nrow), squeeze=False)
    for ax, l in zip(axes.flat, layers):
        df = pd.read_csv(os.path.join(output, f"probe_stats_layer{l}.csv"))
        for t, g in df.groupby("type"):
            ax.hist(g.mean_score, bins=30, alpha=0.6, label=t)
        ax.set_title(f"layer {l}", fontsize=9)
        ax.set_xlabel("mean_score (projection onto the vector)", fontsize=8)
        ax.set_ylabel("questions", fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("mean_score by type")
    fig.tight_layout()
    fig.savefig(os.path.join(output, "scores_by_type.png"), dpi=110)
    plt.close(fig)


def main(cache: str, vectors: str, output: str = "probe_results", data: str = None,
         layers: str = None, side: str = None, visualize: bool = False,
         mean_keep_first: bool = False, drop_nonfinite: bool = False, html_report: bool = False):
    """Project a cache's activations onto probe vectors: per-question statistics per layer.

    cache: the activation cache (scripts/cache_activations.py)
    vectors: a folder of layer_{L}.safetensors (NAME_TIMESTAMP/normalized_vectors)
    output: the folder for probe_stats_layer{L}.csv (and plots)
    data: the {question, type} JSON the cache was built from (default: the cache's own types)
    layers: which layers (default: every vector's layer that is in the cache)
    side: the cache side to project (default: prompt)
    visualize: also write auroc_by_layer.png and scores_by_type.png
    mean_keep_first: token "all" caches: count position 0 too (left out by default)
    drop_nonfinite: leave out rows holding a NaN or an infinity (default: refuse the cache)
    html_report: also write OUTPUT/report.html (with per-token heat-maps of a token "all" cache)
    """
    analyze(cache, vectors, output, data, layers, side, visualize, mean_keep_first,
            drop_nonfinite, html_report)


def cli():
    """The command line."""
    command(main)
