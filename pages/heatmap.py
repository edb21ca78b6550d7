"""Per-token heat-maps: each token of a few prompts of a token "all" cache coloured by its
score at one layer: a saved probe's read-out (llama.vectors.read_probe, the reader the server
uses: score = x_t . weight + bias, coloured by its margin over the probe's recorded decision
threshold, as the playground colours probe_margins), or the projection on a steering /
vectors-folder vector (llama.vectors.load_vectors: x_t . vector, coloured around the median over
the shown tokens at positions >= 1, position 0 being the attention sink).

The tokens are the model's own: the cache's prompt file re-read and re-tokenised with the cache's
tokenizer exactly as extraction does (activations.extract.read_prompts, encode with BOS),
checked against the cache (data sha256, every prompt's token count against offsets_SIDE.npy),
each token decoded on its own. A layer where a probe's weight is zero (it learnt nothing there,
e.g. layer 0 of a contrast probe) is left out unless asked for with `layer`."""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from activations.cache import ActivationCache
from llama.errors import LlamaError


@dataclass
class TokenMap:
    """prompts: [(id, class, [token text])]; scores {layer: [per prompt float32 [tokens]]};
    thresholds {layer: a probe's decision threshold} (empty for a vector: centred on the median);
    positive: the probe's positive class; text: what the probe was trained on."""
    cache: str
    direction: str
    side: str
    layers: List[int]
    prompts: List[tuple] = field(default_factory=list)
    scores: Dict[int, List[np.ndarray]] = field(default_factory=dict)
    default_layer: int = 0
    thresholds: Dict[int, float] = field(default_factory=dict)
    positive: str = ""
    text: str = ""


def read_outs(direction: str, cache: ActivationCache, layer: Optional[int]) -> tuple:
    """({layer: (weight [d], bias, threshold or None)}, the probe or None) of a saved probe or
    a vectors source, at the layers with a non-zero weight (and `layer` itself, refused when
    zero)."""
    from llama.vectors import is_probe, load_vectors, read_probe

    if is_probe(direction):
        saved = read_probe(direction, cache.hidden_dim, cache.fingerprint)
        keep = set(saved.usable())
        if layer is not None and layer in saved.layers:
            keep.add(layer)
        return {l: saved.at(l) for l in sorted(keep)}, saved
    n_layers = ((cache.meta.get("model") or {}).get("params") or {}).get("n_layers")
    vectors = load_vectors(direction, None, cache.hidden_dim, n_layers or max(cache.layers),
                           cache.fingerprint)
    return {l: (v.numpy(), 0.0, None) for l, v in vectors.items()}, None


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
    cache = ActivationCache(cache_path)
    if cache.token != "all":
        raise LlamaError(f"cache {cache_path} holds one vector per prompt "
                         f"(token {cache.token!r}): per-token heat-maps need a --token all cache")
    side = side or cache.sides[0]
    if side not in cache.sides:
        raise LlamaError(f"side {side!r} not in cache {cache_path} (sides: "
                         f"{', '.join(cache.sides)})")
    reads, saved = read_outs(direction, cache, layer)
    layers = sorted(set(reads) & set(cache.layers))
    if not layers:
        raise LlamaError(f"{direction} has no layer of cache {cache_path} (it has "
                         f"{', '.join(map(str, sorted(reads)))}; the cache "
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
    if saved is not None:
        out.thresholds = {l: reads[l][2] for l in layers}
        out.positive, out.text = str(saved.info.get("positive_class", "")), saved.text
    out.prompts = [(str(cache.ids[i]), str(classes[i]), t) for i, t in zip(rows, texts)]
    for l in layers:
        states = cache.rows(l, side)
        weight, bias = reads[l][0].astype(np.float64), reads[l][1]
        out.scores[l] = [(states[int(off[i]):int(off[i + 1])].astype(np.float64) @ weight + bias)
                         .astype(np.float32) for i in rows]
    return out
