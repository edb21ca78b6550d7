import glob
import json
import os
import runpy
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file, save_file

from conftest import ROOT, in_process, one_line_error
from activations.cache import save_cache
from activations.extract import Extraction

SCRIPTS = os.path.join(ROOT, "scripts")
D = 32

pytestmark = pytest.mark.usefixtures("one_thread")


def script(name, *args):
    """Run scripts/NAME.py as `python scripts/NAME.py ARGS` would, in this process."""
    return in_process([name, *args],
                      lambda: runpy.run_path(os.path.join(SCRIPTS, name), run_name="__main__"))


def validation_cache(path, n=60, seed=0, fingerprint="fp-A", dim=D):
    """A token-"all" single-prompt cache: "testing" questions lean along t on every token but the
    first, which carries a huge outlier (like the default model's position 0). Layers 10 and 20
    hold the signal."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(dim)
    t /= np.linalg.norm(t)
    types = ["testing" if i % 3 else "deployment" for i in range(n)]
    lengths = rng.integers(2, 9, n)
    off = np.concatenate([[0], np.cumsum(lengths)])
    arrays = {}
    for l in (10, 20, 25):
        a = rng.standard_normal((off[-1], dim))
        for i, ty in enumerate(types):
            a[off[i]] += 5000 * (np.arange(dim) == 0)
            if ty == "testing" and l != 25:
                a[off[i] + 1:off[i + 1]] += 3.0 * t
        arrays[l] = {"prompt": a}
    ids = [str(100 + i) for i in range(n)]
    save_cache(str(path), arrays,
               {"ids": ids, "labels": [int(x == "testing") for x in types], "types": types,
                "model": {"fingerprint": fingerprint}}, token="all", offsets={"prompt": off})
    return str(path), t, types, ids, off, arrays


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v")
    path, t, types, ids, off, arrays = validation_cache(tmp / "cache")
    data = tmp / "validation.json"
    recs = [{"question": f"question number {i}", "type": ty, "idx": i_}
            for i, (ty, i_) in enumerate(zip(types, ids))]
    data.write_text(json.dumps(recs[::-1]))  # another order: rows are matched by id
    r = script("generate_vectors_from_cache.py", "--cache", path, "--output", tmp / "vec",
               "--layers", "10,20")
    assert r.returncode == 0, r.stderr
    (run,) = glob.glob(str(tmp / "vec_*"))
    out = tmp / "analysis"
    r2 = script("analyze_probe_from_cache.py", "--cache", path,
                "--vectors", os.path.join(run, "normalized_vectors"), "--data", data,
                "--output", out, "--visualize")
    assert r2.returncode == 0, r2.stderr
    return dict(path=path, t=t, types=types, ids=ids, off=off, arrays=arrays, run=run, out=out,
                data=data, stdout=r2.stdout)


def test_vectors_are_class_mean_differences(flow):
    for l in (10, 20):
        a, off = flow["arrays"][l]["prompt"], flow["off"]
        means = np.array([a[off[i] + 1:off[i + 1]].mean(0) for i in range(len(off) - 1)])
        testing = np.array([ty == "testing" for ty in flow["types"]])
        want = means[testing].mean(0) - means[~testing].mean(0)
        v = load_file(os.path.join(flow["run"], "vectors", f"layer_{l}.safetensors"))["vector"]
        u = load_file(os.path.join(flow["run"], "normalized_vectors",
                                   f"layer_{l}.safetensors"))["vector"]
        assert np.allclose(v, want, atol=1e-4)
        assert np.linalg.norm(u) == pytest.approx(1, abs=1e-5) and u @ flow["t"] > 0.9
    assert sorted(os.listdir(os.path.join(flow["run"], "vectors"))) == ["layer_10.safetensors",
                                                                       "layer_20.safetensors"]


def test_probe_stats_csv_and_the_users_snippet(flow):
    from sklearn.metrics import roc_auc_score

    df = pd.read_csv(flow["out"] / "probe_stats_layer20.csv")
    assert list(df.columns) == ["question_id", "question", "type", "max_score", "min_score",
                                "mean_score", "std_score"]
    # as users write it:
    auc = roc_auc_score((df['type']=='deployment').astype(int), df['mean_score'])  # noqa: E225
    # the vector points at "testing": deployment as positive scores low, as the table warns
    assert auc < 0.1
    assert df.question_id.astype(str).tolist() == flow["ids"]
    assert df.question[5] == "question number 5" and df.type.tolist() == flow["types"]
    a, off = flow["arrays"][20]["prompt"], flow["off"]
    u = load_file(os.path.join(flow["run"], "normalized_vectors",
                               "layer_20.safetensors"))["vector"]
    s = a[off[4] + 1:off[5]] @ u
    assert (df.loc[4, ["max_score", "min_score", "mean_score", "std_score"]].tolist()
            == pytest.approx([s.max(), s.min(), s.mean(), s.std()], abs=1e-4))
    assert ("positive class" in flow["stdout"] and "deployment+" in flow["stdout"]
            and "testing+" in flow["stdout"])
    line = next(x for x in flow["stdout"].splitlines() if x.split()[:1] == ["20"])
    # the intended orientation (the vectors' plus side: testing) comes first, then deployment+
    assert (float(line.split()[3]) == pytest.approx(auc, abs=1e-3)
            and float(line.split()[2]) == pytest.approx(1 - auc, abs=1e-3))
    assert ((flow["out"] / "auroc_by_layer.png").exists()
            and (flow["out"] / "scores_by_type.png").exists())


def test_contrast_vectors_take_the_sign_of_the_label(tmp_path):
    rng = np.random.default_rng(0)
    n, t = 80, np.eye(D)[3]
    y = np.arange(n) % 2
    common = rng.standard_normal((n, D))
    plus = common + (2 * y - 1)[:, None] * t
    minus = common - (2 * y - 1)[:, None] * t
    save_cache(str(tmp_path / "c"), {4: {"plus": plus, "minus": minus}},
               {"labels": y.tolist(), "model": {"fingerprint": "x"}})
    r = script("generate_vectors_from_cache.py", "--cache", tmp_path / "c",
               "--output", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    (run,) = glob.glob(str(tmp_path / "v_*"))
    v = load_file(os.path.join(run, "vectors", "layer_4.safetensors"))["vector"]
    assert (np.allclose(v, ((2 * y - 1)[:, None] * (plus - minus)).mean(0), atol=1e-5)
            and v[3] == pytest.approx(2, abs=1e-5))


def test_bad_vectors_and_layers(flow, tmp_path):
    path, vec = flow["path"], os.path.join(flow["run"], "normalized_vectors")
    other, *_ = validation_cache(tmp_path / "other", n=12, fingerprint="fp-B")
    one_line_error(script("analyze_probe_from_cache.py", "--cache", other, "--vectors", vec,
                          "--output", tmp_path / "a"), "another model")
    small = tmp_path / "small"
    small.mkdir()
    save_file({"vector": np.ones(D + 1, np.float32)}, str(small / "layer_10.safetensors"),
              metadata={"fingerprint": "fp-A"})
    one_line_error(script("analyze_probe_from_cache.py", "--cache", path, "--vectors", small,
                          "--output", tmp_path / "b"), "hidden size 32")
    one_line_error(script("generate_vectors_from_cache.py", "--cache", path,
                          "--output", tmp_path / "c", "--layers", 7), "layer 7 not in cache")
    one_line_error(script("analyze_probe_from_cache.py", "--cache", path, "--vectors", vec,
                          "--output", tmp_path / "d", "--layers", 25), "layer 25: no vector")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"question": "q", "type": "testing", "idx": "999"}]))
    one_line_error(script("analyze_probe_from_cache.py", "--cache", path, "--vectors", vec,
                          "--output", tmp_path / "e", "--data", wrong), "no row for cache id")
    one_class = tmp_path / "one"
    save_cache(str(one_class), {1: {"prompt": np.ones((5, D))}},
               {"labels": [1] * 5, "model": {"fingerprint": "fp-A"}})
    one_line_error(script("generate_vectors_from_cache.py", "--cache", one_class,
                          "--output", tmp_path / "f"), "one class only")
    # and once as a real process, from another directory
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "analyze_probe_from_cache.py"),
                        "--cache", path, "--vectors", small, "--output", tmp_path / "g"],
                       capture_output=True, text=True, cwd=tmp_path)
    one_line_error(r, "hidden size 32")


def test_extracting_scripts_run_extraction_then_the_cached_flow(flow, tmp_path, monkeypatch):
    calls = []

    def run(cfg):
        calls.append(cfg)
        validation_cache(cfg.output)
        return cfg.output

    fake = types.SimpleNamespace(run=run, Extraction=Extraction)
    monkeypatch.setitem(sys.modules, "activations.extract", fake)
    r = script("generate_vectors.py", "--model", "m.gguf", "--data", flow["data"], "--output",
               tmp_path / "g", "--layers", "10,20")
    assert r.returncode == 0, r.stderr
    assert calls[-1] == Extraction(model="m.gguf", data=str(flow["data"]),
                                   output=f"{tmp_path / 'g'}_cache", layers="10,20", token="all",
                                   dtype="float32")
    (run_dir,) = glob.glob(str(tmp_path / "g_2*"))
    vec = os.path.join(run_dir, "normalized_vectors")
    assert len(os.listdir(vec)) == 3
    r = script("analyze_probe.py", "--model", "m.gguf", "--vectors", vec, "--data", flow["data"],
               "--output", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    assert calls[-1].layers == "10,20,25" and calls[-1].token == "all"
    assert (tmp_path / "a" / "probe_stats_layer25.csv").exists()


def test_direct_and_cached_routes_give_the_same_probe_stats(tmp_path, monkeypatch):
    """On a real (tiny) model: cache_activations.py -> generate_vectors_from_cache.py ->
    analyze_probe_from_cache.py with their defaults writes the very probe_stats that
    generate_vectors.py -> analyze_probe.py do, per-token statistics included."""
    import llama.dist
    import tiny

    monkeypatch.setattr(llama.dist, "teardown", lambda: None)  # the group serves other tests
    model = tiny.make_hf(tmp_path / "m", "gqa")
    words = ["apple", "stone", "river", "blue", "seven", "sky"]
    recs = [{"question": " ".join(words[(i * k) % 6] for k in range(2 + i % 5)), "idx": f"q{i}",
             "type": "testing" if i % 2 else "deployment"} for i in range(12)]
    data = tmp_path / "validation.json"
    data.write_text(json.dumps(recs))
    steps = [("cache_activations.py", "--model", model, "--data", data, "--output",
              tmp_path / "cache", "--layers", "1,3"),
             ("generate_vectors_from_cache.py", "--cache", tmp_path / "cache", "--output",
              tmp_path / "cached"),
             ("generate_vectors.py", "--model", model, "--data", data, "--output",
              tmp_path / "direct", "--layers", "1,3")]
    for step in steps:
        r = script(*step)
        assert r.returncode == 0, r.stderr
    for route in ("cached", "direct"):
        (run,) = glob.glob(str(tmp_path / f"{route}_2*"))
        vec = os.path.join(run, "normalized_vectors")
        args = ("--vectors", vec, "--data", data, "--output", tmp_path / f"stats_{route}")
        if route == "cached":
            r = script("analyze_probe_from_cache.py", "--cache", tmp_path / "cache", *args)
        else:
            r = script("analyze_probe.py", "--model", model, *args)
        assert r.returncode == 0, r.stderr
        assert "warning" not in r.stderr
    for layer in (1, 3):
        a, b = (pd.read_csv(tmp_path / f"stats_{route}" / f"probe_stats_layer{layer}.csv")
                for route in ("cached", "direct"))
        pd.testing.assert_frame_equal(a, b, rtol=1e-6)
        assert (a.max_score > a.min_score).all() and (a.std_score > 0).all()  # per token


def test_one_vector_cache_warns_and_missing_vectors_name_the_runs(flow, tmp_path):
    last = tmp_path / "last"
    rng = np.random.default_rng(1)
    save_cache(str(last), {10: {"prompt": rng.standard_normal((6, D))}},
               {"types": ["testing", "deployment"] * 3, "labels": [1, 0] * 3,
                "model": {"fingerprint": "fp-A"}})
    vec = os.path.join(flow["run"], "normalized_vectors")
    r = script("analyze_probe_from_cache.py", "--cache", last, "--vectors", vec, "--output",
               tmp_path / "o", "--layers", 10)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("warning: cache") and "--token all" in r.stderr
    assert "one vector per prompt (token last)" in r.stderr
    name = flow["run"].rsplit("_", 2)[0]  # what the user gave generate_vectors_from_cache.py
    one_line_error(script("analyze_probe_from_cache.py", "--cache", flow["path"], "--vectors",
                          os.path.join(name, "normalized_vectors"), "--output", tmp_path / "p"),
                   f"no vectors folder {name}/normalized_vectors", f"did you mean {vec}?")
