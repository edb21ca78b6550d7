"""Probe / steering vectors from an activation cache: per layer, the difference of the class means.

    python scripts/generate_vectors_from_cache.py --cache DIR --output NAME [--layers 10,20]

Writes NAME_TIMESTAMP/vectors/layer_{L}.safetensors and NAME_TIMESTAMP/normalized_vectors/layer_{L}.safetensors
(the same vector scaled to unit norm), each holding one tensor "vector" [hidden_dim] and metadata (layer,
hidden_dim, model fingerprint, cache) that analyze_probe_from_cache.py checks.

Which difference:
- single-prompt caches (validation sets): mean(label 1) - mean(label 0), label 1 being type "testing",
  so a prompt scores higher the more "testing"-like it is;
- contrast caches: per pair, plus - minus, taken with the sign of its label (label 1: the plus side is
  true) and averaged: mean over pairs of (true side - false side).
Token "all" caches: each example's tokens are averaged first, leaving out its first token (position 0,
the attention sink; on the default model it carries a ~24,000 outlier in one dimension).
Raw activations, not standardised: the vector lives in the model's own space.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccs import cache_labels, parse_layers  # noqa: E402
from llama.cache import ActivationCache  # noqa: E402
from llama.errors import cli  # noqa: E402


def per_example(cache: ActivationCache, layer: int, side: str) -> np.ndarray:
    """[N, d] float32: the cached vector, or the mean of an example's tokens after its first."""
    a = cache.array(layer, side)
    if cache.token != "all":
        return a
    off = cache.offsets(side)
    start = np.minimum(off[:-1] + 1, off[1:] - 1)  # one-token examples keep their token
    sums = np.cumsum(np.vstack([np.zeros((1, a.shape[1]), np.float64), a]), 0)
    return ((sums[off[1:]] - sums[start]) / (off[1:] - start)[:, None]).astype(np.float32)


def class_difference(cache: ActivationCache, layer: int, y: np.ndarray) -> np.ndarray:
    if cache.is_contrast:
        d = per_example(cache, layer, "plus").astype(np.float64) - per_example(cache, layer, "minus")
        return ((2 * y - 1)[:, None] * d).mean(0)
    x = per_example(cache, layer, cache.sides[0]).astype(np.float64)
    return x[y == 1].mean(0) - x[y == 0].mean(0)


def generate(cache: str, output: str, layers=None) -> str:
    """Write the vectors; return the run folder NAME_TIMESTAMP."""
    from safetensors.numpy import save_file

    c = ActivationCache(cache)
    layers = parse_layers(layers, c)
    y = cache_labels(c)
    run = f"{output}_{time.strftime('%Y%m%d_%H%M%S')}"
    for sub in ("vectors", "normalized_vectors"):
        os.makedirs(os.path.join(run, sub), exist_ok=True)
    kind = ("mean(true side - false side) over pairs" if c.is_contrast
            else "mean(testing) - mean(deployment)" if c.types else "mean(label 1) - mean(label 0)")
    for l in layers:
        v = class_difference(c, l, y)
        meta = {"layer": str(l), "hidden_dim": str(c.hidden_dim), "fingerprint": c.fingerprint or "",
                "cache": os.path.abspath(cache), "vector": kind, "token": c.token}
        norm = np.linalg.norm(v)
        save_file({"vector": v.astype(np.float32)}, os.path.join(run, "vectors", f"layer_{l}.safetensors"), metadata=meta)
        unit = v / norm if norm > 0 else v
        save_file({"vector": unit.astype(np.float32)}, os.path.join(run, "normalized_vectors", f"layer_{l}.safetensors"),
                  metadata=dict(meta, normalized="unit norm"))
        print(f"layer {l:3d}  |v| = {norm:.4g}")
    print(f"wrote {len(layers)} vectors ({kind}) to {run}/vectors and {run}/normalized_vectors")
    return run


def main(cache: str, output: str, layers=None):
    generate(cache, output, layers)


if __name__ == "__main__":
    import fire

    cli(fire.Fire, main)
