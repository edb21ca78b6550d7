"""Extraction under torchrun (gloo, CPU): model parallel 2, and model parallel 2 x data parallel 2,
write the cache a single process writes (float32, within 1e-5)."""
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
import tiny
from activations.cache import LOCK, ActivationCache
from activations.extract import Extraction, run
from test_extract import pair_rows, write_csv

CLI = os.path.join(ROOT, "scripts", "cache_activations.py")
FLAGS = ["--token", "all", "--zero_shot", "--batch_size", "2", "--layers", "0,1,3"]


def torchrun(n, args, timeout=170):
    cmd = ["timeout", str(timeout), sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(n), CLI, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def setup_mp1(tmp_path_factory, dist1):
    tmp = tmp_path_factory.mktemp("par")
    hf = tiny.make_hf(tmp / "gqa", "gqa")
    data = write_csv(tmp / "pairs.csv", pair_rows(9, seed=3))
    ref = run(Extraction(hf, data, str(tmp / "mp1"), token="all", zero_shot=True, batch_size=2,
                         layers="0,1,3"))
    return hf, data, ActivationCache(ref)


@pytest.mark.parametrize("world", [2, 4])
def test_model_and_data_parallel_equal_one_process(setup_mp1, tmp_path, world):
    hf, data, ref = setup_mp1
    r = torchrun(world, ["--model", hf, "--data", data, "--output", tmp_path / "c", "--mp", 2,
                         *FLAGS])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("cached 9 examples") == 1  # one rank reports
    c = ActivationCache(str(tmp_path / "c"))
    assert c.meta["parallel"] == {"world": world, "mp": 2, "dp": world // 2}
    groups = sorted(os.listdir(tmp_path / "c" / "progress"))
    # every data-parallel group wrote its share
    assert groups == [f"group_{g}.json" for g in range(world // 2)]
    for side in ref.sides:
        assert (c.offsets(side) == ref.offsets(side)).all()
        for layer in ref.layers:
            a, b = c.array(layer, side), ref.array(layer, side)
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert np.abs(c.logprobs - ref.logprobs).max() < 1e-4
    assert c.ids == ref.ids and (c.labels == ref.labels).all()


def test_refusal_on_rank0_stops_every_rank(setup_mp1, tmp_path):
    """rank 0 finds the directory locked: every rank exits (no rank left waiting), one error
    line."""
    hf, data, _ = setup_mp1
    out = tmp_path / "c"
    out.mkdir()
    with open(out / LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        r = torchrun(2, ["--model", hf, "--data", data, "--output", out, "--mp", 2], timeout=120)
    assert r.returncode not in (0, 124), r.stderr[-2000:]
    printed = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(printed) == 1 and "another extraction" in printed[0], r.stderr[-2000:]
    # torchrun's failure report ends with the worker's line, not a pointer to its documentation.
    # Which rank's failure torchrun reports as the root cause is a race, so every rank's entry
    # (root cause and "other failures") must hold the line, whichever rank finished first.
    last = [line for line in r.stderr.strip().splitlines() if line.strip("=")][-1]
    ours = r"\s*traceback : error: --output .* is being written by another extraction.*"
    assert re.fullmatch(ours, last), last
    entries = [line for line in r.stderr.splitlines() if line.strip().startswith("traceback :")]
    assert len(entries) == 2 and all(re.fullmatch(ours, line) for line in entries), entries


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_ctrl_c_says_what_was_kept_in_one_line(setup_mp1, tmp_path, launcher):
    """Ctrl-C (SIGINT to the terminal's process group) mid-extraction: one `error: interrupted: K
    of M prompts committed; ...` line from the worker, no traceback of ours, exit 130 under python;
    the same command then says it resumes from K. Under torchrun its launcher still adds its own
    SignalException traceback after our line (torchrun's, not the worker's: README)."""
    hf, _, _ = setup_mp1
    data = write_csv(tmp_path / "many.csv", pair_rows(3000, seed=1))
    out = tmp_path / "c"
    args = [CLI, "--model", hf, "--data", data, "--output", out, "--batch_size", 1, "--layers", 1]
    pre = [sys.executable] if launcher == "python" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([*pre, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, start_new_session=True)
    t0 = time.time()
    while not os.path.isdir(out / "progress") and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, err[-3000:]
    m = re.fullmatch(r"error: interrupted: (\d+) of 6000 prompts committed; "
                     r"run the same command to resume", ours[0])
    assert m and 0 < int(m.group(1)) < 6000, ours
    assert "KeyboardInterrupt" not in err and "llama/" not in err  # no traceback from the worker
    if launcher == "python":
        assert p.returncode == 130 and "Traceback" not in err
        r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"resuming: {m.group(1)} of 6000 prompts done" in r.stdout
        assert ActivationCache(str(out)).num_examples == 3000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mp", [2, 4])
def test_two_nodes_on_localhost_equal_one_process(setup_mp1, tmp_path, mp):
    """Two torchrun launchers (--nnodes 2, 2 processes each) as two nodes: MP 2 x DP 2 (one
    model-parallel group per node) and MP 4 (one group across both nodes) write the single-process
    cache."""
    hf, data, ref = setup_mp1
    port = free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
              "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    args = [CLI, "--model", hf, "--data", data, "--output", tmp_path / "c", "--mp", mp, *FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(["timeout", "170", *launch, "--node_rank", str(i), *map(str, args)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [n.communicate() for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    # global rank 0 reports, on node 0
    assert sum(out.count("cached 9 examples") for out, _ in outs) == 1
    c = ActivationCache(str(tmp_path / "c"))
    assert c.meta["parallel"] == {"world": 4, "mp": mp, "dp": 4 // mp}
    for side in ref.sides:
        for layer in ref.layers:
            a, b = c.array(layer, side), ref.array(layer, side)
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert c.ids == ref.ids
