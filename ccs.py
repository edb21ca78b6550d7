"""Probes on an activation cache: CCS (Burns et al. 2022) and its baselines, on every layer at once.

    python ccs.py train --cache DIR --output RUN [--layers 10,20] [--methods ccs,lr] [--test_frac 0.4] [--seed 0] [--visualize]
    python ccs.py transfer --train DIR --test DIR2 [--test DIR3 ...] --output RUN

Every score reads "higher = label 1": the plus side is the true one (contrast caches), or the prompt is a
"testing" one (single-prompt caches). AUROC takes label 1 as the positive class. Features are
standardised per side and per dimension with statistics of the training rows only, then applied
unchanged to held-out rows. Never imports fairscale or the model.

Methods: ccs (Burns et al. 2022; every restart of every layer solved as one batch), lr (logistic
regression on plus - minus), lr_concat (on [plus, minus]), mean_diff, crc_tpc (top principal component
of the differences), random (a random direction), zero_shot (log p(plus) - log p(minus), when cached),
majority. Single-prompt caches get the supervised ones: lr, mean_diff, random, majority.

RUN/eval.csv, one row per layer and method: split (test, or cvK for k folds), n, accuracy,
balanced_accuracy, auroc and their bootstrap 95% intervals (*_lo, *_hi), calibrated_accuracy (threshold
set so the held-out positive rate equals training's), train_loss, orientation: CCS and CRC-TPC cannot
tell true from false, so row `ccs` reports max(acc, 1 - acc) on held-out data (orientation
"max(acc,1-acc)", as published) and row `ccs_signed` the sign fixed on training labels.
"""
import contextlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
CS = (1e-4, 1e-3, 1e-2, 1e-1)  # inverse L2 strengths tried for logistic regression (scikit-learn's C)


@dataclass
class Config:
    restarts: int = 10
    optimizer: str = "lbfgs"  # or "adam"
    steps: int = 0  # 0: 40 for lbfgs (converged on real-sized problems), 1000 for adam
    lr: float = 1e-2  # adam only
    hidden: int = 0  # CCS: 0 = linear probe with bias, >0 = MLP with one hidden layer of this size
    l2: float = 1e-3  # CCS weight penalty: keeps the scale of w finite
    cv: int = 3  # folds for choosing C of logistic regression
    seed: int = 0
    chunk_mb: float = 64.0  # layers solved together: small enough to stay in the CPU cache
    workers: int = 1  # threads fitting chunks of layers at once

    def n_steps(self):
        return self.steps or (40 if self.optimizer == "lbfgs" else 1000)


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
        std, mean = torch.std_mean(x, 2)
        return Norm(mean, std.clamp_min(1e-6))

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
            x.numpy()[i, j] = cache.array(l, side)
    return x


def split(y: np.ndarray, test_frac: float, folds: int, seed: int):
    """[(train rows, test rows)]: one stratified held-out split, or stratified k folds."""
    if folds:
        k = int(folds)
        if k < 2:
            raise LlamaError(f"--folds must be 2 or more (got {folds})")
        fold = stratified_folds(y, k, seed)
        parts = [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(k)]
    else:
        if not 0 < float(test_frac) < 1:
            raise LlamaError(f"--test_frac must be between 0 and 1 (got {test_frac}): an empty split")
        rng = np.random.default_rng(seed)
        test = [rng.permutation(np.flatnonzero(y == cls))[: int(round(float(test_frac) * np.sum(y == cls)))]
                for cls in np.unique(y)]
        test = np.sort(np.concatenate(test))
        parts = [(np.setdiff1d(np.arange(len(y)), test), test)]
    for tr, te in parts:
        if len(te) == 0 or len(tr) == 0:
            raise LlamaError(f"empty split: {len(tr)} training and {len(te)} held-out rows of {len(y)}")
        if np.bincount(y[tr], minlength=2).min() < 2 or len(np.unique(y[te])) < 2:
            raise LlamaError(f"too few examples to split: {len(y)} rows (classes {np.bincount(y).tolist()}) leave "
                             f"{np.bincount(y[tr], minlength=2).tolist()} per class to train on and "
                             f"{np.bincount(y[te], minlength=2).tolist()} to test; each needs both classes")
    return parts


def chunks(n_layers: int, rows: int, dim: int, cfg: Config):
    """Layer slices of near-equal size, at most chunk_mb of features each, a multiple of cfg.workers of them."""
    most = max(1, int(cfg.chunk_mb * 2**20 / (rows * dim * 4)))
    k = min(n_layers, -(-n_layers // most // cfg.workers) * cfg.workers)
    ends = [round(i * n_layers / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(ends, ends[1:])]


def randn(gens, *shape):
    """[len(gens), *shape] standard normal draws, layer i from generator gens[i]."""
    return torch.stack([torch.randn(*shape, generator=g) for g in gens])


@contextlib.contextmanager
def single_threaded():
    """torch ops single-threaded inside, the caller's setting restored after: our threads each take whole
    chunks of work (on a machine shared with other jobs, one op's threads wait for each other's turn)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- solvers


def lbfgs(fg, theta, steps: int, memory: int = 10, tol: float = 1e-5, lin=None):
    """L-BFGS run independently on every problem of a batch: theta [..., m], fg(theta, z) -> (loss [...],
    grad()), grad() -> [..., m] on demand: a rejected trial step costs no gradient. Each problem keeps its
    own history, step size (Armijo backtracking) and stopping test; one call of fg evaluates all of
    them, so a problem costs what it would alone. A linear model gives lin(theta) -> z, its outputs,
    which fg then reads: trial steps move z along lin(direction) at no further product with the data."""
    dot = lambda a, b: (a * b).sum(-1, keepdim=True)
    z = lin(theta) if lin else None
    f, grad = fg(theta, z)
    g = grad()
    hist = []  # (s, y, 1 / s.y) per step, zero where the pair was rejected
    gamma = 1 / g.abs().sum(-1, keepdim=True).clamp_min(1)
    done = torch.zeros_like(gamma, dtype=torch.bool)
    for _ in range(steps):
        active = ~done & (g.abs().amax(-1, keepdim=True) > tol)
        if not bool(active.any()):
            break
        q, alphas = g.clone(), []
        for s_, y_, rho in reversed(hist):
            a_ = rho * dot(s_, q)
            q -= a_ * y_
            alphas.append(a_)
        r = gamma * q
        for (s_, y_, rho), a_ in zip(hist, reversed(alphas)):
            r += s_ * (a_ - rho * dot(y_, r))
        d = torch.where(dot(g, r) > 0, -r, -gamma * g) * active  # lost curvature: steepest descent
        slope = dot(g, d)
        t = torch.ones_like(slope)
        zd = lin(d) if lin else None
        for _ in range(10):
            f2, grad = fg(theta + t * d, z + t * zd if lin else None)
            ok = ((f2[..., None] <= f[..., None] + 1e-4 * t * slope) & torch.isfinite(f2[..., None])) | ~active
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t * 0.3)
        g2 = grad()  # at the last points tried: those of the problems that took a step
        step = d * t * ok
        theta = theta + step
        if lin:
            z = z + t * ok * zd
        y_ = (g2 - g) * ok
        # a problem is done when no step helps or the loss stops moving (float32 rounding)
        done |= active & (~ok | ((f[..., None] - f2[..., None]).abs() <= 1e-7 * f[..., None].abs()))
        f, g = torch.where(ok[..., 0], f2, f), torch.where(ok, g2, g)
        sy = dot(step, y_)
        good = sy > 1e-10
        hist.append((step * good, y_ * good, torch.where(good, 1 / sy.clamp_min(1e-10), 0)))
        hist = hist[-memory:]
        gamma = torch.where(good, sy / dot(y_, y_).clamp_min(1e-20), gamma)
    return theta, f


def minimise(fg, theta, cfg: Config, lin=None):
    """(theta, loss) after minimising every problem of the batch with cfg.optimizer (fg and lin as for lbfgs)."""
    if cfg.optimizer == "lbfgs":
        return lbfgs(fg, theta, cfg.n_steps(), lin=lin)
    if cfg.optimizer != "adam":
        raise LlamaError(f"unknown --optimizer {cfg.optimizer!r} (lbfgs or adam)")
    if lin:
        fg0, fg = fg, lambda th, _: fg0(th, lin(th))
    theta = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    for _ in range(cfg.n_steps()):
        theta.grad = fg(theta.detach(), None)[1]()
        opt.step()
    theta = theta.detach()
    return theta, fg(theta, None)[0]


def unpack(theta, d: int, h: int) -> dict:
    """CCS parameters from theta [..., m]: linear (w, b) or MLP (w1, b1, w2, b2) with h hidden units."""
    if not h:
        return {"w": theta[..., :d], "b": theta[..., d]}
    w1, b1, w2, b2 = theta.split([d * h, h, h, 1], -1)
    return {"w1": w1.unflatten(-1, (d, h)), "b1": b1, "w2": w2, "b2": b2[..., 0]}


def ccs_prob(p: dict, x):
    """p(true) of x [c, n, d] under every restart: [c, R, n]."""
    if "w1" in p:
        c, R, d, h = p["w1"].shape
        w1 = p["w1"].permute(0, 2, 1, 3).reshape(c, d, R * h)
        hid = torch.relu(torch.bmm(x, w1).view(c, -1, R, h) + p["b1"][:, None])  # [c, n, R, h]
        return torch.sigmoid((hid * p["w2"][:, None]).sum(-1).transpose(1, 2) + p["b2"][..., None])
    return torch.sigmoid(torch.baddbmm(p["b"][..., None], p["w"], x.transpose(1, 2)))


def ccs_loss(pp, pm):
    """Burns et al.: consistency (p+ = 1 - p-) and confidence (not both near 0.5), per restart."""
    return (pp - (1 - pm)).square().mean(-1) + torch.minimum(pp, pm).square().mean(-1)


def fit_ccs(zp, zm, cfg: Config, gens):
    """zp, zm [c, n, d] normalised training rows -> the best of cfg.restarts restarts per layer."""
    c, n, d = zp.shape
    R, h = cfg.restarts, cfg.hidden
    if h:
        x = torch.cat([zp, zm], 1)
        theta = torch.cat([randn(gens, R, d * h) / d**0.5, torch.zeros(c, R, h),
                           randn(gens, R, h) / h**0.5, torch.zeros(c, R, 1)], -1)

        def fg(th, _):
            with torch.enable_grad():
                th = th.detach().requires_grad_(True)
                p = unpack(th, d, h)
                prob = ccs_prob(p, x)
                penalty = p["w1"].square().sum((-1, -2)) + p["w2"].square().sum(-1)
                loss = ccs_loss(prob[..., :n], prob[..., n:]) + cfg.l2 * penalty
                return loss.detach(), lambda: torch.autograd.grad(loss.sum(), th)[0]
    else:
        theta = torch.cat([randn(gens, R, d) / d**0.5, torch.zeros(c, R, 1)], -1)
        xt = torch.cat([zp.transpose(1, 2), zm.transpose(1, 2)], 2)  # [c, d, 2n]: the layout both products read fastest
        fg, lin = ccs_linear_fg(xt, n, cfg.l2), lambda th: logits(th, xt)
    theta, loss = minimise(fg, theta, cfg, lin if not h else None)
    best = loss.argmin(1)
    pick = torch.arange(c)
    out = unpack(theta[pick, best], d, h)
    out["train_loss"] = loss[pick, best]
    return out


def logits(theta, xt):
    """A linear model's outputs [c, P, n]: theta [c, P, d + 1] = (w, b) on xt [c, d, n]."""
    return torch.baddbmm(theta[..., -1:], theta[..., :-1], xt)


def ccs_linear_fg(xt, n, l2):
    """The linear CCS loss and its gradient by hand (autograd's bookkeeping costs more than the maths)
    for theta [c, R, d + 1] = (w, b) on xt [c, d, 2n] (plus rows, then minus rows), given its logits z."""

    def fg(theta, z):
        w = theta[..., :-1]
        p = torch.sigmoid(z)  # [c, R, 2n]
        pp, pm = p[..., :n], p[..., n:]
        cons = pp + pm - 1
        low = torch.minimum(pp, pm)
        loss = cons.square().mean(-1) + low.square().mean(-1) + l2 * w.square().sum(-1)

        def grad():
            first = pp <= pm
            g = torch.cat([cons + low * first, cons + low * ~first], -1).mul_(p * (1 - p) * (2 / n))
            return torch.cat([torch.bmm(g, xt.transpose(1, 2)).add_(w, alpha=2 * l2), g.sum(-1, keepdim=True)], -1)

        return loss, grad

    return fg


def ccs_score(p, zp, zm):
    """0.5 * (p(plus) + 1 - p(minus)) [c, N] for one chosen restart per layer."""
    one = {k: v[:, None] for k, v in p.items() if k[0] in "wb"}
    return 0.5 * (ccs_prob(one, zp)[:, 0] + 1 - ccs_prob(one, zm)[:, 0])


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number [n] of each row: every class dealt out evenly over k folds, in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    start = 0
    for cls in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == cls))
        fold[rows] = (np.arange(len(rows)) + start) % k
        start += len(rows)
    return fold


def fit_logreg(f, y, cfg: Config):
    """L2 logistic regression on f [c, n, d] with labels y [n]: scikit-learn's objective
    (C * sum(log-loss) + |w|^2 / 2, intercept not penalised), C per layer chosen by cfg.cv-fold
    cross-validation on these rows (held-out log-loss), then refit on all of them from the
    chosen C's fold solutions."""
    c, n, d = f.shape
    f = f.transpose(1, 2).contiguous().transpose(1, 2)  # the layout solve_logreg reads: one copy for both solves
    ys = torch.as_tensor(2.0 * y - 1, dtype=torch.float32)
    fold = torch.as_tensor(stratified_folds(y, cfg.cv, cfg.seed))
    Cs = torch.tensor(CS)
    mask = (fold[None] != torch.arange(cfg.cv)[:, None]).float().repeat_interleave(len(CS), 0)  # fold-major
    C = Cs.repeat(cfg.cv)[None].expand(c, -1)
    theta = solve_logreg(f, ys, mask, C, torch.zeros(c, len(mask), d + 1), cfg)
    s = torch.baddbmm(theta[..., -1:], theta[..., :-1], f.transpose(1, 2))
    held = (1 - mask)[None] * F.softplus(-ys * s)
    val = (held.sum(-1) / (1 - mask).sum(-1)).view(c, cfg.cv, len(CS)).mean(1)
    pick = val.argmin(1)
    start = theta.view(c, cfg.cv, len(CS), d + 1)[torch.arange(c), :, pick].mean(1, keepdim=True)
    theta = solve_logreg(f, ys, torch.ones(1, n), Cs[pick][:, None], start, cfg)[:, 0]
    loss = F.softplus(-ys * (torch.einsum("cnd,cd->cn", f, theta[:, :-1]) + theta[:, -1:])).mean(-1)
    return {"w": theta[:, :-1], "b": theta[:, -1], "C": Cs[pick], "train_loss": loss}


def solve_logreg(f, ys, mask, C, theta, cfg: Config):
    """P problems per layer, batched: rows mask [P, n], C [c, P], theta [c, P, d + 1] (w, b) to start."""
    m = mask / mask.sum(-1, keepdim=True)
    decay = 1 / (C * mask.sum(-1))  # [c, P]
    ft = f.transpose(1, 2).contiguous()

    def fg(theta, z):
        w = theta[..., :-1]
        margin = -ys * z  # [c, P, n]
        loss = (m * F.softplus(margin)).sum(-1) + decay * w.square().sum(-1) / 2

        def grad():
            g = m * -ys * torch.sigmoid(margin)
            return torch.cat([torch.bmm(g, ft.transpose(1, 2)).add_(decay[..., None] * w), g.sum(-1, keepdim=True)], -1)

        return loss, grad

    return lbfgs(fg, theta, max(cfg.n_steps(), 100), tol=1e-4, lin=lambda th: logits(th, ft))[0]


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


def top_component(f, gens, k: int = 8, iters: int = 6):
    """Top right singular vector [c, d] of f [c, n, d]: seeded subspace iteration, then Rayleigh-Ritz."""
    q = randn(gens, f.shape[2], k)
    for _ in range(iters):
        q = torch.linalg.qr(f.transpose(1, 2) @ (f @ q)).Q
    h = f @ q
    _, v = torch.linalg.eigh(h.transpose(1, 2) @ h)
    return (q @ v[..., -1:])[..., 0]


def fit(x, y, tr, methods, cfg: Config, logprobs=None):
    """Fit every method on the training rows tr of x [L, S, N, d] -> ({method: Probe}, Norm). Chunks of
    layers are fitted by cfg.workers single-threaded threads at once; every layer draws its random
    numbers from its own seeded generator: the same draws whatever the chunks or threads."""
    L, S, N, d = x.shape
    if "zero_shot" in methods and logprobs is None:
        raise LlamaError("zero_shot needs the answers' log-probabilities in the cache (extract with --zero_shot)")
    contrast = S == 2
    ytr = y[tr]
    yt = torch.as_tensor(ytr, dtype=torch.bool)
    names = [m for m in methods if m != "zero_shot"]
    lin_input = "diff" if contrast else "prompt"

    def one(sl):
        gens = [torch.Generator().manual_seed(cfg.seed * 100003 + l) for l in range(L)[sl]]
        xt = x[sl][:, :, tr]
        nm = Norm.fit(xt)
        z = xt.sub_(nm.mean[:, :, None]).div_(nm.std[:, :, None])  # xt is a copy: normalised in place
        c = z.shape[0]
        f = features(z, lin_input)
        out = {}
        for m in names:
            if m == "ccs":
                p = fit_ccs(z[:, 0], z[:, 1], cfg, gens)
                p["sign"] = orient(ccs_score(p, z[:, 0], z[:, 1]), ytr)
            elif m in ("lr", "lr_concat"):
                p = fit_logreg(features(z, "concat") if m == "lr_concat" else f, ytr, cfg)
                p["sign"] = torch.ones(c)
            elif m == "mean_diff":
                m1, m0 = f[:, yt].mean(1), f[:, ~yt].mean(1)
                w = m1 - m0
                p = {"w": w, "b": -(w * (m1 + m0)).sum(-1) / 2, "sign": torch.ones(c)}
            elif m == "crc_tpc":
                mu = f.mean(1)
                w = top_component(f - mu[:, None], gens)
                p = {"w": w, "b": -(w * mu).sum(-1)}
                p["sign"] = orient(torch.einsum("cnd,cd->cn", f, w), ytr)
            elif m == "random":
                w = randn(gens, f.shape[-1])
                w = w / w.norm(dim=-1, keepdim=True)
                s = torch.einsum("cnd,cd->cn", f, w)
                p = {"w": w, "b": -(s[:, yt].mean(1) + s[:, ~yt].mean(1)) / 2, "sign": orient(s, ytr)}
            elif m == "majority":
                major = 1.0 if 2 * ytr.sum() >= len(ytr) else -1.0
                p = {"w": torch.zeros(c, f.shape[-1]), "b": torch.full((c,), major), "sign": torch.ones(c)}
            out[m] = p
        return nm, out

    parts = chunks(L, S * len(tr), d, cfg)
    with single_threaded(), ThreadPoolExecutor(min(cfg.workers, len(parts))) as pool:
        done = list(pool.map(one, parts))
    norm = Norm(torch.cat([nm.mean for nm, _ in done]), torch.cat([nm.std for nm, _ in done]))
    probes = {}
    for m in names:
        params = {k: torch.cat([out[m][k] for _, out in done]) for k in done[0][1][m]}
        kind = "ccs" if m == "ccs" else "linear"
        probes[m] = Probe(m, kind, {"ccs": "sides", "lr_concat": "concat"}.get(m, lin_input), params)
    if "zero_shot" in methods:
        probes["zero_shot"] = Probe("zero_shot", "zero_shot", "logprobs", {"sign": torch.ones(L)})
    return probes, norm


def score(probes: Dict[str, Probe], norm: Norm, x, logprobs=None, chunk_mb=64.0, workers=1) -> Dict[str, torch.Tensor]:
    """Oriented scores [L, N] of every probe on x [L, S, N, d] (raw features, normalised here), chunks of
    layers in `workers` threads."""
    L, S, N, d = x.shape
    out = {m: torch.empty(L, N) for m in probes}

    def one(sl):
        z = norm(x[sl], sl)
        for m, p in probes.items():
            q = {k: v[sl] for k, v in p.params.items()}
            if p.kind == "ccs":
                raw = ccs_score(q, z[:, 0], z[:, 1])
            elif p.kind == "zero_shot":
                raw = torch.as_tensor(logprobs[:, 0] - logprobs[:, 1], dtype=torch.float32).expand(z.shape[0], N)
            else:
                raw = torch.einsum("cnd,cd->cn", features(z, p.input), q["w"]) + q["b"][:, None]
            out[m][sl] = p.threshold + q["sign"][:, None] * (raw - p.threshold)

    with single_threaded(), ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, chunks(L, S * N, d, Config(chunk_mb=chunk_mb, workers=workers))))
    return out


# ---------------------------------------------------------------- metrics


def metrics(s, thr: float, y, w):
    """Accuracy, balanced accuracy and AUROC (label 1 positive) of scores s [L, n] under row weights
    w [B, n] (ones: the plain metric; bootstrap counts: one resample a row) -> three [B, L] arrays.
    float32 sums: exact for integer weights up to ~5,000 rows, relative error ~1e-7 beyond."""
    s = torch.as_tensor(s, dtype=torch.float32)
    wt = torch.as_tensor(w, dtype=torch.float32).T.contiguous()  # [n, B]: rows are cheap to gather
    pos = torch.as_tensor(y) == 1
    neg = ~pos
    correct = ((s > thr) == pos).float()  # [L, n]
    acc = (correct @ wt / wt.sum(0)).T
    npos, nneg = pos.float() @ wt, neg.float() @ wt  # [B]
    bacc = ((correct * pos) @ wt / npos + (correct * neg) @ wt / nneg).T / 2
    auc = torch.empty_like(acc)
    wn, wp = wt[neg], wt[pos]
    for l in range(s.shape[0]):
        # a positive beats the negatives scored below it and half of those tied with it: put its weight
        # in the bins at both ends of its tie among the sorted negatives, against their running weight
        sn, o = torch.sort(s[l, neg])
        below = torch.cumsum(wn.index_select(0, o), 0)  # [negatives, B]
        lo, hi = torch.searchsorted(sn, s[l, pos]), torch.searchsorted(sn, s[l, pos], right=True)
        bins = torch.zeros(len(sn) + 1, wt.shape[1]).index_add_(0, lo, wp).index_add_(0, hi, wp)
        auc[:, l] = (below * bins[1:]).sum(0) / (2 * npos * nneg)
    return acc, bacc, auc


def resamples(n: int, boot: int, seed: int):
    """Bootstrap counts [boot, n] (how often each row is drawn), shared by every method and layer."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=boot) if boot else None


def evaluate(scores, thr, y, pos_rate: float, counts=None):
    """{name: [L] arrays} of point metrics and bootstrap 95% intervals for scores [L, n]."""
    n = len(y)
    scores = torch.as_tensor(scores)
    if len(scores) > 1 and bool((scores == scores[:1]).all()):  # the same on every layer: compute once
        one = evaluate(scores[:1], thr, y, pos_rate, counts)
        return {k: np.repeat(v, len(scores)) for k, v in one.items()}
    acc, bacc, auc = metrics(scores, thr, y, torch.ones(1, n))
    out = {"accuracy": acc[0], "balanced_accuracy": bacc[0], "auroc": auc[0]}
    if counts is not None:
        for k, v in zip(out.copy(), metrics(scores, thr, y, counts)):
            q = torch.quantile(v.double(), torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
            out[k + "_lo"], out[k + "_hi"] = q[0], q[1]
    # threshold placed so that the held-out positive rate matches training's: no held-out labels used
    cut = torch.quantile(torch.as_tensor(scores, dtype=torch.float64), 1 - pos_rate, dim=1)
    out["calibrated_accuracy"] = ((torch.as_tensor(scores) > cut[:, None]) == (torch.as_tensor(y) == 1)[None]).double().mean(1)
    return {k: np.asarray(v) for k, v in out.items()}


def flip_unsupervised(s, thr, y):
    """max(acc, 1 - acc): reflect each layer's scores where they are right less than half the time."""
    acc = ((s > thr) == torch.as_tensor(y == 1)).double().mean(1)
    return torch.where((acc < 0.5)[:, None], 2 * thr - s, s)


ROW_NOTE = {
    "ccs": "max(acc,1-acc)", "crc_tpc": "max(acc,1-acc)", "zero_shot": "fixed: log p(plus) - log p(minus)",
}


def row_scores(probes, scores, y):
    """Scores by eval.csv method name: an unsupervised method gives `m` (max(acc, 1-acc)) and `m_signed`."""
    out = {}
    for m, v in scores.items():
        if m in UNSUPERVISED:
            out[m] = flip_unsupervised(v, probes[m].threshold, y)
            out[m + "_signed"] = v
        else:
            out[m] = v
    return out


def base(name):
    return name[: -len("_signed")] if name.endswith("_signed") else name


def rows_for(probes, scores, y, pos_rate, boot, seed, layers, extra, loss=None, workers=1):
    """eval.csv rows (dicts), one per layer and method name in scores; methods in `workers` threads."""
    rows = []
    counts = resamples(len(y), boot, seed)
    with single_threaded(), ThreadPoolExecutor(workers) as pool:
        evs = list(pool.map(lambda m: evaluate(scores[m], probes[base(m)].threshold, y, pos_rate, counts), scores))
    for (name, s), ev in zip(scores.items(), evs):
        p = probes[base(name)]
        tl = (loss or {}).get(base(name), p.params.get("train_loss"))
        for i, l in enumerate(layers):
            r = dict(extra, layer=l, method=name, n=len(y))
            r.update({k: float(v[i]) for k, v in ev.items()})
            r["train_loss"] = float(tl[i]) if tl is not None else float("nan")
            r["orientation"] = ROW_NOTE.get(name, "train labels")
            rows.append(r)
    return rows


# ---------------------------------------------------------------- outputs

COLUMNS = ["layer", "method", "split", "n", "accuracy", "accuracy_lo", "accuracy_hi", "balanced_accuracy",
           "balanced_accuracy_lo", "balanced_accuracy_hi", "auroc", "auroc_lo", "auroc_hi", "calibrated_accuracy",
           "train_loss", "orientation"]


def best_layers(df, key="accuracy"):
    return {m: int(g.loc[g[key].idxmax(), "layer"]) for m, g in df.groupby("method", sort=False)}


def print_table(df, positive: str):
    methods = list(dict.fromkeys(df["method"]))
    best = best_layers(df)
    acc = df.pivot(index="layer", columns="method", values="accuracy")
    w = {m: max(7, len(m) + 1) for m in methods}
    print(f"held-out accuracy by layer (* = best layer of the method, chosen on held-out data); positive class: {positive}")
    print("ccs, crc_tpc: unsupervised, max(acc, 1-acc) on held-out data; *_signed: sign fixed on training labels")
    print("layer" + "".join(f"{m:>{w[m]}}" for m in methods))
    for l, r in acc.iterrows():
        print(f"{l:5d}" + "".join(f"{r[m]:>{w[m] - 1}.3f}{'*' if best[m] == l else ' '}" for m in methods))
    print(f"{'method':<16}{'layer':>6}  {'accuracy [95% CI]':<22}{'AUROC [95% CI]':<22}")
    for m in methods:
        r = df[(df.method == m) & (df.layer == best[m])].iloc[0]
        ci = lambda k: f"{r[k]:.3f} [{r.get(k + '_lo', np.nan):.3f}, {r.get(k + '_hi', np.nan):.3f}]"
        print(f"{m:<16}{best[m]:>6}  {ci('accuracy'):<22}{ci('auroc'):<22}")


def save_probes(folder, probes, norm, layers, cache: ActivationCache, info: dict):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    for m, p in probes.items():
        tensors = {k: v.contiguous() for k, v in p.params.items()}
        tensors.update(mean=norm.mean.contiguous(), std=norm.std.contiguous(), layers=torch.tensor(layers))
        save_file(tensors, os.path.join(folder, f"{m}.safetensors"))
        formula = {
            "ccs": "0.5 * (sigmoid(zp @ w + b) + 1 - sigmoid(zm @ w + b)), MLP when w1 is present",
            "logprobs": "logprob(plus) - logprob(minus)", "diff": "(zp - zm) @ w + b", "concat": "[zp, zm] @ w + b",
            "prompt": "z @ w + b",
        }["ccs" if p.kind == "ccs" else p.input]
        meta = dict(info, method=m, kind=p.kind, input=p.input, layers=layers, sides=cache.sides,
                    hidden_dim=cache.hidden_dim, fingerprint=cache.fingerprint, cache=os.path.abspath(cache.path),
                    normalisation="z = (x - mean[layer, side]) / std[layer, side], statistics of the training rows only",
                    raw_score=formula, threshold=p.threshold,
                    orientation="score = threshold + sign * (raw - threshold); predict label 1 when score > threshold; "
                    + ("sign fixed on training labels (eval.csv row '" + m + "' reports max(acc, 1-acc) instead)"
                       if m in UNSUPERVISED else "supervised"))
        with open(os.path.join(folder, f"{m}.json"), "w") as f:
            json.dump(meta, f, indent=1)


def plot(run, df, scores, y, positive):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from sklearn.metrics import roc_curve

    methods = list(dict.fromkeys(df["method"]))
    # a colour per method, its _signed twin dotted in the same colour; gray and black for the baselines
    palette = [c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] if c != "#7f7f7f"]
    bases = [b for b in dict.fromkeys(m.removesuffix("_signed") for m in methods) if b not in ("random", "majority")]
    style = {m: dict(color=palette[bases.index(m.removesuffix("_signed")) % len(palette)],
                     ls=":" if m.endswith("_signed") else "-") for m in methods if m not in ("random", "majority")}
    style.update(random=dict(color="gray", ls="--"), majority=dict(color="black", ls="--"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key in zip(axes, ("accuracy", "auroc")):
        for m in methods:
            g = df[df.method == m].sort_values("layer")
            ax.plot(g.layer, g[key], marker=".", label=m, **style[m])
        ax.set_xlabel("layer")
        ax.set_ylabel(f"held-out {key}")
        ax.axhline(0.5, color="lightgray", lw=0.8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"positive class: {positive}")
    fig.tight_layout()
    fig.savefig(os.path.join(run, "layers.png"), dpi=110)
    plt.close(fig)
    best = best_layers(df)
    top = max(best, key=lambda m: df[(df.method == m) & (df.layer == best[m])].accuracy.iloc[0])
    layer = best[top]
    i = sorted(df.layer.unique()).index(layer)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for m, s in scores.items():
        fpr, tpr, _ = roc_curve(y, s[i].numpy())
        ax.plot(fpr, tpr, label=m)
    ax.plot([0, 1], [0, 1], color="lightgray")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"held-out ROC, layer {layer} (best: {top})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run, "roc.png"), dpi=110)
    plt.close(fig)
    cols = 4
    nrow = (len(scores) + cols - 1) // cols
    fig, axes = plt.subplots(nrow, cols, figsize=(3.2 * cols, 2.6 * nrow), squeeze=False)
    for ax, (m, s) in zip(axes.flat, scores.items()):
        for cls in (0, 1):
            ax.hist(s[i].numpy()[y == cls], bins=30, alpha=0.6, label=f"label {cls}")
        ax.set_title(m, fontsize=9)
    for ax in list(axes.flat)[len(scores):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"held-out scores by class, layer {layer}")
    fig.tight_layout()
    fig.savefig(os.path.join(run, "hist.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- commands


def prepare(cache: ActivationCache, layers, methods):
    """Features, labels and the method list this cache allows."""
    if cache.sides not in (["plus", "minus"], ["prompt"]):
        raise LlamaError(f"cache {cache.path}: sides {cache.sides} are neither plus/minus nor prompt")
    contrast = cache.is_contrast
    allowed = CONTRAST_METHODS if contrast else SINGLE_METHODS
    want = parse_list(methods, "methods")
    if want is None:
        want = [m for m in CONTRAST_METHODS if m != "zero_shot" or cache.logprobs is not None or not contrast]
    for m in want:
        if m not in CONTRAST_METHODS:
            raise LlamaError(f"unknown method {m!r} (known: {', '.join(CONTRAST_METHODS)})")
    skipped = [m for m in want if m not in allowed]
    if skipped:
        print(f"note: {', '.join(skipped)} need contrast pairs (plus/minus sides); cache {cache.path} holds single "
              "prompts, so only the supervised methods run", file=sys.stderr)
    want = [m for m in want if m in allowed] + [m for m in ("random", "majority") if m not in want]
    y = cache_labels(cache)
    layers = parse_layers(layers, cache)
    return load(cache, layers), y, layers, want


def positive_name(cache):
    return "label 1 = the plus side is the true one" if cache.is_contrast else "label 1 = type 'testing'"


def config(restarts, optimizer, steps, hidden, seed, threads) -> Config:
    """Fit settings from a command's flags (threads 0: as many workers as torch has threads)."""
    return Config(restarts=int(restarts), optimizer=optimizer, steps=int(steps), hidden=int(hidden), seed=int(seed),
                  workers=int(threads) or torch.get_num_threads())


def train(cache: str, output: str, layers=None, methods=None, test_frac: float = 0.4, folds: int = 0, seed: int = 0,
          visualize: bool = False, bootstrap: int = 1000, restarts: int = 10, optimizer: str = "lbfgs", steps: int = 0,
          hidden: int = 0, threads: int = 0):
    """Train and evaluate every method on every cached layer; write OUTPUT/eval.csv, probes/ and plots.

    layers: 10,20 or all; methods: ccs,lr,... (random and majority always run); test_frac: held-out share
    (stratified, seeded), or folds: k-fold cross-validation instead; bootstrap: resamples for the 95%
    intervals (0: none); restarts, optimizer (lbfgs or adam), steps (0: 40 lbfgs / 1000 adam), hidden
    (CCS MLP width; 0 = linear. MLP probes have spurious minima that L-BFGS finds: prefer adam there);
    threads: chunks of layers fitted at once, each by a single-threaded worker (0: torch's thread count)."""
    import pandas as pd

    t0 = time.time()
    c = ActivationCache(cache)
    x, y, layers, methods = prepare(c, layers, methods)
    lp = c.logprobs
    cfg = config(restarts, optimizer, steps, hidden, seed, threads)
    parts = split(y, test_frac, folds, int(seed))
    os.makedirs(output, exist_ok=True)
    t1 = time.time()
    oof, ys, losses = {}, [], {}
    for tr, te in parts:
        probes, norm = fit(x, y, tr, methods, cfg, lp)
        s = score(probes, norm, x[:, :, te], None if lp is None else lp[te], workers=cfg.workers)
        for m, v in row_scores(probes, s, y[te]).items():  # unsupervised signs: per fold, as in one split
            oof.setdefault(m, []).append(v)
        for m, p in probes.items():
            if "train_loss" in p.params:
                losses.setdefault(m, []).append(p.params["train_loss"])
        ys.append(y[te])
    yt = np.concatenate(ys)
    scores = {m: torch.cat(v, 1) for m, v in oof.items()}
    loss = {m: torch.stack(v).mean(0) for m, v in losses.items()}
    name = "test" if not folds else f"cv{folds}"
    pos_rate = float(y[parts[0][0]].mean())
    t2 = time.time()
    df = pd.DataFrame(rows_for(probes, scores, yt, pos_rate, int(bootstrap), int(seed), layers, {"split": name}, loss, cfg.workers))
    df = df.reindex(columns=COLUMNS)
    df.round(6).to_csv(os.path.join(output, "eval.csv"), index=False)
    if folds:  # the saved probes come from every row once the folds have measured them
        probes, norm = fit(x, y, np.arange(len(y)), methods, cfg, lp)
    info = dict(split=name, test_frac=None if folds else float(test_frac), seed=int(seed),
                trained_on="all rows" if folds else "the training split", positive_class=positive_name(c))
    save_probes(os.path.join(output, "probes"), probes, norm, layers, c, info)
    if visualize:
        plot(output, df, scores, yt, positive_name(c))
    print_table(df, positive_name(c))
    print(f"wrote {output}/eval.csv and {output}/probes/ in {time.time() - t0:.1f} s (load {t1 - t0:.1f} s, "
          f"fit and score {t2 - t1:.1f} s, metrics and outputs {time.time() - t2:.1f} s)")


def same_model(src: ActivationCache, other: ActivationCache):
    if not src.fingerprint or not other.fingerprint:
        raise LlamaError(f"cache {other.path if not other.fingerprint else src.path} has no model fingerprint: cannot check both caches come from one model")
    if src.fingerprint != other.fingerprint:
        raise LlamaError(f"cache {other.path} comes from another model than {src.path} (fingerprint {other.fingerprint[:16]} vs "
                         f"{src.fingerprint[:16]}): probes do not transfer across models")
    if src.hidden_dim != other.hidden_dim or src.sides != other.sides:
        raise LlamaError(f"cache {other.path} holds {other.sides} x {other.hidden_dim} features, {src.path} {src.sides} x {src.hidden_dim}")


def transfer(train: str, test=None, output: str = "runs/transfer", layers=None, methods=None, test_frac: float = 0.4,
             seed: int = 0, bootstrap: int = 1000, restarts: int = 10, optimizer: str = "lbfgs", steps: int = 0, hidden: int = 0,
             threads: int = 0):
    """Train on the training split of cache TRAIN; score its held-out split and every row of each --test cache
    (same model, checked by fingerprint). Options as for train."""
    import pandas as pd

    src = ActivationCache(train)
    tests = parse_list(test, "test")
    if not tests:
        raise LlamaError("transfer needs at least one --test cache")
    targets = [ActivationCache(str(t)) for t in tests]
    for t in targets:
        same_model(src, t)
    x, y, layers, methods = prepare(src, layers, methods)
    for t in targets:
        parse_layers(layers, t)
    cfg = config(restarts, optimizer, steps, hidden, seed, threads)
    tr, te = split(y, test_frac, 0, int(seed))[0]
    lp = src.logprobs
    probes, norm = fit(x, y, tr, methods, cfg, lp)
    pos_rate, seed = float(y[tr].mean()), int(seed)
    s = score(probes, norm, x[:, :, te], None if lp is None else lp[te], workers=cfg.workers)
    rows = rows_for(probes, row_scores(probes, s, y[te]), y[te], pos_rate, int(bootstrap), seed, layers,
                    {"train": train, "test": train, "split": "test"}, workers=cfg.workers)
    for t in targets:
        use = {m: p for m, p in probes.items() if m != "zero_shot" or t.logprobs is not None}
        yt = cache_labels(t)
        s = score(use, norm, load(t, layers), t.logprobs, workers=cfg.workers)
        rows += rows_for(use, row_scores(use, s, yt), yt, pos_rate, int(bootstrap), seed, layers,
                         {"train": train, "test": t.path, "split": "all"}, workers=cfg.workers)
    os.makedirs(output, exist_ok=True)
    df = pd.DataFrame(rows).reindex(columns=["train", "test"] + COLUMNS)
    df.round(6).to_csv(os.path.join(output, "transfer.csv"), index=False)
    home = df[df.test == train]
    best = best_layers(home)
    names = [train] + [t.path for t in targets]
    print(f"transfer from {train} (trained on its training split); accuracy / AUROC at each method's best layer on "
          f"{train}'s held-out split; positive class: {positive_name(src)}")
    heads = [os.path.basename(os.path.normpath(n))[:17] for n in names]
    heads[0] = heads[0][:8] + " held-out"
    print(f"{'method':<16}{'layer':>6}" + "".join(f"  {h:>17}" for h in heads))
    for m, l in best.items():
        cells = []
        for n in names:
            r = df[(df.test == n) & (df.method == m) & (df.layer == l)]
            cells.append(f"{r.accuracy.iloc[0]:.3f} / {r.auroc.iloc[0]:.3f}" if len(r) else "-")
        print(f"{m:<16}{l:>6}" + "".join(f"  {c:>17}" for c in cells))
    print(f"wrote {output}/transfer.csv (every layer; first column: {train}'s own held-out split)")


def merge_repeated(argv: List[str], flag: str) -> List[str]:
    """`--test A --test B` -> one `--test=['A', 'B']` (fire keeps only the last of repeated flags)."""
    vals, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == flag and i + 1 < len(argv):
            vals.append(argv[i + 1])
            i += 2
            continue
        if a.startswith(flag + "="):
            vals.append(a[len(flag) + 1:])
        else:
            rest.append(a)
        i += 1
    return rest + [f"{flag}={vals!r}"] if vals else rest


def main():
    import fire

    cli(fire.Fire, {"train": train, "transfer": transfer}, command=merge_repeated(sys.argv[1:], "--test"))


if __name__ == "__main__":
    main()
