"""What a run folder holds, read from its own files (nothing recomputed that the run wrote):

- probes (ccs.py train): eval.csv, summary.csv, split.csv, probes/METHOD.json;
- transfer (ccs.py transfer): transfer.csv;
- cached (scripts/analyze_probe_from_cache.py): probe_stats_layer{L}.csv;
- steering (scripts/steer.py): steering.csv, items.csv, samples.jsonl.
A folder may hold several kinds; one holding none is refused (LlamaError)."""
import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pandas as pd

from activations.cache import meta_file
from llama.errors import LlamaError

KINDS = ("probes", "transfer", "cached", "steering")


@dataclass
class Run:
    """One run folder: its kinds, the tables read ({name: DataFrame}), the files they came from
    (paths relative to the folder) and facts from its JSON files."""
    path: str
    kinds: List[str] = field(default_factory=list)
    tables: Dict[str, pd.DataFrame] = field(default_factory=dict)
    files: List[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    samples: List[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path)) or self.path


def read_csv(run: Run, name: str, key: Optional[str] = None) -> pd.DataFrame:
    path = os.path.join(run.path, name)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise LlamaError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    run.tables[key or os.path.splitext(name)[0]] = df
    run.files.append(name)
    return df


def need(df: pd.DataFrame, cols, path: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise LlamaError(f"{path}: no column {missing[0]!r} (has: {', '.join(df.columns)})")


def read_probes(run: Run) -> None:
    ev = read_csv(run, "eval.csv")
    need(ev, ["layer", "method", "accuracy", "auroc", "chosen"],
         os.path.join(run.path, "eval.csv"))
    if os.path.exists(os.path.join(run.path, "summary.csv")):
        read_csv(run, "summary.csv")
    if os.path.exists(os.path.join(run.path, "split.csv")):
        sp = read_csv(run, "split.csv")
        need(sp, ["split"], os.path.join(run.path, "split.csv"))
        run.info["split_sizes"] = {str(k): int(v) for k, v in sp["split"].value_counts().items()}
    for f in sorted(glob.glob(os.path.join(run.path, "probes", "*.json"))):
        try:
            with open(f) as fh:
                meta = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise LlamaError(f"{f}: not readable JSON ({e})") from None
        run.files.append(os.path.relpath(f, run.path))
        for key in ("seed", "positive_class", "split", "cache", "fingerprint", "trained_on"):
            if key in meta and key not in run.info:
                run.info[key] = meta[key]
        run.info.setdefault("probe_files", []).append(
            os.path.splitext(os.path.relpath(f, run.path))[0] + ".safetensors")
    cache = run.info.get("cache")
    if cache and os.path.exists(meta_file(cache)):
        with open(meta_file(cache)) as fh:
            meta = json.load(fh)
        run.info["model"] = (meta.get("model") or {}).get("path")
        data = meta.get("data")
        run.info["dataset"] = data.get("path") if isinstance(data, dict) else data
        run.info["token"] = meta.get("token")


def read_cached(run: Run, files: List[str]) -> None:
    frames = []
    for f in files:
        layer = int(re.fullmatch(r"probe_stats_layer(\d+)\.csv", os.path.basename(f)).group(1))
        df = read_csv(run, os.path.basename(f), f"probe_stats_layer{layer}")
        need(df, ["type", "mean_score"], f)
        frames.append(df.assign(layer=layer))
    run.tables["probe_stats"] = pd.concat(frames, ignore_index=True)


def read_steering(run: Run) -> None:
    st = read_csv(run, "steering.csv")
    need(st, ["layer", "multiplier"], os.path.join(run.path, "steering.csv"))
    if os.path.exists(os.path.join(run.path, "items.csv")):
        read_csv(run, "items.csv")
    path = os.path.join(run.path, "samples.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    run.samples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LlamaError(f"{path} line {i + 1}: not valid JSON ({e})") from None
        run.files.append("samples.jsonl")


def read_run(path: str) -> Run:
    """The run folder `path`, every kind it holds read."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise LlamaError(f"no run folder {path}")
    run = Run(path)
    if os.path.exists(os.path.join(path, "eval.csv")):
        run.kinds.append("probes")
        read_probes(run)
    if os.path.exists(os.path.join(path, "transfer.csv")):
        run.kinds.append("transfer")
        tr = read_csv(run, "transfer.csv")
        need(tr, ["train", "test", "layer", "method", "accuracy", "auroc", "chosen"],
             os.path.join(path, "transfer.csv"))
    stats = sorted(glob.glob(os.path.join(glob.escape(path), "probe_stats_layer*.csv")))
    stats = [f for f in stats if re.fullmatch(r"probe_stats_layer\d+\.csv", os.path.basename(f))]
    if stats:
        run.kinds.append("cached")
        read_cached(run, stats)
    if os.path.exists(os.path.join(path, "steering.csv")):
        run.kinds.append("steering")
        read_steering(run)
    if not run.kinds:
        raise LlamaError(f"{path} holds no run outputs (eval.csv, transfer.csv, "
                         "probe_stats_layer{L}.csv or steering.csv)")
    return run
