"""Probes on an activation cache: CCS (Burns et al. 2022) and its baselines, on every layer.

    python ccs.py train --cache DIR --output RUN [--layers 0-3,7] [--methods ccs,lr] [--visualize]
    python ccs.py transfer --train DIR --test DIR2 [--test DIR3 ...] --output RUN

Every score reads "higher = label 1": the plus side is the true one (contrast caches), or the
prompt is a "testing" one (single-prompt caches). AUROC takes label 1 as the positive class.
Features are standardised per side and per dimension with statistics of the training rows only.
Rows are split three ways (train / validation / test; stratified by label, grouped by the cache's
example ids, seeded): every method is fitted on train, its layer chosen on validation, and scored
on test at that layer. The cache is read a chunk of layers at a time (--memory_mb). Never imports
fairscale or the model. Methods: see probes/methods.py.

RUN/eval.csv, one row per layer and method: test metrics (accuracy, balanced_accuracy, auroc and
their bootstrap 95% intervals *_lo, *_hi; calibrated_accuracy: threshold set so the test positive
rate equals training's), validation metrics (val_accuracy, val_auroc), chosen (1 at the
validation-chosen layer; with --folds, how many folds chose it), train_loss, orientation. CCS and
CRC-TPC cannot tell true from false: row `ccs` reports max(acc, 1 - acc) on the metric (AUROC
oriented the same way), row `ccs_signed` the sign fixed on training labels.
RUN/summary.csv: each method at its chosen layer. RUN/split.csv: idx, split of every row.
RUN/probes/METHOD.safetensors: the probes, in standardised and raw activation space.
"""
import os
import sys
import time
from typing import List

import numpy as np

from llama.errors import LlamaError
from probes import data, report
from probes.methods import METHODS, baselines, defaults
from probes.solvers import Settings
from probes.train import run
from pages.build import write_run_report


def parse_methods(spec) -> List[str]:
    if spec is None or str(spec).strip().lower() == "all":
        return []
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out = [str(s).strip() for s in items if str(s).strip()]
    if not out:
        raise LlamaError("--methods is empty")
    for m in out:
        if m not in METHODS:
            raise LlamaError(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    return out


def choose_methods(cache, spec) -> List[str]:
    """The methods to run on this cache: those asked (default: every default one the cache allows),
    the baselines always."""
    contrast, lp = cache.is_contrast, cache.logprobs is not None
    want = parse_methods(spec) or defaults(True, lp or not contrast)  # the note lists what skips
    skipped = [m for m in want if METHODS[m].contrast_only and not contrast]
    if skipped:
        print(f"note: {', '.join(skipped)} need contrast pairs (plus/minus sides); cache "
              f"{cache.path} holds single prompts, so only the supervised methods run",
              file=sys.stderr)
    want = [m for m in want if m not in skipped]
    need = [m for m in want if METHODS[m].reads_logprobs]
    if need and not lp:
        raise LlamaError(f"{', '.join(need)} needs the answers' log-probabilities in cache "
                         f"{cache.path} (extract with --zero_shot)")
    return want + [m for m in baselines() if m not in want]


def positive_name(cache) -> str:
    """What label 1 means in this cache (contrast pairs; single prompts labelled by the data's
    label column, e.g. a true statement; or by their type, as validation sets are)."""
    if cache.is_contrast:
        return "label 1 = the plus side is the true one"
    if cache.labels is None:  # probes/data.labels then reads the types
        return "label 1 = type 'testing'"
    return "label 1 = the data's label 1 (a true statement, a 'yes' answer, a testing prompt)"


def train(cache: str, output: str, layers: str = "all", methods: str = "all",
          test_frac: float = 0.2, val_frac: float = 0.25, folds: int = 0, visualize: bool = False,
          bootstrap: int = 1000, drop_nonfinite: bool = False, fit: Settings = None,
          html_report: bool = False):
    """Train and score every method on every cached layer.

    Writes OUTPUT/eval.csv, summary.csv, split.csv, probes/ and plots.

    cache: activation cache folder (one vector per example: token last or mean)
    output: run folder
    layers: all, 10,20 or 0-3,7
    methods: all or a list such as ccs,lr (random and majority always run)
    test_frac: share of the rows (whole examples) held out to test
    val_frac: share of the other rows held out to choose each method's layer
    folds: k-fold cross-validation instead (grouped; the layer chosen inside each fold's training
        part); 0: one split
    visualize: also write layers.png, roc.png and hist.png
    bootstrap: resamples for the 95% intervals (0: none)
    drop_nonfinite: leave out rows holding a NaN or an infinity (default: refuse the cache)
    html_report: also write OUTPUT/report.html (scripts/report.py's page of this run)
    """
    t0 = time.time()
    fit = fit or Settings()
    act_cache = data.open_cache(cache)
    layers = data.cache_layers(layers, act_cache)
    methods = choose_methods(act_cache, methods)
    y, grp = data.labels(act_cache), data.groups(act_cache)
    parts = data.split(y, grp, float(val_frac), float(test_frac), int(folds), fit.seed)
    everything = np.arange(len(y))
    nothing = everything[:0]
    todo = parts + [data.Part(everything, nothing, nothing)] if folds else parts
    dropped = nonfinite_rows_to_drop(act_cache, layers, methods) if drop_nonfinite else None
    if dropped is not None:
        parts, todo = data.drop_rows(parts, dropped), data.drop_rows(todo, dropped)
    os.makedirs(output, exist_ok=True)
    fitted = run(act_cache, layers, methods, todo, fit, dropped=dropped)
    t1 = time.time()
    split = f"cv{folds}" if folds else "test"
    rows, summary, selected, yt = report.tables(fitted[:len(parts)], parts, y, layers, split,
                                                int(bootstrap), fit.seed, fit.workers())
    df, sm = report.frame(rows, report.COLUMNS), report.frame(summary, report.SUMMARY)
    df.round(6).to_csv(os.path.join(output, "eval.csv"), index=False)
    sm.round(6).to_csv(os.path.join(output, "summary.csv"), index=False)
    names = data.split_table(len(y), parts)["split"]
    if dropped is not None:
        names[dropped] = "dropped"
    report.write_split(os.path.join(output, "split.csv"), act_cache, names)
    info = dict(split=split, test_frac=None if folds else float(test_frac),
                val_frac=float(val_frac), seed=fit.seed, positive_class=positive_name(act_cache),
                trained_on="all rows (after the folds measured them)" if folds
                else "the training split")
    report.save_probes(os.path.join(output, "probes"), fitted[-1], layers, act_cache, info,
                       report.chosen_layers(df))
    if visualize:
        report.plot(output, df, sm, selected, yt, act_cache, positive_name(act_cache))
    report.print_table(df, sm, positive_name(act_cache))
    t2 = time.time()
    print(f"wrote {output}/eval.csv, summary.csv, split.csv and probes/ in {t2 - t0:.1f} s "
          f"(fit and score {t1 - t0:.1f} s, metrics and outputs {t2 - t1:.1f} s)")
    if html_report:
        write_run_report(output)


def nonfinite_rows_to_drop(c, layers, methods):
    """--drop_nonfinite: [N] bool rows holding a NaN or an infinity in the layers read (or in the
    zero-shot log-probabilities, when zero_shot runs); says how many per layer."""
    bad, counts = data.nonfinite(c, layers, logprobs="zero_shot" in methods)
    if bad.any():
        per = ", ".join(f"layer {k}: {n}" if k != "logprobs" else f"zero-shot log-probs: {n}"
                        for k, n in counts.items() if n)
        print(f"--drop_nonfinite: dropped {int(bad.sum())} of {len(bad)} rows holding a NaN or an "
              f"infinity ({per})")
    return bad


def same_model(src, other) -> None:
    if not src.fingerprint or not other.fingerprint:
        raise LlamaError(f"cache {other.path if not other.fingerprint else src.path} has no model "
                         "fingerprint: cannot check both caches come from one model")
    if src.fingerprint != other.fingerprint:
        raise LlamaError(f"cache {other.path} comes from another model than {src.path} "
                         f"(fingerprint {other.fingerprint[:16]} vs {src.fingerprint[:16]}): "
                         "probes do not transfer across models")
    if src.hidden_dim != other.hidden_dim or src.sides != other.sides:
        raise LlamaError(f"cache {other.path} holds {other.sides} x {other.hidden_dim} features, "
                         f"{src.path} {src.sides} x {src.hidden_dim}")


def transfer(train: str, test: List[str], output: str = "runs/transfer", layers: str = "all",
             methods: str = "all", test_frac: float = 0.2, val_frac: float = 0.25,
             bootstrap: int = 1000, drop_nonfinite: bool = False, fit: Settings = None,
             html_report: bool = False):
    """Train on one cache, score on others of the same model.

    Trains on the training split of cache TRAIN and chooses each method's layer on its validation
    split; scores its test split and every row of each --test cache (same model, by fingerprint).

    train: the cache to train on
    test: a cache to score (give --test several times for several)
    output: run folder (transfer.csv, summary.csv)
    layers: all, 10,20 or 0-3,7 (every cache must have them)
    methods: all or a list such as ccs,lr (random and majority always run)
    test_frac: share of TRAIN's rows held out to test
    val_frac: share of TRAIN's other rows held out to choose each method's layer
    bootstrap: resamples for the 95% intervals (0: none)
    drop_nonfinite: leave out TRAIN's rows holding a NaN or an infinity (default: refuse it)
    html_report: also write OUTPUT/report.html (scripts/report.py's page of this run)
    """
    fit = fit or Settings()
    src = data.open_cache(train)
    if not test:
        raise LlamaError("transfer needs at least one --test cache")
    targets = [data.open_cache(str(t)) for t in test]
    for t in targets:
        same_model(src, t)
    layers = data.cache_layers(layers, src)
    for t in targets:
        data.cache_layers(layers, t)
    methods = choose_methods(src, methods)
    y, grp = data.labels(src), data.groups(src)
    ys = [data.labels(t) for t in targets]
    parts = data.split(y, grp, float(val_frac), float(test_frac), 0, fit.seed)
    dropped = nonfinite_rows_to_drop(src, layers, methods) if drop_nonfinite else None
    if dropped is not None:
        parts = data.drop_rows(parts, dropped)
    fitted = run(src, layers, methods, parts, fit, other=targets, dropped=dropped)[0]
    rows, summary, _, _ = report.tables([fitted], parts, y, layers, "test", int(bootstrap),
                                        fit.seed, fit.workers())
    for r in rows:
        r.update(train=train, test=train)
    # a method without layers is read at the first (its rows are the same at every layer)
    chosen = {s["method"]: None if s["layer"] == report.NO_LAYER else int(s["layer"])
              for s in summary}
    at = {m: layers[0] if layer is None else layer for m, layer in chosen.items()}
    pos_rate = float(y[parts[0].fit].mean())
    for t, yt, scores in zip(targets, ys, fitted.other):
        ev = report.evaluate_all(scores, yt, pos_rate, int(bootstrap), fit.seed, fit.workers())
        for r, e in ev.items():
            for i, layer in enumerate(layers):
                row = dict(train=train, test=t.path, layer=layer, method=r, split="all", n=len(yt),
                           chosen=int(at[r] == layer), orientation=report.orientation(r))
                row.update({k: float(e[k][i]) for k in report.INTERVALS + ["calibrated_accuracy"]
                            if k in e})
                rows.append(row)
    os.makedirs(output, exist_ok=True)
    df = report.frame(rows, ["train", "test"] + report.COLUMNS)
    df.round(6).to_csv(os.path.join(output, "transfer.csv"), index=False)
    names = [train] + [t.path for t in targets]
    print(f"transfer from {train} (trained on its training split, layer chosen on its validation "
          f"split); test accuracy / AUROC at that layer; positive class: {positive_name(src)}")
    heads = [os.path.basename(os.path.normpath(n))[:17] for n in names]
    heads[0] = heads[0][:12] + " test"
    print(f"{'method':<16}{'layer':>6}" + "".join(f"  {h:>17}" for h in heads))
    for m, layer in chosen.items():
        cells = []
        for n in names:
            r = df[(df.test == n) & (df.method == m) & (df.layer == at[m])]
            cells.append(f"{r.accuracy.iloc[0]:.3f} / {r.auroc.iloc[0]:.3f}" if len(r) else "-")
        shown = report.NO_LAYER if layer is None else layer
        print(f"{m:<16}{shown:>6}" + "".join(f"  {c:>17}" for c in cells))
    print(f"wrote {output}/transfer.csv (every layer; first column: {train}'s own test split)")
    if html_report:
        write_run_report(output)


def main():
    from llama.cli import command

    command({"train": train, "transfer": transfer}, prog="ccs.py")


def cli():
    """The command line."""
    main()
