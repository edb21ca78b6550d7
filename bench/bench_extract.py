"""Extraction throughput against Hugging Face transformers' output_hidden_states, side by side in
one run: the same GGUF weights (SmolLM2-135M-Instruct), the same BoolQ contrast pairs and token
ids, float32, the same threads and batch budget. transformers is used well: prompts sorted by
length, batched, right-padded with an attention mask, logits_to_keep=1, the states gathered at each
row's last real token; it runs every block whatever is asked (output_hidden_states has no early
exit). Ours runs each pair's shared prefix once and stops at the deepest layer asked. Times are the
best of a few alternated repeats, wall clock and CPU seconds of this process (CPU time is less
disturbed by other work on a shared machine). Then peak RSS of whole extraction runs (one process
each) at 1x and 10x the prompts.

Achieved FLOP/s, against this machine's float32 matmul rate (torch.mm of two 2048 x 2048 matrices
at the same threads, best of 5 before the timed runs and 5 after). Counted: 2 FLOPs per block
weight per token actually run (a shared prefix once, padding not), plus causal attention, 4 *
n_heads * head_dim per (query, earlier-or-same key) pair, in every block up to the deepest layer
asked. Not counted: embedding lookups, norms, rotary, softmax, padded positions and the masked half
of the score matrices both libraries compute. transformers' work is counted the same way for the
prompts it runs (every block, no prefix sharing).

    python bench/bench_extract.py [--pairs 48] [--rss_pairs 20] [--threads 2]
        [--max_batch_tokens 2048] [--repeats 3] [--json PATH]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOLQ = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "boolq", "validation.json")

from activations.cache import ActivationCache
from activations.extract import Extraction, plan, read_prompts, run, tokenize


def boolq_pairs(path: str, n: int) -> str:
    import prompts.dataset as generate_dataset

    generate_dataset.main(path, input=BOOLQ, format="boolq", limit=n, seed=0)
    return path


def hf_extract(model, seqs, layers, max_batch_tokens: int) -> np.ndarray:
    """Every prompt's last-token state at `layers` ([prompts, layers, dim]), transformers
    batched."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros((len(seqs), len(layers), model.config.hidden_size), dtype=np.float32)
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(seqs[i]) > max_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    for b in batches:
        n = torch.tensor([len(seqs[i]) for i in b])
        ids = torch.zeros(len(b), int(n.max()), dtype=torch.long)
        for j, i in enumerate(b):
            ids[j, : n[j]] = torch.tensor(seqs[i])
        mask = (torch.arange(ids.shape[1])[None] < n[:, None]).long()
        with torch.inference_mode():
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                       logits_to_keep=1).hidden_states
        rows = torch.arange(len(b))
        out[b] = torch.stack([hs[layer][rows, n - 1] for layer in layers], 1).numpy()
    return out


def peak_rss(cmd, threads: int):
    """(peak RSS in MiB, seconds) of one command, measured on that child alone."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    _, status, usage = os.wait4(p.pid, 0)
    if status:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` float32 n x n matmuls at the current torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def tokens_run(lengths: np.ndarray, shared: np.ndarray) -> int:
    """Tokens through the model: each example's first `shared` tokens once, then every side's
    own."""
    return int(shared.sum() + (lengths - shared[:, None]).sum())


def work(model, args, lengths: np.ndarray, shared: np.ndarray, blocks: int) -> float:
    """FLOPs of running `blocks` blocks over prompts of `lengths` [N, sides], each example's first
    `shared` tokens once (the counting rule is in the module docstring)."""
    weights = sum(w.numel() for name, w in model.named_parameters()
                  if w.dim() == 2 and name.startswith("layers.")
                  and int(name.split(".")[1]) < blocks)
    tokens = tokens_run(lengths, shared)
    pre = shared * (shared + 1) // 2  # (query, key) pairs of the shared prefix
    pairs = pre.sum() + (lengths * (lengths + 1) // 2 - pre[:, None]).sum()
    width = args.n_heads * (args.dim // args.n_heads)
    return float(2 * weights * tokens + 4 * width * pairs * blocks)


def main(pairs: int, rss_pairs: int, threads: int, max_batch_tokens: int, repeats: int,
         json_path=None) -> None:
    from llama.gguf import default_model_path

    torch.set_num_threads(threads)
    gguf = str(default_model_path())
    with tempfile.TemporaryDirectory(prefix="bench-extract-",
                                     dir=os.environ.get("BENCH_TMP")) as tmp:
        res = measure(tmp, gguf, pairs, rss_pairs, threads, max_batch_tokens, repeats)
    res["command"] = (f"python bench/bench_extract.py --pairs {pairs} --rss_pairs {rss_pairs} "
                      f"--threads {threads} --max_batch_tokens {max_batch_tokens} --repeats "
                      f"{repeats}")
    report(res)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)


def measure(tmp, gguf, pairs, rss_pairs, threads, max_batch_tokens, repeats) -> dict:
    from transformers import AutoModelForCausalLM

    from llama.checkpoint import load_model
    from llama.dist import setup
    from llama.tokenizer import load_tokenizer

    data = boolq_pairs(os.path.join(tmp, "pairs.csv"), pairs)
    d = setup(mp=1, device="cpu")
    ours = load_model(gguf, d, "float32")
    tok = load_tokenizer(ours.tokenizer_path)
    prompts = read_prompts(data)
    seqs = [tok.encode(t, bos=True) for side in prompts.texts for t in side]
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf),
                                              gguf_file=os.path.basename(gguf),
                                              dtype=torch.float32).eval()
    n_layers = ours.args.n_layers
    # warm both up
    hf_extract(hf, seqs[:4], [1], max_batch_tokens)
    run(Extraction(str(gguf), data, os.path.join(tmp, "warm"), layers="1",
                   max_batch_tokens=max_batch_tokens), ours)

    p = plan(tokenize(prompts, tok, ours.args.vocab_size, ours.args.max_seq_len), False,
             max_batch_tokens, None)
    peak = matmul_rate()
    res = {"threads": threads, "torch": torch.__version__, "repeats": repeats, "speed": [],
           "rss": []}
    for name, layers in (("all layers", list(range(n_layers + 1))),
                         ("layers up to the middle", list(range(n_layers // 2 + 1)))):
        out = os.path.join(tmp, f"cache-{len(layers)}")
        best = {"hf": [float("inf")] * 2, "ours": [float("inf")] * 2}  # [wall s, CPU s]
        for _ in range(repeats):  # alternated, best of each: the machine may be shared
            for who in ("hf", "ours"):
                t, c = time.perf_counter(), time.process_time()
                if who == "hf":
                    ref = hf_extract(hf, seqs, layers, max_batch_tokens)
                else:
                    run(Extraction(str(gguf), data, out, layers=f"0-{layers[-1]}",
                                   max_batch_tokens=max_batch_tokens, overwrite=True), ours)
                best[who] = [min(best[who][0], time.perf_counter() - t),
                             min(best[who][1], time.process_time() - c)]
        c = ActivationCache(out)
        mid = len(layers) // 2
        # prompts ordered side by side
        got = np.concatenate([c.array(layers[mid], s) for s in c.sides])
        diff = np.abs(got - ref[:, mid]).max() / np.abs(ref[:, mid]).max()
        flops = work(ours.model, ours.args, p.lengths, p.shared, layers[-1])
        hf_flops = work(ours.model, ours.args, p.lengths, np.zeros_like(p.shared), n_layers)
        res["speed"].append({
            "name": name, "layers": len(layers), "prompts": len(seqs), "tokens": p.tokens,
            "tokens_run": tokens_run(p.lengths, p.shared),
            "hf_wall_s": best["hf"][0], "hf_cpu_s": best["hf"][1],
            "ours_wall_s": best["ours"][0], "ours_cpu_s": best["ours"][1],
            "speedup_wall": best["hf"][0] / best["ours"][0],
            "speedup_cpu": best["hf"][1] / best["ours"][1],
            "max_rel_diff": float(diff), "flops": flops, "flops_per_s": flops / best["ours"][0],
            "hf_flops": hf_flops, "hf_flops_per_s": hf_flops / best["hf"][0]})
    # before and after: the better of two moments
    res["matmul_flops_per_s"] = max(peak, matmul_rate())

    for mult in (1, 10):
        f = boolq_pairs(os.path.join(tmp, f"rss-{mult}.csv"), rss_pairs * mult)
        out = os.path.join(tmp, f"rss-cache-{mult}")
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "cache_activations.py"), "--model",
               gguf, "--data", f,
               "--output", out, "--max_batch_tokens", str(max_batch_tokens), "--token", "last"]
        mib, secs = peak_rss(cmd, threads)
        size = sum(os.path.getsize(os.path.join(r, x)) for r, _, xs in os.walk(out)
                   for x in xs) / 2 ** 20
        res["rss"].append({"pairs": rss_pairs * mult, "peak_rss_mib": mib, "wall_s": secs,
                           "cache_mib": size})
    return res


def report(r: dict) -> None:
    g = 1e9
    print(f"\n`{r['command']}` (best of {r['repeats']}; SmolLM2-135M-Instruct Q4_1 GGUF "
          f"dequantised to float32, BoolQ contrast pairs, last token, {r['threads']} threads, "
          f"torch {r['torch']})\n")
    print("| layers saved | prompts | tokens (run once) | transformers wall s / CPU s "
          "| ours wall s / CPU s | speed-up wall / CPU | max rel diff (middle layer) "
          "| GFLOP ours / transformers | GFLOP/s ours / transformers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in r["speed"]:
        print(f"| {x['name']} ({x['layers']}) | {x['prompts']} | {x['tokens']} "
              f"({x['tokens_run']}) | {x['hf_wall_s']:.1f} / {x['hf_cpu_s']:.1f} | "
              f"{x['ours_wall_s']:.1f} / {x['ours_cpu_s']:.1f} | {x['speedup_wall']:.2f}x / "
              f"{x['speedup_cpu']:.2f}x | {x['max_rel_diff']:.1e} | {x['flops'] / g:.0f} / "
              f"{x['hf_flops'] / g:.0f} | {x['flops_per_s'] / g:.1f} / "
              f"{x['hf_flops_per_s'] / g:.1f} |")
    peak = r["matmul_flops_per_s"]
    print(f"\nfloat32 matmul (2048 x 2048, best of 10): {peak / g:.1f} GFLOP/s; ours achieves "
          + ", ".join(f"{x['flops_per_s'] / peak:.0%} ({x['name']})" for x in r["speed"]))
    print("\n| contrast pairs | peak RSS MiB | wall s (load included) | cache MiB |")
    print("| --- | --- | --- | --- |")
    for x in r["rss"]:
        print(f"| {x['pairs']} | {x['peak_rss_mib']:.0f} | {x['wall_s']:.1f} | "
              f"{x['cache_mib']:.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--rss_pairs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max_batch_tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", dest="json_path",
                    help="also write the numbers here, for bench/run_all.py")
    main(**vars(ap.parse_args()))
