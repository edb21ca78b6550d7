"""scripts/serve.py on a tiny random model: the API key, refusals at start, probe read-outs against
a transformers forward, and model parallelism (MP 2 under torchrun gives MP 1's tokens)."""
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from bad_requests import (INNOCENT, check_clients_let_go, check_hostile, check_http, check_key,
                          hostile)
from conftest import in_process, one_line_error
from safetensors.numpy import save_file
from serving import Served, generated
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
    twin = base / "twin"  # one vector at layers 0 and 1: two pushes that add up
    twin.mkdir()
    for layer in (0, 1):
        save_file({"vector": rng.standard_normal(64).astype(np.float32)},
                  str(twin / f"layer_{layer}.safetensors"))
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
    return {"path": path, "vectors": str(vec_dir), "twin": str(twin), "wide": str(wide),
            "other": str(other),
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
    check_key(mp1, KEY)
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
    r = serve_here("--model", tiny["path"], "--api_key", "")
    one_line_error(r, "--api_key is empty")
    r = serve_here("--model", tiny["path"], "--shutdown_grace", -1)
    one_line_error(r, "--shutdown_grace")
    r = serve_here("--model", tiny["path"], "--engine", "tgi")
    one_line_error(r, "--engine", "native or vllm")
    r = serve_here("--model", tiny["path"], "--tensor_parallel_size", 2)
    one_line_error(r, "--tensor_parallel_size", "torchrun")
    r = serve_here("--model", tiny["path"], "--pipeline_parallel_size", 2)
    one_line_error(r, "--pipeline_parallel_size", "torchrun")
    r = serve_here("--model", tiny["path"], "--engine", "vllm")  # this environment has no vLLM
    one_line_error(r, "make setup-vllm")


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


# ------------------------------------------------------------ one request cannot knock it over

OVERFLOW = {"vector": "twin", "layers": [0, 1], "multiplier": 1e38}  # each push fits float32
HOSTILE = hostile(STEER, OVERFLOW)


@pytest.fixture(scope="module")
def shared(tiny):
    """One server for every hostile request: two rows, so an innocent request shares its batch."""
    with Served(args(tiny, "--max_batch", 2, "--vectors", tiny["twin"], "--read_timeout", 2)) as s:
        yield s
        r = s.stop()
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def innocent_reference(tiny, tmp_path_factory, dist1):
    return generated(tiny["path"], [INNOCENT], tmp_path_factory.mktemp("ref"), 8)[0][0]


def test_hostile_requests_leave_the_server_and_other_rows_alone(shared, innocent_reference):
    check_hostile(shared, HOSTILE, innocent_reference, long_tokens=1800)


def test_a_failed_scheduler_ends_the_server(tiny, dist1, monkeypatch):
    """A scheduler that fails (here a decode step that raises, as a lost rank would): the request
    under it gets a 503 in OpenAI's shape, /health answers 503 naming the error, and the serve
    command exits non-zero with one error line instead of listening on with no one to answer."""
    import threading
    import time

    import httpx
    from fastapi.testclient import TestClient

    from server import app as app_mod
    from server.engine import Engine

    real = Engine.run

    def failing(self, step):
        if step["op"] == "decode":
            raise RuntimeError("rank 1 is gone")
        return real(self, step)

    monkeypatch.setattr(Engine, "run", failing)
    built = []
    monkeypatch.setattr(app_mod, "build_app", lambda served, real=app_mod.build_app:
                        built.append(served) or real(served))
    port, answers = free_port(), []

    def client():
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                answers.append(httpx.post(url + "/v1/completions", timeout=60,
                                          json={"prompt": "hi", "max_tokens": 4}))
                return
            except httpx.TransportError:
                time.sleep(0.1)

    thread = threading.Thread(target=client)
    thread.start()
    r = serve_here("--model", tiny["path"], "--port", port, "--threads", 1)
    thread.join()
    one_line_error(r, "the scheduler stopped", "rank 1 is gone")
    (answer,) = answers
    assert answer.status_code == 503 and "rank 1 is gone" in answer.json()["error"]["message"]
    app = app_mod.build_app(built[0])
    health = TestClient(app, base_url="http://127.0.0.1").get("/health")
    assert health.status_code == 503 and "rank 1 is gone" in health.json()["error"]


def test_http_refusals_and_routes(shared):
    """bad_requests.check_http, and /v1/vectors names files without their folders."""
    check_http(shared)
    info = shared.http.get("/v1/vectors").json()
    assert [v["source"] for v in info["data"]] == ["push", "twin"]
    assert info["probe"]["source"] == "ccs.safetensors"  # the file name only, no folders


def test_clients_that_leave_or_crawl_are_let_go(shared):
    check_clients_let_go(shared, max_tokens=2000)


def test_sigterm_ends_every_open_request_after_the_grace(tiny):
    """--shutdown_grace 0.5: a stream and a whole answer still running then are each ended with a
    503 error in OpenAI's shape (the stream: an error event, then [DONE]); exit 0, `stopped`."""
    import threading

    long = {"prompt": "q", "max_tokens": 2040, "temperature": 0, "ignore_eos": True}
    with Served(args(tiny, "--shutdown_grace", 0.5)) as s:
        whole = []
        thread = threading.Thread(target=lambda: whole.append(s.post("/v1/completions", long)))
        thread.start()
        with s.http.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        thread.join()
        done = s.stop()
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("stopped")
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]
    (r,) = whole
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]


def test_the_listening_socket_sets_tcp_nodelay():
    """Without TCP_NODELAY each answer on a reused connection waited ~40 ms (Nagle's algorithm
    against delayed ACKs): the accepted connections carry it."""
    import socket

    from server.main import bind

    listener = bind("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()) as client:
        conn, _ = listener.accept()
        with conn:
            assert conn.proto == socket.IPPROTO_TCP
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert client.fileno() == -1


def test_residual_scale_is_steering_scale_everywhere(shared, tiny, tmp_path, dist1):
    """The server's residual norms (GET /v1/vectors) are steering/scale.py's measure() on the
    built-in prompts (neutral_norms), and scripts/generate.py --scale residual given those prompts
    reports the same norms: one rule, so one multiplier pushes the same in both."""
    import re

    from conftest import in_process

    import steering.generate as generate_cmd
    from llama.generation import BUILTIN_PROMPTS, Generator
    from llama.vectors import load_vectors
    from steering.scale import measure, neutral_norms

    served = {v["id"]: v["residual_norms"] for v in shared.http.get("/v1/vectors").json()["data"]}
    gen = Generator.build(tiny["path"], dist1)
    here = neutral_norms(gen.model, gen.tokenizer, [0, 1])
    vecs = load_vectors(tiny["twin"], [0, 1], 64, 2)
    ids = [gen.tokenizer.encode(t, bos=True) for t in BUILTIN_PROMPTS]
    measured = measure(gen.model, ids, [0] * len(ids), vecs)
    src = tmp_path / "builtin.json"
    src.write_text(json.dumps(BUILTIN_PROMPTS))
    r = in_process(["generate.py", "--model", tiny["path"], "--prompts", src, "--max_gen_len", 1,
                    "--steer", tiny["twin"], "--steer_layers", "0,1", "--scale", "residual",
                    "--output", tmp_path / "out.jsonl"],
                   lambda: generate_cmd.command(generate_cmd.main))
    assert r.returncode == 0, r.stderr
    printed = {int(m[0]): float(m[1]) for m in
               re.findall(r"layer +(\d+) .*; unit ([0-9.e+-]+) \(neutral prompts\)", r.stderr)}
    for layer in (0, 1):
        # the server sums in float64 as here (same positions, same prompts): float32 forwards
        assert served["twin"][str(layer)] == pytest.approx(here[layer], rel=1e-6)
        assert measured[layer].norm == pytest.approx(here[layer], rel=1e-9)
        assert printed[layer] == pytest.approx(here[layer], rel=1e-6)  # printed to 9 digits
    assert served["push"]["1"] == pytest.approx(here[1], rel=1e-6)


@pytest.mark.heavy
def test_64_concurrent_clients_get_their_sequential_answers(tiny):
    """64 clients at once (mixed lengths, steering, probe, streaming) on 16 rows: each answer
    equals the one the same request gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    bodies = []
    for i in range(64):
        body = {"prompt": f"{i} " + "abcdefgh"[: 1 + i % 8], "max_tokens": 3 + i % 9,
                "temperature": 0, "probe": i % 5 == 0, "stream": i % 2 == 1}
        if i % 3:
            body["steering"] = {**STEER, "multiplier": 0.5 * (i % 4) - 0.5,
                                "positions": ("all", "generated")[i % 2]}
        bodies.append(body)

    def ask(http, body):
        if body["stream"]:
            chunks = []
            with http.stream("POST", "/v1/completions", json=body) as r:
                chunks = [json.loads(x[6:]) for x in r.iter_lines()
                          if x.startswith("data: {")]
            return ("".join(c["choices"][0]["text"] for c in chunks),
                    [s for c in chunks for s in c["choices"][0].get("probe_scores", [])])
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
        return choice["text"], choice.get("probe_scores", [])

    with Served(args(tiny, "--max_batch", 16)) as s:
        alone = [ask(s.http, b) for b in bodies]

        def one(body):
            with httpx.Client(base_url=s.url, timeout=600) as http:
                return ask(http, body)

        with ThreadPoolExecutor(64) as pool:
            together = list(pool.map(one, bodies))
    assert len({t for t, _ in alone}) > 32
    for (text, probes), (want, want_probes), body in zip(together, alone, bodies):
        assert text == want, body
        assert probes == pytest.approx(want_probes, abs=1e-3)  # batches of other sizes


FAULT = '''import os
if os.environ.get("RANK") == "0":  # rank 0's engine fails inside a decode step
    import server.engine as engine
    real = engine.Engine.run

    def run(self, step):
        if step["op"] == "decode":
            raise RuntimeError("rank 0 engine failed")
        return real(self, step)

    engine.Engine.run = run
'''


@pytest.mark.heavy
def test_a_failed_scheduler_ends_every_torchrun_rank(tiny, tmp_path):
    """Under torchrun (MP 2) a scheduler that fails mid-step (the fault injected into rank 0 by a
    sitecustomize on the test's PYTHONPATH; rank 1 is then stuck in the step's collective): the
    request gets a 503, and both ranks exit 2 with one error line each, no traceback."""
    from conftest import ROOT

    (tmp_path / "sitecustomize.py").write_text(FAULT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + str(tmp_path)}
    with Served(args(tiny), launcher=launcher, env=env) as s:
        r = s.post("/v1/completions", {"prompt": "hi", "max_tokens": 4})
        s.proc.wait(timeout=300)
        done = s.stop()
    assert r.status_code == 503 and "rank 0 engine failed" in r.json()["error"]["message"]
    assert done.returncode != 0
    assert "error: the scheduler stopped: RuntimeError: rank 0 engine failed" in done.stderr
    assert "rank 0 stopped serving" in done.stderr  # rank 1's line, in torchrun's summary
    assert "[rank1]: Traceback" not in done.stderr and "[rank0]: Traceback" not in done.stderr
    assert done.stderr.count("exitcode  : 2") == 2, done.stderr[-3000:]


def test_native_push_costs_unsteered_rows_nothing(tiny, dist1):
    """Engine steps in-process: an unsteered step runs the model with no steer at all (nothing
    measured: "steered" is None per row); in a mixed decode step only the steered row gets sums,
    and they are the residual stream's |h| at its layer (the same step run unsteered: the states
    before the steering are the unsteered ones at the first steered layer)."""
    from llama.generation import Generator
    from llama.vectors import load_vectors
    from server.engine import Engine
    from steering.settings import SteerSettings

    gen = Generator.build(tiny["path"], dist1)
    vecs = {"push": load_vectors(tiny["vectors"], None, 64, 2)}
    engine = Engine(gen.model, vecs, {}, None, max_batch=2, length=64)
    seen = []
    hook = gen.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("steer")), with_kwargs=True)
    spec = SteerSettings("push", (1,), 2.0).check(2, vecs["push"]).to_json()
    try:
        a = engine.run({"op": "prefill", "row": 0, "ids": [1, 5, 9], "steer": None})
        b = engine.run({"op": "prefill", "row": 1, "ids": [1, 7, 8, 2], "steer": spec})
        step = {"op": "decode", "tokens": [4, 6], "pos": [3, 4], "plen": [3, 4]}
        both = engine.run({**step, "steer": [None, spec]})
    finally:
        hook.remove()
    assert seen[0] is None and a["steered"] == [None]
    assert seen[1] is not None and seen[2] is not None
    assert both["steered"][0] is None and set(both["steered"][1]) == {1}
    with torch.no_grad():
        h = gen.model(torch.tensor([[1, 7, 8, 2, 6]]), layers=[1])[1][0].double()
    norms = h.norm(dim=-1)
    total, along, count = b["steered"][0][1]
    assert count == 3 and total == pytest.approx(float(norms[1:4].sum()), rel=1e-5)  # not pos 0
    total, along, count = both["steered"][1][1]
    assert count == 1 and total == pytest.approx(float(norms[4]), rel=1e-5)
    sums = {1: [a + b for a, b in zip(b["steered"][0][1], both["steered"][1][1])]}
    want = 2.0 * float(vecs["push"][1].norm()) / float(norms[1:].mean())
    assert engine.push(spec, sums)["1"] == pytest.approx(want, rel=1e-5)
