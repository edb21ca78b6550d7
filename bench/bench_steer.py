"""What the capability cost adds to a steering sweep, side by side in one run: scripts/steer.py's
sweep (steering/sweep.py: 3 layers x 5 multipliers, residual scale, positions all) on --items
held-out A/B items of the evaluation-awareness set, with and without --capability (the built-in
12 neutral sentences: nll_delta for every layer x multiplier), SmolLM2-135M-Instruct, float32.
Random directions (the cost does not depend on the direction). Each repeat times the sweep, then
the same sweep's capability pass alone (what --capability adds: it runs once per sweep, so its
share per item falls as the item count grows); the best of --repeats is reported, per item.

    python bench/bench_steer.py [--items 20] [--threads 2] [--repeats 2] [--json PATH]
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "datasets")

from llama.dist import setup
from llama.generation import Generator
from llama.gguf import default_model_path
from steering.capability import NEUTRAL
from steering.items import read_items
from steering.scale import unit_norms
from steering.sweep import Settings, Sweep, run


def main(n_items, threads, repeats, json_path):
    torch.set_num_threads(threads)
    gen = Generator.build(str(default_model_path()), setup(1, "cpu"))
    items = read_items(os.path.join(SHARED, "eval_awareness", "contrastive_dataset.json"))
    items = items[-n_items:]
    layers, mults = [6, 14, 22], [-1.0, -0.5, 0.0, 0.5, 1.0]
    g = torch.Generator().manual_seed(0)
    vecs = {l: torch.randn(gen.model.params.dim, generator=g) for l in layers}
    times = {"without": [], "capability": []}
    units = unit_norms(gen.model, gen.tokenizer, "", layers)  # no file: the neutral prompts'
    for _ in range(repeats):  # alternated: both parts see the same machine load
        sweep = Sweep(gen, vecs, Settings(layers, mults, scale="residual"), units=units)
        t0 = time.perf_counter()
        run(sweep, items, log=lambda line: None)
        t1 = time.perf_counter()
        sweep.cfg.capability = list(NEUTRAL)  # the same sweep, its capability pass alone
        sweep.capability()
        times["without"].append(t1 - t0)
        times["capability"].append(time.perf_counter() - t1)
    best = {k: min(v) for k, v in times.items()}
    best["with"] = best["without"] + best["capability"]
    out = dict(threads=threads, items=n_items, grid=f"{len(layers)} layers x {len(mults)} "
               "multipliers", capability_texts=len(NEUTRAL),
               per_item_without_s=best["without"] / n_items,
               per_item_with_s=best["with"] / n_items,
               capability_pass_s=best["capability"])
    print(f"steering sweep ({out['grid']}, {n_items} items, {threads} threads): "
          f"{out['per_item_without_s']:.2f} s/item without --capability, "
          f"{out['per_item_with_s']:.2f} s/item with it (the capability pass: "
          f"{out['capability_pass_s']:.1f} s per sweep, {len(NEUTRAL)} texts)", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the numbers here")
    a = ap.parse_args()
    main(a.items, a.threads, a.repeats, a.json)
