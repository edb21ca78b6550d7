"""Per-token heat-maps: each token of a few prompts of a token "all" cache coloured by the
projection of its hidden state on a direction (a saved probe's raw-space `direction`, or a
steering / vectors-folder vector: llama.vectors.load_vectors), one layer at a time.

The tokens are the model's own: the cache's prompt file re-read and re-tokenised with the cache's
tokenizer exactly as extraction does (activations.extract.read_prompts, encode with BOS),
checked against
the cache (data sha256, every prompt's token count against offsets_SIDE.npy), each token decoded
on its own. The projection is x_t . direction for the stored state x_t [d] of token t (no
normalisation; the page's colours centre on the median over the shown tokens at positions >= 1,
position 0 being the attention sink)."""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from activations.cache import ActivationCache
from llama.errors import LlamaError


@dataclass
class TokenMap:
    """prompts: [(id, class, [token text])]; scores {layer: [per prompt float32 [tokens]]}."""
    cache: str
    direction: str
    side: str
    layers: List[int]
    prompts: List[tuple] = field(default_factory=list)
    scores: Dict[int, List[np.ndarray]] = field(default_factory=dict)
    default_layer: int = 0


def pick(classes: List[str], n: int) -> List[int]:
    """Up to n row numbers, the classes taken in turn (the first rows of each)."""
    by = {}
    for i, c in enumerate(classes):
        by.setdefault(c, []).append(i)
    out, queues = [], [list(v) for v in by.values()]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return sorted(out)


def token_texts(cache: ActivationCache, side: str, rows: List[int]) -> List[List[str]]:
    """The decoded tokens of prompts `rows` of the cache (module docstring); LlamaError when the
    prompt file or tokenizer is gone or no longer gives the cached token counts."""
    from activations.extract import read_prompts
    from llama.tokenizer import load_tokenizer

    meta = cache.meta
    data = meta.get("data")
    data_path = data.get("path") if isinstance(data, dict) else data
    tok_path = (meta.get("tokenizer") or {}).get("path")
    for what, p in (("prompt file", data_path), ("tokenizer", tok_path)):
        if not p or not os.path.exists(p):
            raise LlamaError(f"cache {cache.path}: its {what} {p or '(not recorded)'} is not "
                             "found, so its tokens cannot be shown")
    tok = load_tokenizer(tok_path)
    prompts = read_prompts(data_path, tok)
    want = data.get("sha256") if isinstance(data, dict) else None
    if want and want != prompts.sha256:
        raise LlamaError(f"{data_path} changed since cache {cache.path} was extracted "
                         "(sha256 differs)")
    texts = prompts.texts[prompts.sides.index(side)]
    off = cache.offsets(side)
    out = []
    for i in rows:
        ids = tok.encode(texts[i], bos=True)
        if len(ids) != off[i + 1] - off[i]:
            raise LlamaError(f"cache {cache.path} row {i}: {off[i + 1] - off[i]} cached tokens, "
                             f"but the tokenizer gives {len(ids)}: not the cache's tokenizer")
        pieces = []
        for t in ids:
            piece = tok.decode([t])
            if not piece:
                piece = "<bos>" if t == tok.bos_id else f"<{t}>"
            pieces.append(piece)
        out.append(pieces)
    return out


def token_map(cache_path: str, direction: str, side: Optional[str] = None, examples: int = 6,
              layer: Optional[int] = None) -> TokenMap:
    """Scores of every token of `examples` prompts (classes in turn) at every layer both the
    cache and the direction have."""
    from llama.vectors import load_vectors

    cache = ActivationCache(cache_path)
    if cache.token != "all":
        raise LlamaError(f"cache {cache_path} holds one vector per prompt "
                         f"(token {cache.token!r}): per-token heat-maps need a --token all cache")
    side = side or cache.sides[0]
    if side not in cache.sides:
        raise LlamaError(f"side {side!r} not in cache {cache_path} (sides: "
                         f"{', '.join(cache.sides)})")
    n_layers = ((cache.meta.get("model") or {}).get("params") or {}).get("n_layers")
    vectors = load_vectors(direction, None, cache.hidden_dim, n_layers or max(cache.layers),
                           cache.fingerprint)
    layers = sorted(set(vectors) & set(cache.layers))
    if not layers:
        raise LlamaError(f"{direction} has no layer of cache {cache_path} (it has "
                         f"{', '.join(map(str, sorted(vectors)))}; the cache "
                         f"{', '.join(map(str, cache.layers))})")
    if layer is not None and layer not in layers:
        raise LlamaError(f"--layer {layer}: not among the heat-map's layers "
                         f"({', '.join(map(str, layers))})")
    classes = cache.types or ([f"label {x}" for x in cache.labels] if cache.labels is not None
                              else ["unlabelled"] * cache.num_examples)
    rows = pick(list(classes), int(examples))
    texts = token_texts(cache, side, rows)
    off = cache.offsets(side)
    out = TokenMap(os.path.abspath(cache_path), os.path.abspath(direction), side, layers,
                   default_layer=layer if layer is not None else layers[len(layers) // 2])
    out.prompts = [(str(cache.ids[i]), str(classes[i]), t) for i, t in zip(rows, texts)]
    for l in layers:
        states = cache.rows(l, side)
        v = vectors[l].numpy().astype(np.float64)
        out.scores[l] = [(states[int(off[i]):int(off[i + 1])].astype(np.float64) @ v)
                         .astype(np.float32) for i in rows]
    return out
