"""Small runs for the report tests: a tiny tokenizer, a prompt file (one prompt holds a <script>
tag), a token "all" cache of made-up states tokenised as extraction would, a ccs.py probes run on
its mean states, a cached-workflow run, and the repository's own steering run."""
import glob
import hashlib
import json
import os
import runpy
import shutil

import numpy as np
import pandas as pd

from conftest import ROOT, in_process
from activations.cache import mean_state, save_cache
from tiny import make_tokenizer

D = 16
LAYERS = (1, 2)
EVIL = "<script>alert(1)</script> & <b>bold</b>"


def script(name, *args):
    return in_process([name, *args], lambda: runpy.run_path(os.path.join(ROOT, "scripts", name),
                                                            run_name="__main__"))


def make_runs(tmp) -> dict:
    """{tokenizer, data, cache, mean_cache, probes, cached, vectors, steering, texts, lengths}."""
    from llama.tokenizer import load_tokenizer

    import probes.commands as ccs

    tok_path = make_tokenizer(os.path.join(tmp, "tok"))
    tok = load_tokenizer(tok_path)
    rng = np.random.default_rng(0)
    texts, types = [], []
    for i in range(40):
        ty = "testing" if i % 2 else "deployment"
        texts.append(EVIL if i == 1 else f"Question {i}: is this {ty}?\nAnswer")
        types.append(ty)
    data = os.path.join(tmp, "prompts.csv")
    pd.DataFrame({"idx": [f"q{i}" for i in range(40)], "prompt": texts, "type": types}
                 ).to_csv(data, index=False)
    with open(data, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    lengths = [len(tok.encode(t, bos=True)) for t in texts]
    off = np.concatenate([[0], np.cumsum(lengths)])
    direction = rng.standard_normal(D)
    arrays = {}
    for l in LAYERS:
        a = rng.standard_normal((off[-1], D))
        for i, ty in enumerate(types):
            a[off[i]] += 300.0 * (np.arange(D) == 0)  # a sink at position 0
            if ty == "testing":
                a[off[i] + 1:off[i + 1]] += 1.5 * l * direction / np.linalg.norm(direction)
        arrays[l] = {"prompt": a}
    meta = {"ids": [f"q{i}" for i in range(40)], "types": types,
            "labels": [int(t == "testing") for t in types],
            "model": {"fingerprint": "fp-report", "path": "/models/tiny",
                      "params": {"n_layers": 2}},
            "tokenizer": {"path": tok_path}, "data": {"path": data, "sha256": sha}}
    cache = os.path.join(tmp, "cache_all")
    save_cache(cache, arrays, meta, token="all", offsets={"prompt": off})
    mean_cache = os.path.join(tmp, "cache_mean")
    save_cache(mean_cache, {l: {"prompt": mean_state(arrays[l]["prompt"], off)} for l in LAYERS},
               meta, token="mean")
    probes = os.path.join(tmp, "run_probes")
    r = in_process(["ccs.py", "train", "--cache", mean_cache, "--output", probes,
                    "--bootstrap", "50", "--report"], ccs.main)
    assert r.returncode == 0, r.stderr
    r = script("generate_vectors_from_cache.py", "--cache", cache, "--output",
               os.path.join(tmp, "vec"))
    assert r.returncode == 0, r.stderr
    (vec_run,) = glob.glob(os.path.join(tmp, "vec_*"))
    vectors = os.path.join(vec_run, "normalized_vectors")
    cached = os.path.join(tmp, "run_cached")
    r = script("analyze_probe_from_cache.py", "--cache", cache, "--vectors", vectors,
               "--output", cached, "--report")
    assert r.returncode == 0, r.stderr
    steering = os.path.join(tmp, "run_steering")
    shutil.copytree(os.path.join(ROOT, "results", "steering"), steering)
    return dict(tokenizer=tok_path, data=data, cache=cache, mean_cache=mean_cache, probes=probes,
                cached=cached, vectors=vectors, steering=steering, texts=texts, lengths=lengths,
                types=types)


def read_json_blob(page: str) -> dict:
    start = page.index('class="heat-data">') + len('class="heat-data">')
    return json.loads(page[start:page.index("</script>", start)].replace("<\\/", "</"))
