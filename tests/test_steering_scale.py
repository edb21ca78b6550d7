"""The steering sweep's read-outs (steering/): the residual scale and push, the letter
diagnostics, the capability cost, checked against a transformers forward with a hook on tiny
random models; one-label contrast caches; vector metadata."""
import csv
import json
import os
import runpy

import numpy as np
import pytest
import torch
from conftest import ROOT, in_process
from safetensors.numpy import save_file
from tiny import hf_model, make_hf

SCRIPTS = os.path.join(ROOT, "scripts")
TOL = 2e-4  # float32 forwards of different batch shapes and libraries agree to ~1e-5 relative


def run_script(name, *argv):
    return in_process([name, *map(str, argv)],
                      lambda: runpy.run_path(os.path.join(SCRIPTS, name), run_name="__main__"))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def hooked(hf, layer, vector):
    """A forward hook adding `vector` to the output of decoder block `layer` (our layer L is the
    output of block L, Hugging Face hidden_states[L], block index L - 1)."""
    def hook(module, args, out):
        if isinstance(out, tuple):
            return (out[0] + vector,) + tuple(out[1:])
        return out + vector
    return hf.model.layers[layer - 1].register_forward_hook(hook)


def hf_two_way(hf, ids, pair, layer=None, vector=None):
    handle = hooked(hf, layer, vector) if vector is not None else None
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
    finally:
        if handle:
            handle.remove()
    return torch.softmax(logits[pair].double(), -1).numpy()


def hf_residual_norm(hf, prompts, layer):
    """Mean |h| at `layer` over every position but 0, pooled over the prompts."""
    norms = []
    with torch.no_grad():
        for ids in prompts:
            h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
            norms.append(h[1:].norm(dim=-1))
    return float(torch.cat(norms).mean())


def hf_nll(hf, ids, layer=None, vector=None):
    handle = hooked(hf, layer, vector) if vector is not None else None
    try:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()
    finally:
        if handle:
            handle.remove()
    logp = torch.log_softmax(logits[:-1], -1)
    return float(-logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum()), len(ids) - 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny gqa model (3 blocks, dim 64), a random vector at layers 1 and 2, A/B items with
    both letters as the positive option, and capability texts."""
    base = tmp_path_factory.mktemp("tinysteer")
    model = make_hf(base / "m", "gqa")
    rng = np.random.default_rng(3)
    os.makedirs(base / "run" / "vectors")
    for l in (1, 2):
        save_file({"vector": rng.normal(size=64).astype(np.float32)},
                  str(base / "run" / "vectors" / f"layer_{l}.safetensors"),
                  metadata={"layer": str(l)})
    items = [{"question": f"Is {w} a colour?\n(A) yes\n(B) no", "positive": p,
              "negative": "(B)" if p == "(A)" else "(A)"}
             for w, p in (("red", "(A)"), ("stone", "(B)"), ("blue", "(B)"), ("sand", "(A)"))]
    (base / "ab.json").write_text(json.dumps(items))
    (base / "texts.json").write_text(json.dumps(["a plain line of text.", "one two three."]))
    return model, base


def tiny_prompts(model, items_path):
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(model, "tokenizer.json"))
    out = []
    for r in json.load(open(items_path)):
        text = r["question"] + "\n\nAnswer: ("  # no chat format: the plain cue
        ids = tok.encode(text, bos=True)
        letter = r["positive"][1]
        a, b = tok.encode("A")[0], tok.encode("B")[0]
        out.append((ids, [a, b] if letter == "A" else [b, a], letter))
    return tok, out


def test_residual_scale_push_letters_and_cost_match_a_hook(tiny, tmp_path):
    model, base = tiny
    out = tmp_path / "sweep"
    r = run_script("steer.py", "--model", model, "--data", base / "ab.json", "--vectors",
                   base / "run", "--layers", "1,2", "--multipliers=-1,0,0.5", "--scale",
                   "residual", "--capability", base / "texts.json", "--output", out)
    assert r.returncode == 0, r.stderr
    assert "multiplier 1 = push 1 of the residual norm" in r.stdout
    rows = read_csv(out / "steering.csv")
    items = read_csv(out / "items.csv")
    hf = hf_model(model)
    tok, prompts = tiny_prompts(model, base / "ab.json")
    from llama.steering import load_vectors

    vecs = load_vectors(str(base / "run"), [1, 2], 64, 3)
    texts = [tok.encode(t, bos=True) for t in json.load(open(base / "texts.json"))]
    base_nll = [hf_nll(hf, ids) for ids in texts]
    for layer in (1, 2):
        resid = hf_residual_norm(hf, [p[0] for p in prompts], layer)
        unit = vecs[layer] / vecs[layer].norm()
        for m in (-1.0, 0.0, 0.5):
            row = next(x for x in rows if x["layer"] == str(layer) and float(x["multiplier"]) == m)
            # multiplier 1 adds a vector as long as the measured residual norm
            assert float(row["residual_norm"]) == pytest.approx(resid, rel=TOL)
            assert float(row["vector_norm"]) == pytest.approx(resid, rel=TOL)
            assert float(row["push"]) == pytest.approx(abs(m), rel=TOL)
            added = m * resid * unit
            want = [hf_two_way(hf, ids, pair, layer, added) for ids, pair, _ in prompts]
            got = [x for x in items if x["layer"] == str(layer) and float(x["multiplier"]) == m]
            for i, (w, g) in enumerate(zip(want, got)):
                assert float(g["p_positive"]) == pytest.approx(w[0], abs=TOL)
                p_a = w[0] if prompts[i][2] == "A" else w[1]
                assert float(g["p_a"]) == pytest.approx(p_a, abs=TOL)
            # the per-setting means, recomputed from items.csv
            p_pos = np.array([float(g["p_positive"]) for g in got])
            is_a = np.array([g["positive"] == "A" for g in got])
            assert float(row["p_positive"]) == pytest.approx(p_pos.mean(), abs=1e-6)
            assert float(row["p_a"]) == pytest.approx(
                np.mean([float(g["p_a"]) for g in got]), abs=1e-6)
            assert float(row["p_positive_when_a"]) == pytest.approx(p_pos[is_a].mean(), abs=1e-6)
            assert float(row["p_positive_when_b"]) == pytest.approx(p_pos[~is_a].mean(),
                                                                    abs=1e-6)
            steered = [hf_nll(hf, ids, layer, added) for ids in texts]
            count = sum(c for _, c in steered)
            delta = (sum(s for s, _ in steered) - sum(s for s, _ in base_nll)) / count
            assert float(row["nll_delta"]) == pytest.approx(delta, abs=TOL)
        assert abs(float(next(x for x in rows if x["layer"] == str(layer)
                                and float(x["multiplier"]) == -1)["nll_delta"])) > 1e-3


def test_raw_scale_push_and_the_weak_push_warning(tiny, tmp_path):
    model, base = tiny
    out = tmp_path / "raw"
    r = run_script("steer.py", "--model", model, "--data", base / "ab.json", "--vectors",
                   base / "run", "--layers", "2", "--multipliers=-0.001,0.001", "--capability",
                   "none", "--output", out)
    assert r.returncode == 0, r.stderr
    hf = hf_model(model)
    _, prompts = tiny_prompts(model, base / "ab.json")
    from llama.steering import load_vectors

    vec = load_vectors(str(base / "run"), [2], 64, 3)[2]
    resid = hf_residual_norm(hf, [p[0] for p in prompts], 2)
    rows = read_csv(out / "steering.csv")
    for row in rows[1:]:
        assert float(row["vector_norm"]) == pytest.approx(float(vec.norm()), rel=1e-5)
        assert float(row["push"]) == pytest.approx(0.001 * float(vec.norm()) / resid, rel=TOL)
        assert row["nll_delta"] == ""
    push = 0.001 * float(vec.norm()) / resid
    assert push < 0.1
    assert f"layer 2: the largest multiplier pushes {push:.0%} of the residual norm" in r.stdout


def test_a_letter_vector_is_called_a_letter_effect(tiny, tmp_path):
    """A vector built to favour the letter A (at the last block's output, the direction that
    raises logit(A) - logit(B) through the final norm and output layer) moves p_a across the
    multipliers while the letter-balanced p_positive stays: the summary says so."""
    model, base = tiny
    hf = hf_model(model)
    tok, _ = tiny_prompts(model, base / "ab.json")
    a, b = tok.encode("A")[0], tok.encode("B")[0]
    head, gain = hf.lm_head.weight.detach(), hf.model.norm.weight.detach()
    letter = ((head[a] - head[b]) * gain).numpy().astype(np.float32)
    np.save(tmp_path / "letter.npy", letter)
    out = tmp_path / "letter"
    r = run_script("steer.py", "--model", model, "--data", base / "ab.json", "--vectors",
                   tmp_path / "letter.npy", "--layers", "3", "--multipliers=-2,0,2", "--scale",
                   "residual", "--capability", "none", "--output", out)
    assert r.returncode == 0, r.stderr
    rows = read_csv(out / "steering.csv")
    p_a = [float(x["p_a"]) for x in rows[1:]]
    assert p_a[0] < p_a[1] < p_a[2]  # the built direction favours A
    assert "layer 3: the vector moves the letter, not the behaviour" in r.stdout
    # and a vector that does not single out a letter is not called one
    out2 = tmp_path / "random"
    r = run_script("steer.py", "--model", model, "--data", base / "ab.json", "--vectors",
                   base / "run", "--layers", "1", "--multipliers=0,0.001", "--capability",
                   "none", "--output", out2)
    assert r.returncode == 0, r.stderr
    assert "moves the letter" not in r.stdout
