"""Extraction throughput against Hugging Face transformers' output_hidden_states, side by side in one
run: the same GGUF weights (SmolLM2-135M-Instruct), the same BoolQ contrast pairs and token ids, float32,
the same threads and batch budget. transformers is used well: prompts sorted by length, batched,
right-padded with an attention mask, logits_to_keep=1, the states gathered at each row's last real
token; it runs every block whatever is asked (output_hidden_states has no early exit). Ours runs each
pair's shared prefix once and stops at the deepest layer asked. Times are the best of a few
alternated repeats, wall clock and CPU seconds of this process (CPU time is less disturbed by other
work on a shared machine). Then peak RSS of whole extraction runs (one process each) at 1x and 10x
the prompts.

    python bench/bench_extract.py [--pairs 48] [--rss_pairs 20] [--threads 2] [--max_batch_tokens 2048] [--repeats 3]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BOOLQ = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "boolq", "validation.json")

from llama.cache import ActivationCache  # noqa: E402
from llama.extract import read_prompts, run  # noqa: E402


def boolq_pairs(path: str, n: int) -> str:
    import generate_dataset

    generate_dataset.main(path, input=BOOLQ, format="boolq", limit=n, seed=0)
    return path


def hf_extract(model, seqs, layers, max_batch_tokens: int) -> np.ndarray:
    """Every prompt's last-token state at `layers` ([prompts, layers, dim]), transformers batched."""
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
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states
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


def main(pairs: int, rss_pairs: int, threads: int, max_batch_tokens: int, repeats: int) -> None:
    from transformers import AutoModelForCausalLM

    from llama.checkpoint import load_model
    from llama.dist import setup
    from llama.gguf import default_model_path
    from llama.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    gguf = str(default_model_path())
    tmp = tempfile.mkdtemp(prefix="bench-extract-", dir=os.environ.get("BENCH_TMP"))
    data = boolq_pairs(os.path.join(tmp, "pairs.csv"), pairs)
    d = setup(mp=1, device="cpu")
    ours = load_model(gguf, d, "float32")
    tok = load_tokenizer(ours.tokenizer_path)
    prompts = read_prompts(data)
    seqs = [tok.encode(t, bos=True) for side in prompts.texts for t in side]
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                              dtype=torch.float32).eval()
    n_layers = ours.args.n_layers
    # warm both up
    hf_extract(hf, seqs[:4], [1], max_batch_tokens)
    run(ours, data, os.path.join(tmp, "warm"), layers="1", max_batch_tokens=max_batch_tokens)

    table = []
    for name, layers in (("all layers", list(range(n_layers + 1))), ("layers up to the middle", list(range(n_layers // 2 + 1)))):
        out = os.path.join(tmp, f"cache-{len(layers)}")
        best = {"hf": [float("inf")] * 2, "ours": [float("inf")] * 2}  # [wall s, CPU s]
        for _ in range(repeats):  # alternated, best of each: the machine may be shared
            for who in ("hf", "ours"):
                t, c = time.perf_counter(), time.process_time()
                if who == "hf":
                    ref = hf_extract(hf, seqs, layers, max_batch_tokens)
                else:
                    run(ours, data, out, layers=f"0-{layers[-1]}", max_batch_tokens=max_batch_tokens, overwrite=True)
                best[who] = [min(best[who][0], time.perf_counter() - t), min(best[who][1], time.process_time() - c)]
        c = ActivationCache(out)
        mid = len(layers) // 2
        got = np.concatenate([c.array(layers[mid], s) for s in c.sides])  # prompts ordered side by side
        diff = np.abs(got - ref[:, mid]).max() / np.abs(ref[:, mid]).max()
        table.append((name, len(layers), len(seqs), sum(map(len, seqs)), *best["hf"], *best["ours"], diff))

    rss = []
    for mult in (1, 10):
        f = boolq_pairs(os.path.join(tmp, f"rss-{mult}.csv"), rss_pairs * mult)
        out = os.path.join(tmp, f"rss-cache-{mult}")
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "cache_activations.py"), "--model", gguf, "--data", f,
               "--output", out, "--max_batch_tokens", str(max_batch_tokens)]
        mib, secs = peak_rss(cmd, threads)
        size = sum(os.path.getsize(os.path.join(r, x)) for r, _, xs in os.walk(out) for x in xs) / 2 ** 20
        rss.append((rss_pairs * mult, mib, secs, size))

    print(f"\n`python bench/bench_extract.py --pairs {pairs} --rss_pairs {rss_pairs} --threads {threads} "
          f"--max_batch_tokens {max_batch_tokens} --repeats {repeats}` (best of {repeats}; SmolLM2-135M-Instruct Q4_1 GGUF dequantised to float32, "
          f"BoolQ contrast pairs, last token, {threads} threads, torch {torch.__version__})\n")
    print("| layers saved | prompts | tokens | transformers wall s / CPU s | ours wall s / CPU s | speed-up wall / CPU | max rel diff (middle layer) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, nl, n, ntok, a, ac, b, bc, diff in table:
        print(f"| {name} ({nl}) | {n} | {ntok} | {a:.1f} / {ac:.1f} | {b:.1f} / {bc:.1f} | {a / b:.2f}x / {ac / bc:.2f}x | {diff:.1e} |")
    print("\n| contrast pairs | peak RSS MiB | wall s (load included) | cache MiB |")
    print("| --- | --- | --- | --- |")
    for n, mib, secs, size in rss:
        print(f"| {n} | {mib:.0f} | {secs:.1f} | {size:.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--rss_pairs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max_batch_tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    main(**vars(ap.parse_args()))
