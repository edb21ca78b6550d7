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
(`--additional-config`), this project's layer numbers (L = the output of block L; 1..n_layers;
0 = the embedding output, steered where it enters the first decoder layer: `SteeredInput`).
It is part of vLLM's config hash, so a compiled graph cached for other layers is never reused.
Absent or empty: nothing is wrapped and the model is vLLM's own.

A request's spec (extra_args["llama_ccs"]), every key optional:
    {"vectors": {"10": [dim floats], ...}   # the vectors as applied at multiplier 1, per layer
     "multiplier": float, "ablate": bool, "positions": "all" | "generated",
     "probe": bool, "measure": bool,        # probe read-outs; residual norms (see below)
     "id": str}                             # the key its stats and scores are kept under

Each wrapped layer also writes each token's residual-stream norm |s| and |s . unit| into stats
buffers; after the forward they are summed per steered request, so that `take_stats(req_id)`
(a worker method, called through vLLM's collective_rpc; req_id: the spec's "id", else vLLM's
internal request id) returns per layer
push = |multiplier| x |vector| / mean |s| (ablation: |multiplier| x mean |s . u| / mean |s|) over
the request's steered positions, position 0 (the attention sink) left out when there are others:
steering/scale.py's push, measured in the forward passes that steered it.

Probe read-outs (additional_config {"llama_ccs": {"probe_layer": L}}): layer L is wrapped in
`ProbedLayer` too (outside its steering, so it reads the steered stream as llama.model does),
which writes each token's score s . weight + bias into a [max_num_tokens] buffer inside the
compiled graph; weight and bias are buffers set once after start-up through collective_rpc
"llama_ccs_set_probe" (so the compiled graph, keyed by the layer only, is reused across probes).
A request whose spec has "probe": true gets, after each forward, the scores of its rows at
positions >= its prompt length - 1 (the prompt's last token and each fed generated token) kept
per position; "llama_ccs_scores" (collective_rpc, many requests per call) hands them over and
forgets them. Only floats cross processes, never hidden states.

A spec with "measure": true (and a unique cache_salt) records, per wrapped steering layer, the
sum of |s| over its positions (position 0 left out) and their count: take_stats(...)["sums"];
the server runs the built-in prompts so at start-up to get steering/scale.py's neutral norms
from vLLM's own forward passes (server/vllm_engine.measure_norms).
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


def probe_layer(vllm_config) -> Optional[int]:
    """The project's layer additional_config["llama_ccs"]["probe_layer"] names (None: no probe)."""
    extra = getattr(vllm_config, "additional_config", None)
    ours = extra.get(KEY) if isinstance(extra, dict) else None
    layer = (ours or {}).get("probe_layer")
    return None if layer is None else int(layer)


def request_args(vectors: Optional[Dict[int, torch.Tensor]], multiplier: float = 0.0,
                 ablate: bool = False, positions: str = "all", tag: Optional[str] = None,
                 probe: bool = False, measure: bool = False) -> dict:
    """SamplingParams.extra_args for one request. vectors: {project layer: [dim] tensor, as
    applied at multiplier 1} (None: not steered); tag: the key its stats and scores are kept
    under (take_stats, take_scores); probe: read the probe at each of its tokens; measure: record
    the residual-stream norms at the wrapped layers."""
    spec = {}
    if vectors:
        spec = {"vectors": {str(k): v.float().tolist() for k, v in vectors.items()},
                "multiplier": float(multiplier), "ablate": bool(ablate), "positions": positions}
    if probe:
        spec["probe"] = True
    if measure:
        spec["measure"] = True
    if tag is not None:
        spec["id"] = tag
    return {KEY: spec}


def steered(extra_args: Optional[dict]) -> bool:
    """Whether these extra_args steer (a vector at a non-zero multiplier)."""
    spec = (extra_args or {}).get(KEY) or {}
    return bool(spec.get("vectors")) and float(spec.get("multiplier", 0.0)) != 0.0


def cache_salt(extra_args: dict) -> str:
    """vLLM's cache_salt for a steered request: keys and values computed under one steering are
    reused by requests with the same steering only (prefix caching). Read-outs (probe, measure)
    and the tag do not change keys and values, so they are not part of it."""
    spec = {k: v for k, v in extra_args[KEY].items() if k not in ("id", "probe", "measure")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def steering_config(layers, probe_at: Optional[int] = None) -> dict:
    """vLLM's additional_config that wraps these layers (LLM(additional_config=...)) and, when
    probe_at is given, the probe's layer."""
    ours = {"steer_layers": sorted({int(x) for x in layers})}
    if probe_at is not None:
        ours["probe_layer"] = int(probe_at)
    return {KEY: ours}


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


class SteeredInput(SteeredLayer):
    """Layer 0, the embedding output, steered: the residual stream entering vLLM's first decoder
    layer (its hidden_states, residual None on the first pipeline stage; whatever the model did
    to the embedding before, e.g. a scale, included) gets the buffers' steering, then the layer
    runs on it."""

    def forward(self, positions, hidden_states, residual, **kwargs):
        n = hidden_states.shape[0]
        stream = hidden_states if residual is None else hidden_states + residual
        unit = self.unit[:n]
        along = (stream * unit).sum(-1, keepdim=True)
        self.stats[:n].copy_(torch.cat([torch.linalg.vector_norm(stream, dim=-1, keepdim=True),
                                        along.abs()], -1))
        steered = hidden_states + self.add[:n] - self.coef[:n] * along * unit
        return self.inner(positions, steered, residual, **kwargs)


class ProbedLayer(nn.Module):
    """A vLLM decoder layer (or a SteeredLayer) whose output residual stream s = h + r is read
    by a linear probe: scores [N] float32 gets s . weight + bias per token (weight [dim], bias
    [1], float32 buffers set by set_probe); the layer's output is returned unchanged."""

    def __init__(self, inner: nn.Module, max_tokens: int, dim: int, device):
        super().__init__()
        self.inner = inner
        zeros = dict(dtype=torch.float32, device=device)
        self.register_buffer("weight", torch.zeros(dim, **zeros), persistent=False)
        self.register_buffer("bias", torch.zeros(1, **zeros), persistent=False)
        self.register_buffer("scores", torch.zeros(max_tokens, **zeros), persistent=False)

    def forward(self, positions, hidden_states, residual, **kwargs):
        h, r = self.inner(positions, hidden_states, residual, **kwargs)
        n = h.shape[0]
        self.scores[:n].copy_((h + r).float() @ self.weight + self.bias)
        return h, r

    def set_probe(self, weight, bias: float):
        self.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        self.bias.fill_(float(bias))


class ProbedInput(ProbedLayer):
    """The probe read at layer 0: the residual stream entering vLLM's first decoder layer."""

    def forward(self, positions, hidden_states, residual, **kwargs):
        n = hidden_states.shape[0]
        stream = hidden_states if residual is None else hidden_states + residual
        self.scores[:n].copy_(stream.float() @ self.weight + self.bias)
        return self.inner(positions, hidden_states, residual, **kwargs)


class Steering:
    """The wrapped layers of one model runner and the per-request state: parsed specs, stats,
    probe scores."""

    def __init__(self, layers: Dict[int, SteeredLayer], probe: Optional[ProbedLayer] = None):
        self.layers = layers  # project layer -> wrapper
        self.probe = probe
        self.specs: Dict[str, Optional[dict]] = {}
        self.stats: "OrderedDict[str, dict]" = OrderedDict()
        self.scores: "OrderedDict[str, dict]" = OrderedDict()  # id -> {position: score}
        self.rows: List[tuple] = []  # (req_id, lo, hi, start, spec) steered/measured last fill
        self.probed: List[tuple] = []  # (lo, hi, start, first position kept, spec)
        self.dirty = 0  # rows of the buffers that may hold non-zero steering

    def spec(self, req_id: str, params) -> Optional[dict]:
        """The parsed steering of a request (tensors on the model's device), cached per id."""
        if req_id in self.specs:
            return self.specs[req_id]
        extra = getattr(params, "extra_args", None) or {}
        raw = extra.get(KEY) if isinstance(extra, dict) else None
        spec = None
        raw = raw if isinstance(raw, dict) else {}
        steer = steered({KEY: raw})
        probe = bool(raw.get("probe")) and self.probe is not None
        measure = bool(raw.get("measure")) and bool(self.layers)
        if steer or probe or measure:
            vecs = {int(k): torch.tensor(v, dtype=torch.float32)
                    for k, v in (raw.get("vectors") or {}).items()} if steer else {}
            device = next(iter(self.layers.values())).add if self.layers else None
            spec = {"id": str(raw.get("id") or req_id), "steer": steer, "probe": probe,
                    "measure": measure, "multiplier": float(raw.get("multiplier", 0.0)),
                    "ablate": bool(raw.get("ablate")),
                    "generated": raw.get("positions", "all") == "generated",
                    "missing": sorted(set(vecs) - set(self.layers)),
                    "vectors": {k: v.to(device) for k, v in vecs.items() if k in self.layers},
                    "norms": {k: float(v.norm()) for k, v in vecs.items()}}
        self.specs[req_id] = spec
        return spec

    def measured_layers(self, spec: dict) -> List[int]:
        """The wrapped layers whose |s| a request's rows are summed at."""
        return sorted(self.layers) if spec["measure"] else sorted(spec["vectors"])

    def fill(self, runner):
        """Write this step's per-token steering into the buffers, from the runner's batch; note
        which rows are probed and measured."""
        batch = runner.input_batch
        n_reqs = batch.num_reqs
        ids = batch.req_ids[:n_reqs]
        chosen = []
        for i, req_id in enumerate(ids):
            state = runner.requests.get(req_id)
            spec = self.spec(req_id, getattr(state, "sampling_params", None))
            if spec is not None:
                chosen.append((i, req_id, spec))
        if len(self.specs) > 4 * max(n_reqs, 64):  # forget requests no longer scheduled
            live = set(ids)
            self.specs = {k: v for k, v in self.specs.items() if k in live}
        if self.dirty:
            for layer in self.layers.values():
                layer.add[:self.dirty].zero_()
                layer.coef[:self.dirty].zero_()
            self.dirty = 0
        self.rows, self.probed = [], []
        if not chosen:
            return
        qsl = runner.query_start_loc.np
        put = {}  # (layer, ablate) -> the rows, their vectors and multipliers
        for i, req_id, spec in chosen:
            lo, hi = int(qsl[i]), int(qsl[i + 1])
            computed = int(batch.num_computed_tokens_cpu[i])
            if spec["probe"] and hi > lo:  # positions computed .. computed + hi - lo - 1
                self.probed.append((lo, hi, computed, int(batch.num_prompt_tokens[i]) - 1, spec))
            if spec["measure"] and not spec["steer"] and hi > lo:
                self.rows.append((req_id, lo, hi, computed, spec))
            if not spec["steer"]:
                continue
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
            for layer in self.measured_layers(spec):
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
        if self.probed:
            self.collect_scores()

    def collect_scores(self):
        """Keep the last forward's probe scores of each probed request's rows at positions >=
        its prompt length - 1, by position (a recomputed position overwrites its score)."""
        top = max(hi for _, hi, _, _, _ in self.probed)
        scores = self.probe.scores[:top].tolist()
        for lo, hi, start, first, spec in self.probed:
            kept = self.scores.setdefault(spec["id"], {})
            for row in range(max(lo, lo + first - start), hi):
                kept[start + row - lo] = scores[row]
            self.scores.move_to_end(spec["id"])
        while len(self.scores) > KEEP_STATS:
            self.scores.popitem(last=False)

    def take_scores(self, req_ids: List[str]) -> Dict[str, List[list]]:
        """{id: [[position, score], ...]} of the scores kept since the last take (forgotten once
        taken; [] for a request with none yet)."""
        out = {}
        for req_id in req_ids:
            kept = self.scores.pop(req_id, None) or {}
            out[req_id] = [[pos, kept[pos]] for pos in sorted(kept)]
        return out

    def take(self, req_id: str) -> Optional[dict]:
        """{"push": {layer: push}, "missing": [layers not wrapped], "sums": {layer: [sum of |s|,
        positions]}} of a request, or None when it was neither steered nor measured here (its
        stats are forgotten once taken)."""
        got = self.stats.pop(req_id, None)
        if got is None:
            return None
        spec, out = got["spec"], {}
        sums = {str(layer): [norms, count] for layer, (norms, _, count) in got["layers"].items()}
        for layer, (norms, along, count) in got["layers"].items():
            if count == 0 or not spec["steer"] or layer not in spec["vectors"]:
                continue
            size = along / count if spec["ablate"] else spec["norms"][layer]
            out[str(layer)] = abs(spec["multiplier"]) * size / (norms / count)
        return {"push": out, "missing": got["missing"], "sums": sums}


def decoder_layers(model: nn.Module):
    """The model's list of decoder layers (vLLM's decoder-only models: model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RuntimeError(f"steer_layers: {type(model).__name__} has no model.layers to steer")
    return layers


def install(runner):
    """Wrap the decoder layers additional_config names (project layer L = block L's output,
    vLLM's layers[L - 1]; layer 0, the embedding output, = the input of layers[0]); layers of
    other pipeline stages are left alone. Wrapping order: output steering, its probe, then the
    input's probe and steering outermost (each reads what the one outside it wrote)."""
    wanted = steer_layers(runner.vllm_config)
    probe_at = probe_layer(runner.vllm_config)
    if not wanted and probe_at is None:
        return
    layers = decoder_layers(runner.model)
    bad = [x for x in wanted + ([] if probe_at is None else [probe_at])
           if not 0 <= x <= len(layers)]
    if bad:
        raise RuntimeError(f"llama_ccs: layer {bad[0]} is not in the model (0..{len(layers)})")
    weight = next(runner.model.parameters())
    dim = runner.model_config.get_hidden_size()
    size = (runner.max_num_tokens, dim)

    def wrap(layer: int, kind):
        at = max(layer, 1) - 1
        if not any(True for _ in layers[at].parameters()):  # another stage's (PPMissingLayer)
            return None
        if kind is ProbedLayer or kind is ProbedInput:
            layers[at] = kind(layers[at], *size, weight.device)
        else:
            layers[at] = kind(layers[at], *size, weight.dtype, weight.device)
        return layers[at]

    wrapped = {x: wrap(x, SteeredLayer) for x in wanted if x > 0}
    probe = None
    if probe_at is not None and probe_at > 0:
        probe = wrap(probe_at, ProbedLayer)
    if probe_at == 0:
        probe = wrap(0, ProbedInput)
    if 0 in wanted:
        wrapped[0] = wrap(0, SteeredInput)
    wrapped = {x: w for x, w in wrapped.items() if w is not None}
    runner.llama_ccs_steering = Steering(wrapped, probe) if wrapped or probe else None


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
    worker_base.WorkerBase.llama_ccs_scores = scores_from_worker
    worker_base.WorkerBase.llama_ccs_set_probe = set_probe_on_worker


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
        clear_nonfinite(self, steering, out)
        return out

    forward.llama_ccs = True
    return forward


def clear_nonfinite(runner, steering: Steering, out):
    """After a forward: a steered request whose last-layer states are not finite (its push
    overflowed the model's numbers) gets its KV-cache blocks zeroed, so that nothing of it
    reaches the requests that reuse them (vLLM's CPU attention reads whole blocks: a NaN left in
    a slot past another request's length turns its answer to NaN). The request itself is ended
    by the engine (server/vllm_engine.py: its sampled token's log-probability is not finite).
    out: the model's output, hidden states [tokens, dim], or on a pipeline stage before the last
    vLLM's IntermediateTensors (its "hidden_states" and "residual" [tokens, dim] checked: each
    stage clears its own layers' blocks); runner.kv_caches: per layer [blocks, ...], addressed
    by the scheduler's block ids (one KV-cache group, as the LLaMA family has; models with
    several groups are not cleared here)."""
    hidden = out[0] if isinstance(out, tuple) else out
    parts = list(getattr(hidden, "tensors", {}).values()) or [hidden]
    if not steering.rows or not all(isinstance(part, torch.Tensor) for part in parts):
        return
    bad = torch.stack([~torch.isfinite(part).all(-1) for part in parts]).any(0).cpu()
    for req_id, lo, hi, _, _ in steering.rows:
        state = runner.requests.get(req_id)
        if state is None or len(state.block_ids) != 1 or not bool(bad[lo:hi].any()):
            continue
        index = torch.tensor(state.block_ids[0], dtype=torch.long)
        for cache in runner.kv_caches:
            cache[index.to(cache.device)] = 0


def take_from_worker(self, req_ids: List[str]) -> Dict[str, Optional[dict]]:
    """Worker method (collective_rpc "llama_ccs_take"): each request's steering stats."""
    runner = getattr(self, "model_runner", None)
    steering = getattr(runner, "llama_ccs_steering", None)
    return {r: steering.take(r) if steering else None for r in req_ids}


def scores_from_worker(self, req_ids: List[str]) -> Dict[str, List[list]]:
    """Worker method (collective_rpc "llama_ccs_scores"): each request's probe scores kept since
    the last call, [[position, score], ...] (Steering.take_scores; {} where no probe is here)."""
    runner = getattr(self, "model_runner", None)
    steering = getattr(runner, "llama_ccs_steering", None)
    if steering is None or steering.probe is None:
        return {}
    return steering.take_scores(req_ids)


def set_probe_on_worker(self, weight: List[float], bias: float) -> bool:
    """Worker method (collective_rpc "llama_ccs_set_probe"): the probe's weight [dim] and bias;
    False where this worker holds no probe layer (another pipeline stage's)."""
    runner = getattr(self, "model_runner", None)
    steering = getattr(runner, "llama_ccs_steering", None)
    if steering is None or steering.probe is None:
        return False
    steering.probe.set_probe(weight, bias)
    return True
