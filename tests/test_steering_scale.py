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
from conftest import ROOT, in_process, table_rows
from safetensors.numpy import save_file
from tiny import hf_model, make_hf

SCRIPTS = os.path.join(ROOT, "scripts")
RECORDED = 0.3  # the tiny fixture's layer 2 residual_norm (its own, measured ~0.18)
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


def hf_unit_norms(hf, model):
    """Scale residual's unit per layer (steering.scale.unit_norms): layer 1 of the tiny vectors
    records none, so the neutral built-in prompts' mean |h|; layer 2 its RECORDED one."""
    from llama.generation import BUILTIN_PROMPTS
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(model, "tokenizer.json"))
    neutral = [tok.encode(t, bos=True) for t in BUILTIN_PROMPTS]
    return {1: hf_residual_norm(hf, neutral, 1), 2: RECORDED}


def printed_units(text):
    """{layer: unit} from steering.scale.describe's lines."""
    import re

    return {int(m[0]): (float(m[1]), m[2]) for m in
            re.findall(r"layer +(\d+) .*; unit ([0-9.e+-]+) \(([a-z ]+)\)", text)}


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
    """A tiny gqa model (3 blocks, dim 64), a random vector at layers 1 and 2 (layer 2 records
    a residual_norm, RECORDED; layer 1 none), A/B items with both letters as the positive option,
    and capability texts."""
    base = tmp_path_factory.mktemp("tinysteer")
    model = make_hf(base / "m", "gqa")
    rng = np.random.default_rng(3)
    os.makedirs(base / "run" / "vectors")
    for l in (1, 2):
        meta = {"layer": str(l)} if l == 1 else {"layer": str(l), "residual_norm": str(RECORDED)}
        save_file({"vector": rng.normal(size=64).astype(np.float32)},
                  str(base / "run" / "vectors" / f"layer_{l}.safetensors"), metadata=meta)
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
    rows = read_csv(out / "steering.csv")
    items = read_csv(out / "items.csv")
    hf = hf_model(model)
    units = hf_unit_norms(hf, model)
    shown = printed_units(r.stdout)
    assert shown[2] == (pytest.approx(RECORDED, rel=1e-9), "recorded")
    assert shown[1][1] == "neutral prompts" and shown[1][0] == pytest.approx(units[1], rel=TOL)
    tok, prompts = tiny_prompts(model, base / "ab.json")
    from llama.vectors import load_vectors

    vecs = load_vectors(str(base / "run"), [1, 2], 64, 3)
    texts = [tok.encode(t, bos=True) for t in json.load(open(base / "texts.json"))]
    base_nll = [hf_nll(hf, ids) for ids in texts]
    for layer in (1, 2):
        resid = hf_residual_norm(hf, [p[0] for p in prompts], layer)
        unit = vecs[layer] / vecs[layer].norm()
        for m in (-1.0, 0.0, 0.5):
            row = next(x for x in rows if x["layer"] == str(layer) and float(x["multiplier"]) == m)
            # multiplier 1 adds a vector as long as the unit (recorded, else neutral prompts');
            # the push is measured against the residual norm of these items
            assert float(row["residual_norm"]) == pytest.approx(resid, rel=TOL)
            assert float(row["vector_norm"]) == pytest.approx(units[layer], rel=TOL)
            assert float(row["push"]) == pytest.approx(abs(m) * units[layer] / resid, rel=TOL)
            added = m * units[layer] * unit
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
        # large enough for the comparison above to tell a steered pass from an unsteered one
        assert abs(float(next(x for x in rows if x["layer"] == str(layer)
                                and float(x["multiplier"]) == -1)["nll_delta"])) > 2 * TOL


def test_raw_scale_push_and_the_weak_push_warning(tiny, tmp_path):
    model, base = tiny
    out = tmp_path / "raw"
    r = run_script("steer.py", "--model", model, "--data", base / "ab.json", "--vectors",
                   base / "run", "--layers", "2", "--multipliers=-0.001,0.001", "--capability",
                   "none", "--output", out)
    assert r.returncode == 0, r.stderr
    hf = hf_model(model)
    _, prompts = tiny_prompts(model, base / "ab.json")
    from llama.vectors import load_vectors

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


def test_non_finite_logits_warn_per_item_and_leave_the_means(tiny, tmp_path):
    """A multiplier whose push is past float32 (1e39 x the vector) is refused before anything
    runs: one line naming --multipliers and the value, no output. One that passes that check but
    overflows inside the model (1e20 x a vector of norm ~9: the mean square in the next RMSNorm
    is past float32) gives NaN logits: the sweep finishes, each item gets one warning line naming
    it and the setting, its p values there are "nan" in items.csv, and steering.csv's row for
    that setting has n 0 and no numbers (the finite setting's row is the mean of the finite
    items, as before)."""
    model, base = tiny
    refused = tmp_path / "refused"
    r = run_script("steer.py", "--model", model, "--data", base / "ab.json", "--vectors",
                   base / "run", "--layers", "2", "--multipliers=0,1e39", "--capability",
                   "none", "--output", refused)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --multipliers 1e+39") and "float32" in line, line
    assert not refused.exists()
    out = tmp_path / "overflow"
    r = run_script("steer.py", "--model", model, "--data", base / "ab.json", "--vectors",
                   base / "run", "--layers", "2", "--multipliers=0,1e20", "--capability",
                   "none", "--samples", 1, "--max_gen_len", 2, "--output", out)
    assert r.returncode == 0, r.stderr
    warned = [x for x in r.stderr.splitlines() if "non-finite logits at layer 2 x 1e+20" in x]
    assert len(warned) == 4 and all(f"item {i} ('Is " in warned[i] for i in range(4))
    assert "unsteered" not in r.stderr
    items = read_csv(out / "items.csv")
    huge = [x for x in items if x["layer"] == "2" and float(x["multiplier"]) > 1]
    assert len(huge) == 4 and all(np.isnan(float(x["p_positive"])) and np.isnan(float(x["p_a"]))
                                  for x in huge)
    rows = {(x["layer"], float(x["multiplier"])): x for x in read_csv(out / "steering.csv")}
    bad = rows["2", 1e20]
    assert int(bad["n"]) == 0 and bad["answer_matches_positive"] == ""
    assert all(np.isnan(float(bad[k])) for k in ("p_positive", "p_positive_lo", "p_positive_hi",
                                                  "p_a", "p_positive_when_a",
                                                  "p_positive_when_b"))
    zero = [float(x["p_positive"]) for x in items
            if x["layer"] == "2" and float(x["multiplier"]) == 0.0]
    assert int(rows["2", 0.0]["n"]) == 4 and int(rows["none", 0.0]["n"]) == 4
    assert float(rows["2", 0.0]["p_positive"]) == pytest.approx(np.mean(zero), abs=1e-6)


def test_items_read_every_format_and_name_the_row(tmp_path):
    """steering.items: A/B rows through prompts.rows.read_ab (CSV with test/deploy keys, answers
    "A."/"(B)", options on one line), word items from JSON lines; bad rows named."""
    from llama.errors import LlamaError
    from steering.items import read_items

    ab = tmp_path / "ab.csv"
    with open(ab, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "test", "deploy"])
        w.writerow(["Is this a test? Choices: (A) No (B) Yes", "(B)", "A."])
        w.writerow(["Real user?\n A) yes (it is)\n B) no", "A)", "(B)"])
    got = read_items(str(ab))
    assert [(x.letter, x.positive, x.negative) for x in got] == [("B", "B", "A"),
                                                                 ("A", "A", "B")]
    assert got[1].text == "Real user?\n A) yes (it is)\n B) no"
    words = tmp_path / "w.jsonl"
    words.write_text('{"prompt": "The film was", "positive": " good", "negative": " bad"}\n'
                     '{"prompt": "The food was", "positive": " great", "negative": " awful"}\n')
    got = read_items(str(words), limit=1)
    assert [(x.text, x.positive, x.negative, x.letter) for x in got] == [
        ("The film was", " good", " bad", None)]
    cases = [
        ([{"question": "Q? (A) x (B) y", "positive": "(A)", "negative": "(C)"}],
         ("row 0", "'(A)'/'(C)'")),
        ([{"question": "Q? (A) x (B) y", "positive": "(A)", "negative": "(B)"},
          {"question": "No options here", "positive": "(A)", "negative": "(B)"}],
         ("row 1", "cannot find the '(A) ...'")),
        ([{"prompt": "p", "positive": " a", "negative": " b"}, {"prompt": "q", "positive": " a"}],
         ("row 1", "negative")),
    ]
    for rows, words in cases:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(rows))
        with pytest.raises(LlamaError) as e:
            read_items(str(bad))
        assert str(bad) in str(e.value) and all(x in str(e.value) for x in words), str(e.value)


def contrast_cache(path, plus, minus, labels, data=""):
    from activations.cache import save_cache

    arrays = {layer: {"plus": plus[layer], "minus": minus[layer]} for layer in range(len(plus))}
    meta = {"labels": list(map(int, labels)), "model": {"fingerprint": "synthetic"}}
    if data:
        meta["data"] = {"path": data}
    save_cache(str(path), arrays, meta)
    return path


def vectors_of(run_name):
    """The NAME_TIMESTAMP folder generate_vectors_from_cache.py --output NAME wrote."""
    run = [d for d in os.listdir(os.path.dirname(run_name))
           if d.startswith(os.path.basename(run_name) + "_")][0]
    return os.path.join(os.path.dirname(run_name), run)


def test_one_label_contrast_cache_equals_the_swapped_pairs(tmp_path):
    from llama.vectors import read_vectors_folder

    rng = np.random.default_rng(5)
    n, dim = 10, 16
    plus = rng.normal(size=(2, n, dim)).astype(np.float32) + 1.0
    minus = rng.normal(size=(2, n, dim)).astype(np.float32)
    odd = np.arange(n) % 2 == 1
    swapped_plus = np.where(odd[None, :, None], minus, plus)
    swapped_minus = np.where(odd[None, :, None], plus, minus)
    one = contrast_cache(tmp_path / "one", plus, minus, np.ones(n))
    two = contrast_cache(tmp_path / "two", swapped_plus, swapped_minus, (~odd).astype(int))
    said = {}
    for cache, name in ((one, "a"), (two, "b")):
        r = run_script("generate_vectors_from_cache.py", "--cache", cache, "--output",
                       tmp_path / name)
        assert r.returncode == 0, r.stderr
        said[name] = r.stdout
    # a steering set's plus side is the behaviour, not "the true side"
    assert "plus - minus" in said["a"] and "true side" not in said["a"]
    assert "true side - false side" in said["b"]
    got = read_vectors_folder(os.path.join(vectors_of(str(tmp_path / "a")), "vectors"))
    assert {m["plus_class"] for _, m in got.values()} == {"behaviour"}
    want = read_vectors_folder(os.path.join(vectors_of(str(tmp_path / "b")), "vectors"))
    for layer in (0, 1):
        # the same float64 sums in another order, stored as float32
        np.testing.assert_allclose(got[layer][0], want[layer][0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got[layer][0], (plus[layer] - minus[layer]).mean(0),
                                   rtol=1e-5, atol=1e-6)
    # a single-prompt cache with one class is still refused
    from activations.cache import save_cache

    save_cache(str(tmp_path / "single"), {0: {"prompt": plus[0]}},
               {"labels": [1] * n, "model": {"fingerprint": "synthetic"}})
    r = run_script("generate_vectors_from_cache.py", "--cache", tmp_path / "single", "--output",
                   tmp_path / "c")
    assert r.returncode == 2 and "one class only" in r.stderr


def test_vector_metadata_round_trip(tmp_path):
    """Every convention field is written into the vectors and read back; the llama.cpp export
    carries them in its GGUF header."""
    import gguf

    from llama.vectors import LAYER_CONVENTION, vector_conventions

    rng = np.random.default_rng(6)
    n, dim = 8, 64
    plus = rng.normal(size=(4, n, dim)).astype(np.float32) + 0.5
    minus = rng.normal(size=(4, n, dim)).astype(np.float32)
    data = tmp_path / "pairs.csv"
    data.write_text("idx,plus_prompt,minus_prompt,label,swapped\n")
    cache = contrast_cache(tmp_path / "c", plus, minus, np.arange(n) % 2, data=str(data))
    r = run_script("generate_vectors_from_cache.py", "--cache", cache, "--output", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    run = vectors_of(str(tmp_path / "v"))
    meta = vector_conventions(run)
    assert sorted(meta) == [0, 1, 2, 3]
    m = meta[2]
    vec = (((2 * (np.arange(n) % 2) - 1)[:, None]) * (plus[2] - minus[2].astype(np.float64)))
    assert m["operation"] == "add" and m["layer"] == "2"
    assert m["layer_convention"] == LAYER_CONVENTION and "direction.{L-1}" in m["layer_convention"]
    assert m["token"] == "last" and m["source_data"] == str(data)
    assert m["fingerprint"] == "synthetic" and m["plus_class"] == "positive"
    assert float(m["norm"]) == pytest.approx(np.linalg.norm(vec.mean(0)), rel=1e-6)
    resid = np.concatenate([np.linalg.norm(plus[2], axis=1), np.linalg.norm(minus[2], axis=1)])
    assert float(m["residual_norm"]) == pytest.approx(resid.mean(), rel=1e-6)
    unit = vector_conventions(os.path.join(run, "normalized_vectors"))[2]
    assert float(unit["norm"]) == pytest.approx(1, abs=1e-6)
    assert float(unit["raw_norm"]) == pytest.approx(float(m["norm"]), rel=1e-6)

    model = make_hf(tmp_path / "m", "gqa")  # 3 blocks, dim 64
    out = tmp_path / "cv.gguf"
    # the tiny model's fingerprint is not "synthetic": export the unit folder without one
    fp_free = tmp_path / "free"
    os.makedirs(fp_free)
    from safetensors.numpy import load_file

    for layer in (2, 3):
        src = os.path.join(run, "vectors", f"layer_{layer}.safetensors")
        meta_l = dict(vector_conventions(run)[layer], fingerprint="")
        save_file(load_file(src), str(fp_free / f"layer_{layer}.safetensors"), metadata=meta_l)
    r = run_script("export_control_vector.py", "--model", model, "--vectors", fp_free,
                   "--output", out)
    assert r.returncode == 0, r.stderr
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["controlvector.layer_count"].contents() == 2
    for layer in (2, 3):
        for key in ("operation", "layer_convention", "token", "norm", "residual_norm",
                    "source_data", "plus_class", "plus_side"):
            got = fields[f"llama_ccs.layer_{layer}.{key}"].contents()
            assert got == vector_conventions(fp_free)[layer][key], (layer, key)
        assert fields[f"llama_ccs.layer_{layer}.tensor"].contents() == f"direction.{layer - 1}"


def test_analyze_marks_the_intended_orientation(tmp_path):
    """A validation cache (types testing / deployment): the vectors record that their plus side
    stands for 'testing', and analyze_probe_from_cache.py prints that orientation first, marked,
    and titles its plot; vectors without the record get both orientations, neither marked."""
    from activations.cache import save_cache

    rng = np.random.default_rng(7)
    n, dim = 12, 16
    types = ["testing" if i % 2 else "deployment" for i in range(n)]
    t = np.zeros(dim)
    t[3] = 1.0
    a = rng.normal(size=(n, dim)) + np.outer([ty == "testing" for ty in types], t) * 3
    save_cache(str(tmp_path / "c"), {4: {"prompt": a.astype(np.float32)}},
               {"labels": [int(x == "testing") for x in types], "types": types,
                "model": {"fingerprint": "synthetic", "path": "/m/smol.gguf"}})
    r = run_script("generate_vectors_from_cache.py", "--cache", tmp_path / "c", "--output",
                   tmp_path / "v")
    assert r.returncode == 0, r.stderr
    run = vectors_of(str(tmp_path / "v"))
    r = run_script("analyze_probe_from_cache.py", "--cache", tmp_path / "c", "--vectors",
                   os.path.join(run, "normalized_vectors"), "--output", tmp_path / "o",
                   "--visualize")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = next(x for x in lines if x.lstrip().startswith("layer"))
    assert head.split()[2:] == ["testing+", "*", "deployment+"]
    row = lines[lines.index(head) + 1].split()
    assert float(row[2]) > 0.9 and float(row[3]) < 0.1  # the testing side scores high
    assert "intended orientation is positive class 'testing'" in r.stdout
    assert (tmp_path / "o" / "auroc_by_layer.png").stat().st_size > 1000
    old = tmp_path / "old"
    os.makedirs(old)
    save_file({"vector": t.astype(np.float32)}, str(old / "layer_4.safetensors"),
              metadata={"layer": "4"})
    r = run_script("analyze_probe_from_cache.py", "--cache", tmp_path / "c", "--vectors", old,
                   "--output", tmp_path / "o2")
    assert r.returncode == 0, r.stderr
    assert "neither marked" in r.stdout and "*" not in r.stdout


def test_generate_sweep_open_ended_read_out(tiny, tmp_path):
    """generate.py --sweep: one row per prompt x setting plus the unsteered ones, push = |m| at
    residual scale, the projection equal to a transformers re-read of prompt + completion, the
    multiplier-0 completions equal to the unsteered ones; the Markdown table lists them."""
    model, base = tiny
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["the sky is", "one two"]))
    out = tmp_path / "sweep.jsonl"
    r = run_script("generate.py", "--model", model, "--prompts", prompts, "--steer", base / "run",
                   "--steer_layers", "2", "--scale", "residual", "--sweep=-1,0,1",
                   "--max_gen_len", 4, "--output", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 + 2 * 3
    hf = hf_model(model)
    from llama.vectors import load_vectors
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(model, "tokenizer.json"))
    vec = load_vectors(str(base / "run"), [2], 64, 3)[2]
    unit = (vec / vec.norm()).double()
    plain = {x["prompt"]: x["completion"] for x in rows if x["layer"] == "none"}
    # multiplier 1 adds the recorded norm; the push is against these prompts' residual norm
    resid = hf_residual_norm(hf, [tok.encode(t, bos=True) for t in plain], 2)
    assert printed_units(r.stderr)[2] == (pytest.approx(RECORDED, rel=1e-9), "recorded")
    for x in rows:
        if x["layer"] != "none":
            assert x["push"] == pytest.approx(abs(x["multiplier"]) * RECORDED / resid, rel=TOL)
        if x["multiplier"] == 0:
            assert x["completion"] == plain[x["prompt"]]
        if not x["tokens"]:  # ended at once: nothing to read, and no NaN in the JSON
            assert x["projection"] is None
            continue
        ids = tok.encode(x["prompt"], bos=True) + x["tokens"]
        with torch.no_grad():
            h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
        want = float((h[len(ids) - len(x["tokens"]):].double() @ unit).mean())
        assert x["projection"] == pytest.approx(want, abs=1e-3)
    md = (tmp_path / "sweep.md").read_text()
    assert "## the sky is" in md  # layer 2, multiplier -1: the push to 2 places
    assert any(c[0] == "2" and float(c[1]) == -1
               and float(c[2]) == pytest.approx(RECORDED / resid, abs=5e-3)
               for c in table_rows(md))
    r = run_script("generate.py", "--model", model, "--prompts", prompts, "--steer", base / "run",
                   "--steer_layers", "2", "--sweep=-1,1")
    assert r.returncode == 2 and "--sweep needs" in r.stderr


@pytest.fixture(scope="module")
def smol_sentiment(tmp_path_factory):
    """The sentiment positive control's vectors on SmolLM2 at layer 6: steering.sentiment's
    pairs -> cache_activations.py --token mean -> generate_vectors_from_cache.py."""
    import subprocess
    import sys

    from llama.gguf import default_model_path
    from steering.sentiment import write

    base = tmp_path_factory.mktemp("sentiment")
    write(str(base))
    model = str(default_model_path())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    steps = [[os.path.join(SCRIPTS, "cache_activations.py"), "--model", model, "--data",
              base / "pairs.csv", "--output", base / "cache", "--layers", "6", "--token", "mean",
              "--device", "cpu"],
             [os.path.join(SCRIPTS, "generate_vectors_from_cache.py"), "--cache", base / "cache",
              "--output", base / "sent"]]
    for step in steps:
        p = subprocess.run([sys.executable, *map(str, step)], capture_output=True, text=True,
                           env=env, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
    return model, vectors_of(str(base / "sent")), base


def test_sentiment_control_steers_smollm2_both_ways(smol_sentiment, tmp_path, shared_smollm2):
    """At push 0.5 (residual scale, layer 6) the sentiment vector raises p(" good") over
    p(" bad") after neutral openings and its negative lowers it; push and nll_delta equal a
    direct steered forward's."""
    model, run, base = smol_sentiment
    items = json.load(open(base / "readout.json"))[:3]
    (tmp_path / "items.json").write_text(json.dumps(items))
    texts = ["The train leaves at nine.", "Copper conducts heat."]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    out = tmp_path / "s"
    r = run_script("steer.py", "--model", model, "--data", tmp_path / "items.json", "--vectors",
                   run, "--layers", "6", "--multipliers=-0.5,0,0.5", "--scale", "residual",
                   "--capability", tmp_path / "texts.json", "--output", out)
    assert r.returncode == 0, r.stderr
    rows = read_csv(out / "steering.csv")
    base_p = float(rows[0]["p_positive"])
    neg, zero, pos = (float(x["p_positive"]) for x in rows[1:])
    assert neg < base_p - 0.05 and pos > base_p + 0.02  # measured: 0.52 / 0.86 / 0.94 on 8 items
    assert zero == pytest.approx(base_p, abs=1e-4)  # other batch shapes: BLAS rounding only

    from llama.model import Steer
    from llama.vectors import load_vectors, vector_conventions
    from llama.tokenizer import load_tokenizer

    lm = shared_smollm2  # the model steer.py ran on, loaded once for the session
    tok = load_tokenizer(lm.tokenizer_path)
    prompts = [tok.encode(x["prompt"], bos=True) for x in items]
    with torch.no_grad():
        norms = torch.cat([lm.model(torch.tensor([ids]), layers=[6])[6][0, 1:].norm(dim=-1)
                           for ids in prompts])
    resid = float(norms.double().mean())
    # the unit: the residual norm the vectors recorded (on the pairs they came from)
    unit = float(vector_conventions(run)[6]["residual_norm"])
    assert float(rows[3]["residual_norm"]) == pytest.approx(resid, rel=TOL)
    assert float(rows[3]["vector_norm"]) == pytest.approx(unit, rel=1e-6)
    assert float(rows[3]["push"]) == pytest.approx(0.5 * unit / resid, rel=TOL)
    vec = load_vectors(run, [6], 576, 30)[6]
    added = {6: vec / vec.norm() * unit}

    def nll(steer):
        total, count = 0.0, 0
        for t in texts:
            ids = torch.tensor([tok.encode(t, bos=True)])
            with torch.no_grad():
                logits = lm.model(ids, layers=[], logits=True, steer=steer)["logits"][0]
            logp = torch.log_softmax(logits[:-1].double(), -1)
            total += float(-logp.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
        return total / count

    plain = nll(None)
    for row, m in ((rows[1], -0.5), (rows[3], 0.5)):
        assert float(row["nll_delta"]) == pytest.approx(nll(Steer(added, m)) - plain, abs=1e-3)


def test_open_ended_empty_completion_is_null_not_nan(tmp_path):
    """A completion the first token ended has no projection: null in the JSONL (strict JSON
    has no NaN), `-` in the table."""
    from steering.open_ended import projection, write

    assert projection(None, [1, 5], [], 2, torch.ones(4)) is None
    rows = [{"prompt": "p", "layer": 2, "read_at": 2, "multiplier": 1.0, "push": 0.5,
             "completion": "", "tokens": [], "projection": None}]
    md = write(str(tmp_path / "o.jsonl"), rows)

    def refuse(name):
        raise ValueError(name)

    line = (tmp_path / "o.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=refuse)["projection"] is None
    (row,) = table_rows(open(md).read())
    assert row[0] == "2" and float(row[1]) == 1 and float(row[2]) == pytest.approx(0.5, abs=5e-3)
    assert row[3:] == ["-", ""]
