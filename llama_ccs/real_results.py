"""Real results: SmolLM2-135M-Instruct on the real datasets, end to end, summed up in
OUT/RESULTS.md.

    python scripts/real_results.py --out data/runs/real
        [--datasets boolq,cities,larger_than,common_claim,eval_awareness]
        [--limit N] [--shared ../shared/datasets] [--threads 1]

Per dataset, under OUT/NAME/: prompts.csv (generate_dataset: first template, the model's own chat
template, balanced, seed 0) -> cache/ (every layer, last token, float32, zero-shot log-probs; the
model is loaded once for all datasets) -> train/ (ccs.py train, every method, 60/20/20
train/validation/test, plots). Eval awareness also builds a test/deploy validation set (GSM8K
questions = testing, the ShareGPT requests of tom_vs_sharegpt.json = deployment) in
OUT/eval_awareness/validation/, caches it, takes the contrast set's per-layer vectors mean(test
side - deploy side) and scores the validation prompts with them (AUROC per layer).

Rerunning reuses what is done: the prompts are rebuilt (same seed, same bytes), a finished cache is
skipped and a killed one resumes, a training run newer than its cache is kept. A cache of other
prompts (another --limit) is replaced.
"""
import glob
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import prompts.dataset as gd
from activations.cache import info_file, meta_file
from llama.errors import LlamaError

METHODS = ("ccs", "lr", "mean_diff", "crc_tpc", "random", "zero_shot", "majority")


@dataclass
class Spec:
    file: str  # under --shared
    limit: Optional[int]  # examples (None: all)
    about: str


# Defaults sized for ~20 minutes on 2 CPU cores, float32, one thread (~220 tokens/s of model work,
# ~180 when the cores are shared): ~225k tokens, BoolQ prompts averaging ~175 tokens, the others
# ~35
SPECS = {
    "boolq": Spec("boolq/validation.json", 500, "BoolQ validation: passage + yes/no question, "
                                                "answers True/False"),
    "cities": Spec("truth/cities.csv", 1000,
                   "Geometry of Truth cities: \"The city of X is in Y.\""),
    "larger_than": Spec("truth/larger_than.csv", 1000, "Geometry of Truth larger_than: "
                                                       "\"Fifty-one is larger than fifty-two.\""),
    "common_claim": Spec("truth/common_claim_true_false.csv", 1000,
                         "Geometry of Truth common_claim_true_false"),
    "eval_awareness": Spec("eval_awareness/contrastive_dataset.json", None,
                           "evaluation-awareness A/B questions; label 1: the plus side gives the "
                           "\"I am being tested\" answer (in this file always the option that "
                           "reads \"Yes\", (A) and (B) equally often)"),
}
VALIDATION_N = 200  # questions of each type
VALIDATION_POOL = 40  # more of each drawn, so that enough remain after dropping long ones
# a few ShareGPT requests run to ~2,800 tokens: half the work for 5% of the rows
VALIDATION_TOKENS = 512
GSM8K = "gsm8k/test.jsonl"
SHAREGPT = "eval_awareness/tom_vs_sharegpt.json"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rel(path, out):
    return os.path.relpath(path, out)


def cmd(*parts):
    return " ".join(shlex.quote(str(p)) for p in parts)


def check_no_leak(path):
    """Refuse contrast prompts whose answer text alone gives the label: a last-token probe (even a
    random direction on the embeddings) would read the label off the answer token."""
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "plus_answer" not in df:
        return
    by = df.groupby("plus_answer")["label"].nunique()
    if len(by) > 1 and (by == 1).all():
        pairs = df.groupby("plus_answer")["label"].first().to_dict()
        raise LlamaError(f"{path}: the plus side's answer gives the label ({pairs}): probes on "
                         "the last token would read it off the answer; each side needs one fixed "
                         "answer (plus 'Yes'/'True') with label = whether that answer is right")


def prompts(out_csv, input, tok_path, limit, max_len, seed=0):
    """Build the prompt CSV; returns the equivalent command line."""
    gd.main(out_csv, input=input, tokenizer_path=tok_path, balance=True, limit=limit, seed=seed,
            max_seq_len=max_len)
    check_no_leak(out_csv)
    return cmd("python", "generate_dataset.py", out_csv, "--input", input, "--tokenizer_path",
               tok_path, "--balance",
               *(["--limit", limit] if limit else []), "--seed", seed, "--max_seq_len", max_len)


def extract(lm, model_path, data, cache, zero_shot):
    """Every layer's last-token states of `data` into `cache` (resumed or skipped when done); a
    cache of other prompts is replaced. Returns the equivalent command line."""
    from activations.extract import Extraction, run

    old = read_json(meta_file(cache))
    stale = old is not None and old.get("settings", {}).get("data_sha256") != sha256(data)
    if stale:
        print(f"{cache} holds a cache of other prompts: replacing it", flush=True)
    run(Extraction(model_path, data, cache, token="last", zero_shot=zero_shot, overwrite=stale),
        lm)
    return cmd("python", "scripts/cache_activations.py", "--model", model_path, "--data", data,
               "--output", cache,
               "--layers", "all", "--token", "last", "--dtype", "float32",
               *(["--zero_shot"] if zero_shot else []))


def fresh(path, than):
    return os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(than)


def train(cache, run):
    """ccs.py train with every method and the plots, unless a run newer than the cache is there."""
    import probes.commands as ccs

    if fresh(os.path.join(run, "summary.csv"), info_file(cache)) and \
            os.path.exists(os.path.join(run, "layers.png")):
        print(f"{run}: trained after its cache was made, kept", flush=True)
    else:
        ccs.train(cache, run, visualize=True)
    return cmd("python", "ccs.py", "train", "--cache", cache, "--output", run, "--visualize")


def validation(lm, model_path, tok_path, shared, folder, n, max_len, steps):
    """The test/deploy validation set (n questions of each type, at most VALIDATION_TOKENS tokens),
    its cache, the contrast set's vectors scored on it."""
    from steering.analyze import analyze
    from steering.mean_diff import generate

    questions = os.path.join(folder, "questions.json")
    pool = n + VALIDATION_POOL
    gd.build_validation(questions, os.path.join(shared, GSM8K), os.path.join(shared, SHAREGPT),
                        n=pool, seed=0)
    steps.append(cmd("python", "generate_dataset.py", "build_validation", questions, "--testing",
                     os.path.join(shared, GSM8K), "--deployment", os.path.join(shared, SHAREGPT),
                     "--n", pool, "--seed", 0))
    data = os.path.join(folder, "prompts.csv")
    steps.append(prompts(data, questions, tok_path, 2 * n, min(max_len, VALIDATION_TOKENS)))
    cache = os.path.join(folder, "cache")
    steps.append(extract(lm, model_path, data, cache, zero_shot=False))
    contrast = os.path.join(os.path.dirname(folder), "cache")
    done = info_file(contrast)
    runs = sorted(r for r in glob.glob(os.path.join(os.path.dirname(folder), "vectors_*"))
                  if fresh(r, done))
    vectors = (runs[-1] if runs
               else generate(contrast, os.path.join(os.path.dirname(folder), "vectors")))
    steps.append(cmd("python", "scripts/generate_vectors_from_cache.py", "--cache", contrast,
                     "--output", os.path.join(os.path.dirname(folder), "vectors")))
    analysis = os.path.join(folder, "analysis")
    analyze(cache, os.path.join(vectors, "normalized_vectors"), analysis, data=questions,
            visualize=True)
    steps.append(cmd("python", "scripts/analyze_probe_from_cache.py", "--cache", cache,
                     "--vectors", os.path.join(vectors, "normalized_vectors"), "--data", questions,
                     "--output", analysis, "--visualize"))
    return analysis, vectors


def auroc_table(analysis):
    """[(layer, n, AUROC deployment+, AUROC testing+)] from the probe_stats files analyze wrote."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    rows = []
    for path in glob.glob(os.path.join(analysis, "probe_stats_layer*.csv")):
        df = pd.read_csv(path)
        dep = roc_auc_score((df["type"] == "deployment").astype(int), df["mean_score"])
        rows.append((int(path.rsplit("layer", 1)[1][:-4]), len(df), dep, 1 - dep))
    return sorted(rows)


# ---------------------------------------------------------------- RESULTS.md


def timing(cache):
    t = (read_json(meta_file(cache)) or {}).get("timings")
    if not t:
        return "reused from an earlier run"
    return (f"{t['extract_s']:.0f} s, {t['tokens_per_s']:.0f} tokens/s (every side's full length "
            "counted)")


def method_table(run):
    import pandas as pd

    df = pd.read_csv(os.path.join(run, "summary.csv"), dtype={"layer": str})
    names = list(dict.fromkeys(df.method))
    order = [m for m in METHODS if m in names] + [m for m in names if m not in METHODS]
    lines = ["| method | layer (chosen on validation) | validation accuracy | test accuracy [95% "
             "CI] | test AUROC [95% CI] |", "| --- | ---: | ---: | --- | --- |"]
    for m in order:
        r = df[df.method == m].iloc[0]
        lines.append(f"| {m} | {r.layer} | {r.val_accuracy:.3f} | {r.accuracy:.3f} "
                     f"[{r.accuracy_lo:.3f}, {r.accuracy_hi:.3f}] | {r.auroc:.3f} "
                     f"[{r.auroc_lo:.3f}, {r.auroc_hi:.3f}] |")
    return int(df.n.iloc[0]), lines


def section(name, out, spec):
    from activations.cache import ActivationCache

    act_cache = ActivationCache(spec["cache"])
    labels = [int(v) for v in act_cache.labels]
    n_test, table = method_table(spec["run"])
    lines = [f"## {name}", "", f"{SPECS[name].about}. Source: `{spec['source']}`.", "",
             f"- rows: {act_cache.num_examples} (label 1: {sum(labels)}, label 0: "
             f"{len(labels) - sum(labels)}; limit {spec['limit'] or 'none (all)'}), test rows: "
             f"{n_test}; chat format {spec['chat']}",
             f"- extraction: {timing(spec['cache'])}",
             f"- plots: `{rel(spec['run'], out)}/layers.png` (accuracy and AUROC by layer), "
             "`roc.png`, `hist.png`", "",
             *table, ""]
    if "analysis" in spec:
        rows = auroc_table(spec["analysis"])
        vc = ActivationCache(spec["val_cache"])
        types = list(vc.types)
        dep, test = max(rows, key=lambda r: r[2]), max(rows, key=lambda r: r[3])
        lines += [f"### test/deploy validation ({types.count('testing')} GSM8K questions = "
                  f"testing, {types.count('deployment')} ShareGPT requests = deployment)", "",
                  "Vectors: per layer, mean over the contrast pairs of (test-answer side - "
                  f"deploy-answer side), last token, unit norm (`{rel(spec['vectors'], out)}`). "
                  "Score of a validation prompt: its last token's state (the opened assistant "
                  "turn) projected on the vector. AUROC with **deployment as the positive class** "
                  "(the workflow's `roc_auc_score((type=='deployment'), mean_score)`): below 0.5 "
                  "means the vector ranks testing prompts higher, as it should; `testing+` = 1 - "
                  "that.", "",
                  "Best layers, chosen on the validation set itself: by the workflow's "
                  f"deployment+ AUROC, layer {dep[0]} ({dep[2]:.3f}); by testing+ AUROC (the "
                  f"direction the vector is built for), layer {test[0]} ({test[3]:.3f}). "
                  f"Extraction {timing(spec['val_cache'])}.",
                  f"Plots: `{rel(spec['analysis'], out)}/auroc_by_layer.png`, "
                  "`scores_by_type.png`.",
                  "",
                  "| layer | n | AUROC deployment+ | AUROC testing+ |",
                  "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {l} | {n} | {a:.3f} | {b:.3f} |" for l, n, a, b in rows] + [""]
    lines += ["Commands (what the script ran, step by step):", "", "```", *spec["steps"], "```",
              ""]
    return lines


def write_results(out, done, argv, model_path, limits, seconds, threads):
    lines = ["# Real results: SmolLM2-135M-Instruct", "",
             f"Model: `{model_path}` (float32). Made by "
             f"`{cmd('python', 'scripts/real_results.py', *argv)}`; its last call took "
             f"{seconds / 60:.1f} min with {threads} torch thread{'s' * (threads > 1)} (steps "
             "finished by an earlier call are reused; each extraction's own time is below).", "",
             "Every layer's last-token state (layer 0 = embedding output, i = output of block i); "
             "probes by `ccs.py train` on a 60/20/20 train/validation/test split (stratified, "
             "grouped by example, seed 0), features standardised with training statistics. Label "
             "1 = the plus side is the true one; AUROC takes label 1 as positive. Each method's "
             "layer is chosen on the validation rows and scored on the test rows; ccs and crc_tpc "
             "report max(acc, 1 - acc) (sign unidentified; AUROC oriented the same way), *_signed "
             "fix the sign on training labels. zero_shot: log p(plus answer) - log p(minus "
             "answer), the same at every layer.", "",
             "Limits (examples per dataset, seeded, balanced): "
             + ", ".join(f"{k} {v or 'all'}" for k, v in limits.items())
             + f"; validation prompts over {VALIDATION_TOKENS} tokens left out.", ""]
    for name, d in done.items():
        lines += section(name, out, d)
    path = os.path.join(out, "RESULTS.md")
    gd.atomic_write(path, lambda f: f.write("\n".join(lines)))
    print(f"wrote {path}")


# ---------------------------------------------------------------- main


def main(out="data/runs/real", datasets=",".join(SPECS), limit=None,
         shared=os.path.join(ROOT, "..", "shared", "datasets"), threads=1):
    """Run every step for each dataset and write OUT/RESULTS.md.

    Args:
      out: the folder for prompts, caches, runs and RESULTS.md.
      datasets: comma-separated, from boolq, cities, larger_than, common_claim, eval_awareness.
      limit: at most this many examples per dataset (and validation questions per type) instead
        of the defaults.
      shared: the folder of the real datasets.
      threads: torch threads (0: torch's default). On 2 cores busy with other jobs, 2 threads ran
        extraction 2x and training 8x slower than 1.
    """
    import torch

    from llama.checkpoint import load_model
    from llama.dist import setup, teardown
    from llama.gguf import default_model_path
    from llama.tokenizer import load_tokenizer

    argv = sys.argv[1:]
    names = [s.strip()
             for s in (",".join(datasets) if isinstance(datasets, (list, tuple))
                       else str(datasets)).split(",") if s.strip()]
    bad = [s for s in names if s not in SPECS]
    if bad or not names:
        raise LlamaError(f"unknown --datasets {bad[0] if bad else datasets!r}: choose from "
                         f"{', '.join(SPECS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 4):
        raise LlamaError(f"--limit {limit!r} is not an integer of at least 4")
    shared = os.path.abspath(shared)
    for name in names:
        for f in [SPECS[name].file] + ([GSM8K, SHAREGPT] if name == "eval_awareness" else []):
            if not os.path.isfile(os.path.join(shared, f)):
                raise LlamaError(f"no {f} in --shared {shared}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise LlamaError(f"--threads {threads!r} is not a non-negative integer")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    model_path = str(default_model_path())
    proc = setup(mp=1)
    try:
        lm = load_model(model_path, proc, "float32")
        tok_path, max_len = lm.tokenizer_path, lm.args.max_seq_len
        chat = load_tokenizer(tok_path).chat_source  # "template": the model's own chat template
        done, limits = {}, {}
        for name in names:
            spec = SPECS[name]
            n = limit or spec.limit
            limits[name] = n
            folder = os.path.join(out, name)
            print(f"\n== {name}", flush=True)
            source = os.path.join(shared, spec.file)
            data, cache, run = (os.path.join(folder, x) for x in ("prompts.csv", "cache", "train"))
            steps = [prompts(data, source, tok_path, n, max_len)]
            steps.append(extract(lm, model_path, data, cache, zero_shot=True))
            steps.append(train(cache, run))
            done[name] = dict(source=source, limit=n, chat=chat, cache=cache, run=run, steps=steps)
            if name == "eval_awareness":
                nv = min(limit, VALIDATION_N) if limit else VALIDATION_N
                limits["validation (per type)"] = nv
                analysis, vectors = validation(lm, model_path, tok_path, shared,
                                               os.path.join(folder, "validation"),
                                               nv, max_len, steps)
                done[name].update(analysis=analysis, vectors=vectors,
                                  val_cache=os.path.join(folder, "validation", "cache"))
        write_results(out, done, argv, model_path, limits, time.time() - t0,
                      torch.get_num_threads())
    finally:
        teardown()


def cli():
    """The command line."""
    from llama.cli import command

    command(main)
