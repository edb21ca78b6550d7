"""Steering vectors in the residual stream's units.

A raw mean-difference vector's norm varies hundreds-fold across layers while the residual
stream's varies about 15-fold (SmolLM2: 0.065 at layer 2, 80 at layer 22, against residual norms
57 and 279), so one multiplier means different things at different layers. Two conventions:

- scale "raw" (CAA, Rimsky et al. 2024): the vector added is multiplier x the vector as stored;
- scale "residual": multiplier x (vector / |vector|) x the mean residual-stream norm at that layer,
  measured on the run's own unsteered prompts at the positions that are steered, position 0 (the
  attention sink: ~22,600 on SmolLM2 from layer 16 on, 90-350 elsewhere) left out as
  activations.cache.mean_start's rule does. Multiplier 1 then adds a vector as long as the residual
  stream itself.

push = |multiplier| x |vector as applied| / residual norm: the fraction of the residual norm one
setting adds (ablation: |multiplier| x the mean |h . u| removed / residual norm).
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from llama.errors import LlamaError

SCALES = ("raw", "residual")
WEAK_PUSH = 0.1  # below this the largest multiplier barely reaches the residual stream


@dataclass
class Residual:
    """The unsteered residual stream at one layer: mean |h| and mean |h . u| (u the unit steering
    direction) over the steered positions, and how many positions were averaged."""
    norm: float
    along: float
    count: int


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise LlamaError(f"--scale {scale!r}: choose raw or residual")
    return scale


def steered_positions(length: int, start: int) -> slice:
    """The positions of a prompt a steer touches, for measuring the residual norm: from `start`
    (0 for every position, the answer opener for "generated"), position 0 always left out."""
    return slice(max(1, start) if length > 1 else 0, length)


@torch.inference_mode()
def measure(model, prompts: Sequence[List[int]], starts: Sequence[int],
            vectors: Dict[int, torch.Tensor]) -> Dict[int, Residual]:
    """{layer: Residual} of the unsteered model on `prompts` (token ids, one forward each up to the
    deepest layer), over positions steered_positions(len, start) pooled across prompts."""
    layers = sorted(vectors)
    units = {l: (v / v.norm()).double() for l, v in vectors.items()}
    sums = {l: [0.0, 0.0, 0] for l in layers}
    for ids, start in zip(prompts, starts):
        out = model(torch.tensor([ids], device=model.norm.weight.device), layers=layers)
        span = steered_positions(len(ids), start)
        for l in layers:
            h = out[l][0, span].double()
            sums[l][0] += float(h.norm(dim=-1).sum())
            sums[l][1] += float((h @ units[l].to(h.device)).abs().sum())
            sums[l][2] += h.shape[0]
    return {l: Residual(s[0] / s[2], s[1] / s[2], s[2]) for l, s in sums.items()}


def applied(vectors: Dict[int, torch.Tensor], residual: Dict[int, Residual],
            scale: str) -> Dict[int, torch.Tensor]:
    """The vectors as added at multiplier 1: as stored (raw), or unit x residual norm."""
    return applied_norms(vectors, {l: r.norm for l, r in residual.items()}, scale)


def applied_norms(vectors: Dict[int, torch.Tensor], norms: Dict[int, float],
                  scale: str) -> Dict[int, torch.Tensor]:
    """applied() with the residual norms as {layer: mean |h|} (the server's, a vector's
    recorded ones)."""
    if check_scale(scale) == "raw":
        return dict(vectors)
    return {l: (v / v.norm() * norms[l]).float() for l, v in vectors.items()}


@torch.inference_mode()
def neutral_norms(model, tokenizer, layers) -> Dict[int, float]:
    """{layer: mean residual-stream norm} of the unsteered model on the neutral built-in prompts
    (llama.generation.BUILTIN_PROMPTS, BOS first, position 0 left out): measure()'s rule on one
    named prompt set, the server's unit for scale "residual"."""
    from llama.generation import BUILTIN_PROMPTS

    if not layers:
        return {}
    prompts = [tokenizer.encode(text, bos=True) for text in BUILTIN_PROMPTS]
    dim = model.params.dim
    probe = {l: torch.ones(dim) for l in layers}  # measure() also wants a direction: unused here
    return {l: r.norm for l, r in measure(model, prompts, [0] * len(prompts), probe).items()}


def push(multiplier: float, vector: torch.Tensor, residual: Residual, ablate: bool) -> float:
    """|multiplier| x |vector| / residual norm (ablation: x the mean |h . u| removed instead)."""
    size = residual.along if ablate else float(vector.norm())
    return abs(multiplier) * size / residual.norm


def describe(vectors: Dict[int, torch.Tensor], stored: Dict[int, torch.Tensor],
             residual: Dict[int, Residual], scale: str, ablate: bool,
             multipliers: Sequence[float]) -> List[str]:
    """Printed lines: per layer the stored norm, the residual norm, what multiplier 1 means as a
    fraction of it; a warning line for each layer whose largest push is under WEAK_PUSH."""
    lines, weak = [], []
    top = max(abs(m) for m in multipliers)
    for l in sorted(vectors):
        r = residual[l]
        one = push(1.0, vectors[l], r, ablate)
        lines.append(f"layer {l:3d}  |vector| {float(stored[l].norm()):.4g}  residual norm "
                     f"{r.norm:.4g} (mean over {r.count} positions, position 0 left out)  "
                     f"multiplier 1 = push {one:.3g} of the residual norm ({scale} scale)")
        if top * one < WEAK_PUSH:
            weak.append(f"warning: layer {l}: the largest multiplier pushes {top * one:.0%} of "
                        "the residual norm (under 10%: this layer is effectively unsteered; "
                        "try --scale residual)")
    return lines + weak
