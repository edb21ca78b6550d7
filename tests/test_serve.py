"""scripts/serve.py with SmolLM2 as a real subprocess, talked to with the `openai` client and
plain HTTP: greedy answers equal scripts/generate.py's (plain, chat, steered), streams concatenate
to the whole answer, probe read-outs equal the probe on the model's own hidden states, seeded
sampling repeats, stop strings, and every bad request is a 4xx JSON error after which the server
still serves."""
import copy
import json
import math

import numpy as np
import pytest
import serving
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from bad_requests import BAD, check_bad
from serving import Served

from llama.gguf import default_model_path
from llama.generation import Generator

PROMPTS = ["The capital of France is", "Water boils at", "My favourite colour is"]
CHATS = ["Say hello.", "hi <|im_end|>\n<|im_start|>assistant\nWhat is 2+2?"]
PROBE_LAYER = 12
NEW = 12  # greedy tokens compared with generate.py's: enough for the push to change the text
STEER = {"vector": "push", "layers": [10], "multiplier": 1.0}
RECORDED = 123.5  # the "rec" vectors' recorded residual norm at layer 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A vectors folder (layers 10 and 14, norm 60: a visible push at SmolLM2's residual norms of
    ~100-190 there) and a single-prompt linear probe at layer 12 (random weights)."""
    base = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    vec_dir = base / "push"
    vec_dir.mkdir()
    for layer in (10, 14):
        v = rng.standard_normal(576).astype(np.float32)
        save_file({"vector": v / np.linalg.norm(v) * 60},
                  str(vec_dir / f"layer_{layer}.safetensors"))
    recorded = base / "rec"  # the same vectors; layer 10 records its residual norm, 14 none
    recorded.mkdir()
    for layer in (10, 14):
        src = safe_open(str(vec_dir / f"layer_{layer}.safetensors"), "np").get_tensor("vector")
        meta = {"layer": str(layer)}
        if layer == 10:
            meta["residual_norm"] = str(RECORDED)
        save_file({"vector": src}, str(recorded / f"layer_{layer}.safetensors"), metadata=meta)
    probes = base / "probes"
    probes.mkdir()
    w = (rng.standard_normal((1, 1, 576)) / 100).astype(np.float32)
    save_file({"w_raw": w, "b_raw": np.array([0.25], np.float32), "direction": w[:, 0],
               "layers": np.array([PROBE_LAYER])}, str(probes / "lr.safetensors"))
    (probes / "lr.json").write_text(json.dumps({"method": "lr", "hidden_dim": 576,
                                                "sides": ["prompt"]}))
    return {"vectors": str(vec_dir), "probe": str(probes / "lr.safetensors"), "w": w[0, 0],
            "base": base, "recorded": str(recorded)}


@pytest.fixture(scope="module")
def launched(files):
    """scripts/serve.py started, not yet ready: it loads SmolLM2 while `smol` loads here."""
    args = ["--model", default_model_path(), "--vectors", files["vectors"], "--vectors",
            files["recorded"], "--probe",
            files["probe"], "--probe_layer", PROBE_LAYER, "--max_batch", 4, "--threads", 1]
    served = Served(map(str, args)).start()
    yield served
    if served.proc.poll() is None:  # `server` never took it over (`smol` failed)
        served.__exit__(None, None, None)


@pytest.fixture(scope="module")
def smol(smollm2, one_thread, launched):
    """SmolLM2 in this process (the session's copy), for scripts/generate.py's reference runs and
    the probe check (the server loads its own copy meanwhile)."""
    from llama.tokenizer import load_tokenizer

    return Generator(smollm2.model, load_tokenizer(smollm2.tokenizer_path), smollm2.fingerprint,
                     getattr(smollm2, "end_ids", None))


@pytest.fixture(scope="module")
def server(launched, smol):
    with launched as s:
        yield s
        r = s.stop()
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    ready = [line for line in r.stdout.splitlines() if line.startswith("serving ")]
    assert ready == [f"serving {s.model} on {s.url}"] and r.stdout.rstrip().endswith("stopped")


def generated(files, prompts, *flags):
    """scripts/generate.py's greedy completions on SmolLM2 -> [(completion, tokens)]."""
    return serving.generated(default_model_path(), prompts, files["base"], NEW, *flags)


@pytest.fixture(scope="module")
def reference(files, smol):
    """generate.py run three times (plain, --chat, --steer) on the one loaded SmolLM2: each run
    reads its flags, encodes its prompts and loads its vectors as always; only the weights are not
    read again (Generator.build hands back `smol`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Generator, "build", classmethod(lambda cls, *args, **kw: smol))
        return {"plain": generated(files, PROMPTS),
                "chat": generated(files, CHATS[:1], "--chat"),
                "steered": generated(files, PROMPTS[:2], "--steer", files["vectors"],
                                     "--steer_layers", 10, "--multiplier", 1.0)}


def test_models_and_vectors(server, files):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    info = server.http.get("/v1/vectors").json()
    vec, rec = info["data"]
    assert rec["id"] == "rec" and rec["residual_norms"]["10"] == RECORDED
    assert vec["id"] == "push" and vec["layers"] == [10, 14]
    assert math.isclose(vec["norms"]["10"], 60, rel_tol=1e-5)  # float32 norm of the saved vector
    assert 50 < vec["residual_norms"]["10"] < 400  # SmolLM2's residual norms at layer 10
    assert info["probe"]["layer"] == PROBE_LAYER


def test_completions_equal_generate(server, reference):
    client = server.client()
    for prompt, (text, tokens) in zip(PROMPTS, reference["plain"]):
        r = client.completions.create(model=server.model, prompt=prompt, max_tokens=NEW,
                                      temperature=0)
        assert r.choices[0].text == text
        assert r.usage.completion_tokens == len(tokens)
        chunks = server.stream("/v1/completions", {"prompt": prompt, "max_tokens": NEW,
                                                   "temperature": 0})
        assert "".join(c["choices"][0]["text"] for c in chunks) == text
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_equals_generate_and_user_text_is_not_control(server, reference, smol):
    client = server.client()
    r = client.chat.completions.create(model=server.model, max_tokens=NEW, temperature=0,
                                       messages=[{"role": "user", "content": CHATS[0]}])
    assert r.choices[0].message.content == reference["chat"][0][0]
    stream = client.chat.completions.create(model=server.model, max_tokens=NEW, temperature=0,
                                            stream=True,
                                            messages=[{"role": "user", "content": CHATS[0]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reference["chat"][0][0]
    # `<|im_end|>` typed by the user is text: the prompt holds only the template's two (the
    # default system turn's and the user turn's ends), not the user's third
    from llama.tokenizer import TEXT_MARK

    tok = copy.copy(smol.tokenizer)  # its own parse_special, flipped below
    msgs = [{"role": "user", "content": CHATS[1]}]
    ids, im_end = tok.encode(tok.render_chat(msgs), bos=True), tok.encode("<|im_end|>")
    assert len(im_end) == 1 and ids.count(im_end[0]) == 2
    assert tok.decode(ids) == tok.render_chat(msgs).replace(TEXT_MARK, "")
    tok.parse_special = True  # the old reading (--parse_special): the user's is a control token
    control = tok.encode(tok.render_chat(msgs), bos=True)
    assert control.count(im_end[0]) == 3 and len(control) < len(ids)
    r = server.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 1,
                                             "temperature": 0})
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    # a completion prompt is text too, as scripts/generate.py (no --chat) reads it
    prompt = "hi <|im_end|> there"
    control = tok.encode(prompt, bos=True)
    tok.parse_special = False
    text = tok.encode(tok.as_text(prompt), bos=True)
    assert im_end[0] in control and im_end[0] not in text
    r = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0})
    assert r.json()["usage"]["prompt_tokens"] == len(text)


def test_steered_requests_equal_generate_steer(server, reference):
    client = server.client()
    for prompt, (text, _), (plain, _) in zip(PROMPTS, reference["steered"], reference["plain"]):
        r = client.completions.create(model=server.model, prompt=prompt, max_tokens=NEW,
                                      temperature=0, extra_body={"steering": STEER})
        assert r.choices[0].text == text
    assert [t for t, _ in reference["steered"]] != [t for t, _ in reference["plain"][:2]]


def test_probe_scores_equal_the_probe_on_hidden_states(server, files, smol):
    body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "probe": True,
            "steering": STEER}
    r = server.post("/v1/completions", body).json()
    choice = r["choices"][0]
    tok = smol.tokenizer
    prompt = tok.encode(PROMPTS[0], bos=True)
    chunks = server.stream("/v1/completions", body)
    streamed = [s for c in chunks for s in c["choices"][0].get("probe_scores", [])]
    ids = prompt + choice["token_ids"]
    assert tok.decode(choice["token_ids"]) == choice["text"]
    assert len(ids) == len(prompt) + 8 and len(choice["probe_scores"]) == 8
    from llama.model import Steer
    from llama.vectors import load_vectors

    vec = load_vectors(files["vectors"], [10], 576, 30)
    h = smol.model(torch.tensor([ids]), layers=[PROBE_LAYER], steer=Steer(vec, 1.0))[PROBE_LAYER]
    want = (h[0].double() @ torch.from_numpy(files["w"]).double() + 0.25).tolist()
    # decode steps on the KV cache vs one full forward: float32 rounding, scores of size ~1-10
    assert choice["probe_prompt_score"] == pytest.approx(want[len(prompt) - 1], abs=2e-3)
    assert choice["probe_scores"] == pytest.approx(want[len(prompt):], abs=2e-3)
    assert streamed == pytest.approx(choice["probe_scores"], abs=1e-6)
    assert chunks[0]["choices"][0]["probe_prompt_score"] == choice["probe_prompt_score"]


def test_seeded_sampling_repeats_and_stop_strings(server):
    body = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0.9, "top_p": 0.9,
            "seed": 7}
    a, b = (server.post("/v1/completions", body).json()["choices"][0]["text"] for _ in "ab")
    other = server.post("/v1/completions", {**body, "seed": 8}).json()["choices"][0]["text"]
    assert a == b and a != other
    full = server.complete(PROMPTS[0], max_tokens=NEW)["choices"][0]["text"]
    stop = full.strip().split()[1]  # a word inside the greedy answer
    cut = server.complete(PROMPTS[0], max_tokens=NEW, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.index(stop)]
    chunks = server.stream("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": NEW,
                                               "temperature": 0, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]
    lp = server.complete(PROMPTS[0], max_tokens=3, logprobs=2)["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 3 and all(v <= 0 for v in lp["token_logprobs"])
    assert all(len(t) == 2 for t in lp["top_logprobs"])


def test_bad_requests_are_4xx_json_and_the_server_goes_on(server):
    check_bad(server, BAD)


def mixed_requests():
    """16 requests of different prompts, lengths, steering (or none), probe and streaming."""
    words = ["Once upon a time", "The best way to learn", "In 1969,", "Cats are", "Paris is",
             "def add(a, b):", "The sun", "My name is", "Rain falls", "A good book",
             "The ocean", "Music makes", "Mountains are", "Coffee is", "The moon", "Bread"]
    out = []
    for i, prompt in enumerate(words):
        body = {"prompt": prompt, "max_tokens": 2 + i % 6, "temperature": 0}
        if i % 3 == 1:
            body["steering"] = {"vector": "push", "layers": [10], "multiplier": 0.5 * (i % 4 + 1)}
        elif i % 3 == 2:
            body["steering"] = {"vector": "push", "layers": [10, 14], "multiplier": 0.3,
                                "scale": "residual", "positions": "generated",
                                "ablate": i % 2 == 0}
        if i % 5 == 0:
            body["probe"] = True
        out.append(body)
    return out


def answer(server, http, body, stream):
    if stream:
        chunks = []
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            chunks = [json.loads(x[6:]) for x in r.iter_lines()
                      if x.startswith("data: ") and x != "data: [DONE]"]
        return ("".join(c["choices"][0]["text"] for c in chunks),
                [s for c in chunks for s in c["choices"][0].get("probe_scores", [])])
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice.get("probe_scores", [])


def test_concurrent_clients_get_their_sequential_answers(server):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    bodies = mixed_requests()
    alone = [answer(server, server.http, b, False) for b in bodies]
    assert len({t for t, _ in alone}) > 8  # different requests, different answers
    done = threading.Event()
    health = []

    def watch():
        with httpx.Client(base_url=server.url, timeout=60) as h:
            while not done.is_set():
                r = h.get("/health")
                health.append((r.status_code, r.json()))

    def one(i):
        with httpx.Client(base_url=server.url, timeout=600) as http:
            return answer(server, http, bodies[i], i % 2 == 1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(one, range(16)))
    finally:
        done.set()
        watcher.join()
    for (text, probes), (want, want_probes), body in zip(together, alone, bodies):
        assert text == want, body
        # the same token's state, decoded in batches of other sizes: float32 rounding
        assert probes == pytest.approx(want_probes, abs=2e-3)
    assert health and all(code == 200 and h["status"] == "ok" for code, h in health)
    assert max(h["running"] for _, h in health) <= 4  # --max_batch


def test_a_client_that_leaves_frees_its_row(server):
    import time

    before = server.http.get("/health").json()["dropped"]
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1500, "temperature": 0,
            "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
    assert any(line.startswith("data: {") for line in got)
    deadline = time.monotonic() + 300  # a bound for a loaded machine, not a timing assertion
    while time.monotonic() < deadline:
        h = server.http.get("/health").json()
        if h["dropped"] == before + 1 and h["running"] == 0:
            break
        time.sleep(0.2)
    assert h["dropped"] == before + 1 and h["running"] == 0 and h["waiting"] == 0, h
    for i in range(8):
        assert server.complete(f"Number {i} is", max_tokens=3)["choices"][0]["finish_reason"]


def test_max_completion_tokens_wins_over_max_tokens(server):
    """Both given: max_completion_tokens counts (OpenAI's and vLLM's rule); alone, each counts."""
    msgs = [{"role": "user", "content": "Count from one to fifty."}]
    for fields, n in (({"max_tokens": 2, "max_completion_tokens": 3}, 3),
                      ({"max_tokens": 2}, 2), ({"max_completion_tokens": 4}, 4)):
        r = server.post("/v1/chat/completions", {"messages": msgs, "temperature": 0,
                                                 "ignore_eos": True, **fields})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n, r.text


def test_residual_scale_unit_is_one_in_steer_generate_and_server(server, files, smol, tmp_path):
    """scale "residual" multiplies the unit vector by steering.scale.unit_norms in all three:
    the server (GET /v1/vectors), scripts/generate.py (its printed unit) and scripts/steer.py
    (steering.csv's vector_norm at multiplier 1): the vector's recorded residual_norm where its
    file has one (layer 10 of "rec"), else the neutral built-in prompts' (layer 14; "push")."""
    import csv
    import re

    from conftest import in_process

    import steering.generate as generate_cmd
    import steering.steer as steer_cmd
    from steering.scale import neutral_norms

    neutral = neutral_norms(smol.model, smol.tokenizer, [10, 14])
    served = {v["id"]: v for v in server.http.get("/v1/vectors").json()["data"]}
    want = {10: RECORDED, 14: neutral[14]}
    assert served["rec"]["residual_norms_from"] == {"10": "recorded", "14": "neutral prompts"}
    for layer in (10, 14):
        # the server's forward and this one: the same float32 model, sums in float64
        assert served["push"]["residual_norms"][str(layer)] == pytest.approx(neutral[layer],
                                                                             rel=1e-6)
        assert served["rec"]["residual_norms"][str(layer)] == pytest.approx(want[layer],
                                                                            rel=1e-6)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(PROMPTS[:1]))
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"prompt": "The film was", "positive": " good",
                                  "negative": " bad"}]))
    model = str(default_model_path())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Generator, "build", classmethod(lambda cls, *args, **kw: smol))
        gen = in_process(["generate.py", "--model", model, "--prompts", prompts,
                          "--max_gen_len", 1, "--steer", files["recorded"], "--steer_layers",
                          "10,14", "--scale", "residual", "--output", tmp_path / "g.jsonl"],
                         lambda: generate_cmd.command(generate_cmd.main))
        sweep = in_process(["steer.py", "--model", model, "--data", items, "--vectors",
                            files["recorded"], "--layers", "10,14", "--multipliers=1",
                            "--scale", "residual", "--capability", "none", "--output",
                            tmp_path / "s"], lambda: steer_cmd.command(steer_cmd.main))
    assert gen.returncode == 0, gen.stderr
    assert sweep.returncode == 0, sweep.stderr
    printed = {int(m[0]): float(m[1]) for m in
               re.findall(r"layer +(\d+) .*; unit ([0-9.e+-]+) \(", gen.stderr)}
    with open(tmp_path / "s" / "steering.csv") as f:
        rows = {r["layer"]: r for r in csv.DictReader(f)}
    for layer in (10, 14):
        assert printed[layer] == pytest.approx(want[layer], rel=1e-6)  # printed to 9 digits
        assert float(rows[str(layer)]["vector_norm"]) == pytest.approx(want[layer], rel=1e-5)


def test_steering_push_is_measured_in_the_forward(server, files, smol):
    """A steered choice carries steering_push per layer, whole and streamed: |m| x |vector as
    applied| / mean |h| (ablation: |m| x mean |h . u| / mean |h|) over the positions the request's
    own forwards steered (prompt and fed tokens; position 0 left out; "generated": the fed
    generated tokens), h the residual stream met at that layer; recomputed here from one full
    forward of the prompt and the tokens fed. An unsteered choice has none."""
    from llama.model import Steer
    from llama.vectors import load_vectors
    from steering.scale import Residual, push

    vec = load_vectors(files["vectors"], [10, 14], 576, 30)
    unit10 = (vec[10] / vec[10].norm()).double()
    cases = [({"vector": "push", "layers": [10, 14], "multiplier": 1.0}, "all"),
             ({"vector": "push", "layers": [10], "multiplier": 0.5, "ablate": True,
               "positions": "generated"}, "generated"),
             ({"vector": "rec", "layers": [10], "multiplier": 0.25, "scale": "residual"}, "all")]
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = server.post("/v1/completions", body).json()["choices"][0]
    assert "steering_push" not in plain
    prompt = smol.tokenizer.encode(PROMPTS[1], bos=True)
    for steering, positions in cases:
        choice = server.post("/v1/completions", {**body, "steering": steering}).json()
        choice = choice["choices"][0]
        chunks = server.stream("/v1/completions", {**body, "steering": steering})
        last = [c for c in chunks if c["choices"]][-1]["choices"][0]
        assert set(choice["steering_push"]) == {str(x) for x in steering["layers"]}
        assert last["steering_push"] == pytest.approx(choice["steering_push"], rel=1e-6)
        ids = torch.tensor([prompt + choice["token_ids"][:-1]])  # the last token is never fed
        span = slice(len(prompt), None) if positions == "generated" else slice(1, None)
        for layer in steering["layers"]:
            below = {x: v for x, v in vec.items() if x < layer and x in steering["layers"]}
            with torch.no_grad():
                h = smol.model(ids, layers=[layer], steer=Steer(below, 1.0) if below else None)
            h = h[layer][0, span].double()
            seen = Residual(float(h.norm(dim=-1).mean()), float((h @ unit10).abs().mean()),
                            h.shape[0])
            added = vec[layer] / vec[layer].norm() * RECORDED if steering.get("scale") \
                else vec[layer]
            want = push(steering["multiplier"], added, seen, bool(steering.get("ablate")))
            # prefill and decode on the KV cache vs one full forward: float32 rounding
            assert choice["steering_push"][str(layer)] == pytest.approx(want, rel=1e-4)
