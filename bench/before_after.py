"""The same work timed on two versions of this project, side by side in one run: an earlier commit
(--base) and the working tree, each in processes of its own, alternating which goes first in
each round, so that both see the same machine load. A regression shows as a ratio above 1.

    python -m bench.before_after --base COMMIT [--rounds 3] [--threads 2] [--only probes,...]

Work (the same inputs for both versions, written once by this tree's benchmarks):
- probes: ccs.py train (CCS 10 restarts + every baseline) on bench_probes.py's synthetic cache
  (3270 pairs x 576 x 31 layers, float32);
- probes_70b: ccs.py train on 9 layers of bench_probes_70b.py's cache shape (3270 pairs x 8192,
  bfloat16), the seed workflow's layer count;
- decode: greedy decoding of 64 new tokens on SmolLM2 (the default model), batch 1 and 8;
- extract: activations.extract.run on SmolLM2 (loaded before the clock starts), 48 contrast pairs
  sharing a prefix, every token of all 31 layers, float32.
Each figure is the median over rounds of wall seconds and CPU seconds (the process and its
workers); the ratio is new / base.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench import bench_probes, bench_probes_70b
from llama.cli import command
from llama.errors import LlamaError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMED = """
import json, resource, sys, time
import torch
torch.set_num_threads({threads})

def cpu():
    return sum(getattr(resource.getrusage(who), f) for who in
               (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))

out = {{}}
"""
WORK = {
    "probes": """
try:
    import probes.commands as ccs
except ImportError:  # before the package layout: ccs.py at the root
    import ccs
from probes.solvers import Settings
t, c = time.time(), cpu()
ccs.train({cache!r}, {out!r}, fit=Settings(seed=0, restarts=10, threads={threads}))
out["train"] = (time.time() - t, cpu() - c)
""",
    "decode": """
from llama.dist import setup
from llama.generation import Generator, Sampling
from llama.gguf import default_model_path
gen = Generator.build(str(default_model_path()), setup(1, "cpu"))
gen.stop = []
prompts = ["The history of the printing press begins", "A recipe for bread needs",
           "In mathematics, a prime number is", "The capital of France is",
           "Photosynthesis is the process by which", "The best way to learn a language",
           "Once upon a time, in a small village,", "Rivers flow toward the sea because"]
ids = [gen.tokenizer.encode(p, bos=True) for p in prompts]
gen.generate(ids[:1], Sampling(max_gen_len=4))  # warm-up
for batch in (1, 8):
    t, c = time.time(), cpu()
    gen.generate(ids[:batch], Sampling(max_gen_len=64))
    out[f"batch {{batch}}, 64 tokens"] = (time.time() - t, cpu() - c)
""",
    "extract": """
from activations.extract import Extraction, run
from llama.checkpoint import load_model
from llama.dist import setup
from llama.gguf import default_model_path
lm = load_model(str(default_model_path()), setup(1, "cpu"))
t, c = time.time(), cpu()
run(Extraction(str(default_model_path()), {cache!r}, {out!r}, token="all", overwrite=True), lm)
out["48 pairs, all tokens, 31 layers"] = (time.time() - t, cpu() - c)
""",
}
WORK["probes_70b"] = WORK["probes"].replace("fit=", "layers='0-8', fit=")


def inputs(tmp: str, works: list) -> dict:
    """The caches both versions read: {work: cache folder or None}."""
    small, big = os.path.join(tmp, "probes"), os.path.join(tmp, "probes_70b")
    t = time.time()
    if "probes" in works:
        bench_probes.synthetic(small)
    if "probes_70b" in works:
        bench_probes_70b.synthetic(big, 3270, 8192, 9)
    print(f"wrote the synthetic caches in {time.time() - t:.0f} s", flush=True)
    pairs = os.path.join(tmp, "pairs.csv")
    with open(pairs, "w") as f:
        f.write("idx,plus_prompt,minus_prompt,label\n")
        for i in range(48):
            stem = f"Statement {i}: the city number {i * 7 % 31} lies in country {i % 5}."
            f.write(f"p{i},{stem} True,{stem} False,{i % 2}\n")
    return {"probes": small, "probes_70b": big, "decode": None, "extract": pairs}


def timed(tree: str, work: str, cache: str, out: str, threads: int) -> dict:
    """{figure: (wall s, CPU s)} of one run of `work` with `tree` first on the import path."""
    code = TIMED.format(threads=threads) + WORK[work].format(
        cache=cache, out=out, threads=threads) + "print(json.dumps(out))\n"
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True,
                       text=True)
    if p.returncode:
        raise LlamaError(f"{work} in {tree} failed (exit {p.returncode}): "
                         + (p.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(base: str, rounds: int = 3, threads: int = 2, only: str = "probes,probes_70b,decode",
         table: str = None):
    """Time the same work on commit BASE and on the working tree, alternating.

    base: the earlier commit (anything `git archive` takes)
    rounds: runs of each work on each version
    threads: torch threads and probe workers
    only: which work, comma-separated: probes, probes_70b, decode, extract
    table: also write the Markdown table to this file
    """
    works = [w.strip() for w in only.split(",")]
    for w in works:
        if w not in WORK:
            raise LlamaError(f"--only {w!r}: choose from {', '.join(WORK)}")
    with tempfile.TemporaryDirectory(prefix="before-after-") as tmp:
        old = os.path.join(tmp, "base")
        os.makedirs(old)
        archive = subprocess.run(["git", "-C", ROOT, "archive", base], capture_output=True)
        if archive.returncode:
            raise LlamaError(f"--base {base}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        caches = inputs(tmp, works)
        runs = {}  # (work, version) -> [{figure: (wall, cpu)}]
        for r in range(rounds):
            for w in works:
                order = [("base", old), ("new", ROOT)][:: 1 if r % 2 == 0 else -1]
                for version, tree in order:
                    got = timed(tree, w, caches[w], os.path.join(tmp, f"run-{version}"), threads)
                    runs.setdefault((w, version), []).append(got)
                    print(f"round {r + 1} {w} {version}: " + ", ".join(
                        f"{k} {v[0]:.2f} s" for k, v in got.items()), flush=True)
    rows = [f"`python -m bench.before_after --base {base} --rounds {rounds} --threads {threads}`"
            f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
            f"{os.getloadavg()[0]:.1f} at the end; median of {rounds} alternated rounds", "",
            "| work | figure | base wall s / CPU s | new wall s / CPU s | new / base wall, CPU |",
            "| --- | --- | --- | --- | --- |"]
    for w in works:
        for fig in runs[(w, "base")][0]:
            med = {v: [statistics.median(run[fig][i] for run in runs[(w, v)]) for i in (0, 1)]
                   for v in ("base", "new")}
            rows.append(f"| {w} | {fig} | {med['base'][0]:.2f} / {med['base'][1]:.2f} | "
                        f"{med['new'][0]:.2f} / {med['new'][1]:.2f} | "
                        f"{med['new'][0] / med['base'][0]:.2f}, "
                        f"{med['new'][1] / med['base'][1]:.2f} |")
    print("\n".join(rows))
    if table:
        with open(table, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    command(main)
