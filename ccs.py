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
    steps: int = 0  # 0: 40 for lbfgs (converged on real-sized problems), 1000 for adam
    lr: float = 1e-2  # adam only
    hidden: int = 0  # CCS: 0 = linear probe with bias, >0 = MLP with one hidden layer of this size
    l2: float = 1e-3  # CCS weight penalty: keeps the scale of w finite
    cv: int = 3  # folds for choosing C of logistic regression
    seed: int = 0
    chunk_mb: float = 64.0  # layers solved together: small enough to stay in the CPU cache

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
            x.numpy()[i, j] = cache.array(l, side)
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


def minimise(params, fg, cfg: Config) -> torch.Tensor:
    """Minimise the sum of independent problems batched in params. fg() returns each problem's loss
    and sets the params' .grad; returns the final losses."""
    if cfg.optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=1, max_iter=cfg.n_steps(), history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-10)
        opt.step(lambda: fg().sum())
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr)
        for _ in range(cfg.n_steps()):
            fg()
            opt.step()
    else:
        raise LlamaError(f"unknown --optimizer {cfg.optimizer!r} (lbfgs or adam)")
    return fg()


def autograd(params, loss_fn):
    """fg for minimise() from a differentiable loss_fn() -> per-problem losses."""

    def fg():
        for t in params:
            t.grad = None
        with torch.enable_grad():
            loss = loss_fn()
            loss.sum().backward()
        return loss.detach()

    return fg


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
        for t in p.values():
            t.requires_grad_(True)

        def loss_fn():
            prob = ccs_prob(p, x)
            penalty = sum(t.square().flatten(2).sum(-1) for k, t in p.items() if k.startswith("w"))
            return ccs_loss(prob[..., :n], prob[..., n:]) + cfg.l2 * penalty

        fg = autograd(list(p.values()), loss_fn)
    else:
        p = {"w": torch.randn(c, R, d, generator=gen) / d**0.5, "b": torch.zeros(c, R)}
        fg = ccs_linear_fg(p["w"], p["b"], x, n, cfg.l2)
    loss = minimise(list(p.values()), fg, cfg)
    best = loss.argmin(1)
    pick = torch.arange(c)
    out = {k: t.detach()[pick, best] for k, t in p.items()}
    out["train_loss"] = loss[pick, best]
    return out


def ccs_linear_fg(w, b, x, n, l2):
    """The linear CCS loss and its gradient by hand: autograd's bookkeeping costs more than the maths."""
    xt = x.transpose(1, 2).contiguous()  # [c, d, 2n]: the fast layout for w @ x^T

    @torch.no_grad()
    def fg():
        p = torch.sigmoid(torch.baddbmm(b[..., None], w, xt))  # [c, R, 2n]
        pp, pm = p[..., :n], p[..., n:]
        cons = pp + pm - 1
        low = torch.minimum(pp, pm)
        loss = cons.square().mean(-1) + low.square().mean(-1) + l2 * w.square().sum(-1)
        first = pp <= pm
        g = torch.cat([cons + low * first, cons + low * ~first], -1).mul_(p * (1 - p) * (2 / n))
        w.grad = torch.bmm(g, x).add_(w, alpha=2 * l2)
        b.grad = g.sum(-1)
        return loss

    return fg


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
    w, b = torch.zeros(c, P, d), torch.zeros(c, P)
    m = mask / mask.sum(-1, keepdim=True)
    decay = 1 / (C * mask.sum(-1))  # [c, P]
    ft = f.transpose(1, 2).contiguous()

    @torch.no_grad()
    def fg():
        margin = -ys * torch.baddbmm(b[..., None], w, ft)  # [c, P, n]
        loss = (m * F.softplus(margin)).sum(-1) + decay * w.square().sum(-1) / 2
        g = m * -ys * torch.sigmoid(margin)
        w.grad = torch.bmm(g, f).add_(decay[..., None] * w)
        b.grad = g.sum(-1)
        return loss

    minimise([w, b], fg, Config(steps=cfg.n_steps()))
    return w, b


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


def score(probes: Dict[str, Probe], norm: Norm, x, logprobs=None, chunk_mb=64.0) -> Dict[str, torch.Tensor]:
    """Oriented scores [L, N] of every probe on x [L, S, N, d] (raw features, normalised here)."""
    L, S, N, d = x.shape
    out = {m: torch.empty(L, N) for m in probes}
    for sl in chunks(L, S * N, d, Config(chunk_mb=chunk_mb)):
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
    return out


# ---------------------------------------------------------------- metrics


def metrics(s, thr: float, y, w):
    """Accuracy, balanced accuracy and AUROC (label 1 positive) of scores s [L, n] under row weights
    w [B, n] (ones: the plain metric; bootstrap counts: one resample a row) -> three [B, L] arrays."""
    s = torch.as_tensor(s, dtype=torch.float32)
    wt = torch.as_tensor(w, dtype=torch.float32).T.contiguous()  # [n, B]: rows are cheap to gather
    pos = torch.as_tensor(y) == 1
    neg = ~pos
    correct = ((s > thr) == pos).float()  # [L, n]
    acc = (correct @ wt / wt.sum(0)).T
    npos, nneg = pos.float() @ wt, neg.float() @ wt  # [B]
    bacc = ((correct * pos) @ wt / npos + (correct * neg) @ wt / nneg).T / 2
    auc = torch.empty_like(acc)
    norm = npos.double() * nneg.double()
    wn, wp = wt * neg[:, None], wt * pos[:, None]
    for l in range(s.shape[0]):
        ss, o = torch.sort(s[l], stable=True)
        negs = wn[o]
        cum = torch.cumsum(negs, 0)  # negatives at or below each place, in score order
        if not bool((ss[1:] == ss[:-1]).any()):
            below = cum
        else:  # ties count one half: negatives strictly below, plus half of those tied
            new = torch.cat([torch.tensor([True]), ss[1:] != ss[:-1]])
            gid = torch.cumsum(new, 0) - 1
            first = torch.nonzero(new)[:, 0]
            last = torch.cat([first[1:], torch.tensor([len(ss)])]) - 1
            below = 0.5 * (cum[last[gid]] + cum[first[gid]] - negs[first[gid]])
        auc[:, l] = (wp[o] * below).sum(0, dtype=torch.float64) / norm
    return acc, bacc, auc


def evaluate(scores, thr, y, pos_rate: float, boot: int, seed: int, loss=None):
    """{name: [L] arrays} of point metrics and bootstrap 95% intervals for scores [L, n]."""
    n = len(y)
    scores = torch.as_tensor(scores)
    if len(scores) > 1 and bool((scores == scores[:1]).all()):  # the same on every layer: compute once
        one = evaluate(scores[:1], thr, y, pos_rate, boot, seed)
        return {k: np.repeat(v, len(scores)) for k, v in one.items()}
    acc, bacc, auc = metrics(scores, thr, y, torch.ones(1, n))
    out = {"accuracy": acc[0], "balanced_accuracy": bacc[0], "auroc": auc[0]}
    if boot:
        counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=boot)
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


def rows_for(probes, scores, y, pos_rate, boot, seed, layers, extra, loss=None):
    """eval.csv rows (dicts), one per layer and method name in scores."""
    rows = []
    for name, s in scores.items():
        p = probes[base(name)]
        ev = evaluate(s, p.threshold, y, pos_rate, boot, seed)
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
    w = max(8, max(len(m) for m in methods) + 1)
    print(f"held-out accuracy by layer (* = best layer of the method, chosen on held-out data); positive class: {positive}")
    print("ccs, crc_tpc: unsupervised, max(acc, 1-acc) on held-out data; *_signed: sign fixed on training labels")
    print("layer" + "".join(f"{m:>{w}}" for m in methods))
    for l, r in acc.iterrows():
        print(f"{l:5d}" + "".join(f"{r[m]:>{w - 1}.3f}{'*' if best[m] == l else ' '}" for m in methods))
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
    from sklearn.metrics import roc_curve

    methods = list(dict.fromkeys(df["method"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key in zip(axes, ("accuracy", "auroc")):
        for m in methods:
            g = df[df.method == m].sort_values("layer")
            style = dict(ls="--", color="gray" if m == "random" else "black") if m in ("random", "majority") else {}
            ax.plot(g.layer, g[key], marker=".", label=m, **style)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"held-out {key}")
        ax.axhline(0.5, color="lightgray", lw=0.8)
    axes[1].legend(fontsize=7, ncol=2)
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


def train(cache: str, output: str, layers=None, methods=None, test_frac: float = 0.4, folds: int = 0, seed: int = 0,
          visualize: bool = False, bootstrap: int = 1000, restarts: int = 10, optimizer: str = "lbfgs", steps: int = 0,
          hidden: int = 0):
    """Train and evaluate every method on every cached layer; write OUTPUT/eval.csv, probes/ and plots."""
    import pandas as pd

    t0 = time.time()
    c = ActivationCache(cache)
    x, y, layers, methods = prepare(c, layers, methods)
    lp = c.logprobs
    cfg = Config(restarts=int(restarts), optimizer=optimizer, steps=int(steps), hidden=int(hidden), seed=int(seed))
    parts = split(y, test_frac, folds, int(seed))
    os.makedirs(output, exist_ok=True)
    t1 = time.time()
    oof, ys, losses = {}, [], {}
    for tr, te in parts:
        probes, norm = fit(x, y, tr, methods, cfg, lp)
        s = score(probes, norm, x[:, :, te], None if lp is None else lp[te])
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
    df = pd.DataFrame(rows_for(probes, scores, yt, pos_rate, int(bootstrap), int(seed), layers, {"split": name}, loss))
    df = df.reindex(columns=COLUMNS)
    df.to_csv(os.path.join(output, "eval.csv"), index=False)
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
    return None


def same_model(src: ActivationCache, other: ActivationCache):
    if not src.fingerprint or not other.fingerprint:
        raise LlamaError(f"cache {other.path if not other.fingerprint else src.path} has no model fingerprint: cannot check both caches come from one model")
    if src.fingerprint != other.fingerprint:
        raise LlamaError(f"cache {other.path} comes from another model than {src.path} (fingerprint {other.fingerprint[:16]} vs "
                         f"{src.fingerprint[:16]}): probes do not transfer across models")
    if src.hidden_dim != other.hidden_dim or src.sides != other.sides:
        raise LlamaError(f"cache {other.path} holds {other.sides} x {other.hidden_dim} features, {src.path} {src.sides} x {src.hidden_dim}")


def transfer(train: str, test=None, output: str = "runs/transfer", layers=None, methods=None, test_frac: float = 0.4,
             seed: int = 0, bootstrap: int = 1000, restarts: int = 10, optimizer: str = "lbfgs", steps: int = 0, hidden: int = 0):
    """Train on the training split of cache TRAIN; score its held-out split and every row of each --test cache."""
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
    cfg = Config(restarts=int(restarts), optimizer=optimizer, steps=int(steps), hidden=int(hidden), seed=int(seed))
    tr, te = split(y, test_frac, 0, int(seed))[0]
    lp = src.logprobs
    probes, norm = fit(x, y, tr, methods, cfg, lp)
    pos_rate, seed = float(y[tr].mean()), int(seed)
    s = score(probes, norm, x[:, :, te], None if lp is None else lp[te])
    rows = rows_for(probes, row_scores(probes, s, y[te]), y[te], pos_rate, int(bootstrap), seed, layers,
                    {"train": train, "test": train, "split": "test"})
    for t in targets:
        use = {m: p for m, p in probes.items() if m != "zero_shot" or t.logprobs is not None}
        yt = cache_labels(t)
        s = score(use, norm, load(t, layers), t.logprobs)
        rows += rows_for(use, row_scores(use, s, yt), yt, pos_rate, int(bootstrap), seed, layers,
                         {"train": train, "test": t.path, "split": "all"})
    os.makedirs(output, exist_ok=True)
    df = pd.DataFrame(rows).reindex(columns=["train", "test"] + COLUMNS)
    df.to_csv(os.path.join(output, "transfer.csv"), index=False)
    home = df[df.test == train]
    best = best_layers(home)
    names = [train] + [t.path for t in targets]
    print(f"transfer from {train} (trained on its training split); accuracy / AUROC at each method's best layer on "
          f"{train}'s held-out split; positive class: {positive_name(src)}")
    print(f"{'method':<16}{'layer':>6}" + "".join(f"  {os.path.basename(os.path.normpath(n))[:17]:>17}" for n in names))
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
