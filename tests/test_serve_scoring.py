"""scripts/serve.py on a tiny random model, as an evaluation harness talks to it: every prompt
form, echo with the prompt's log-probabilities (against a transformers forward), n > 1, vLLM's
tokenizer routes, and steered models by name (--alias)."""
import json

import numpy as np
import pytest
import torch
from bad_requests import BAD_COMPLETIONS, check_bad_completion, check_neutral
from conftest import in_process, one_line_error
from safetensors.numpy import save_file
from serving import Served
from tiny import hf_model, make_hf

from llama.cli import command
from llama.tokenizer import load_tokenizer
from server.main import serve

IDS = [[40, 72, 101, 108, 3, 250, 19, 60], [7, 200, 33]]
STEER = {"vector": "push", "layers": [1], "multiplier": 3.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve_scoring")
    path = make_hf(base / "gqa", "gqa")
    vec = base / "push"
    vec.mkdir()
    save_file({"vector": np.random.default_rng(3).standard_normal(64).astype(np.float32)},
              str(vec / "layer_1.safetensors"))
    return {"path": path, "vectors": str(vec), "oracle": hf_model(path),
            "tok": load_tokenizer(path)}


def base_args(tiny):
    return ["--model", tiny["path"], "--vectors", tiny["vectors"], "--threads", "1",
            "--device", "cpu", "--max_batch", "3"]


@pytest.fixture(scope="module")
def server(tiny):
    spec = json.dumps({"vector": "push", "layers": [1], "multiplier": 3.0, "ablate": False})
    with Served(base_args(tiny) + ["--alias", "pushed=push:1:3.0",
                                   "--alias", f"pushed_json={spec}"]) as s:
        yield s


def reference(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 and the argmax token there, from transformers."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logprobs.argmax(-1)


def test_echo_scores_token_prompts_like_transformers(server, tiny):
    r = server.post("/v1/completions", {"prompt": IDS, "echo": True, "logprobs": 2,
                                        "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    tok = tiny["tok"]
    for ids, choice in zip(IDS, choices):
        lp = choice["logprobs"]
        assert choice["text"] == tok.decode(ids)  # the prompt only: nothing generated
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want, best = reference(tiny["oracle"], ids)
        got = torch.tensor(lp["token_logprobs"][1:])
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
        for i, top in enumerate(lp["top_logprobs"][1:]):
            assert tok.decode([int(best[i])]) in top  # the most likely token is always there
            assert tok.decode([ids[i + 1]]) in top  # and the prompt's own
            assert max(top.values()) >= lp["token_logprobs"][i + 1]
    assert r.json()["usage"]["prompt_tokens"] == sum(map(len, IDS))


def test_echo_with_a_generated_token_as_lm_eval_asks(server, tiny):
    """lm-eval's log-likelihood request: echo, logprobs 1, max_tokens 1; it reads the prompt's
    positions and leaves out the last (generated) one."""
    body = {"prompt": IDS[0], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    choice = server.complete(**body)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(IDS[0]) + 1
    want, _ = reference(tiny["oracle"], IDS[0])
    assert np.allclose(lp["token_logprobs"][1:-1], want.numpy(), atol=1e-4)
    plain = server.complete(IDS[0], max_tokens=1, logprobs=1)["choices"][0]
    assert choice["text"] == tiny["tok"].decode(IDS[0]) + plain["text"]
    assert lp["token_logprobs"][-1] == pytest.approx(plain["logprobs"]["token_logprobs"][0],
                                                     abs=1e-5)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and len(offsets) == len(lp["tokens"])


def test_token_ids_are_used_verbatim_and_text_keeps_its_rule(server, tiny):
    tok = tiny["tok"]
    text = "hello there"
    by_text = server.complete(text, max_tokens=6)["choices"][0]["text"]
    ids = tok.encode(tok.as_text(text), bos=True)
    assert server.complete(ids, max_tokens=6)["choices"][0]["text"] == by_text
    echo = server.complete(text, max_tokens=0, echo=True, logprobs=0)["choices"][0]
    assert echo["text"] == text and len(echo["logprobs"]["tokens"]) == len(ids)


def test_lists_of_prompts_and_n_samples(server):
    prompts = ["hello there", "a b c"]
    alone = [server.complete(p, max_tokens=5)["choices"][0]["text"] for p in prompts]
    out = server.complete(prompts, max_tokens=5, n=2)
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert texts == [alone[0], alone[0], alone[1], alone[1]]  # greedy: equal samples
    sampled = server.complete(prompts[0], max_tokens=8, n=3, temperature=1.0, seed=5)
    again = server.complete(prompts[0], max_tokens=8, n=3, temperature=1.0, seed=5)
    assert [c["text"] for c in sampled["choices"]] == [c["text"] for c in again["choices"]]
    assert len({c["text"] for c in sampled["choices"]}) > 1  # n samples, not one repeated
    assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in out["choices"])


@pytest.mark.parametrize("body, param", BAD_COMPLETIONS)
def test_bad_completion_requests_are_400(server, body, param):
    check_bad_completion(server, body, param)


def test_unserved_fields_at_neutral_values_are_accepted(server):
    check_neutral(server, "hello there")


def test_tokenizer_routes_answer_as_vllm(server, tiny):
    info = server.http.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["model_max_length"] == 2048
    assert info["tokenizer_class"]
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(tiny["path"] + "/tokenizer.json")
    text = "hello <s> world"
    r = server.post("/tokenize", {"prompt": text}).json()
    want = hf.encode(text).ids  # the HF tokenizer's defaults: special tokens added and parsed
    assert r["tokens"] == want and r["count"] == len(want) and r["max_model_len"] == 2048
    assert r["token_strs"] is None
    r = server.post("/tokenize", {"prompt": text, "add_special_tokens": False,
                                  "return_token_strs": True}).json()
    assert r["tokens"] == hf.encode(text, add_special_tokens=False).ids
    assert "".join(r["token_strs"]) == text
    back = server.post("/detokenize", {"tokens": r["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    for path, body in (("/tokenize", {"prompt": 3}), ("/detokenize", {"tokens": [10 ** 6]}),
                       ("/detokenize", {"tokens": "abc"})):
        r = server.post(path, body)
        assert r.status_code == 400 and r.json()["error"]["param"], r.text


def test_aliases_are_models_steered_by_name(server):
    models = server.http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [server.model, "pushed", "pushed_json"]
    assert models[1]["steering"]["vector"] == "push" and models[1]["steering"]["layers"] == [1]
    plain = server.complete("hello there", max_tokens=8)["choices"][0]["text"]
    steered = server.complete("hello there", max_tokens=8, steering=STEER)
    steered = steered["choices"][0]["text"]
    assert steered != plain  # the vector moves this model
    for name in ("pushed", "pushed_json"):
        out = server.complete("hello there", max_tokens=8, model=name)
        assert out["choices"][0]["text"] == steered and out["model"] == name
    scored = [server.complete(IDS[0], model=m, max_tokens=0, echo=True, logprobs=1)
              for m in (server.model, "pushed")]
    scores = [s["choices"][0]["logprobs"]["token_logprobs"][1:] for s in scored]
    assert not np.allclose(scores[0], scores[1], atol=1e-3)  # log-likelihoods are steered too
    chat = server.post("/v1/chat/completions", {"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]})
    assert chat.status_code == 404 and "pushed" in chat.json()["error"]["message"]


@pytest.mark.parametrize("entry, words", [
    ("x=push:1", ["--alias x=push:1", "VECTOR:LAYERS:MULTIPLIER"]),
    ("x=nope:1:1.0", ["--alias", "no vector named 'nope'"]),
    ("x=push:7:1.0", ["--alias", "layer 7"]),
    ("x=push:1:big", ["--alias", "multiplier 'big'"]),
    ("x=push:1:1:sideways", ["--alias", "sideways"]),
    ("x={not json", ["--alias", "JSON"]),
    ("gqa=push:1:1.0", ["--alias", "taken"]),
])
def test_bad_aliases_are_refused_in_one_line(tiny, dist1, entry, words):
    r = in_process(["serve.py", *base_args(tiny), "--port", "0", "--alias", entry],
                   lambda: command(serve))
    one_line_error(r, *words)
