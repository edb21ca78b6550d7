"""Every probe method, each registered once: its name, the caches it applies to, whether its sign
is unidentified, its input features, its fit over a chunk of layers and its score.

Adding a method is one `register(Method(...))` here plus its test. Features reach a method already
standardised per side and per dimension with statistics of the training rows only:
    z = (x - mean[layer, side]) / std[layer, side]                              z [c, S, n, d]
and the input the method names is built from them: "diff" zp - zm (the prompt itself for
single-prompt caches), "concat" [zp, zm], "sides" z itself, "logprobs" the cached answers'
log-probabilities [n, 2] (no features). A fit returns {name: tensor [c, ...]} (optionally
`train_loss` [c]); a score returns raw scores [c, n]: label 1 when above `threshold`, once
oriented by the probe's sign (score = threshold + sign * (raw - threshold)).
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import solvers
from .solvers import Settings


@dataclass
class Context:
    """What a fit may use besides the features: settings, the random stream of each layer of the
    chunk (seeded by seed, method and layer), the training rows' labels and their folds."""

    cfg: Settings
    gens: List[torch.Generator]
    y: np.ndarray  # [n] training labels
    fold: np.ndarray  # [n] grouped, stratified fold of each training row (cfg.cv folds)


@dataclass(frozen=True)
class Input:
    """One kind of input a method reads, built from the standardised features z [c, S, n, d]."""

    name: str
    build: Callable  # z -> the method's input [c, n, d'] (z itself for "sides")
    # (w [c, d'], S) -> [c, S, d]: the weight a linear score on this input puts on each side's z
    per_side: Optional[Callable] = None
    single: Optional[str] = None  # its name on single-prompt caches (None: contrast pairs only)
    logprobs: bool = False  # reads the cached answers' log-probabilities, not the features


INPUTS: Dict[str, Input] = {i.name: i for i in (
    Input("diff", lambda z: z[:, 0] - z[:, 1] if z.shape[1] == 2 else z[:, 0],
          lambda w, S: torch.stack([w, -w], 1) if S == 2 else w[:, None], single="prompt"),
    Input("concat", lambda z: torch.cat([z[:, 0], z[:, 1]], -1),
          lambda w, S: torch.stack(w.chunk(2, -1), 1)),
    Input("sides", lambda z: z),
    Input("logprobs", lambda z: z, logprobs=True),
)}

LINEAR_RAW = ("oriented score = sum_s x_s @ w_raw[layer, s] + b_raw[layer] (sign included)")


def linear_raw_space(m, p: dict, mean, std, contrast: bool) -> dict:
    """A linear probe in the model's own activation space x (unstandardised), from its weights on
    z = (x - mean[side]) / std[side]; mean, std [L, S, d]. -> w_raw [L, S, d], b_raw [L]: the
    oriented score is sum over sides s of x_s @ w_raw[:, s] + b_raw (sign included); direction
    [L, d]: how the oriented score rises per unit of a residual-stream vector added to the
    prompt(s), (g_plus - g_minus) / 2 for contrast pairs, g for single prompts."""
    S = std.shape[1]
    w, sign = p["w"].double(), p["sign"].double()[:, None]
    mean, std = mean.double(), std.double()
    w_side = sign[:, None] * INPUTS[m.input].per_side(w, S) / std
    b = sign[:, 0] * p["b"].double() - (w_side * mean).sum((-1, -2))
    direction = (w_side[:, 0] - w_side[:, 1]) / 2 if S == 2 else w_side[:, 0]
    return {"w_raw": w_side.float(), "b_raw": b.float(), "direction": direction.float()}


@dataclass(frozen=True)
class Method:
    """Everything a run and its report need of a method: register it, nothing else names it."""

    name: str
    input: str  # a key of INPUTS (see the module docstring)
    fit: Callable  # (features, Context) -> params
    score: Callable  # (params, features, logprobs) -> raw [c, n]
    contrast_only: bool = False  # needs plus/minus sides
    unsigned: bool = False  # sign unidentified: oriented on training labels, also max(acc, 1-acc)
    threshold: float = 0.0
    formula: str = "f @ w + b"  # the raw score, for the saved probe's metadata
    default: bool = True  # runs unless --methods says otherwise
    fixed: bool = False  # its sign is its formula's, no training label sets it
    baseline: bool = False  # always runs: the floor every row is read against
    colour: Optional[str] = None  # in plots (default: the next of the palette)
    # -> {w_raw, b_raw, direction} in raw activation space (None: no linear direction to save)
    raw_space: Optional[Callable] = linear_raw_space
    raw_doc: str = LINEAR_RAW  # what w_raw and b_raw mean, for the saved probe's metadata
    layered: bool = True  # False: the same at every layer (no layer is chosen or starred)

    @property
    def reads_logprobs(self) -> bool:
        return INPUTS[self.input].logprobs


METHODS: Dict[str, Method] = {}


def register(m: Method) -> Method:
    """Add a method; a name already taken is refused (ValueError)."""
    if m.name in METHODS:
        raise ValueError(f"probe method {m.name!r} is registered already")
    if m.input not in INPUTS:
        raise ValueError(f"probe method {m.name!r}: unknown input {m.input!r} "
                         f"({', '.join(INPUTS)})")
    METHODS[m.name] = m
    return m


def features(z, input: str):
    """z [c, S, n, d] standardised -> the method's input [c, n, d'] (z itself for "sides")."""
    return INPUTS[input].build(z)


def linear_score(p, f, lp=None):
    return torch.einsum("cnd,cd->cn", f, p["w"]) + p["b"][:, None]


def fit_logreg(f, ctx: Context):
    return solvers.fit_logreg(f, ctx.y, ctx.fold, ctx.cfg)


def fit_mean_diff(f, ctx: Context):
    yt = torch.as_tensor(ctx.y, dtype=torch.bool)
    m1, m0 = f[:, yt].mean(1), f[:, ~yt].mean(1)
    w = m1 - m0
    return {"w": w, "b": -(w * (m1 + m0)).sum(-1) / 2}


def fit_crc_tpc(f, ctx: Context):
    """Contrast-consistent reflection, top principal component (Burns et al. 2022, section 3.3)."""
    mu = f.mean(1)
    w = solvers.top_component(f - mu[:, None], ctx.gens)
    return {"w": w, "b": -(w * mu).sum(-1)}


def fit_random(f, ctx: Context):
    """A random unit direction, its threshold halfway between the class means and its sign set by
    the training labels: the floor any direction reaches."""
    w = solvers.randn(ctx.gens, f.shape[-1])
    w = w / w.norm(dim=-1, keepdim=True)
    s = torch.einsum("cnd,cd->cn", f, w)
    yt = torch.as_tensor(ctx.y, dtype=torch.bool)
    b = -(s[:, yt].mean(1) + s[:, ~yt].mean(1)) / 2
    sign = solvers.orient(s, ctx.y)
    return {"w": w * sign[:, None], "b": b * sign}


def fit_majority(f, ctx: Context):
    major = 1.0 if 2 * ctx.y.sum() >= len(ctx.y) else -1.0
    c = f.shape[0]
    return {"w": torch.zeros(c, f.shape[-1]), "b": torch.full((c,), major)}


def fit_ccs(z, ctx: Context):
    return solvers.fit_ccs(z[:, 0], z[:, 1], ctx.cfg, ctx.gens)


def score_ccs(p, z, lp=None):
    return solvers.ccs_score(p, z[:, 0], z[:, 1])


def ccs_raw_space(m, p: dict, mean, std, contrast: bool) -> dict:
    """CCS in raw activation space: one w on each side's own standardisation -> w_raw [L, S, d],
    b_raw [L, S] (the logit of side s is x_s @ w_raw[:, s] + b_raw[:, s], then the formula and
    the sign), direction [L, d] = sign * (g_plus - g_minus) / 2 of the logits' gradients."""
    w, sign = p["w"].double(), p["sign"].double()[:, None]
    w_side = w[:, None] / std.double()
    b = p["b"].double()[:, None] - (w_side * mean.double()).sum(-1)
    direction = sign * (w_side[:, 0] + w_side[:, 1]) / 2
    return {"w_raw": w_side.float(), "b_raw": b.float(), "direction": direction.float()}


def score_zero_shot(p, z, lp):
    raw = torch.as_tensor(lp[:, 0] - lp[:, 1], dtype=torch.float32)
    return raw.expand(len(p["sign"]), -1)


def fit_nothing(z, ctx: Context):
    return {}


register(Method("ccs", "sides", fit_ccs, score_ccs, contrast_only=True, unsigned=True,
                threshold=0.5, formula="0.5 * (sigmoid(zp @ w + b) + 1 - sigmoid(zm @ w + b)); "
                "an MLP (w1, b1, w2, b2) in place of zp @ w + b when w1 is present",
                raw_space=ccs_raw_space,
                raw_doc="ccs: logit of side s = x_s @ w_raw[layer, s] + b_raw[layer, s]; score as "
                "raw_score, then the sign"))
register(Method("lr", "diff", fit_logreg, linear_score))
register(Method("lr_concat", "concat", fit_logreg, linear_score, contrast_only=True))
register(Method("mean_diff", "diff", fit_mean_diff, linear_score))
register(Method("crc_tpc", "diff", fit_crc_tpc, linear_score, contrast_only=True, unsigned=True))
register(Method("random", "diff", fit_random, linear_score, baseline=True, colour="gray"))
register(Method("zero_shot", "logprobs", fit_nothing, score_zero_shot, contrast_only=True,
                formula="logprob(plus answer) - logprob(minus answer)", fixed=True,
                raw_space=None, layered=False))
register(Method("majority", "diff", fit_majority, linear_score, baseline=True, colour="black",
                layered=False))


def baselines() -> List[str]:
    return [m.name for m in METHODS.values() if m.baseline]


def defaults(contrast: bool, has_logprobs: bool) -> List[str]:
    return [m.name for m in METHODS.values() if m.default and (contrast or not m.contrast_only)
            and (has_logprobs or not m.reads_logprobs)]


def row_names(methods: List[str]) -> List[str]:
    """eval.csv method names: an unsigned method gives `m` (max(acc, 1-acc)) and `m_signed`."""
    out = []
    for m in methods:
        out += [m, m + "_signed"] if METHODS[m].unsigned else [m]
    return out


def base(row: str) -> Method:
    return METHODS[row.removesuffix("_signed")]


def orientation(row: str) -> str:
    m = base(row)
    if m.unsigned and not row.endswith("_signed"):
        return "max(acc,1-acc)"
    return "fixed: " + m.formula if m.fixed else "train labels"


def input_name(m: Method, contrast: bool) -> str:
    return m.input if contrast else INPUTS[m.input].single or m.input


def fit_one(m: Method, z, ctx: Context, lp: Optional[np.ndarray]) -> dict:
    """Fit m on standardised training rows z [c, S, n, d]; add its sign [c] (training labels
    decide it for unsigned methods, +1 otherwise)."""
    f = features(z, m.input)
    p = m.fit(f, ctx)
    c = z.shape[0]
    if m.unsigned:
        p["sign"] = solvers.orient(m.score(p, f, lp) - m.threshold, ctx.y)
    else:
        p["sign"] = torch.ones(c)
    return p


def score_one(m: Method, p: dict, z, lp: Optional[np.ndarray]):
    """Oriented scores [c, n] of z [c, S, n, d] (standardised)."""
    raw = m.score(p, features(z, m.input), lp)
    return m.threshold + p["sign"][:, None] * (raw - m.threshold)
