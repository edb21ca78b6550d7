"""bench_serve's "offline" configuration (the ceiling of any server on vLLM's engine): a tiny
random LLaMA run by bench/vllm_offline.py through bench_serve's Offline driver answers each order
with every token it asked for, survives a pause, and its end of input stops it. Runs in the
.venv-vllm/ of `make setup-vllm` (`make test-heavy`); one engine start-up."""
import importlib.util
import os
import sys

import pytest
import torch

from conftest import ROOT
from smol import gpu_parts

pytestmark = pytest.mark.heavy


def bench_serve():
    spec = importlib.util.spec_from_file_location(
        "bench_serve", os.path.join(ROOT, "bench", "bench_serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_engine_answers_waves_and_stops(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, vocab_size=259,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).float().save_pretrained(tmp_path / "model")
    gpu_parts().write_tokenizer(str(tmp_path / "model"))
    bench = bench_serve()
    env = {**os.environ, "PYTHONPATH": ROOT, "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_PLUGINS": "", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    engine = bench.Offline([sys.executable, os.path.join(ROOT, "bench", "vllm_offline.py"),
                            str(tmp_path / "model"), "8"], env, str(tmp_path / "offline.log"))
    try:
        assert engine.ready() is None, engine.last_line()
        got = engine.measure("offline", False, 4, 8, 6)  # 8 from 4 clients: 2 waves of 4
        assert got["requests"] == 8 and got["tokens"] == 8 * 6
        assert got["tokens_per_s"] > 0 and got["p50_s"] * 2 == pytest.approx(got["wall_s"])
        engine.pause(True)
        engine.pause(False)
        assert engine.measure("offline", False, 2, 2, 3)["tokens"] == 2 * 3
    finally:
        engine.stop()
    assert engine.proc.returncode is not None
