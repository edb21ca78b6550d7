"""Extraction: every prompt through the model once, the chosen layers' hidden states streamed into an
activation cache (layout in llama/cache.py). The one implementation behind example.py and
scripts/cache_activations.py.

How the work is cut: every prompt is tokenized first. The two sides of a contrast pair share their
longest common token prefix; it runs once (keeping each side at least one token of its own), and both
sides' remaining tokens run on top of its keys and values. Examples are sorted by length and packed
into batches of at most `max_batch_tokens` padded tokens, numbered; each data-parallel group takes
every dp-th batch not yet done. Rows land at each example's original index in preallocated files, and
a writer commits (fsync, then its progress file) every `commit_every` seconds: rerunning after a kill
redoes only uncommitted batches, which gives the same bytes.
"""
import hashlib
import json
import os
import platform
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as tdist

from . import cache as C
from .errors import LlamaError

SIDES = ("plus", "minus")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def _frame(path: str, chat: str):
    """The prompt table of a CSV, or of a JSON file made into prompts the way generate_dataset does
    (its first template, the tokenizer's chat format)."""
    import pandas as pd

    if path.endswith((".json", ".jsonl")):
        import generate_dataset as g  # a tool of its own: only JSON input needs it

        fmt, examples = g.load(path, None, 0)
        single = fmt == "validation"
        templates = g.pick_templates(fmt, single, None)
        rows = [r for ex in examples for r in g.make_rows(ex, templates, chat, None, single)]
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


def read_prompts(path, chat: str = "none") -> Prompts:
    """A prompt CSV (ARCHITECTURE.md), or a JSON file generate_dataset reads (prompts in `chat` format)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LlamaError(f"no prompt file {path}")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    df = _frame(path, chat)
    cols = set(df.columns)
    if {"plus_prompt", "minus_prompt"} <= cols:
        sides = list(SIDES)
    elif "prompt" in cols:
        sides = ["prompt"]
    else:
        raise LlamaError(f"prompt file {path} has neither plus_prompt/minus_prompt nor prompt columns (it has: {', '.join(map(str, df.columns))})")
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
            raise LlamaError(f"prompt file {path}, row {bad + 1}: type {types[bad]!r} is not testing/deployment")
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


def parse_layers(spec, n_layers: int) -> List[int]:
    """'all', 12, '10,20,23', (10, 20, 23) (what fire makes of 10,20,23), '0-5,12' (ranges inclusive)."""
    if spec is None or str(spec).strip().lower() == "all":
        return list(range(n_layers + 1))
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
            raise LlamaError(f"--layers: {s!r} is not a layer number, a range a-b or 'all'")
    bad = sorted(x for x in layers if not 0 <= x <= n_layers)
    if bad or not layers:
        raise LlamaError(f"--layers: layer {bad[0] if bad else spec} out of range: this model has layers 0..{n_layers}")
    return sorted(layers)


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
                raise LlamaError(f"{where}: {len(ids)} tokens, longer than the model's max_seq_len {max_len}")
            if len(ids) and ids.max() >= vocab:
                raise LlamaError(f"{where}: token id {ids.max()} is outside the model's vocabulary ({vocab}): wrong tokenizer?")
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
        # every side keeps a token of its own; zero-shot also needs the logits of the last shared token
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


def forward_batch(model, p: Plan, idx: np.ndarray, layers: List[int], token: str, zero_shot: bool, device):
    """One batch -> ({layer: states}, logprobs [B, sides] or None). States are float32 [B, sides, dim]
    for token last/mean; for token all, [side][example] tensors [length, dim]."""
    k = len(p.seqs)
    P = p.shared[idx]
    deepest = model.params.n_layers if zero_shot else max(layers)
    rows = [p.seqs[s][i][p.shared[i]:] for i in idx for s in range(k)]  # example-major: row b * k + s
    suffix = _pad(rows, device)
    n = torch.tensor([len(r) for r in rows], device=device)
    pre, start, past = None, None, None
    if P.max() > 0:
        prefix = _pad([p.seqs[0][i][: p.shared[i]] for i in idx], device)
        need = sorted(set(layers if token != "last" else []) | {deepest})
        pre = model(prefix, layers=need, return_kv=True)
        start = torch.from_numpy(P).to(device).repeat_interleave(k)
        past = [(kk.repeat_interleave(k, 0), vv.repeat_interleave(k, 0)) for kk, vv in pre["kv"]]
    out = model(suffix, layers=layers, logits=zero_shot, start=start, past=past)
    B = len(idx)
    real = torch.arange(suffix.shape[1], device=device)[None, :] < n[:, None]  # [B * k, S]
    res = {}
    for layer in layers:
        h = out[layer]
        if token == "last":
            res[layer] = h[torch.arange(B * k, device=device), n - 1].float().view(B, k, -1)
        elif token == "mean":
            tot = (h.float() * real[..., None]).sum(1).view(B, k, -1)
            cnt = n.view(B, k).float()
            if pre is not None:
                mask = torch.arange(prefix.shape[1], device=device)[None, :] < start.view(B, k)[:, :1]
                tot = tot + (pre[layer].float() * mask[..., None]).sum(1)[:, None, :]
                cnt = cnt + start.view(B, k).float()
            res[layer] = tot / cnt[..., None]
        else:  # the shared prefix's states, then the side's own
            head = [pre[layer][b, : P[b]] if pre is not None else h[b * k, :0] for b in range(B)]
            res[layer] = [[torch.cat([head[b], h[b * k + s, : n[b * k + s]]]).float() for b in range(B)] for s in range(k)]
    logp = None
    if zero_shot:
        logp = torch.zeros(B, k)
        lp = out["logits"].log_softmax(-1)
        for b, i in enumerate(idx):
            for s in range(k):
                ids = torch.from_numpy(p.seqs[s][i].astype(np.int64)).to(device)
                at = torch.arange(max(int(p.answer[i]), 1), len(ids), device=device)  # answer token positions
                logp[b, s] = lp[b * k + s, at - 1 - int(P[b]), ids[at]].sum().cpu()
    return res, logp


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


def _maybe_die(stage: str, count: int) -> None:
    """For the tests of resuming: LLAMA_EXTRACT_KILL="STAGE:K" SIGKILLs this process at "alloc:K" (the
    K-th array created), "write:K" (the K-th batch's rows written, not committed) or "commit:K"."""
    want = os.environ.get("LLAMA_EXTRACT_KILL", "")
    if want == f"{stage}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


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


def _is_cache(path: str) -> bool:
    try:
        with open(os.path.join(path, "metadata.json")) as f:
            return json.load(f).get("format") == C.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _clear(path: str) -> None:
    """Empty a cache directory, its completion marker and progress first (a kill half-way leaves
    something that cannot look complete), its metadata last."""
    first = ["layer_info.json", C.PROGRESS]
    names = first + sorted(set(os.listdir(path)) - set(first) - {"metadata.json", C.LOCK}) + ["metadata.json"]
    for name in names:
        f = os.path.join(path, name)
        if os.path.isdir(f):
            shutil.rmtree(f)
        elif os.path.exists(f):
            os.remove(f)


def prepare(output: str, meta: dict, specs: dict, offsets: dict, overwrite: bool, locks: list) -> Optional[set]:
    """Rank 0: lock the directory, check what it holds, create or reuse the arrays. Returns the
    batches already done, or None when the cache is complete."""
    import fcntl

    if os.path.exists(output) and not os.path.isdir(output):
        raise LlamaError(f"--output {output} exists and is not a directory")
    created = not os.path.exists(output)
    os.makedirs(output, exist_ok=True)
    fd = os.open(os.path.join(output, C.LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LlamaError(f"{output} is being written by another extraction (it holds {os.path.join(output, C.LOCK)}); wait for it or choose another --output")
    locks.append(fd)  # released when run() returns, or when the process dies
    names = [x for x in os.listdir(output) if x != C.LOCK and not x.endswith(".tmp")]
    if names and not _is_cache(output):
        raise LlamaError(f"--output {output} is not empty and holds no activation cache: choose another directory")
    if names:
        with open(os.path.join(output, "metadata.json")) as f:
            old = json.load(f).get("settings", {})
        diff = [k for k in meta["settings"] if old.get(k) != meta["settings"][k]]
        if diff and not overwrite:
            k = diff[0]
            what = {"model_fingerprint": "a different model", "data_sha256": "a different prompt file",
                    "tokens_sha256": "differently tokenized prompts"}.get(k, f"other settings ({k} {old.get(k)!r}, asked {meta['settings'][k]!r})")
            raise LlamaError(f"{output} holds a cache of {what}: use --overwrite to replace it, or another --output")
        if overwrite:
            _clear(output)
        elif os.path.exists(os.path.join(output, "layer_info.json")):
            return None
    if C.is_allocated(output):
        return C.read_done(output)
    try:
        C.write_json(os.path.join(output, "metadata.json"), meta)
        for j, (name, (shape, dt)) in enumerate(specs.items()):
            C.allocate(output, name, shape, dt)
            _maybe_die("alloc", j + 1)
        for s, off in offsets.items():
            np.save(os.path.join(output, f"offsets_{s}.npy"), off)
        C.mark_allocated(output)
    except OSError:  # a half-made cache is worth nothing: leave the directory as it was
        if created:
            shutil.rmtree(output, ignore_errors=True)
        else:
            _clear(output)
        raise
    return set()


def extract(model, d, p: Plan, output: str, specs: dict, layers, sides, token: str, dtype: str,
            zero_shot: bool, done: set, offsets: dict, commit_every: float) -> None:
    """This rank's share of the batches not yet done; its group's writer puts the rows in place."""
    from tqdm import tqdm

    todo = [b for b in range(len(p.batches)) if b not in done][d.dp_rank :: d.dp]
    writer = C.CacheWriter(output, specs, d.dp_rank) if d.is_writer else None
    mine, commits, last = set(done), 0, time.time()
    bar = tqdm(total=sum(len(p.batches[b]) for b in todo) * len(sides), unit="prompt", desc="extract",
               disable=not d.is_main, dynamic_ncols=True)
    try:
        t0, ntok = time.time(), 0
        for j, b in enumerate(todo):
            idx = p.batches[b]
            res, logp = forward_batch(model, p, idx, layers, token, zero_shot, d.device)
            if writer is not None:
                put_rows(writer, res, logp, idx, sides, token, dtype, offsets)
                mine.add(b)
                _maybe_die("write", j + 1)
                if time.time() - last >= commit_every or j == len(todo) - 1:
                    writer.commit(mine)
                    commits, last = commits + 1, time.time()
                    _maybe_die("commit", commits)
            ntok += int(p.lengths[idx].sum())
            bar.update(len(idx) * len(sides))
            bar.set_postfix_str(f"{ntok / max(time.time() - t0, 1e-9):.0f} tokens/s")
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
    n = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def finish(output: str, meta: dict, p: Plan, info: dict) -> None:
    """Rank 0, after every group is done: check every batch is in, then mark the cache complete."""
    missing = set(range(len(p.batches))) - C.read_done(output)
    if missing:
        raise LlamaError(f"{output}: {len(missing)} batches were not written; run the same command again")
    C.write_json(os.path.join(output, "metadata.json"), {**meta, "complete": True})
    C.write_json(os.path.join(output, "layer_info.json"), info)


def _versions() -> dict:
    import fairscale

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "fairscale": fairscale.__version__}


def describe(lm, model, tok, tok_path, prompts: Prompts, p: Plan, d, settings: dict) -> dict:
    """metadata.json, as written at the start (complete false)."""
    path = str(model) if not hasattr(model, "model") else None  # a Loaded passed in process has no path
    return {
        "format": C.FORMAT, "complete": False, "settings": settings,
        "model": {"path": os.path.abspath(path) if path and os.path.exists(path) else path, "source": lm.source,
                  "fingerprint": lm.fingerprint, "params": asdict(lm.args), "dtype": settings["model_dtype"]},
        "tokenizer": {"path": os.path.abspath(str(tok_path)), "chat_format": tok.chat_format},
        "data": {"path": os.path.abspath(prompts.path), "sha256": prompts.sha256, "rows": len(prompts.ids), **prompts.info},
        "sides": prompts.sides, "token": settings["token"], "dtype": settings["dtype"], "layers": settings["layers"],
        "num_examples": len(prompts.ids), "zero_shot": settings["zero_shot"], "tokens": p.tokens, "ids": prompts.ids,
        "labels": prompts.labels, "types": prompts.types, "versions": _versions(),
        "parallel": {"world": d.world, "mp": d.mp, "dp": d.dp},
    }


def run(model, data, output, layers="all", token="last", dtype="float32", model_dtype=None,
        max_batch_tokens=2048, batch_size=None, mp=0, device="auto", zero_shot=False, overwrite=False,
        tokenizer=None, commit_every=10.0):
    """Extract hidden states of `layers` for every prompt of `data` into the cache `output`.

    model: Meta dir, Hugging Face dir, .gguf file or Hugging Face id (local cache only); in process
      also a llama.checkpoint.Loaded, to reuse a loaded model.
    data: prompt CSV (plus_prompt/minus_prompt or prompt columns), or a JSON file generate_dataset reads.
    layers: all, 12, 10,20,23 or ranges 0-5 (0 is the embedding output, i the output of block i).
    token: last (each prompt's last token), mean (over the prompt) or all (every token, ragged).
    dtype: of the cache (float32, float16, bfloat16); model_dtype: of the model (default: dtype).
    max_batch_tokens / batch_size: bound each batch (padded tokens / examples).
    mp: model-parallel size (default: the world size); the rest of the world is data parallel.
    zero_shot: also store each side's answer log-probability (logprobs.npy).
    overwrite: replace a cache of other settings, or a complete one.
    tokenizer: tokenizer file, when the model's own is not found beside it.
    commit_every: seconds between commits of finished work (what a kill can lose).
    """
    from .checkpoint import Loaded, load_model
    from .dist import setup
    from .tokenizer import load_tokenizer

    t0 = time.time()
    if token not in C.TOKEN_MODES:
        raise LlamaError(f"unknown --token {token!r} ({', '.join(C.TOKEN_MODES)})")
    for name, v in (("dtype", dtype), ("model_dtype", model_dtype or dtype)):
        if v not in C.DTYPES:
            raise LlamaError(f"unknown --{name} {v!r} ({', '.join(C.DTYPES)})")
    for name, v in (("max_batch_tokens", max_batch_tokens), ("batch_size", batch_size or 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LlamaError(f"--{name} {v!r} is not a positive integer")
    output = os.fspath(output)
    d = setup(mp=mp, device=device)
    lm = model if isinstance(model, Loaded) else load_model(model, d, model_dtype or dtype)
    tok_path = tokenizer or lm.tokenizer_path
    if not tok_path:
        raise LlamaError(f"no tokenizer found beside {model}: give --tokenizer_path")
    tok = load_tokenizer(tok_path)
    t1 = time.time()
    layers = parse_layers(layers, lm.args.n_layers)
    prompts = read_prompts(data, tok.chat_format)
    if zero_shot and len(prompts.sides) == 1:
        raise LlamaError(f"--zero_shot needs contrast pairs (plus_prompt and minus_prompt), {data} has single prompts")
    seqs = tokenize(prompts, tok, lm.args.vocab_size, lm.args.max_seq_len)
    p = plan(seqs, zero_shot, max_batch_tokens, batch_size)
    h = hashlib.sha256()
    for side in seqs:
        for ids in side:
            h.update(ids.tobytes() + b"|")
    settings = {"model_fingerprint": lm.fingerprint, "data_sha256": prompts.sha256, "tokens_sha256": h.hexdigest(),
                "layers": layers, "token": token, "dtype": dtype,
                "model_dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
                "zero_shot": bool(zero_shot), "max_batch_tokens": max_batch_tokens, "batch_size": batch_size}
    meta = describe(lm, model, tok, tok_path, prompts, p, d, settings)
    sides = prompts.sides
    offsets = {s: np.concatenate([[0], np.cumsum(p.lengths[:, j])]) for j, s in enumerate(sides)} if token == "all" else {}
    specs = arrays(p, sides, layers, lm.args.dim, dtype, token, zero_shot)
    info = {"layers": layers, "num_examples": len(prompts.ids), "hidden_dim": lm.args.dim, "dtype": dtype, "token": token, "sides": sides}
    t2 = time.time()
    locks = []  # rank 0's lock on the directory, released when this run ends
    try:
        done = on_main(d, lambda: prepare(output, meta, specs, offsets, overwrite, locks))
        if done is None:
            if d.is_main:
                print(f"{output}: already complete ({info['num_examples']} examples, layers {_span(layers)}), nothing to do", flush=True)
            return output
        left = [b for b in range(len(p.batches)) if b not in done]
        ntok = int(sum(p.lengths[p.batches[b]].sum() for b in left))
        nprompts = sum(len(p.batches[b]) for b in left) * len(sides)
        extract(lm.model, d, p, output, specs, layers, sides, token, dtype, zero_shot, done, offsets, commit_every)
        if d.world > 1:
            tdist.barrier()
        secs = time.time() - t2
        meta["timings"] = {"load_s": round(t1 - t0, 3), "prepare_s": round(t2 - t1, 3), "extract_s": round(secs, 3),
                           "resumed_from_batches": len(done), "prompts_per_s": round(nprompts / secs, 2),
                           "tokens_per_s": round(ntok / secs, 1)}
        on_main(d, lambda: finish(output, meta, p, info))
        if d.is_main:
            print(f"cached {info['num_examples']} examples x {len(sides)} side(s), layers {_span(layers)}, token {token}, "
                  f"{dtype}: {nprompts} prompts, {ntok} tokens in {secs:.1f} s ({nprompts / secs:.1f} prompts/s, "
                  f"{ntok / secs:.0f} tokens/s) -> {output} ({_size(output)})", flush=True)
        return output
    finally:
        for fd in locks:
            os.close(fd)


def _span(layers) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7'"""
    parts, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ",".join(parts)
