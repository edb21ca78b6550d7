"""One steering request's settings, the same object in the commands, the notebook API and the
server: typed, frozen, checked once, and JSON-serialisable (the server broadcasts it to the
torchrun ranks with each step).

    s = SteerSettings("push", (10,), multiplier=4.0, scale="residual")
    s = s.check(n_layers, vectors, residual_norms)   # SteerError(field, message) if wrong
    steer = s.steer(vectors, residual_norms)          # the llama.model.Steer it means
    SteerSettings.from_json(s.to_json()) == s

The conventions (steering/scale.py, llama.model.Steer): layer 0 is the embedding output, L the
output of block L; scale "raw" adds multiplier x the vector as stored, "residual" multiplier x the
unit vector x the layer's mean residual-stream norm; ablate removes multiplier x the component
along the vector instead; positions "all" steers every position, "generated" the generated ones.
"""
import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch

from llama.errors import LlamaError
from llama.model import STEER_POSITIONS as POSITIONS
from llama.model import Steer

from .scale import SCALES, applied_norms as applied

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class SteerError(LlamaError):
    """A steering setting that is wrong: `field` names it (vector, layers, multiplier, scale,
    ablate, positions); the message says what is wrong, without the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SteerSettings:
    vector: str  # a loaded vector's name (the server) or its source (a command's --steer)
    layers: Tuple[int, ...]
    multiplier: float = 1.0
    scale: str = "raw"  # SCALES
    ablate: bool = False
    positions: str = "all"  # POSITIONS

    def check(self, n_layers: int, vectors: Dict[int, torch.Tensor],
              residual_norms: Optional[Dict[int, float]] = None) -> "SteerSettings":
        """The settings, layers sorted and deduplicated, once each is right for a model of
        n_layers blocks and the vector's {layer: [dim]} (residual_norms {layer: norm}: needed for
        scale "residual"). Refused (SteerError): no layer, a layer outside 0..n_layers or that the
        vector lacks, an unknown scale or positions, a non-finite multiplier, or a push
        (multiplier x the largest entry of the vector as added) past float32's range, which would
        turn the residual stream into infinities."""
        have = sorted(vectors)
        if not self.layers:
            raise SteerError("layers", "no layer to steer")
        for x in self.layers:
            if not 0 <= x <= n_layers:
                raise SteerError("layers", f"layer {x} is not in the model (layers 0..{n_layers})")
            if x not in vectors:
                raise SteerError("layers", f"vector {self.vector!r} has no layer {x} (it has "
                                 f"{', '.join(map(str, have))})")
        for field, allowed in (("scale", SCALES), ("positions", POSITIONS)):
            value = getattr(self, field)
            if value not in allowed:
                raise SteerError(field, f"{value!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.ablate, bool):
            raise SteerError("ablate", f"{self.ablate!r} is not true or false")
        m = self.multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise SteerError("multiplier", f"{m!r} is not a finite number")
        layers = tuple(sorted(set(self.layers)))
        if self.scale == "residual" and (residual_norms is None
                                         or any(x not in residual_norms for x in layers)):
            raise LlamaError("scale residual needs the residual norms of the steered layers")
        added = applied({x: vectors[x] for x in layers}, residual_norms or {}, self.scale)
        peak = max(float(v.float().abs().max()) for v in added.values())
        if abs(m) > FLOAT32_MAX or abs(m) * peak > FLOAT32_MAX:
            raise SteerError("multiplier", f"{m!r} x the vector (largest entry {peak:.4g}) is "
                             "past float32's range")
        return SteerSettings(self.vector, layers, float(m), self.scale, self.ablate,
                             self.positions)

    def steer(self, vectors: Dict[int, torch.Tensor],
              residual_norms: Optional[Dict[int, float]] = None) -> Steer:
        """The llama.model.Steer these settings mean, on the vector's {layer: [dim]}."""
        added = applied({x: vectors[x] for x in self.layers}, residual_norms or {}, self.scale)
        return Steer(added, self.multiplier, self.ablate, self.positions)

    def to_json(self) -> dict:
        out = asdict(self)
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "SteerSettings":
        return cls(**{**data, "layers": tuple(data["layers"])})

