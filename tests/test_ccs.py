import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, in_process, one_line_error
from activations.cache import ActivationCache, save_cache

import probes.commands as ccs
from probes import data, solvers
from probes.metrics import metrics


pytestmark = pytest.mark.usefixtures("one_thread")



def planted(n=400, d=48, seed=0, truth=1.0, distractor=3.0):
    """Contrast pairs whose only label signal is a truth direction t, anti-symmetric between the
    sides (the most consistent direction), plus a stronger label-free distractor u shared by both
    sides, an answer offset per side and one huge outlier dimension (like the default model's
    dimension 507)."""
    rng = np.random.default_rng(seed)
    t, u = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    y = rng.permutation(np.arange(n) % 2)
    common = rng.standard_normal((n, d)) + distractor * rng.standard_normal((n, 1)) * u
    sgn = (2 * y - 1)[:, None] * truth * t
    plus = common + sgn + 0.3 * rng.standard_normal((n, d)) + 2.0
    minus = common - sgn + 0.3 * rng.standard_normal((n, d)) - 1.0
    plus[:, 0] += 24000
    minus[:, 0] += 24000
    return plus, minus, y, t, u


def write(path, layers, y, fingerprint="fp-A", logprobs=None, sides=("plus", "minus"), **meta):
    save_cache(str(path), {l: dict(zip(sides, arrs)) for l, arrs in layers.items()},
               {"labels": [int(v) for v in y], "model": {"fingerprint": fingerprint}, **meta},
               logprobs=logprobs)
    return str(path)


def run(*args):
    return in_process(["ccs.py", *args], ccs.main)


@pytest.fixture(scope="module")
def contrast(tmp_path_factory):
    """Layer 3: the planted truth; layer 5: noise only (no label signal)."""
    tmp = tmp_path_factory.mktemp("c")
    plus, minus, y, t, u = planted()
    rng = np.random.default_rng(1)
    noise = [rng.standard_normal(plus.shape) for _ in range(2)]
    lp = np.stack([(2 * y - 1) * 0.5 + rng.standard_normal(len(y)), np.zeros(len(y))], 1)
    path = write(tmp / "cache", {3: (plus, minus), 5: noise}, y, logprobs=lp)
    out = tmp / "run"
    r = run("train", "--cache", path, "--output", out, "--seed", 0, "--bootstrap", 200,
            "--visualize")
    assert r.returncode == 0, r.stderr
    return path, out, r.stdout, (plus, minus, y, t, u)


def test_train_recovers_the_planted_truth(contrast):
    path, out, stdout, (plus, minus, y, t, u) = contrast
    df = pd.read_csv(out / "eval.csv")
    assert set(df.method) == {"ccs", "ccs_signed", "lr", "lr_concat", "mean_diff", "crc_tpc",
                              "crc_tpc_signed", "random", "zero_shot", "majority"}
    assert set(df.split) == {"test"} and set(df.n) == {80} and set(df.val_n) == {80}
    at = df[df.layer == 3].set_index("method")
    for m in ("ccs", "ccs_signed", "lr", "lr_concat", "mean_diff"):
        assert at.loc[m, "accuracy"] >= 0.95, (m, at.loc[m, "accuracy"])
        assert at.loc[m, "auroc"] >= 0.97
        assert at.loc[m, "accuracy_lo"] <= at.loc[m, "accuracy"] <= at.loc[m, "accuracy_hi"]
    noise = df[df.layer == 5].set_index("method")
    assert noise.loc["lr", "accuracy"] < 0.65 and noise.loc["majority", "auroc"] == 0.5
    assert (at.loc["ccs", "orientation"] == "max(acc,1-acc)"
            and at.loc["ccs_signed", "orientation"] == "train labels")
    assert np.isfinite(at.loc["ccs", "train_loss"]) and np.isfinite(at.loc["lr", "train_loss"])
    assert ("positive class: label 1 = the plus side is the true one" in stdout
            and "max(acc, 1-acc)" in stdout)
    for f in ("layers.png", "roc.png", "hist.png"):
        assert (out / f).stat().st_size > 1000
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    # chosen on validation
    assert (summary.loc[["ccs", "lr", "mean_diff"], "layer"].astype(str) == "3").all()
    assert (df[df.chosen == 1].groupby("method").size() == 1).all()
    # zero_shot and majority have no layer: never chosen, never starred in the printed table
    assert (df[df.method.isin(["zero_shot", "majority"])].chosen == 0).all()
    lines = stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("layer "))
    cols = lines[head].split()[1:]
    for ln in lines[head + 1: head + 3]:  # layers 3 and 5
        cells = dict(zip(cols, re.findall(r"\d\.\d{3}[* ]", ln + " ")))
        assert not cells["zero_shot"].endswith("*") and not cells["majority"].endswith("*"), ln
    assert "zero_shot, majority: no layer" in stdout
    split = pd.read_csv(out / "split.csv")
    assert len(split) == 400 and split.split.value_counts().to_dict() == {
        "train": 240, "val": 80, "test": 80}


def test_probes_point_along_the_truth_not_the_distractor(contrast):
    path, out, _, (plus, minus, y, t, u) = contrast
    meta = json.load(open(out / "probes" / "mean_diff.json"))
    assert meta["fingerprint"] == "fp-A" and meta["layers"] == [3, 5] and meta["input"] == "diff"
    for m in ("lr", "mean_diff", "ccs"):
        p = load_file(str(out / "probes" / f"{m}.safetensors"))
        w = (p["w"][0] / p["std"][0, 0]).double().numpy()  # in raw units, plus side
        w /= np.linalg.norm(w)
        assert abs(w @ t) > 0.85 and abs(w @ u) < 0.1, (m, w @ t, w @ u)
        d = p["direction"][0].double().numpy()  # the saved raw-space direction: along the truth
        assert d @ t / np.linalg.norm(d) > 0.85, (m, d @ t / np.linalg.norm(d))


def test_saved_probes_record_their_layer_and_threshold(contrast):
    """Each saved probe records the layer summary.csv chose (an unsigned method's _signed row:
    the sign the probe carries) and its read-out's decision threshold: for a contrast probe's
    direction (bias 0), midway between the training classes' mean scores, computed here from
    the training rows of split.csv (true statements: label 1's plus side, label 0's minus side).
    The server's reader (llama.vectors.read_probe) reads both back."""
    from llama.vectors import read_probe

    path, out, _, (plus, minus, y, t, u) = contrast
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    train = (pd.read_csv(out / "split.csv").split == "train").to_numpy()
    true = np.concatenate([plus[train & (y == 1)], minus[train & (y == 0)]])
    false = np.concatenate([minus[train & (y == 1)], plus[train & (y == 0)]])
    for m in ("lr", "mean_diff", "ccs", "lr_concat"):
        meta = json.load(open(out / "probes" / f"{m}.json"))
        row = m + "_signed" if m == "ccs" else m
        assert meta["chosen_layer"] == int(summary.loc[row, "layer"]) == 3
        p = load_file(str(out / "probes" / f"{m}.safetensors"))
        d = p["direction"][0].double().numpy()  # layer 3
        hi, lo = (true @ d).mean(), (false @ d).mean()
        # float32 training means of states ~24000 in one dimension: 1e-5 of the score's size
        tol = 1e-5 * np.abs(true @ d).mean()
        assert float(p["read_threshold"][0]) == pytest.approx((hi + lo) / 2, abs=tol), m
        assert hi > float(p["read_threshold"][0]) > lo, m  # true statements above it
        saved = read_probe(str(out / "probes" / f"{m}.safetensors"))
        assert saved.chosen_layer == 3 and saved.kind == "direction"
        assert saved.threshold == pytest.approx(p["read_threshold"].double().numpy(), abs=1e-9)
        assert "contrast pairs" in saved.text
    assert json.load(open(out / "probes" / "majority.json"))["chosen_layer"] is None


def test_normalisation_uses_training_rows_only(tmp_path):
    plus, minus, y, t, u = planted(seed=3)
    c = ActivationCache(write(tmp_path / "c", {2: (plus, minus)}, y))
    part = data.split(y, data.groups(c), 0.25, 0.2, 0, 0)[0]
    tr, te = part.fit, np.concatenate([part.val, part.test])
    plus, minus = plus.copy(), minus.copy()
    # a held-out shift along the truth: pushes every held-out pair towards label 1
    plus[te] += 6 * t
    path = write(tmp_path / "c", {2: (plus, minus)}, y)
    r = run("train", "--cache", path, "--output", tmp_path / "r", "--methods", "mean_diff",
            "--bootstrap", 0)
    assert r.returncode == 0, r.stderr
    p = load_file(str(tmp_path / "r" / "probes" / "mean_diff.safetensors"))
    assert np.allclose(p["mean"][0, 0].numpy(), plus[tr].mean(0), rtol=1e-5, atol=1e-2)
    assert not np.allclose(p["mean"][0, 0].numpy(), plus.mean(0), rtol=1e-5, atol=1e-2)
    df = pd.read_csv(tmp_path / "r" / "eval.csv").set_index("method")
    # statistics of the held-out rows would absorb the shift and keep ~100%; training statistics
    # do not
    assert df.loc["mean_diff", "balanced_accuracy"] < 0.7 and df.loc["mean_diff", "auroc"] > 0.95


def test_metrics_match_scikit_learn_and_both_auroc_directions():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.35).astype(int)
    s = np.round(y + rng.standard_normal(300), 1)  # rounded: ties
    for sign in (1, -1):
        acc, bacc, auc = metrics(sign * s[None], 0.5, y, np.ones((1, 300)))
        pred = sign * s > 0.5
        assert acc.item() == pytest.approx(accuracy_score(y, pred))
        assert bacc.item() == pytest.approx(balanced_accuracy_score(y, pred))
        assert auc.item() == pytest.approx(roc_auc_score(y, sign * s))
        assert (auc.item() > 0.5) == (sign == 1)
    counts = rng.multinomial(300, np.full(300, 1 / 300), size=3)
    acc, bacc, auc = metrics(s[None], 0.5, y, counts)
    for b in range(3):
        idx = np.repeat(np.arange(300), counts[b])
        assert auc[b, 0].item() == pytest.approx(roc_auc_score(y[idx], s[idx]))
        assert bacc[b, 0].item() == pytest.approx(balanced_accuracy_score(y[idx], s[idx] > 0.5))


def test_logistic_regression_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 10))
    y = (x[:, 0] + 0.5 * rng.standard_normal(200) > 0).astype(int)
    f = torch.tensor(x, dtype=torch.float32)[None]
    ys = torch.tensor(2.0 * y - 1)
    theta = solvers.solve_logreg(f.transpose(1, 2).contiguous(), ys.float(), torch.ones(1, 200),
                                 torch.tensor([[0.1]]), torch.zeros(1, 1, 11), solvers.Settings())
    ref = LogisticRegression(C=0.1, tol=1e-8, max_iter=1000).fit(x, y)
    assert np.allclose(theta[0, 0, :-1].numpy(), ref.coef_[0], atol=1e-3)
    assert theta[0, 0, -1].item() == pytest.approx(ref.intercept_[0], abs=1e-3)


def test_single_prompt_cache_runs_supervised_methods_only(tmp_path):
    plus, minus, y, t, u = planted(seed=4, truth=3.0)
    types = ["testing" if v else "deployment" for v in y]
    path = save_prompt = str(tmp_path / "c")
    save_cache(path, {1: {"prompt": plus}},
               {"labels": None, "types": types, "model": {"fingerprint": "fp-A"}})
    r = run("train", "--cache", save_prompt, "--output", tmp_path / "r", "--bootstrap", 50)
    assert r.returncode == 0, r.stderr
    assert "ccs, lr_concat, crc_tpc, zero_shot need contrast pairs" in r.stderr
    df = pd.read_csv(tmp_path / "r" / "eval.csv").set_index("method")
    assert set(df.index) == {"lr", "mean_diff", "random", "majority"}
    assert df.loc["lr", "accuracy"] > 0.9 and df.loc["mean_diff", "accuracy"] > 0.9
    assert "label 1 = type 'testing'" in r.stdout


def test_labelled_single_prompts_name_the_label_as_positive_class(tmp_path):
    """Statements with a label column (true / false): label 1 is the data's label, not a type."""
    plus, minus, y, t, u = planted(seed=4, truth=3.0)
    save_cache(str(tmp_path / "c"), {1: {"prompt": plus}},
               {"labels": [int(v) for v in y], "model": {"fingerprint": "fp-A"}})
    r = run("train", "--cache", tmp_path / "c", "--output", tmp_path / "r", "--bootstrap", 50,
            "--methods", "lr")
    assert r.returncode == 0, r.stderr
    assert "label 1 = the data's label 1" in r.stdout and "testing'" not in r.stdout


def test_kfold_and_transfer(tmp_path, contrast):
    path = contrast[0]
    r = run("train", "--cache", path, "--output", tmp_path / "k", "--folds", 3,
            "--methods", "ccs,mean_diff", "--bootstrap", 0, "--layers", 3)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path / "k" / "eval.csv").set_index("method")
    assert (df.loc["ccs", "split"] == "cv3" and df.loc["ccs", "n"] == 400
            and df.loc["ccs", "accuracy"] > 0.95)
    for extra in (("--optimizer", "adam", "--steps", 300),
                  ("--hidden", 8, "--optimizer", "adam", "--steps", 500)):
        r = run("train", "--cache", path, "--output", tmp_path / "o", "--methods", "ccs",
                "--bootstrap", 0, "--layers", 3, *extra)
        assert r.returncode == 0, r.stderr
        df = pd.read_csv(tmp_path / "o" / "eval.csv").set_index("method")
        assert df.loc["ccs_signed", "accuracy"] > 0.95, extra
    plus, minus, y, t, u = contrast[3]
    other = write(tmp_path / "other",
                  {3: (plus[::2] + 0.1, minus[::2] - 0.1), 5: (plus[::2], minus[::2])}, y[::2])
    # sides swapped, labels too
    third = write(tmp_path / "third", {3: (minus, plus), 5: (plus, minus)}, 1 - y)
    r = run("transfer", "--train", path, "--test", other, "--test", third,
            "--output", tmp_path / "t", "--bootstrap", 0, "--methods", "mean_diff,zero_shot")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path / "t" / "transfer.csv")
    assert set(df.test) == {path, other, third}
    at = df[(df.layer == 3) & (df.method == "mean_diff")].set_index("test")
    assert at.loc[other, "accuracy"] > 0.9 and at.loc[other, "n"] == 200
    # swapped sides meet the other side's standardisation: a constant shift moves the threshold
    # (accuracy depends on the split), the ranking survives
    assert at.loc[third, "auroc"] > 0.95
    assert "zero_shot" not in set(df[df.test == other].method)
    bad = write(tmp_path / "bad", {3: (plus, minus), 5: (plus, minus)}, y, fingerprint="fp-B")
    one_line_error(run("transfer", "--train", path, "--test", bad, "--output", tmp_path / "t2"),
                   "another model")


def test_bad_input(tmp_path, contrast):
    path = contrast[0]
    one_line_error(run("train", "--cache", path, "--output", tmp_path / "a", "--layers", "4"),
                   "layer 4 not in cache")
    plus, minus, y, t, u = planted(n=40)
    one = write(tmp_path / "one", {1: (plus, minus)}, np.ones(40, int))
    one_line_error(run("train", "--cache", one, "--output", tmp_path / "b"), "one class only")
    one_line_error(run("train", "--cache", path, "--output", tmp_path / "c", "--test_frac", 0),
                   "empty split")
    tiny = write(tmp_path / "tiny", {1: (plus[:3], minus[:3])}, [0, 1, 1])
    one_line_error(run("train", "--cache", tiny, "--output", tmp_path / "d"), "split")
    one_line_error(run("train", "--cache", tmp_path / "nothing", "--output", tmp_path / "e"),
                   "no activation cache")
    nolp = write(tmp_path / "nolp", {1: (plus, minus)}, y)
    one_line_error(run("train", "--cache", nolp, "--output", tmp_path / "g",
                       "--methods", "zero_shot"), "log-probabilities")
    one_line_error(run("train", "--cache", path, "--output", tmp_path / "f", "--methods", "svm"),
                   "unknown method")
    assert not os.path.exists(tmp_path / "a" / "eval.csv")


def test_a_real_process_and_no_model_code(contrast, tmp_path):
    """One true subprocess: exit status and stderr as a user sees them; and the modules it loaded
    (torch.distributed comes with `import torch` itself, so it is not checked)."""
    code = ("import sys, runpy; sys.argv = ['ccs.py'] + sys.argv[1:]\n"
            "try:\n    runpy.run_path('ccs.py', run_name='__main__')\n"
            "finally:\n    bad = [m for m in ('fairscale', 'llama.model', 'llama.dist', "
            "'llama.checkpoint') if m in sys.modules]\n"
            "    assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code, "train", "--cache", contrast[0],
                        "--output", tmp_path / "a", "--layers", "3,4"],
                       capture_output=True, text=True, cwd=ROOT)
    one_line_error(r, "layer 4 not in cache")


def test_bench_naive_loop_survives_nan_and_writes_json(tmp_path):
    """A zero-variance layer makes every naive restart's loss NaN: NaN counts as the worst, not a
    crash. The whole bench on a 40-pair cache with 2 restarts x 5 steps, --json numbers included
    (under a second)."""
    from bench import bench_probes

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = torch.ones(1, 2, 40, bench_probes.D)
    part = data.split(y, np.arange(40), 0.25, 0.2, 0, 0)[0]
    tr, te = part.fit, part.test
    acc = bench_probes.naive(x, y, tr, te, [0], restarts=2, steps=3)
    assert acc.shape == (1,) and 0.5 <= acc[0] <= 1
    common = rng.standard_normal((40, bench_probes.D))
    path = write(tmp_path / "c",
                 {0: (np.ones((40, bench_probes.D)),) * 2,
                  1: (common + (2 * y - 1)[:, None], common - (2 * y - 1)[:, None])}, y)
    bench_probes.main(cache=path, threads=1, restarts=2, steps=5, json=str(tmp_path / "b.json"))
    numbers = json.load(open(tmp_path / "b.json"))
    assert set(numbers) == {"fast_s", "fast_cpu", "slow_s", "slow_cpu", "speedup_wall",
                            "speedup_cpu", "acc_fast_mean", "acc_slow_mean", "acc_fast_best",
                            "acc_slow_best"}
    assert numbers["acc_fast_best"] == 1.0 and numbers["slow_s"] > 0
