"""What probes read from an activation cache: labels, example groups, chunks of layers (streamed
from the memory-mapped arrays), and the train / validation / test split."""
from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from activations.cache import ActivationCache, nonfinite_rows, parse_layers, per_token
from llama.errors import LlamaError


def open_cache(path: str) -> ActivationCache:
    """A cache probes can read: plus/minus or prompt sides, one vector per example."""
    cache = ActivationCache(str(path))
    if cache.sides not in (["plus", "minus"], ["prompt"]):
        raise LlamaError(f"cache {cache.path}: sides {cache.sides} are neither plus/minus nor "
                         "prompt")
    if per_token(cache.token):
        raise LlamaError(f"cache {cache.path} holds every token: probes need one vector per "
                         "example (extract with --token last or mean)")
    return cache


def cache_layers(spec, cache: ActivationCache) -> List[int]:
    """`--layers` (all, 10,20 or 0-3,7) checked against the cache's layers."""
    return parse_layers(spec, cache.layers, f"cache {cache.path}")


def labels(cache: ActivationCache) -> np.ndarray:
    """[N] int64: 1 = the plus side is true (contrast) or the prompt is a 'testing' one."""
    y = cache.labels
    if y is None and cache.types is not None:
        y = np.array([t == "testing" for t in cache.types], dtype=np.int64)
    if y is None:
        raise LlamaError(f"cache {cache.path} has no labels (metadata.json 'labels' or 'types'): "
                         "probes need them")
    if len(y) != cache.num_examples:
        raise LlamaError(f"cache {cache.path}: {len(y)} labels for {cache.num_examples} examples")
    if len(np.unique(y)) < 2:
        raise LlamaError(f"cache {cache.path} holds one class only (every label is {y[0]}): "
                         "nothing to probe")
    return y


def groups(cache: ActivationCache) -> np.ndarray:
    """[N] int64 group of each row: rows with the same example id (e.g. one source example under
    several templates) share a group and never land in different splits."""
    ids = [str(i) for i in cache.ids]
    if len(ids) != cache.num_examples:
        raise LlamaError(f"cache {cache.path}: {len(ids)} ids for {cache.num_examples} examples")
    return np.unique(ids, return_inverse=True)[1].astype(np.int64)


DROP_HINT = "give --drop_nonfinite to drop such rows"


def where(cache: ActivationCache, layer: int, side: str) -> str:
    return f"cache {cache.path}: layer_{layer:02d}/{side}.npy (layer {layer}, side {side})"


def read(cache: ActivationCache, layers: List[int], rows=None, dropped=None) -> torch.Tensor:
    """[c, S, n, d] float32 features of `layers` (rows: all, or an index array), widened from the
    stored dtype layer by layer: nothing beyond the result is held. Every value read is checked:
    a NaN or an infinity is a LlamaError naming the file, layer, side and row, except in the rows
    `dropped` ([N] bool, from nonfinite()) marks, which are zeroed."""
    n = cache.num_examples if rows is None else len(rows)
    x = torch.empty(len(layers), len(cache.sides), n, cache.hidden_dim)
    xv = x.numpy()
    index = np.arange(cache.num_examples) if rows is None else np.asarray(rows)
    for i, layer in enumerate(layers):
        for j, side in enumerate(cache.sides):
            a = cache.raw(layer, side)
            a = a if rows is None else a[rows]
            if cache.dtype == "bfloat16":  # the 16 bits are a float32's upper half
                bits = xv[i, j].view(np.uint32)
                bits[:] = a
                bits <<= 16
            else:
                xv[i, j] = a
            bad = nonfinite_rows(xv[i, j])
            if len(bad):
                ok = dropped is not None and bool(dropped[index[bad]].all())
                if not ok:
                    row = int(index[bad[~dropped[index[bad]]][0] if dropped is not None
                                    else bad[0]])
                    raise LlamaError(f"{where(cache, layer, side)} row {row} holds a NaN or an "
                                     f"infinity; {DROP_HINT}")
                xv[i, j][bad] = 0.0
    return x


def refuse_nonfinite(cache: ActivationCache, layer: int, side: str, a: np.ndarray,
                     first_row: int = 0, drop: bool = False, unit: str = "row") -> np.ndarray:
    """Indices (in `a`) of a block's rows holding a NaN or an infinity: a LlamaError naming the
    file, layer, side and row (first_row + index) unless `drop`."""
    bad = nonfinite_rows(a)
    if len(bad) and not drop:
        raise LlamaError(f"{where(cache, layer, side)} {unit} {first_row + int(bad[0])} holds a "
                         f"NaN or an infinity; {DROP_HINT}")
    return bad


def nonfinite(cache: ActivationCache, layers: List[int], logprobs: bool = True) -> tuple:
    """([N] bool: rows with a NaN or an infinity in any of `layers`, either side, or the zero-shot
    log-probabilities; {layer or "logprobs": count of such rows}). Reads every layer once."""
    bad = np.zeros(cache.num_examples, dtype=bool)
    counts = {}
    for layer in layers:
        here = np.zeros(cache.num_examples, dtype=bool)
        for side in cache.sides:
            for block in cache.rows(layer, side).blocks():
                a = cache.rows(layer, side)[block]
                here[block.start + nonfinite_rows(a)] = True
        counts[layer] = int(here.sum())
        bad |= here
    lp = cache.logprobs if logprobs else None
    if lp is not None:
        here = np.zeros(cache.num_examples, dtype=bool)
        here[nonfinite_rows(lp)] = True
        counts["logprobs"] = int(here.sum())
        bad |= here
    return bad, counts


def check_logprobs(cache: ActivationCache, dropped=None) -> None:
    """The zero-shot log-probabilities [N, sides]: a NaN or an infinity outside the `dropped`
    rows is a LlamaError naming logprobs.npy and the row."""
    lp = cache.logprobs
    if lp is None:
        return
    bad = nonfinite_rows(lp)
    if dropped is not None:
        bad = bad[~dropped[bad]]
    if len(bad):
        raise LlamaError(f"cache {cache.path}: logprobs.npy (zero-shot log-probabilities) row "
                         f"{int(bad[0])} holds a NaN or an infinity ({len(bad)} rows); "
                         f"{DROP_HINT}")


def drop_rows(parts: List["Part"], dropped: np.ndarray) -> List["Part"]:
    """The parts without the `dropped` rows ([N] bool)."""
    keep = lambda rows: rows[~dropped[rows]]  # noqa: E731
    return [Part(keep(p.fit), keep(p.val), keep(p.test)) for p in parts]


def chunks(layers: List[int], cache: ActivationCache, memory_mb: float) -> List[List[int]]:
    """Layers in reading order, cut into chunks of at most memory_mb of float32 features (one layer
    at least)."""
    per = len(cache.sides) * cache.num_examples * cache.hidden_dim * 4
    k = max(1, int(memory_mb * 2**20 // per))
    return [layers[i:i + k] for i in range(0, len(layers), k)]


@dataclass
class Part:
    """Rows of one fit: fit on `fit`, choose the layer on `val`, score `test`."""

    fit: np.ndarray
    val: np.ndarray
    test: np.ndarray


def deal(y: np.ndarray, grp: np.ndarray, shares, seed: int) -> np.ndarray:
    """[n] part of each row for parts of the given shares (summing to 1): stratified (a group's
    class is its rows' majority label) and grouped (a group's rows share a part); each class's
    groups in a seeded order, a group going to the part in which the middle of its rows falls."""
    rng = np.random.default_rng(seed)
    _, inv, size = np.unique(grp, return_inverse=True, return_counts=True)
    cls = np.bincount(inv, weights=y) * 2 >= size
    bounds = np.cumsum(shares)[:-1]
    part_of = np.empty(len(size), dtype=np.int64)
    for c in (False, True):
        order = rng.permutation(np.flatnonzero(cls == c))
        ends = np.cumsum(size[order])
        mid = (ends - size[order] / 2) / max(ends[-1], 1) if len(order) else ends
        part_of[order] = np.searchsorted(bounds, mid, side="right")
    return part_of[inv]


def check_rows(y: np.ndarray, parts: List[Part]) -> None:
    for p in parts:
        sizes = [np.bincount(y[r], minlength=2).tolist() for r in (p.fit, p.val, p.test)]
        if min(sizes[0]) < 2 or min(sizes[1]) < 1 or min(sizes[2]) < 1:
            raise LlamaError(
                f"too few examples to split: {len(y)} rows (classes {np.bincount(y).tolist()}) "
                f"leave {sizes[0]} per class to train on, {sizes[1]} to validate and {sizes[2]} "
                "to test; each needs both classes")


def split(y: np.ndarray, grp: np.ndarray, val_frac: float, test_frac: float, folds: int,
          seed: int) -> List[Part]:
    """One train / validation / test split (test_frac of the rows to test, val_frac of the rest to
    validate), or for folds k >= 2 one Part per fold: the fold is the test, val_frac of the other
    folds' rows validates. Stratified by label, grouped by example, seeded."""
    if not 0 < float(val_frac) < 1:
        raise LlamaError(f"--val_frac must be between 0 and 1 (got {val_frac}): an empty split")
    if folds:
        if int(folds) < 2:
            raise LlamaError(f"--folds must be 2 or more (got {folds})")
        fold = deal(y, grp, [1 / int(folds)] * int(folds), seed)
        tests = [np.flatnonzero(fold == i) for i in range(int(folds))]
    else:
        if not 0 < float(test_frac) < 1:
            raise LlamaError(f"--test_frac must be between 0 and 1 (got {test_frac}): "
                             "an empty split")
        tests = [np.flatnonzero(deal(y, grp, [1 - test_frac, test_frac], seed) == 1)]
    parts = []
    for i, test in enumerate(tests):
        rest = np.setdiff1d(np.arange(len(y)), test)
        inner = deal(y[rest], grp[rest], [1 - val_frac, val_frac], seed + 1 + i)
        parts.append(Part(rest[inner == 0], rest[inner == 1], test))
    check_rows(y, parts)
    return parts


def split_table(n: int, parts: List[Part]) -> dict:
    """{'split': [n] names} for split.csv: train / val / test, or for folds the test fold number
    (each fold's own train and validation rows are the other folds' rows)."""
    if len(parts) == 1:
        names = np.empty(n, dtype=object)
        for key in ("fit", "val", "test"):
            names[getattr(parts[0], key)] = "train" if key == "fit" else key
        return {"split": names}
    fold = np.empty(n, dtype=object)
    for i, p in enumerate(parts):
        fold[p.test] = f"fold{i}"
    return {"split": fold}
