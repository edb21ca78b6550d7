"""Extraction: every prompt through the model once, the chosen layers' hidden states streamed into
an activation cache (layout in llama/cache.py). The one implementation behind example.py and
scripts/cache_activations.py, configured by one `Extraction`.

How the work is cut: every prompt is tokenized first. The two sides of a contrast pair share their
longest common token prefix; it runs once (keeping each side at least one token of its own), and
both sides' remaining tokens run on top of its keys and values. Examples are sorted by length and
packed into batches of at most `max_batch_tokens` padded tokens, numbered; each data-parallel group
takes every dp-th batch not yet done. Rows land at each example's original index in preallocated
files, and a writer commits (fsync, then its progress file) every `commit_every` seconds and on
Ctrl-C: rerunning after a kill redoes only uncommitted batches, which gives the same bytes.
"""
import glob
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Literal, Optional

import numpy as np
import torch
import torch.distributed as tdist

from . import cache as C
from .cache import parse_layers
from .errors import LlamaError

SIDES = ("plus", "minus")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Dtype = Literal["float32", "float16", "bfloat16"]


@dataclass
class Extraction:
    """What to extract, from which model, into which cache: the flags of example.py and
    scripts/cache_activations.py.

    model: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    data: the prompt CSV (plus_prompt/minus_prompt or prompt columns), or a JSON file
      generate_dataset.py reads
    output: the cache folder; it may hold other files (they are left alone)
    tokenizer_path: the tokenizer file, when the model's own is not found beside it
    layers: all, 12, 10,20,23 or ranges 0-5 (0: the embedding output, i: block i's output)
    token: last (each prompt's last token), mean (over the prompt) or all (every token)
    dtype: of the cache on disk
    compute_dtype: of the model's weights and arithmetic (default: float32 on CPU, bfloat16 on GPU)
    max_batch_tokens: padded tokens per batch, at most
    batch_size: examples per batch, at most (default: as many as max_batch_tokens allows)
    mp: model-parallel size (default: the world size; the rest of the world is data parallel)
    device: auto, cpu or cuda
    zero_shot: also store each side's answer log-probability (logprobs.npy)
    mean_keep_first: token mean: average position 0 too (by default left out, as the attention
      sink's outlier would dominate the mean; llama.cache.mean_start)
    overwrite: replace a cache made with other settings, or a complete one
    commit_every: seconds between commits of finished work (what a kill can lose)
    steer: cache a steered model: a vectors folder, .npy/.safetensors or saved linear probe
      (llama/steering.py), added at every position of --steer_layers (llama.model.Steer)
    steer_layers: the layers to steer (with --steer), e.g. 14 or 10,14
    multiplier: steering multiplier (with --steer)
    ablate: remove the direction instead of adding it (with --steer; multiplier 1: fully)
    """
    model: str
    data: str
    output: str
    tokenizer_path: Optional[str] = None
    layers: str = "all"
    token: Literal["last", "mean", "all"] = "last"
    dtype: Dtype = "float32"
    compute_dtype: Optional[Dtype] = None
    max_batch_tokens: int = 2048
    batch_size: Optional[int] = None
    mp: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    zero_shot: bool = False
    mean_keep_first: bool = False
    overwrite: bool = False
    commit_every: float = 10.0
    steer: Optional[str] = None
    steer_layers: Optional[str] = None
    multiplier: float = 1.0
    ablate: bool = False

    def check(self) -> None:
        """Refuse values a caller in process may pass (the command line checks its own)."""
        if (self.steer is None) != (self.steer_layers is None):
            raise LlamaError("--steer VECTORS and --steer_layers L go together")
        if self.token not in C.TOKEN_MODES:
            raise LlamaError(f"unknown --token {self.token!r} ({', '.join(C.TOKEN_MODES)})")
        for name in ("dtype", "compute_dtype"):
            v = getattr(self, name)
            if v is not None and v not in C.DTYPES:
                raise LlamaError(f"unknown --{name} {v!r} ({', '.join(C.DTYPES)})")
        for name in ("max_batch_tokens", "batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise LlamaError(f"--{name} {v!r} is not a positive integer")


@dataclass
class Prompts:
    path: str
    sha256: str
    sides: List[str]  # ["plus", "minus"] or ["prompt"]
    texts: List[List[str]]  # [side][example]
    ids: list
    labels: list  # 0/1 or None per example
    types: Optional[list]
    info: dict  # templates / chat format, when the file says


def _label(v, where):
    s = str(v).strip().lower()
    if s in ("", "nan", "none"):
        return None
    if s in ("1", "1.0", "true", "yes"):
        return 1
    if s in ("0", "0.0", "false", "no"):
        return 0
    raise LlamaError(f"{where}: label {v!r} is not 0/1/true/false")


def _frame(path: str, tok):
    """The prompt table of a CSV, or of a JSON file made into prompts as generate_dataset.py
    makes them by default (llama.prompts.file_rows: the tokenizer's chat template or family)."""
    import pandas as pd

    if path.endswith((".json", ".jsonl")):
        from .prompts import file_rows

        rows, chat = file_rows(path, tok)
        if not rows:
            raise LlamaError(f"prompt file {path} has no rows")
        df = pd.DataFrame(rows).astype(str)
        df["chat_format"] = chat
        return df
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise LlamaError(f"prompt file {path} is empty")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise LlamaError(f"prompt file {path} is not a readable CSV ({str(e).splitlines()[0]})")
    return df


def read_prompts(path, tok=None) -> Prompts:
    """A prompt CSV (ARCHITECTURE.md), or a JSON file generate_dataset reads (rendered in the
    tokenizer `tok`'s chat format; plain text without one)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LlamaError(f"no prompt file {path}")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    df = _frame(path, tok)
    cols = set(df.columns)
    if {"plus_prompt", "minus_prompt"} <= cols:
        sides = list(SIDES)
    elif "prompt" in cols:
        sides = ["prompt"]
    else:
        have = ", ".join(map(str, df.columns))
        raise LlamaError(f"prompt file {path} has neither plus_prompt/minus_prompt nor prompt "
                         f"columns (it has: {have})")
    if len(df) == 0:
        raise LlamaError(f"prompt file {path} has no rows")
    texts = [[str(t) for t in df[f"{s}_prompt" if s != "prompt" else s]] for s in sides]
    for s, col in zip(sides, texts):
        for i, t in enumerate(col):
            if not t.strip():
                raise LlamaError(f"prompt file {path}, row {i + 1}: the {s} prompt is empty")
    ids = [str(x) for x in df["idx"]] if "idx" in cols else list(range(len(df)))
    types = [str(t) for t in df["type"]] if "type" in cols else None
    if types is not None:
        bad = next((i for i, t in enumerate(types) if t not in ("testing", "deployment")), None)
        if bad is not None:
            raise LlamaError(f"prompt file {path}, row {bad + 1}: type {types[bad]!r} is not "
                             "testing/deployment")
    if "label" in cols:
        labels = [_label(v, f"prompt file {path}, row {i + 1}") for i, v in enumerate(df["label"])]
    elif types is not None:
        labels = [int(t == "testing") for t in types]
    else:
        labels = [None] * len(df)
    info = {}
    for key in ("template", "chat_format", "system"):
        if key in cols:
            info[key + "s"] = sorted(set(map(str, df[key])))
    return Prompts(path, sha, sides, texts, ids, labels, types, info)


@dataclass
class Plan:
    seqs: List[List[np.ndarray]]  # [side][example] token ids
    lengths: np.ndarray  # [N, sides]
    shared: np.ndarray  # [N] tokens run once for all sides
    answer: np.ndarray  # [N] where the sides start to differ: their answer tokens follow
    batches: List[np.ndarray]  # example numbers, in processing order

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def tokenize(prompts: Prompts, tok, vocab: int, max_len: int) -> List[List[np.ndarray]]:
    seqs = []
    for s, col in zip(prompts.sides, prompts.texts):
        side = []
        for i, text in enumerate(col):
            ids = np.asarray(tok.encode(text, bos=True), dtype=np.int32)
            where = f"{prompts.path}, row {i + 1} (idx {prompts.ids[i]}), {s} prompt"
            if len(ids) > max_len:
                raise LlamaError(f"{where}: {len(ids)} tokens, longer than the model's "
                                 f"max_seq_len {max_len}")
            if len(ids) and ids.max() >= vocab:
                raise LlamaError(f"{where}: token id {ids.max()} is outside the model's "
                                 f"vocabulary ({vocab}): wrong tokenizer?")
            side.append(ids)
        seqs.append(side)
    return seqs


def plan(seqs, zero_shot: bool, max_batch_tokens: int, batch_size: Optional[int]) -> Plan:
    k, n = len(seqs), len(seqs[0])
    lengths = np.array([[len(seqs[s][i]) for s in range(k)] for i in range(n)], dtype=np.int64)
    answer = np.zeros(n, dtype=np.int64)
    shared = np.zeros(n, dtype=np.int64)
    if k > 1:
        for i in range(n):
            a, b = seqs[0][i], seqs[1][i]
            m = min(len(a), len(b))
            diff = np.flatnonzero(a[:m] != b[:m])
            answer[i] = diff[0] if len(diff) else m
        # every side keeps a token of its own; zero-shot also needs the last shared token's logits
        shared = np.minimum(answer - (1 if zero_shot else 0), lengths.min(1) - 1).clip(min=0)
    rest = (lengths - shared[:, None]).max(1)
    order = np.lexsort((rest, shared))
    batches, cur, top_p, top_s = [], [], 0, 0
    for i in order:
        p, r = max(top_p, shared[i]), max(top_s, rest[i])
        cost = (len(cur) + 1) * (p + k * r)
        if cur and (cost > max_batch_tokens or (batch_size and len(cur) >= batch_size)):
            batches.append(np.array(cur))
            cur, p, r = [], shared[i], rest[i]
        cur.append(i)
        top_p, top_s = p, r
    batches.append(np.array(cur))
    return Plan(seqs, lengths, shared, answer, batches)


def _pad(rows, device) -> torch.Tensor:
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for j, r in enumerate(rows):
        out[j, : len(r)] = torch.from_numpy(r.astype(np.int64))
    return out.to(device)


def forward_batch(model, p: Plan, idx: np.ndarray, layers: List[int], token: str,
                  zero_shot: bool, device, keep_first: bool = False, steer=None):
    """One batch -> ({layer: states}, logprobs [B, sides] or None). States are float32
    [B, sides, dim] for token last/mean (the mean by llama.cache.mean_start; keep_first keeps
    position 0); for token all, [side][example] tensors [length, dim]."""
    k = len(p.seqs)
    P = p.shared[idx]
    deepest = model.params.n_layers if zero_shot else max(layers)
    rows = [p.seqs[s][i][p.shared[i]:] for i in idx for s in range(k)]  # row b * k + s
    suffix = _pad(rows, device)
    n = torch.tensor([len(r) for r in rows], device=device)
    pre, start, past = None, None, None
    if P.max() > 0:
        prefix = _pad([p.seqs[0][i][: p.shared[i]] for i in idx], device)
        need = sorted(set(layers if token != "last" else []) | {deepest})
        pre = model(prefix, layers=need, return_kv=True, steer=steer)
        start = torch.from_numpy(P).to(device).repeat_interleave(k)
        past = [(kk.repeat_interleave(k, 0), vv.repeat_interleave(k, 0)) for kk, vv in pre["kv"]]
    out = model(suffix, layers=layers, logits=zero_shot, start=start, past=past, steer=steer)
    B = len(idx)
    real = torch.arange(suffix.shape[1], device=device)[None, :] < n[:, None]  # [B * k, S]
    if token == "mean":  # each row's first position averaged, and its suffix's absolute positions
        first = torch.from_numpy(C.mean_start(p.lengths[idx].reshape(-1), keep_first)).to(device)
        at = torch.arange(suffix.shape[1], device=device)[None, :]
        at = at + (0 if start is None else start[:, None])
        real = real & (at >= first[:, None])
    res = {}
    for layer in layers:
        h = out[layer]
        if token == "last":
            res[layer] = h[torch.arange(B * k, device=device), n - 1].float().view(B, k, -1)
        elif token == "mean":
            tot = (h.float() * real[..., None]).sum(1).view(B, k, -1)
            cnt = real.sum(1).view(B, k).float()
            if pre is not None:  # a shared prefix leaves both sides 2+ tokens: one first position
                pos = torch.arange(prefix.shape[1], device=device)[None, :]
                mask = (pos < start.view(B, k)[:, :1]) & (pos >= first.view(B, k)[:, :1])
                tot = tot + (pre[layer].float() * mask[..., None]).sum(1)[:, None, :]
                cnt = cnt + mask.sum(1).float()[:, None]
            res[layer] = tot / cnt[..., None]
        else:  # the shared prefix's states, then the side's own
            head = [pre[layer][b, : P[b]] if pre is not None else h[b * k, :0] for b in range(B)]
            res[layer] = [[torch.cat([head[b], h[b * k + s, : n[b * k + s]]]).float()
                           for b in range(B)] for s in range(k)]
    logp = None
    if zero_shot:
        logp = torch.zeros(B, k)
        lp = out["logits"].log_softmax(-1)
        for b, i in enumerate(idx):
            for s in range(k):
                ids = torch.from_numpy(p.seqs[s][i].astype(np.int64)).to(device)
                # the answer tokens' positions
                at = torch.arange(max(int(p.answer[i]), 1), len(ids), device=device)
                logp[b, s] = lp[b * k + s, at - 1 - int(P[b]), ids[at]].sum().cpu()
                if not bool(torch.isfinite(out["logits"][b * k + s, at - 1 - int(P[b])]).all()):
                    logp[b, s] = float("nan")  # never a number from non-finite logits
                    _warn_nonfinite(int(i), s)
    return res, logp


def _warn_nonfinite(example: int, side: int) -> None:
    """One line (global rank 0) for an example whose answer positions had NaN or infinite
    logits: its zero-shot log-probability is stored as NaN, which ccs.py refuses (naming the row)
    unless --drop_nonfinite."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: example {example} (prompt-file row {example + 1}), side {side}: "
              "non-finite logits at its answer; zero-shot log-probability stored as NaN "
              "(ccs.py refuses it unless --drop_nonfinite)", file=sys.stderr, flush=True)


def _bits(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the cache stores it (bfloat16 as its raw 16 bits)."""
    x = x.to(TORCH_DTYPES[dtype]).cpu()
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def array_name(layer: int, side: str) -> str:
    return os.path.join(C.layer_dir("", layer), f"{side}.npy")


def arrays(p: Plan, sides, layers, dim: int, dtype: str, token: str, zero_shot: bool) -> dict:
    """{file in the cache: (shape, numpy dtype)} of every array the cache will hold."""
    n = len(p.lengths)
    out = {}
    for layer in layers:
        for j, s in enumerate(sides):
            rows = int(p.lengths[:, j].sum()) if token == "all" else n
            out[array_name(layer, s)] = ((rows, dim), C.storage_dtype(dtype))
    if zero_shot:
        out["logprobs.npy"] = ((n, len(sides)), np.dtype(np.float32))
    return out


def on_main(d, fn):
    """Run fn on global rank 0 and hand its result to every rank. An error there stops every rank;
    only rank 0 reports it, so the user reads one line."""
    result, err = None, None
    if d.rank == 0:
        try:
            result = fn()
        except (LlamaError, OSError) as e:
            err = e
    if d.world > 1:
        box = [result, err is not None]
        tdist.broadcast_object_list(box)
        if box[1] and d.rank != 0:
            raise SystemExit(2)
        result = box[0]
    if err is not None:
        raise err
    return result


def find_data(path: str) -> str:
    """The prompt file, or an error that names any file of that name one folder down."""
    if os.path.isfile(path):
        return path
    parent = os.path.dirname(path) or "."
    near = sorted(glob.glob(os.path.join(glob.escape(parent), "*", os.path.basename(path))))
    hint = f"; there is {' and '.join(near[:3])}" if near else ""
    raise LlamaError(f"--data {path}: no such file{hint}")


def _stamp(path) -> Optional[list]:
    """[name, size, mtime] of a model or tokenizer path's files: same stamp, same files."""
    from .convert import stamp

    return stamp(os.fspath(path)) if path is not None and os.path.exists(path) else None


def _old_meta(output: str) -> Optional[dict]:
    """metadata.json of the cache in `output`; None when the folder holds no cache files at all.
    Refuses a folder whose cache-like files (metadata.json, layer_XX/) are not a cache's."""
    try:
        with open(os.path.join(output, "metadata.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        meta = None
    except (OSError, ValueError):
        meta = {}
    if meta is not None and (not isinstance(meta, dict) or meta.get("format") != C.FORMAT):
        raise LlamaError(f"--output {output} holds a metadata.json that is not an activation "
                         "cache's: choose another --output")
    stray = [n for n in C.own_entries(output) if n != C.LOCK and not n.endswith(".tmp")]
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
    complete = os.path.exists(os.path.join(output, "layer_info.json"))
    same_files = stamps is not None and old.get("stamps") == stamps
    return not why and not overwrite and complete and same_files


def _clear(path: str) -> None:
    """Remove a cache's own files (no other file in its folder): its completion marker and
    progress first (a kill half-way leaves something that cannot look complete), metadata last."""
    first = ["layer_info.json", C.PROGRESS]
    rest = set(C.own_entries(path)) - set(first) - {"metadata.json", C.LOCK}
    for name in first + sorted(rest) + ["metadata.json"]:
        f = os.path.join(path, name)
        if os.path.isdir(f):
            shutil.rmtree(f)
        elif os.path.exists(f):
            os.remove(f)


def _lock(output: str) -> int:
    """Take the folder's lock file (flock; a second extraction is refused)."""
    import fcntl

    path = os.path.join(output, C.LOCK)
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
        os.remove(os.path.join(output, C.LOCK))
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
            elif os.path.exists(os.path.join(output, "layer_info.json")):
                return None
    except LlamaError:
        locks.remove(fd)
        _unlock(output, fd)
        if created:
            os.rmdir(output)
        raise
    if C.is_allocated(output):
        return C.read_done(output)
    try:
        C.write_json(os.path.join(output, "metadata.json"), meta)
        for j, (name, (shape, dt)) in enumerate(specs.items()):
            C.allocate(output, name, shape, dt)
        for s, off in offsets.items():
            np.save(os.path.join(output, f"offsets_{s}.npy"), off)
        C.mark_allocated(output)
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


def _prompts_in(p: Plan, batches, sides) -> int:
    return sum(len(p.batches[b]) for b in batches) * len(sides)


def extract(model, d, p: Plan, output: str, specs: dict, layers, sides, token: str, dtype: str,
            zero_shot: bool, done: set, offsets: dict, commit_every: float,
            keep_first: bool = False, steer=None) -> None:
    """This rank's share of the batches not yet done; its group's writer puts the rows in place.
    Ctrl-C commits what is written, then raises KeyboardInterrupt("K of M prompts committed")."""
    from tqdm import tqdm

    todo = [b for b in range(len(p.batches)) if b not in done][d.dp_rank :: d.dp]
    writer = C.CacheWriter(output, specs, d.dp_rank) if d.is_writer else None
    mine, last = set(done), time.time()
    bar = tqdm(total=_prompts_in(p, todo, sides), unit="prompt", desc="extract",
               disable=not d.is_main, dynamic_ncols=True)
    try:
        t0, ntok = time.time(), 0
        for j, b in enumerate(todo):
            idx = p.batches[b]
            res, logp = forward_batch(model, p, idx, layers, token, zero_shot, d.device,
                                      keep_first, steer)
            if writer is not None:
                put_rows(writer, res, logp, idx, sides, token, dtype, offsets)
                mine.add(b)
                if time.time() - last >= commit_every or j == len(todo) - 1:
                    writer.commit(mine)
                    last = time.time()
            ntok += int(p.lengths[idx].sum())
            bar.update(len(idx) * len(sides))
            bar.set_postfix_str(f"{ntok / max(time.time() - t0, 1e-9):.0f} tokens/s")
    except KeyboardInterrupt:
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun sends a second one
        try:
            if writer is not None:
                writer.commit(mine)
            kept = _prompts_in(p, C.read_done(output), sides)
        finally:
            signal.signal(signal.SIGINT, before)
        total = len(p.lengths) * len(sides)
        msg = f"{kept} of {total} prompts committed; run the same command to resume"
        raise KeyboardInterrupt(msg)
    finally:
        bar.close()
        if writer is not None:
            writer.close()


def put_rows(writer, res, logp, idx, sides, token: str, dtype: str, offsets: dict) -> None:
    """One batch's results into the cache, each example at its own row(s)."""
    for layer, states in res.items():
        for si, s in enumerate(sides):
            name = array_name(layer, s)
            if token == "all":
                for bi, i in enumerate(idx):
                    writer.put(name, int(offsets[s][i]), _bits(states[si][bi], dtype))
            else:
                rows = _bits(states[:, si], dtype)
                for bi, i in enumerate(idx):
                    writer.put(name, int(i), rows[bi])
    if logp is not None:
        for bi, i in enumerate(idx):
            writer.put("logprobs.npy", int(i), logp[bi].numpy())


def _size(path: str) -> str:
    """Disk size of the cache's own files in folder `path`, e.g. '3.2 MiB'."""
    n = 0
    for name in C.own_entries(path):
        top = os.path.join(path, name)
        walk = os.walk(top) if os.path.isdir(top) else [(path, [], [name])]
        n += sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in walk for f in fs)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def finish(output: str, meta: dict, p: Plan, info: dict) -> None:
    """Rank 0, after every group is done: check every batch is in, then mark the cache complete."""
    missing = set(range(len(p.batches))) - C.read_done(output)
    if missing:
        raise LlamaError(f"{output}: {len(missing)} batches were not written; "
                         "run the same command again")
    C.write_json(os.path.join(output, "metadata.json"), {**meta, "complete": True})
    C.write_json(os.path.join(output, "layer_info.json"), info)


def _versions() -> dict:
    import fairscale

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "fairscale": fairscale.__version__}


def describe(lm, path: str, tok, tok_path, prompts: Prompts, p: Plan, d, settings: dict) -> dict:
    """metadata.json, as written at the start (complete false)."""
    path = os.fspath(path)
    return {
        "format": C.FORMAT, "complete": False, "settings": settings,
        "model": {"path": os.path.abspath(path) if os.path.exists(path) else path,
                  "source": lm.source, "fingerprint": lm.fingerprint, "params": asdict(lm.args),
                  "dtype": settings["model_dtype"]},  # the compute dtype
        "tokenizer": {"path": os.path.abspath(str(tok_path)), "chat_format": tok.chat_format},
        "data": {"path": os.path.abspath(prompts.path), "sha256": prompts.sha256,
                 "rows": len(prompts.ids), **prompts.info},
        "sides": prompts.sides, "token": settings["token"], "dtype": settings["dtype"],
        "layers": settings["layers"], "num_examples": len(prompts.ids),
        "zero_shot": settings["zero_shot"], "tokens": p.tokens, "ids": prompts.ids,
        "labels": prompts.labels, "types": prompts.types, "versions": _versions(),
        "parallel": {"world": d.world, "mp": d.mp, "dp": d.dp},
    }


def run(cfg: Extraction, lm=None) -> str:
    """Extract the hidden states of cfg.layers for every prompt of cfg.data into the cache
    cfg.output (layout: llama/cache.py); returns cfg.output. lm: a llama.checkpoint.Loaded to reuse
    in process instead of loading cfg.model. What needs no weights is checked before the load: the
    prompt file, the layers against the checkpoint's header, what the output folder holds, and
    whether that is this very cache already (then nothing is loaded). Bad input: LlamaError."""
    from .checkpoint import load_model, read_args
    from .dist import setup
    from .tokenizer import load_tokenizer

    t0 = time.time()
    cfg.check()
    output, data = os.fspath(cfg.output), find_data(os.fspath(cfg.data))
    d = setup(mp=cfg.mp, device=cfg.device)
    if lm is not None:
        compute = str(next(lm.model.parameters()).dtype).replace("torch.", "")
    else:
        compute = cfg.compute_dtype or ("bfloat16" if d.device.type == "cuda" else "float32")
    n_layers = (lm.args if lm is not None else read_args(cfg.model)).n_layers
    layers = parse_layers(cfg.layers, n_layers)
    with open(data, "rb") as f:
        data_sha = hashlib.sha256(f.read()).hexdigest()
    settings = {"data_sha256": data_sha, "layers": layers, "token": cfg.token, "dtype": cfg.dtype,
                "model_dtype": compute, "zero_shot": bool(cfg.zero_shot),
                "max_batch_tokens": cfg.max_batch_tokens, "batch_size": cfg.batch_size}
    if cfg.token == "mean":  # the rule of llama.cache.mean_start
        settings["mean_keep_first"] = bool(cfg.mean_keep_first)
    if cfg.steer is not None:  # a steered model's cache is another cache
        settings["steer"] = {"vectors": os.path.abspath(cfg.steer),
                             "layers": str(cfg.steer_layers),
                             "multiplier": float(cfg.multiplier), "ablate": bool(cfg.ablate)}
    stamps = None if lm is not None else {"model": _stamp(cfg.model),
                                          "tokenizer": _stamp(cfg.tokenizer_path)}
    if on_main(d, lambda: precheck(output, settings, stamps, n_layers, cfg.overwrite)):
        if d.is_main:
            print(f"{output}: already complete (layers {_span(layers)}), nothing to do",
                  flush=True)
        return output
    lm = lm if lm is not None else load_model(cfg.model, d, compute)
    steer = None
    if cfg.steer is not None:
        from .model import Steer
        from .steering import load_vectors

        vectors = load_vectors(cfg.steer, parse_layers(cfg.steer_layers, lm.args.n_layers),
                               lm.args.dim, lm.args.n_layers, lm.fingerprint)
        steer = Steer(vectors, float(cfg.multiplier), bool(cfg.ablate))
    tok_path = cfg.tokenizer_path or lm.tokenizer_path
    if not tok_path:
        raise LlamaError(f"no tokenizer found beside {cfg.model}: give --tokenizer_path")
    tok = load_tokenizer(tok_path)
    t1 = time.time()
    prompts = read_prompts(data, tok)
    if cfg.zero_shot and len(prompts.sides) == 1:
        raise LlamaError(f"--zero_shot needs contrast pairs (plus_prompt and minus_prompt), "
                         f"{data} has single prompts")
    seqs = tokenize(prompts, tok, lm.args.vocab_size, lm.args.max_seq_len)
    p = plan(seqs, cfg.zero_shot, cfg.max_batch_tokens, cfg.batch_size)
    h = hashlib.sha256()
    for side in seqs:
        for ids in side:
            h.update(ids.tobytes() + b"|")
    settings = {"model_fingerprint": lm.fingerprint, "tokens_sha256": h.hexdigest(), **settings}
    meta = describe(lm, cfg.model, tok, tok_path, prompts, p, d, settings)
    meta["stamps"] = stamps
    sides, token, dtype = prompts.sides, cfg.token, cfg.dtype
    offsets = {}
    if token == "all":
        offsets = {s: np.concatenate([[0], np.cumsum(p.lengths[:, j])])
                   for j, s in enumerate(sides)}
    specs = arrays(p, sides, layers, lm.args.dim, dtype, token, cfg.zero_shot)
    info = {"layers": layers, "num_examples": len(prompts.ids), "hidden_dim": lm.args.dim,
            "dtype": dtype, "token": token, "sides": sides}
    t2 = time.time()
    locks = []  # rank 0's lock on the folder, released (and its file removed) when this run ends
    try:
        done = on_main(d, lambda: prepare(output, meta, specs, offsets, cfg.overwrite, locks))
        if done is None:
            if d.is_main:
                print(f"{output}: already complete ({info['num_examples']} examples, layers "
                      f"{_span(layers)}), nothing to do", flush=True)
            return output
        total = len(p.lengths) * len(sides)
        if done and d.is_main:
            print(f"resuming: {_prompts_in(p, done, sides)} of {total} prompts done", flush=True)
        left = [b for b in range(len(p.batches)) if b not in done]
        ntok = int(sum(p.lengths[p.batches[b]].sum() for b in left))
        nprompts = _prompts_in(p, left, sides)
        extract(lm.model, d, p, output, specs, layers, sides, token, dtype, cfg.zero_shot, done,
                offsets, cfg.commit_every, cfg.mean_keep_first, steer)
        if d.world > 1:
            tdist.barrier()
        secs = time.time() - t2
        meta["timings"] = {"load_s": round(t1 - t0, 3), "prepare_s": round(t2 - t1, 3),
                           "extract_s": round(secs, 3), "resumed_from_batches": len(done),
                           "prompts_per_s": round(nprompts / secs, 2),
                           "tokens_per_s": round(ntok / secs, 1)}
        on_main(d, lambda: finish(output, meta, p, info))
        if d.is_main:
            print(f"cached {info['num_examples']} examples x {len(sides)} side(s), layers "
                  f"{_span(layers)}, token {token}, {dtype} (computed in {compute} on "
                  f"{d.device.type}): {nprompts} prompts, {ntok} tokens in {secs:.1f} s "
                  f"({nprompts / secs:.1f} prompts/s, {ntok / secs:.0f} tokens/s) -> {output} "
                  f"({_size(output)})", flush=True)
        return output
    finally:
        for fd in locks:
            _unlock(output, fd)


def _span(layers) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7'"""
    parts, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ",".join(parts)
