"""The model side of the server: every forward it runs, on one preallocated KV cache whose rows
the scheduler hands out, the same on every model-parallel rank.

    engine = Engine(model, vectors, probe, max_batch=8, length=2048)
    out = engine.run({"op": "prefill", "row": 0, "ids": [...], "steer": None, "score": None})
    out = engine.run({"op": "decode", "tokens": [...], "pos": [...], "plen": [...],
                      "steer": [None, {...}]})

A step is a JSON-able dict (ops: prefill, decode, free, idle, stop). Rank 0's scheduler builds each
one, `send_step` broadcasts it to the other ranks of a torchrun world (the other ranks loop in
`follow`), and every rank runs it: the model's all-reduces pair up, and the rows hold the same
keys and values everywhere. Only rank 0 reads the outputs.

Rows in use are always 0..n-1 (a finished row's place is filled by moving the last row into it:
`free`), so a decode step runs on the contiguous slice of the cache, each row at its own
position (llama.model.KVCache semantics: row b attends to its positions 0..pos[b]). A freed row
is zeroed up to the positions it was written at (`filled`): a decode step reads every row's
positions up to the longest row's, masked, and a NaN left there by an overflowing request would
turn a masked product into NaN in the next request on that row (KVCache: masked positions must
hold no NaN).
"""
import json
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import torch
import torch.distributed as tdist

from llama.errors import LlamaError
from llama.model import Steer, Transformer
from steering.settings import SteerSettings

SCORE_ROWS = 256  # prompt positions whose logits are computed together (score_prompt)


class RowsView:
    """Rows lo..hi-1 of a KVCache, for Transformer.forward(cache=...): the same blocks (views,
    so writes land in the shared cache), length and slot arithmetic."""

    def __init__(self, cache, lo: int, hi: int):
        self.blocks = [(k[lo:hi], v[lo:hi]) for k, v in cache.blocks]
        self.length = cache.length
        self.rows = torch.arange(hi - lo, device=cache.rows.device)[:, None]

    def slots(self, pos: torch.Tensor) -> torch.Tensor:
        return (self.rows * self.length + pos).reshape(-1)


@dataclass
class Probe:
    """A saved linear probe read at one layer (llama.vectors.read_probe): score(h) = h . weight +
    bias (float32, raw activation space: w_raw and b_raw of probes/report.py for a single-prompt
    probe, the raw-space direction with no offset for a contrast-pair probe); the probe's
    positive class above `threshold` (its margin: score - threshold)."""
    layer: int
    weight: torch.Tensor  # [dim] float32
    bias: float
    source: str
    kind: str  # "w_raw" or "direction"
    threshold: float = 0.0
    text: str = ""  # what the probe was trained on
    positive: str = ""  # what a score above the threshold stands for (its positive class)

    def score(self, h: torch.Tensor) -> List[float]:
        """h [n, dim] -> n scores."""
        return (h.float() @ self.weight.to(h.device) + self.bias).tolist()


class BatchSteer:
    """Per-row steering for one batch: rows whose settings differ only in the multiplier share
    one llama.model.Steer whose multiplier is a [B] tensor, 0 on the other rows (a 0 multiplier
    leaves a row's residual stream bit-identical). Same interface as Steer. Each Steer measures
    the residual stream it meets (Steer.seen); `sums` reads each row's from its own Steer."""

    def __init__(self, steers: List[Steer], rows: List[List[int]]):
        self.steers = steers
        self.rows = rows  # per steer: the rows it steers

    def apply(self, layer, h, pos, prompt_len):
        for s in self.steers:
            h = s.apply(layer, h, pos, prompt_len)
        return h

    def sums(self, n: int) -> List[Optional[dict]]:
        """Per row of n: None (not steered) or {layer: [sum |h|, sum |h . u|, positions]} of this
        forward's steered positions."""
        out: List[Optional[dict]] = [None] * n
        for steer, rows in zip(self.steers, self.rows):
            table = {layer: t.tolist() for layer, t in steer.seen.items()}
            for row in rows:
                out[row] = {layer: t[row] for layer, t in table.items()}
        return out


class Engine:
    def __init__(self, model: Transformer, vectors: Dict[str, Dict[int, torch.Tensor]],
                 residual_norms: Dict[str, Dict[int, float]], probe: Optional[Probe],
                 max_batch: int, length: int):
        from llama.model import KVCache

        self.model = model
        self.vectors = vectors
        self.residual_norms = residual_norms
        self.probe = probe
        self.cache = KVCache(model, max_batch, length)
        self.filled = [0] * max_batch  # per row: positions written since it was last zeroed
        self.device = model.norm.weight.device
        self.last = model.params.n_layers
        self.layers = sorted({self.last} | ({probe.layer} if probe else set()))

    def steer_for(self, specs: List[Optional[dict]]) -> Optional[BatchSteer]:
        """specs: per row, None or steering.settings.SteerSettings.to_json() (checked)."""
        groups = {}
        for row, spec in enumerate(specs):
            if spec is None or spec["multiplier"] == 0:
                continue
            s = SteerSettings.from_json(spec)
            groups.setdefault(replace(s, multiplier=1.0), []).append((row, s.multiplier))
        steers, owned = [], []
        for shared, rows in groups.items():
            values = [0.0] * len(specs)
            for row, multiplier in rows:
                values[row] = multiplier
            mult = torch.tensor(values, dtype=torch.float32)  # past float32: inf, never raises
            one = shared.steer(self.vectors[shared.vector],
                               self.residual_norms.get(shared.vector))
            steers.append(replace(one, multiplier=mult.to(self.device), seen={}))
            owned.append([row for row, _ in rows])
        return BatchSteer(steers, owned) if steers else None

    def push(self, spec: dict, sums: Dict[int, list]) -> Dict[str, float]:
        """steering_push of a request: {str(layer): push} from its steering (SteerSettings JSON)
        and its sums over every forward that steered it ({layer: [sum |h|, sum |h . u|,
        positions]}, BatchSteer.sums added up): steering.scale.push with the residual norm as
        measured there, |multiplier| x |vector as applied| / mean |h| (ablation: |multiplier| x
        mean |h . u| / mean |h|). A layer with no steered position is left out."""
        from steering.scale import Residual, push

        s = SteerSettings.from_json(spec)
        added = s.steer(self.vectors[s.vector], self.residual_norms.get(s.vector)).vectors
        return {str(layer): push(s.multiplier, added[layer],
                                 Residual(norm / count, along / count, int(count)), s.ablate)
                for layer, (norm, along, count) in sorted(sums.items()) if count > 0}

    @torch.inference_mode()
    def run(self, step: dict) -> Optional[dict]:
        """Run one step; returns {"logits": [n, vocab] float32 (CPU), "states": [n, dim] at the
        probe layer or None, "steered": per row None or its BatchSteer.sums} for prefill and
        decode (the prefill's: its last prompt position).
        A prefill with "score": k (an int) also returns "prompt": the prompt's log-probabilities
        with the top k per position (score_prompt), from the same forward pass."""
        op = step["op"]
        if op == "prefill":
            row, ids = step["row"], step["ids"]
            tokens = torch.tensor([ids], device=self.device)
            plen = torch.tensor([len(ids)], device=self.device)
            self._clear(row)  # nothing there after a free; zeroed again all the same
            self.filled[row] = len(ids)
            steer = self.steer_for([step["steer"]])
            out = self.model(tokens, layers=self.layers, cache=RowsView(self.cache, row, row + 1),
                             steer=steer, prompt_len=plen)
            read = self._read(out, torch.tensor([len(ids) - 1], device=self.device), steer)
            if step.get("score") is not None:  # the prompt's own log-probabilities, same pass
                read["prompt"] = self.score_prompt(out[self.last][0], ids, step["score"])
            return read
        if op == "decode":
            n = len(step["tokens"])
            tokens = torch.tensor(step["tokens"], device=self.device)[:, None]
            pos = torch.tensor(step["pos"], device=self.device)
            plen = torch.tensor(step["plen"], device=self.device)
            for row, at in enumerate(step["pos"]):
                self.filled[row] = max(self.filled[row], at + 1)
            steer = self.steer_for(step["steer"])
            out = self.model(tokens, layers=self.layers, start=pos,
                             cache=RowsView(self.cache, 0, n), steer=steer, prompt_len=plen)
            return self._read(out, torch.zeros(n, dtype=torch.long, device=self.device), steer)
        if op == "free":  # row zeroed, then the last row in use moved into it
            row, last = step["row"], step["last"]
            self._clear(row)
            if last != row:
                upto = self.filled[last]
                for k, v in self.cache.blocks:
                    k[row, :upto] = k[last, :upto]
                    v[row, :upto] = v[last, :upto]
                self.filled[row] = upto
                self._clear(last)
        return None

    def score_prompt(self, h: torch.Tensor, ids: List[int], top: int) -> List[list]:
        """h [S, dim]: the prefill's last-block states of the prompt `ids` (S tokens) -> for
        positions 1..S-1, [log p(ids[i] | ids[:i]), [[token, logprob], ...] the `top` most
        likely tokens (at least 1), most likely first] (natural log, log_softmax of the logits).
        The logits are taken SCORE_ROWS positions at a time: [S, vocab] float32 at once is large
        for a long prompt."""
        targets = torch.tensor(ids[1:], device=self.device)
        out = []
        for lo in range(0, len(ids) - 1, SCORE_ROWS):
            hi = min(lo + SCORE_ROWS, len(ids) - 1)
            logprobs = torch.log_softmax(self.model.logits_of(h[lo:hi]), -1)  # [n, vocab]
            chosen = logprobs.gather(1, targets[lo:hi, None])[:, 0].tolist()
            values, tokens = logprobs.topk(max(top, 1), -1)
            for value, toks, vals in zip(chosen, tokens.tolist(), values.tolist()):
                out.append([value, [[t, v] for t, v in zip(toks, vals)]])
        return out

    def _clear(self, row: int):
        """Zero a row's keys and values where they were written."""
        upto = self.filled[row]
        if upto:
            for k, v in self.cache.blocks:
                k[row, :upto] = 0
                v[row, :upto] = 0
        self.filled[row] = 0

    def _read(self, out: dict, at: torch.Tensor, steer: Optional[BatchSteer]) -> dict:
        rows = torch.arange(len(at), device=self.device)
        h = out[self.last][rows, at]
        logits = self.model.logits_of(h).cpu()
        states = out[self.probe.layer][rows, at] if self.probe else None
        sums = steer.sums(len(at)) if steer is not None else [None] * len(at)
        return {"logits": logits, "states": states, "steered": sums}


class StepChannel:
    """Steps from rank 0 to the other ranks of the world: a JSON message in a uint8 tensor over
    a gloo group (CPU tensors, whatever backend the model uses). No-op in a one-process world."""

    def __init__(self):
        self.world = tdist.get_world_size() if tdist.is_initialized() else 1
        self.group = tdist.new_group(backend="gloo") if self.world > 1 else None

    def send(self, step: dict):
        if self.world == 1:
            return
        data = torch.frombuffer(bytearray(json.dumps(step).encode()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.long)
        tdist.broadcast(size, 0, group=self.group)
        tdist.broadcast(data, 0, group=self.group)

    def receive(self) -> dict:
        size = torch.zeros(1, dtype=torch.long)
        tdist.broadcast(size, 0, group=self.group)
        data = torch.empty(int(size), dtype=torch.uint8)
        tdist.broadcast(data, 0, group=self.group)
        return json.loads(bytes(data.tolist()).decode())


def follow(engine: Engine, channel: StepChannel):
    """The loop of every rank but 0: run each step rank 0 sends until it sends "stop" (a stop
    carrying rank 0's error raises it here too, so every rank exits non-zero)."""
    while True:
        try:
            step = channel.receive()
            if step["op"] == "stop":
                if step.get("error"):
                    raise LlamaError(f"rank 0: {step['error']}")
                return
            engine.run(step)
        except LlamaError:
            raise
        except Exception as e:  # rank 0 failed inside a step, or is gone: this rank ends too
            raise LlamaError(f"rank 0 stopped serving ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
