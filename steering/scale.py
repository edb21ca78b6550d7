"""Steering vectors in the residual stream's units.

A raw mean-difference vector's norm varies hundreds-fold across layers while the residual
stream's varies about 15-fold (SmolLM2: 0.065 at layer 2, 80 at layer 22, against residual norms
57 and 279), so one multiplier means different things at different layers. Two conventions:

- scale "raw" (CAA, Rimsky et al. 2024): the vector added is multiplier x the vector as stored;
- scale "residual": multiplier x (vector / |vector|) x the layer's residual-stream norm from
  unit_norms(), the one source of that unit for scripts/steer.py, scripts/generate.py and the
  server: the vector's recorded residual_norm (llama.vectors.describe_vector: the mean norm on
  the data the vector came from) where its file has one, else neutral_norms() (the unsteered model
  on llama.generation.BUILTIN_PROMPTS), position 0 (the attention sink: ~22,600 on SmolLM2 from
  layer 16 on, 90-350 elsewhere) left out as activations.cache.mean_start's rule does. Multiplier
  1 then adds a vector about as long as the residual stream itself, the same vector in every
  command.

push = |multiplier| x |vector as applied| / residual norm: the fraction of the residual norm one
setting adds (ablation: |multiplier| x the mean |h . u| removed / residual norm), the residual
norm measured (measure()) on the prompts actually steered, at the steered positions: a
measurement, where the unit above is a convention.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

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


def applied_norms(vectors: Dict[int, torch.Tensor], norms: Dict[int, float],
                  scale: str) -> Dict[int, torch.Tensor]:
    """The vectors as added at multiplier 1: as stored (raw), or unit x norms[layer] (residual;
    norms {layer: residual-stream norm}, unit_norms()'s)."""
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


def recorded_norms(source) -> Dict[int, float]:
    """{layer: residual_norm} a vectors folder records (llama.vectors.vector_conventions); layers
    without one, and sources that record none (a bare .npy/.safetensors file, a probe), left
    out."""
    from llama.vectors import vector_conventions

    out = {}
    for layer, meta in vector_conventions(source).items():
        try:
            value = float(meta.get("residual_norm") or "nan")
        except ValueError:
            continue
        if math.isfinite(value) and value > 0:
            out[layer] = value
    return out


def unit_norms(model, tokenizer, source, layers) -> Dict[int, Tuple[float, str]]:
    """{layer: (norm, where)}: the residual-stream norm scale "residual" multiplies the unit
    vector by, the same in every command and the server (module docstring): the recorded
    residual_norm of `source` (a vectors folder) at that layer, where "recorded", else
    neutral_norms(), where "neutral prompts"."""
    return unit_norms_of(model, tokenizer, {"": (source, layers)})[""]


def unit_norms_of(model, tokenizer, sources: Dict[str, tuple]) -> Dict[str, Dict[int, tuple]]:
    """unit_norms() of several vectors, sources {name: (source, layers)} -> {name: {layer:
    (norm, where)}}, with one neutral_norms() pass over the layers any of them lacks."""
    recorded = {n: recorded_norms(src) for n, (src, _) in sources.items()}
    missing = {x for n, (_, layers) in sources.items() for x in layers if x not in recorded[n]}
    neutral = neutral_norms(model, tokenizer, sorted(missing))
    return {n: choose_units(recorded[n], neutral, layers) for n, (_, layers) in sources.items()}


def choose_units(recorded: Dict[int, float], neutral: Dict[int, float],
                 layers) -> Dict[int, Tuple[float, str]]:
    """unit_norms()'s rule for one vector, given its recorded norms (recorded_norms) and the
    neutral norms (neutral_norms, or the same rule measured by another engine): {layer: (norm,
    "recorded" | "neutral prompts")}. KeyError if a layer has neither."""
    return {x: (recorded[x], "recorded") if x in recorded else (neutral[x], "neutral prompts")
            for x in sorted(set(layers))}


def push(multiplier: float, vector: torch.Tensor, residual: Residual, ablate: bool) -> float:
    """|multiplier| x |vector| / residual norm (ablation: x the mean |h . u| removed instead)."""
    size = residual.along if ablate else float(vector.norm())
    return abs(multiplier) * size / residual.norm


def describe(vectors: Dict[int, torch.Tensor], stored: Dict[int, torch.Tensor],
             residual: Dict[int, Residual], scale: str, ablate: bool,
             multipliers: Sequence[float],
             units: Dict[int, Tuple[float, str]] = None) -> List[str]:
    """Printed lines: per layer the stored norm, the residual norm measured here, what multiplier
    1 means as a fraction of it, and (scale "residual") the unit from unit_norms() with where it
    came from; a warning line for each layer whose largest push is under WEAK_PUSH."""
    lines, weak = [], []
    top = max(abs(m) for m in multipliers)
    for l in sorted(vectors):
        r = residual[l]
        one = push(1.0, vectors[l], r, ablate)
        unit = "" if not units or scale == "raw" else \
            f"; unit {units[l][0]:.9g} ({units[l][1]})"
        lines.append(f"layer {l:3d}  |vector| {float(stored[l].norm()):.4g}  residual norm "
                     f"{r.norm:.4g} (mean over {r.count} positions, position 0 left out)  "
                     f"multiplier 1 = push {one:.3g} of the residual norm ({scale} scale{unit})")
        if top * one < WEAK_PUSH:
            weak.append(f"warning: layer {l}: the largest multiplier pushes {top * one:.0%} of "
                        "the residual norm (under 10%: this layer is effectively unsteered; "
                        "try --scale residual)")
    return lines + weak
