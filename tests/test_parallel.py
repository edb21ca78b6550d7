"""torchrun with 2 and 4 CPU processes (gloo) gives the model-parallel-1 states, from HF dirs and
from Meta dirs of 1, 2 and 8 shards (kv heads replicated where mp exceeds them)."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from tiny import make_hf, make_meta, tokens

from llama.checkpoint import load_meta_state, load_model


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("par")
    hf = {k: make_hf(base / k, k) for k in ("mha", "gqa", "tied")}
    meta = {}
    for kind, shards in (("gqa", 1), ("gqa", 2), ("tied", 8)):
        args, sd = load_meta_state(hf[kind])
        args.vocab_parallel_embedding = kind == "gqa"  # Llama 3 splits the embedding by vocab
        meta[kind, shards] = make_meta(base / f"{kind}-{shards}", sd, args, shards=shards,
                                       tokenizer_from=hf[kind])
    return hf, meta


@pytest.mark.parametrize("n,mp", [(2, 2), (4, 4), (4, 2)])
def test_torchrun_matches_mp1(ckpts, dist1, tmp_path, n, mp):
    hf, meta = ckpts
    # mp 4: 2 kv heads replicated to 4; (4, 2): two data-parallel groups, shards by model-parallel
    # rank
    paths = {
        (2, 2): [hf["gqa"], meta["gqa", 1], meta["tied", 8]],
        (4, 4): [meta["gqa", 2], meta["tied", 8], hf["mha"], hf["gqa"]],
        (4, 2): [meta["gqa", 2], hf["tied"]],
    }[n, mp]
    cmd = ["timeout", "240", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
           str(n), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "torchrun_worker.py"), str(tmp_path), str(mp),
           *map(str, paths)]
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for i, path in enumerate(paths):
        ref = load_model(path, dist1).model(tokens(), logits=True)
        for key, want in ref.items():
            got = [np.load(tmp_path / f"{i}.{key}.rank{r}.npy") for r in range(n)]
            err = np.linalg.norm(got[0] - want.numpy()) / np.linalg.norm(want.numpy())
            assert err < 1e-5, (path, key, err)
            assert all(np.array_equal(g, got[0]) for g in got[1:]), (path, key)


def test_session_tears_down_only_its_own_group(dist1):
    """llama.dist.session / owned_group, the one set-up and teardown around every command: a
    group it starts is ended when the work ends, on an error too; a caller's is left alone."""
    import torch.distributed as tdist

    from llama.dist import session

    with session(1, "cpu") as proc:  # dist1's group exists: reused, then left alone
        assert proc.world == 1
    assert tdist.is_initialized()
    code = ("import torch.distributed as d\n"
            "from llama.dist import session\n"
            "try:\n"
            "    with session(1, 'cpu'):\n"
            "        assert d.is_initialized()\n"
            "        raise ValueError('work failed')\n"
            "except ValueError:\n"
            "    pass\n"
            "print('after', d.is_initialized())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("after False"), r.stderr
