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
from llama.cache import LOCK, ActivationCache
from llama.errors import LlamaError
from llama.extract import parse_layers, plan, read_prompts, run, tokenize

CLI = os.path.join(ROOT, "scripts", "cache_activations.py")
WORDS = ["apple", "stone", "river", "blue", "seven", "sky", "Paris", "is", "the", "of"]


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
        rows.append({"idx": f"q{i}", "plus_prompt": f"{q}? Answer: {yes}", "minus_prompt": f"{q}? Answer: {no}",
                     "label": i % 2})
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
    return {(i, s): direct(*oracle, row[f"{s}_prompt"]) for i, row in enumerate(rows) for s in ("plus", "minus")}


def direct(lm, tok, text):
    """Every layer's states and the logits of one prompt run alone: the oracle."""
    ids = torch.tensor([tok.encode(text, bos=True)])
    out = lm.model(ids, logits=True)
    return ids[0], {k: v[0].float() for k, v in out.items()}


def expected(states, token):
    return {"last": lambda h: h[-1], "mean": lambda h: h.mean(0), "all": lambda h: h}[token]


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
    out = run(hf, data, tmp_path / "c", token=token, dtype=dtype, model_dtype="float32", max_batch_tokens=96)
    c = ActivationCache(out)
    assert c.layers == [0, 1, 2, 3] and c.sides == ["plus", "minus"] and c.dtype == dtype and c.token == token
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
                np.testing.assert_allclose(cache_rows(c, layer, side, i), want, rtol=rtol, atol=1e-5)
    meta = json.load(open(os.path.join(out, "metadata.json")))
    assert meta["complete"] and meta["ids"] == [r["idx"] for r in rows] and meta["labels"] == [int(r["label"]) for r in rows]
    assert meta["model"]["fingerprint"] == lm.fingerprint and len(meta["data"]["sha256"]) == 64


def test_prefix_is_shared_and_equals_whole(hf, data, oracle, tmp_path):
    """Pairs run their common token prefix once; every side keeps a token of its own; the cache of a
    shared-prefix run (checked against whole prompts above) came from a plan that really shares."""
    lm, tok = oracle
    p = read_prompts(data)
    seqs = tokenize(p, tok, lm.args.vocab_size, lm.args.max_seq_len)
    pl = plan(seqs, False, 96, None)
    lengths = pl.lengths
    assert (pl.shared > 0).all() and (pl.shared <= lengths.min(1) - 1).all()
    for i in range(len(p.ids)):
        a, b = seqs[0][i], seqs[1][i]
        assert (a[: pl.answer[i]] == b[: pl.answer[i]]).all() and a[pl.answer[i]] != b[pl.answer[i]]
    assert sorted(np.concatenate(pl.batches).tolist()) == list(range(len(p.ids)))
    # padded tokens per batch stay within the budget unless one example alone exceeds it
    for idx in pl.batches:
        cost = len(idx) * (pl.shared[idx].max() + 2 * (lengths[idx] - pl.shared[idx, None]).max())
        assert cost <= 96 or len(idx) == 1
    # a side that is a prefix of the other still keeps one token of its own
    short = plan([[np.array([1, 5, 6])], [np.array([1, 5, 6, 7])]], False, 100, None)
    assert short.shared.tolist() == [2] and short.answer.tolist() == [3]
    assert plan([[np.array([1, 5, 6])], [np.array([1, 5, 7])]], True, 100, None).shared.tolist() == [1]


def test_zero_shot_logprobs(hf, data, oracle, ref_states, tmp_path):
    lm, tok = oracle
    out = run(hf, data, tmp_path / "c", layers="1", zero_shot=True, max_batch_tokens=64)
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


def test_model_in_bfloat16(hf, data, dist1, tmp_path):
    """--dtype bfloat16 runs the model in bfloat16 too: the cache equals that model's own states."""
    from llama.checkpoint import load_model
    from llama.tokenizer import load_tokenizer

    out = run(hf, data, tmp_path / "c", dtype="bfloat16", layers="0-3")
    c = ActivationCache(out)
    lm = load_model(hf, dist1, "bfloat16")
    tok = load_tokenizer(lm.tokenizer_path)
    for i, row in enumerate(list(csv.DictReader(open(data)))[:4]):
        _, states = direct(lm, tok, row["minus_prompt"])
        for layer in c.layers:
            want = states[layer][-1].numpy()
            assert np.abs(c.array(layer, "minus")[i] - want).max() <= 2e-2 * np.abs(want).max()


def test_single_prompts_types_and_json(hf, oracle, tmp_path):
    lm, tok = oracle
    rows = [{"idx": i, "prompt": f"question {'x' * i}?", "type": t} for i, t in enumerate(["testing", "deployment", "testing"])]
    out = run(hf, write_csv(tmp_path / "v.csv", rows), tmp_path / "c", layers="2", token="mean")
    c = ActivationCache(out)
    assert c.sides == ["prompt"] and c.labels.tolist() == [1, 0, 1] and c.types == ["testing", "deployment", "testing"]
    _, states = direct(lm, tok, rows[1]["prompt"])
    np.testing.assert_allclose(c.array(2, "prompt")[1], states[2].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    # a JSON file generate_dataset reads: A/B questions from the evaluation-awareness set
    recs = json.load(open(os.path.join(SHARED, "eval_awareness", "contrastive_dataset.json")))[:5]
    src = tmp_path / "ab.json"
    src.write_text(json.dumps(recs))
    c = ActivationCache(run(hf, src, tmp_path / "ab", layers="3"))
    assert c.sides == ["plus", "minus"] and c.num_examples == 5 and set(c.labels.tolist()) <= {0, 1}
    assert not np.allclose(c.array(3, "plus"), c.array(3, "minus"))


def test_parse_layers():
    assert parse_layers("all", 3) == [0, 1, 2, 3]
    assert parse_layers((3, 1), 5) == [1, 3] and parse_layers("0-2,5", 5) == [0, 1, 2, 5] and parse_layers(4, 5) == [4]
    for bad in ("6", "1,x", "3-9"):
        with pytest.raises(LlamaError, match="layer|--layers"):
            parse_layers(bad, 5)


def test_rerun_complete_other_settings_overwrite(hf, data, tmp_path, capsys):
    out = run(hf, data, tmp_path / "c", layers="1,3")
    f = os.path.join(out, "layer_03", "plus.npy")
    before = os.stat(f).st_mtime_ns
    run(hf, data, out, layers="1,3")
    assert "already complete" in capsys.readouterr().out and os.stat(f).st_mtime_ns == before
    with pytest.raises(LlamaError, match="other settings.*layers.*--overwrite"):
        run(hf, data, out, layers="2")
    run(hf, data, out, layers="2", overwrite=True)
    c = ActivationCache(out)
    assert c.layers == [2] and not os.path.exists(os.path.join(out, "layer_03"))


# ---- killed at several points, rerun: the same bytes as an uninterrupted run

def arrays_of(path):
    files = sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs if f.endswith(".npy"))
    return {f: open(os.path.join(path, f), "rb").read() for f in files}


def cli(args, env=None, **kw):
    e = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, CLI, *map(str, args)], capture_output=True, text=True, env=e, timeout=120, **kw)


def cli_many(*calls):
    """Several command lines run at once (they spend their time importing torch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, CLI, *map(str, a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for a in calls]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("kill,token", [("alloc:2", "last"), ("write:2", "all"), ("commit:1", "mean"), ("commit:3", "all")])
def test_kill_and_resume_is_identical(hf, data, tmp_path, kill, token):
    flags = ["--token", token, "--zero_shot", "--batch_size", "2", "--commit_every", "0", "--layers", "0,2,3"]
    ref = run(hf, data, tmp_path / "ref", token=token, zero_shot=True, batch_size=2, commit_every=0, layers="0,2,3")
    out = tmp_path / "c"
    r = cli(["--model", hf, "--data", data, "--output", out, *flags], env={"LLAMA_EXTRACT_KILL": kill})
    assert r.returncode == -9
    assert not os.path.exists(out / "layer_info.json")
    with pytest.raises(LlamaError, match="incomplete"):
        ActivationCache(str(out))
    done = []
    if kill != "alloc:2":
        done = json.load(open(out / "progress" / "group_0.json"))["done"]
        assert 0 < len(done) < 5  # it did stop part-way
    r = cli(["--model", hf, "--data", data, "--output", out, *flags])
    assert r.returncode == 0, r.stderr
    assert arrays_of(str(out)) == arrays_of(ref) and len(arrays_of(ref)) >= 7
    a, b = (json.load(open(os.path.join(p, "metadata.json"))) for p in (out, ref))
    assert a["timings"]["resumed_from_batches"] == len(done)  # committed work was not redone
    assert {k: v for k, v in a.items() if k != "timings"} == {k: v for k, v in b.items() if k != "timings"}
    assert ActivationCache(str(out)).num_examples == 10


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
        (["--layers", "0,9"], data, ("layer 9", "0..3")),
        ([], tmp_path / "empty.csv", ("empty.csv", "empty")),
        ([], tmp_path / "cols.csv", ("cols.csv", "plus_prompt")),
        ([], tmp_path / "bin.csv", ("bin.csv",)),
        ([], write_csv(tmp_path / "blank.csv", blank), ("row 2", "minus")),
        ([], write_csv(tmp_path / "long.csv", long), ("row 3", f"max_seq_len {longest}")),
        ([], tmp_path / "missing.csv", ("missing.csv",)),
    ]
    results = cli_many(*[["--model", hf, "--data", f, "--output", out, *flags] for flags, f, _ in cases])
    for (_, _, words), r in zip(cases, results):
        one_line_error(r, *words)
    assert not os.path.exists(out)


def test_cache_of_another_model_or_dataset(hf, data, tmp_path):
    other = tiny.make_hf(tmp_path / "mha", "mha")
    out = run(other, data, tmp_path / "c")
    before = arrays_of(out)
    (tmp_path / "notcache").mkdir()
    (tmp_path / "notcache" / "thesis.tex").write_text("x")
    data2 = write_csv(tmp_path / "d2.csv", pair_rows(4, seed=5))
    r1, r2, r3 = cli_many(["--model", hf, "--data", data, "--output", out],
                          ["--model", other, "--data", data2, "--output", out],
                          ["--model", hf, "--data", data, "--output", tmp_path / "notcache"])
    one_line_error(r1, "different model", "--overwrite")
    one_line_error(r2, "different prompt file")
    one_line_error(r3, "not empty")
    assert arrays_of(out) == before and ActivationCache(out).num_examples == 10
    assert set(os.listdir(tmp_path / "notcache")) <= {LOCK, "thesis.tex"}


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
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        return None
    script = f"mount -t tmpfs -o {mount_opts} tmpfs {fs} || exit 99; {inner}; rc=$?; echo FILES; find {fs} -type f; exit $rc"
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    return None if r.returncode == 99 else r


def test_full_disk(hf, data, tmp_path):
    """A tmpfs too small for the arrays (token all): allocation fails up front with ENOSPC; what the
    run created is removed. Without the right to mount, a file-size limit (EFBIG) stands in for it."""
    cmd = f"{sys.executable} {CLI} --model {hf} --data {data} --token all --output {tmp_path}/fs/cache"
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
        one_line_error(cli(["--model", hf, "--data", data, "--token", "all", "--output", out], preexec_fn=limit), "too large")
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


def test_zero_shot_needs_pairs(hf, tmp_path):
    data = write_csv(tmp_path / "single.csv", [{"prompt": "hello there", "label": 1}])
    one_line_error(cli(["--model", hf, "--data", data, "--output", tmp_path / "c", "--zero_shot"]), "contrast pairs")


# ---- the real default model, on real prompts

def test_smollm2_cities_end_to_end(dist1, tmp_path):
    from llama.checkpoint import load_model
    from llama.gguf import default_model_path
    from llama.tokenizer import load_tokenizer

    rows = list(csv.DictReader(open(os.path.join(SHARED, "truth", "cities.csv"))))[:24]
    q = "<|im_start|>user\nIs the following statement true?\n{}<|im_end|>\n<|im_start|>assistant\n{}"
    pairs = [{"idx": i, "plus_prompt": q.format(r["statement"], "Yes"), "minus_prompt": q.format(r["statement"], "No"),
              "label": r["label"]} for i, r in enumerate(rows)]
    data = write_csv(tmp_path / "cities.csv", pairs)
    lm = load_model(str(default_model_path()), dist1, "float32")
    tok = load_tokenizer(lm.tokenizer_path)
    out = run(lm, data, tmp_path / "c", layers="0,12,30", zero_shot=True)
    c = ActivationCache(out)
    assert c.num_examples == 24 and c.hidden_dim == 576 and c.labels.tolist() == [int(r["label"]) for r in rows]
    assert np.isfinite(c.logprobs).all() and (c.logprobs < 0).all()
    for i in (0, 7, 23):
        for side in c.sides:
            _, states = direct(lm, tok, pairs[i][f"{side}_prompt"])
            for layer in c.layers:
                want = states[layer][-1].numpy()
                assert np.abs(c.array(layer, side)[i] - want).max() <= 1e-4 * np.abs(want).max()
    pl = plan(tokenize(read_prompts(data), tok, lm.args.vocab_size, lm.args.max_seq_len), True, 2048, None)
    assert (pl.shared >= 20).all()  # the statement runs once per pair
