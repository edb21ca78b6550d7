"""LLaMA (1, 2, 3.x), Mistral, Qwen2/2.5 and Qwen3 with fairscale tensor parallelism, returning
chosen layers' hidden states.

Written from the published architecture in the style of Meta's reference model.py. What each
family adds to LLaMA's block is one row of FAMILIES (read from the checkpoint's config). Additions:
- a functional KV cache with per-row start positions, so a batch of right-padded shared prefixes
  can be run once and each row's continuation run on top of it (extraction);
- a preallocated KV cache (`KVCache`) written in place at each row's positions (generation);
- `Steer`: add a steering vector to, or ablate a direction from, the residual stream.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from .errors import LlamaError


@dataclass(frozen=True)
class Family:
    """What a model family changes in LLaMA's block (sources: transformers' Qwen2Attention,
    Qwen3Attention, MistralConfig)."""
    qkv_bias: bool = False  # biases on the q, k and v projections (not on o): Qwen2
    qk_norm: bool = False  # RMSNorm (size head_dim) of each head's queries and keys before rotary
    # how a config turns its `sliding_window` on: "" never (LLaMA ignores the key), "always" (when
    # not null), or the name of the config key that switches it on
    window: str = ""


FAMILIES = {  # Hugging Face model_type -> Family
    "llama": Family(),
    "mistral": Family(window="always"),  # v0.1: sliding_window 4096; v0.2+: null
    "qwen2": Family(qkv_bias=True, window="use_sliding_window"),
    "qwen3": Family(qk_norm=True, window="use_sliding_window"),
}
REFUSED = {  # model_type -> what this engine does not implement
    "qwen2_moe": "a mixture-of-experts FFN", "qwen3_moe": "a mixture-of-experts FFN",
    "mixtral": "a mixture-of-experts FFN",
    "gemma": "Gemma's block (GeGLU, scaled embeddings, 1 + w norms)",
}


def family_problem(model_type: str) -> str:
    """Why `model_type` cannot be loaded ("" when it can)."""
    if model_type in FAMILIES:
        return ""
    known = ", ".join(FAMILIES)
    why = REFUSED.get(model_type) or (REFUSED["gemma"] if model_type.startswith("gemma") else "")
    if why:
        return f"model_type {model_type!r} is refused: it has {why} (supported: {known})"
    return f"model_type {model_type!r} is not supported (supported: {known})"


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1 in Llama 1/2 params.json: taken from the tokenizer
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    ffn_dim: Optional[int] = None  # explicit FFN size, when a converter knows it
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    rope_scale_factor: float = 8.0  # 8 for Llama 3.1/3.3, 32 for 3.2
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    vocab_parallel_embedding: bool = False  # Llama 3 splits the embedding by vocab, 1/2 by dim
    max_batch_size: int = 32  # carried by some params.json files; unused here
    max_seq_len: int = 8192
    family: str = "llama"  # a FAMILIES key
    head_size: Optional[int] = None  # head size when not dim // n_heads (Qwen3)
    sliding_window: Optional[int] = None  # each position attends to the last N (Mistral v0.1)

    def __post_init__(self):
        why = family_problem(self.family)
        if why:
            raise LlamaError(why)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        # llama-models spells it rope_scaling_factor
        d = {"rope_scale_factor" if k == "rope_scaling_factor" else k: v for k, v in d.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LlamaError(f"unknown model parameter {unknown[0]!r} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**d)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @property
    def options(self) -> Family:
        return FAMILIES[self.family]

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


def _mp_problem(args: ModelArgs, mp: int) -> str:
    """Why model-parallel size mp cannot split this model ("" when it can)."""
    if args.n_heads % mp:
        return f"does not divide n_heads={args.n_heads}"
    if args.vocab_size > 0 and args.vocab_size % mp:
        return f"does not divide vocab_size={args.vocab_size}"
    kv = args.kv_heads
    if kv % mp and mp % kv:
        return f"neither divides n_kv_heads={kv} nor is a multiple of it"
    return ""


def allowed_mp(args: ModelArgs) -> list:
    """Every model-parallel size this model splits to: divisors of n_heads that divide the
    vocabulary (the output layer's rows) and divide, or are multiples of, n_kv_heads."""
    return [mp for mp in range(1, args.n_heads + 1) if not _mp_problem(args, mp)]


def check_parallel(args: ModelArgs, mp: int) -> int:
    """Number of kv heads the model holds at model-parallel size mp (replicated when mp > kv
    heads). Raises LlamaError naming the sizes the model allows, and that more processes at one
    of them run data parallel."""
    why = _mp_problem(args, mp)
    if why:
        sizes = allowed_mp(args)
        listed = " or ".join(map(str, sizes)) if len(sizes) < 3 else \
            ", ".join(map(str, sizes[:-1])) + f" or {sizes[-1]}"
        fit = max(size for size in sizes if mp % size == 0)
        raise LlamaError(
            f"model-parallel size {mp} {why}: this model splits only to --mp {listed}; to run "
            f"{mp} processes, pass --mp {fit} (processes beyond one model-parallel group run "
            f"data parallel, each group taking a share of the prompts)")
    kv = args.kv_heads
    return kv if kv % mp == 0 else mp


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The rotary frequency of each of the head_dim // 2 channel pairs, with Llama 3.1 scaling."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if not args.use_scaled_rope:
        return freqs
    low_wavelen = args.rope_original_context / args.rope_low_freq_factor
    high_wavelen = args.rope_original_context / args.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (args.rope_original_context / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    blended = (1 - smooth) * freqs / args.rope_scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / args.rope_scale_factor, blended)
    return torch.where(wavelen < high_wavelen, freqs, scaled)


def apply_rotary(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, hd] with interleaved (real, imag) pairs; rot [B, S, hd // 2] complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot[:, :, None, :]).flatten(3).type_as(x)


def check_window(args: ModelArgs, context: int, asked: str = "the longest prompt"):
    """Refuse a context longer than the model's sliding window: this engine attends to every
    earlier position, which equals the windowed model only while the context fits the window.
    LlamaError names the sizes and `asked` (where the context length came from)."""
    if args.sliding_window and context > args.sliding_window:
        raise LlamaError(
            f"{asked} needs a context of {context} tokens, longer than this {args.family} model's "
            f"sliding window of {args.sliding_window}: windowed attention is not implemented "
            f"(keep prompts and --max_seq_len within {args.sliding_window})")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x [..., dim] -> x / rms(x) x weight. A mean square past float32 (entries of ~1e19 and
        more: a steering push that overflows inside the model) is NaN, not the silent zero row
        rsqrt(inf) would give, so it ends as non-finite logits; finite rows are unchanged."""
        xf = x.float()
        square = xf.pow(2).mean(-1, keepdim=True)
        square = torch.where(torch.isinf(square), float("nan"), square)
        xf = xf * torch.rsqrt(square + self.eps)
        return xf.type_as(x) * self.weight


@contextmanager
def uninitialised():
    """fairscale initialises each weight by building the full unsplit matrix and copying out this
    rank's part: a transient full-size copy per layer. The loader overwrites every weight, so skip
    it."""
    init = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = init


KV = Tuple[torch.Tensor, torch.Tensor]  # each [B, P, n_local_kv_heads, head_dim]


class KVCache:
    """Preallocated keys and values for decoding, per block a (k, v) pair, each
    [B, T, local kv heads, head_dim], zeroed (masked positions must hold no NaN). A forward with
    `cache` writes the new tokens' keys and values at their positions (one write per step, as
    Meta's generation.py) and each row attends to its own positions 0..pos."""

    def __init__(self, model: "Transformer", batch: int, length: int):
        attn = model.layers[0].attention
        shape = (batch, length, attn.n_local_kv_heads, attn.head_dim)
        w = model.norm.weight
        self.blocks = [(w.new_zeros(shape), w.new_zeros(shape)) for _ in model.layers]
        self.length = length
        self.rows = torch.arange(batch, device=w.device)[:, None]

    def slots(self, pos: torch.Tensor) -> torch.Tensor:
        """[B * S] flat indices (row * length + position) of positions pos [B, S]."""
        return (self.rows * self.length + pos).reshape(-1)


STEER_POSITIONS = ("all", "generated")  # where a Steer applies: every position, generated ones


@dataclass
class Steer:
    """An intervention on the residual stream at chosen layers (the cache's numbering: 0 is the
    embedding output, L the output of block L), applied inside Transformer.forward.

    Addition (Contrastive Activation Addition, Rimsky et al. 2024): h + multiplier * vector.
    Ablation (`ablate`): h - multiplier * (h . u) u with u = vector / |vector|; multiplier 1
    removes the component along u, leaving h orthogonal to it. multiplier: a float, or a [B]
    tensor (one per batch row). Multiplier 0 leaves the forward untouched (bit-identical).
    positions: "all" (every position, as CAA), or "generated" (positions at or past the row's
    `prompt_len` given to forward, as the evaluation-awareness notebooks did).
    seen: None (nothing measured), or a dict that apply() fills, per steered layer, with [B, 3]
    float64 sums over each row's steered positions of the residual stream met there (before this
    layer's steering): |h|, |h . u| and the count of positions, position 0 (the attention sink)
    left out of a forward over more than one position: steering/scale.py's push measured in the
    forward (server/engine.py reports it as steering_push)."""
    vectors: Dict[int, torch.Tensor]  # layer -> [dim]
    multiplier: Union[float, torch.Tensor] = 1.0
    ablate: bool = False
    positions: str = "all"
    seen: Optional[Dict[int, torch.Tensor]] = None

    def __post_init__(self):
        if self.positions not in STEER_POSITIONS:
            raise LlamaError(f"steering positions {self.positions!r}: expected all or generated")

    @property
    def is_noop(self) -> bool:
        m = self.multiplier
        return not self.vectors or (not torch.is_tensor(m) and m == 0)

    def apply(self, layer: int, h: torch.Tensor, pos: torch.Tensor,
              prompt_len: Optional[torch.Tensor]) -> torch.Tensor:
        """h [B, S, dim] at positions pos [B, S] -> h steered at `layer` (h if not steered)."""
        if layer not in self.vectors or self.is_noop:
            return h
        v = self.vectors[layer].to(h)
        m = torch.as_tensor(self.multiplier, dtype=h.dtype, device=h.device).reshape(-1, 1, 1)
        where = None
        if self.positions == "generated":
            if prompt_len is None:
                raise LlamaError("steering only generated positions needs the prompt lengths")
            where = pos >= prompt_len[:, None]
            m = m * where[..., None].to(h.dtype)
        if self.seen is not None:
            self.measure(layer, h, pos, where, v)
        if self.ablate:
            u = v / v.norm()
            return h - m * (h @ u)[..., None] * u
        return h + m * v

    def measure(self, layer: int, h: torch.Tensor, pos: torch.Tensor,
                where: Optional[torch.Tensor], v: torch.Tensor):
        """Add h [B, S, dim]'s sums at its steered positions (where [B, S], None: all) to
        seen[layer] (the class docstring)."""
        keep = torch.ones_like(pos, dtype=torch.bool) if where is None else where
        if pos.shape[1] > 1:
            keep = keep & (pos != 0)
        keep = keep.to(torch.float64)
        norms = torch.linalg.vector_norm(h, dim=-1, dtype=torch.float64)
        along = (h @ (v / v.norm())).abs().double() if self.ablate else torch.zeros_like(norms)
        sums = torch.stack([(norms * keep).sum(1), (along * keep).sum(1), keep.sum(1)], -1)
        self.seen[layer] = self.seen[layer] + sums if layer in self.seen else sums


def column(layer: ColumnParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """fairscale's ColumnParallelLinear forward without the gather or the autograd wrapper:
    x [..., in] -> [..., this rank's out] = x W^T + b, with the layer's bias when it has one."""
    return F.linear(x, layer.weight, layer.bias)


def row_parallel(layer: RowParallelLinear, x: torch.Tensor, mp: int) -> torch.Tensor:
    """fairscale's RowParallelLinear forward (local matmul, then the sum over the model-parallel
    group) without its autograd wrapper, whose per-call cost is felt in a one-token decode step.
    Column-parallel layers are called the same way (`column`, no gather)."""
    out = F.linear(x, layer.weight)
    if mp > 1:
        torch.distributed.all_reduce(out, group=fs_init.get_model_parallel_group())
    return out


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, kv_heads: int):
        super().__init__()
        self.mp = mp = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = kv_heads // mp
        self.head_dim = args.head_dim
        hd = self.head_dim
        # a column-parallel bias is split with its weight's rows
        column = dict(bias=args.options.qkv_bias, gather_output=False)
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * hd, **column)
        self.wk = ColumnParallelLinear(args.dim, kv_heads * hd, **column)
        self.wv = ColumnParallelLinear(args.dim, kv_heads * hd, **column)
        self.wo = RowParallelLinear(args.n_heads * hd, args.dim, bias=False,
                                    input_is_parallel=True)
        # per-head norms act on each head alone: replicated on every rank
        norm = args.options.qk_norm
        self.q_norm = RMSNorm(hd, eps=args.norm_eps) if norm else nn.Identity()
        self.k_norm = RMSNorm(hd, eps=args.norm_eps) if norm else nn.Identity()

    def forward(self, x, rot, mask, past: Optional[KV], cache: Optional[KV] = None,
                slots: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, KV]:
        """cache: this block's preallocated (k, v); the new keys and values are written at the
        flat slots [B * S] (KVCache.slots) and attention reads the first mask.shape[-1]
        positions."""
        B, S, _ = x.shape
        q = column(self.wq, x).view(B, S, self.n_local_heads, self.head_dim)
        k = column(self.wk, x).view(B, S, self.n_local_kv_heads, self.head_dim)
        v = column(self.wv, x).view(B, S, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary(self.q_norm(q), rot), apply_rotary(self.k_norm(k), rot)
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        if cache is not None:
            for stored, new in zip(cache, (k, v)):
                flat = new.reshape(-1, *new.shape[2:])  # [B * S, kv heads, hd]
                stored.view(-1, *flat.shape[1:]).index_copy_(0, slots, flat)
            k, v = cache[0][:, : mask.shape[-1]], cache[1][:, : mask.shape[-1]]
        out = F.scaled_dot_product_attention(  # each kv head serves n_heads // kv_heads queries
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None, enable_gqa=self.n_local_heads != self.n_local_kv_heads,
        )  # [B, H, S, hd]
        out = row_parallel(self.wo, out.transpose(1, 2).reshape(B, S, -1), self.mp)
        return out, (k, v)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.mp = fs_init.get_model_parallel_world_size()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False)

    def forward(self, x):
        h = F.silu(column(self.w1, x)) * column(self.w3, x)
        return row_parallel(self.w2, h, self.mp)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, kv_heads: int):
        super().__init__()
        self.attention = Attention(args, kv_heads)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, rot, mask, past: Optional[KV], cache: Optional[KV] = None, slots=None):
        a, kv = self.attention(self.attention_norm(x), rot, mask, past, cache, slots)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), kv


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise LlamaError("vocab_size is not set (params.json has -1: take it from the "
                             "tokenizer)")
        mp = fs_init.get_model_parallel_world_size()
        self.kv_heads = check_parallel(args, mp)
        self.params = args
        embedding = VocabParallelEmbedding if args.vocab_parallel_embedding else ParallelEmbedding
        with uninitialised():
            self.tok_embeddings = embedding(args.vocab_size, args.dim)
            self.layers = nn.ModuleList(TransformerBlock(args, self.kv_heads)
                                        for _ in range(args.n_layers))
            self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False)
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.register_buffer("freqs", rope_frequencies(args), persistent=False)

    def layer_list(self, layers: Optional[Iterable[int]]) -> List[int]:
        wanted = sorted(set(range(self.params.n_layers + 1) if layers is None else layers))
        bad = [i for i in wanted if not 0 <= i <= self.params.n_layers]
        if bad:
            raise LlamaError(f"layer {bad[0]} out of range: this model has layers "
                             f"0..{self.params.n_layers}")
        return wanted

    def logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """[..., dim] block output -> [..., vocab] float32 logits (final norm, output layer).

        Computed as weight @ x^T: with a few rows (a decode step) against a large vocabulary the
        product is bound by reading the weight, and BLAS streams it about twice as fast this way
        round as through F.linear (SmolLM2's 49152 x 576 output on 2 CPU threads: 8 vs 17 ms)."""
        x = self.norm(h)
        local = (self.output.weight @ x.reshape(-1, x.shape[-1]).T).T  # [rows, local vocab]
        if fs_init.get_model_parallel_world_size() > 1:
            local = gather_from_model_parallel_region(local)
        return local.reshape(*x.shape[:-1], -1).float()

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        layers: Optional[Iterable[int]] = None,
        logits: bool = False,
        start: Optional[torch.Tensor] = None,
        past: Optional[List[KV]] = None,
        return_kv: bool = False,
        cache: Optional[KVCache] = None,
        steer: Optional[Steer] = None,
        prompt_len: Optional[torch.Tensor] = None,
        entry: Optional[Tuple[int, torch.Tensor]] = None,
    ) -> Dict:
        """tokens [B, S], right-padded. Returns {layer: [B, S, dim]}: 0 is the embedding output,
        i the output of block i. Runs no block past the deepest requested layer unless `logits`
        (then "logits": [B, S, vocab], float32).

        start [B]: position of tokens[:, 0] in each row. With it, `past` holds each block's keys
        and values of the tokens before (one (k, v) per block, [B, P, kv_heads, hd], of which row b
        uses the first start[b]); `return_kv` adds "kv": per block, the keys and values of `past`
        and these tokens. Or `cache` (a KVCache): these tokens' keys and values are written into it
        at positions start[b]..start[b] + S - 1, and row b attends to its cached positions before.

        steer: a Steer applied to the residual stream at its layers (the returned states are the
        steered ones); prompt_len [B] tells it which positions are generated.
        entry (layer, h [B, S, dim]): start from this state at `layer` instead of the embedding
        (an unsteered prefix computed once, steered from `layer` on); returns layers >= it only.
        """
        wanted = self.layer_list(layers)
        B, S = tokens.shape
        depth = self.params.n_layers if logits else max(wanted)
        first, h = entry if entry is not None else (0, None)
        if wanted and wanted[0] < first:
            raise LlamaError(f"layer {wanted[0]} is before the entry layer {first}")
        if h is None:
            h = self.tok_embeddings(tokens)
        if start is None:
            start = torch.zeros(B, dtype=torch.long, device=tokens.device)
        pos = start[:, None] + torch.arange(S, device=tokens.device)  # [B, S]
        if self.params.sliding_window:
            check_window(self.params, int(pos.max()) + 1)
        angles = pos[..., None].float() * self.freqs  # [B, S, hd // 2]
        rot = torch.polar(torch.ones_like(angles), angles)
        mask, slots = None, None
        if cache is not None:
            end = int(pos.max()) + 1
            if end > cache.length:
                raise LlamaError(f"position {end - 1} is past the KV cache's {cache.length}")
            allowed = torch.arange(end, device=tokens.device) <= pos[..., None]  # [B, S, end]
            mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill_(~allowed, float("-inf"))[:, None]  # added to the scores
            slots = cache.slots(pos)
        elif past is not None:
            if len(past) < depth:
                raise LlamaError(f"past holds keys and values for {len(past)} blocks, "
                                 f"this call runs {depth}")
            P = past[0][0].shape[1]
            seen = torch.arange(P, device=tokens.device)[None, :] < start[:, None]  # [B, P]
            causal = torch.ones(S, S, dtype=torch.bool, device=tokens.device).tril()
            mask = torch.cat([seen[:, None, :].expand(B, S, P), causal.expand(B, S, S)], -1)
            mask = mask[:, None]
        if steer is not None:
            h = steer.apply(first, h, pos, prompt_len)
        out = {first: h} if first in wanted else {}
        kvs = []
        for i in range(first + 1, depth + 1):
            block = self.layers[i - 1]
            h, kv = block(h, rot, mask, None if past is None else past[i - 1],
                          None if cache is None else cache.blocks[i - 1], slots)
            if steer is not None:
                h = steer.apply(i, h, pos, prompt_len)
            if return_kv:
                kvs.append(kv)
            if i in wanted:
                out[i] = h
        if logits:
            out["logits"] = self.logits_of(h)
        if return_kv:
            out["kv"] = kvs
        return out
