"""Probes on an activation cache: CCS (Burns et al. 2022) and its baselines, on every layer at once.

    python ccs.py train --cache DIR --output RUN [--layers 10,20] [--methods ccs,lr] [--test_frac 0.4] [--seed 0] [--visualize]
    python ccs.py transfer --train DIR --test DIR2 [--test DIR3 ...] --output RUN

Every score reads "higher = label 1": the plus side is the true one (contrast caches), or the prompt is a
"testing" one (single-prompt caches). AUROC takes label 1 as the positive class. Features are
standardised per side and per dimension with statistics of the training rows only, then applied
unchanged to held-out rows. Never imports fairscale or the model.
"""
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from llama.cache import ActivationCache
from llama.errors import LlamaError, cli

CONTRAST_METHODS = ("ccs", "lr", "lr_concat", "mean_diff", "crc_tpc", "random", "zero_shot", "majority")
SINGLE_METHODS = ("lr", "mean_diff", "random", "majority")
UNSUPERVISED = ("ccs", "crc_tpc")  # their sign is unidentified: reported as max(acc, 1 - acc) and as `_signed`
CS = (1e-3, 1e-2, 1e-1, 1.0)  # inverse L2 strengths tried for logistic regression (scikit-learn's C)


@dataclass
class Config:
    restarts: int = 10
    optimizer: str = "lbfgs"  # or "adam"
    steps: int = 0  # 0: 60 for lbfgs, 1000 for adam
    lr: float = 1e-2  # adam only
    hidden: int = 0  # CCS: 0 = linear probe with bias, >0 = MLP with one hidden layer of this size
    l2: float = 1e-3  # CCS weight penalty: keeps the scale of w finite
    cv: int = 3  # folds for choosing C of logistic regression
    seed: int = 0
    chunk_mb: float = 64.0  # layers solved together: small enough to stay in the CPU cache

    def n_steps(self):
        return self.steps or (60 if self.optimizer == "lbfgs" else 1000)


@dataclass
class Probe:
    """One method on every layer; tensors lead with the layer axis. Raw score by `kind`, then oriented:
    score = threshold + sign * (raw - threshold); the prediction is score > threshold (label 1)."""

    method: str
    kind: str  # "linear" (features @ w + b), "ccs" (0.5 * (p(plus) + 1 - p(minus))), "zero_shot"
    input: str  # features of a linear probe: "diff" (plus - minus), "concat" ([plus, minus]), "prompt"
    params: Dict[str, torch.Tensor] = field(default_factory=dict)  # w, b, sign, train_loss, ...

    @property
    def threshold(self):
        return 0.5 if self.kind == "ccs" else 0.0


@dataclass
class Norm:
    mean: torch.Tensor  # [L, S, d] per side, training rows only
    std: torch.Tensor

    @staticmethod
    def fit(x):  # x [c, S, n, d]
        return Norm(x.mean(2), x.std(2).clamp_min(1e-6))

    def __call__(self, x, sl=slice(None)):
        return (x - self.mean[sl, :, None]) / self.std[sl, :, None]


# ---------------------------------------------------------------- input


def parse_list(v, name) -> Optional[list]:
    """fire hands "10,20" over as a tuple, "10" as an int, "a,b" as a string: accept all of them."""
    if v is None or v == "all":
        return None
    if isinstance(v, (int, str)):
        v = [s.strip() for s in str(v).split(",") if s.strip()]
    v = list(v)
    if not v:
        raise LlamaError(f"--{name} is empty")
    return v


def parse_layers(v, cache: ActivationCache) -> List[int]:
    layers = parse_list(v, "layers")
    if layers is None:
        return list(cache.layers)
    try:
        layers = [int(x) for x in layers]
    except ValueError:
        raise LlamaError(f"--layers must be integers like 10,20 (got {v!r})")
    for l in layers:
        if l not in cache.layers:
            raise LlamaError(f"layer {l} not in cache {cache.path} (cached: {', '.join(map(str, cache.layers))})")
    return layers


def cache_labels(cache: ActivationCache) -> np.ndarray:
    y = cache.labels
    if y is None and cache.types is not None:
        y = np.array([t == "testing" for t in cache.types], dtype=np.int64)
    if y is None:
        raise LlamaError(f"cache {cache.path} has no labels (metadata.json 'labels' or 'types'): probes need them")
    if len(y) != cache.num_examples:
        raise LlamaError(f"cache {cache.path}: {len(y)} labels for {cache.num_examples} examples")
    if len(np.unique(y)) < 2:
        raise LlamaError(f"cache {cache.path} holds one class only (every label is {y[0]}): nothing to probe")
    return y


def load(cache: ActivationCache, layers: List[int]) -> torch.Tensor:
    """[L, S, N, d] float32 features, one vector per example."""
    if cache.token == "all":
        raise LlamaError(f"cache {cache.path} holds every token: probes need one vector per example (extract with token last or mean)")
    x = torch.empty(len(layers), len(cache.sides), cache.num_examples, cache.hidden_dim)
    for i, l in enumerate(layers):
        for j, side in enumerate(cache.sides):
            x[i, j] = torch.from_numpy(cache.array(l, side))
    return x


def split(y: np.ndarray, test_frac: float, folds: int, seed: int):
    """[(train rows, test rows)]: one stratified held-out split, or stratified k folds."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    rows = np.arange(len(y))
    try:
        if folds:
            parts = list(StratifiedKFold(int(folds), shuffle=True, random_state=seed).split(rows, y))
        else:
            if not 0 < float(test_frac) < 1:
                raise LlamaError(f"--test_frac must be between 0 and 1 (got {test_frac}): an empty split")
            parts = [train_test_split(rows, test_size=float(test_frac), stratify=y, random_state=seed)]
    except ValueError as e:
        raise LlamaError(f"cannot split {len(y)} examples (classes {np.bincount(y).tolist()}): {e}")
    for tr, te in parts:
        if len(te) == 0 or len(np.unique(y[tr])) < 2:
            raise LlamaError(f"empty split: {len(tr)} training and {len(te)} held-out rows of {len(y)}")
    return [(np.sort(tr), np.sort(te)) for tr, te in parts]


def chunks(n_layers: int, rows: int, dim: int, cfg: Config):
    c = max(1, int(cfg.chunk_mb * 2**20 / (rows * dim * 4)))
    return [slice(i, min(i + c, n_layers)) for i in range(0, n_layers, c)]


# ---------------------------------------------------------------- solvers


def minimise(params, loss_fn, cfg: Config) -> torch.Tensor:
    """Minimise loss_fn().sum() over independent problems batched in params; return each one's loss."""
    if cfg.optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=1, max_iter=cfg.n_steps(), history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-10)

        def closure():
            opt.zero_grad()
            loss = loss_fn().sum()
            loss.backward()
            return loss

        opt.step(closure)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr)
        for _ in range(cfg.n_steps()):
            opt.zero_grad()
            loss_fn().sum().backward()
            opt.step()
    else:
        raise LlamaError(f"unknown --optimizer {cfg.optimizer!r} (lbfgs or adam)")
    with torch.no_grad():
        return loss_fn()


def ccs_prob(p: dict, x):
    """p(true) of x [c, n, d] under every restart: [c, R, n]."""
    if "w1" in p:
        h = torch.relu(torch.einsum("crdh,cnd->crnh", p["w1"], x) + p["b1"][:, :, None])
        return torch.sigmoid(torch.einsum("crnh,crh->crn", h, p["w2"]) + p["b2"][..., None])
    return torch.sigmoid(torch.baddbmm(p["b"][..., None], p["w"], x.transpose(1, 2)))


def ccs_loss(pp, pm):
    """Burns et al.: consistency (p+ = 1 - p-) and confidence (not both near 0.5), per restart."""
    return (pp - (1 - pm)).square().mean(-1) + torch.minimum(pp, pm).square().mean(-1)


def fit_ccs(zp, zm, cfg: Config, gen: torch.Generator):
    """zp, zm [c, n, d] normalised training rows -> the best of cfg.restarts restarts per layer."""
    c, n, d = zp.shape
    R, h = cfg.restarts, cfg.hidden
    x = torch.cat([zp, zm], 1)
    if h:
        p = {"w1": torch.randn(c, R, d, h, generator=gen) / d**0.5, "b1": torch.zeros(c, R, h),
             "w2": torch.randn(c, R, h, generator=gen) / h**0.5, "b2": torch.zeros(c, R)}
    else:
        p = {"w": torch.randn(c, R, d, generator=gen) / d**0.5, "b": torch.zeros(c, R)}
    for t in p.values():
        t.requires_grad_(True)

    def loss_fn():
        prob = ccs_prob(p, x)
        penalty = sum(t.square().flatten(2).sum(-1) for k, t in p.items() if k.startswith("w"))
        return ccs_loss(prob[..., :n], prob[..., n:]) + cfg.l2 * penalty

    loss = minimise(list(p.values()), loss_fn, cfg)
    best = loss.argmin(1)
    pick = torch.arange(c)
    out = {k: t.detach()[pick, best] for k, t in p.items()}
    out["train_loss"] = loss[pick, best]
    return out


def ccs_score(p, zp, zm):
    """0.5 * (p(plus) + 1 - p(minus)) [c, N] for one chosen restart per layer."""
    one = {k: v[:, None] for k, v in p.items() if k[0] in "wb"}
    return 0.5 * (ccs_prob(one, zp)[:, 0] + 1 - ccs_prob(one, zm)[:, 0])


def fit_logreg(f, y, cfg: Config):
    """L2 logistic regression on f [c, n, d] with labels y [n]: scikit-learn's objective
    (C * sum(log-loss) + |w|^2 / 2, intercept not penalised), C per layer chosen by cfg.cv-fold
    cross-validation on these rows (held-out log-loss), then refit on all of them."""
    from sklearn.model_selection import StratifiedKFold

    c, n, d = f.shape
    ys = torch.as_tensor(2.0 * y - 1, dtype=torch.float32)
    folds = list(StratifiedKFold(cfg.cv, shuffle=True, random_state=cfg.seed).split(np.zeros(n), y))
    fit_mask = torch.zeros(cfg.cv, n)
    for k, (tr, _) in enumerate(folds):
        fit_mask[k, tr] = 1
    Cs = torch.tensor(CS)
    mask = fit_mask.repeat_interleave(len(CS), 0)  # problems: fold-major, C-minor
    C = Cs.repeat(cfg.cv)[None].expand(c, -1)
    w, b = solve_logreg(f, ys, mask, C, cfg)
    with torch.no_grad():
        s = torch.baddbmm(b[..., None], w, f.transpose(1, 2))
        held = (1 - mask)[None] * F.softplus(-ys * s)
        val = (held.sum(-1) / (1 - mask).sum(-1)).view(c, cfg.cv, len(CS)).mean(1)
    best = Cs[val.argmin(1)]  # [c]
    w, b = solve_logreg(f, ys, torch.ones(1, n), best[:, None], cfg)
    with torch.no_grad():
        loss = F.softplus(-ys * (f @ w[:, 0, :, None] + b[:, :, None])[..., 0]).mean(-1)
    return {"w": w[:, 0], "b": b[:, 0], "C": best, "train_loss": loss}


def solve_logreg(f, ys, mask, C, cfg: Config):
    """P problems per layer, batched: rows mask [P, n], C [c, P] -> w [c, P, d], b [c, P]."""
    c, n, d = f.shape
    P = mask.shape[0]
    w = torch.zeros(c, P, d, requires_grad=True)
    b = torch.zeros(c, P, requires_grad=True)
    m = mask / mask.sum(-1, keepdim=True)

    def loss_fn():
        s = torch.baddbmm(b[..., None], w, f.transpose(1, 2))
        return (m * F.softplus(-ys * s)).sum(-1) + w.square().sum(-1) / (2 * C * mask.sum(-1))

    minimise([w, b], loss_fn, Config(steps=max(cfg.n_steps(), 100)))
    return w.detach(), b.detach()


# ---------------------------------------------------------------- methods


def features(z, kind):
    """z [c, S, N, d] normalised -> [c, N, d'] for a linear probe."""
    if kind == "diff":
        return z[:, 0] - z[:, 1]
    if kind == "concat":
        return torch.cat([z[:, 0], z[:, 1]], -1)
    return z[:, 0]


def orient(raw, y):
    """+1/-1 per layer so that the class-1 mean of raw [c, n] is above the class-0 mean."""
    yt = torch.as_tensor(y, dtype=torch.bool)
    return torch.where(raw[:, yt].mean(1) >= raw[:, ~yt].mean(1), 1.0, -1.0)


def fit(x, y, tr, methods, cfg: Config, logprobs=None):
    """Fit every method on the training rows tr of x [L, S, N, d] -> ({method: Probe}, Norm)."""
    L, S, N, d = x.shape
    contrast = S == 2
    gen = torch.Generator().manual_seed(cfg.seed)
    ytr = y[tr]
    norm = Norm(torch.empty(L, S, d), torch.empty(L, S, d))
    parts = {m: [] for m in methods if m != "zero_shot"}
    lin_input = "diff" if contrast else "prompt"
    for sl in chunks(L, S * len(tr), d, cfg):
        xt = x[sl][:, :, tr]
        nm = Norm.fit(xt)
        norm.mean[sl], norm.std[sl] = nm.mean, nm.std
        z = nm(xt)
        c = z.shape[0]
        f = features(z, lin_input)
        for m in parts:
            if m == "ccs":
                p = fit_ccs(z[:, 0], z[:, 1], cfg, gen)
                p["sign"] = orient(ccs_score(p, z[:, 0], z[:, 1]), ytr)
            elif m in ("lr", "lr_concat"):
                p = fit_logreg(features(z, "concat") if m == "lr_concat" else f, ytr, cfg)
                p["sign"] = torch.ones(c)
            elif m == "mean_diff":
                yt = torch.as_tensor(ytr, dtype=torch.bool)
                m1, m0 = f[:, yt].mean(1), f[:, ~yt].mean(1)
                w = m1 - m0
                p = {"w": w, "b": -(w * (m1 + m0)).sum(-1) / 2, "sign": torch.ones(c)}
            elif m == "crc_tpc":
                mu = f.mean(1)
                _, _, v = torch.svd_lowrank(f - mu[:, None], q=8, niter=6)
                w = v[..., 0]
                p = {"w": w, "b": -(w * mu).sum(-1)}
                p["sign"] = orient(torch.einsum("cnd,cd->cn", f, w), ytr)
            elif m == "random":
                w = torch.randn(c, f.shape[-1], generator=gen)
                w = w / w.norm(dim=-1, keepdim=True)
                s = torch.einsum("cnd,cd->cn", f, w)
                yt = torch.as_tensor(ytr, dtype=torch.bool)
                p = {"w": w, "b": -(s[:, yt].mean(1) + s[:, ~yt].mean(1)) / 2, "sign": orient(s, ytr)}
            elif m == "majority":
                major = 1.0 if 2 * ytr.sum() >= len(ytr) else -1.0
                p = {"w": torch.zeros(c, f.shape[-1]), "b": torch.full((c,), major), "sign": torch.ones(c)}
            parts[m].append(p)
    probes = {}
    for m, ps in parts.items():
        params = {k: torch.cat([p[k] for p in ps]) for k in ps[0]}
        kind = "ccs" if m == "ccs" else "linear"
        probes[m] = Probe(m, kind, "concat" if m == "lr_concat" else lin_input, params)
    if "zero_shot" in methods:
        if logprobs is None:
            raise LlamaError("zero_shot needs the answers' log-probabilities in the cache (extract with --zero_shot)")
        probes["zero_shot"] = Probe("zero_shot", "zero_shot", "logprobs", {"sign": torch.ones(L)})
    return probes, norm
