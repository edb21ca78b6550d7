"""Any checkpoint llama.checkpoint reads (a Meta dir, a Hugging Face dir or cached model id, a
.gguf) -> Meta layout for N model-parallel ranks:

    python -m llama.convert SRC DST [--mp N] [--dtype float32|float16|bfloat16] [--overwrite]
    python -m llama.convert SRC DST --to hf [--dtype ...] [--overwrite]   # llama/hf_export.py

DST gets consolidated.NN.pth, params.json, the tokenizer files and convert.json, which records the
source files (size, mtime) and settings: the same conversion again does nothing. Shards are split
exactly as the loader splits them, written under a temporary name and renamed when complete.
"""
import json
import os
import shutil

import torch
from tqdm import tqdm

from .checkpoint import check_weights, checkpoint_format, meta_params, open_source
from .errors import LlamaError
from .layout import DTYPES, rank_slice
from .model import check_parallel
from .staging import staged

RECORD = "convert.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_special.json", "tokenizer.json",
                   "tokenizer_config.json", "chat_template.jinja")


def stamp(path: str) -> list:
    """[name, size, mtime_ns] of the source file, or of each file at the top of the source dir."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if not n.startswith("."))
        files = [f for f in files if os.path.isfile(f)]
    return [[os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def read_record(dst: str):
    try:
        with open(os.path.join(dst, RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def describe(rec: dict) -> str:
    return f"{rec.get('source')} at mp {rec.get('mp')}, {rec.get('dtype')}"


def convert(src, dst, mp: int = 1, dtype: str = "float32", overwrite: bool = False,
            to: str = "meta"):
    """Write SRC in Meta layout with `mp` shards into DST, or (--to hf) as a Hugging Face folder.

    src: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    dst: the folder to write (consolidated.NN.pth, params.json, tokenizer files, convert.json)
    mp: model-parallel shards to write
    dtype: of the weights written to disk: float32, float16 or bfloat16
    overwrite: replace a different conversion already in DST
    to: meta (Meta layout, consolidated.NN.pth) or hf (a Hugging Face folder that transformers and
        vLLM load: config.json, model.safetensors, tokenizer.json)
    """
    if to not in ("meta", "hf"):
        raise LlamaError(f"--to must be meta or hf, not {to!r}")
    if to == "hf":
        if mp != 1:
            raise LlamaError("--mp applies to --to meta only (a Hugging Face folder is unsplit)")
        from .hf_export import export_hf

        return export_hf(src, dst, dtype=dtype, overwrite=overwrite)
    if dtype not in DTYPES:
        raise LlamaError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    if not isinstance(mp, int) or isinstance(mp, bool) or mp < 1:
        raise LlamaError(f"--mp must be a positive integer, not {mp!r}")
    src = str(src)
    path = os.path.abspath(checkpoint_format(src)[0])
    dst = os.path.abspath(str(dst))
    if dst == path or dst.startswith(path + os.sep):
        raise LlamaError(f"{dst}: the destination cannot be the source or inside it")
    want = {"source": path, "files": stamp(path), "mp": mp, "dtype": dtype}
    have = read_record(dst)
    files = ["params.json"] + [f"consolidated.{r:02d}.pth" for r in range(mp)]
    complete = all(os.path.isfile(os.path.join(dst, f)) for f in files)
    if have is not None and complete and all(have.get(k) == v for k, v in want.items()):
        print(f"{dst}: already converted from {describe(want)}")
        return
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        if have is None and not os.path.exists(os.path.join(dst, "params.json")):
            raise LlamaError(f"{dst} exists and is not a converted model: choose another "
                             "destination")
        if not overwrite:
            what = f"a conversion of {describe(have)}" if have else "another model"
            raise LlamaError(f"{dst} holds {what}; pass --overwrite to replace it")

    weights, kind, tok = open_source(path, DTYPES[dtype])
    args = weights.args
    check_weights(weights, args, kind)
    check_parallel(args, mp)
    if args.vocab_parallel_embedding and args.vocab_size % mp:  # the loader falls back likewise
        args.vocab_parallel_embedding = False
    with staged(dst) as tmp:
        names = sorted(weights.shapes)
        with tqdm(total=mp * len(names), desc=f"writing {mp} shard(s)", unit="tensor") as bar:
            for r in range(mp):
                shard = {}
                for name in names:
                    shard[name] = (weights.read(name, *rank_slice(name, args, mp, r))
                                   .to(DTYPES[dtype]).clone())
                    bar.update()
                torch.save(shard, os.path.join(tmp, f"consolidated.{r:02d}.pth"))
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(meta_params(args), f, indent=2)
        tok_dir = os.path.dirname(tok) if tok else None
        for name in TOKENIZER_FILES:
            if tok_dir and os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copyfile(os.path.join(tok_dir, name), os.path.join(tmp, name))
        done = dict(want, kind=kind)
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump(done, f, indent=1)
    print(f"{dst}: {kind} {src} -> {mp} shard(s), {dtype}"
          + ("" if tok else " (no tokenizer found beside the source)"))


def cli():
    """The command line."""
    from .cli import command

    command(convert, prog="python -m llama.convert")


if __name__ == "__main__":
    cli()
