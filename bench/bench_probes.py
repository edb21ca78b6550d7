"""CCS with 10 restarts on every layer plus every baseline (ccs.py train), against a
straightforward per-layer, per-restart Adam loop as public CCS code writes it, on one cache of the
issue's shape.

    python bench/bench_probes.py [--cache DIR] [--naive_layers all] [--threads 2] [--restarts 10]
        [--steps 1000] [--json PATH]

Without --cache it writes a synthetic contrast cache of 3270 pairs x 576 dims x 31 layers (BoolQ
validation through the default model has this shape): a truth direction whose strength rises and
falls with depth, a stronger label-free distractor, per-side answer offsets and an outlier
dimension. The naive loop: for each layer and each of --restarts restarts (also ccs.py's), a fresh
nn.Linear(576, 1) + sigmoid trained with AdamW (lr 1e-3, weight decay 0.01) for --steps full-batch
steps on the same train-only normalised features, keeping the restart with the lowest loss (NaN
counts as the worst: a zero-variance feature gives NaN everywhere). Both are scored on the same
held-out split as max(acc, 1 - acc). --naive_layers K times it on K evenly spaced layers and scales
to all (said so).
--json PATH also writes the numbers printed at the end.
--threads: the naive loop's torch threads and ccs.py's workers (chunks of layers, each
single-threaded). On a machine shared with other jobs a second torch thread of the naive loop
mostly waits (use --threads 1 there) and wall times mean little: read the CPU seconds, which other
jobs barely change.
"""
import math
import os
import sys
import tempfile
import time
from json import dump  # main's --json flag takes the name json

import numpy as np
import pandas as pd
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import probes.commands as ccs
from activations.cache import save_cache
from llama.cli import command
from probes import data
from probes.solvers import Settings

N, D, L = 3270, 576, 31


def synthetic(path, seed=0):
    rng = np.random.default_rng(seed)
    t, u = np.linalg.qr(rng.standard_normal((D, 2)))[0].T
    y = (rng.random(N) < 0.62).astype(np.int64)  # BoolQ is 62% true
    sgn = (2 * y - 1)[:, None]
    arrays = {}
    for l in range(L):
        # the truth is clearest in the middle layers
        strength = 0.6 * np.exp(-(((l - 16) / 7) ** 2))
        common = (rng.standard_normal((N, D), dtype=np.float32)
                  + 2.0 * rng.standard_normal((N, 1), dtype=np.float32) * u)
        plus = (common + strength * sgn * t + 0.5 * rng.standard_normal((N, D), dtype=np.float32)
                + 0.3)
        minus = (common - strength * sgn * t + 0.5 * rng.standard_normal((N, D), dtype=np.float32)
                 - 0.3)
        plus[:, 507] += 1000
        minus[:, 507] += 1000
        arrays[l] = {"plus": plus, "minus": minus}
    lp = np.stack([0.3 * sgn[:, 0] + rng.standard_normal(N), np.zeros(N)], 1)
    save_cache(path, arrays, {"labels": y.tolist(), "model": {"fingerprint": "synthetic"}},
               logprobs=lp)


def naive(x, y, tr, te, layers, restarts=10, steps=1000, seed=0):
    """Held-out max(acc, 1 - acc) per layer: one layer, one restart, one Adam loop at a time."""
    torch.manual_seed(seed)
    accs = []
    for i in layers:
        xp, xm = x[i, 0], x[i, 1]
        mp, sp = xp[tr].mean(0), xp[tr].std(0)
        mm, sm = xm[tr].mean(0), xm[tr].std(0)
        zp, zm = (xp - mp) / sp, (xm - mm) / sm
        zpt, zmt = zp[tr], zm[tr]
        best, best_loss = None, math.inf
        for _ in range(restarts):
            probe = torch.nn.Sequential(torch.nn.Linear(D, 1), torch.nn.Sigmoid())
            opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.01)
            for _ in range(steps):
                opt.zero_grad()
                p0, p1 = probe(zpt), probe(zmt)
                loss = ((p0 - (1 - p1)) ** 2).mean() + (torch.min(p0, p1) ** 2).mean()
                loss.backward()
                opt.step()
            last = loss.item() if math.isfinite(loss.item()) else math.inf
            if best is None or last < best_loss:
                best, best_loss = probe, last
        with torch.no_grad():
            s = 0.5 * (best(zp[te]) + 1 - best(zm[te]))[:, 0]
        acc = ((s > 0.5).numpy() == (y[te] == 1)).mean()
        accs.append(max(acc, 1 - acc))
    return np.array(accs)


def main(cache: str = None, naive_layers: str = "all", threads: int = 2, restarts: int = 10,
         steps: int = 1000, json: str = None):
    """Time ccs.py train against the naive loop on one cache.

    cache: a contrast cache (default: write the synthetic one)
    naive_layers: all, or K: time the naive loop on K evenly spaced layers and scale
    threads: the naive loop's torch threads and ccs.py's workers
    restarts: CCS restarts, both
    steps: the naive loop's AdamW steps
    json: also write the numbers there
    """
    torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory() as tmp:
        numbers = run(tmp, cache, naive_layers, int(restarts), int(steps))
    if json:
        with open(json, "w") as f:
            dump(numbers, f, indent=1)


def run(tmp, cache, naive_layers, restarts, steps):
    if cache is None:
        cache = os.path.join(tmp, "cache")
        t = time.time()
        synthetic(cache)
        print(f"wrote a synthetic {N} x {D} x {L}-layer contrast cache in {time.time() - t:.1f} s")
    c = data.open_cache(cache)
    print(f"cache {cache}: {c.num_examples} pairs x {c.hidden_dim} dims x {len(c.layers)} layers, "
          f"{torch.get_num_threads()} threads")

    t, cpu = time.time(), time.process_time()
    ccs.train(cache, os.path.join(tmp, "run"), fit=Settings(seed=0, restarts=restarts))
    fast_s, fast_cpu = time.time() - t, time.process_time() - cpu
    df = pd.read_csv(os.path.join(tmp, "run", "eval.csv"))
    fast = df[df.method == "ccs"].sort_values("layer").accuracy.to_numpy()

    x = data.read(c, c.layers)
    y = data.labels(c)
    part = data.split(y, data.groups(c), 0.25, 0.2, 0, 0)[0]  # ccs.py train's default split
    tr, te = part.fit, part.test
    idx = list(range(len(c.layers)))
    if naive_layers != "all":
        idx = sorted(set(
            np.linspace(0, len(idx) - 1, int(naive_layers)).round().astype(int).tolist()))
    t, cpu = time.time(), time.process_time()
    slow = naive(x, y, tr, te, idx, restarts, steps)
    scale = len(c.layers) / len(idx)
    slow_s, slow_cpu = (time.time() - t) * scale, (time.process_time() - cpu) * scale
    scaled = ("" if len(idx) == len(c.layers)
              else f" (timed on {len(idx)} layers, scaled to {len(c.layers)})")

    print()
    print(f"ccs.py train, CCS {restarts} restarts x {len(c.layers)} layers + every baseline + "
          f"metrics: {fast_s:.1f} s ({fast_cpu:.1f} s CPU)")
    print(f"naive per-layer, per-restart AdamW loop, CCS only{scaled}: {slow_s:.1f} s "
          f"({slow_cpu:.1f} s CPU)")
    print(f"speed-up: {slow_s / fast_s:.1f}x wall, {slow_cpu / fast_cpu:.1f}x CPU "
          "(CPU time: what a machine shared with other jobs still measures)")
    print(f"held-out CCS accuracy, max(acc, 1-acc), mean over the timed layers: "
          f"ccs.py {fast[idx].mean():.3f}, naive {slow.mean():.3f}")
    print(f"  at the best layer: ccs.py {fast[idx].max():.3f} "
          f"(layer {c.layers[idx[int(fast[idx].argmax())]]}), "
          f"naive {slow.max():.3f} (layer {c.layers[idx[int(slow.argmax())]]})")
    print("command: python bench/bench_probes.py " + " ".join(sys.argv[1:]))
    return dict(fast_s=fast_s, fast_cpu=fast_cpu, slow_s=slow_s, slow_cpu=slow_cpu,
                speedup_wall=slow_s / fast_s, speedup_cpu=slow_cpu / fast_cpu,
                acc_fast_mean=float(fast[idx].mean()), acc_slow_mean=float(slow.mean()),
                acc_fast_best=float(fast[idx].max()), acc_slow_best=float(slow.max()))


if __name__ == "__main__":
    command(main)
