"""The activation cache on disk, and its reader. Imports neither fairscale nor the model.

Layout of a cache directory:
    metadata.json            what it is: model (path, params, fingerprint), tokenizer, data file
                             and its sha256, chat format, token mode, dtype, versions, per-example
                             "ids", "labels" (1: the plus side is true / the prompt is a
                             "testing" one; null when unknown), optional "types", timings, and
                             "complete"
    layer_info.json          {layers, num_examples, hidden_dim, dtype, npy_dtype, encoding, token,
                             sides}; written last, so its presence means the cache is complete.
                             npy_dtype is what np.load returns (uint16 for bfloat16), encoding
                             says what its numbers are and how to open them as float32
    layer_XX/SIDE.npy        one array per side ("plus" and "minus" for contrast pairs, "prompt"
                             for single prompts): [num_examples, hidden_dim] for token "last" or
                             "mean" (the mean state of `mean_state`: settings.mean_keep_first says
                             whether position 0 was kept);
                             [total_tokens, hidden_dim] for token "all", rows of example i being
                             offsets_SIDE.npy[i]:offsets_SIDE.npy[i + 1]. bfloat16 is stored as its
                             raw 16 bits (uint16), since numpy has no bfloat16.
    offsets_SIDE.npy         int64 [num_examples + 1], token "all" only
    logprobs.npy             float32 [num_examples, num_sides], the log-probability of each side's
                             answer tokens (extraction with --zero_shot)
    progress/group_G.json    while extraction runs: {"done": [batch numbers]} committed by the
                             writer of data-parallel group G; the folder exists once every array
                             is allocated
    .lock                    the running extraction holds an flock on it (a second writer is
                             refused)
Every array is a plain .npy: numpy memory-maps it and nothing is pickle.
"""
import json
import os
import re
from typing import Dict, List, Optional

import numpy as np

from llama.errors import LlamaError
from .readout import TOKEN_MODES, mean_start, per_token  # noqa: F401 (where they are read)

FORMAT = "llama-ccs-cache/1"
DTYPES = ("float32", "float16", "bfloat16")
def mean_state(a: np.ndarray, offsets: np.ndarray, keep_first: bool = False) -> np.ndarray:
    """Each example's mean state from a token "all" array: a [total_tokens, d], example i's rows
    offsets[i]:offsets[i + 1] -> [num_examples, d] float32 (summed in float64), by mean_start."""
    off = np.asarray(offsets, dtype=np.int64)
    start = off[:-1] + mean_start(np.diff(off), keep_first)
    out = np.empty((len(off) - 1, a.shape[1]), dtype=np.float32)
    for i, (lo, hi) in enumerate(zip(start, off[1:])):
        out[i] = np.asarray(a[lo:hi], dtype=np.float64).mean(0)
    return out


def span(layers) -> str:
    """[0, 1, 2, 3, 7] -> '0-3, 7'."""
    out, layers = [], sorted(layers)
    for i, x in enumerate(layers):
        if i and x == layers[i - 1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def parse_layers(spec, available, where: str = "this model") -> List[int]:
    """The one `--layers` syntax: 'all' (or None), 12, '10,20,23', '0-3,7' (ranges inclusive) or a
    list of those -> sorted, distinct layer numbers. available: the layers there are, a list or
    an int n (layers 0..n: the embedding output and n blocks); where: what holds them (errors)."""
    have = list(range(available + 1)) if isinstance(available, int) else sorted(available)
    if spec is None or str(spec).strip().lower() == "all":
        return have
    items = list(spec) if isinstance(spec, (list, tuple)) else str(spec).split(",")
    layers = set()
    for item in items:
        s = str(item).strip()
        try:
            if "-" in s.lstrip("-"):
                a, b = s.split("-", 1)
                layers.update(range(int(a), int(b) + 1))
            else:
                layers.add(int(s))
        except ValueError:
            raise LlamaError(f"--layers: {s!r} is not a layer number, a range a-b or 'all'") \
                from None
    if not layers:
        raise LlamaError(f"--layers {spec!r} names no layer")
    bad = sorted(layers - set(have))
    if bad:
        raise LlamaError(f"--layers: layer {bad[0]} not in {where} (it has layers {span(have)})")
    return sorted(layers)


META = "metadata.json"
INFO = "layer_info.json"
LOGPROBS = "logprobs.npy"


def layer_dir(root: str, layer: int) -> str:
    """The cache's file names, built here only: layer_LL/, layer_LL/SIDE.npy, offsets_SIDE.npy,
    metadata.json, layer_info.json, logprobs.npy (root "": the name relative to the cache
    folder)."""
    return os.path.join(root, f"layer_{layer:02d}")


def side_file(root: str, layer: int, side: str) -> str:
    return os.path.join(layer_dir(root, layer), f"{side}.npy")


def offsets_file(root: str, side: str) -> str:
    return os.path.join(root, f"offsets_{side}.npy")


def meta_file(root: str) -> str:
    return os.path.join(root, META)


def info_file(root: str) -> str:
    return os.path.join(root, INFO)


def logprobs_file(root: str) -> str:
    return os.path.join(root, LOGPROBS)


def storage_dtype(dtype: str):
    """numpy dtype an array of `dtype` is stored as."""
    return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)


def encoding(dtype: str) -> dict:
    """How a layer's .npy holds values of cache dtype `dtype`, for layer_info.json: the numpy
    dtype np.load returns ("npy_dtype") and what its numbers mean ("encoding")."""
    if dtype == "bfloat16":
        return {"npy_dtype": "uint16", "encoding": (
            "raw bfloat16 bits (numpy has no bfloat16): np.load gives uint16 integers, not "
            "values; as float32: activations.cache.ActivationCache(cache).array(layer, side), or "
            "np.load(file, mmap_mode='r').view(ml_dtypes.bfloat16).astype('float32')")}
    return {"npy_dtype": dtype, "encoding": f"{dtype} values, as np.load returns them"}


def bf16_to_float32(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def nonfinite_rows(a: np.ndarray) -> np.ndarray:
    """Indices of the rows of a float array [N, ...] holding a NaN or an infinity. One float32
    sum over the array first (as fast as the read; NaN and inf always reach it); only when it is
    not finite (bad values, or finite ones overflowing) is each row checked."""
    flat = a.reshape(len(a), -1) if len(a) else a.reshape(0, 1)
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(flat)):
            return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(~np.isfinite(flat).all(1))


def write_json(path: str, obj) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ActivationCache:
    """A complete cache, opened lazily: arrays are memory-mapped when asked for."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise LlamaError(f"no activation cache at {path}")
        info_path = info_file(path)
        meta_path = meta_file(path)
        if not os.path.exists(info_path):
            if os.path.exists(meta_path):
                raise LlamaError(f"cache {path} is incomplete (extraction did not finish): "
                                 "run the same command again to resume")
            raise LlamaError(f"{path} is not an activation cache (no layer_info.json)")
        try:
            with open(info_path) as f:
                self.info = json.load(f)
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LlamaError(f"cache {path}: cannot read its metadata ({e})")
        for key in ("layers", "num_examples", "hidden_dim", "dtype", "token", "sides"):
            if key not in self.info:
                raise LlamaError(f"cache {path}: layer_info.json has no {key!r}")
        if not self.meta.get("complete", False):
            raise LlamaError(f"cache {path} is incomplete (extraction did not finish): "
                             "run the same command again to resume")
        self.layers: List[int] = list(self.info["layers"])
        self.num_examples: int = self.info["num_examples"]
        self.hidden_dim: int = self.info["hidden_dim"]
        self.dtype: str = self.info["dtype"]
        self.token: str = self.info["token"]
        self.sides: List[str] = list(self.info["sides"])
        for layer in self.layers:
            for side in self.sides:
                f = side_file(path, layer, side)
                if not os.path.exists(f):
                    raise LlamaError(f"cache {path} is missing {f}")

    @property
    def ids(self) -> list:
        return self.meta.get("ids") or list(range(self.num_examples))

    @property
    def labels(self) -> Optional[np.ndarray]:
        labels = self.meta.get("labels")
        if labels is None or any(x is None for x in labels):
            return None
        return np.asarray(labels, dtype=np.int64)

    @property
    def types(self) -> Optional[list]:
        return self.meta.get("types")

    @property
    def mean_keep_first(self) -> Optional[bool]:
        """Token "mean" caches: whether the mean kept position 0 (mean_start); caches written
        before the rule averaged every position (True). None for other token modes."""
        if self.token != "mean":
            return None
        return bool(self.meta.get("settings", {}).get("mean_keep_first", True))

    @property
    def fingerprint(self) -> Optional[str]:
        return self.meta.get("model", {}).get("fingerprint")

    @property
    def is_contrast(self) -> bool:
        return self.sides == ["plus", "minus"]

    def _check(self, layer: int, side: str) -> None:
        if layer not in self.layers:
            raise LlamaError(f"layer {layer} not in cache {self.path} "
                             f"(cached: {', '.join(map(str, self.layers))})")
        if side not in self.sides:
            raise LlamaError(f"side {side!r} not in cache {self.path} "
                             f"(sides: {', '.join(self.sides)})")

    def raw(self, layer: int, side: str) -> np.ndarray:
        """The stored array, memory-mapped (uint16 bit patterns for bfloat16)."""
        self._check(layer, side)
        return np.load(side_file(self.path, layer, side), mmap_mode="r")

    def rows(self, layer: int, side: str) -> "Rows":
        """One layer and side read as float32 a slice of rows at a time (a layer larger than
        memory: a token "all" cache of a big model)."""
        return Rows(self.raw(layer, side), self.dtype == "bfloat16")

    def array(self, layer: int, side: str) -> np.ndarray:
        """One layer and side as float32 (a copy, converted from the stored dtype)."""
        a = self.raw(layer, side)
        return bf16_to_float32(a) if self.dtype == "bfloat16" else np.asarray(a, dtype=np.float32)

    def tensor(self, layer: int, side: str):
        """One layer and side as a torch tensor in the stored dtype (bfloat16 stays bfloat16)."""
        import torch

        t = torch.from_numpy(np.array(self.raw(layer, side)))
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def layer(self, layer: int) -> Dict[str, np.ndarray]:
        """{side: float32 array} for one layer."""
        return {side: self.array(layer, side) for side in self.sides}

    def offsets(self, side: str) -> np.ndarray:
        """Token "all" caches: rows of example i are offsets[i]:offsets[i + 1]."""
        if not per_token(self.token):
            raise LlamaError(f"cache {self.path} holds one vector per example "
                             f"(token {self.token!r}), not all tokens")
        return np.load(offsets_file(self.path, side))

    @property
    def logprobs(self) -> Optional[np.ndarray]:
        f = logprobs_file(self.path)
        return np.load(f) if os.path.exists(f) else None


class Rows:
    """A stored array read lazily: rows[a:b] -> [b - a, d] float32 (bfloat16 widened)."""

    def __init__(self, raw: np.ndarray, bf16: bool):
        self.raw, self.bf16, self.shape = raw, bf16, raw.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        a = self.raw[rows]
        return bf16_to_float32(a) if self.bf16 else np.asarray(a, dtype=np.float32)

    def blocks(self, mb: float = 64.0):
        """Consecutive row slices of about mb MiB of float32 each."""
        k = max(1, int(mb * 2**20 // (4 * self.shape[1])))
        return (slice(i, i + k) for i in range(0, self.shape[0], k))


def save_cache(
    path: str,
    arrays: Dict[int, Dict[str, np.ndarray]],
    meta: dict,
    dtype: str = "float32",
    token: str = "last",
    offsets: Optional[Dict[str, np.ndarray]] = None,
    logprobs: Optional[np.ndarray] = None,
) -> None:
    """Write a complete cache from arrays in memory ({layer: {side: float array}}). For tests and
    small tools; extraction streams into the same layout chunk by chunk."""
    if dtype not in DTYPES:
        raise LlamaError(f"unknown cache dtype {dtype!r} ({', '.join(DTYPES)})")
    layers = sorted(arrays)
    sides = list(arrays[layers[0]])
    first = arrays[layers[0]][sides[0]]
    n = len(offsets[sides[0]]) - 1 if offsets else first.shape[0]
    os.makedirs(path, exist_ok=True)
    for layer in layers:
        os.makedirs(layer_dir(path, layer), exist_ok=True)
        for side in sides:
            a = np.asarray(arrays[layer][side], dtype=np.float32)
            if dtype == "bfloat16":
                import torch

                a = torch.from_numpy(np.ascontiguousarray(a)).bfloat16().view(torch.uint16).numpy()
            else:
                a = a.astype(dtype)
            np.save(side_file(path, layer, side), a)
    for side, off in (offsets or {}).items():
        np.save(offsets_file(path, side), np.asarray(off, dtype=np.int64))
    if logprobs is not None:
        np.save(logprobs_file(path), np.asarray(logprobs, dtype=np.float32))
    meta = {"format": FORMAT, **meta, "token": token, "dtype": dtype, "complete": True}
    meta.setdefault("ids", list(range(n)))
    write_json(meta_file(path), meta)
    info = {"layers": layers, "num_examples": n, "hidden_dim": int(first.shape[1]), "dtype": dtype,
            **encoding(dtype), "token": token, "sides": sides}
    write_json(info_file(path), info)


PROGRESS = "progress"  # folder of progress files; it exists only once every array is allocated
LOCK = ".lock"


def own_entries(path: str) -> List[str]:
    """The names in folder `path` that belong to a cache (a cache may share its folder with other
    files, e.g. the prompts it was made from: those are never touched)."""
    pat = re.compile(r"(metadata\.json|layer_info\.json|logprobs\.npy|offsets_\w+\.npy|layer_\d+|"
                     + re.escape(PROGRESS) + "|" + re.escape(LOCK) + r")(\.tmp)?")
    return sorted(n for n in os.listdir(path) if pat.fullmatch(n))


def allocate(path: str, name: str, shape: tuple, dt) -> None:
    """Create one array of a cache at full size, its blocks reserved now, so a full disk fails here
    with ENOSPC and never later as a crash on a write into a sparse file."""
    f = os.path.join(path, name)
    os.makedirs(os.path.dirname(f), exist_ok=True)
    try:
        m = np.lib.format.open_memmap(f, mode="w+", dtype=dt, shape=shape)
        size = m.offset + m.nbytes
        del m
        fd = os.open(f, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as e:  # say which file: neither numpy nor fallocate does
        raise OSError(e.errno, e.strerror, f) from None


def mark_allocated(path: str) -> None:
    os.makedirs(os.path.join(path, PROGRESS), exist_ok=True)


def is_allocated(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PROGRESS))


def read_done(path: str) -> set:
    """Work units (batch numbers) that some writer has committed, over all its progress files."""
    done = set()
    folder = os.path.join(path, PROGRESS)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                done.update(json.load(f)["done"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LlamaError(f"cache {path}: progress file {name} is unreadable; "
                             "use --overwrite to start again")
    return done


class CacheWriter:
    """Writes rows in place into a cache's preallocated .npy files. Several processes may hold one
    each, writing disjoint rows. `commit` makes the rows durable, then records the finished work
    units in this writer's own progress file, so a kill at any moment loses at most uncommitted
    work."""

    def __init__(self, path: str, arrays: Dict[str, tuple], group: int = 0):
        self.path, self.group = path, group
        self.files = {}
        for name, (shape, dt) in arrays.items():
            f = os.path.join(path, name)
            m = np.load(f, mmap_mode="r")
            if m.shape != tuple(shape) or m.dtype != np.dtype(dt):
                raise LlamaError(f"cache {path}: {name} is {m.dtype}{list(m.shape)}, "
                                 f"expected {np.dtype(dt)}{list(shape)}")
            offset, row = m.offset, m.itemsize * int(np.prod(shape[1:]))
            del m
            self.files[name] = (os.open(f, os.O_RDWR), offset, row, np.dtype(dt))

    def put(self, name: str, row: int, a: np.ndarray) -> None:
        """Write a (one row, or several consecutive rows) starting at row `row` of array `name`."""
        fd, offset, size, dt = self.files[name]
        buf = memoryview(np.ascontiguousarray(a, dtype=dt)).cast("B")
        pos = offset + row * size
        while buf:  # pwrite may write less than asked (over 2 GiB at once)
            n = os.pwrite(fd, buf, pos)
            buf, pos = buf[n:], pos + n

    def commit(self, done) -> None:
        for fd, *_ in self.files.values():
            os.fsync(fd)
        write_json(os.path.join(self.path, PROGRESS, f"group_{self.group}.json"),
                   {"done": sorted(done)})

    def close(self) -> None:
        for fd, *_ in self.files.values():
            os.close(fd)
        self.files = {}
