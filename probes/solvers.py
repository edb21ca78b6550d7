"""Solvers batched over layers (and restarts): L-BFGS, CCS, logistic regression, top principal
component. Every tensor leads with the layer axis c (the layers of one chunk)."""
import hashlib
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from llama.errors import LlamaError

CS = (1e-4, 1e-3, 1e-2, 1e-1)  # inverse L2 strengths tried for logistic regression (sklearn's C)


@dataclass
class Settings:
    """How probes are fitted.

    restarts: CCS restarts per layer (the one with the lowest penalised objective is kept)
    optimizer: lbfgs or adam
    steps: solver steps (0: 40 for lbfgs, 1000 for adam)
    hidden: CCS MLP width (0: a linear probe; MLP probes have spurious minima L-BFGS finds: prefer
        adam there)
    seed: random seed; every (method, layer) draws from a stream of its own
    threads: chunks of layers fitted at once, each by a single-threaded worker (0: torch's threads)
    memory_mb: float32 features read from the cache at once, all workers together (at least one
        layer a worker)
    lr: adam's learning rate
    l2: CCS weight penalty (keeps the scale of w finite; biases are not penalised)
    cv: grouped folds for choosing logistic regression's C on the training rows
    """

    restarts: int = 10
    optimizer: str = "lbfgs"
    steps: int = 0
    hidden: int = 0
    seed: int = 0
    threads: int = 0
    memory_mb: float = 1024.0
    lr: float = 1e-2
    l2: float = 1e-3
    cv: int = 3

    def n_steps(self) -> int:
        return self.steps or (40 if self.optimizer == "lbfgs" else 1000)

    def workers(self) -> int:
        return int(self.threads) or torch.get_num_threads()


def generator(seed: int, method: str, layer: int, part: int = 0) -> torch.Generator:
    """The random stream of one method on one layer (and one fold): the same draws whatever other
    layers or methods run beside it."""
    key = hashlib.blake2b(f"{seed}/{method}/{layer}/{part}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def randn(gens: List[torch.Generator], *shape) -> torch.Tensor:
    """[len(gens), *shape] standard normal draws, layer i from generator gens[i]."""
    return torch.stack([torch.randn(*shape, generator=g) for g in gens])


def lbfgs(fg, theta, steps: int, memory: int = 10, tol: float = 1e-5, lin=None):
    """L-BFGS (Nocedal & Wright, Algorithm 7.4) run independently on every problem of a batch:
    theta [..., m]; fg(theta, z) -> (objective [...], grad), grad() -> [..., m] on demand (a
    rejected trial step costs no gradient). Each problem keeps its own history, Armijo
    backtracking step and stopping test; one call of fg evaluates all of them. A linear model
    gives lin(theta) -> z, its outputs, which fg reads: trial steps move z along lin(direction)
    at no further product with the data.

    Stops a problem when its gradient's largest entry is under tol, when no step lowers its
    objective, or when the objective moves by under 1e-7 relative (float32 rounding); else after
    `steps` steps. At 40 steps CCS is not fully converged: on SmolLM2 caches (cities, negated
    cities, BoolQ) it ends about 3% above the optimum objective, under 0.01 from it in accuracy."""
    dot = lambda a, b: (a * b).sum(-1, keepdim=True)  # noqa: E731
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
            ok = ((f2[..., None] <= f[..., None] + 1e-4 * t * slope)
                  & torch.isfinite(f2[..., None])) | ~active
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t * 0.3)
        g2 = grad()  # at the last points tried: those of the problems that took a step
        step = d * t * ok
        theta = theta + step
        if lin:
            z = z + t * ok * zd
        y_ = (g2 - g) * ok
        small = (f[..., None] - f2[..., None]).abs() <= 1e-7 * f[..., None].abs()
        done |= active & (~ok | small)
        f, g = torch.where(ok[..., 0], f2, f), torch.where(ok, g2, g)
        sy = dot(step, y_)
        good = sy > 1e-10
        hist.append((step * good, y_ * good, torch.where(good, 1 / sy.clamp_min(1e-10), 0)))
        hist = hist[-memory:]
        gamma = torch.where(good, sy / dot(y_, y_).clamp_min(1e-20), gamma)
    return theta, f


def minimise(fg, theta, cfg: Settings, lin=None):
    """(theta, objective) after minimising every problem of the batch with cfg.optimizer."""
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


def logits(theta, xt):
    """A linear model's outputs [c, P, n]: theta [c, P, d + 1] = (w, b) on xt [c, d, n]."""
    return torch.baddbmm(theta[..., -1:], theta[..., :-1], xt)


# ---------------------------------------------------------------- CCS (Burns et al. 2022)


def unpack(theta, d: int, h: int) -> dict:
    """CCS parameters from theta [..., m]: linear (w, b) or MLP (w1, b1, w2, b2) of h units."""
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
    """Burns et al. eq. 1-2: consistency (p+ = 1 - p-) plus confidence (not both near 0.5)."""
    return (pp - (1 - pm)).square().mean(-1) + torch.minimum(pp, pm).square().mean(-1)


def penalty(p: dict):
    """The weight penalty |w|^2 (MLP: |w1|^2 + |w2|^2) per restart; biases are not penalised."""
    if "w1" in p:
        return p["w1"].square().sum((-1, -2)) + p["w2"].square().sum(-1)
    return p["w"].square().sum(-1)


def ccs_linear_fg(xt, n, l2):
    """The linear CCS objective and its gradient by hand (autograd's bookkeeping costs more than
    the maths) for theta [c, R, d + 1] = (w, b) on xt [c, d, 2n] (plus rows, then minus rows),
    given their logits z."""

    def fg(theta, z):
        w = theta[..., :-1]
        p = torch.sigmoid(z)  # [c, R, 2n]
        pp, pm = p[..., :n], p[..., n:]
        cons = pp + pm - 1
        low = torch.minimum(pp, pm)
        loss = cons.square().mean(-1) + low.square().mean(-1) + l2 * w.square().sum(-1)

        def grad():
            first = pp <= pm
            g = torch.cat([cons + low * first, cons + low * ~first], -1)
            g.mul_(p * (1 - p) * (2 / n))
            gw = torch.bmm(g, xt.transpose(1, 2)).add_(w, alpha=2 * l2)
            return torch.cat([gw, g.sum(-1, keepdim=True)], -1)

        return loss, grad

    return fg


def fit_ccs(zp, zm, cfg: Settings, gens) -> dict:
    """zp, zm [c, n, d] standardised training rows -> per layer the restart with the lowest
    penalised objective (CCS loss + l2 |w|^2, what the solver minimises), its parameters and
    train_loss [c], the CCS loss without the penalty."""
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
                loss = ccs_loss(prob[..., :n], prob[..., n:]) + cfg.l2 * penalty(p)
                return loss.detach(), lambda: torch.autograd.grad(loss.sum(), th)[0]

        lin = None
    else:
        theta = torch.cat([randn(gens, R, d) / d**0.5, torch.zeros(c, R, 1)], -1)
        # [c, d, 2n]: the layout both products read fastest
        xt = torch.cat([zp.transpose(1, 2), zm.transpose(1, 2)], 2)
        fg, lin = ccs_linear_fg(xt, n, cfg.l2), lambda th: logits(th, xt)
    theta, objective = minimise(fg, theta, cfg, lin)
    best = objective.argmin(1)
    pick = torch.arange(c)
    out = unpack(theta[pick, best], d, h)
    out["train_loss"] = objective[pick, best] - cfg.l2 * penalty(out)
    return out


def ccs_score(p: dict, zp, zm):
    """0.5 * (p(plus) + 1 - p(minus)) [c, N] under one chosen restart per layer."""
    one = {k: v[:, None] for k, v in p.items() if k[0] in "wb"}
    return 0.5 * (ccs_prob(one, zp)[:, 0] + 1 - ccs_prob(one, zm)[:, 0])


# ---------------------------------------------------------------- logistic regression


def fit_logreg(f, y, fold, cfg: Settings) -> dict:
    """L2 logistic regression on f [c, n, d] with labels y [n]: scikit-learn's objective
    (C * sum(log-loss) + |w|^2 / 2, intercept not penalised), C per layer chosen by
    cross-validation over `fold` [n] (fold number of each row; held-out log-loss), then refit on
    every row from the chosen C's fold solutions."""
    c, n, d = f.shape
    k = int(fold.max()) + 1
    ft = f.transpose(1, 2).contiguous()  # [c, d, n]: the layout both solves read
    ys = torch.as_tensor(2.0 * y - 1, dtype=torch.float32)
    Cs = torch.tensor(CS)
    fold = torch.as_tensor(fold)
    mask = (fold[None] != torch.arange(k)[:, None]).float().repeat_interleave(len(CS), 0)
    C = Cs.repeat(k)[None].expand(c, -1)
    theta = solve_logreg(ft, ys, mask, C, torch.zeros(c, len(mask), d + 1), cfg)
    held = (1 - mask)[None] * F.softplus(-ys * logits(theta, ft))
    val = (held.sum(-1) / (1 - mask).sum(-1)).view(c, k, len(CS)).mean(1)
    pick = val.argmin(1)
    start = theta.view(c, k, len(CS), d + 1)[torch.arange(c), :, pick].mean(1, keepdim=True)
    theta = solve_logreg(ft, ys, torch.ones(1, n), Cs[pick][:, None], start, cfg)
    loss = F.softplus(-ys * logits(theta, ft)[:, 0]).mean(-1)
    theta = theta[:, 0]
    return {"w": theta[:, :-1], "b": theta[:, -1], "C": Cs[pick], "train_loss": loss}


def solve_logreg(ft, ys, mask, C, theta, cfg: Settings):
    """P problems per layer, batched, on ft [c, d, n]: rows mask [P, n], C [c, P], theta
    [c, P, d + 1] (w, b) to start. Stops on a gradient under 1e-4 or after max(steps, 100)."""
    m = mask / mask.sum(-1, keepdim=True)
    decay = 1 / (C * mask.sum(-1))  # [c, P]

    def fg(theta, z):
        w = theta[..., :-1]
        margin = -ys * z  # [c, P, n]
        loss = (m * F.softplus(margin)).sum(-1) + decay * w.square().sum(-1) / 2

        def grad():
            g = m * -ys * torch.sigmoid(margin)
            gw = torch.bmm(g, ft.transpose(1, 2)).add_(decay[..., None] * w)
            return torch.cat([gw, g.sum(-1, keepdim=True)], -1)

        return loss, grad

    steps = max(cfg.n_steps(), 100)
    return lbfgs(fg, theta, steps, tol=1e-4, lin=lambda th: logits(th, ft))[0]


# ---------------------------------------------------------------- principal component


def top_component(f, gens, k: int = 8, iters: int = 6):
    """Top right singular vector [c, d] of f [c, n, d]: seeded subspace iteration (Halko et al.
    2011, Algorithm 4.4), then Rayleigh-Ritz on the k-dimensional subspace."""
    q = randn(gens, f.shape[2], k)
    for _ in range(iters):
        q = torch.linalg.qr(f.transpose(1, 2) @ (f @ q)).Q
    h = f @ q
    _, v = torch.linalg.eigh(h.transpose(1, 2) @ h)
    return (q @ v[..., -1:])[..., 0]


def orient(raw, y: np.ndarray):
    """+1/-1 per layer so that the class-1 mean of raw [c, n] is at least the class-0 mean."""
    yt = torch.as_tensor(y, dtype=torch.bool)
    return torch.where(raw[:, yt].mean(1) >= raw[:, ~yt].mean(1), 1.0, -1.0)
