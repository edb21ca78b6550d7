"""Load a checkpoint into a model-parallel Transformer: a Meta dir (consolidated.NN.pth +
params.json), a Hugging Face dir (config.json + *.safetensors), a .gguf file, or a Hugging Face
model id found in the local cache. Each rank reads only its own slices (mmap / lazy safetensors
slices), re-splitting the checkpoint's shards when their number differs from the model-parallel
size.

    # load, print a summary
    python -m llama.checkpoint PATH [--mp N] [--dtype bfloat16] [--device cpu]
"""
import glob
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import torch

from .errors import LlamaError
from .layout import DTYPES, full_shapes, rank_slice, split_dim
from .model import ModelArgs, Transformer, check_parallel

IGNORED = ("rope.freqs",)  # Llama 1/2 shards carry the rotary table; we compute it


# ---- Meta layout: sharding ----

def shard_state_dict(full_sd: Dict[str, torch.Tensor], args: ModelArgs, mp: int,
                     rank: int) -> Dict[str, torch.Tensor]:
    """Rank `rank`'s part of a full Meta state dict for model-parallel size mp (copies, safe to
    torch.save)."""
    check_parallel(args, mp)
    out = {}
    for name, t in full_sd.items():
        dim, lo, hi = rank_slice(name, args, mp, rank)
        out[name] = (t if dim is None else t.narrow(dim, lo, hi - lo)).clone()
    return out


def merge_shards(sds: List[Dict[str, torch.Tensor]], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """The full state dict from the shards of a Meta checkpoint (rope.freqs dropped, kv heads
    un-replicated)."""
    src = Shards(sds, args, [f"shard {i}" for i in range(len(sds))])
    return {name: src.read(name).clone() for name in src.shapes}


def meta_params(args: ModelArgs) -> dict:
    """params.json content for `args` (None values and the rope scaling details of unscaled models
    left out)."""
    skip = {"max_batch_size"}
    if not args.use_scaled_rope:
        skip |= {"rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_context"}
    if not args.vocab_parallel_embedding:
        skip.add("vocab_parallel_embedding")
    return {k: v for k, v in asdict(args).items() if v is not None and k not in skip}


class Shards:
    """Meta-named weights held as N state dicts (mmapped shard files, or one in-memory dict), read
    as slices of the unsplit weights."""

    def __init__(self, sds: List[Dict[str, torch.Tensor]], args: ModelArgs, files: List[str]):
        self.sds, self.files, self.args = sds, files, args
        keys = set(sds[0]) - set(IGNORED)
        for sd, file in zip(sds[1:], files[1:]):
            other = set(sd) - set(IGNORED)
            if other != keys:
                odd = sorted(keys ^ other)[0]
                raise LlamaError(f"{file}: weight {odd!r} is in "
                                 f"{'this' if odd in other else 'the first'} shard only")
        n = len(sds)
        self.dims, self.shapes, self.kv_rep = {}, {}, {}
        for name in sorted(keys):
            t = sds[0][name]
            for sd, file in zip(sds[1:], files[1:]):
                if sd[name].shape != t.shape:
                    raise LlamaError(f"{file}: {name} has shape {tuple(sd[name].shape)}, shard 0 "
                                     f"has {tuple(t.shape)}")
            dim = split_dim(name, args)
            # Llama 1/2 split it on dim 1, Llama 3 on dim 0
            if name == "tok_embeddings.weight" and n > 1:
                dim = 1 if t.dim() == 2 and t.shape[1] * n == args.dim else 0
            if dim is not None and dim >= t.dim():
                raise LlamaError(f"{files[0]}: {name} has shape {tuple(t.shape)}: expected a "
                                 "matrix")
            shape = list(t.shape)
            if dim is not None and n > 1:
                shape[dim] *= n
            self.dims[name] = None if n == 1 else dim
            kv = args.kv_heads
            if (name.split(".")[-2] in ("wk", "wv") and n > kv and n % kv == 0
                and t.shape[0] == args.head_dim):
                # written for an mp above n_kv_heads: one (repeated) head per shard
                self.kv_rep[name] = n // kv
                shape[0] = kv * args.head_dim
            self.shapes[name] = tuple(shape)

    def read(self, name: str, dim: Optional[int] = None, lo: int = 0, hi: int = 0) -> torch.Tensor:
        rep = self.kv_rep.get(name)
        if not rep:
            return self.stored(name, dim, lo, hi)
        hd = self.args.head_dim
        a, b = (lo, hi) if dim == 0 else (0, self.shapes[name][0])
        # stored head h * rep holds head h: its rows start h * skip further on
        skip = (rep - 1) * hd
        rows = torch.cat([self.stored(name, 0, max(a, h * hd) + h * skip,
                                      min(b, h * hd + hd) + h * skip)
                          for h in range(a // hd, (b - 1) // hd + 1)])
        return rows.narrow(1, lo, hi - lo) if dim == 1 else rows

    def stored(self, name, dim, lo, hi):
        sdim = self.dims[name]
        if sdim is None:
            t = self.sds[0][name]
            return t if dim is None else t.narrow(dim, lo, hi - lo)
        pieces, off = [], 0
        for sd in self.sds:
            t = sd[name]
            if dim == sdim:
                a, b = max(lo, off), min(hi, off + t.shape[dim])
                if a < b:
                    pieces.append(t.narrow(dim, a - off, b - a))
                off += t.shape[dim]
            else:
                pieces.append(t if dim is None else t.narrow(dim, lo, hi - lo))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, sdim)


def read_json_object(file: str) -> dict:
    with open(file) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise LlamaError(f"{file}: not valid JSON ({e})")
    if not isinstance(obj, dict):
        raise LlamaError(f"{file}: expected a JSON object")
    return obj


def meta_args(path: str, emb: Optional[torch.Tensor], n_shards: int) -> ModelArgs:
    file = os.path.join(path, "params.json")
    params = read_json_object(file)
    try:
        args = ModelArgs.from_dict(params)
    except (LlamaError, TypeError) as e:
        raise LlamaError(f"{file}: {e}")
    if args.vocab_size <= 0 and emb is not None:  # Llama 1/2: -1, the embedding says
        args.vocab_size = emb.shape[0] * (1 if emb.shape[1] * n_shards == args.dim else n_shards)
    if n_shards > 1 and emb is not None and emb.dim() == 2:
        args.vocab_parallel_embedding = emb.shape[1] == args.dim
    factor_given = {"rope_scale_factor", "rope_scaling_factor"} & set(params)
    if (args.use_scaled_rope and not factor_given and args.vocab_size == 128256
            and (args.dim, args.n_layers) in ((2048, 16), (3072, 28))):
        # Llama 3.2 1B/3B params.json omit the factor; theirs is 32, not 8
        args.rope_scale_factor = 32.0
    return args


def load_meta_state_shards(path: str):
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise LlamaError(f"{path}: no consolidated.NN.pth files")
    want = [os.path.join(path, f"consolidated.{i:02d}.pth") for i in range(len(files))]
    if files != want:
        raise LlamaError(f"{path}: shard files must be consolidated.00.pth .. "
                         f"consolidated.{len(files) - 1:02d}.pth")
    sds = []
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        # torch reports a damaged zip as RuntimeError, a bad pickle as others
        except Exception as e:
            raise LlamaError(f"{f}: unreadable or truncated checkpoint shard "
                             f"({str(e).splitlines()[0]})")
        if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
            raise LlamaError(f"{f}: not a state dict of tensors")
        sds.append(sd)
    emb = sds[0].get("tok_embeddings.weight")
    return meta_args(path, emb, len(files)), sds, files


def load_meta_state(path: str) -> Tuple[ModelArgs, Dict[str, torch.Tensor]]:
    """(args, full state dict) of a Meta dir or a Hugging Face dir, in Meta's names and rotary
    layout."""
    path = str(path)
    src = open_source(path)[0]
    return src.args, {name: src.read(name).clone() for name in src.shapes}


# ---- Hugging Face layout ----

HF_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def meta_name(hf: str) -> Optional[str]:
    if hf == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if hf == "model.norm.weight":
        return "norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf)
    if m and m.group(2) in HF_NAMES:
        return f"layers.{m.group(1)}.{HF_NAMES[m.group(2)]}.weight"
    return None


def hf_args(cfg: dict, file: str) -> ModelArgs:
    def need(key):
        if key not in cfg:
            raise LlamaError(f"{file}: missing {key!r}")
        return cfg[key]

    if cfg.get("model_type", "llama") != "llama":
        raise LlamaError(f"{file}: model_type {cfg['model_type']!r} is not llama")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise LlamaError(f"{file}: only silu activations without biases are supported")
    dim, heads = need("hidden_size"), need("num_attention_heads")
    if cfg.get("head_dim") not in (None, dim // heads):
        raise LlamaError(f"{file}: head_dim {cfg['head_dim']} "
                         "!= hidden_size / num_attention_heads")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise LlamaError(f"{file}: rope type {kind!r} is not supported (default or llama3)")
    args = ModelArgs(
        dim=dim, n_layers=need("num_hidden_layers"), n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=need("vocab_size"),
        ffn_dim=need("intermediate_size"), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
        max_seq_len=cfg.get("max_position_embeddings", 8192),
    )
    if kind == "llama3":
        args.use_scaled_rope = True
        args.rope_scale_factor = float(rope["factor"])
        args.rope_low_freq_factor = float(rope.get("low_freq_factor", 1.0))
        args.rope_high_freq_factor = float(rope.get("high_freq_factor", 4.0))
        args.rope_original_context = int(rope.get("original_max_position_embeddings", 8192))
    return args


class HFWeights:
    """A Hugging Face safetensors checkpoint read lazily, slice by slice, in Meta names and rotary
    layout."""

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        file = os.path.join(path, "config.json")
        cfg = read_json_object(file)
        self.args = hf_args(cfg, file)
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise LlamaError(f"{path}: no *.safetensors files (pytorch_model.bin is not read: "
                             "save as safetensors)")
        self.where, self.shapes, self.handles = {}, {}, []
        for f in files:
            try:
                h = safe_open(f, framework="pt")
            except (SafetensorError, OSError) as e:
                raise LlamaError(f"{f}: unreadable or truncated safetensors file ({e})")
            self.handles.append(h)
            for key in h.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = meta_name(key)
                if name is None:
                    raise LlamaError(f"{f}: unexpected weight {key!r}")
                self.where[name] = (h, key, f)
                self.shapes[name] = tuple(h.get_slice(key).get_shape())
        emb = "tok_embeddings.weight"
        if ("output.weight" not in self.where and cfg.get("tie_word_embeddings")
            and emb in self.where):
            self.where["output.weight"], self.shapes["output.weight"] = (self.where[emb],
                                                                         self.shapes[emb])

    def read(self, name: str, dim: Optional[int] = None, lo: int = 0, hi: int = 0) -> torch.Tensor:
        from safetensors import SafetensorError

        h, key, f = self.where[name]
        try:
            sl = h.get_slice(key)
            t = sl[:] if dim is None else sl[lo:hi] if dim == 0 else sl[:, lo:hi]
        except SafetensorError as e:
            raise LlamaError(f"{f}: cannot read {key} ({e})")
        kind = name.split(".")[-2]
        # HF rows are permuted for rotate-half rope; back to interleaved pairs
        if kind in ("wq", "wk"):
            hd = self.args.head_dim
            if t.shape[0] % hd:
                raise LlamaError(f"{f}: {key} has {t.shape[0]} rows, not whole heads of {hd}")
            n = t.shape[0] // hd
            t = t.reshape(n, 2, hd // 2, -1).transpose(1, 2).reshape(n * hd, -1)
        return t


# ---- choosing and opening a source ----

class Weights(Protocol):
    """What every checkpoint format gives the loader (Shards: Meta shards; HFWeights: Hugging Face
    safetensors; GGUFWeights: a .gguf file): the model parameters, every weight's full shape in
    Meta's names, and slices of the unsplit weights in Meta's layout (rotate-half rope rows
    already back to interleaved pairs)."""

    args: ModelArgs
    shapes: Dict[str, Tuple[int, ...]]

    def read(self, name: str, dim: Optional[int] = None, lo: int = 0,
             hi: int = 0) -> torch.Tensor:
        """Weight `name`, whole (dim None) or rows / columns [lo, hi) along dim 0 / 1."""


class GGUFWeights:
    """A .gguf file's weights, dequantized into memory at open (gguf.read_gguf)."""

    def __init__(self, path: str, dtype: torch.dtype):
        from .gguf import read_gguf

        self.args, self.sd, self.tokenizer_dir = read_gguf(path, dtype)
        self.shapes = {name: tuple(t.shape) for name, t in self.sd.items()}

    def read(self, name: str, dim: Optional[int] = None, lo: int = 0, hi: int = 0) -> torch.Tensor:
        t = self.sd[name]
        return t if dim is None else t.narrow(dim, lo, hi - lo)


def hf_cache_dir(model_id: str) -> str:
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME")
        or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    base = os.path.join(hub, "models--" + model_id.replace("/", "--"))
    ref = os.path.join(base, "refs", "main")
    if os.path.exists(ref):
        with open(ref) as f:
            snap = os.path.join(base, "snapshots", f.read().strip())
        if os.path.exists(os.path.join(snap, "config.json")):
            return snap
    snaps = sorted(glob.glob(os.path.join(base, "snapshots", "*", "config.json")),
                   key=os.path.getmtime)
    if not snaps:
        raise LlamaError(
            f"{model_id} is neither a path nor a model in the local Hugging Face cache ({hub}); "
            f"download it first (e.g. `hf download {model_id}`), or pass a local directory")
    return os.path.dirname(snaps[-1])


def resolve(path) -> str:
    """The one reading of a model argument: an existing path as given, else a Hugging Face model
    id (`org/name`) as its snapshot folder in the local cache (hf_cache_dir; LlamaError when it is
    not there); anything else unchanged (the caller says it does not exist)."""
    path = os.fspath(path)
    if (not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path)
            and not path.startswith(".")):
        return hf_cache_dir(path)
    return path


def find_tokenizer(*dirs: str) -> Optional[str]:
    for d in dirs:
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def _meta_open(path: str, dtype: torch.dtype):
    args, sds, files = load_meta_state_shards(path)
    # Llama 2 downloads keep tokenizer.model next to the model dirs
    return Shards(sds, args, files), find_tokenizer(path, os.path.dirname(os.path.abspath(path)))


def _hf_header(path: str) -> ModelArgs:
    file = os.path.join(path, "config.json")
    return hf_args(read_json_object(file), file)


def _gguf_header(path: str) -> ModelArgs:
    from .gguf import gguf_args, open_gguf

    return gguf_args(open_gguf(path), path)


def _gguf_open(path: str, dtype: torch.dtype):
    weights = GGUFWeights(path, dtype)
    return weights, find_tokenizer(weights.tokenizer_dir)


@dataclass(frozen=True)
class Format:
    """One checkpoint format: how to recognise it, read its header alone (the model parameters,
    no weight) and open its weights (-> (Weights, tokenizer path or None))."""
    kind: str
    holds: Callable[[str], bool]
    header: Callable[[str], ModelArgs]
    open: Callable[[str, torch.dtype], Tuple[Weights, Optional[str]]]


FORMATS = (
    Format("gguf", lambda p: os.path.isfile(p) and p.endswith(".gguf"), _gguf_header, _gguf_open),
    Format("meta", lambda p: os.path.isfile(os.path.join(p, "params.json")),
           lambda p: meta_args(p, None, 1), _meta_open),
    Format("hf", lambda p: os.path.isfile(os.path.join(p, "config.json")), _hf_header,
           lambda p, dtype: (HFWeights(p), find_tokenizer(p))),
)


def checkpoint_format(path) -> Tuple[str, Format]:
    """(the resolved path, its Format) of a checkpoint path or cached Hugging Face model id."""
    path = resolve(path)
    for fmt in FORMATS:
        if fmt.holds(path):
            return path, fmt
    if not os.path.isdir(path):
        raise LlamaError(f"{path}: no such checkpoint (a Meta or Hugging Face dir, a .gguf file, "
                         "or a cached model id)")
    raise LlamaError(f"{path}: neither params.json (Meta layout) nor config.json (Hugging Face "
                     "layout) found")


def open_source(path, dtype: torch.dtype = torch.float32) -> Tuple[Weights, str, Optional[str]]:
    """(weights, kind, tokenizer path) for a checkpoint path or a cached Hugging Face model id."""
    path, fmt = checkpoint_format(path)
    weights, tok = fmt.open(path, dtype)
    return weights, fmt.kind, tok


def read_args(path) -> ModelArgs:
    """The model parameters from a checkpoint's header alone (params.json, config.json or GGUF
    metadata), reading no weight: for checks that should come before the load. vocab_size may
    be -1 (Llama 1/2 params.json)."""
    path, fmt = checkpoint_format(path)
    return fmt.header(path)


# ---- loading ----

@dataclass
class Loaded:
    model: Transformer
    args: ModelArgs
    tokenizer_path: Optional[str]
    # same weights -> same value, whatever the layout, dtype or model-parallel size
    fingerprint: str
    source: str  # "meta", "hf" or "gguf"
    end_ids: List[int] = field(default_factory=list)  # declared_end_ids(path)


def _ids_of(value, file: str, key: str) -> List[int]:
    """An eos_token_id value (an int, a list of ints or null) -> ids."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise LlamaError(f"{file}: {key} {value!r} is not a token id or a list of them")
    return list(values)


def declared_end_ids(path) -> List[int]:
    """The end-of-generation ids a checkpoint declares, beyond its tokenizer's: a Hugging Face
    (or Meta) dir's generation_config.json and config.json `eos_token_id` (an int or a list, as
    transformers' GenerationConfig reads it), a GGUF's eos / eot / eom ids. [] when none."""
    path = str(path)
    if (not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path)
        and not path.startswith(".")):
        path = hf_cache_dir(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        from gguf import GGUFReader

        from .gguf import gguf_end_ids

        return gguf_end_ids(GGUFReader(path))
    ids = []
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            cfg = read_json_object(file)
            ids += [i for i in _ids_of(cfg.get("eos_token_id"), file, "eos_token_id")
                    if i not in ids]
    return ids


def fingerprint(src, args: ModelArgs) -> str:
    """A short hash of the model parameters, every weight's name and shape, and the first values of
    each weight (read as float32 from the checkpoint, in Meta's layout)."""
    keys = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "norm_eps",
            "rope_theta", "use_scaled_rope")
    if args.use_scaled_rope:
        keys += ("rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_context")
    h = hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}).encode())
    for name in sorted(src.shapes):
        rows = args.head_dim if name.split(".")[-2] in ("wq", "wk") else 1
        sample = src.read(name, 0, 0, rows)[0].reshape(-1)[:8].float()
        h.update(f"{name}{src.shapes[name]}".encode() + sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_weights(src, args: ModelArgs, kind: str):
    want = full_shapes(args)
    have = set(src.shapes)
    for name in sorted(want):
        if name not in have:
            raise LlamaError(f"{kind} checkpoint: missing weight {name!r}")
        if tuple(src.shapes[name]) != want[name]:
            raise LlamaError(f"{kind} checkpoint: {name} has shape {tuple(src.shapes[name])}, "
                             f"the model parameters need {want[name]}")
    extra = sorted(have - set(want))
    if extra:
        raise LlamaError(f"{kind} checkpoint: unexpected weight {extra[0]!r}")


def load_model(path, dist, dtype: str = "float32", max_seq_len: Optional[int] = None) -> Loaded:
    """Build the model for this rank's model-parallel slot and fill every weight from `path`."""
    if dtype not in DTYPES:
        raise LlamaError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    dt = DTYPES[dtype]
    src, kind, tok_path = open_source(str(path), dt)
    args = src.args
    if max_seq_len:
        args.max_seq_len = max_seq_len
    if args.vocab_size <= 0:
        raise LlamaError(f"{path}: vocab_size is unknown (no embedding to take it from)")
    check_weights(src, args, kind)
    if tok_path is not None:
        from .tokenizer import load_tokenizer

        n_words = load_tokenizer(tok_path).n_words
        if n_words > args.vocab_size:
            raise LlamaError(f"{tok_path}: tokenizer has {n_words} tokens, "
                             f"the model's embedding only {args.vocab_size}")
    check_parallel(args, dist.mp)
    prev = torch.get_default_dtype()
    # fairscale allocates its weights (uninitialised) in the default dtype
    torch.set_default_dtype(dt)
    try:
        model = Transformer(args)
    finally:
        torch.set_default_dtype(prev)
    # still uninitialised: untouched pages, so no host copy of the weights
    model.eval().to(dist.device)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            dim, lo, hi = rank_slice(name, args, dist.mp, dist.mp_rank)
            t = src.read(name, dim, lo, hi)
            if t.shape != p.shape:
                raise LlamaError(f"{kind} checkpoint: {name} slice has shape {tuple(t.shape)}, "
                                 f"not {tuple(p.shape)}")
            p.copy_(t)
    return Loaded(model, args, tok_path, fingerprint(src, args), kind, declared_end_ids(path))


def main(path: str, mp: int = 0, compute_dtype: str = "float32", device: str = "auto"):
    """Load a checkpoint and print a one-line summary (layers, dims, fingerprint, tokenizer).

    path: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    mp: model-parallel size (default: the world size)
    compute_dtype: of the model's weights and arithmetic: float32, float16 or bfloat16
    device: auto, cpu or cuda
    """
    from .dist import session

    if mp:  # refuse a model-parallel size that cannot work before starting any process group
        check_parallel(open_source(path)[0].args, mp)
    with session(mp, device) as proc:
        m = load_model(path, proc, compute_dtype)
        a = m.args
        if proc.is_main:
            print(f"{m.source} {path}: {a.n_layers} layers, dim {a.dim}, {a.n_heads} heads "
                  f"({a.kv_heads} kv), vocab {a.vocab_size}, ffn {a.hidden_dim}, mp {proc.mp}, "
                  f"{compute_dtype}, fingerprint {m.fingerprint}, tokenizer {m.tokenizer_path}")


def cli():
    """The command line."""
    from .cli import command

    command(main, prog="python -m llama.checkpoint")


if __name__ == "__main__":
    cli()
