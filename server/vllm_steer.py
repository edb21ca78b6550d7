"""Per-request steering inside vLLM's model, as part of its compiled graph: a vLLM general plugin
(entry point `vllm.general_plugins`, loaded by vLLM in each of its processes).

After the model loads and before its first (compiling) forward, each steered decoder layer is
wrapped in `SteeredLayer`, which reads preallocated per-token buffers ([max_num_tokens, dim] on
the model's device) and adds them to the residual stream:

    s = h + r                                  # vLLM layers return (h, r); the stream is the sum
    s' = s + add[t] - coef[t] (s . unit[t]) unit[t]

so the compiled graph reads the buffers' contents at run time: steering a request needs no
recompilation, and rows left at zero are bit-identical to unsteered ones. Before each forward
the model runner's `_model_forward` is wrapped to fill the buffers from the scheduled requests'
`SamplingParams.extra_args["llama_ccs"]` and the batch's token layout (the runner's
`query_start_loc`, `num_computed_tokens_cpu`, `num_prompt_tokens`): chunked prefill and mixed
batches land on the right rows. Same arithmetic as llama.model.Steer: addition h + m v, ablation
h - m (h . u) u, positions "all" or "generated" (position >= the prompt length).

Which layers are wrapped: vLLM's `additional_config={"llama_ccs": {"steer_layers": [10, 20]}}`
(`--additional-config`), this project's layer numbers (L = the output of block L; 1..n_layers).
It is part of vLLM's config hash, so a compiled graph cached for other layers is never reused.
Absent or empty: nothing is wrapped and the model is vLLM's own.

A request's spec (extra_args["llama_ccs"]):
    {"vectors": {"10": [dim floats], ...}   # the vectors as applied at multiplier 1, per layer
     "multiplier": float, "ablate": bool, "positions": "all" | "generated",
     "id": str}                             # optional: the key its stats are kept under

Each wrapped layer also writes each token's residual-stream norm |s| and |s . unit| into stats
buffers; after the forward they are summed per steered request, so that `take_stats(req_id)`
(a worker method, called through vLLM's collective_rpc; req_id: the spec's "id", else vLLM's
internal request id) returns per layer
push = |multiplier| x |vector| / mean |s| (ablation: |multiplier| x mean |s . u| / mean |s|) over
the request's steered positions, position 0 (the attention sink) left out when there are others:
steering/scale.py's push, measured in the forward passes that steered it.
"""
import hashlib
import json
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

KEY = "llama_ccs"  # the SamplingParams.extra_args and additional_config key
KEEP_STATS = 4096  # finished requests whose stats wait to be taken


def steer_layers(vllm_config) -> List[int]:
    """The project's layer numbers additional_config["llama_ccs"]["steer_layers"] names ([] when
    absent)."""
    extra = getattr(vllm_config, "additional_config", None)
    ours = extra.get(KEY) if isinstance(extra, dict) else None
    return sorted({int(x) for x in (ours or {}).get("steer_layers", [])})


def request_args(vectors: Dict[int, torch.Tensor], multiplier: float, ablate: bool = False,
                 positions: str = "all", tag: Optional[str] = None) -> dict:
    """SamplingParams.extra_args for one steered request. vectors: {project layer: [dim] tensor,
    as applied at multiplier 1}; tag: the key its stats are kept under (take_stats)."""
    spec = {"vectors": {str(k): v.float().tolist() for k, v in vectors.items()},
            "multiplier": float(multiplier), "ablate": bool(ablate), "positions": positions}
    if tag is not None:
        spec["id"] = tag
    return {KEY: spec}


def cache_salt(extra_args: dict) -> str:
    """vLLM's cache_salt for a steered request: keys and values computed under one steering are
    reused by requests with the same steering only (prefix caching)."""
    spec = {k: v for k, v in extra_args[KEY].items() if k != "id"}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def steering_config(layers) -> dict:
    """vLLM's additional_config that wraps these layers (LLM(additional_config=...))."""
    return {KEY: {"steer_layers": sorted({int(x) for x in layers})}}


class SteeredLayer(nn.Module):
    """A vLLM decoder layer whose output residual stream gets the per-token steering of the
    buffers: add [N, dim], unit [N, dim], coef [N]; stats [N, 2] receives |s| and |s . unit|."""

    def __init__(self, inner: nn.Module, max_tokens: int, dim: int, dtype, device):
        super().__init__()
        self.inner = inner
        zeros = dict(dtype=dtype, device=device)
        self.register_buffer("add", torch.zeros(max_tokens, dim, **zeros), persistent=False)
        self.register_buffer("unit", torch.zeros(max_tokens, dim, **zeros), persistent=False)
        self.register_buffer("coef", torch.zeros(max_tokens, 1, **zeros), persistent=False)
        self.register_buffer("stats", torch.zeros(max_tokens, 2, **zeros), persistent=False)

    def forward(self, positions, hidden_states, residual, **kwargs):
        h, r = self.inner(positions, hidden_states, residual, **kwargs)
        n = h.shape[0]
        stream = h + r
        unit = self.unit[:n]
        along = (stream * unit).sum(-1, keepdim=True)
        self.stats[:n].copy_(torch.cat([torch.linalg.vector_norm(stream, dim=-1, keepdim=True),
                                        along.abs()], -1))
        return h + self.add[:n] - self.coef[:n] * along * unit, r


class Steering:
    """The wrapped layers of one model runner and the per-request state: parsed specs, stats."""

    def __init__(self, layers: Dict[int, SteeredLayer]):
        self.layers = layers  # project layer -> wrapper
        self.specs: Dict[str, Optional[dict]] = {}
        self.stats: "OrderedDict[str, dict]" = OrderedDict()
        self.rows: List[tuple] = []  # (req_id, lo, hi) steered in the last fill
        self.dirty = 0  # rows of the buffers that may hold non-zero steering

    def spec(self, req_id: str, params) -> Optional[dict]:
        """The parsed steering of a request (tensors on the model's device), cached per id."""
        if req_id in self.specs:
            return self.specs[req_id]
        extra = getattr(params, "extra_args", None) or {}
        raw = extra.get(KEY) if isinstance(extra, dict) else None
        spec = None
        if raw and float(raw.get("multiplier", 0.0)) != 0.0:
            some = next(iter(self.layers.values()))
            vecs = {int(k): torch.tensor(v, dtype=torch.float32)
                    for k, v in raw["vectors"].items()}
            spec = {"id": str(raw.get("id") or req_id), "multiplier": float(raw["multiplier"]),
                    "ablate": bool(raw.get("ablate")),
                    "generated": raw.get("positions", "all") == "generated",
                    "missing": sorted(set(vecs) - set(self.layers)),
                    "vectors": {k: v.to(some.add) for k, v in vecs.items() if k in self.layers},
                    "norms": {k: float(v.norm()) for k, v in vecs.items()}}
        self.specs[req_id] = spec
        return spec

    def fill(self, runner):
        """Write this step's per-token steering into the buffers, from the runner's batch."""
        batch = runner.input_batch
        n_reqs = batch.num_reqs
        ids = batch.req_ids[:n_reqs]
        steered = []
        for i, req_id in enumerate(ids):
            state = runner.requests.get(req_id)
            spec = self.spec(req_id, getattr(state, "sampling_params", None))
            if spec is not None:
                steered.append((i, req_id, spec))
        if len(self.specs) > 4 * max(n_reqs, 64):  # forget requests no longer scheduled
            live = set(ids)
            self.specs = {k: v for k, v in self.specs.items() if k in live}
        if self.dirty:
            for layer in self.layers.values():
                layer.add[:self.dirty].zero_()
                layer.coef[:self.dirty].zero_()
            self.dirty = 0
        self.rows = []
        if not steered:
            return
        qsl = runner.query_start_loc.np
        put = {}  # (layer, ablate) -> the rows, their vectors and multipliers
        for i, req_id, spec in steered:
            lo, hi = int(qsl[i]), int(qsl[i + 1])
            if spec["generated"]:  # this chunk's positions are computed .. computed + hi - lo
                first = int(batch.num_prompt_tokens[i]) - int(batch.num_computed_tokens_cpu[i])
                lo = max(lo, lo + first)
            if lo >= hi:
                continue
            if "rows" not in spec:  # what its rows get, computed once per request
                m = spec["multiplier"]
                spec["rows"] = {layer: vec / vec.norm() if spec["ablate"] else m * vec
                                for layer, vec in spec["vectors"].items()}
            for layer, vec in spec["rows"].items():
                index, values, coefs = put.setdefault((layer, spec["ablate"]), ([], [], []))
                index.extend(range(lo, hi))
                values.extend([vec] * (hi - lo))
                coefs.extend([spec["multiplier"]] * (hi - lo))
            start = int(batch.num_computed_tokens_cpu[i]) + lo - int(qsl[i])
            self.rows.append((req_id, lo, hi, start, spec))
            self.dirty = max(self.dirty, hi)
        for (layer, ablate), (index, values, coefs) in put.items():  # one write per buffer
            wrap = self.layers[layer]
            rows = torch.tensor(index, device=wrap.add.device)
            if ablate:
                wrap.unit[rows] = torch.stack(values)
                wrap.coef[rows] = torch.tensor(coefs, dtype=wrap.coef.dtype,
                                               device=wrap.coef.device)[:, None]
            else:
                wrap.add[rows] = torch.stack(values)

    def collect(self):
        """Add the last forward's |s| and |s . u| of each steered request's rows to its stats."""
        read = {}  # layer -> its stats rows as float64 numbers, read once
        top = max((hi for _, _, hi, _, _ in self.rows), default=0)
        for _, lo, hi, start, spec in self.rows:
            req_id = spec["id"]
            got = self.stats.setdefault(req_id, {"missing": spec["missing"], "layers": {}})
            skip = 1 if start == 0 and hi - lo > 1 else 0  # position 0, the attention sink
            for layer in spec["vectors"]:
                if layer not in read:
                    read[layer] = self.layers[layer].stats[:top].double().tolist()
                acc = got["layers"].setdefault(layer, [0.0, 0.0, 0])
                for norm, along in read[layer][lo + skip:hi]:
                    acc[0] += norm
                    acc[1] += along
                acc[2] += hi - lo - skip
            got["spec"] = spec
            self.stats.move_to_end(req_id)
        while len(self.stats) > KEEP_STATS:
            self.stats.popitem(last=False)

    def take(self, req_id: str) -> Optional[dict]:
        """{"push": {layer: push}, "missing": [layers not wrapped]} of a request, or None when it
        was not steered here (its stats are forgotten once taken)."""
        got = self.stats.pop(req_id, None)
        if got is None:
            return None
        spec, out = got["spec"], {}
        for layer, (norms, along, count) in got["layers"].items():
            if count == 0:
                continue
            size = along / count if spec["ablate"] else spec["norms"][layer]
            out[str(layer)] = abs(spec["multiplier"]) * size / (norms / count)
        return {"push": out, "missing": got["missing"]}


def decoder_layers(model: nn.Module):
    """The model's list of decoder layers (vLLM's decoder-only models: model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RuntimeError(f"steer_layers: {type(model).__name__} has no model.layers to steer")
    return layers


def install(runner):
    """Wrap the decoder layers additional_config names (project layer L = block L's output,
    vLLM's layers[L - 1]); layers of other pipeline stages are left alone."""
    wanted = steer_layers(runner.vllm_config)
    if not wanted:
        return
    layers = decoder_layers(runner.model)
    bad = [x for x in wanted if not 1 <= x <= len(layers)]
    if bad:
        raise RuntimeError(f"steer_layers: layer {bad[0]} is not in the model (1.."
                           f"{len(layers)}; layer 0, the embedding output, is not steerable here)")
    weight = next(runner.model.parameters())
    dim = runner.model_config.get_hidden_size()
    wrapped = {}
    for x in wanted:
        inner = layers[x - 1]
        if not any(True for _ in inner.parameters()):  # another pipeline stage's (PPMissingLayer)
            continue
        layers[x - 1] = wrapped[x] = SteeredLayer(inner, runner.max_num_tokens, dim,
                                                  weight.dtype, weight.device)
    runner.llama_ccs_steering = Steering(wrapped) if wrapped else None


def register():
    """The vLLM general plugin: patch the model runners (load_model: wrap the layers; each forward:
    fill the buffers, then collect stats) and give workers `llama_ccs_take(req_id)`. Loaded once
    per process (vLLM may call it again)."""
    from vllm.v1.worker import gpu_model_runner, worker_base

    runners = [gpu_model_runner.GPUModelRunner]
    try:
        from vllm.v1.worker import cpu_model_runner
        runners.append(cpu_model_runner.CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        if "load_model" in cls.__dict__ and not getattr(cls.load_model, "llama_ccs", False):
            cls.load_model = loading(cls.load_model)
    base = gpu_model_runner.GPUModelRunner
    if not getattr(base._model_forward, "llama_ccs", False):
        base._model_forward = forwarding(base._model_forward)
    worker_base.WorkerBase.llama_ccs_take = take_from_worker


def loading(load_model):
    def load(self, *args, **kwargs):
        out = load_model(self, *args, **kwargs)
        install(self)
        return out

    load.llama_ccs = True
    return load


def forwarding(model_forward):
    def forward(self, *args, **kwargs):
        steering = getattr(self, "llama_ccs_steering", None)
        if steering is None:
            return model_forward(self, *args, **kwargs)
        steering.fill(self)
        out = model_forward(self, *args, **kwargs)
        steering.collect()
        return out

    forward.llama_ccs = True
    return forward


def take_from_worker(self, req_ids: List[str]) -> Dict[str, Optional[dict]]:
    """Worker method (collective_rpc "llama_ccs_take"): each request's steering stats."""
    runner = getattr(self, "model_runner", None)
    steering = getattr(runner, "llama_ccs_steering", None)
    return {r: steering.take(r) if steering else None for r in req_ids}
