"""What a steering setting costs in capability, measured as any client would: lm-evaluation-harness
(`lm-eval`, `local-completions` with its default settings: token-id prompts from the server's
/tokenize, batches of 2) runs the local task set `bench/tasks/` through scripts/serve.py, once
for the served model and once per steered alias (--alias: the same server, `model: NAME`).

    python bench/bench_capability.py --vectors sentiment=VEC_DIR \\
        --alias sent_pos=sentiment:10:0.25:residual --alias sent_neg=sentiment:10:-0.25:residual \\
        [--model GGUF_OR_DIR] [--tasks ccs_capitals,ccs_sentiment,ccs_capitals_gen] [--limit N] \\
        [--output results/capability.md]

One table (Markdown, and CSV beside it): per task its metric (acc for multiple choice: the
choice of the highest log-likelihood; exact_match for generation), the base model's score and
each alias's, each the mean over items with a 95% bootstrap interval (items resampled, 1000
draws, steering/report.py `bootstrap`), and the item count. The tasks' items are written for this
project (bench/tasks/README.md); nothing is downloaded (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE).
"""
import argparse
import csv
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(ROOT, "bench", "tasks")
TASKS = ["ccs_capitals", "ccs_sentiment", "ccs_capitals_gen"]
METRICS = ("acc", "exact_match")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

from llama.errors import LlamaError
from steering.report import bootstrap


def run_lm_eval(model: str, model_args: str, tasks: List[str], out_dir: str,
                limit=None, batch_size: int = 2, extra: List[str] = ()) -> Dict[str, list]:
    """`python -m lm_eval --model MODEL --model_args ARGS` on `tasks` (looked up in bench/tasks,
    run there: the data files are relative to it) -> {task: its logged samples, by doc_id}.
    LlamaError with lm-eval's last error line when it fails or is not installed."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--tasks", ",".join(tasks), "--include_path", TASKS_DIR, "--batch_size",
           str(batch_size), "--output_path", out_dir, "--log_samples", *extra]
    if limit:
        cmd += ["--limit", str(limit)]
    cache = os.path.join(out_dir, "datasets-cache")
    env = dict(os.environ, **OFFLINE, HF_DATASETS_CACHE=cache, PYTHONPATH=ROOT)
    r = subprocess.run(cmd, cwd=TASKS_DIR, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [x for x in (r.stderr + r.stdout).strip().splitlines() if x.strip()]
        raise LlamaError(f"lm-eval --model {model} failed (exit {r.returncode}): "
                         f"{lines[-1] if lines else 'no output'}")
    out = {}
    for task in tasks:
        own = re.compile(rf"samples_{re.escape(task)}_\d{{4}}-.*\.jsonl")  # not TASK_gen's
        files = sorted(f for f in glob.glob(os.path.join(out_dir, "**", "samples_*.jsonl"),
                                            recursive=True) if own.fullmatch(os.path.basename(f)))
        if not files:
            raise LlamaError(f"lm-eval wrote no samples for {task} under {out_dir}")
        with open(files[-1]) as f:
            out[task] = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    return out


def item_scores(samples: list) -> tuple:
    """(metric name, [items] float scores) of one task's logged samples."""
    for name in METRICS:
        if name in samples[0]:
            return name, np.array([float(s[name]) for s in samples])
    raise LlamaError(f"no {' or '.join(METRICS)} in lm-eval's samples")


def loglikelihoods(samples: list) -> np.ndarray:
    """[items, choices] log-likelihood of each choice (a multiple-choice task's samples)."""
    return np.array([[float(r[0]) for r in s["filtered_resps"]] for s in samples])


def summarise(runs: Dict[str, Dict[str, list]], n_boot: int = 1000) -> List[dict]:
    """runs {model name: run_lm_eval's} -> rows {task, metric, items, NAME, NAME_lo, NAME_hi}
    per task, one column triple per model (the first model is the base)."""
    rows = []
    first = next(iter(runs.values()))
    for task in first:
        row = {"task": task}
        for name, run in runs.items():
            metric, values = item_scores(run[task])
            lo, hi = bootstrap(values, n_boot)
            row.update({"metric": metric, "items": len(values), name: float(values.mean()),
                        f"{name}_lo": lo, f"{name}_hi": hi})
        rows.append(row)
    return rows


def table(rows: List[dict], names: List[str]) -> str:
    """The Markdown table: task, metric, each model's score [95% interval], items."""
    head = ["task", "metric", *names, "items"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"{r[n]:.3f} [{r[n + '_lo']:.3f}, {r[n + '_hi']:.3f}]" for n in names]
        lines.append("| " + " | ".join([r["task"], r["metric"], *cells, str(r["items"])]) + " |")
    return "\n".join(lines)


def start_server(args: List[str]) -> tuple:
    """scripts/serve.py ARGS on a free local port -> (process, base URL, model id)."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    for line in proc.stdout:
        m = re.search(r"serving (\S+) on (http://\S+)", line)
        if m:
            return proc, m.group(2), m.group(1)
    raise LlamaError(f"the server did not start: {proc.stderr.read().strip()[-300:]}")


def local_completions(url: str, model: str) -> str:
    """lm-eval's model_args for `local-completions` on this server with its defaults."""
    return f"model={model},base_url={url}/v1/completions,max_retries=1"


def main():
    from llama.gguf import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="served model (default: the SmolLM2 wheel)")
    ap.add_argument("--vectors", action="append", default=[], help="NAME=PATH, as serve.py")
    ap.add_argument("--alias", action="append", default=[], help="NAME=SPEC, as serve.py")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(ROOT, "results", "capability.md"))
    a = ap.parse_args()
    serve_args = ["--model", a.model or str(default_model_path()), "--threads", str(a.threads),
                  "--max_batch", "4"]
    for v in a.vectors:
        serve_args += ["--vectors", v]
    for spec in a.alias:
        serve_args += ["--alias", spec]
    proc, url, base = start_server(serve_args)
    try:
        names = [base] + [spec.partition("=")[0] for spec in a.alias]
        runs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, name in enumerate(names):
                print(f"lm-eval on {name} ...", flush=True)
                runs[name] = run_lm_eval("local-completions", local_completions(url, name),
                                         a.tasks.split(","), os.path.join(tmp, str(i)),
                                         a.limit)
    finally:
        proc.terminate()
        proc.wait(60)
    rows = summarise(runs)
    text = table(rows, names)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output, "w") as f:
        f.write(f"`python bench/bench_capability.py {' '.join(sys.argv[1:])}`\n\n{text}\n")
    with open(os.path.splitext(a.output)[0] + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    try:
        main()
    except LlamaError as e:
        sys.exit(f"error: {e}")
