"""Steering vectors from disk (llama/vectors.py), the llama.cpp control-vector export, and
scripts/steer.py end to end on SmolLM2 with vectors from the evaluation-awareness contrast set."""
import csv
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED, in_process, one_line_error
from safetensors.numpy import save_file
from tiny import make_hf

from llama.errors import LlamaError
from llama.vectors import load_vectors, probe_directions

SCRIPTS = os.path.join(ROOT, "scripts")
CONTRAST = os.path.join(SHARED, "eval_awareness", "contrastive_dataset.json")


def run_script(name, *argv):
    return in_process([name, *map(str, argv)],
                      lambda: runpy.run_path(os.path.join(SCRIPTS, name), run_name="__main__"))


def vectors_folder(path, layers, dim, fingerprint="abc"):
    os.makedirs(path / "vectors", exist_ok=True)
    rng = np.random.default_rng(0)
    for l in layers:
        save_file({"vector": rng.normal(size=dim).astype(np.float32)},
                  str(path / "vectors" / f"layer_{l}.safetensors"),
                  metadata={"layer": str(l), "fingerprint": fingerprint})
    return path


def test_vector_sources_and_refusals(tmp_path):
    run = vectors_folder(tmp_path / "run", [1, 2], 64)
    got = load_vectors(run, [2], 64, 3, "abc")
    assert list(got) == [2] and got[2].shape == (64,)
    assert list(load_vectors(run / "vectors", None, 64, 3)) == [1, 2]
    np.save(tmp_path / "v.npy", np.ones(64, np.float32))
    assert torch.equal(load_vectors(str(tmp_path / "v.npy"), [3], 64, 3)[3], torch.ones(64))
    cases = [
        (lambda: load_vectors(run, [2], 32, 3, "abc"), "width 64"),
        (lambda: load_vectors(run, [3], 64, 3, "abc"), "no vector for layer 3"),
        (lambda: load_vectors(run, [9], 64, 3, "abc"), "layer 9 is not in the model"),
        (lambda: load_vectors(run, [2], 64, 3, "other"), "another model"),
        (lambda: load_vectors(str(tmp_path / "v.npy"), None, 64, 3), "needs the layer"),
        (lambda: load_vectors(str(tmp_path / "nope"), [1], 64, 3), "no such"),
    ]
    for call, words in cases:
        with pytest.raises(LlamaError, match=words):
            call()


@pytest.mark.parametrize("sides,inp", [(1, "prompt"), (2, "diff"), (2, "concat")])
def test_probe_direction_in_raw_space(tmp_path, sides, inp):
    """The raw-space direction reproduces the probe's score differences on raw activations."""
    rng = np.random.default_rng(1)
    L, d = 2, 16
    mean = rng.normal(size=(L, sides, d)).astype(np.float32)
    std = rng.uniform(0.5, 3, size=(L, sides, d)).astype(np.float32)
    w = rng.normal(size=(L, 2 * d if inp == "concat" else d)).astype(np.float32)
    sign = np.array([1.0, -1.0], np.float32)
    path = str(tmp_path / "lr.safetensors")
    save_file({"w": w, "b": np.zeros(L, np.float32), "sign": sign, "mean": mean, "std": std,
               "layers": np.array([4, 7])}, path)
    with open(tmp_path / "lr.json", "w") as f:
        json.dump({"method": "lr", "input": inp, "fingerprint": "abc"}, f)
    dirs, _ = probe_directions(path)
    for i, layer in enumerate((4, 7)):
        def score(x):  # x [sides, d] raw activations -> the oriented probe score
            z = (x - mean[i]) / std[i]
            feats = np.concatenate([z[0], z[-1]]) if inp == "concat" else z[0] - z[-1]
            return sign[i] * ((z[0] if inp == "prompt" else feats) @ w[i])

        x, shift = rng.normal(size=(sides, d)), rng.normal(size=d)
        moved = [x.copy() for _ in range(sides)]
        for s in range(sides):
            moved[s][s] += shift  # one side moved along `shift`
        gain = [score(m) - score(x) for m in moved]
        want = gain[0] if sides == 1 else (gain[0] - gain[1]) / 2
        assert np.isclose(dirs[layer] @ shift, want, rtol=1e-4)
    assert list(load_vectors(path, [7], d, 30, "abc")) == [7]
    with pytest.raises(LlamaError, match="another model"):
        load_vectors(path, [7], d, 30, "xyz")


def test_control_vector_gguf_reads_back(tmp_path):
    import gguf

    model = make_hf(tmp_path / "m", "gqa")  # 3 blocks, dim 64
    run = vectors_folder(tmp_path / "run", [2, 3], 64, fingerprint="")
    out = tmp_path / "cv.gguf"
    r = run_script("export_control_vector.py", "--model", model, "--vectors", run, "--output", out,
                   "--multiplier", 2.0)
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]  # layer L -> direction.{L-1}
    want = load_vectors(run, None, 64, 3)
    for layer, name in ((2, "direction.1"), (3, "direction.2")):
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [64]
        np.testing.assert_allclose(np.asarray(t.data), 2.0 * want[layer].numpy())
    bad = vectors_folder(tmp_path / "bad", [1], 64, fingerprint="")
    one_line_error(run_script("export_control_vector.py", "--model", model, "--vectors", bad,
                              "--output", tmp_path / "x.gguf"), "layer 1")
    one_line_error(run_script("export_control_vector.py", "--model", model, "--vectors", run,
                              "--layers", "7", "--output", tmp_path / "x.gguf"), "layer 7")
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def smol_vectors(tmp_path_factory):
    """Contrast vectors of SmolLM2 at layers 8 and 14 from the first 16 items of the
    evaluation-awareness contrast set: generate_dataset.py -> cache_activations.py ->
    generate_vectors_from_cache.py. Returns (model path, run folder, held-out items file)."""
    from llama.gguf import default_model_path

    base = tmp_path_factory.mktemp("smolsteer")
    items = json.load(open(CONTRAST))
    (base / "train.json").write_text(json.dumps(items[:16]))
    (base / "heldout.json").write_text(json.dumps(items[-4:]))
    model = str(default_model_path())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    steps = [[os.path.join(ROOT, "generate_dataset.py"), base / "train.csv", "--input",
              base / "train.json", "--format", "ab", "--chat", "chatml"],
             [os.path.join(SCRIPTS, "cache_activations.py"), "--model", model, "--data",
              base / "train.csv", "--output", base / "cache", "--layers", "8,14",
              "--token", "last", "--device", "cpu"],
             [os.path.join(SCRIPTS, "generate_vectors_from_cache.py"), "--cache", base / "cache",
              "--output", base / "ea"]]
    for step in steps:
        p = subprocess.run([sys.executable, *map(str, step)], capture_output=True, text=True,
                           env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    run = [d for d in os.listdir(base) if d.startswith("ea_")]
    return model, str(base / run[0]), str(base / "heldout.json")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.heavy  # the whole sweep on the real model, capability pass included: make test-heavy
def test_steer_end_to_end_on_smollm2(smol_vectors, tmp_path, shared_smollm2):
    model, run, heldout = smol_vectors
    out = tmp_path / "sweep"
    r = run_script("steer.py", "--model", model, "--data", heldout, "--vectors", run,
                   "--layers", "8,14", "--multipliers=-4,0,4", "--output", out, "--chat", "chatml",
                   "--samples", 1,
                   "--max_gen_len", 4, "--visualize")
    assert r.returncode == 0, r.stderr
    rows = read_csv(out / "steering.csv")
    assert [(x["layer"], float(x["multiplier"])) for x in rows] == [
        ("none", 0.0), ("8", -4.0), ("8", 0.0), ("8", 4.0), ("14", -4.0), ("14", 0.0), ("14", 4.0)]
    base = rows[0]
    for x in rows:
        assert int(x["n"]) == 4
        assert float(x["p_positive_lo"]) <= float(x["p_positive"]) <= float(x["p_positive_hi"])
        assert x["answer_matches_positive"] != ""  # the first item was sampled everywhere
        if float(x["multiplier"]) == 0:
            # multiplier 0 and the unsteered baseline run in batches of other shapes (M rows vs
            # 1), so BLAS sums in another order: equal to ~1e-6, not to the printed digits
            assert float(x["p_positive"]) == pytest.approx(float(base["p_positive"]), abs=1e-5)
    assert max(abs(float(x["p_positive"]) - float(base["p_positive"])) for x in rows
               if x["layer"] == "8") > 1e-4
    items = read_csv(out / "items.csv")
    assert len(items) == 4 + 4 * 2 * 3
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 3 + 1 and all(s["completion"].startswith("(") for s in samples)
    assert (out / "steering.png").stat().st_size > 1000

    # the shared prefix is exact: item 0 at layer 14, multiplier 4, recomputed in one full forward
    from llama.model import Steer
    from llama.vectors import load_vectors
    from llama.tokenizer import format_chat, load_tokenizer

    lm = shared_smollm2  # the model steer.py ran on, loaded once for the session
    tok = load_tokenizer(lm.tokenizer_path)
    item = json.load(open(heldout))[0]
    ids = torch.tensor([tok.encode(format_chat("chatml", item["question"], answer="("))])
    vec = load_vectors(run, [14], 576, 30)
    logits = lm.model(ids, layers=[], logits=True, steer=Steer(vec, 4.0))["logits"][0, -1]
    ab = torch.softmax(logits[[tok.encode("A")[0], tok.encode("B")[0]]].double(), -1)
    want = float(ab["AB".index(item["positive"][1])])
    got = [float(x["p_positive"]) for x in items
           if x["idx"] == "0" and x["layer"] == "14" and float(x["multiplier"]) == 4.0]
    assert got == [pytest.approx(want, abs=1e-4)]

    # only the reply steered: the prompt's keys and values shared, "(" and after steered
    out2 = tmp_path / "gen"
    r = run_script("steer.py", "--model", model, "--data", heldout, "--vectors", run,
                   "--layers", "14", "--multipliers=0,4", "--output", out2, "--limit", 2,
                   "--chat", "chatml",
                   "--positions", "generated", "--report")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"wrote {out2 / 'report.html'}"
    assert 'data-plot="steering-p_positive"' in (out2 / "report.html").read_text()
    rows = read_csv(out2 / "steering.csv")
    # the baseline and multiplier 0 run in batches of other shapes: equal up to BLAS rounding
    # (bit-identity at equal shapes is test_generation's multiplier-zero test)
    p_none, p_zero, p_four = (float(x["p_positive"]) for x in rows[:3])
    assert p_zero == pytest.approx(p_none, abs=1e-5) and abs(p_four - p_none) > 2e-5
    plain = lm.model(ids, layers=[], logits=True,
                     steer=Steer(vec, 4.0, positions="generated"),
                     prompt_len=torch.tensor([ids.shape[1] - 1]))["logits"][0, -1]
    ab = torch.softmax(plain[[tok.encode("A")[0], tok.encode("B")[0]]].double(), -1)
    got = [float(x["p_positive"]) for x in read_csv(out2 / "items.csv")
           if x["idx"] == "0" and x["layer"] == "14" and float(x["multiplier"]) == 4.0]
    assert got == [pytest.approx(float(ab["AB".index(item["positive"][1])]), abs=1e-4)]


def after_bars(r):
    """r with the GGUF reader's progress bar (carriage-return lines, erased when done) dropped
    from stderr: what a terminal shows once the command has exited."""
    last = r.stderr.rsplit("\r", 1)[-1]
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, last)


def test_steer_refuses_bad_input(shared_smollm2, tmp_path):
    """Each refusal in one line, nothing written; vectors of SmolLM2's width and fingerprint
    (made up: the refusals do not depend on their values) on held-out contrast items."""
    from llama.gguf import default_model_path

    model = str(default_model_path())
    run = vectors_folder(tmp_path / "run", [8, 14], 576, fingerprint=shared_smollm2.fingerprint)
    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps(json.load(open(CONTRAST))[-4:]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "positive": "(A)"}]))
    wrong = tmp_path / "wrong"
    vectors_folder(wrong, [8], 100, fingerprint="")
    other = tmp_path / "other"
    vectors_folder(other, [8], 576, fingerprint="0123456789abcdef")
    cases = [
        (("--data", bad, "--vectors", run, "--layers", 8), ("row 0", "negative")),
        (("--data", heldout, "--vectors", run, "--layers", 9), ("no vector for layer 9",)),
        (("--data", heldout, "--vectors", run, "--layers", 31), ("layer 31",)),
        (("--data", heldout, "--vectors", wrong, "--layers", 8), ("width 100",)),
        (("--data", heldout, "--vectors", other, "--layers", 8), ("another model",)),
        (("--data", heldout, "--vectors", run, "--layers", 8, "--positions", "some"),
         ("--positions",)),
    ]
    for argv, words in cases:
        r = run_script("steer.py", "--model", model, *argv, "--output", tmp_path / "o")
        one_line_error(after_bars(r), *words)
        assert not (tmp_path / "o" / "steering.csv").exists()


def test_extraction_of_a_steered_model(tmp_path, dist1):
    """--steer in extraction: the cache holds the steered model's states (prefix sharing
    included: the contrast pairs share their question), and records the steering."""
    from llama.checkpoint import load_model
    from activations.extract import Extraction, run
    from llama.model import Steer
    from llama.tokenizer import load_tokenizer

    model = make_hf(tmp_path / "m", "gqa")
    lm = load_model(model, dist1)
    rows = [("blue sky river", "yes", "no"), ("seven stones in a row", "true", "false")]
    data = tmp_path / "pairs.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "plus_prompt", "minus_prompt", "label"])
        w.writerows([i, f"{q}? {a}", f"{q}? {b}", i % 2] for i, (q, a, b) in enumerate(rows))
    run_dir = vectors_folder(tmp_path / "run", [1], 64, fingerprint=lm.fingerprint)
    steered = run(Extraction(model, str(data), str(tmp_path / "c1"), layers="1,3",
                             steer=str(run_dir), steer_layers="1", multiplier=3.0), lm)
    plain = run(Extraction(model, str(data), str(tmp_path / "c0"), layers="1,3"), lm)
    with pytest.raises(LlamaError, match="go together"):
        run(Extraction(model, str(data), str(tmp_path / "c2"), steer=str(run_dir)), lm)
    from activations.cache import ActivationCache

    got, base = ActivationCache(steered), ActivationCache(plain)
    tok = load_tokenizer(lm.tokenizer_path)
    vec = load_vectors(run_dir, [1], 64, 3)
    for i, (q, a, _) in enumerate(rows):
        ids = torch.tensor([tok.encode(f"{q}? {a}", bos=True)])
        want = lm.model(ids, layers=[3], steer=Steer(vec, 3.0))[3][0, -1]
        np.testing.assert_allclose(got.array(3, "plus")[i], want.numpy(), atol=1e-5)
    assert not np.allclose(got.array(3, "plus"), base.array(3, "plus"), atol=1e-3)
    np.testing.assert_allclose(got.array(1, "minus"),
                               base.array(1, "minus") + 3.0 * vec[1].numpy(), atol=1e-5)


def test_vectors_from_a_trained_probe(tmp_path):
    """ccs.py train on a cache with a planted truth direction and unequal feature scales: the
    saved probe's raw-space direction (read by load_vectors) is the one that raises its score,
    the discriminant truth / scale (noise variance scale^2), not the standardised w itself."""
    from activations.cache import save_cache

    rng = np.random.default_rng(0)
    n, dim = 200, 32
    y = rng.integers(0, 2, n)
    truth = rng.standard_normal(dim)
    scale = rng.uniform(0.5, 5.0, dim)  # unequal feature scales: standardisation matters
    arrays = {}
    for layer in range(2):
        common = rng.standard_normal((n, dim))
        arrays[layer] = {s: (common + sgn * np.outer(2 * y - 1, truth) * 0.3
                             + 0.3 * rng.standard_normal((n, dim))) * scale
                         for s, sgn in (("plus", 1), ("minus", -1))}
    save_cache(str(tmp_path / "cache"), arrays, {"labels": y.tolist(),
                                                 "model": {"fingerprint": "synthetic"}})
    r = run_script(os.path.join("..", "ccs.py"), "train", "--cache", tmp_path / "cache",
                   "--output", tmp_path / "run", "--methods", "lr,ccs")
    assert r.returncode == 0, r.stderr
    raw_truth = truth / scale  # Sigma^-1 (mean difference) with Sigma ~ diag(scale^2)
    for method in ("lr", "ccs"):
        probe = str(tmp_path / "run" / "probes" / f"{method}.safetensors")
        vec = load_vectors(probe, [1], dim, 1, "synthetic")[1].numpy()
        cos = vec @ raw_truth / np.linalg.norm(vec) / np.linalg.norm(raw_truth)
        assert abs(cos) > (0.9 if method == "lr" else 0.6), (method, cos)  # vs ~0.2 at random
        if method == "lr":
            assert cos > 0  # oriented: toward the true side
