"""The streaming loop: a chunk of layers at a time from the memory-mapped cache, every part
(split or fold) fitted and scored on it, then dropped; only the chunk, the probes' parameters
and the scores of the validation and test rows stay resident."""
import contextlib
import ctypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from activations.cache import ActivationCache

from . import data
from .methods import METHODS, Context, fit_one, score_one
from .solvers import Settings, generator

SOLVE_MB = 64.0  # layers one worker solves together: small enough to stay in the CPU cache


@contextlib.contextmanager
def single_threaded():
    """torch ops single-threaded inside, the caller's setting restored after: our threads each take
    whole chunks of work (a shared machine makes one op's threads wait for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def map_big_arrays() -> None:
    """Every chunk's arrays come and go, while small results stay: allocated on glibc's heap (its
    mmap threshold rises to 32 MiB after the first big free), they fragment it and the process
    grows chunk by chunk. A fixed 1 MiB threshold keeps big arrays in mappings of their own, handed
    back to the system when freed. Elsewhere than glibc: nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


@dataclass
class Fitted:
    """One part's results over the layers done so far, lists of per-chunk tensors concatenated
    on the layer axis by `done()`."""

    params: Dict[str, Dict[str, list]] = field(default_factory=dict)  # method -> name -> [c, ...]
    mean: list = field(default_factory=list)  # [c, S, d] training rows' statistics
    std: list = field(default_factory=list)
    val: Dict[str, list] = field(default_factory=dict)  # method -> [c, n_val] oriented scores
    test: Dict[str, list] = field(default_factory=dict)
    other: List[Dict[str, list]] = field(default_factory=list)  # per other cache: method -> [c, n]

    def add(self, out: dict) -> None:
        for m, p in out["params"].items():
            for k, v in p.items():
                self.params.setdefault(m, {}).setdefault(k, []).append(v)
        self.mean.append(out["mean"])
        self.std.append(out["std"])
        for key in ("val", "test"):
            for m, v in out[key].items():
                getattr(self, key).setdefault(m, []).append(v)
        for i, sc in enumerate(out["other"]):
            if len(self.other) <= i:
                self.other.append({})
            for m, v in sc.items():
                self.other[i].setdefault(m, []).append(v)

    def done(self) -> "Fitted":
        cat = lambda d: {m: torch.cat(v) for m, v in d.items()}  # noqa: E731
        return Fitted({m: cat(p) for m, p in self.params.items()}, torch.cat(self.mean),
                      torch.cat(self.std), cat(self.val), cat(self.test),
                      [cat(o) for o in self.other])


def standardise(x, mean, std):
    return x.sub_(mean[:, :, None]).div_(std[:, :, None])


def fit_part(x, layers, y, grp, part: data.Part, number: int, methods, cfg: Settings, lp,
             others) -> dict:
    """Fit every method on part.fit rows of x [c, S, N, d] (raw features of `layers`); score the
    part's validation and test rows and every row of each other cache [(x [c, S, n, d], lp)]
    (standardised in place: the caller's copy)."""
    xf = x[:, :, part.fit]  # a copy, standardised in place
    std, mean = torch.std_mean(xf, 2)
    std = std.clamp_min(1e-6)
    z = standardise(xf, mean, std)
    yf = y[part.fit]
    fold = data.deal(yf, grp[part.fit], [1 / cfg.cv] * cfg.cv, cfg.seed)
    params = {}
    for name in methods:
        gens = [generator(cfg.seed, name, layer, number) for layer in layers]
        ctx = Context(cfg, gens, yf, fold)
        params[name] = fit_one(METHODS[name], z, ctx, None if lp is None else lp[part.fit])
    del z, xf

    def scores(feats, lps):
        if feats.shape[2] == 0:
            return {}
        zz = standardise(feats, mean, std)
        return {m: score_one(METHODS[m], params[m], zz, lps) for m in methods
                if lps is not None or not METHODS[m].reads_logprobs}

    pick = lambda rows: None if lp is None else lp[rows]  # noqa: E731
    return {"params": params, "mean": mean, "std": std,
            "val": scores(x[:, :, part.val], pick(part.val)),
            "test": scores(x[:, :, part.test], pick(part.test)),
            "other": [scores(ox, olp) for ox, olp in others]}


def run(cache: ActivationCache, layers: List[int], methods: List[str], parts: List[data.Part],
        cfg: Settings, other: Optional[List[ActivationCache]] = None,
        progress: bool = True, dropped=None) -> List[Fitted]:
    """Every part fitted and scored on every layer; the other caches (transfer) are scored by the
    first part's probes. -> one Fitted per part. Each worker reads its own group of layers from the
    memory-mapped cache, fits and scores it, and drops it: at most cfg.workers() groups, of at most
    cfg.memory_mb / workers of float32 features each (one layer at least), are resident.
    dropped: [N] bool rows left out (data.nonfinite); any other non-finite value is refused."""
    from tqdm import tqdm

    map_big_arrays()
    y, grp, lp = data.labels(cache), data.groups(cache), cache.logprobs
    uses_lp = any(METHODS[m].input == "logprobs" for m in methods)
    if uses_lp:
        data.check_logprobs(cache, dropped)
    if dropped is not None and lp is not None:
        lp = lp.copy()
        lp[dropped] = 0.0
    other = other or []
    for o in other if uses_lp else []:
        data.check_logprobs(o)
    fitted = [Fitted() for _ in parts]
    workers = cfg.workers()
    groups = data.chunks(layers, cache, min(SOLVE_MB, cfg.memory_mb / workers))
    if len(groups) < workers:  # one layer each, so that every worker has some
        groups = [[layer] for layer in layers]

    def one(group):
        x = data.read(cache, group, dropped=dropped)
        others = [(data.read(c, group), c.logprobs) for c in other]
        return [fit_part(x, group, y, grp, part, p, methods, cfg, lp, others if p == 0 else [])
                for p, part in enumerate(parts)]

    bar = tqdm(total=len(layers), desc="probes", unit="layer", disable=not progress,
               leave=False)
    try:  # a refused chunk (a non-finite value) clears the bar before its error line
        with single_threaded(), ThreadPoolExecutor(workers) as pool:
            for group, outs in zip(groups, pool.map(one, groups)):
                for f, out in zip(fitted, outs):
                    f.add(out)
                bar.update(len(group))
    finally:
        bar.close()
    return [f.done() for f in fitted]
