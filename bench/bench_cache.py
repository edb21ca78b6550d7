"""Cache size on disk and time to open one layer: our cache (one memory-mapped array per layer and
side) against the seed tool's format (one float64 .npy per example and side holding every layer).

    python bench/bench_cache.py [--n 1000] [--dim 576] [--layers 31] [--json PATH]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from activations.cache import ActivationCache, save_cache


def disk_bytes(root: str) -> int:
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            total += os.stat(os.path.join(d, f)).st_blocks * 512
    return total


def drop_page_cache(root: str) -> None:
    """Ask the kernel to forget the files' pages, so opening them is measured cold where
    allowed."""
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def best_cold(root: str, read, repeats: int = 3):
    """(seconds, result) of the fastest of `repeats` calls of read(), the page cache of root
    dropped before each."""
    best = float("inf")
    for _ in range(repeats):
        drop_page_cache(root)
        t = time.perf_counter()
        out = read()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(n: int, dim: int, layers: int) -> list:
    rng = np.random.default_rng(0)
    acts = {L: {s: rng.standard_normal((n, dim), dtype=np.float32) for s in ("plus", "minus")}
            for L in range(layers)}
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        seed = os.path.join(tmp, "seed")
        os.makedirs(seed)
        for i in range(n):
            for s in ("plus", "minus"):
                np.save(os.path.join(seed, f"{i}_{s}.npy"),
                        np.stack([acts[L][s][i] for L in range(layers)]).astype(np.float64))
        seed_bytes = disk_bytes(seed)
        layer = layers // 2
        seed_open, seed_layer = best_cold(
            seed,
            lambda: np.stack([np.load(os.path.join(seed, f"{i}_plus.npy"))[layer]
                              for i in range(n)]))
        per = seed_bytes / (n * 2 * layers)
        rows.append(("seed tool: float64 .npy per example", per, 1.0, seed_open, 1.0))
        for dtype in ("float32", "bfloat16"):
            path = os.path.join(tmp, dtype)
            save_cache(path, acts, {"labels": [int(i % 2) for i in range(n)]}, dtype=dtype)
            b = disk_bytes(path)
            # np.array: a float32 cache maps in place; reading every byte makes it the same work
            # as the seed's
            dt, ours = best_cold(path,
                                 lambda: np.array(ActivationCache(path).array(layer, "plus")))
            assert np.allclose(ours, seed_layer, atol=0.02 * np.abs(seed_layer).max())
            p = b / (n * 2 * layers)
            rows.append((f"llama-ccs cache, {dtype}", p, per / p, dt, seed_open / dt))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--layers", type=int, default=31)
    ap.add_argument("--json", help="also write the rows here, for bench/run_all.py")
    a = ap.parse_args()
    rows = main(a.n, a.dim, a.layers)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "dim": a.dim, "layers": a.layers, "rows": [
                dict(zip(("format", "bytes_per_row", "smaller_by", "open_s", "faster_by"), r))
                for r in rows]}, f, indent=1)
    print(f"{a.n} contrast pairs x {a.layers} layers x dim {a.dim}; open = read layer "
          f"{a.layers // 2} (plus side) into memory as float32, page cache dropped first where "
          "allowed, best of 3")
    print("| format | bytes on disk per example per layer per side | smaller by "
          "| open one layer (s) | faster by |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, per, ratio, t, speed in rows:
        print(f"| {name} | {per:,.0f} | {ratio:.1f}x | {t:.3f} | {speed:.0f}x |")
