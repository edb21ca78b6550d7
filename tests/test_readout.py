"""The read position as one concept (activations/readout.py), the cache-reuse key derived from the
settings, and one reader protocol per checkpoint format (llama/checkpoint.py)."""
import os

import numpy as np
import pytest
import torch
from tiny import make_hf, make_meta

from activations import readout
from llama.checkpoint import (FORMATS, GGUFWeights, HFWeights, Shards, checkpoint_format,
                              load_meta_state, open_source, read_args, resolve)
from llama.errors import LlamaError
from activations.extract import Extraction


def test_positions_of_each_token_mode():
    lengths = np.array([[3, 1], [2, 4]])
    last, mean, every = (readout.positions(t, lengths) for t in ("last", "mean", "all"))
    assert last.shape == (2, 2, 4)
    assert last[0, 0].tolist() == [False, False, True, False] and last[0, 1].tolist()[0]
    # mean leaves out position 0 (the attention sink) unless it is the only one
    assert mean[0, 0].tolist() == [False, True, True, False] and mean[0, 1].tolist()[0]
    assert readout.positions("mean", lengths, keep_first=True)[1, 1].all()
    assert every.sum() == lengths.sum()
    with pytest.raises(ValueError):
        readout.positions("first", lengths)


def test_split_and_read_match_the_whole_sequence():
    """States read through a shared prefix + suffixes equal those read from whole rows."""
    rng = np.random.default_rng(0)
    lengths, shared = np.array([[5, 4], [3, 3]]), np.array([2, 0])
    dim, B, k = 3, 2, 2
    whole = torch.tensor(rng.normal(size=(B, k, 5, dim)), dtype=torch.float32)
    for b in range(B):  # the sides share their prefix states
        whole[b, 1, : shared[b]] = whole[b, 0, : shared[b]]
    S = int((lengths - shared[:, None]).max())
    suffix = torch.zeros(B, k, S, dim)
    for b in range(B):
        for s in range(k):
            n = lengths[b, s] - shared[b]
            suffix[b, s, :n] = whole[b, s, shared[b]: lengths[b, s]]
    prefix = whole[:, 0, : shared.max()]
    for token in readout.TOKEN_MODES:
        mask = readout.positions(token, lengths)
        got = readout.read(token, readout.split(mask, shared, S), suffix, prefix)
        for b in range(B):
            for s in range(k):
                rows = whole[b, s][torch.from_numpy(mask[b, s])]
                want = rows if readout.per_token(token) else rows.mean(0)
                have = got[s][b] if readout.per_token(token) else got[b, s]
                # float32 sums of a few values: equal to rounding
                assert torch.allclose(have, want, atol=1e-6), (token, b, s)


def test_answer_scores_are_the_positions_before_each_answer_token():
    scores = readout.answer_scores(np.array([[5, 6]]), np.array([3]))
    assert scores[0, 0].tolist() == [False, False, True, True, False, False]
    assert scores[0, 1].tolist() == [False, False, True, True, True, False]


def test_reuse_key_comes_from_the_settings():
    key = Extraction("m", "d", "o").reuse_key([1, 2], "float32", "sha")
    same = Extraction("m2", "d2", "o2", mp=2, device="cpu", overwrite=True, commit_every=1,
                      tokenizer_path="t").reuse_key([1, 2], "float32", "sha")
    assert key == same  # how a run goes is not what its cache holds
    assert set(key) == {"data_sha256", "layers", "token", "dtype", "model_dtype", "zero_shot",
                        "max_batch_tokens", "batch_size"}
    mean = Extraction("m", "d", "o", token="mean", mean_keep_first=True)
    assert mean.reuse_key([1], "float32", "sha")["mean_keep_first"] is True
    steered = Extraction("m", "d", "o", steer="v", steer_layers="3", multiplier=2)
    assert steered.reuse_key([1], "float32", "sha")["steer"] == {
        "vectors": os.path.abspath("v"), "layers": "3", "multiplier": 2.0, "ablate": False}
    assert Extraction("m", "d", "o", max_batch_tokens=64).reuse_key([1], "float32", "sha") != key


def test_one_reader_per_format(tmp_path):
    hf = make_hf(tmp_path / "hf", "gqa")
    args, sd = load_meta_state(hf)
    meta = make_meta(tmp_path / "meta", sd, args, shards=2)
    from llama.gguf import default_model_path

    gguf = str(default_model_path())
    assert [f.kind for f in FORMATS] == ["gguf", "meta", "hf"]
    for path, kind, cls in ((hf, "hf", HFWeights), (meta, "meta", Shards),
                            (gguf, "gguf", GGUFWeights)):
        assert checkpoint_format(path)[1].kind == kind
        assert read_args(path).n_layers > 0
        if kind == "gguf":
            continue  # reading the whole GGUF is test_gguf's job
        weights, got, _ = open_source(str(path))
        assert got == kind and isinstance(weights, cls)
        assert set(weights.shapes) == set(sd)
        for name in sd:  # the same weights in Meta's layout whatever the format
            assert torch.equal(weights.read(name), sd[name]), name
    assert resolve(str(hf)) == str(hf)
    with pytest.raises(LlamaError, match="no such checkpoint"):
        checkpoint_format(tmp_path / "nothing")
    with pytest.raises(LlamaError, match="local Hugging Face cache"):
        resolve("nobody/no-such-model-xyz")


def test_rows_of_a_run_or_of_scattered_positions():
    x = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(readout._rows(x, np.array([0, 1, 1, 0, 0], bool)), x[1:3])
    assert torch.equal(readout._rows(x, np.array([1, 0, 1, 0, 0], bool)), x[[0, 2]])
    assert readout._rows(x, np.zeros(5, bool)).shape == (0, 2)


def test_the_read_position_modes_are_one_list():
    """Every command's --token is typed by activations.readout.Token, and TOKEN_MODES holds the
    same modes: a new mode is added in one place."""
    import dataclasses
    import inspect
    from typing import get_args

    from activations import cache_activations, extract
    from steering import analyze_model, mean_diff_model

    assert tuple(readout.TOKEN_MODES) == get_args(readout.Token)
    for fn in (mean_diff_model.main, analyze_model.main):
        assert inspect.signature(fn).parameters["token"].annotation is readout.Token
    for cls in (extract.Extraction, cache_activations.Cached):
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        assert fields["token"] is readout.Token
