"""Steering sweep on an A/B test set: does adding the vector move the model's answer?

    python scripts/steer.py --model PATH --data AB.json --vectors DIR --layers 10,15,20 \\
        --multipliers -4,-2,0,2,4 --output OUT [--positions all|generated] [--ablate] \\
        [--samples K --max_gen_len 16] [--limit N] [--visualize]

AB.json: A/B questions as generate_dataset.py reads them (llama.prompts.read_ab: a JSON list,
JSON lines or CSV of {question, positive, negative} or {question, test, deploy}, the answers
"(A)"/"(B)", the options in any layout it recognises). Each question is rendered as
generate_dataset.py renders A/B items (--chat auto: the model's own chat template, else its chat
family, else "QUESTION\n\nAnswer: "; or --chat NAME), the
answer opened by "(", so the next token is the letter. Use the same --chat as for the vectors. For
each layer x multiplier (Steer: multiplier x vector added to the residual stream at that layer;
with --ablate the direction is removed, multiplier 1 removing it fully) the score of an item is
p(positive letter) / (p(A) + p(B)) at that position, as in CAA (Rimsky et al. 2024); reported is
the mean over items with a bootstrap 95% interval (items resampled), and the unsteered baseline.
--positions all steers every position (CAA); generated steers from the answer opener "(" on (the
model's own reply, as the evaluation-awareness notebooks did).

--samples K: for the first K items, the greedy completion (steered the same way) is parsed for
"(A)"/"(B)", as the notebooks did.

Writes OUT/steering.csv (layer, multiplier, n, p_positive, p_positive_lo, p_positive_hi,
answer_matches_positive: the fraction of sampled items whose parsed answer is the positive one; the
baseline is layer "none"), OUT/items.csv (idx, layer, multiplier, p_positive), OUT/samples.jsonl,
and with --visualize OUT/steering.png.

Cost per item (n blocks, M multipliers, layers L1 < L2 < ...): the prompt's unsteered forward runs
once (to L1 and on to the baseline logits); the M multipliers of a layer run as one batch of M
rows.
positions all: each steered layer costs M rows x (n - L1) blocks over the prompt (blocks below L1
shared); positions generated: the prompt's keys and values are shared, each layer costs M rows x
n blocks over one token.
"""
import csv
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama.cli import command  # noqa: E402
from llama.errors import LlamaError  # noqa: E402
from report.build import write_run_report  # noqa: E402

LETTER = re.compile(r"\(([AB])\)")


def read_items(path: str, limit=None) -> list:
    """[(question, positive letter)] of an A/B file, read by llama.prompts.read_ab (the reader
    generate_dataset.py uses: the same formats, keys and option layouts)."""
    from llama.prompts import letter_of, read_ab

    items = []
    for i, _, question, pos, neg in read_ab(path, limit):
        if {letter_of(pos), letter_of(neg)} != {"A", "B"}:
            raise LlamaError(f"{path} row {i}: the answers are {pos!r}/{neg!r}, not the letters "
                             "(A)/(B)")
        items.append((question, letter_of(pos)))
    return items


def numbers(spec, flag: str, kind=float) -> list:
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    try:
        return [kind(x) for x in items]
    except ValueError:
        raise LlamaError(f"--{flag} {spec!r} is not a comma-separated list of numbers") from None


def bootstrap(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple:
    """95% percentile interval of the mean, items resampled with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


class Sweep:
    """The model, the vectors and the sweep grid; scores items one at a time."""

    def __init__(self, gen, vectors, layers, multipliers, positions, ablate, chat="auto"):
        import torch

        from llama.prompts import resolve_chat

        self.gen, self.model = gen, gen.model
        self.chat = resolve_chat(chat, gen.tokenizer)
        self.vectors, self.layers, self.positions, self.ablate = vectors, layers, positions, ablate
        self.mults = torch.tensor(multipliers, dtype=torch.float32)
        tok = gen.tokenizer
        self.letters = {}
        for letter in "AB":
            ids = tok.encode(letter)
            if len(ids) != 1:
                raise LlamaError(f"the tokenizer splits the letter {letter} into {len(ids)} "
                                 "tokens")
            self.letters[letter] = ids[0]

    def prompt(self, question: str) -> list:
        from llama.prompts import render

        tok = self.gen.tokenizer
        text = render(self.chat, None, question, answer="(", cue="\n\nAnswer: ", tok=tok)
        ids = tok.encode(text, bos=True)
        if tok.encode(text + "A", bos=True) != ids + [self.letters["A"]]:
            raise LlamaError("the tokenizer merges '(' with the letter: no single answer token")
        return ids

    def steer(self, layer):
        from llama.model import Steer

        return Steer({layer: self.vectors[layer]}, self.mults, self.ablate, self.positions)

    def p_positive(self, logits, letter: str):
        """logits [..., vocab] -> p(letter) / (p(A) + p(B)); NaN where the logits hold a NaN or
        an infinity (main warns and leaves it out of the means)."""
        import torch

        two = logits[..., [self.letters["A"], self.letters["B"]]].double()
        p = torch.softmax(two, -1)[..., "AB".index(letter)]
        p = torch.where(torch.isfinite(logits).all(-1), p, torch.full_like(p, float("nan")))
        return p.numpy()

    def score(self, ids: list, letter: str) -> tuple:
        """(baseline p, {layer: [M] p}) for one item."""
        import torch

        model, M, n = self.model, len(self.mults), self.model.params.n_layers
        tokens = torch.tensor([ids])
        out = {}
        if self.positions == "all":
            first = self.layers[0]
            pre = model(tokens, layers=[first], logits=True)
            base = self.p_positive(pre["logits"][0, -1], letter)
            entry = (first, pre[first].expand(M, -1, -1))
            for layer in self.layers:
                res = model(tokens.expand(M, -1), layers=[], logits=True, entry=entry,
                            steer=self.steer(layer))
                out[layer] = self.p_positive(res["logits"][:, -1], letter)
        else:  # the prompt before "(" is never steered: its keys and values are shared
            P = len(ids) - 1
            pre = model(tokens[:, :P], layers=[n], return_kv=True)
            start = torch.tensor([P])
            res = model(tokens[:, P:], layers=[], logits=True, start=start, past=pre["kv"])
            base = self.p_positive(res["logits"][0, -1], letter)
            past = [(k.expand(M, -1, -1, -1), v.expand(M, -1, -1, -1)) for k, v in pre["kv"]]
            for layer in self.layers:
                res = model(tokens[:, P:].expand(M, -1), layers=[], logits=True,
                            start=start.expand(M), past=past, steer=self.steer(layer),
                            prompt_len=start.expand(M))
                out[layer] = self.p_positive(res["logits"][:, -1], letter)
        return float(base), out

    def sample(self, ids: list, cfg) -> dict:
        """{layer: [M] greedy completions} and the baseline's, each starting after "("."""
        M = len(self.mults)
        out = {}
        for layer in self.layers:
            rows = self.gen.generate([ids] * M, cfg, self.steer(layer),
                                     steer_from=[len(ids) - 1] * M)
            out[layer] = [self.gen.tokenizer.decode(r[0]) for r in rows]
        out["none"] = [self.gen.tokenizer.decode(self.gen.generate([ids], cfg)[0][0])]
        return out


def warn_nonfinite(i: int, question: str, base: float, per_layer: dict, mults) -> None:
    """One warning line for an item whose logits were NaN or infinite somewhere (a multiplier
    that overflows the residual stream): its p_positive there is NaN, left out of the means."""
    bad = [f"layer {l} x {m:g}" for l, ps in per_layer.items() for m, p in zip(mults, ps)
           if not np.isfinite(p)]
    bad = (["unsteered"] if not np.isfinite(base) else []) + bad
    if bad:
        text = question.replace("\n", " ")
        print(f"warning: item {i} ({text[:40]!r}): non-finite logits at {', '.join(bad[:4])}"
              f"{' ...' if len(bad) > 4 else ''}; left out of those means", file=sys.stderr,
              flush=True)


def parse_answer(completion: str):
    """The letter of the first "(A)"/"(B)" in "(" + completion, or None."""
    m = LETTER.search("(" + completion)
    return m.group(1) if m else None


def main(model, data, vectors, layers, output, multipliers=None, positions="all", ablate=False,
         samples=0, max_gen_len=16, limit=None, visualize=False, n_boot=1000, seed=0, chat="auto",
         tokenizer_path=None, compute_dtype="float32", device="auto", overwrite=False,
         html_report=False):
    """Steering sweep on an A/B test set (the module docstring says how it is scored).

    model: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    data: A/B items: {question, positive, negative} or {question, test, deploy} (JSON, JSONL, CSV)
    vectors: steering vectors: a vectors folder, a .npy/.safetensors vector or a saved linear probe
    layers: the layers to steer, one at a time, e.g. 10,15,20
    output: the folder for steering.csv, items.csv, samples.jsonl (and steering.png)
    multipliers: e.g. -4,-2,0,2,4 (default; 1 with --ablate)
    positions: all (every position, as CAA) or generated (from the answer opener on)
    ablate: remove the vector's direction instead of adding it
    samples: for the first K items, also parse the greedy completion's (A)/(B)
    max_gen_len: tokens generated per sample
    limit: at most this many items
    visualize: also write steering.png
    n_boot: bootstrap resamples for the 95% intervals
    seed: for the bootstrap
    chat: auto (the model's chat template), or a chat format name
    tokenizer_path: the tokenizer file, when the model's own is not found beside it
    compute_dtype: of the model's weights and arithmetic: float32, float16 or bfloat16
    device: auto, cpu or cuda
    overwrite: replace an existing steering.csv in --output
    html_report: also write OUTPUT/report.html (scripts/report.py's page of this run)
    """
    import torch.distributed as tdist
    from tqdm import tqdm

    from llama.cache import parse_layers
    from llama.checkpoint import read_args
    from llama.dist import setup, teardown
    from llama.generation import Generator, Sampling, check_context
    from llama.steering import load_vectors

    if positions not in ("all", "generated"):
        raise LlamaError(f"--positions {positions!r}: choose all or generated")
    mults = numbers("1" if multipliers is None and ablate else
                    "-4,-2,0,2,4" if multipliers is None else multipliers, "multipliers")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise LlamaError(f"--limit {limit!r} is not a positive integer")
    if not isinstance(samples, int) or samples < 0:
        raise LlamaError(f"--samples {samples!r} is not a non-negative integer")
    if not os.path.isfile(data):
        raise LlamaError(f"--data {data}: no such file")
    items = read_items(data, limit)
    check_context(model, max_gen_len)  # before the weights load
    if os.path.exists(os.path.join(output, "steering.csv")) and not overwrite:
        raise LlamaError(f"{output} already holds a steering sweep (--overwrite to replace it)")
    layers = parse_layers(layers, read_args(model).n_layers)  # the header only: no weights yet
    own_group = not tdist.is_initialized()
    proc = setup(1, device)
    try:
        gen = Generator.build(model, proc, compute_dtype, tokenizer_path=tokenizer_path)
        a = gen.model.params
        vecs = load_vectors(vectors, layers, a.dim, a.n_layers, gen.fingerprint)
        sweep = Sweep(gen, vecs, layers, mults, positions, bool(ablate), chat)
        prompts = [sweep.prompt(q) for q, _ in items]
        cfg = Sampling(max_gen_len=max_gen_len)
        cfg.check()
        base, table, sampled = [], {l: [] for l in layers}, []
        bar = tqdm(total=len(items) * len(layers), desc="steering sweep", unit="layer x item")
        for i, (ids, (question, letter)) in enumerate(zip(prompts, items)):
            b, per_layer = sweep.score(ids, letter)
            warn_nonfinite(i, question, b, per_layer, mults)
            base.append(b)
            for l in layers:
                table[l].append(per_layer[l])
            if i < samples:
                sampled.append((i, letter, sweep.sample(ids, cfg)))
            bar.update(len(layers))
        bar.close()
        write_outputs(output, layers, mults, base, table, sampled, n_boot, seed)
        if visualize:
            plot(output, layers, mults, base, table, n_boot, seed)
        print(f"wrote {output}/steering.csv, items.csv, samples.jsonl"
              + (", steering.png" if visualize else ""))
        if html_report:
            write_run_report(output)
    finally:
        if own_group:
            teardown()


def write_outputs(output, layers, mults, base, table, sampled, n_boot, seed):
    """steering.csv, items.csv, samples.jsonl; steering.csv last (it marks a complete run)."""
    os.makedirs(output, exist_ok=True)
    base = np.array(base)
    with open(os.path.join(output, "items.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "layer", "multiplier", "p_positive"])
        w.writerows([i, "none", 0.0, f"{p:.6f}"] for i, p in enumerate(base))
        for l in layers:
            for i, row in enumerate(table[l]):
                w.writerows([i, l, m, f"{p:.6f}"] for m, p in zip(mults, row))
    matches = {}
    with open(os.path.join(output, "samples.jsonl"), "w", encoding="utf-8") as f:
        for i, letter, done in sampled:
            for l, texts in done.items():
                for m, text in zip([0.0] if l == "none" else mults, texts):
                    ans = parse_answer(text)
                    matches.setdefault((l, m), []).append(ans == letter)
                    f.write(json.dumps({"idx": i, "layer": l, "multiplier": m, "positive": letter,
                                        "completion": "(" + text, "answer": ans}) + "\n")

    def row(layer, m, values):
        values = values[np.isfinite(values)]  # items whose logits were not finite: left out
        if len(values) == 0:
            return [layer, m, 0, "nan", "nan", "nan", ""]
        lo, hi = bootstrap(values, n_boot, seed)
        hits = matches.get((layer, m))
        return [layer, m, len(values), f"{values.mean():.6f}", f"{lo:.6f}", f"{hi:.6f}",
                "" if hits is None else f"{np.mean(hits):.3f}"]

    tmp = os.path.join(output, "steering.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "multiplier", "n", "p_positive", "p_positive_lo", "p_positive_hi",
                    "answer_matches_positive"])
        w.writerow(row("none", 0.0, base))
        for l in layers:
            arr = np.array(table[l])  # [items, M]
            w.writerows(row(l, m, arr[:, j]) for j, m in enumerate(mults))
    os.replace(tmp, os.path.join(output, "steering.csv"))


def plot(output, layers, mults, base, table, n_boot, seed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for l in layers:
        arr = np.array(table[l])
        ci = np.array([bootstrap(arr[:, j], n_boot, seed) for j in range(len(mults))])
        ax.plot(mults, arr.mean(0), marker="o", label=f"layer {l}")
        ax.fill_between(mults, ci[:, 0], ci[:, 1], alpha=0.15)
    ax.axhline(np.mean(base), color="black", linestyle="--", label="unsteered")
    ax.set_xlabel("multiplier")
    ax.set_ylabel("p(positive answer)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output, "steering.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    command(main)
