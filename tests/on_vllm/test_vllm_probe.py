"""Probe read-outs and scale "residual" on `llama-ccs serve --engine vllm` (a real subprocess on
127.0.0.1) against the native engine on SmolLM2 float32: per-token probe scores (whole and
streamed, with and without steering, the last token of a stop string or max_tokens scored too),
a mixed batch of probed / unprobed / steered requests, the residual norms measured inside vLLM at
start-up and the steered text they give, steering at layer 0 (the embedding output). Runs in
the .venv-vllm/ of `make setup-vllm`.

Probe scores must be within REL (2e-3) of the native engine's over the tokens both answers share,
relative to the standard deviation of the native scores in that request. Where two greedy texts
differ, the first differing token must be a near tie in the native engine (logit margin < TIE)."""
import json
import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from serving import Served
from smol import first_difference, smol_hf

pytestmark = pytest.mark.heavy

NEW = 16
REL = 2e-3  # probe score error allowed, in standard deviations of the request's native scores
TIE = 1e-3  # the largest native logit margin two engines may disagree on
NORM_REL = 1e-4  # residual norms: vLLM's forward vs the native one, relative
PROBE_LAYER = 20  # steered too: the probe reads the steered stream, as the native engine
LAYERS = (10, 20)
NAMES = ("push", "pull", "turn")
EMBED = "embed"  # a vector at layer 0, the embedding output
PROMPTS = ["The capital of France is", "I believe the meaning of life is",
           "Simply put, the theory of relativity states that", "def fibonacci(n):"]
CHATS = ["What is the capital of Japan?", "Write a haiku about autumn."]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three vectors folders (random directions of norm 40 at LAYERS) and a single-prompt linear
    probe at PROBE_LAYER (random weights)."""
    base = tmp_path_factory.mktemp("vllm-probe")
    rng = np.random.default_rng(3)
    vecs = {}
    for name in NAMES:
        folder = base / name
        folder.mkdir()
        vecs[name] = {}
        for layer in LAYERS:
            v = rng.standard_normal(576).astype(np.float32)
            v = v / np.linalg.norm(v) * 40
            vecs[name][layer] = torch.from_numpy(v)
            save_file({"vector": v}, str(folder / f"layer_{layer}.safetensors"))
    folder = base / EMBED
    folder.mkdir()
    v = rng.standard_normal(576).astype(np.float32)
    vecs[EMBED] = {0: torch.from_numpy(v)}
    save_file({"vector": v}, str(folder / "layer_0.safetensors"))
    probes = base / "probes"
    probes.mkdir()
    w = (rng.standard_normal((1, 1, 576)) / 100).astype(np.float32)
    save_file({"w_raw": w, "b_raw": np.array([0.25], np.float32), "direction": w[:, 0],
               "layers": np.array([PROBE_LAYER])}, str(probes / "lr.safetensors"))
    (probes / "lr.json").write_text(json.dumps({"method": "lr", "hidden_dim": 576,
                                                "sides": ["prompt"]}))
    return {"vectors": vecs, "probe": str(probes / "lr.safetensors"),
            "w": torch.from_numpy(w[0, 0]),
            "args": [f"{n}={base / n}" for n in NAMES + (EMBED,)]}


@pytest.fixture(scope="module")
def launched(files):
    """The vLLM server started (it loads while `native` loads here)."""
    args = ["--engine", "vllm", "--model", smol_hf(), "--probe", files["probe"],
            "--probe_layer", str(PROBE_LAYER), "--max_batch", "24", "--max_seq_len", "1024"]
    for a in files["args"]:
        args += ["--vectors", a]
    served = Served(args, env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}).start()
    yield served
    if served.proc.poll() is None:
        served.__exit__(None, None, None)


@pytest.fixture(scope="module")
def native(launched):
    """(model, tokenizer) of the native engine on the GGUF, float32."""
    from llama.checkpoint import load_model
    from llama.dist import setup
    from llama.gguf import default_model_path
    from llama.tokenizer import load_tokenizer

    loaded = load_model(default_model_path(), setup(mp=1, device="cpu"))
    return loaded.model.eval(), load_tokenizer(loaded.tokenizer_path)


@pytest.fixture(scope="module")
def served(launched, native):
    with launched as s:
        yield s


@pytest.fixture(scope="module")
def threshold(served):
    """The probe's decision threshold, as GET /v1/vectors gives it."""
    return served.http.get("/v1/vectors").json()["probe"]["threshold"]


@pytest.fixture(scope="module")
def texts():
    """Plain prompts (completions) and chat messages (chat completions)."""
    return PROMPTS + [[{"role": "user", "content": c}] for c in CHATS]


def prompt_ids(tok, text) -> list:
    """The prompt's token ids as the server makes them (server/schemas.py)."""
    if isinstance(text, list):
        return tok.encode(tok.render_chat(text), bos=True)
    return tok.encode(tok.as_text(text), bos=True)


@pytest.fixture(scope="module")
def neutral(native):
    """The native engine's residual norms at LAYERS (steering.scale.neutral_norms)."""
    from steering.scale import neutral_norms

    model, tok = native
    return neutral_norms(model, tok, set(LAYERS) | {0})


def steer_of(files, neutral, spec):
    """llama.model.Steer for a request's "steering" field (None: unsteered)."""
    from steering.settings import SteerSettings

    if not spec:
        return None
    s = SteerSettings(spec["vector"], tuple(spec["layers"]), spec.get("multiplier", 1.0),
                      spec.get("scale", "raw"), spec.get("ablate", False),
                      spec.get("positions", "all"))
    return s.steer(files["vectors"][spec["vector"]], neutral)


@torch.inference_mode()
def native_run(model, ids, steer=None, n=NEW):
    """The native engine's greedy ids (no end token stops them) on its KV cache, the logits of
    each step, and the probe layer's state of the prompt's last token and of each fed token."""
    from llama.model import KVCache

    last, plen = model.params.n_layers, torch.tensor([len(ids)])
    cache = KVCache(model, 1, len(ids) + n + 1)
    h = model(torch.tensor([ids]), layers=[PROBE_LAYER, last], cache=cache, steer=steer,
              prompt_len=plen)
    states = [h[PROBE_LAYER][0, -1]]
    logits = model.logits_of(h[last][:, -1])[0]
    out, steps = [], []
    for i in range(n):
        steps.append(logits)
        out.append(int(logits.argmax()))
        h = model(torch.tensor([[out[-1]]]), layers=[PROBE_LAYER, last],
                  start=torch.tensor([len(ids) + i]), cache=cache, steer=steer, prompt_len=plen)
        states.append(h[PROBE_LAYER][0, 0])
        logits = model.logits_of(h[last][:, 0])[0]
    return out, steps, torch.stack(states)


def shared_prefix(name, ours, theirs, steps) -> int:
    """How many leading tokens two greedy answers share; a difference must be a native near
    tie (printed)."""
    first = first_difference(name, ours, theirs, steps, TIE)
    return min(len(ours), len(theirs)) if first is None else first


def check_scores(name, choice, want_ids, steps, states, w, threshold, bias=0.25):
    """A choice's probe scores against the native ones over the shared tokens; returns the
    largest error in native standard deviations."""
    native_scores = (states.double() @ w.double() + bias).tolist()
    got = choice["token_ids"]
    assert len(choice["probe_scores"]) == len(got), name  # every token scored, the last too
    n = shared_prefix(name, want_ids, got, steps)
    spread = float(np.std(native_scores[:n + 1]))
    assert spread > 0.05, (name, spread)  # a probe that varies: the check means something
    errors = [abs(choice["probe_prompt_score"] - native_scores[0])]
    errors += [abs(a - b) for a, b in zip(choice["probe_scores"][:n], native_scores[1:n + 1])]
    worst = max(errors) / spread
    assert worst < REL, (name, worst, spread)
    assert choice["probe_margins"] == pytest.approx(
        [s - threshold for s in choice["probe_scores"]], abs=1e-9)
    return worst


def ask(served, prompt, steering=None, probe=True, n=NEW, **kw) -> dict:
    """A greedy answer's choice; prompt: a text (completions) or messages (chat)."""
    chat = isinstance(prompt, list)
    body = {"messages" if chat else "prompt": prompt, "max_tokens": n, "temperature": 0,
            "ignore_eos": True, "probe": probe, **kw}
    if steering:
        body["steering"] = steering
    r = served.post("/v1/chat/completions" if chat else "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


STEERS = [None, {"vector": "push", "layers": [10, 20], "multiplier": 1.0},
          {"vector": "pull", "layers": [10], "multiplier": 1.5, "positions": "generated"}]


@pytest.mark.parametrize("k", range(len(STEERS)))
def test_probe_scores_equal_native(served, native, files, neutral, texts, threshold, k):
    """Every prompt, unsteered and under two steerings: probe scores per token (the prompt's last
    token too) equal the native engine's within REL of their spread."""
    model, tok = native
    worst = 0.0
    for i, text in enumerate(texts):
        choice = ask(served, text, STEERS[k])
        ids, steps, states = native_run(model, prompt_ids(tok, text),
                                        steer_of(files, neutral, STEERS[k]))
        worst = max(worst, check_scores(f"steer {k}, prompt {i}", choice, ids, steps, states,
                                        files["w"], threshold))
        assert ("steering_push" in choice) == (STEERS[k] is not None)
    print(f"steering {k}: largest probe error {worst:.2e} native standard deviations")


def test_probe_scores_streamed_equal_whole(served, texts):
    body = {"messages": texts[4], "max_tokens": NEW, "temperature": 0, "probe": True,
            "steering": STEERS[1]}
    whole = served.post("/v1/chat/completions", body).json()["choices"][0]
    chunks = served.stream("/v1/chat/completions", body)
    streamed = [s for c in chunks for s in c["choices"][0].get("probe_scores", [])]
    ids = [len(c["choices"][0].get("probe_scores", [])) for c in chunks if c["choices"]]
    assert streamed == pytest.approx(whole["probe_scores"], abs=1e-6)
    assert len(streamed) == len(whole["token_ids"]) and sum(ids) == len(streamed)
    first = next(c["choices"][0] for c in chunks
                 if c["choices"] and "probe_prompt_score" in c["choices"][0])
    assert first["probe_prompt_score"] == pytest.approx(
        whole["probe_prompt_score"], abs=1e-6)


def test_last_token_is_scored_at_a_stop_string_and_an_end_token(served, native, files, texts,
                                                                 threshold):
    """A stop string ends the answer early (its last token still gets a score); a chat answer
    that ends with an end token scores every token before it."""
    model, tok = native
    full = ask(served, PROMPTS[0])
    stop = full["text"].strip().split()[2]
    cut = ask(served, PROMPTS[0], stop=[stop])
    assert cut["finish_reason"] == "stop", (full, stop, cut)
    assert cut["text"] == full["text"][:full["text"].index(stop)]
    n = len(cut["token_ids"])
    assert cut["token_ids"] == full["token_ids"][:n]
    assert cut["probe_scores"] == pytest.approx(full["probe_scores"][:n], abs=1e-4)
    chat = served.post("/v1/chat/completions", {"messages": texts[4], "max_tokens": 64,
                                                "temperature": 0, "probe": True}).json()
    choice = chat["choices"][0]
    assert choice["finish_reason"] == "stop", choice  # a short answer, then the end token
    ids, steps, states = native_run(model, prompt_ids(tok, texts[4]),
                                    n=len(choice["token_ids"]))
    check_scores("end token", choice, ids, steps, states, files["w"], threshold)


def test_mixed_batch_gives_each_request_what_it_gets_alone(served, native, files, neutral,
                                                           texts):
    """8 steered (3 vectors), 8 unsteered, 4 of them probed, 4 more probed and steered: 20
    requests at once; each answer equals the same request sent alone (tokens, or a native near
    tie; probe scores within REL)."""
    model, tok = native
    reqs = []
    for i in range(20):
        steering = ({"vector": NAMES[i % 3], "layers": [10, 20], "multiplier": 1.0}
                    if i < 8 or i >= 16 else None)
        reqs.append((texts[i % len(texts)], steering, i >= 12))
    got = [None] * len(reqs)

    def one(i):
        text, steering, probe = reqs[i]
        got[i] = ask(served, text, steering, probe)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (text, steering, probe) in enumerate(reqs):
        alone = ask(served, text, steering, probe)
        b = got[i]
        assert ("probe_scores" in b) == probe and ("steering_push" in b) == bool(steering)
        if alone["token_ids"] == b["token_ids"]:
            if probe:
                spread = float(np.std(alone["probe_scores"]))
                assert max(abs(x - y) for x, y in zip(alone["probe_scores"],
                                                      b["probe_scores"])) < REL * spread, i
            continue
        _, steps, _ = native_run(model, prompt_ids(tok, text),
                                 steer_of(files, neutral, steering))
        shared_prefix(f"mixed {i}", alone["token_ids"], b["token_ids"], steps)


def test_residual_norms_and_scale_residual_equal_native(served, native, files, neutral, texts):
    """The residual norms measured inside vLLM at start-up equal steering.scale.neutral_norms
    of the native model (NORM_REL); scale residual greedy text equals the native engine's."""
    model, tok = native
    info = {v["id"]: v for v in served.http.get("/v1/vectors").json()["data"]}
    got = {int(k): float(v) for k, v in info["push"]["residual_norms"].items()}
    assert set(got) == set(LAYERS)
    for layer in LAYERS:
        assert abs(got[layer] - neutral[layer]) < NORM_REL * neutral[layer], (got, neutral)
    print("residual norms, vLLM vs native:", {x: (got[x], neutral[x]) for x in LAYERS})
    spec = {"vector": "turn", "layers": [10, 20], "multiplier": 0.4, "scale": "residual"}
    changed = 0
    for i, text in enumerate(texts):
        choice = ask(served, text, spec, probe=False)
        plain = ask(served, text, None, probe=False)
        ids, steps, _ = native_run(model, prompt_ids(tok, text),
                                   steer_of(files, neutral, spec))
        shared_prefix(f"residual {i}", ids, choice["token_ids"], steps)
        changed += choice["token_ids"] != plain["token_ids"]
        push = choice["steering_push"]
        assert set(push) == {"10", "20"} and all(0.1 < p < 1.6 for p in push.values()), push
    assert changed >= len(texts) - 1  # a steered request that came back unsteered fails here


def test_layer_0_steering_equals_native(served, native, files, neutral, texts):
    """Steering at layer 0 (the embedding output, where it enters the first decoder layer), scale
    residual: its norm measured in vLLM, the greedy text equal to the native engine's."""
    model, tok = native
    info = {v["id"]: v for v in served.http.get("/v1/vectors").json()["data"]}
    got = float(info[EMBED]["residual_norms"]["0"])
    assert abs(got - neutral[0]) < NORM_REL * neutral[0], (got, neutral[0])
    spec = {"vector": EMBED, "layers": [0], "multiplier": 1.0, "scale": "residual"}
    changed = 0
    for i, text in enumerate(texts[:4]):
        choice = ask(served, text, spec, probe=False)
        plain = ask(served, text, None, probe=False)
        ids, steps, _ = native_run(model, prompt_ids(tok, text), steer_of(files, neutral, spec))
        shared_prefix(f"layer 0, prompt {i}", ids, choice["token_ids"], steps)
        changed += choice["token_ids"] != plain["token_ids"]
        assert set(choice["steering_push"]) == {"0"}
        assert 0.3 < choice["steering_push"]["0"] < 3, choice["steering_push"]
    assert changed >= 3
