"""The steering sweep: each layer x multiplier scored on items, with the residual scale, the
letter diagnostics and the capability cost (scripts/steer.py is its command).

Score of an item (CAA, Rimsky et al. 2024): p(positive) / (p(positive) + p(negative)) of the two
candidate next tokens (steering.items). A/B items also give p_a = p(A) / (p(A) + p(B)): a vector
that moves p_a and leaves p(positive) alone moves the answer letter, not the behaviour.

Each layer x multiplier is a steering.settings.SteerSettings, checked before anything runs (a
multiplier whose push is past float32's range is refused naming --multipliers), the layer's M
multipliers applied as one llama.model.Steer with a [M] multiplier. Scale "residual" takes its
unit from steering.scale.unit_norms (as generate.py and the server do); the residual norm
measured on the items (at the steered positions) is what the push is reported against.

Cost per item (n blocks, M multipliers, layers L1 < L2 < ...): one unsteered forward to the
deepest steered layer (the residual norms), the prompt's unsteered forward once (to L1 and on to
the baseline logits); the M multipliers of a layer run as one batch of M rows.
positions all: each steered layer costs M rows x (n - L1) blocks over the prompt (blocks below L1
shared); positions generated: the prompt's keys and values are shared, each layer costs M rows x
n blocks over one token.
"""
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from llama.errors import LlamaError
from llama.model import STEER_POSITIONS as POSITIONS

from . import scale as scale_mod
from .items import Item

FLAGS = {"layers": "--layers", "multiplier": "--multipliers", "scale": "--scale",
         "ablate": "--ablate", "positions": "--positions"}


@dataclass
class Settings:
    """What a sweep steers and how."""
    layers: List[int]
    multipliers: List[float]
    positions: str = "all"        # all (CAA) or generated (from the answer opener on)
    ablate: bool = False
    scale: str = "raw"            # raw (multiplier x the vector as stored) or residual
    chat: str = "auto"
    capability: Optional[List[str]] = field(default=None, repr=False)  # neutral texts


class Sweep:
    """The model, the vectors and the grid; scores items one at a time."""

    def __init__(self, gen, vectors: Dict[int, torch.Tensor], cfg: Settings, source: str = "",
                 units: Optional[Dict[int, tuple]] = None):
        """vectors {layer: [dim]} as stored, from `source`; units: scale.unit_norms() of the
        layers (needed for scale "residual"). Refused (LlamaError naming the flag): a setting
        SteerSettings.check refuses."""
        from prompts.rows import resolve_chat

        if cfg.positions not in POSITIONS:
            raise LlamaError(f"--positions {cfg.positions!r}: choose all or generated")
        scale_mod.check_scale(cfg.scale)
        self.gen, self.model, self.cfg = gen, gen.model, cfg
        self.chat = resolve_chat(cfg.chat, gen.tokenizer)
        self.stored, self.source, self.units = vectors, source, units or {}
        self.norms = {l: u[0] for l, u in self.units.items()}
        self.layers = sorted(cfg.layers)
        self.settings = {l: self.checked(l) for l in self.layers}
        self.vectors = scale_mod.applied_norms({l: vectors[l] for l in self.layers}, self.norms,
                                               cfg.scale)  # as applied at multiplier 1
        self.mults = torch.tensor(cfg.multipliers, dtype=torch.float32)
        self.residual: Dict[int, scale_mod.Residual] = {}

    def checked(self, layer: int):
        """The layer's SteerSettings at multiplier 1, once every multiplier passes the check."""
        from dataclasses import replace

        from .settings import SteerError, SteerSettings

        cfg = self.cfg
        one = SteerSettings(str(self.source), (layer,), 1.0, cfg.scale, cfg.ablate, cfg.positions)
        n_layers = self.model.params.n_layers
        for m in cfg.multipliers:
            try:
                replace(one, multiplier=float(m)).check(n_layers, self.stored, self.norms)
            except SteerError as e:
                flag = FLAGS.get(e.field, "--vectors")
                value = f" {m:g}" if e.field == "multiplier" else ""
                raise LlamaError(f"{flag}{value} (layer {layer}): {e}") from None
        return one.check(n_layers, self.stored, self.norms)

    def token(self, text: str) -> int:
        ids = self.gen.tokenizer.encode(text)
        if len(ids) != 1:
            raise LlamaError(f"the tokenizer splits {text!r} into {len(ids)} tokens: a candidate "
                             "answer must be one token")
        return ids[0]

    def prompt(self, item: Item) -> tuple:
        """(token ids, [positive token, negative token], first steered position)."""
        from prompts.rows import render

        tok = self.gen.tokenizer
        if item.letter is None:
            ids = tok.encode(item.text, bos=True)
            return ids, [self.token(item.positive), self.token(item.negative)], len(ids) - 1
        text = render(self.chat, None, item.text, answer="(", cue="\n\nAnswer: ", tok=tok)
        ids = tok.encode(text, bos=True)
        a, b = self.token("A"), self.token("B")
        if tok.encode(text + "A", bos=True) != ids + [a]:
            raise LlamaError("the tokenizer merges '(' with the letter: no single answer token")
        pair = [a, b] if item.letter == "A" else [b, a]
        return ids, pair, len(ids) - 1

    def measure(self, prompts: List[tuple]) -> List[str]:
        """Measure the residual norms on the prompts (at the steered positions: what the push is
        reported against); returns the printed description lines."""
        starts = [0 if self.cfg.positions == "all" else p[2] for p in prompts]
        stored = {l: self.stored[l] for l in self.layers}
        self.residual = scale_mod.measure(self.model, [p[0] for p in prompts], starts, stored)
        return scale_mod.describe(self.vectors, stored, self.residual, self.cfg.scale,
                                  self.cfg.ablate, self.cfg.multipliers, self.units)

    def push(self, layer: int, multiplier: float) -> float:
        return scale_mod.push(multiplier, self.vectors[layer], self.residual[layer],
                              self.cfg.ablate)

    def steer(self, layer):
        """The layer's checked settings as one llama.model.Steer, multiplier [M]: row i steered
        by multipliers[i]."""
        from dataclasses import replace

        one = self.settings[layer].steer(self.stored, self.norms)
        return replace(one, multiplier=self.mults)

    @staticmethod
    def two_way(logits, pair) -> np.ndarray:
        """logits [..., vocab] -> [..., 2] p of the pair's tokens, renormalised over the two (in
        float64); NaN where the logits hold a NaN or an infinity anywhere in the vocabulary (a
        multiplier that overflows the residual stream): run() warns, the means leave it out."""
        two = torch.softmax(logits[..., pair].double(), -1)
        finite = torch.isfinite(logits).all(-1, keepdim=True)
        return torch.where(finite, two, torch.full_like(two, float("nan"))).cpu().numpy()

    @torch.inference_mode()
    def score(self, ids: list, pair: list) -> tuple:
        """(baseline [2], {layer: [M, 2]}): p(positive), p(negative) renormalised, per setting."""
        model, M, n = self.model, len(self.mults), self.model.params.n_layers
        tokens = torch.tensor([ids])
        out = {}
        if self.cfg.positions == "all":
            first = self.layers[0]
            pre = model(tokens, layers=[first], logits=True)
            base = self.two_way(pre["logits"][0, -1], pair)
            entry = (first, pre[first].expand(M, -1, -1))
            for layer in self.layers:
                res = model(tokens.expand(M, -1), layers=[], logits=True, entry=entry,
                            steer=self.steer(layer))
                out[layer] = self.two_way(res["logits"][:, -1], pair)
        else:  # the prompt before the last token is never steered: its keys and values are shared
            P = len(ids) - 1
            pre = model(tokens[:, :P], layers=[n], return_kv=True)
            start = torch.tensor([P])
            res = model(tokens[:, P:], layers=[], logits=True, start=start, past=pre["kv"])
            base = self.two_way(res["logits"][0, -1], pair)
            past = [(k.expand(M, -1, -1, -1), v.expand(M, -1, -1, -1)) for k, v in pre["kv"]]
            for layer in self.layers:
                res = model(tokens[:, P:].expand(M, -1), layers=[], logits=True,
                            start=start.expand(M), past=past, steer=self.steer(layer),
                            prompt_len=start.expand(M))
                out[layer] = self.two_way(res["logits"][:, -1], pair)
        return base, out

    def sample(self, ids: list, cfg) -> dict:
        """{layer: [M] greedy completions} and the baseline's, each starting after the prompt."""
        M = len(self.mults)
        out = {}
        for layer in self.layers:
            rows = self.gen.generate([ids] * M, cfg, self.steer(layer),
                                     steer_from=[len(ids) - 1] * M)
            out[layer] = [self.gen.tokenizer.decode(r[0]) for r in rows]
        out["none"] = [self.gen.tokenizer.decode(self.gen.generate([ids], cfg)[0][0])]
        return out

    def capability(self) -> Optional[tuple]:
        """(base NLL per token, {layer: [M] nll_delta}) on the capability texts, or None."""
        from .capability import nll_delta

        if not self.cfg.capability:
            return None
        tok = self.gen.tokenizer
        texts = [tok.encode(t, bos=True) for t in self.cfg.capability]
        return nll_delta(self.model, texts, {l: self.vectors[l] for l in self.layers},
                         self.cfg.multipliers, self.cfg.ablate)


def warn_nonfinite(idx: int, text: str, base: np.ndarray, per_layer: Dict[int, np.ndarray],
                   multipliers) -> Optional[str]:
    """One warning line on stderr for an item whose logits were NaN or infinite somewhere: base
    [2] and per_layer {layer: [M, 2]} as Sweep.score gives them. The line names the item (index
    and the start of its text) and where: "unsteered" and/or "layer L x M" (the first four,
    then "..."). Returns the line, or None when every score is finite."""
    bad = ["unsteered"] if not np.isfinite(base).all() else []
    bad += [f"layer {layer} x {m:g}" for layer, rows in per_layer.items()
            for m, two in zip(multipliers, rows) if not np.isfinite(two).all()]
    if not bad:
        return None
    start = text.replace("\n", " ")[:40]
    line = (f"warning: item {idx} ({start!r}): non-finite logits at {', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}; p_positive is NaN there, left out of the means")
    print(line, file=sys.stderr, flush=True)
    return line


def run(sweep: Sweep, items: List[Item], samples: int = 0, sampling=None, log=print):
    """Measure the residual norms, score every item at every setting, sample the first
    `samples` items, measure the capability cost; returns a report.Result."""
    from tqdm import tqdm

    from .report import Result

    prompts = [sweep.prompt(it) for it in items]
    for line in sweep.measure(prompts):
        log(line)
    base, table, sampled = [], {l: [] for l in sweep.layers}, []
    bar = tqdm(total=len(items) * len(sweep.layers), desc="steering sweep", unit="layer x item")
    for i, ((ids, pair, _), item) in enumerate(zip(prompts, items)):
        b, per_layer = sweep.score(ids, pair)
        warn_nonfinite(i, item.text, b, per_layer, sweep.cfg.multipliers)
        base.append(b)
        for l in sweep.layers:
            table[l].append(per_layer[l])
        if i < samples:
            sampled.append((i, item.letter, sweep.sample(ids, sampling)))
        bar.update(len(sweep.layers))
    bar.close()
    cost = sweep.capability()
    mults = sweep.cfg.multipliers
    return Result(sweep.layers, mults, base, table, [it.letter for it in items],
                  {l: [sweep.push(l, m) for m in mults] for l in sweep.layers},
                  {l: float(sweep.vectors[l].norm()) for l in sweep.layers},
                  {l: sweep.residual[l].norm for l in sweep.layers}, cost, sampled)
