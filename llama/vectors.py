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
from dataclasses import dataclass
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


def is_probe(path) -> bool:
    """A saved ccs.py probe: METHOD.safetensors with METHOD.json beside it."""
    path = os.fspath(path)
    return path.endswith(".safetensors") and os.path.isfile(os.path.splitext(path)[0] + ".json")


def _probe_files(path: str) -> tuple:
    """(tensors {name: np.ndarray}, METHOD.json, safetensors metadata) of a saved probe."""
    from safetensors import SafetensorError, safe_open

    info_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(path) or not os.path.isfile(info_path):
        raise LlamaError(f"{path}: no such probe (METHOD.safetensors with METHOD.json beside it)")
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise LlamaError(f"{info_path}: not a probe description ({e})") from None
    try:
        with safe_open(path, "np") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}
            meta = st.metadata() or {}
    except SafetensorError as e:
        raise LlamaError(f"{path}: not a safetensors file ({e})") from None
    if "layers" not in tensors:
        raise LlamaError(f"{path}: no 'layers' tensor (not a ccs.py probe)")
    return tensors, info, meta


def _direction(t: dict, info: dict, path: str) -> np.ndarray:
    """[L, dim] raw-space direction: the saved one, else mapped back from w / std (module
    docstring)."""
    if "direction" in t:
        return t["direction"]
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
    return (sign * raw).astype(np.float32)


def probe_directions(path: str) -> tuple:
    """({layer: raw-space direction [dim]}, metadata) of a saved linear probe (module
    docstring)."""
    t, info, _ = _probe_files(path)
    direction = _direction(t, info, path)
    return {int(l): direction[i] for i, l in enumerate(t["layers"])}, info


def read_out(t: dict, threshold: float, path: str = "probe", info: Optional[dict] = None):
    """How one hidden state h [dim] is scored by a probe's tensors t (probes/report.py's
    save_probes): (weight [L, dim] float32, bias [L], threshold [L], kind); score = h . weight +
    bias, the probe's positive class above threshold (raw score units).
    kind "w_raw" (a single-prompt probe: its own oriented score x . w_raw + b_raw, whose decision
    threshold is the method's, `threshold`: 0 for a linear probe); kind "direction" (a contrast
    pair probe reads a pair, not one state: its raw-space direction, bias 0, and as threshold the
    midpoint of the two classes' mean scores on the training rows, direction . (mean_plus +
    mean_minus) / 2: each pair gives one true and one false statement, so that midpoint is the
    direction's value at the training states' mean)."""
    n = len(t["layers"])
    if "w_raw" in t and t["w_raw"].ndim == 3 and t["w_raw"].shape[1] == 1:
        weight = t["w_raw"][:, 0].astype(np.float32)
        bias = t["b_raw"].reshape(n, -1)[:, 0].astype(np.float64)
        return weight, bias, np.full(n, float(threshold)), "w_raw"
    weight = _direction(t, info or {}, path).astype(np.float32)
    if "mean" not in t:
        raise LlamaError(f"{path}: no training mean: the probe's threshold cannot be found")
    centre = t["mean"].astype(np.float64).mean(1)  # [L, dim]: the sides' training means averaged
    return weight, np.zeros(n), np.einsum("ld,ld->l", weight.astype(np.float64), centre), \
        "direction"


@dataclass
class SavedProbe:
    """A saved ccs.py probe as one hidden state h [dim] at a layer reads it (read_out): score =
    h . weight[i] + bias[i] for layers[i]; above threshold[i] the probe says its positive class
    (`info["positive_class"]`), and margin = score - threshold is the calibrated read-out.
    chosen_layer: the layer ccs.py chose on validation rows (None for a probe saved before it was
    recorded); text: what the probe was trained on (info["text"], "" when not recorded)."""
    path: str
    info: dict
    layers: List[int]
    weight: np.ndarray  # [L, dim] float32
    bias: np.ndarray  # [L]
    threshold: np.ndarray  # [L]
    kind: str  # "w_raw" or "direction"
    chosen_layer: Optional[int]

    @property
    def text(self) -> str:
        return str(self.info.get("text") or "")

    def usable(self) -> List[int]:
        """The layers whose weight is not zero (a layer where the probe learnt nothing, e.g. layer
        0 of a contrast probe whose pairs end in the same token, is left out)."""
        return [l for i, l in enumerate(self.layers) if np.any(self.weight[i])]

    def at(self, layer: int) -> tuple:
        """(weight [dim] float32, bias, threshold) at `layer`; LlamaError when the probe lacks it
        or its weight there is zero."""
        if layer not in self.layers:
            raise LlamaError(f"{self.path}: the probe has no layer {layer} (it has "
                             f"{', '.join(map(str, self.layers))})")
        i = self.layers.index(layer)
        if not np.any(self.weight[i]):
            raise LlamaError(f"{self.path}: layer {layer} vector is zero (the probe learnt "
                             f"nothing there; its layers with a direction: "
                             f"{', '.join(map(str, self.usable())) or 'none'})")
        return self.weight[i], float(self.bias[i]), float(self.threshold[i])


def read_probe(path, dim: Optional[int] = None, fingerprint: Optional[str] = None) -> SavedProbe:
    """The one reader of a saved probe's read-out (the server and the report's heat-map):
    -> SavedProbe. Refused in one line: no such file or METHOD.json, not safetensors, another
    model's fingerprint, a width other than `dim`, no linear read-out (an MLP probe)."""
    path = os.fspath(path)
    t, info, meta = _probe_files(path)
    have = info.get("fingerprint")
    if fingerprint and have and have != fingerprint:
        raise LlamaError(f"{path}: a probe of another model (fingerprint {have}, this model "
                         f"{fingerprint})")
    if "w_raw" not in t and "direction" not in t and ("w" not in t or t["w"].ndim != 2):
        raise LlamaError(f"{path}: no raw-space w_raw or direction (an MLP probe has no linear "
                         "read-out)")
    if "w_raw" not in t and "direction" not in t and "std" not in t:
        raise LlamaError(f"{path}: no raw-space w_raw or direction, and no std to map w back")
    weight, bias, thr, kind = read_out(t, float(info.get("threshold", 0.0)), path, info)
    if "read_threshold" in t:
        thr = t["read_threshold"].astype(np.float64).reshape(-1)
    if dim is not None and weight.shape[-1] != dim:
        raise LlamaError(f"{path}: probe width {weight.shape[-1]}, the model's residual stream "
                         f"{dim}")
    chosen = info.get("chosen_layer", meta.get("chosen_layer"))
    chosen = int(chosen) if chosen not in (None, "", "None") else None
    return SavedProbe(path, info, [int(x) for x in t["layers"]], weight, bias, thr, kind,
                      chosen)


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
    elif is_probe(source):
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
    asked = layers is not None
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
            if asked:
                raise LlamaError(f"{source}: layer {l} vector is zero")
            continue  # a layer nobody asked for (a probe's layer 0, say) is left out
        out[l] = torch.from_numpy(v.copy())
    if not out:
        raise LlamaError(f"{source}: every vector is zero")
    return out
