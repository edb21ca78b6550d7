"""Steering vectors from disk, checked against the model they will steer.

    vectors = load_vectors(source, [10, 15], dim=576, n_layers=30, fingerprint=lm.fingerprint)
    # -> {layer: [dim] float32 tensor}, for llama.model.Steer

Sources:
- the cached workflow's output (scripts/generate_vectors_from_cache.py): a run folder
  NAME_TIMESTAMP (its raw `vectors/` are used), or its `vectors/` or `normalized_vectors/` folder;
  one `layer_L.safetensors` per layer holding a tensor "vector" [dim] and metadata (fingerprint);
- a `.npy` or `.safetensors` file holding one vector [dim] (or a [n_layers + 1, dim] table, row L
  for layer L), with the layer(s) given;
- a saved ccs.py linear probe (`RUN/probes/METHOD.safetensors` with METHOD.json beside it): its
  "direction" tensor [L, dim] (the raw-space direction) when it has one, else mapped back from the
  standardisation: the probe reads z = (x - mean[side]) / std[side], so w . z = (w / std[side]) . x
  + const and the raw direction is sign * w / std. A contrast probe's score rises when the plus
  side moves along its gradient g_plus or the minus side along g_minus; its direction is
  (g_plus - g_minus) / 2 ("diff", (zp - zm) @ w: sign * w / std averaged over the sides; "concat",
  [zp, zm] @ w: w[:dim] on plus, w[dim:] on minus). MLP probes have no single direction and are
  refused.
Vectors state their conventions in their metadata (describe_vector, read back by
vector_conventions): what to do with them, which layer numbering, how they were read and from
what, their norm against the residual stream's, and which class the plus side stands for.
Refused in one line: a width other than the model's, a layer the source or the model lacks, and a
fingerprint (of the model the vectors came from) other than the model's.
"""
import glob
import json
import os
import re
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

from .errors import LlamaError


LAYER_CONVENTION = ("layer L = the output of block L (0: the embeddings) = Hugging Face "
                    "hidden_states[L] = llama.cpp control vector direction.{L-1}")
CONVENTION_KEYS = ("operation", "layer", "layer_convention", "token", "mean_keep_first", "norm",
                   "residual_norm", "source_data", "fingerprint", "plus_class", "plus_side",
                   "vector", "hidden_dim", "cache")


def describe_vector(layer: int, norm: float, residual_norm: Optional[float] = None,
                    token: str = "", mean_keep_first: Optional[bool] = None,
                    source_data: str = "", fingerprint: str = "", plus_class: str = "",
                    plus_side: str = "", operation: str = "add", **extra) -> Dict[str, str]:
    """A vector's self-description, as str -> str metadata (safetensors, GGUF): operation "add"
    (steering adds multiplier x vector; "ablate": its direction is removed), layer and
    LAYER_CONVENTION, token (the read position the states came from: last / mean / all) and
    mean_keep_first (whether position 0 was averaged), norm (|vector|), residual_norm (the mean
    residual-stream norm at that layer on the source data), source_data (path), fingerprint (the
    model's), plus_class / plus_side (which class the plus side stands for: a name and a
    sentence); `extra` keys are kept as strings."""
    meta = {"operation": operation, "layer": str(layer), "layer_convention": LAYER_CONVENTION,
            "token": token, "norm": f"{norm:.9g}",
            "residual_norm": "" if residual_norm is None else f"{residual_norm:.9g}",
            "source_data": source_data, "fingerprint": fingerprint, "plus_class": plus_class,
            "plus_side": plus_side}
    if mean_keep_first is not None:
        meta["mean_keep_first"] = str(bool(mean_keep_first))
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def vector_conventions(source: str) -> Dict[int, Dict[str, str]]:
    """{layer: metadata} of a vectors folder (or a run folder holding vectors/); {} for any
    other source (a bare .npy/.safetensors vector or a probe states none)."""
    source = os.fspath(source)
    if not os.path.isdir(source):
        return {}
    inner = os.path.join(source, "vectors")
    found = read_vectors_folder(inner if os.path.isdir(inner) else source)
    return {l: dict(m) for l, (_, m) in found.items()}


def _check_layers(layers: Iterable[int], n_layers: int, where: str) -> List[int]:
    layers = sorted(set(int(x) for x in layers))
    bad = [x for x in layers if not 0 <= x <= n_layers]
    if bad:
        raise LlamaError(f"{where}: layer {bad[0]} is not in the model (layers 0..{n_layers})")
    return layers


def read_vectors_folder(path: str) -> Dict[int, tuple]:
    """{layer: (vector, metadata)} of the cached workflow's vectors folder: one
    layer_L.safetensors per layer, each holding a tensor "vector". The one reader of that format
    (steering and scripts/analyze_probe_from_cache.py)."""
    from safetensors import safe_open

    found = {}
    for f in glob.glob(os.path.join(path, "layer_*.safetensors")):
        m = re.fullmatch(r"layer_(\d+)\.safetensors", os.path.basename(f))
        if m:
            with safe_open(f, "np") as st:
                if "vector" not in st.keys():
                    raise LlamaError(f"{f}: no tensor 'vector'")
                found[int(m.group(1))] = (st.get_tensor("vector"), st.metadata() or {})
    if not found:
        raise LlamaError(f"{path}: no layer_L.safetensors vectors in this folder")
    return found


def _file(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:
            raise LlamaError(f"{path}: not a plain .npy array ({e})") from None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "np") as st:
            keys = list(st.keys())
            key = "vector" if "vector" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise LlamaError(f"{path}: holds {len(keys)} tensors and none is named 'vector'")
            return st.get_tensor(key)
    except SafetensorError as e:
        raise LlamaError(f"{path}: not a safetensors file ({e})") from None


def probe_directions(path: str) -> tuple:
    """({layer: raw-space direction [dim]}, metadata) of a saved linear probe (module
    docstring)."""
    from safetensors.numpy import load_file

    info_path = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(info_path):
        raise LlamaError(f"{path}: no {os.path.basename(info_path)} beside the probe")
    with open(info_path) as f:
        info = json.load(f)
    t = load_file(path)
    layers = [int(x) for x in t["layers"]]
    if "direction" in t:
        return {l: t["direction"][i] for i, l in enumerate(layers)}, info
    if "w" not in t or t["w"].ndim != 2:
        raise LlamaError(f"{path}: probe {info.get('method')!r} has no linear weight w [layers, "
                         "dim] (an MLP probe has no single direction)")
    w, std = t["w"].astype(np.float64), t["std"].astype(np.float64)  # std [L, sides, dim]
    sign = t["sign"].astype(np.float64).reshape(-1, 1) if "sign" in t else 1.0
    dim = std.shape[-1]
    if w.shape[1] == 2 * dim:  # concat: [zp, zm] @ w
        raw = (w[:, :dim] / std[:, 0] - w[:, dim:] / std[:, -1]) / 2
    else:
        raw = (w[:, None, :] / std).mean(1)
    raw = sign * raw
    return {l: raw[i].astype(np.float32) for i, l in enumerate(layers)}, info


def load_vectors(source: str, layers: Optional[Iterable[int]], dim: int, n_layers: int,
                 fingerprint: Optional[str] = None) -> Dict[int, torch.Tensor]:
    """{layer: [dim] float32} from `source` (see the module docstring); layers None: all the
    source has (a folder or probe; a single file needs them)."""
    source = os.fspath(source)
    if not os.path.exists(source):
        raise LlamaError(f"{source}: no such vectors file or folder")
    have_fp = None
    if os.path.isdir(source):
        inner = os.path.join(source, "vectors")  # a run folder of the cached workflow
        found = read_vectors_folder(inner if os.path.isdir(inner) else source)
        table = {l: v for l, (v, _) in found.items()}
        fps = {m.get("fingerprint") for _, m in found.values()} - {None, ""}
        have_fp = fps.pop() if len(fps) == 1 else None
    elif source.endswith(".safetensors") and os.path.exists(os.path.splitext(source)[0] + ".json"):
        table, info = probe_directions(source)
        have_fp = info.get("fingerprint")
    else:
        arr = _file(source)
        if layers is None:
            raise LlamaError(f"{source}: a single vector file needs the layer it is for "
                             "(--layers)")
        if arr.ndim == 1:
            table = {l: arr for l in layers}
        elif arr.ndim == 2:
            table = dict(enumerate(arr))
        else:
            raise LlamaError(f"{source}: shape {arr.shape} is not a vector [dim] or a table "
                             "[layers, dim]")
    if fingerprint and have_fp and have_fp != fingerprint:
        raise LlamaError(f"{source}: vectors of another model (fingerprint {have_fp}, this model "
                         f"{fingerprint})")
    layers = _check_layers(table if layers is None else layers, n_layers, source)
    missing = [l for l in layers if l not in table]
    if missing:
        raise LlamaError(f"{source}: no vector for layer {missing[0]} (it has "
                         f"{', '.join(map(str, sorted(table)))})")
    out = {}
    for l in layers:
        v = np.asarray(table[l], dtype=np.float32).reshape(-1)
        if v.shape[0] != dim:
            raise LlamaError(f"{source}: layer {l} vector has width {v.shape[0]}, the model's "
                             f"residual stream {dim}")
        bad = np.flatnonzero(~np.isfinite(v))
        if len(bad):
            raise LlamaError(f"{source}: layer {l} vector holds a NaN or an infinity (element "
                             f"{int(bad[0])} is {v[bad[0]]}, {len(bad)} such)")
        if not np.any(v):
            raise LlamaError(f"{source}: layer {l} vector is zero")
        out[l] = torch.from_numpy(v.copy())
    return out
