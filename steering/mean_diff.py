"""Probe / steering vectors from an activation cache: per layer, the difference of the class means.

    python scripts/generate_vectors_from_cache.py --cache DIR --output NAME [--layers 10,20]

Writes NAME_TIMESTAMP/vectors/layer_{L}.safetensors and
NAME_TIMESTAMP/normalized_vectors/layer_{L}.safetensors (the same vector scaled to unit norm), each
holding one tensor "vector" [hidden_dim] and metadata that states its conventions
(llama.vectors.describe_vector: operation, layer convention, read position, norm, residual norm,
source data, model fingerprint, which class the plus side stands for), which steering,
export_control_vector.py and analyze_probe_from_cache.py read.

Which difference:
- single-prompt caches (validation sets): mean(label 1) - mean(label 0), label 1 being type
  "testing", so a prompt scores higher the more "testing"-like it is;
- contrast caches: per pair, plus - minus, taken with the sign of its label (label 1: the plus side
  is true) and averaged: mean over pairs of (true side - false side). A contrast cache whose
  labels are all one class is accepted (a steering set: the plus side is always the behaviour);
  a single-prompt cache needs both classes.
Token "all" caches: each example's tokens are averaged first by activations.cache.mean_state,
the rule
extraction's token "mean" follows too: its first token (position 0, the attention sink; on the
default model a ~24,000 outlier in one dimension) is left out, unless --mean_keep_first.
Raw activations, not standardised: the vector lives in the model's own space.
"""
import os
import sys
import time

import numpy as np


from probes.data import cache_layers, labels, refuse_nonfinite
from activations.cache import ActivationCache, mean_state
from llama.cli import command
from llama.errors import LlamaError
from llama.vectors import describe_vector


def vector_labels(cache: ActivationCache) -> np.ndarray:
    """[N] labels; a contrast cache may hold one class only (every pair's plus side true: a
    steering set), a single-prompt cache needs both (probes.data.labels)."""
    if not cache.is_contrast:
        return labels(cache)
    y = cache.labels
    if y is None:
        raise LlamaError(f"cache {cache.path} has no labels (metadata.json 'labels'): which side "
                         "of each pair is the behaviour is unknown")
    if len(y) != cache.num_examples:
        raise LlamaError(f"cache {cache.path}: {len(y)} labels for {cache.num_examples} examples")
    return y


def plus_class(cache: ActivationCache) -> tuple:
    """(class name, description) of what the vector's plus side stands for, from the data's own
    keys: "testing" (validation sets, label 1), "positive" (A/B sets: the "positive"/"test"
    option), "behaviour" (a steering set: every pair's label 1, its plus side the behaviour),
    "true" (other contrast sets: the true side), "label 1"."""
    if cache.types:
        return "testing", "type 'testing' (the vector is mean(testing) - mean(deployment))"
    if not cache.is_contrast:
        return "label 1", "label 1 (the vector is mean(label 1) - mean(label 0))"
    path = cache.meta.get("data", {}).get("path", "")
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
    except OSError:
        header = ""
    if "swapped" in header.strip().split(","):
        return "positive", ("the A/B set's 'positive' ('test') option of each pair (the "
                            "evaluation-awareness sets: the testing answer)")
    if steering_set(cache):
        return "behaviour", ("the plus prompt of every pair (a steering set: every label is 1, "
                             "the plus side is the behaviour to steer towards)")
    return "true", "the true side of each pair (label 1: the plus prompt's answer)"


def steering_set(cache: ActivationCache) -> bool:
    """A contrast cache whose every label is 1: the plus side is always the behaviour (e.g. the
    sentiment set's loving side), not the true one of a true/false pair."""
    return bool(cache.is_contrast and cache.labels is not None and len(cache.labels)
                and (np.asarray(cache.labels) == 1).all())


def per_example(cache: ActivationCache, layer: int, side: str,
                keep_first: bool = False) -> np.ndarray:
    """[N, d] float32: the cached vector, or an example's mean state
    (activations.cache.mean_state)."""
    if cache.token != "all":
        return cache.array(layer, side)
    return mean_state(cache.rows(layer, side), cache.offsets(side), keep_first)  # per example


def checked(cache, layer, side, keep_first, drop, bad):
    """per_example with every value checked (refused, or its rows marked in `bad` [N])."""
    x = per_example(cache, layer, side, keep_first)
    unit = "example" if cache.token == "all" else "row"
    bad[refuse_nonfinite(cache, layer, side, x, drop=drop, unit=unit)] = True
    return x


def class_difference(cache: ActivationCache, layer: int, y: np.ndarray,
                     keep_first: bool = False, drop: bool = False) -> tuple:
    """(the class-mean difference [d] float64, the rows dropped for a NaN or an infinity)."""
    bad = np.zeros(len(y), dtype=bool)
    if cache.is_contrast:
        plus, minus = (checked(cache, layer, s, keep_first, drop, bad) for s in ("plus", "minus"))
        keep = ~bad
        diff = (2 * y[keep] - 1)[:, None] * (plus[keep].astype(np.float64) - minus[keep])
        return diff.mean(0), int(bad.sum())
    x = checked(cache, layer, cache.sides[0], keep_first, drop, bad).astype(np.float64)
    keep = ~bad
    return (x[keep & (y == 1)].mean(0) - x[keep & (y == 0)].mean(0)), int(bad.sum())


def residual_norm(cache: ActivationCache, layer: int, keep_first: bool = False) -> float:
    """Mean |state| at this layer over every side's cached states (token "all": each token's,
    position 0 left out by mean_state's rule; token "mean": the mean states' own norms)."""
    norms = []
    for s in cache.sides:
        if cache.token == "all":
            rows = cache.rows(layer, s)
            each = np.concatenate([np.linalg.norm(rows[b].astype(np.float64), axis=1)
                                   for b in rows.blocks()])
            norms.append(mean_state(each[:, None], cache.offsets(s), keep_first)[:, 0])
        else:
            norms.append(np.linalg.norm(cache.array(layer, s).astype(np.float64), axis=1))
    return float(np.concatenate(norms).mean())


def generate(cache: str, output: str, layers=None, mean_keep_first: bool = False,
             drop_nonfinite: bool = False) -> str:
    """Write the vectors; return the run folder NAME_TIMESTAMP."""
    from safetensors.numpy import save_file

    act_cache = ActivationCache(cache)
    layers = cache_layers(layers, act_cache)
    y = vector_labels(act_cache)
    run = f"{output}_{time.strftime('%Y%m%d_%H%M%S')}"
    for sub in ("vectors", "normalized_vectors"):
        os.makedirs(os.path.join(run, sub), exist_ok=True)
    kind = ("mean(plus - minus) over pairs (the plus side: the behaviour)"
            if steering_set(act_cache)
            else "mean(true side - false side) over pairs" if act_cache.is_contrast
            else "mean(testing) - mean(deployment)" if act_cache.types
            else "mean(label 1) - mean(label 0)")
    plus, plus_text = plus_class(act_cache)
    for l in layers:
        v, dropped = class_difference(act_cache, l, y, mean_keep_first, drop_nonfinite)
        if dropped:
            print(f"layer {l:3d}  --drop_nonfinite: dropped {dropped} rows holding a NaN or an "
                  "infinity")
        norm = float(np.linalg.norm(v))
        keep = None
        if act_cache.token != "last":  # whether position 0 is in the means (mean_start)
            keep = mean_keep_first if act_cache.token == "all" else act_cache.mean_keep_first
        meta = describe_vector(
            layer=l, hidden_dim=act_cache.hidden_dim, fingerprint=act_cache.fingerprint or "",
            norm=norm, residual_norm=residual_norm(act_cache, l, mean_keep_first),
            token=act_cache.token, mean_keep_first=keep,
            source_data=act_cache.meta.get("data", {}).get("path", ""),
            cache=os.path.abspath(cache), vector=kind, plus_class=plus, plus_side=plus_text)
        save_file({"vector": v.astype(np.float32)},
                  os.path.join(run, "vectors", f"layer_{l}.safetensors"), metadata=meta)
        unit = v / norm if norm > 0 else v
        save_file({"vector": unit.astype(np.float32)},
                  os.path.join(run, "normalized_vectors", f"layer_{l}.safetensors"),
                  metadata=dict(meta, normalized="unit norm", norm="1",
                                raw_norm=meta["norm"]))
        print(f"layer {l:3d}  |v| = {norm:.4g}  residual norm {float(meta['residual_norm']):.4g}")
    print(f"plus side: {plus_text}")
    print(f"wrote {len(layers)} vectors ({kind}) to {run}/vectors and {run}/normalized_vectors")
    return run


def main(cache: str, output: str, layers: str = None, mean_keep_first: bool = False,
         drop_nonfinite: bool = False):
    """Write each layer's class-mean difference vector, raw and unit-norm.

    cache: the activation cache (scripts/cache_activations.py)
    output: the run name: vectors go to NAME_TIMESTAMP/vectors and
        NAME_TIMESTAMP/normalized_vectors
    layers: 10,20 / 0-3,7 / all (default: every cached layer)
    mean_keep_first: token "all" caches: average position 0 too (left out by default)
    drop_nonfinite: leave out rows holding a NaN or an infinity (default: refuse the cache)
    """
    generate(cache, output, layers, mean_keep_first, drop_nonfinite)


def cli():
    """The command line."""
    command(main)
