"""scripts/serve.py on a tiny random model: the API key, refusals at start, probe read-outs against
a transformers forward, and model parallelism (MP 2 under torchrun gives MP 1's tokens)."""
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import in_process, one_line_error
from safetensors.numpy import save_file
from serving import Served
from test_parallel import free_port
from tiny import hf_model, hf_states, make_hf

from llama.cli import command
from server.main import serve

KEY = "test-key-123"
PROMPTS = ["hello there", "a", "the quick brown fox jumps"]
STEER = {"vector": "push", "layers": [1], "multiplier": 2.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve_tiny")
    path = make_hf(base / "mha", "mha")  # 4 heads, 4 kv heads: MP 1, 2 or 4
    rng = np.random.default_rng(1)
    vec_dir = base / "push"
    vec_dir.mkdir()
    save_file({"vector": rng.standard_normal(64).astype(np.float32)},
              str(vec_dir / "layer_1.safetensors"))
    wide = base / "wide"
    wide.mkdir()
    save_file({"vector": rng.standard_normal(32).astype(np.float32)},
              str(wide / "layer_1.safetensors"))
    other = base / "other"
    other.mkdir()
    save_file({"vector": rng.standard_normal(64).astype(np.float32)},
              str(other / "layer_1.safetensors"), metadata={"fingerprint": "0123456789abcdef"})
    # a single-prompt probe saved before probes recorded their chosen layer, in a run folder
    # whose summary.csv chose layer 1
    probes = base / "run" / "probes"
    probes.mkdir(parents=True)
    w = rng.standard_normal((1, 1, 64)).astype(np.float32)
    save_file({"w_raw": w, "b_raw": np.array([-0.5], np.float32), "direction": w[:, 0],
               "layers": np.array([1])}, str(probes / "lr.safetensors"))
    (probes / "lr.json").write_text(json.dumps({"method": "lr", "sides": ["prompt"]}))
    (base / "run" / "summary.csv").write_text("method,layer,split\nlr,1,test\n")
    # a contrast probe (a direction, bias 0, its sides' training means) that chose layer 1
    direction = rng.standard_normal((2, 64)).astype(np.float32)
    mean = rng.standard_normal((2, 2, 64)).astype(np.float32)
    save_file({"direction": direction, "mean": mean, "layers": np.array([0, 1])},
              str(base / "ccs.safetensors"))
    (base / "ccs.json").write_text(json.dumps({
        "method": "ccs", "sides": ["plus", "minus"], "chosen_layer": 1,
        "text": "cities.csv, contrast pairs"}))
    # the decision threshold: midway between the training classes' mean scores (each pair
    # gives one true and one false state, so the sides' means averaged)
    threshold = float(direction[1].astype(np.float64) @ mean[1].astype(np.float64).mean(0))
    return {"path": path, "vectors": str(vec_dir), "wide": str(wide), "other": str(other),
            "probe": str(probes / "lr.safetensors"), "w": w[0, 0],
            "contrast": str(base / "ccs.safetensors"), "direction": direction[1],
            "threshold": threshold}


def args(tiny, *more):
    """The contrast probe without --probe_layer: the layer it records."""
    return ["--model", tiny["path"], "--vectors", tiny["vectors"], "--probe", tiny["contrast"],
            "--threads", "1", "--device", "cpu", *map(str, more)]


@pytest.fixture(scope="module")
def mp1(tiny):
    with Served(args(tiny, "--api_key", KEY, "--max_batch", 2), api_key=KEY) as s:
        yield s


def answers(server, steer=None, probe=False):
    out = []
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "probe": probe}
        if steer:
            body["steering"] = steer
        r = server.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0])
    return out


def test_every_route_needs_the_key(mp1):
    import httpx

    with httpx.Client(base_url=mp1.url) as anon:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                             ("GET", "/v1/vectors"), ("GET", "/health")):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = anon.request(method, path, headers=headers, json={"prompt": "a"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=mp1.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = mp1.client().completions.create(model=mp1.model, prompt="a", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    r = mp1.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 400 and "no chat format" in r.json()["error"]["message"]


def test_probe_scores_equal_a_transformers_forward(mp1, tiny):
    from llama.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(tiny["path"], "tokenizer.json"))
    hf = hf_model(tiny["path"])
    for prompt, choice in zip(PROMPTS, answers(mp1, probe=True)):
        ids = tok.encode(prompt, bos=True)
        full, n = ids + choice["token_ids"], len(ids)
        assert len(choice["probe_scores"]) == len(choice["token_ids"]) > 0
        h = hf_states(hf, torch.tensor([full]))[1][0].double()
        want = (h @ torch.from_numpy(tiny["direction"]).double()).tolist()
        # the KV-cached decode vs transformers' full forward: float32 rounding on scores ~1-10
        assert choice["probe_prompt_score"] == pytest.approx(want[n - 1], abs=1e-3)
        assert choice["probe_scores"] == pytest.approx(want[n:], abs=1e-3)
        margins = [x - tiny["threshold"] for x in choice["probe_scores"]]
        assert choice["probe_margins"] == pytest.approx(margins, abs=1e-9)
        assert choice["probe_prompt_margin"] == pytest.approx(
            choice["probe_prompt_score"] - tiny["threshold"], abs=1e-9)
    probe = mp1.http.get("/v1/vectors").json()["probe"]
    assert probe["layer"] == 1 and probe["read_out"] == "direction"  # recorded, no flag
    assert probe["threshold"] == pytest.approx(tiny["threshold"], rel=1e-9)
    assert probe["text"] == "cities.csv, contrast pairs"
    chunks = mp1.stream("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 4,
                                            "temperature": 0, "probe": True})
    streamed = [c["choices"][0] for c in chunks if c["choices"][0].get("probe_scores")]
    assert streamed and all(
        c["probe_margins"] == pytest.approx([x - tiny["threshold"] for x in c["probe_scores"]])
        for c in streamed)


def serve_here(*argv):
    return in_process(["serve.py", *map(str, argv)], lambda: command(serve))


def test_refusals_at_start(tiny, dist1):
    r = serve_here("--model", tiny["path"], "--host", "0.0.0.0")
    one_line_error(r, "--host 0.0.0.0", "--api_key", "--no_auth")
    r = serve_here("--model", tiny["path"], "--api_key_env", "SERVE_TEST_UNSET_KEY")
    one_line_error(r, "SERVE_TEST_UNSET_KEY")
    r = serve_here("--model", tiny["path"], "--vectors", tiny["wide"], "--port", 0)
    one_line_error(r, "width 32", "64")
    r = serve_here("--model", tiny["path"], "--vectors", tiny["other"], "--port", 0)
    one_line_error(r, "another model")
    r = serve_here("--model", tiny["path"], "--probe", tiny["probe"], "--probe_layer", 2,
                   "--port", 0)
    one_line_error(r, "no layer 2")
    r = serve_here("--model", tiny["path"], "--probe", tiny["probe"], "--port", 0)
    one_line_error(r, "records no chosen layer", "--probe_layer 1", "summary.csv")


def rank0_pid(launcher_pid: int) -> int:
    """The pid of torchrun's worker with RANK=0."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == launcher_pid and b"RANK=0" in env:
            return int(entry)
    raise AssertionError("no rank 0 worker found")


def test_torchrun_mp2_serves_what_mp1_serves(mp1, tiny):
    want = answers(mp1), answers(mp1, STEER, probe=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    with Served(args(tiny, "--max_batch", 2), launcher=launcher,
                env={"OMP_NUM_THREADS": "1"}) as mp2:
        got = answers(mp2), answers(mp2, STEER, probe=True)
        chunks = mp2.stream("/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 12,
                                                "temperature": 0})
        os.kill(rank0_pid(mp2.proc.pid), signal.SIGTERM)  # rank 0 stops, then tells rank 1
        r = mp2.stop(sig=0)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want[0][2]["text"]
    assert [c["text"] for c in got[0]] == [c["text"] for c in want[0]]
    assert [c["text"] for c in got[1]] == [c["text"] for c in want[1]]
    assert [c["text"] for c in got[1]] != [c["text"] for c in want[0]]  # the steering did work
    for a, b in zip(got[1], want[1]):  # MP 2 sums partial products: float32 rounding
        assert a["probe_scores"] == pytest.approx(b["probe_scores"], abs=1e-3)


def test_sigterm_lets_an_inflight_stream_finish(tiny):
    with Served(args(tiny)) as s:
        body = {"prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "stream": True}
        with s.http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        done = s.stop()
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("stopped")
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in [first] + rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut
    assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) > 1


def test_stream_usage_logprobs_and_ignore_eos(mp1):
    body = {"prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0, "logprobs": 2,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    whole = mp1.post("/v1/completions", body).json()
    chunks = mp1.stream("/v1/completions", body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 6
    streamed = [v for c in chunks[:-1] if c["choices"][0]["logprobs"]
                for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    # the same tokens' log-probabilities, decoded alone both times
    assert streamed == pytest.approx(whole["choices"][0]["logprobs"]["token_logprobs"], abs=1e-5)
    lp = whole["choices"][0]["logprobs"]
    for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"]):
        # greedy: the chosen token is the most likely one (tokens of the same text share a key)
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-6)
