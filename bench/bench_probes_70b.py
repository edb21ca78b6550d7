"""Probe training streams: a Llama-3.3-70B-shaped contrast cache (3270 pairs x 8192 dims x 81
layers, bfloat16, 8.1 GiB on disk) trained with the default methods and 10 CCS restarts, in a
child process whose peak RSS and wall time are measured, for 9 layers (the seed workflow's
10,20,23,25,30,40,50,60,70), 31 layers and all 81.

    python bench/bench_probes_70b.py [--dir /tmp] [--threads 2] [--sets 9,31,81] [--n 3270]
                                     [--dim 8192] [--json PATH]

The cache is written under --dir (its free space is checked first) and deleted afterwards.
Targets (issue 10): all 81 layers under 4 GiB peak RSS and 10 minutes on 2 cores; the nine layers
no slower than 59 s and under 3.3 GiB (the figures before streaming, on a busy machine).
"""
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from json import dump, loads  # main's --json flag takes the name json

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from activations.cache import FORMAT, info_file, layer_dir, meta_file, side_file, write_json
from llama.cli import command
from llama.errors import LlamaError

NINE = "10,20,23,25,30,40,50,60,70"
CHILD = """
import json, resource, sys, time
import torch
import probes.commands as ccs
from probes.solvers import Settings
torch.set_num_threads({threads})
t = time.time()
ccs.train({cache!r}, {out!r}, layers={layers!r}, fit=Settings(restarts=10, threads={threads}))
print(json.dumps({{"wall_s": time.time() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def synthetic(path: str, n: int, dim: int, layers: int, seed: int = 0) -> None:
    """A contrast cache in this project's format, written layer by layer (never all in memory): a
    truth direction whose strength peaks at the middle layers, a label-free common part, noise."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(dim).astype(np.float32)
    t /= np.linalg.norm(t)
    y = (rng.random(n) < 0.62).astype(np.int64)
    sgn = (2 * y - 1).astype(np.float32)[:, None]
    for layer in range(layers):
        strength = 0.6 * math.exp(-(((layer - layers / 2) / (layers / 4)) ** 2))
        common = rng.standard_normal((n, dim), dtype=np.float32)
        os.makedirs(layer_dir(path, layer), exist_ok=True)
        for side, s in (("plus", 1.0), ("minus", -1.0)):
            noise = 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
            np.save(side_file(path, layer, side),
                    bf16(common + noise + s * strength * sgn * t))
    meta = {"format": FORMAT, "labels": y.tolist(), "ids": list(range(n)), "token": "last",
            "dtype": "bfloat16", "complete": True,
            "model": {"fingerprint": "synthetic-70b", "path": "synthetic-70B-shape"}}
    write_json(meta_file(path), meta)
    write_json(info_file(path),
               {"layers": list(range(layers)), "num_examples": n, "hidden_dim": dim,
                "dtype": "bfloat16", "token": "last", "sides": ["plus", "minus"]})


def train(cache: str, out: str, layers: str, threads: int) -> dict:
    code = CHILD.format(root=ROOT, cache=cache, out=out, layers=layers, threads=threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if p.returncode:
        raise LlamaError(f"training {layers} layers failed (exit {p.returncode}): "
                         + (p.stderr.strip().splitlines() or ["?"])[-1])
    return loads(p.stdout.strip().splitlines()[-1])


def main(dir: str = "/tmp", threads: int = 2, sets: str = "9,31,81", n: int = 3270,
         dim: int = 8192, json: str = None):
    """Write the 70B-shaped cache, train on each layer set, report time per layer and peak RSS.

    dir: where the temporary cache goes (needs n x dim x 81 layers x 2 sides x 2 bytes free)
    threads: torch threads and probe workers
    sets: layer sets to train: 9 (the seed workflow's layers), 31 (0-30) and/or 81 (all)
    n: contrast pairs
    dim: hidden size
    json: also write the numbers there
    """
    need = n * dim * 81 * 2 * 2
    free = shutil.disk_usage(dir).free
    if free < need * 1.2:
        raise LlamaError(f"--dir {dir}: {free / 2**30:.1f} GiB free, the cache needs "
                         f"{need / 2**30:.1f} GiB")
    specs = {"9": NINE, "31": "0-30", "81": "all"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-70b-", dir=dir) as tmp:
        cache = os.path.join(tmp, "cache")
        t = time.time()
        synthetic(cache, n, dim, 81)
        print(f"wrote a {n} x {dim} x 81-layer bfloat16 contrast cache "
              f"({need / 2**30:.1f} GiB) in {time.time() - t:.0f} s", flush=True)
        for key in str(sets).split(","):
            load = os.getloadavg()[0]
            r = train(cache, os.path.join(tmp, f"run{key}"), specs[key], int(threads))
            count = int(key)
            r.update(layers=count, per_layer_s=r["wall_s"] / count, load_before=load)
            results[key] = r
            print(f"{count:2d} layers: {r['wall_s']:.0f} s wall ({r['per_layer_s']:.1f} s per "
                  f"layer), peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB, load average {load:.1f} "
                  "before", flush=True)
    print("command: python bench/bench_probes_70b.py " + " ".join(sys.argv[1:]))
    if json:
        with open(json, "w") as f:
            dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    command(main)
