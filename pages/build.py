"""Runs -> one HTML page (report.runs reads, report.plots draws, report.heatmap colours tokens,
report.html assembles). The doors: scripts/report.py and the --report flags of ccs.py train /
transfer, scripts/steer.py and scripts/analyze_probe_from_cache.py (write_run_report)."""
import os
from dataclasses import dataclass
from typing import List, Optional

import pandas as pd

from llama.errors import LlamaError

from . import html as H
from . import plots
from .heatmap import token_map
from .runs import Run, read_run


@dataclass
class Tokens:
    """Per-token heat-map settings: a token "all" cache, a direction (saved probe or vectors),
    the side, how many prompts, the layer shown first."""
    cache: Optional[str] = None
    direction: Optional[str] = None
    side: Optional[str] = None
    examples: int = 6
    layer: Optional[int] = None


def probes_section(run: Run) -> str:
    ev, info = run.tables["eval"], run.info
    sizes = info.get("split_sizes", {})
    out = [H.facts([("model", info.get("model")), ("dataset", info.get("dataset")),
                    ("cache", info.get("cache")),
                    ("split sizes (split.csv)", ", ".join(f"{k} {v}" for k, v in sizes.items())
                     or None),
                    ("seed", info.get("seed")), ("positive class", info.get("positive_class")),
                    ("probes trained on", info.get("trained_on"))])]
    title = f"{run.name}: test metrics by layer"
    out.append(H.figure("probe-layers", plots.probe_layers(ev, title),
                        "Accuracy (left) and AUROC (right) on the test rows at every layer, "
                        "eval.csv; unsigned methods (ccs, crc_tpc) report max(acc, 1-acc), their "
                        "_signed rows the sign fixed on training labels."))
    if "summary" in run.tables:
        out.append("<h3>Each method at its validation-chosen layer (summary.csv)</h3>")
        out.append(H.table(run.tables["summary"],
                           ["method", "layer", "n", "val_accuracy", "accuracy", "accuracy_lo",
                            "accuracy_hi", "auroc", "auroc_lo", "auroc_hi", "orientation"],
                           text_cols=("method", "layer", "orientation")))
    return "".join(out)


def transfer_section(run: Run) -> str:
    tr = run.tables["transfer"]
    out = [H.facts([("trained on", tr["train"].iloc[0])])]
    for key in ("auroc", "accuracy"):
        out.append(H.figure(f"transfer-{key}", plots.transfer_matrix(tr, key),
                            f"Test {key} of each method (rows) on each test set (columns) at the "
                            "layer chosen on the training cache's validation split "
                            "(transfer.csv rows with chosen > 0)."))
    return "".join(out)


def cached_section(run: Run, layer: Optional[int]) -> str:
    stats = run.tables["probe_stats"]
    table = plots.cached_table(stats)
    if layer is None or layer not in set(table.layer):
        layer = int(table.layer[(table.auroc_testing - 0.5).abs().fillna(-1).idxmax()])
    out = [H.figure("cached-auroc", plots.cached_auroc(table),
                    "AUROC of each prompt's mean_score by layer, both positive classes "
                    "(roc_auc_score on probe_stats_layer{L}.csv's type and mean_score, as "
                    "analyze_probe_from_cache.py prints it). A mean(testing) - mean(deployment) "
                    "vector works when the 'testing' line is high."),
           H.table(table, ["layer", "n", "auroc_testing", "auroc_deployment"]),
           H.figure("cached-hist", plots.score_hist(stats, layer),
                    f"mean_score per prompt by type at layer {layer} "
                    f"(probe_stats_layer{layer}.csv; the layer farthest from 0.5 unless "
                    "--layer is given).")]
    return "".join(out)


def steering_section(run: Run) -> str:
    st = run.tables["steering"]
    x = "push" if "push" in st.columns else "multiplier"
    out = []
    for metric in plots.steering_metrics(st):
        out.append(H.figure(f"steering-{metric}", plots.steering(st, metric, x),
                            f"{metric} against {x}, one line per steered layer (steering.csv; "
                            "bands: its 95% interval columns where present; dashed: unsteered)."))
    out.append("<h3>steering.csv</h3>" + H.table(st, text_cols=("layer",)))
    if run.samples:
        df = pd.DataFrame(run.samples[:120])
        out.append(f"<h3>Open-ended samples (samples.jsonl, {min(len(run.samples), 120)} of "
                   f"{len(run.samples)})</h3>")
        out.append(H.table(df, text_cols=tuple(c for c in df.columns
                                               if df[c].dtype == object)))
    return "".join(out)


def sections_of(run: Run, cached_layer: Optional[int]) -> List[tuple]:
    out = []
    note = H.files_note(run.path, run.files)
    if "probes" in run.kinds:
        out.append((f"Probes: {run.name}", probes_section(run) + note))
    if "transfer" in run.kinds:
        out.append((f"Transfer: {run.name}", transfer_section(run) + note))
    if "cached" in run.kinds:
        out.append((f"Cached workflow: {run.name}", cached_section(run, cached_layer) + note))
    if "steering" in run.kinds:
        out.append((f"Steering: {run.name}", steering_section(run) + note))
    return out


def default_direction(runs: List[Run]) -> Optional[str]:
    """A probes run's lr probe (else its first linear probe with a raw-space direction)."""
    for run in runs:
        files = run.info.get("probe_files", [])
        for f in sorted(files, key=lambda f: not f.endswith("/lr.safetensors")):
            path = os.path.join(run.path, f)
            if os.path.exists(path):
                return path
    return None


def build(paths: List[str], output: str, tokens: Optional[Tokens] = None,
          title: Optional[str] = None) -> str:
    """Write one report page for the run folders `paths` (and a heat-map when tokens.cache is
    given) to `output`; returns its path."""
    if not paths:
        raise LlamaError("give at least one run folder")
    if tokens and tokens.direction and not tokens.cache:
        raise LlamaError("--direction colours a heat-map: give the token 'all' cache too "
                         "(--tokens)")
    runs = [read_run(p) for p in paths]
    sections = []
    for run in runs:
        sections += sections_of(run, tokens.layer if tokens else None)
    if tokens and tokens.cache:
        direction = tokens.direction or default_direction(runs)
        if not direction:
            raise LlamaError("--tokens needs --direction (a saved probe or a vectors folder)")
        tm = token_map(tokens.cache, direction, tokens.side, tokens.examples, tokens.layer)
        sections.append(("Per-token heat-map", H.heatmap(tm, 0)))
    doc = H.page(title or "Report: " + ", ".join(r.name for r in runs), sections)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(doc)
    os.replace(tmp, output)
    return output


def write_run_report(run: str, cache: Optional[str] = None,
                     direction: Optional[str] = None) -> str:
    """RUN/report.html for one run (the commands' --report flag); a heat-map too when `cache`
    is a token "all" cache and `direction` is given. Prints and returns the path."""
    tokens = None
    if cache and direction:
        from activations.cache import ActivationCache

        if ActivationCache(cache).token == "all":
            tokens = Tokens(cache, direction)
    path = build([run], os.path.join(run, "report.html"), tokens)
    print(f"wrote {path}")
    return path
