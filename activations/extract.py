"""Extraction: every prompt through the model once, the chosen layers' hidden states streamed into
an activation cache (layout in activations/cache.py). The one implementation behind example.py and
scripts/cache_activations.py, configured by one `Extraction`.

How the work is cut: every prompt is tokenized first. The two sides of a contrast pair share their
longest common token prefix; it runs once (keeping each side at least one token of its own), and
both sides' remaining tokens run on top of its keys and values. Examples are sorted by length and
packed into batches of at most `max_batch_tokens` padded tokens, numbered; each data-parallel group
takes every dp-th batch not yet done. Rows land at each example's original index in preallocated
files, and a writer commits (fsync, then its progress file) every `commit_every` seconds and on
Ctrl-C: rerunning after a kill redoes only uncommitted batches, which gives the same bytes.
"""
import hashlib
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Literal, Optional

import numpy as np
import torch
import torch.distributed as tdist

from . import cache as cache_files
from .batching import Plan, forward_batch, plan, tokenize  # noqa: F401 (the names callers use)
from .cache import parse_layers
from .cache_folder import _unlock, finish, precheck, prepare, size_of, stamp_of
from llama.errors import LlamaError
from .promptfile import SIDES, Prompts, find_data, read_prompts  # noqa: F401
from .readout import TOKEN_MODES, Token, per_token
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Dtype = Literal["float32", "float16", "bfloat16"]


_HOW = {"cache": False}  # a field of how to run, not of what the cache holds


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
      sink's outlier would dominate the mean; activations.cache.mean_start)
    overwrite: replace a cache made with other settings, or a complete one
    commit_every: seconds between commits of finished work (what a kill can lose)
    steer: cache a steered model: a vectors folder, .npy/.safetensors or saved linear probe
      (llama/vectors.py), added at every position of --steer_layers (llama.model.Steer)
    steer_layers: the layers to steer (with --steer), e.g. 14 or 10,14
    multiplier: steering multiplier (with --steer)
    ablate: remove the direction instead of adding it (with --steer; multiplier 1: fully)
    """
    model: str = field(metadata=_HOW)  # the model is identified by its fingerprint
    data: str = field(metadata=_HOW)  # the prompts by their sha256 and token ids
    output: str = field(metadata=_HOW)
    tokenizer_path: Optional[str] = field(default=None, metadata=_HOW)
    layers: str = "all"
    token: Token = "last"
    dtype: Dtype = "float32"
    compute_dtype: Optional[Dtype] = None
    max_batch_tokens: int = 2048
    batch_size: Optional[int] = None
    mp: int = field(default=0, metadata=_HOW)
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_HOW)
    zero_shot: bool = False
    mean_keep_first: bool = False
    overwrite: bool = field(default=False, metadata=_HOW)
    commit_every: float = field(default=10.0, metadata=_HOW)
    steer: Optional[str] = None
    steer_layers: Optional[str] = None
    multiplier: float = 1.0
    ablate: bool = False

    def reuse_key(self, layers: List[int], compute: str, data_sha256: str) -> dict:
        """What makes a cache these bytes (metadata.json "settings"; a finished cache with the
        same key, model fingerprint and token ids is reused): every field not marked as how to run
        (_HOW), with the layers parsed and the compute dtype resolved; mean_keep_first only for
        token mean, the steering fields (as "steer") only with --steer."""
        key = {"data_sha256": data_sha256}
        for f in fields(self):
            if f.metadata.get("cache", True):
                key[f.name] = getattr(self, f.name)
        key.update(layers=layers, zero_shot=bool(self.zero_shot), compute_dtype=compute)
        key = {("model_dtype" if k == "compute_dtype" else k): v for k, v in key.items()}
        keep_first = bool(key.pop("mean_keep_first"))
        if self.token == "mean":  # the rule of activations.readout.mean_start
            key["mean_keep_first"] = keep_first
        steer = {k: key.pop(k) for k in ("steer", "steer_layers", "multiplier", "ablate")}
        if self.steer is not None:  # a steered model's cache is another cache
            key["steer"] = {"vectors": os.path.abspath(steer["steer"]),
                            "layers": str(steer["steer_layers"]),
                            "multiplier": float(steer["multiplier"]),
                            "ablate": bool(steer["ablate"])}
        return key

    def check(self) -> None:
        """Refuse values a caller in process may pass (the command line checks its own)."""
        if (self.steer is None) != (self.steer_layers is None):
            raise LlamaError("--steer VECTORS and --steer_layers L go together")
        if self.token not in TOKEN_MODES:
            raise LlamaError(f"unknown --token {self.token!r} ({', '.join(TOKEN_MODES)})")
        for name in ("dtype", "compute_dtype"):
            v = getattr(self, name)
            if v is not None and v not in cache_files.DTYPES:
                raise LlamaError(f"unknown --{name} {v!r} ({', '.join(cache_files.DTYPES)})")
        for name in ("max_batch_tokens", "batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise LlamaError(f"--{name} {v!r} is not a positive integer")


def _bits(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the cache stores it (bfloat16 as its raw 16 bits)."""
    x = x.to(TORCH_DTYPES[dtype]).cpu()
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def array_name(layer: int, side: str) -> str:
    return cache_files.side_file("", layer, side)


@dataclass
class Job:
    """What one extraction run does, worked out from its `Extraction` before any batch runs."""
    cfg: Extraction
    batch_plan: Plan
    layers: List[int]  # parsed from cfg.layers
    sides: List[str]
    dim: int
    steer: object = None  # a llama.model.Steer, or None
    offsets: Dict[str, np.ndarray] = field(default_factory=dict)  # per-token modes: rows per side

    def __post_init__(self):
        if per_token(self.cfg.token):
            self.offsets = {s: np.concatenate([[0], np.cumsum(self.batch_plan.lengths[:, j])])
                            for j, s in enumerate(self.sides)}

    def arrays(self) -> dict:
        """{file in the cache: (shape, numpy dtype)} of every array the cache will hold."""
        lengths, cfg = self.batch_plan.lengths, self.cfg
        stored = cache_files.storage_dtype(cfg.dtype)
        out = {}
        for layer in self.layers:
            for j, s in enumerate(self.sides):
                rows = int(lengths[:, j].sum()) if per_token(cfg.token) else len(lengths)
                out[array_name(layer, s)] = ((rows, self.dim), stored)
        if cfg.zero_shot:
            out[cache_files.LOGPROBS] = ((len(lengths), len(self.sides)), np.dtype(np.float32))
        return out

    def prompts_in(self, batches) -> int:
        return sum(len(self.batch_plan.batches[b]) for b in batches) * len(self.sides)


def on_main(proc, fn):
    """Run fn on global rank 0 and hand its result to every rank. An error there stops every rank
    with the same message; only rank 0 prints it (llama.errors.fail), so the user reads one line,
    and every rank's torchrun error file holds it."""
    result, err = None, None
    if proc.rank == 0:
        try:
            result = fn()
        except (LlamaError, OSError) as e:
            err = e
    if proc.world > 1:
        box = [result, err]  # LlamaError and OSError pickle with their message and file
        tdist.broadcast_object_list(box)
        if box[1] is not None and proc.rank != 0:
            raise box[1]
        result = box[0]
    if err is not None:
        raise err
    return result


def extract(model, proc, job: Job, done: set) -> None:
    """This rank's share of the batches not yet done; its group's writer puts the rows in place.
    proc: the process setup (llama.dist.setup). Ctrl-C commits what is written, then raises
    KeyboardInterrupt("K of M prompts committed")."""
    from tqdm import tqdm

    cfg, batch_plan, output = job.cfg, job.batch_plan, os.fspath(job.cfg.output)
    todo = [b for b in range(len(batch_plan.batches)) if b not in done][proc.dp_rank :: proc.dp]
    writer = cache_files.CacheWriter(output, job.arrays(), proc.dp_rank) \
        if proc.is_writer else None
    mine, last = set(done), time.time()
    bar = tqdm(total=job.prompts_in(todo), unit="prompt", desc="extract",
               disable=not proc.is_main, dynamic_ncols=True)
    try:
        t0, ntok = time.time(), 0
        for j, b in enumerate(todo):
            idx = batch_plan.batches[b]
            res, logp = forward_batch(model, batch_plan, idx, job.layers, cfg, proc.device,
                                      job.steer)
            if writer is not None:
                put_rows(writer, res, logp, idx, job)
                mine.add(b)
                if time.time() - last >= cfg.commit_every or j == len(todo) - 1:
                    writer.commit(mine)
                    last = time.time()
            ntok += int(batch_plan.lengths[idx].sum())
            bar.update(len(idx) * len(job.sides))
            bar.set_postfix_str(f"{ntok / max(time.time() - t0, 1e-9):.0f} tokens/s")
    except KeyboardInterrupt:
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun sends a second one
        try:
            if writer is not None:
                writer.commit(mine)
            kept = job.prompts_in(cache_files.read_done(output))
        finally:
            signal.signal(signal.SIGINT, before)
        total = len(batch_plan.lengths) * len(job.sides)
        msg = f"{kept} of {total} prompts committed; run the same command to resume"
        raise KeyboardInterrupt(msg)
    finally:
        bar.close()
        if writer is not None:
            writer.close()


def put_rows(writer, res, logp, idx, job: Job) -> None:
    """One batch's results into the cache, each example at its own row(s)."""
    dtype = job.cfg.dtype
    for layer, states in res.items():
        for si, s in enumerate(job.sides):
            name = array_name(layer, s)
            if per_token(job.cfg.token):
                for bi, i in enumerate(idx):
                    writer.put(name, int(job.offsets[s][i]), _bits(states[si][bi], dtype))
            else:
                rows = _bits(states[:, si], dtype)
                for bi, i in enumerate(idx):
                    writer.put(name, int(i), rows[bi])
    if logp is not None:
        for bi, i in enumerate(idx):
            writer.put(cache_files.LOGPROBS, int(i), logp[bi].numpy())


def _versions() -> dict:
    import fairscale

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "fairscale": fairscale.__version__}


def describe(lm, tok, tok_path, prompts: Prompts, job: Job, proc, settings: dict) -> dict:
    """metadata.json, as written at the start (complete false)."""
    path = os.fspath(job.cfg.model)
    return {
        "format": cache_files.FORMAT, "complete": False, "settings": settings,
        "model": {"path": os.path.abspath(path) if os.path.exists(path) else path,
                  "source": lm.source, "fingerprint": lm.fingerprint, "params": asdict(lm.args),
                  "dtype": settings["model_dtype"]},  # the compute dtype
        "tokenizer": {"path": os.path.abspath(str(tok_path)), "chat_format": tok.chat_format},
        "data": {"path": os.path.abspath(prompts.path), "sha256": prompts.sha256,
                 "rows": len(prompts.ids), **prompts.info},
        "sides": prompts.sides, "token": settings["token"], "dtype": settings["dtype"],
        "layers": settings["layers"], "num_examples": len(prompts.ids),
        "zero_shot": settings["zero_shot"], "tokens": job.batch_plan.tokens, "ids": prompts.ids,
        "labels": prompts.labels, "types": prompts.types, "versions": _versions(),
        "parallel": {"world": proc.world, "mp": proc.mp, "dp": proc.dp},
    }


def _steer(cfg: Extraction, lm):
    """The llama.model.Steer of cfg.steer (None without --steer)."""
    if cfg.steer is None:
        return None
    from llama.model import Steer
    from llama.vectors import load_vectors

    vectors = load_vectors(cfg.steer, parse_layers(cfg.steer_layers, lm.args.n_layers),
                           lm.args.dim, lm.args.n_layers, lm.fingerprint)
    return Steer(vectors, float(cfg.multiplier), bool(cfg.ablate))


def run(cfg: Extraction, lm=None) -> str:
    """Extract the hidden states of cfg.layers for every prompt of cfg.data into the cache
    cfg.output (layout: activations/cache.py); returns cfg.output.
    lm: a llama.checkpoint.Loaded to reuse
    in process instead of loading cfg.model. What needs no weights is checked before the load: the
    prompt file, the layers against the checkpoint's header, what the output folder holds, and
    whether that is this very cache already (then nothing is loaded). Bad input: LlamaError."""
    from llama.checkpoint import load_model, read_args
    from llama.dist import setup
    from llama.tokenizer import load_tokenizer

    t0 = time.time()
    cfg.check()
    output, data = os.fspath(cfg.output), find_data(os.fspath(cfg.data))
    proc = setup(mp=cfg.mp, device=cfg.device)
    if lm is not None:
        compute = str(next(lm.model.parameters()).dtype).replace("torch.", "")
    else:
        compute = cfg.compute_dtype or ("bfloat16" if proc.device.type == "cuda" else "float32")
    n_layers = (lm.args if lm is not None else read_args(cfg.model)).n_layers
    layers = parse_layers(cfg.layers, n_layers)
    with open(data, "rb") as f:
        data_sha = hashlib.sha256(f.read()).hexdigest()
    settings = cfg.reuse_key(layers, compute, data_sha)
    stamps = None if lm is not None else {"model": stamp_of(cfg.model),
                                          "tokenizer": stamp_of(cfg.tokenizer_path)}
    if on_main(proc, lambda: precheck(output, settings, stamps, n_layers, cfg.overwrite)):
        if proc.is_main:
            print(f"{output}: already complete (layers {_span(layers)}), nothing to do",
                  flush=True)
        return output
    lm = lm if lm is not None else load_model(cfg.model, proc, compute)
    steer = _steer(cfg, lm)
    tok_path = cfg.tokenizer_path or lm.tokenizer_path
    if not tok_path:
        raise LlamaError(f"no tokenizer found beside {cfg.model}: give --tokenizer_path")
    tok = load_tokenizer(tok_path)
    t1 = time.time()
    prompts = read_prompts(data, tok)
    if proc.is_main and all(v is None for v in prompts.labels):
        print(f"warning: {data} has no label column (nor type): extracting all the same, but "
              "ccs.py train and the probes will need labels (label 0/1, or type "
              "testing/deployment)", file=sys.stderr, flush=True)
    if cfg.zero_shot and len(prompts.sides) == 1:
        raise LlamaError(f"--zero_shot needs contrast pairs (plus_prompt and minus_prompt), "
                         f"{data} has single prompts")
    seqs = tokenize(prompts, tok, lm.args.vocab_size, lm.args.max_seq_len)
    job = Job(cfg, plan(seqs, cfg.zero_shot, cfg.max_batch_tokens, cfg.batch_size), layers,
              prompts.sides, lm.args.dim, steer)
    batch_plan = job.batch_plan
    h = hashlib.sha256()
    for side in seqs:
        for ids in side:
            h.update(ids.tobytes() + b"|")
    settings = {"model_fingerprint": lm.fingerprint, "tokens_sha256": h.hexdigest(), **settings}
    meta = describe(lm, tok, tok_path, prompts, job, proc, settings)
    meta["stamps"] = stamps
    info = {"layers": layers, "num_examples": len(prompts.ids), "hidden_dim": lm.args.dim,
            "dtype": cfg.dtype, **cache_files.encoding(cfg.dtype), "token": cfg.token,
            "sides": job.sides}
    t2 = time.time()
    locks = []  # rank 0's lock on the folder, released (and its file removed) when this run ends
    try:
        done = on_main(proc, lambda: prepare(output, meta, job.arrays(), job.offsets,
                                             cfg.overwrite, locks))
        if done is None:
            if proc.is_main:
                print(f"{output}: already complete ({info['num_examples']} examples, layers "
                      f"{_span(layers)}), nothing to do", flush=True)
            return output
        total = len(batch_plan.lengths) * len(job.sides)
        if done and proc.is_main:
            print(f"resuming: {job.prompts_in(done)} of {total} prompts done", flush=True)
        left = [b for b in range(len(batch_plan.batches)) if b not in done]
        ntok = int(sum(batch_plan.lengths[batch_plan.batches[b]].sum() for b in left))
        nprompts = job.prompts_in(left)
        extract(lm.model, proc, job, done)
        if proc.world > 1:
            tdist.barrier()
        secs = time.time() - t2
        meta["timings"] = {"load_s": round(t1 - t0, 3), "prepare_s": round(t2 - t1, 3),
                           "extract_s": round(secs, 3), "resumed_from_batches": len(done),
                           "prompts_per_s": round(nprompts / secs, 2),
                           "tokens_per_s": round(ntok / secs, 1)}
        on_main(proc, lambda: finish(output, meta, len(batch_plan.batches), info))
        if proc.is_main:
            print(f"cached {info['num_examples']} examples x {len(job.sides)} side(s), layers "
                  f"{_span(layers)}, token {cfg.token}, {cfg.dtype} (computed in {compute} on "
                  f"{proc.device.type}): {nprompts} prompts, {ntok} tokens in {secs:.1f} s "
                  f"({nprompts / secs:.1f} prompts/s, {ntok / secs:.0f} tokens/s) -> {output} "
                  f"({size_of(output)})", flush=True)
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
