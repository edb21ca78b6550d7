"""Meta layout facts shared by the loaders and converters: weight names and their unsplit shapes,
the dim each weight is split on across model-parallel ranks, and which slice a rank holds.

Weights are [out, in]. wq, wk, wv, w1, w3 and output split on dim 0 (column parallel); wo and w2
on dim 1 (row parallel); norms are replicated; tok_embeddings splits on dim 1 (Llama 1/2,
ParallelEmbedding) or dim 0 (Llama 3, VocabParallelEmbedding). Family extras (model.FAMILIES):
wq / wk / wv biases (Qwen2) split on dim 0 with their weights; per-head q_norm / k_norm (Qwen3)
replicated.
"""
from typing import Dict, Optional, Tuple

import torch

from .errors import LlamaError
from .model import ModelArgs, check_parallel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def split_dim(name: str, args: ModelArgs) -> Optional[int]:
    """The dim a Meta weight is split on across model-parallel ranks (None: replicated)."""
    kind = name.split(".")[-2]
    if kind in ("wq", "wk", "wv", "w1", "w3", "output"):
        return 0
    if kind in ("wo", "w2"):
        return 1
    if kind == "tok_embeddings":
        return 0 if args.vocab_parallel_embedding else 1
    return None


def full_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Every weight's unsplit shape (kv heads as in the checkpoint, not replicated)."""
    d, hd, f, v = args.dim, args.head_dim, args.hidden_dim, args.vocab_size
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
        if args.options.qkv_bias:
            shapes.update({p + "attention.wq.bias": (args.n_heads * hd,),
                           p + "attention.wk.bias": (args.kv_heads * hd,),
                           p + "attention.wv.bias": (args.kv_heads * hd,)})
        if args.options.qk_norm:
            shapes.update({p + "attention.q_norm.weight": (hd,),
                           p + "attention.k_norm.weight": (hd,)})
    return shapes


ROTARY = ("wq", "wk", "q_norm", "k_norm")  # rows in rotary order: weights, biases, head norms


def interleave_rotary(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows in Hugging Face's rotate-half order within each head (the first half of a head's
    dims pairs with the second) -> Meta's interleaved pairs (2i, 2i + 1). t: q/k weights
    [n * head_dim, in], their biases [n * head_dim] or a per-head norm's weight [head_dim], whole
    heads only (FACTS.md: `w.view(n, 2, hd // 2, dim).transpose(1, 2)`)."""
    if t.shape[0] % head_dim:
        raise LlamaError(f"{t.shape[0]} rows are not whole heads of {head_dim}")
    n = t.shape[0] // head_dim
    return t.reshape(n, 2, head_dim // 2, -1).transpose(1, 2).reshape(t.shape)


def rotate_half_rotary(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of interleave_rotary: rows in Meta's interleaved pairs (2i, 2i + 1) -> Hugging
    Face's rotate-half order (pair i at rows i and i + head_dim / 2 of its head). Same shapes
    and LlamaError (transformers' convert_llama_weights_to_hf `permute`)."""
    if t.shape[0] % head_dim:
        raise LlamaError(f"{t.shape[0]} rows are not whole heads of {head_dim}")
    n = t.shape[0] // head_dim
    return t.reshape(n, head_dim // 2, 2, -1).transpose(1, 2).reshape(t.shape)


def rank_slice(name: str, args: ModelArgs, mp: int, rank: int) -> Tuple[Optional[int], int, int]:
    """(dim, lo, hi): the part of the unsplit weight that model-parallel rank `rank` of `mp`
    holds."""
    dim = split_dim(name, args)
    if dim is None:
        return None, 0, 0
    kind = name.split(".")[-2]
    if kind in ("wk", "wv") and mp > args.kv_heads:  # replicated kv heads: one whole head per rank
        head = rank // (check_parallel(args, mp) // args.kv_heads)
        return 0, head * args.head_dim, (head + 1) * args.head_dim
    size = full_shapes(args)[name][dim]
    if size % mp:
        raise LlamaError(f"{name}: size {size} on dim {dim} does not split into {mp} parts")
    return dim, rank * size // mp, (rank + 1) * size // mp
