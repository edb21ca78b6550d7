"""Serving throughput: the same greedy requests (SmolLM2, --new tokens each, end tokens ignored so
every request decodes exactly that many) sent by 1, 4 and 16 concurrent clients to one server
(scripts/serve.py in a subprocess, --max_batch 16, --threads threads), in one run. Reported per
concurrency: completion tokens/s over the wall time, p50/p95 request latency, and tokens/s as a
ratio to 1 client (the requests served one at a time). Then the cost of `probe: true` (a random
linear probe at layer 15) per generated token, at 16 clients.

    python bench/bench_serve.py [--new 64] [--threads 2] [--requests 16] [--json PATH]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from llama.gguf import default_model_path

PROMPTS = [
    "The history of the printing press begins",
    "Here is a short recipe for bread:",
    "Photosynthesis is the process by which plants",
    "Write a haiku about the sea.",
    "The three largest cities in Europe are",
    "In mathematics, a prime number is",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "The main causes of the French Revolution were",
]


def start(threads: int, probe: str) -> tuple:
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--model",
           str(default_model_path()), "--port", "0", "--threads", str(threads), "--max_batch",
           "16", "--probe", probe, "--probe_layer", "15"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    for line in proc.stdout:
        m = re.search(r"serving \S+ on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit("the server did not start")


def probe_file(folder: str) -> str:
    from safetensors.numpy import save_file

    w = np.random.default_rng(0).standard_normal((1, 1, 576)).astype(np.float32) / 100
    path = os.path.join(folder, "lr.safetensors")
    save_file({"w_raw": w, "b_raw": np.zeros(1, np.float32), "layers": np.array([15])}, path)
    with open(os.path.join(folder, "lr.json"), "w") as f:
        json.dump({"method": "lr"}, f)
    return path


def run(url: str, clients: int, n: int, new: int, probe: bool) -> dict:
    def one(i):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new, "temperature": 0,
                "ignore_eos": True, "probe": probe}
        t = time.perf_counter()
        with httpx.Client(base_url=url, timeout=3600) as http:
            r = http.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t
    lat = [d for d, _ in done]
    tokens = sum(k for _, k in done)
    return {"clients": clients, "requests": n, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": float(np.percentile(lat, 50)),
            "p95_s": float(np.percentile(lat, 95))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if min(a.new, a.threads, a.requests) < 1:
        raise SystemExit("error: --new, --threads and --requests must be positive")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(a.threads, probe_file(tmp))
        try:
            run(url, 1, 1, 4, False)  # warm-up
            rows = [run(url, c, a.requests, a.new, False) for c in (1, 4, 16)]
            probed = run(url, 16, a.requests, a.new, True)
        finally:
            proc.terminate()
            proc.wait()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_sequential"] = r["tokens_per_s"] / base
    probe_ms = (probed["wall_s"] - rows[2]["wall_s"]) / probed["tokens"] * 1000
    out = {"rows": rows, "probe": probed, "probe_ms_per_token": probe_ms,
           "settings": vars(a)}
    print(f"{'clients':>8} {'tokens/s':>9} {'x seq':>6} {'p50 s':>7} {'p95 s':>7}")
    for r in rows:
        print(f"{r['clients']:>8} {r['tokens_per_s']:>9.1f} {r['vs_sequential']:>6.2f} "
              f"{r['p50_s']:>7.2f} {r['p95_s']:>7.2f}")
    print(f"probe: true at 16 clients: {probed['tokens_per_s']:.1f} tokens/s, "
          f"{probe_ms:+.2f} ms per token")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
