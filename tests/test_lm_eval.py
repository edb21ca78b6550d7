"""lm-evaluation-harness end to end against scripts/serve.py on SmolLM2 (heavy: `make test-heavy`,
which installs lm-eval first). lm-eval's `local-completions` with its default settings (token-id
prompts from the server's /tokenize, --batch_size 2, no tokenizer argument) scores the local
multiple-choice tasks of bench/tasks; its per-item log-likelihoods must equal lm-eval's own `hf`
model on the same float32 weights (a Hugging Face copy of the GGUF made here) to 1e-3, and a
steered alias must equal lm-eval's own `steered` model at the same vector, layer and multiplier.
Then bench/bench_capability.py runs on a tiny slice."""
import importlib.util
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

from bench.bench_capability import loglikelihoods, local_completions, run_lm_eval
from llama.gguf import default_model_path

pytestmark = pytest.mark.heavy

TASKS = ["ccs_capitals", "ccs_sentiment"]
LIMIT = 12  # items per task
LAYER, MULTIPLIER = 10, 1.0  # this project's layer L is Hugging Face's layers.{L-1} output
TOL = 1e-3


@pytest.fixture(scope="module")
def lm_eval_installed():
    if importlib.util.find_spec("lm_eval") is None:
        pytest.fail("lm-eval is not installed: `make setup-lmeval` installs it", pytrace=False)


def hf_copy(out: str) -> str:
    """SmolLM2's GGUF as a Hugging Face folder: transformers loads the GGUF (dequantised to
    float32) but will not save it, so its weights go into a fresh LlamaForCausalLM. The
    tokenizer keeps SmolLM2's own pre-tokenizer (digits split singly, then GPT-2's byte-level
    split), which transformers' GGUF reader leaves out."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                              LlamaForCausalLM)

    folder, name = os.path.split(str(default_model_path()))
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config")  # the weights saved are plain float32
    fresh = LlamaForCausalLM(LlamaConfig.from_dict(config))
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    path = os.path.join(out, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": True}]}
    with open(path, "w") as f:
        json.dump(tok, f)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, lm_eval_installed):
    base = tmp_path_factory.mktemp("lm_eval")
    hf_dir = hf_copy(str(base / "hf"))
    vector = np.random.default_rng(0).standard_normal(576).astype(np.float32)
    vector *= 40.0 / np.linalg.norm(vector)  # about a third of the residual norm at layer 10
    (base / "push").mkdir()
    save_file({"vector": vector}, str(base / "push" / f"layer_{LAYER}.safetensors"))
    steer_file = str(base / "push.pt")
    torch.save({f"layers.{LAYER - 1}": {"steering_vector": torch.from_numpy(vector),
                                        "steering_coefficient": MULTIPLIER, "action": "add"}},
               steer_file)
    return {"base": base, "hf": hf_dir, "vectors": str(base / "push"), "steer": steer_file}


@pytest.fixture(scope="module")
def server(setup):
    args = ["--model", str(default_model_path()), "--vectors", f"push={setup['vectors']}",
            "--alias", f"pushed=push:{LAYER}:{MULTIPLIER}", "--threads", "2", "--max_batch", "4"]
    with Served(args) as s:
        yield s


def run(setup, name, model, model_args, extra=()):
    return run_lm_eval(model, model_args, TASKS, str(setup["base"] / name), limit=LIMIT,
                       extra=list(extra))


@pytest.fixture(scope="module")
def reference(setup):
    """lm-eval's own models on the Hugging Face copy: `hf` and `steered`."""
    common = f"pretrained={setup['hf']},dtype=float32"
    cpu = ["--device", "cpu"]
    return {"base": run(setup, "hf", "hf", common, cpu),
            "pushed": run(setup, "steered", "steered", f"{common},steer_path={setup['steer']}",
                          cpu)}


def same_choices(got: np.ndarray, want: np.ndarray):
    """Per-item log-likelihoods [items, choices] equal to TOL, hence the same choice wherever
    the reference's best two choices are more than TOL apart."""
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()
    top2 = np.sort(want, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > TOL
    assert (got.argmax(1) == want.argmax(1))[clear].all()


def test_tokenizer_routes_match_the_hf_copy(server, setup):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(setup["hf"])
    texts = []
    for task in ("capitals", "sentiment"):
        with open(os.path.join(ROOT, "bench", "tasks", f"{task}.jsonl")) as f:
            for line in f:
                doc = json.loads(line)
                texts += [doc.get("question") or f"Review: {doc['text']}\nSentiment:"]
                texts += [" " + c for c in doc["choices"]]
    texts += ["There are 12 months and 365 days.", "  spaces  and\ttabs\n\n<|im_end|> x"]
    for text in texts:
        got = server.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()
        assert got["tokens"] == hf(text, add_special_tokens=False).input_ids, text


def test_local_completions_defaults_equal_lm_eval_hf(server, setup, reference):
    got = run(setup, "served", "local-completions", local_completions(server.url, server.model))
    for task in TASKS:
        same_choices(loglikelihoods(got[task]), loglikelihoods(reference["base"][task]))


def test_steered_alias_equals_lm_eval_steered(server, setup, reference):
    got = run(setup, "served_pushed", "local-completions", local_completions(server.url,
                                                                               "pushed"))
    for task in TASKS:
        want = loglikelihoods(reference["pushed"][task])
        same_choices(loglikelihoods(got[task]), want)
        unsteered = loglikelihoods(reference["base"][task])
        assert np.abs(want - unsteered).max() > 0.05  # the vector moves the log-likelihoods


VLLM_PYTHON = os.path.join(ROOT, ".venv-vllm", "bin", "python")  # `make setup-vllm`


@pytest.fixture(scope="module")
def on_vllm(setup):
    """`serve --engine vllm` on the Hugging Face copy, started with the .venv-vllm/ python (vLLM
    lives there; lm-eval here), with the same vector and alias as `server`."""
    if not os.path.isfile(VLLM_PYTHON):
        pytest.fail(f"{VLLM_PYTHON} is missing: `make setup-vllm` makes it", pytrace=False)
    args = ["--engine", "vllm", "--model", setup["hf"], "--vectors", f"push={setup['vectors']}",
            "--alias", f"pushed=push:{LAYER}:{MULTIPLIER}", "--max_batch", "4",
            "--max_seq_len", "1024"]
    with Served(args, launcher=[VLLM_PYTHON],
                env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}) as s:
        yield s


def test_local_completions_on_vllm_equal_lm_eval_hf_and_steered(on_vllm, setup, reference):
    """The same lm-eval runs against `serve --engine vllm`: its defaults (token ids from the
    server's /tokenize, lists of prompts, echo with prompt log-probabilities) and the steered
    alias give lm-eval's own `hf` and `steered` log-likelihoods to TOL."""
    for alias, want in ((on_vllm.model, "base"), ("pushed", "pushed")):
        got = run(setup, f"vllm_{want}", "local-completions", local_completions(on_vllm.url,
                                                                                  alias))
        for task in TASKS:
            same_choices(loglikelihoods(got[task]), loglikelihoods(reference[want][task]))


def test_bench_capability_tiny_slice(setup, tmp_path):
    out = tmp_path / "capability.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_capability.py"),
                        "--vectors", f"push={setup['vectors']}",
                        "--alias", f"pushed=push:{LAYER}:{MULTIPLIER}",
                        "--alias", f"pulled=push:{LAYER}:-{MULTIPLIER}", "--limit", "3",
                        "--output", str(out)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=3000)
    assert r.returncode == 0, r.stderr[-2000:]
    import csv

    with open(tmp_path / "capability.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["task"] for row in rows] == ["ccs_capitals", "ccs_sentiment",
                                             "ccs_capitals_gen"]
    model = os.path.splitext(os.path.basename(str(default_model_path())))[0]
    for row in rows:
        assert row["items"] == "3"
        assert row["metric"] == ("exact_match" if row["task"].endswith("_gen") else "acc")
        for name in (model, "pushed", "pulled"):
            mean, lo, hi = (float(row[name + s]) for s in ("", "_lo", "_hi"))
            assert 0 <= lo <= mean <= hi <= 1
            assert mean * 3 == pytest.approx(round(mean * 3))  # a mean over 3 items of 0 or 1
    text = out.read_text()
    assert text.count("| ccs_") == 3 and "pushed" in text and "pulled" in text
