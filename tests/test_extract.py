"""Extraction into the activation cache: the cache equals direct forward() states, shared prefixes
equal whole prompts, kills resume to identical bytes, bad input gives one line and leaves no cache
that looks complete."""
import csv
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SHARED, one_line_error
import tiny
from activations.cache import LOCK, ActivationCache
from llama.errors import LlamaError
from activations.cache import parse_layers
from activations.extract import Extraction, plan, read_prompts, run, tokenize

CLI = os.path.join(ROOT, "scripts", "cache_activations.py")
WORDS = ["apple", "stone", "river", "blue", "seven", "sky", "Paris", "is", "the", "of"]


def extract(model, data, output, lm=None, **settings):
    """activations.extract.run with the settings as keywords; returns the cache path."""
    return run(Extraction(str(model), str(data), str(output), **settings), lm)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def pair_rows(n=10, seed=0):
    """Contrast pairs of varied lengths; answers of different lengths on the two sides."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        q = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 14)))
        yes, no = ("True", "False") if i % 3 else ("Yes", "No")
        rows.append({"idx": f"q{i}", "plus_prompt": f"{q}? Answer: {yes}",
                     "minus_prompt": f"{q}? Answer: {no}", "label": i % 2})
    return rows


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return tiny.make_hf(tmp_path_factory.mktemp("gqa"), "gqa")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "pairs.csv", pair_rows())


@pytest.fixture(scope="module")
def oracle(hf, dist1):
    from llama.checkpoint import load_model
    from llama.tokenizer import load_tokenizer

    lm = load_model(hf, dist1, "float32")
    return lm, load_tokenizer(lm.tokenizer_path)


@pytest.fixture(scope="module")
def ref_states(data, oracle):
    """{(example, side): (token ids, states)} of every prompt of `data` run alone."""
    rows = list(csv.DictReader(open(data)))
    return {(i, s): direct(*oracle, row[f"{s}_prompt"])
            for i, row in enumerate(rows) for s in ("plus", "minus")}


def direct(lm, tok, text):
    """Every layer's states and the logits of one prompt run alone: the oracle."""
    ids = torch.tensor([tok.encode(text, bos=True)])
    out = lm.model(ids, logits=True)
    return ids[0], {k: v[0].float() for k, v in out.items()}


def expected(states, token):
    """The oracle of each token mode; mean leaves out position 0 unless it is the only one."""
    mean = lambda h: h[1:].mean(0) if len(h) > 1 else h[0]  # noqa: E731
    return {"last": lambda h: h[-1], "mean": mean, "all": lambda h: h}[token]


def cache_rows(c, layer, side, i):
    a = c.array(layer, side)
    if c.token == "all":
        off = c.offsets(side)
        return a[off[i]: off[i + 1]]
    return a[i]


@pytest.mark.parametrize("token", ["last", "mean", "all"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cache_equals_forward(hf, data, oracle, ref_states, tmp_path, token, dtype):
    lm, tok = oracle
    out = extract(hf, data, tmp_path / "c", token=token, dtype=dtype, compute_dtype="float32",
                  max_batch_tokens=96)
    c = ActivationCache(out)
    assert (c.layers == [0, 1, 2, 3] and c.sides == ["plus", "minus"] and c.dtype == dtype
            and c.token == token)
    assert c.raw(2, "plus").dtype == (np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
    if dtype == "bfloat16":
        assert c.tensor(2, "plus").dtype == torch.bfloat16
    rtol = {"float32": 1e-5, "float16": 2 ** -10, "bfloat16": 2 ** -7}[dtype]
    rows = list(csv.DictReader(open(data)))
    for i, row in enumerate(rows):
        for side in c.sides:
            _, states = ref_states[i, side]
            for layer in c.layers:
                want = expected(states, token)(states[layer]).numpy()
                np.testing.assert_allclose(cache_rows(c, layer, side, i), want, rtol=rtol,
                                           atol=1e-5)
    meta = json.load(open(os.path.join(out, "metadata.json")))
    assert (meta["complete"] and meta["ids"] == [r["idx"] for r in rows]
            and meta["labels"] == [int(r["label"]) for r in rows])
    assert meta["model"]["fingerprint"] == lm.fingerprint and len(meta["data"]["sha256"]) == 64


@pytest.mark.parametrize("keep_first", [False, True])
def test_mean_cache_is_the_mean_of_the_all_cache(hf, oracle, tmp_path, keep_first):
    """One rule for an example's mean state: extraction's token "mean" equals
    activations.cache.mean_state over a token "all" cache (position 0 left out, kept for one-token
    prompts or with mean_keep_first), shared prefixes and one-token sides included; the rule is
    in the metadata."""
    from activations.cache import mean_state

    rows = pair_rows(6) + [{"idx": "one", "plus_prompt": "a", "minus_prompt": "b", "label": 1}]
    data = write_csv(tmp_path / "p.csv", rows)
    lm, _ = oracle
    mean = ActivationCache(extract(hf, data, tmp_path / "mean", lm, token="mean",
                                   max_batch_tokens=96, mean_keep_first=keep_first))
    every = ActivationCache(extract(hf, data, tmp_path / "all", lm, token="all",
                                    max_batch_tokens=96))
    assert mean.mean_keep_first is keep_first and every.mean_keep_first is None
    assert mean.meta["settings"]["mean_keep_first"] is keep_first
    for layer in mean.layers:
        for side in mean.sides:
            want = mean_state(every.array(layer, side), every.offsets(side), keep_first)
            np.testing.assert_allclose(mean.array(layer, side), want, rtol=1e-5, atol=1e-5)
            one = every.array(layer, side)[every.offsets(side)[-2]]
            np.testing.assert_allclose(mean.array(layer, side)[-1], one, rtol=1e-5, atol=1e-5)
    full = every.array(2, "plus")[: every.offsets("plus")[1]]  # the first example's every position
    assert np.allclose(mean.array(2, "plus")[0], full[0 if keep_first else 1:].mean(0), atol=1e-5)


def test_prefix_is_shared_and_equals_whole(hf, data, oracle, tmp_path):
    """Pairs run their common token prefix once; every side keeps a token of its own; the cache of
    a shared-prefix run (checked against whole prompts above) came from a plan that really
    shares."""
    lm, tok = oracle
    p = read_prompts(data)
    seqs = tokenize(p, tok, lm.args.vocab_size, lm.args.max_seq_len)
    pl = plan(seqs, False, 96, None)
    lengths = pl.lengths
    assert (pl.shared > 0).all() and (pl.shared <= lengths.min(1) - 1).all()
    for i in range(len(p.ids)):
        a, b = seqs[0][i], seqs[1][i]
        assert ((a[: pl.answer[i]] == b[: pl.answer[i]]).all()
                and a[pl.answer[i]] != b[pl.answer[i]])
    assert sorted(np.concatenate(pl.batches).tolist()) == list(range(len(p.ids)))
    # padded tokens per batch stay within the budget unless one example alone exceeds it
    for idx in pl.batches:
        cost = len(idx) * (pl.shared[idx].max() + 2 * (lengths[idx] - pl.shared[idx, None]).max())
        assert cost <= 96 or len(idx) == 1
    # a side that is a prefix of the other still keeps one token of its own
    short = plan([[np.array([1, 5, 6])], [np.array([1, 5, 6, 7])]], False, 100, None)
    assert short.shared.tolist() == [2] and short.answer.tolist() == [3]
    assert plan([[np.array([1, 5, 6])], [np.array([1, 5, 7])]], True, 100,
                None).shared.tolist() == [1]


def test_zero_shot_logprobs(hf, data, oracle, ref_states, tmp_path):
    lm, tok = oracle
    out = extract(hf, data, tmp_path / "c", layers="1", zero_shot=True, max_batch_tokens=64)
    lp = ActivationCache(out).logprobs
    rows = list(csv.DictReader(open(data)))
    assert lp.shape == (len(rows), 2)
    for i, row in enumerate(rows):
        ids = {s: tok.encode(row[f"{s}_prompt"], bos=True) for s in ("plus", "minus")}
        start = next(j for j, (a, b) in enumerate(zip(ids["plus"], ids["minus"])) if a != b)
        for k, s in enumerate(("plus", "minus")):
            t, states = ref_states[i, s]
            logp = states["logits"].log_softmax(-1)
            want = sum(float(logp[j - 1, t[j]]) for j in range(start, len(t)))
            assert abs(lp[i, k] - want) < 1e-4


def test_cache_dtype_is_not_the_compute_dtype(hf, data, dist1, ref_states, tmp_path, capsys):
    """--dtype bfloat16 stores bfloat16 of a float32 model's states (on CPU); --compute_dtype runs
    the model in bfloat16, and both are said: in the summary line and in metadata.json."""
    from llama.checkpoint import load_model
    from llama.tokenizer import load_tokenizer

    c = ActivationCache(extract(hf, data, tmp_path / "c", dtype="bfloat16", layers="0-3"))
    assert "bfloat16 (computed in float32 on cpu)" in capsys.readouterr().out
    assert c.meta["model"]["dtype"] == "float32" and c.meta["settings"]["model_dtype"] == "float32"
    for i in range(4):
        want = ref_states[i, "minus"][1][3][-1]
        # the oracle ran each prompt alone, extraction in batches: float32 states equal to
        # ~1e-7, which can land on the other side of a bfloat16 rounding boundary, so allow one
        # bfloat16 step (2^-7 of the magnitude: 8 significant bits)
        got, rounded = c.array(3, "minus")[i], want.bfloat16().float().numpy()
        assert np.all(np.abs(got - rounded) <= 2.0 ** -7 * np.abs(rounded) + 1e-30)
    # plain numpy sees uint16 bit patterns: layer_info.json says so, and the one-line opens the
    # README gives (the project's reader, ml_dtypes' bfloat16 view) give the same float32 values
    import ml_dtypes

    info = json.load(open(tmp_path / "c" / "layer_info.json"))
    assert info["dtype"] == "bfloat16" and info["npy_dtype"] == "uint16"
    assert "raw bfloat16 bits" in info["encoding"] and "ml_dtypes" in info["encoding"]
    raw = np.load(tmp_path / "c" / "layer_03" / "minus.npy", mmap_mode="r")
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw.view(ml_dtypes.bfloat16).astype("float32"),
                                  c.array(3, "minus"))
    c = ActivationCache(extract(hf, data, tmp_path / "b", dtype="bfloat16",
                                compute_dtype="bfloat16", layers="0-3"))
    assert "(computed in bfloat16 on cpu)" in capsys.readouterr().out
    assert json.load(open(tmp_path / "b" / "layer_info.json"))["npy_dtype"] == "uint16"
    assert c.meta["model"]["dtype"] == "bfloat16"
    lm = load_model(hf, dist1, "bfloat16")
    tok = load_tokenizer(lm.tokenizer_path)
    for i, row in enumerate(list(csv.DictReader(open(data)))[:4]):
        _, states = direct(lm, tok, row["minus_prompt"])
        for layer in c.layers:
            want = states[layer][-1].numpy()
            assert np.abs(c.array(layer, "minus")[i] - want).max() <= 2e-2 * np.abs(want).max()


def test_single_prompts_types_and_json(hf, oracle, tmp_path):
    lm, tok = oracle
    rows = [{"idx": i, "prompt": f"question {'x' * i}?", "type": t}
            for i, t in enumerate(["testing", "deployment", "testing"])]
    out = extract(hf, write_csv(tmp_path / "v.csv", rows), tmp_path / "c", layers="2",
                  token="mean")
    c = ActivationCache(out)
    assert (c.sides == ["prompt"] and c.labels.tolist() == [1, 0, 1]
            and c.types == ["testing", "deployment", "testing"])
    _, states = direct(lm, tok, rows[1]["prompt"])
    want = expected(states, "mean")(states[2]).numpy()  # position 0 left out
    np.testing.assert_allclose(c.array(2, "prompt")[1], want, rtol=1e-5, atol=1e-6)
    # a JSON file generate_dataset reads: A/B questions from the evaluation-awareness set
    recs = json.load(open(os.path.join(SHARED, "eval_awareness", "contrastive_dataset.json")))[:5]
    src = tmp_path / "ab.json"
    src.write_text(json.dumps(recs))
    c = ActivationCache(extract(hf, src, tmp_path / "ab", layers="3"))
    assert (c.sides == ["plus", "minus"] and c.num_examples == 5
            and set(c.labels.tolist()) <= {0, 1})
    assert not np.allclose(c.array(3, "plus"), c.array(3, "minus"))


def test_json_prompts_are_generate_dataset_rows(oracle, tmp_path):
    """A JSON --data file is made into the very prompts generate_dataset.py writes for it (one
    implementation, prompts.rows): the same sides, texts, ids and labels."""
    import prompts.dataset as gd

    lm, tok = oracle
    recs = json.load(open(os.path.join(SHARED, "eval_awareness", "contrastive_dataset.json")))[:6]
    files = {"ab.json": recs, "v.json": [{"question": f"q {i}?", "type": t} for i, t in
                                         enumerate(["testing", "deployment"] * 2)]}
    for name, content in files.items():
        src = tmp_path / name
        src.write_text(json.dumps(content))
        gd.main(str(tmp_path / f"{name}.csv"), input=str(src), tokenizer_path=lm.tokenizer_path)
        want = read_prompts(tmp_path / f"{name}.csv")
        got = read_prompts(src, tok)
        assert (got.sides, got.texts, got.ids) == (want.sides, want.texts, want.ids)
        assert got.labels == want.labels
    assert got.sides == ["prompt"]


def test_parse_layers():
    assert parse_layers("all", 3) == [0, 1, 2, 3]
    assert (parse_layers((3, 1), 5) == [1, 3] and parse_layers("0-2,5", 5) == [0, 1, 2, 5]
            and parse_layers(4, 5) == [4])
    for bad in ("6", "1,x", "3-9"):
        with pytest.raises(LlamaError, match="layer|--layers"):
            parse_layers(bad, 5)


def test_rerun_complete_other_settings_overwrite(hf, data, tmp_path, capsys):
    out = extract(hf, data, tmp_path / "c", layers="1,3")
    f = os.path.join(out, "layer_03", "plus.npy")
    before = os.stat(f).st_mtime_ns
    extract(hf, data, out, layers="1,3")
    assert "already complete" in capsys.readouterr().out and os.stat(f).st_mtime_ns == before
    with pytest.raises(LlamaError, match="other settings.*layers.*--overwrite"):
        extract(hf, data, out, layers="2")
    extract(hf, data, out, layers="2", overwrite=True)
    c = ActivationCache(out)
    assert c.layers == [2] and not os.path.exists(os.path.join(out, "layer_03"))


# ---- killed at several points, rerun: the same bytes as an uninterrupted run

def arrays_of(path):
    files = sorted(os.path.relpath(os.path.join(r, f), path)
                   for r, _, fs in os.walk(path) for f in fs if f.endswith(".npy"))
    return {f: open(os.path.join(path, f), "rb").read() for f in files}


def cli(args, env=None, **kw):
    e = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, CLI, *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=120, **kw)


def cli_many(*calls):
    """Several command lines run at once (they spend their time importing torch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, CLI, *map(str, a)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for a in calls]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def kill_after_first_commit(args, progress, timeout=300):
    """Start the command and SIGKILL it from outside, as a crash would, once its progress file
    shows a committed batch -> the batches committed when it died."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, CLI, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout and proc.poll() is None:
            try:
                with open(progress) as f:
                    if json.load(f)["done"]:
                        break
            except (OSError, ValueError):  # not written yet, or being replaced
                pass
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return proc.returncode


@pytest.mark.parametrize("token", ["all", "mean"])
def test_kill_and_resume_is_identical(hf, tmp_path, token):
    """A real process killed from outside after its first committed batch (SIGKILL: no cleanup),
    then the same command again: the same bytes as an uninterrupted run, committed work kept."""
    data = write_csv(tmp_path / "many.csv", pair_rows(24, seed=4))
    flags = ["--token", token, "--zero_shot", "--batch_size", "1", "--commit_every", "0",
             "--layers", "0,2,3"]
    ref = extract(hf, data, tmp_path / "ref", token=token, zero_shot=True, batch_size=1,
                  commit_every=0, layers="0,2,3")
    out = tmp_path / "c"
    code = kill_after_first_commit(["--model", hf, "--data", data, "--output", out, *flags],
                                   out / "progress" / "group_0.json")
    assert code == -9  # killed, not finished: 24 fsynced batches take far longer than a poll
    assert not os.path.exists(out / "layer_info.json")
    with pytest.raises(LlamaError, match="incomplete"):
        ActivationCache(str(out))
    done = json.load(open(out / "progress" / "group_0.json"))["done"]
    assert 0 < len(done) < 24  # it did stop part-way
    r = cli(["--model", hf, "--data", data, "--output", out, *flags])
    assert r.returncode == 0, r.stderr
    assert arrays_of(str(out)) == arrays_of(ref) and len(arrays_of(ref)) >= 7
    a, b = (json.load(open(os.path.join(p, "metadata.json"))) for p in (out, ref))
    assert a["timings"]["resumed_from_batches"] == len(done)  # committed work was not redone
    assert ({k: v for k, v in a.items() if k != "timings"}
            == {k: v for k, v in b.items() if k != "timings"})
    assert ActivationCache(str(out)).num_examples == 24


# ---- bad input: one line, non-zero exit, nothing that looks complete

def test_bad_layer_and_bad_files(hf, data, oracle, tmp_path):
    out = tmp_path / "c"
    (tmp_path / "empty.csv").write_text("")
    write_csv(tmp_path / "cols.csv", [{"question": "q", "answer": "yes"}])
    (tmp_path / "bin.csv").write_bytes(b"plus_prompt,minus_prompt\n\xff\xfe\x00\x81,\"unclosed\n")
    blank = pair_rows(3)
    blank[1]["minus_prompt"] = "  "
    long = pair_rows(3)
    longest = oracle[0].args.max_seq_len
    long[2]["plus_prompt"] = "x" * (longest + 1)  # one token a byte
    cases = [
        (["--layers", "0,9"], data, ("layer 9", "0-3")),
        ([], tmp_path / "empty.csv", ("empty.csv", "empty")),
        ([], tmp_path / "cols.csv", ("cols.csv", "plus_prompt")),
        ([], tmp_path / "bin.csv", ("bin.csv",)),
        ([], write_csv(tmp_path / "blank.csv", blank), ("row 2", "minus")),
        ([], write_csv(tmp_path / "long.csv", long), ("row 3", f"max_seq_len {longest}")),
        ([], tmp_path / "missing.csv", ("missing.csv",)),
    ]
    results = cli_many(*[["--model", hf, "--data", f, "--output", out, *flags]
                         for flags, f, _ in cases])
    for (_, _, words), r in zip(cases, results):
        one_line_error(r, *words)
    assert not os.path.exists(out)


def test_cache_of_another_model_or_dataset(hf, data, tmp_path):
    other = tiny.make_hf(tmp_path / "mha", "mha")
    out = extract(other, data, tmp_path / "c")
    before = arrays_of(out)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metadata.json").write_text('{"who": "someone else"}')
    data2 = write_csv(tmp_path / "d2.csv", pair_rows(4, seed=5))
    r1, r2, r3 = cli_many(["--model", hf, "--data", data, "--output", out, "--token", "last"],
                          ["--model", other, "--data", data2, "--output", out, "--token", "last"],
                          ["--model", hf, "--data", data, "--output", tmp_path / "foreign"])
    one_line_error(r1, "different model", "--overwrite")
    one_line_error(r2, "different prompt file")
    one_line_error(r3, "metadata.json that is not an activation cache's")
    assert arrays_of(out) == before and ActivationCache(out).num_examples == 10
    assert os.listdir(tmp_path / "foreign") == ["metadata.json"]
    assert not os.path.exists(os.path.join(out, LOCK))


def example(*args, cwd=None):
    """example.py as the seed tool's users run it (one process) -> CompletedProcess."""
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "example.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=180, cwd=cwd)


def test_seed_command_verbatim_in_a_folder_with_other_files(hf, data, tmp_path):
    """LLaMA-CCS's command writes its cache beside the prompts and validation.json that
    generate_dataset.py's seed command needs there: those files are left alone."""
    folder = tmp_path / "data" / "boolq"
    folder.mkdir(parents=True)
    shutil.copy(data, folder / "prompts.csv")
    (folder / "validation.json").write_text('[{"question": "q", "answer": true}]')
    (folder / "layer_notes.txt").write_text("mine")
    others = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    seed = ["--ckpt_dir", hf, "--tokenizer_path", os.path.join(hf, "tokenizer.json"),
            "--save_activations_path", "./data/boolq", "--prompt_csv", "./data/boolq/prompts.csv"]
    r = example(*seed, "--layers", "1,3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    c = ActivationCache(str(folder))
    assert c.layers == [1, 3] and c.num_examples == 10 and not os.path.exists(folder / LOCK)
    assert {n: (folder / n).read_bytes() for n in others} == others
    # a refusal names the seed's flags and leaves nothing behind
    r1 = example(*seed, "--layers", "2", cwd=tmp_path)
    one_line_error(r1, "--save_activations_path ./data/boolq holds a cache of other settings",
                   "--overwrite")
    assert "--output" not in r1.stderr and not os.path.exists(folder / LOCK)
    r2 = example(*seed[:-1], "./data/prompts.csv", cwd=tmp_path)
    one_line_error(r2, "--prompt_csv ./data/prompts.csv: no such file",
                   "there is ./data/boolq/prompts.csv")
    r3 = example(*seed[:5], "./data/new", "--prompt_csv", "./data/boolq/prompts.csv",
                 "--layers", "99", cwd=tmp_path)
    one_line_error(r3, "layer 99 not in", "0-3")
    assert not os.path.exists(tmp_path / "data" / "new")
    # --overwrite replaces the cache's own files only
    r = example(*seed, "--layers", "2", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert ActivationCache(str(folder)).layers == [2] and not os.path.exists(folder / "layer_03")
    assert {n: (folder / n).read_bytes() for n in others} == others


def test_cheap_checks_come_before_the_load(hf, data, tmp_path, monkeypatch, capsys):
    """A missing prompt file, layers the checkpoint does not have, an output folder that cannot
    take the cache, and a cache already complete are all told without reading a weight."""
    import llama.checkpoint

    done = extract(hf, data, tmp_path / "done", layers="1")
    capsys.readouterr()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "layer_04").mkdir()

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(llama.checkpoint, "load_model", no_load)
    for kwargs, words in [(dict(data=tmp_path / "nothere.csv"), "nothere.csv: no such file"),
                          (dict(layers="99"), "layer 99 not in"),
                          (dict(output=tmp_path / "foreign"),
                           "holds layer_04 but no cache metadata"),
                          (dict(output=done, layers="2"), "other settings")]:
        args = {"model": hf, "data": data, "output": tmp_path / "new", **kwargs}
        with pytest.raises(LlamaError, match=words):
            extract(args.pop("model"), args.pop("data"), args.pop("output"), **args)
    assert extract(hf, data, done, layers="1") == str(done)
    assert "already complete" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "new")


def test_interrupt_keeps_what_is_done_and_resume_says_so(hf, data, tmp_path, monkeypatch, capsys):
    """Ctrl-C commits the batches written, says how many prompts that is; the next run says it
    resumes, redoes only the rest and gives the same bytes as a run never interrupted."""
    import activations.extract as X

    ref = extract(hf, data, tmp_path / "ref", batch_size=1, layers="0,2")
    real, calls = X.forward_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(X, "forward_batch", interrupted)
    out = tmp_path / "c"
    kept = "6 of 20 prompts committed; run the same command to resume"
    with pytest.raises(KeyboardInterrupt, match=kept):
        extract(hf, data, out, batch_size=1, layers="0,2", commit_every=3600)
    assert not os.path.exists(out / LOCK)
    monkeypatch.setattr(X, "forward_batch", real)
    capsys.readouterr()
    extract(hf, data, out, batch_size=1, layers="0,2", commit_every=3600)
    assert "resuming: 6 of 20 prompts done" in capsys.readouterr().out
    assert arrays_of(str(out)) == arrays_of(ref)
    assert ActivationCache(str(out)).meta["timings"]["resumed_from_batches"] == 3


def test_second_writer_is_refused(hf, data, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    with open(out / LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        one_line_error(cli(["--model", hf, "--data", data, "--output", out]), "another extraction")
    assert not os.path.exists(out / "metadata.json")


def in_tmpfs(mount_opts, inner, tmp_path):
    """Run `inner` (a shell command) with a fresh tmpfs mounted at tmp_path/fs in a private mount
    namespace (root only), then list the files left in it. None where mounting is not allowed."""
    fs = tmp_path / "fs"
    fs.mkdir(exist_ok=True)
    if (shutil.which("unshare") is None
            or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode):
        return None
    script = (f"mount -t tmpfs -o {mount_opts} tmpfs {fs} || exit 99; {inner}; rc=$?; "
              f"echo FILES; find {fs} -type f; exit $rc")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return None if r.returncode == 99 else r


def test_full_disk(hf, data, tmp_path):
    """A tmpfs too small for the arrays (token all): allocation fails up front with ENOSPC; what
    the run created is removed. Without the right to mount, a file-size limit (EFBIG) stands in
    for it."""
    cmd = (f"{sys.executable} {CLI} --model {hf} --data {data} --token all "
           f"--output {tmp_path}/fs/cache")
    r = in_tmpfs("size=96k", cmd, tmp_path)
    if r is not None:
        r.stderr = r.stderr.strip()
        one_line_error(r, "No space left on device")
        assert r.stdout.split("FILES")[1].split() == []  # nothing left behind
    else:
        import resource
        import signal

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

        out = tmp_path / "cache"
        one_line_error(cli(["--model", hf, "--data", data, "--token", "all", "--output", out],
                           preexec_fn=limit), "too large")
        assert not os.path.exists(out)


def test_read_only_output(hf, data, tmp_path):
    cmd = f"{sys.executable} {CLI} --model {hf} --data {data} --output {tmp_path}/fs/cache"
    r = in_tmpfs("ro,size=64k", cmd, tmp_path)
    if r is None:  # not root: a read-only directory is enough
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        r = cli(["--model", hf, "--data", data, "--output", ro / "cache"])
        one_line_error(r, str(ro / "cache"))
        assert not os.path.exists(ro / "cache")
    else:
        one_line_error(r, "Read-only file system", f"{tmp_path}/fs/cache")
        assert r.stdout.split("FILES")[1].split() == []


def test_unlabelled_prompts_extract_with_a_warning(hf, tmp_path):
    """A prompt file without a label column is legitimate for extraction: the cache is written
    whole, and one warning says what will need labels."""
    rows = [{k: v for k, v in r.items() if k != "label"} for r in pair_rows(3)]
    data = write_csv(tmp_path / "nolabel.csv", rows)
    r = cli(["--model", hf, "--data", data, "--output", tmp_path / "c", "--layers", "1"])
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "no label column" in warned[0] and "ccs.py train" in warned[0]
    c = ActivationCache(str(tmp_path / "c"))
    assert c.num_examples == 3 and c.labels is None
    labelled = write_csv(tmp_path / "labelled.csv", pair_rows(3))
    r = cli(["--model", hf, "--data", labelled, "--output", tmp_path / "d", "--layers", "1"])
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_zero_shot_needs_pairs(hf, tmp_path):
    data = write_csv(tmp_path / "single.csv", [{"prompt": "hello there", "label": 1}])
    one_line_error(cli(["--model", hf, "--data", data, "--output", tmp_path / "c", "--zero_shot"]),
                   "contrast pairs")


# ---- the real default model, on real prompts

def test_smollm2_cities_end_to_end(smollm2, tmp_path):
    from llama.gguf import default_model_path
    from llama.tokenizer import load_tokenizer

    rows = list(csv.DictReader(open(os.path.join(SHARED, "truth", "cities.csv"))))[:24]
    q = ("<|im_start|>user\nIs the following statement true?\n{}<|im_end|>\n"
         "<|im_start|>assistant\n{}")
    pairs = [{"idx": i, "plus_prompt": q.format(r["statement"], "Yes"),
              "minus_prompt": q.format(r["statement"], "No"), "label": r["label"]}
             for i, r in enumerate(rows)]
    data = write_csv(tmp_path / "cities.csv", pairs)
    lm = smollm2  # float32, loaded once for the session
    tok = load_tokenizer(lm.tokenizer_path)
    out = extract(default_model_path(), data, tmp_path / "c", lm=lm, layers="0,12,30",
                  zero_shot=True)
    c = ActivationCache(out)
    assert (c.num_examples == 24 and c.hidden_dim == 576
            and c.labels.tolist() == [int(r["label"]) for r in rows])
    assert np.isfinite(c.logprobs).all() and (c.logprobs < 0).all()
    for i in (0, 7, 23):
        for side in c.sides:
            _, states = direct(lm, tok, pairs[i][f"{side}_prompt"])
            for layer in c.layers:
                want = states[layer][-1].numpy()
                assert np.abs(c.array(layer, side)[i] - want).max() <= 1e-4 * np.abs(want).max()
    pl = plan(tokenize(read_prompts(data), tok, lm.args.vocab_size, lm.args.max_seq_len), True,
              2048, None)
    assert (pl.shared >= 20).all()  # the statement runs once per pair
