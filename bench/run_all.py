"""Every benchmark, each in a process of its own (its own threads, its own peak RSS), summed up in
one Markdown table against the targets below, each number with the command that produced it;
written to bench/RESULTS.md and printed. `make bench` runs it.

    python bench/run_all.py [--quick] [--threads 2]

--quick: small sizes, a smoke check that every benchmark runs (a few minutes; the numbers mean
little), written to bench/RESULTS-quick.md so that it never replaces the recorded full-size
figures.
Run the full size on an otherwise quiet machine.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)

from activations.cache import save_cache
from llama.errors import LlamaError, cli

SIZES = {  # arguments of each script, full size and --quick
    "full": {"extract": ["--pairs", "48", "--rss_pairs", "20", "--repeats", "3"],
             "cache": ["--n", "1000"],
             "probes": ["--naive_layers", "8"], "generate": ["--repeats", "3"],
             "probes_70b": ["--sets", "9,31,81"], "serve": ["--new", "64", "--requests", "16"]},
    "quick": {"extract": ["--pairs", "2", "--rss_pairs", "1", "--repeats", "1"],
              "cache": ["--n", "100"],
              "probes": ["--naive_layers", "1"], "generate": ["--repeats", "1", "--new", "8"],
              "probes_70b": ["--sets", "9,81", "--n", "200", "--dim", "64"],
              "serve": ["--new", "8", "--requests", "8"]},
}
TARGETS = {  # the least that passes
    "speedup_all": 1.5, "speedup_middle": 2.5,  # extraction vs transformers, wall clock
    "rss_growth": 1.1,  # peak RSS at 10x the prompts over 1x: flat, whatever the dataset size
    # cache vs float64 .npy per example; open_faster is for float32, read in place (bfloat16 is
    # converted to float32 on the way: reported only)
    "smaller_float32": 1.9, "smaller_bfloat16": 3.8, "open_faster": 10.0,
    # ccs.py train (every layer, every baseline) vs the naive Adam loop (CCS only)
    "probes_speedup": 10.0,
    # ccs.py train on 3270 pairs x 576 x 31 layers, wall clock (full size only)
    "probes_seconds": 10.0,
    "generate_speedup_b8": 1.2,  # greedy decode tokens/s vs transformers generate, batch 8
    # ccs.py train streaming a 3270 x 8192 x 81 bfloat16 cache (70B-shaped), default methods:
    "probes70_gib": 4.0, "probes70_s": 600.0,  # all 81 layers: peak RSS, wall
    "probes9_gib": 3.3, "probes9_s": 59.0,  # the seed workflow's 9 layers, before streaming
    # scripts/serve.py: completion tokens/s at 16 concurrent clients vs the same requests one at
    # a time (greedy, 64 new tokens, --max_batch 16)
    "serve_speedup_16": 3.0,
}


def quick_cache(path: str, n: int = 150, layers: int = 3, dim: int = 576) -> None:
    """A small contrast cache with a planted truth direction: bench_probes' own synthetic one (3270
    pairs, 31 layers) takes minutes to train on."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    truth = np.outer(2 * y - 1, rng.standard_normal(dim)) * 0.1
    arrays = {}
    for layer in range(layers):
        common = rng.standard_normal((n, dim))
        arrays[layer] = {"plus": common + truth + 0.5 * rng.standard_normal((n, dim)),
                         "minus": common - truth + 0.5 * rng.standard_normal((n, dim))}
    save_cache(path, arrays, {"labels": y.tolist(), "model": {"fingerprint": "synthetic"}})


def bench(script: str, args: list, threads: int, tmp: str):
    """Run bench/SCRIPT ARGS --json with the given threads -> (its JSON or None, its stdout, the
    command shown, an error line or None)."""
    shown = f"OMP_NUM_THREADS={threads} python bench/{script} " + " ".join(map(shlex.quote, args))
    out = os.path.join(tmp, script + ".json")
    cmd = [sys.executable, os.path.join(BENCH, script), *args, "--json", out]
    print(f"running: {shown}", flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    if p.returncode:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, p.stdout, shown, f"exit {p.returncode}: {last}"
    with open(out) as f:
        return json.load(f), p.stdout, shown, None


def verdict(value, target, larger=True) -> str:
    return "yes" if (value >= target if larger else value <= target) else "**no**"


def extract_rows(r: dict, cmd: str) -> list:
    rows = []
    peak = r["matmul_flops_per_s"]
    for x, key in zip(r["speed"], ("speedup_all", "speedup_middle")):
        rows.append((f"extraction speed-up vs transformers output_hidden_states, {x['name']} "
                     f"({x['layers']}), {x['prompts']} prompts, {x['tokens']} tokens",
                     f"{x['speedup_wall']:.2f}x wall ({x['hf_wall_s']:.1f} s vs "
                     f"{x['ours_wall_s']:.1f} s), {x['speedup_cpu']:.2f}x CPU; "
                     f"max rel diff {x['max_rel_diff']:.1e}",
                     f">= {TARGETS[key]}x wall", verdict(x["speedup_wall"], TARGETS[key]), cmd))
    for x in r["speed"]:
        rows.append((f"extraction FLOP/s as a share of float32 matmul (torch.mm 2048x2048, "
                     f"best of 10: {peak / 1e9:.1f} GFLOP/s), {x['name']}",
                     f"{x['flops_per_s'] / peak:.0%} ({x['flops_per_s'] / 1e9:.1f} GFLOP/s of "
                     f"{x['flops'] / 1e9:.0f} GFLOP counted, {x['tokens_run']} tokens run); "
                     f"transformers {x['hf_flops_per_s'] / peak:.0%}",
                     "reported", "-", cmd))
    one, ten = r["rss"]
    growth = ten["peak_rss_mib"] / one["peak_rss_mib"]
    rows.append((f"peak RSS of a whole extraction (all layers), {one['pairs']} vs {ten['pairs']} "
                 "contrast pairs",
                 f"{one['peak_rss_mib']:.0f} MiB vs {ten['peak_rss_mib']:.0f} MiB ({growth:.2f}x)",
                 f"10x pairs <= {TARGETS['rss_growth']}x RSS",
                 verdict(growth, TARGETS["rss_growth"], larger=False), cmd))
    return rows


def cache_rows(r: dict, cmd: str) -> list:
    seed, *ours = r["rows"]
    rows = []
    for x in ours:
        dt = x["format"].split(", ")[-1]
        rows.append((f"cache size on disk per example per layer per side, {dt} "
                     f"({r['n']} pairs x {r['layers']} layers x {r['dim']})",
                     f"{x['bytes_per_row']:,.0f} B vs {seed['bytes_per_row']:,.0f} B float64 .npy "
                     f"per example ({x['smaller_by']:.2f}x smaller)",
                     f">= {TARGETS['smaller_' + dt]}x smaller",
                     verdict(x["smaller_by"], TARGETS["smaller_" + dt]), cmd))
    for x in ours:
        dt = x["format"].split(", ")[-1]
        f32 = dt == "float32"
        rows.append((f"open one layer memory-mapped and read it as float32, {dt} cache, "
                     f"vs the seed's {r['n']} files (page cache dropped where allowed, best of 3)",
                     f"{x['open_s']:.4f} s vs {seed['open_s']:.3f} s "
                     f"({x['faster_by']:.0f}x faster)",
                     f">= {TARGETS['open_faster']:.0f}x faster" if f32 else "reported",
                     verdict(x["faster_by"], TARGETS["open_faster"]) if f32 else "-", cmd))
    return rows


def probe_rows(n: dict, cmd: str) -> list:
    return [("probe training: ccs.py train (CCS 10 restarts, every layer, every baseline) vs a "
             "naive per-layer, per-restart AdamW loop (CCS only)",
             f"{n['speedup_wall']:.1f}x wall ({n['slow_s']:.1f} s vs {n['fast_s']:.1f} s), "
             f"{n['speedup_cpu']:.1f}x CPU; "
             f"held-out CCS accuracy {n['acc_fast_mean']:.3f} vs {n['acc_slow_mean']:.3f}",
             f">= {TARGETS['probes_speedup']:.0f}x wall",
             verdict(n["speedup_wall"], TARGETS["probes_speedup"]), cmd),
            ("probe training: ccs.py train alone (the issue's budget is for 3270 pairs x 576 x 31 "
             "layers)",
             f"{n['fast_s']:.1f} s wall ({n['fast_cpu']:.1f} s CPU)",
             f"<= {TARGETS['probes_seconds']:.0f} s wall",
             verdict(n["fast_s"], TARGETS["probes_seconds"], larger=False), cmd)]


def generate_rows(r: dict, cmd: str) -> list:
    rows = []
    for x in r["rows"]:
        b8 = x["batch"] == 8
        rows.append((f"greedy decoding tokens/s vs transformers generate, batch {x['batch']}, "
                     f"{x['new_tokens']} new tokens",
                     f"{x['speedup']:.2f}x ({x['ours_tok_s']:.1f} vs {x['hf_tok_s']:.1f} tok/s); "
                     f"{x['rows_agree']}/{x['batch']} rows token-identical",
                     f">= {TARGETS['generate_speedup_b8']}x" if b8 else "reported",
                     verdict(x["speedup"], TARGETS["generate_speedup_b8"]) if b8 else "-", cmd))
    s = r["sweep"]
    rows.append((f"steering sweep cost per item ({s['grid']}, {s['prompt_tokens']}-token prompt)",
                 f"positions all {s['all']:.2f} s, generated {s['generated']:.2f} s; naive "
                 f"(a full forward per layer x multiplier) {s['naive']:.2f} s",
                 "reported", "-", cmd))
    return rows


def probe70_rows(r: dict, cmd: str) -> list:
    rows = []
    for key, x in r.items():
        goal = {"81": ("probes70_gib", "probes70_s"), "9": ("probes9_gib", "probes9_s")}.get(key)
        gib = x["peak_rss_mib"] / 1024
        ok = "-"
        if goal:
            ok = verdict(max(gib / TARGETS[goal[0]], x["wall_s"] / TARGETS[goal[1]]), 1.0, False)
        rows.append((f"probe training streamed from a 70B-shaped bfloat16 cache, {x['layers']} "
                     "layers, default methods, CCS 10 restarts",
                     f"{x['wall_s']:.0f} s wall ({x['per_layer_s']:.1f} s a layer), peak RSS "
                     f"{gib:.2f} GiB (load average {x['load_before']:.1f} before)",
                     f"<= {TARGETS[goal[0]]} GiB and {TARGETS[goal[1]]:.0f} s" if goal else
                     "reported", ok, cmd))
    return rows


def serve_rows(r: dict, cmd: str) -> list:
    rows = []
    for x in r["rows"]:
        many = x["clients"] == 16
        rows.append((f"serving: {x['requests']} greedy completions of "
                     f"{r['settings']['new']} tokens, {x['clients']} concurrent client(s), "
                     "tokens/s vs one at a time",
                     f"{x['vs_sequential']:.2f}x ({x['tokens_per_s']:.1f} tok/s); latency p50 "
                     f"{x['p50_s']:.2f} s, p95 {x['p95_s']:.2f} s",
                     f">= {TARGETS['serve_speedup_16']}x" if many else "reported",
                     verdict(x["vs_sequential"], TARGETS["serve_speedup_16"]) if many else "-",
                     cmd))
    p = r["probe"]
    rows.append(("serving: the cost of `probe: true` (a linear probe read-out every token), "
                 "16 clients",
                 f"{r['probe_ms_per_token']:+.2f} ms per token ({p['tokens_per_s']:.1f} tok/s)",
                 "reported", "-", cmd))
    return rows


def cell(s: str) -> str:
    return str(s).replace("|", "\\|")


def main(quick: bool, threads: int) -> int:
    if threads < 1:
        raise LlamaError(f"--threads {threads}: give at least 1")
    size = SIZES["quick" if quick else "full"]
    t0, load0 = time.time(), os.getloadavg()
    rows, details, failed = [], [], False
    with tempfile.TemporaryDirectory(prefix="bench-all-", dir=os.environ.get("BENCH_TMP")) as tmp:
        probes = size["probes"] + ["--threads", str(threads)]
        if quick:
            quick_cache(os.path.join(tmp, "probe-cache"))
            probes += ["--cache", os.path.join(tmp, "probe-cache")]
        plan = (("bench_extract.py", size["extract"] + ["--threads", str(threads)], extract_rows),
                ("bench_cache.py", size["cache"], cache_rows),
                ("bench_probes.py", probes, probe_rows),
                ("bench_generate.py", size["generate"] + ["--threads", str(threads)],
                 generate_rows),
                ("bench_probes_70b.py", size["probes_70b"] + ["--threads", str(threads)]
                 + ["--dir", os.environ.get("BENCH_TMP") or tempfile.gettempdir()], probe70_rows),
                ("bench_serve.py", size["serve"] + ["--threads", str(threads)], serve_rows))
        for script, args, table in plan:
            data, out, cmd, err = bench(script, args, threads, tmp)
            details.append((cmd, out))
            try:
                if err:
                    raise RuntimeError(err)
                rows += table(data, f"`{cmd}`")
            except (RuntimeError, ValueError, KeyError) as e:
                failed = True
                rows.append((script, f"failed: {e}", "runs", "**no**", f"`{cmd}`"))
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    load1 = os.getloadavg()
    lines = [
        "# Benchmarks" + (" (--quick: a smoke check; the numbers mean little)" if quick else ""),
        "",
        f"`python bench/run_all.py{' --quick' if quick else ''} --threads {threads}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}, "
        f"{time.time() - t0:.0f} s. Machine: {cpu}, {os.cpu_count()} CPUs, "
        f"load average {load0[0]:.1f} at the start and "
        f"{load1[0]:.1f} at the end (other jobs slow wall clock; CPU seconds are less disturbed); "
        f"python {platform.python_version()}, torch {torch.__version__}, {threads} threads. "
        "Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32); "
        "prompts: BoolQ validation contrast pairs.",
        "",
        "| benchmark | measured | target | pass | command |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {' | '.join(cell(c) for c in r)} |" for r in rows),
        "",
        "FLOPs counted (bench_extract.py): 2 per block weight per token actually run "
        "(a contrast pair's shared prefix once, padding not), plus causal attention, "
        "4 x n_heads x head_dim per (query, key) pair, in every block up to the deepest layer "
        "asked; not embedding lookups, norms, rotary, softmax or padded positions.",
        "",
        "## Each benchmark's own output",
    ]
    for cmd, out in details:
        lines += ["", f"`{cmd}`", "", out.strip() or "(nothing printed)"]
    text = "\n".join(lines) + "\n"
    path = os.path.join(BENCH, "RESULTS-quick.md" if quick else "RESULTS.md")
    if not quick and os.path.isfile(path):  # bench_serve --engine native,vllm's rows: kept
        with open(path) as f:
            old = f.read()
        if ENGINES_HEAD in old:
            text += "\n" + old[old.index(ENGINES_HEAD):]
    with open(path, "w") as f:
        f.write(text)
    print("\n" + text)
    return 1 if failed else 0


# The section of RESULTS.md that bench_serve.py --engine native,vllm's rows go in, by hand (it
# needs the .venv-vllm/ of make setup-vllm, which this script does not): a rerun keeps it.
ENGINES_HEAD = "## Serving engines side by side"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every benchmark")
    a = ap.parse_args()
    sys.exit(cli(main, a.quick, a.threads))
