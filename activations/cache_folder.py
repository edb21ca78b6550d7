"""The cache folder while extraction writes it (rank 0): the lock a second writer is refused
by, what an existing folder holds and whether it is this very cache (then it is reused), the
arrays allocated before any batch runs, and the completion marker written last. Layout:
activations/cache.py."""
import json
import os
import shutil
from typing import Optional

import numpy as np

from . import cache as cache_files
from llama.errors import LlamaError


def stamp_of(path) -> Optional[list]:
    """[name, size, mtime] of a model or tokenizer path's files: same stamp, same files."""
    from llama.convert import stamp

    return stamp(os.fspath(path)) if path is not None and os.path.exists(path) else None


def _old_meta(output: str) -> Optional[dict]:
    """metadata.json of the cache in `output`; None when the folder holds no cache files at all.
    Refuses a folder whose cache-like files (metadata.json, layer_XX/) are not a cache's."""
    try:
        with open(cache_files.meta_file(output)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        meta = None
    except (OSError, ValueError):
        meta = {}
    if meta is not None and (not isinstance(meta, dict)
                             or meta.get("format") != cache_files.FORMAT):
        raise LlamaError(f"--output {output} holds a metadata.json that is not an activation "
                         "cache's: choose another --output")
    stray = [n for n in cache_files.own_entries(output)
             if n != cache_files.LOCK and not n.endswith(".tmp")]
    if meta is None and stray:
        raise LlamaError(f"--output {output} holds {stray[0]} but no cache metadata.json: "
                         "choose another --output, or remove it")
    return meta


def _conflict(output: str, old: dict, settings: dict) -> Optional[str]:
    """Why the cache in `output` is not the one asked for (None: same settings)."""
    diff = [k for k in settings if old.get(k) != settings[k]]
    if not diff:
        return None
    k = diff[0]
    what = {"model_fingerprint": "a different model", "data_sha256": "a different prompt file",
            "tokens_sha256": "differently tokenized prompts"}.get(
        k, f"other settings ({k} {old.get(k)!r}, asked {settings[k]!r})")
    return (f"--output {output} holds a cache of {what}: use --overwrite to replace it, "
            "or another --output")


def precheck(output: str, settings: dict, stamps: Optional[dict], n_layers: int,
             overwrite: bool) -> bool:
    """Rank 0, before any weight is read: refuse an output folder that cannot take this cache,
    and say whether it already holds this very cache (same settings, same model files)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise LlamaError(f"--output {output} exists and is not a directory")
    old = _old_meta(output) if os.path.isdir(output) else None
    if not old:
        return False
    if old.get("model", {}).get("params", {}).get("n_layers", n_layers) != n_layers:
        old = {**old, "settings": {**old.get("settings", {}), "model_fingerprint": None}}
        settings = {"model_fingerprint": "", **settings}  # another depth: another model
    why = _conflict(output, old.get("settings", {}), settings)
    if why and not overwrite:
        raise LlamaError(why)
    complete = os.path.exists(cache_files.info_file(output))
    same_files = stamps is not None and old.get("stamps") == stamps
    return not why and not overwrite and complete and same_files


def _clear(path: str) -> None:
    """Remove a cache's own files (no other file in its folder): its completion marker and
    progress first (a kill half-way leaves something that cannot look complete), metadata last."""
    first = [cache_files.INFO, cache_files.PROGRESS]
    rest = set(cache_files.own_entries(path)) - set(first) - {cache_files.META, cache_files.LOCK}
    for name in first + sorted(rest) + [cache_files.META]:
        f = os.path.join(path, name)
        if os.path.isdir(f):
            shutil.rmtree(f)
        elif os.path.exists(f):
            os.remove(f)


def _lock(output: str) -> int:
    """Take the folder's lock file (flock; a second extraction is refused)."""
    import fcntl

    path = os.path.join(output, cache_files.LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:  # released and removed meanwhile
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise LlamaError(f"--output {output} is being written by another extraction (it holds "
                         f"{path}); wait for it or choose another --output")
    return fd


def _unlock(output: str, fd: int) -> None:
    """Remove the lock file while still holding it, then let go: nothing is left behind."""
    try:
        os.remove(os.path.join(output, cache_files.LOCK))
    except FileNotFoundError:
        pass
    os.close(fd)


def prepare(output: str, meta: dict, specs: dict, offsets: dict, overwrite: bool,
            locks: list) -> Optional[set]:
    """Rank 0: lock the folder, check what it holds, create or reuse the arrays. Returns the
    batches already done, or None when the cache is complete. A refusal leaves the folder as it
    was (no lock file; not even the folder, when it did not exist)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise LlamaError(f"--output {output} exists and is not a directory")
    created = not os.path.exists(output)
    os.makedirs(output, exist_ok=True)
    try:
        fd = _lock(output)
    except LlamaError:
        if created:
            os.rmdir(output)
        raise
    locks.append(fd)  # released when run() ends
    try:
        old = _old_meta(output)
        if old:
            why = _conflict(output, old.get("settings", {}), meta["settings"])
            if why and not overwrite:
                raise LlamaError(why)
            if overwrite:
                _clear(output)
            elif os.path.exists(cache_files.info_file(output)):
                return None
    except LlamaError:
        locks.remove(fd)
        _unlock(output, fd)
        if created:
            os.rmdir(output)
        raise
    if cache_files.is_allocated(output):
        return cache_files.read_done(output)
    try:
        cache_files.write_json(cache_files.meta_file(output), meta)
        for name, (shape, dt) in specs.items():
            cache_files.allocate(output, name, shape, dt)
        for s, off in offsets.items():
            np.save(cache_files.offsets_file(output, s), off)
        cache_files.mark_allocated(output)
    except OSError:  # a half-made cache is worth nothing: leave the folder as it was
        locks.remove(fd)
        if created:
            os.close(fd)
            shutil.rmtree(output, ignore_errors=True)
        else:
            _clear(output)
            _unlock(output, fd)
        raise
    return set()


def size_of(path: str) -> str:
    """Disk size of the cache's own files in folder `path`, e.g. '3.2 MiB'."""
    n = 0
    for name in cache_files.own_entries(path):
        top = os.path.join(path, name)
        walk = os.walk(top) if os.path.isdir(top) else [(path, [], [name])]
        n += sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in walk for f in fs)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def finish(output: str, meta: dict, n_batches: int, info: dict) -> None:
    """Rank 0, after every group is done: check every batch is in, then mark the cache complete."""
    missing = set(range(n_batches)) - cache_files.read_done(output)
    if missing:
        raise LlamaError(f"{output}: {len(missing)} batches were not written; "
                         "run the same command again")
    cache_files.write_json(cache_files.meta_file(output), {**meta, "complete": True})
    cache_files.write_json(cache_files.info_file(output), info)
