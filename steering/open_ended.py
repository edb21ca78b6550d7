"""The open-ended read-out: greedy completions of a few neutral prompts at each layer x
multiplier, in one table (scripts/generate.py --steer ... --sweep).

Each completion carries its projection: the mean of h . u over the completion's tokens, h the
unsteered model's residual stream at the steered layer reading prompt + completion, u the unit
steering direction; the unsteered row gives the baseline. It is the model's own read-out of how
far along the direction the steered text moved (the added vector itself is not in h: the text is
re-read without the steer).
"""
import json
import os
from typing import Dict, List, Optional

import torch

from .scale import Residual, push


@torch.inference_mode()
def projection(model, prompt: List[int], completion: List[int], layer: int,
               unit: torch.Tensor) -> Optional[float]:
    """Mean h . unit over the completion's positions at `layer`; None for an empty completion
    (the first token ended it: there is nothing to read, and JSON has no NaN)."""
    if not completion:
        return None
    ids = torch.tensor([list(prompt) + list(completion)])
    h = model(ids, layers=[layer])[layer][0, len(prompt):].double()
    return float((h @ unit.double().to(h.device)).mean())


def sweep(gen, texts: List[str], tokens: List[List[int]], vectors: Dict[int, torch.Tensor],
          residual: Dict[int, Residual], multipliers: List[float], cfg, ablate: bool = False,
          positions: str = "all", batch_size: int = 8) -> List[dict]:
    """Rows {prompt, layer, multiplier, push, completion, tokens, projection}: the unsteered
    completions (layer "none") first, then each layer x multiplier; `vectors` as applied."""
    from llama.model import Steer

    units = {l: v / v.norm() for l, v in vectors.items()}

    def complete(spec):
        done = []
        for lo in range(0, len(texts), batch_size):
            hi = lo + batch_size
            done += gen.text_completion(texts[lo:hi], cfg, spec, None, tokens[lo:hi])
        return done

    rows = []
    plain = complete(None)
    for l in sorted(vectors):
        for text, ids, c in zip(texts, tokens, plain):
            rows.append({"prompt": text, "layer": "none", "read_at": l, "multiplier": 0.0,
                         "push": 0.0, "completion": c.completion, "tokens": c.tokens,
                         "projection": projection(gen.model, ids, c.tokens, l, units[l])})
    for l in sorted(vectors):
        for m in multipliers:
            done = complete(Steer({l: vectors[l]}, float(m), ablate, positions))
            for text, ids, c in zip(texts, tokens, done):
                rows.append({"prompt": text, "layer": l, "read_at": l, "multiplier": float(m),
                             "push": push(m, vectors[l], residual[l], ablate),
                             "completion": c.completion, "tokens": c.tokens,
                             "projection": projection(gen.model, ids, c.tokens, l, units[l])})
    return rows


def cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def write(path: str, rows: List[dict]) -> str:
    """PATH (JSONL, one row per completion) and PATH's .md twin (one Markdown table per prompt:
    layer, multiplier, push, projection, completion). Written whole or not at all."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    md = os.path.splitext(path)[0] + ".md"
    lines = ["# Open-ended read-out", "",
             "Greedy completions per layer x multiplier; push = fraction of the residual norm "
             "added; projection = mean h . u over the completion, re-read unsteered at the layer "
             "(the unsteered rows: read at each steered layer; - : an empty completion).", ""]
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        lines += [f"## {cell(prompt)}", "", "| layer | multiplier | push | projection | "
                  "completion |", "| --- | --- | --- | --- | --- |"]
        for r in rows:
            if r["prompt"] == prompt:
                where = "none (read at %s)" % r["read_at"] if r["layer"] == "none" else r["layer"]
                read = "-" if r["projection"] is None else f"{r['projection']:.2f}"
                lines.append(f"| {where} | {r['multiplier']:g} | {r['push']:.2f} | {read} | "
                             f"{cell(r['completion'])} |")
        lines.append("")
    with open(md + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(md + ".tmp", md)
    os.replace(tmp, path)
    return md
