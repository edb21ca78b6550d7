"""The demo (README command 1, less its install step) on the real default model,
SmolLM2-135M-Instruct, over a small real dataset: GGUF -> Meta layout -> cities contrast pairs ->
torchrun extraction of every layer -> CCS and the baselines. Then a second run, which must reuse
the model and the cache."""
import os
import subprocess

import pandas as pd
import pytest

from conftest import ROOT
from activations.cache import ActivationCache
from probes.report import COLUMNS

METHODS = {"ccs", "ccs_signed", "lr", "lr_concat", "mean_diff", "crc_tpc", "crc_tpc_signed",
           "random", "zero_shot", "majority"}


def demo(out):
    env = {**os.environ, "DEMO_DIR": str(out), "DEMO_ROWS": "160", "OMP_NUM_THREADS": "2"}
    r = subprocess.run(["timeout", "600", "bash", os.path.join(ROOT, "scripts", "demo.sh")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.mark.heavy
def test_demo_on_smollm2(tmp_path):
    run = demo(tmp_path)
    log = run.stdout + run.stderr
    assert "Done. Look at:" in log
    report = tmp_path / "runs" / "cities" / "report.html"  # ccs.py train --report
    # the last line on stdout names the report (progress bars go to stderr)
    assert run.stdout.strip().splitlines()[-1].endswith(str(report))
    assert report.stat().st_size > 10000
    cache = ActivationCache(str(tmp_path / "caches" / "cities"))
    assert (cache.layers == list(range(31)) and cache.num_examples == 160
            and cache.hidden_dim == 576)
    assert sorted(cache.labels.tolist()) == [0] * 80 + [1] * 80

    df = pd.read_csv(tmp_path / "runs" / "cities" / "eval.csv")
    assert list(df.columns) == COLUMNS
    assert set(df.method) == METHODS
    for m, g in df.groupby("method"):
        assert sorted(g.layer) == list(range(31)), m  # every layer, once per method
    assert (df.split == "test").all() and (df.n == df.n.iloc[0]).all() and 0 < df.n.iloc[0] < 160
    assert df.accuracy.between(0, 1).all() and df.auroc.between(0, 1).all()
    # one layer per method, chosen on validation; zero_shot and majority have none
    chosen = df.groupby("method").chosen.sum()
    assert (chosen.drop(["zero_shot", "majority"]) == 1).all()
    assert chosen[["zero_shot", "majority"]].eq(0).all()
    lr = df[df.method == "lr"].set_index("layer").accuracy
    majority = df[df.method == "majority"].set_index("layer").accuracy
    # held-out: the model knows which country a city is in
    assert lr.max() > majority[lr.idxmax()] + 0.1
    for png in ("layers.png", "roc.png", "hist.png"):
        assert (tmp_path / "runs" / "cities" / png).stat().st_size > 10_000

    # the sentiment vector and the probe are ready, and the printed serve command uses both
    lines = run.stdout.splitlines()
    command = lines[lines.index("Serve the model with the vector (as 'sentiment') and the lr "
                                "probe (at the layer it chose):") + 1].split()
    assert command[1] == "scripts/serve.py"
    from serving import Served

    with Served(command[2:] + ["--max_batch", "2", "--threads", "2"]) as server:
        info = server.http.get("/v1/vectors").json()
        assert info["data"][0]["id"] == "sentiment" and info["data"][0]["layers"] == [6, 10, 14]
        assert info["probe"]["layer"] == int(pd.read_csv(
            tmp_path / "runs" / "cities" / "summary.csv").set_index("method").layer["lr"])
        answer = server.complete("The weather today is", max_tokens=6, probe=True, steering={
            "vector": "sentiment", "layers": [10], "multiplier": 0.5, "scale": "residual"})
        choice = answer["choices"][0]
        assert len(choice["probe_margins"]) == len(choice["token_ids"]) > 0

    again = demo(tmp_path)
    again = again.stdout + again.stderr
    assert "already" in again.split("== 2/5")[0]  # the converted model is reused
    assert "nothing to do" in again.split("== 3/5")[1].split("== 4/5")[0]  # and so is the cache
    assert "already made: " in again.split("== 5/5")[1]  # and the sentiment vector
