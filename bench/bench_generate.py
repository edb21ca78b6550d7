"""Greedy decoding throughput against Hugging Face transformers' generate, side by side in one run:
the same GGUF weights (SmolLM2-135M-Instruct, dequantised to float32), the same prompt token ids,
threads and dtype, batch 1 and batch 8, a fixed number of new tokens (end tokens ignored on both
sides, so both decode exactly --new tokens). transformers runs its own KV cache with left padding
and an attention mask (its recommended batched setup); ours prefills right-padded prompts and
decodes each row at its own position in a preallocated cache. Times are the best of --repeats
alternated runs, wall clock. Also: how many rows' tokens agree between the two.

Then the cost of a steering sweep per item (steering/sweep.py's Sweep: 3 layers x 5 multipliers on
one A/B item of the evaluation-awareness set): positions all (prefix shared up to the first
steered layer, multipliers batched), positions generated (the prompt's keys and values shared),
against the naive sweep (one full forward per layer x multiplier).

    python bench/bench_generate.py [--new 64] [--threads 2] [--repeats 3] [--json PATH]
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
from llama.generation import Generator, Sampling
from llama.gguf import default_model_path
from llama.model import Steer

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


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def hf_generate(hf, ids, new):
    """transformers' greedy tokens for a batch of prompt ids (left-padded, masked)."""
    n = max(map(len, ids))
    batch = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for b, p in enumerate(ids):
        batch[b, n - len(p):] = torch.tensor(p)
        mask[b, n - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0)
    return [row[n:].tolist() for row in out]


def sweep_cost(gen, repeats):
    from steering.items import read_items
    from steering.sweep import Settings, Sweep

    item = read_items(os.path.join(SHARED, "eval_awareness", "contrastive_dataset.json"), 1)[0]
    layers, mults = [8, 14, 20], [-4.0, -2.0, 0.0, 2.0, 4.0]
    g = torch.Generator().manual_seed(0)
    vecs = {l: torch.randn(gen.model.params.dim, generator=g) for l in layers}
    out = {}
    for positions in ("all", "generated"):
        sweep = Sweep(gen, vecs, Settings(layers, mults, positions))
        ids, pair, _ = sweep.prompt(item)
        out[positions], _ = best_of(lambda: sweep.score(ids, pair), repeats)
    tokens = torch.tensor([ids])

    def naive():
        for l in layers:
            for m in mults:
                gen.model(tokens, layers=[], logits=True, steer=Steer({l: vecs[l]}, m))
    out["naive"], _ = best_of(naive, repeats)
    out["prompt_tokens"] = len(ids)
    out["grid"] = f"{len(layers)} layers x {len(mults)} multipliers"
    return out


def main(new, threads, repeats, json_path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    path = default_model_path()
    gen = Generator.build(str(path), setup(1, "cpu"))
    gen.stop = []  # fixed-length decoding on both sides
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    ids = [gen.tokenizer.encode(p, bos=True) for p in PROMPTS]
    cfg = Sampling(max_gen_len=new)
    rows = []
    for batch in (1, 8):
        part = ids[:batch]
        ours_runs, hf_runs = [], []
        for _ in range(repeats):  # alternated, so both see the same machine load
            ours_runs.append(best_of(lambda: gen.generate(part, cfg), 1))
            hf_runs.append(best_of(lambda: hf_generate(hf, part, new), 1))
        ours_s, ours_out = min(ours_runs, key=lambda r: r[0])
        hf_s, hf_out = min(hf_runs, key=lambda r: r[0])
        agree = sum(o[0] == h for o, h in zip(ours_out, hf_out))
        rows.append(dict(batch=batch, new_tokens=new, ours_s=ours_s, hf_s=hf_s,
                         ours_tok_s=batch * new / ours_s, hf_tok_s=batch * new / hf_s,
                         speedup=hf_s / ours_s, rows_agree=agree))
        print(f"batch {batch}: ours {batch * new / ours_s:.1f} tok/s, transformers "
              f"{batch * new / hf_s:.1f} tok/s ({hf_s / ours_s:.2f}x); {agree}/{batch} rows "
              "with identical greedy tokens", flush=True)
    cost = sweep_cost(gen, repeats)
    print(f"steering sweep per item ({cost['grid']}, {cost['prompt_tokens']}-token prompt): "
          f"positions all {cost['all']:.2f} s, generated {cost['generated']:.2f} s, naive "
          f"(one full forward each) {cost['naive']:.2f} s", flush=True)
    result = dict(threads=threads, rows=rows, sweep=cost)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the numbers here")
    a = ap.parse_args()
    main(a.new, a.threads, a.repeats, a.json)
