"""`llama-ccs serve --engine vllm` (server/vllm_engine.py) as a real subprocess on 127.0.0.1: the
project's routes and request fields over vLLM, steered greedy text equal to the native engine's,
steering_push in the answer (whole and streamed), the scoring fields (echo with the prompt's
log-probabilities equal to the native engine's, token-id and list prompts, n > 1), steered
aliases, the tokenizer routes and the API key, 400s for what this engine does not do. Runs in the
.venv-vllm/ of `make setup-vllm` (`make test-heavy`)."""
import json

import numpy as np
import pytest
import torch
from bad_requests import check_key
from serving import Served
from smol import push_vectors, smol_hf

pytestmark = pytest.mark.heavy

NEW = 16
KEY = "vllm-key-123"
ALIAS = {"vector": "push", "layers": [10, 20], "multiplier": 1.0, "positions": "generated"}
LOGPROB_TOL = 1e-3  # |vLLM - native| per prompt token, natural log, SmolLM2 float32 (measured:
# at most 2.7e-5 over 3 prompts of 5-20 tokens; vLLM's compiled CPU kernels sum in another order)


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory):
    """A vectors folder: a random vector of norm 40 at layers 10 and 20 (layer_L.safetensors)."""
    return push_vectors(tmp_path_factory.mktemp("vec"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, vector_dir):
    hf = smol_hf()
    alias = json.dumps(ALIAS)
    server = Served(["--engine", "vllm", "--model", str(hf), "--vectors",
                     f"push={vector_dir[0]}", "--max_batch", "16", "--max_seq_len", "1024",
                     "--api_key", KEY, "--alias", "pushed=push:10:1.0",
                     "--alias", f"gen={alias}"],
                    env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}, api_key=KEY)
    with server as s:
        yield s


@pytest.fixture(scope="module")
def native():
    from llama.checkpoint import load_model
    from llama.dist import setup
    from llama.gguf import default_model_path
    from llama.tokenizer import load_tokenizer

    loaded = load_model(default_model_path(), setup(mp=1, device="cpu"))
    return loaded.model.eval(), load_tokenizer(loaded.tokenizer_path)


def native_greedy(model, ids, steer=None):
    from llama.model import Steer

    out = []
    for _ in range(NEW):
        logits = model(torch.tensor([ids + out]), logits=True,
                       prompt_len=torch.tensor([len(ids)]),
                       steer=Steer(**steer) if steer else None)["logits"][0, -1]
        out.append(int(logits.argmax()))
    return out


def test_steered_completion_equals_native_and_reports_push(served, native, vector_dir):
    model, tok = native
    prompt = "The capital of France is"
    body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    plain = served.post("/v1/completions", body).json()["choices"][0]
    steered = served.post("/v1/completions", {**body, "steering": {
        "vector": "push", "layers": [10, 20], "multiplier": 1.0}}).json()["choices"][0]
    ids = tok.encode(prompt, bos=True)
    assert plain["token_ids"] == native_greedy(model, ids)
    want = native_greedy(model, ids, dict(vectors=vector_dir[1], multiplier=1.0))
    assert steered["token_ids"] == want and steered["token_ids"] != plain["token_ids"]
    push = steered["steering_push"]
    assert set(push) == {"10", "20"} and all(0.05 < p < 2 for p in push.values()), push
    assert "steering_push" not in plain


def test_streamed_chat_carries_push(served):
    client = served.client()
    chunks = list(client.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8,
        temperature=0, stream=True,
        extra_body={"steering": {"vector": "push", "layers": [10], "multiplier": 2.0}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    last = [c for c in chunks if c.choices][-1].model_dump()["choices"][0]
    assert float(last["steering_push"]["10"]) > 0


@pytest.mark.parametrize("field,value,param", [
    ("steering", {"vector": "nope", "layers": [10]}, "steering.vector"),
    ("steering", {"vector": "push", "layers": [0]}, "steering.layers"),
    ("probe", True, "probe"),
    ("temperature", 0.005, "temperature"),  # vLLM would raise it to 0.01: not what was asked
])
def test_refusals_are_400_naming_the_field(served, field, value, param):
    r = served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_refusals_at_start_name_the_way_out(vector_dir):
    """A GGUF (or Meta) model: the conversion command; a bad --alias or parallel size, before
    vLLM starts."""
    from conftest import in_process, one_line_error

    from llama.gguf import default_model_path
    from server.main import cli

    r = in_process(["serve", "--engine", "vllm", "--model", default_model_path()], cli)
    one_line_error(r, "Hugging Face folder", "--to hf")
    r = in_process(["serve", "--engine", "vllm", "--model", smol_hf(), "--vectors",
                    f"push={vector_dir[0]}", "--alias", "x=nope:10:1.0"], cli)  # no engine start
    one_line_error(r, "--alias x=nope:10:1.0", "no vector named 'nope'")
    r = in_process(["serve", "--engine", "vllm", "--model", smol_hf(),
                    "--pipeline_parallel_size", "31"], cli)  # SmolLM2 has 30 layers
    one_line_error(r, "--pipeline_parallel_size 31", "30 layers")
    r = in_process(["serve", "--engine", "vllm", "--model", smol_hf(),
                    "--tensor_parallel_size", "0"], cli)
    one_line_error(r, "--tensor_parallel_size 0", "positive")


TEXTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
         "Water boils at 100 degrees Celsius at sea level, and at lower temperatures higher up."]


def native_scores(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1 and the most likely token there, the native forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), logits=True)["logits"][0, :-1].float()
    logprobs = torch.log_softmax(logits, -1)
    return logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logprobs.argmax(-1)


def test_echo_prompt_logprobs_equal_the_native_engine(served, native):
    """echo + logprobs 2 + max_tokens 0 on a list of text and token-id prompts: the prompt alone,
    its tokens' log-probabilities within LOGPROB_TOL of the native engine's, the most likely
    token and the prompt's own in each top_logprobs (the native engine's layout)."""
    model, tok = native
    ids = [tok.encode(tok.as_text(t), bos=True) for t in TEXTS]
    prompts = [TEXTS[0], ids[1], ids[2]]
    r = served.post("/v1/completions", {"prompt": prompts, "echo": True, "logprobs": 2,
                                        "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    worst = 0.0
    for text, want_ids, choice in zip(TEXTS, ids, out["choices"]):
        lp = choice["logprobs"]
        assert choice["text"] == tok.decode(want_ids) and choice["token_ids"] == []
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(want_ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want, best = native_scores(model, want_ids)
        got = torch.tensor(lp["token_logprobs"][1:])
        worst = max(worst, float((got - want).abs().max()))
        for i, top in enumerate(lp["top_logprobs"][1:]):
            assert tok.decode([int(best[i])]) in top and tok.decode([want_ids[i + 1]]) in top
            assert 2 <= len(top) <= 3 and max(top.values()) >= lp["token_logprobs"][i + 1]
    print(f"prompt log-probabilities: largest |vLLM - native| {worst:.2e}")
    assert worst < LOGPROB_TOL
    assert out["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert out["usage"]["completion_tokens"] == 0


def test_echo_with_a_generated_token_as_lm_eval_asks(served, native):
    """lm-eval's log-likelihood request: echo, logprobs 1, max_tokens 1 on token ids."""
    model, tok = native
    ids = tok.encode(tok.as_text(TEXTS[2]), bos=True)
    body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    choice = served.complete(**body)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    want, _ = native_scores(model, ids)
    assert np.allclose(lp["token_logprobs"][1:-1], want.numpy(), atol=LOGPROB_TOL)
    plain = served.complete(ids, max_tokens=1, logprobs=1)["choices"][0]
    assert choice["text"] == tok.decode(ids) + plain["text"]
    assert lp["token_logprobs"][-1] == pytest.approx(plain["logprobs"]["token_logprobs"][0],
                                                     abs=1e-4)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and len(offsets) == len(lp["tokens"])


def test_token_ids_and_lists_give_what_the_text_gives(served, native):
    _, tok = native
    alone = [served.complete(t, max_tokens=6)["choices"][0]["text"] for t in TEXTS[:2]]
    ids = tok.encode(tok.as_text(TEXTS[0]), bos=True)
    assert served.complete(ids, max_tokens=6)["choices"][0]["text"] == alone[0]
    out = served.complete([ids, TEXTS[1]], max_tokens=6)
    assert [c["text"] for c in out["choices"]] == alone
    assert [c["index"] for c in out["choices"]] == [0, 1]


def test_n_samples_with_a_seed(served):
    greedy = served.complete(TEXTS[0], max_tokens=5)["choices"][0]["text"]
    out = served.complete([TEXTS[0], TEXTS[1]], max_tokens=5, n=2)
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert texts[:2] == [greedy, greedy] and texts[2] == texts[3]  # greedy: equal samples
    tiny = served.complete(TEXTS[0], max_tokens=5, temperature=1e-300, seed=1)
    assert tiny["choices"][0]["text"] == greedy  # a tiny temperature is greedy, as natively
    sampled = served.complete(TEXTS[0], max_tokens=8, n=3, temperature=1.0, seed=5)
    again = served.complete(TEXTS[0], max_tokens=8, n=3, temperature=1.0, seed=5)
    assert [c["text"] for c in sampled["choices"]] == [c["text"] for c in again["choices"]]
    assert len({c["text"] for c in sampled["choices"]}) > 1  # n samples, not one repeated
    assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in out["choices"])


def test_aliases_are_models_steered_by_name(served):
    models = served.http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [served.model, "pushed", "gen"]
    assert models[1]["steering"]["layers"] == [10] and models[2]["steering"]["positions"] == \
        "generated"
    body = {"max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    steered = []
    for name, steering in (("pushed", {"vector": "push", "layers": [10], "multiplier": 1.0}),
                           ("gen", ALIAS)):
        explicit = served.complete(TEXTS[0], steering=steering, **body)["choices"][0]
        named = served.complete(TEXTS[0], model=name, **body)
        assert named["model"] == name
        assert named["choices"][0]["token_ids"] == explicit["token_ids"]
        assert named["choices"][0]["steering_push"] == pytest.approx(explicit["steering_push"],
                                                                     rel=1e-6)
        steered.append(explicit["token_ids"])
    plain = served.complete(TEXTS[0], **body)["choices"][0]
    assert all(ids != plain["token_ids"] for ids in steered)  # the vectors move this model
    chat = served.client().chat.completions.create(
        model="pushed", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        temperature=0)
    assert chat.model == "pushed" and chat.choices[0].message.content
    scored = [served.complete(TEXTS[2], model=m, max_tokens=0, echo=True, logprobs=1)
              for m in (served.model, "pushed")]
    scores = [s["choices"][0]["logprobs"]["token_logprobs"][1:] for s in scored]
    assert not np.allclose(scores[0], scores[1], atol=1e-3)  # log-likelihoods are steered too
    r = served.post("/v1/completions", {"prompt": "a", "model": "pushed", "steering": ALIAS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering"


def test_tokenizer_routes_and_the_key(served, native):
    _, tok = native
    info = served.http.get("/tokenizer_info").json()
    assert info["eos_token"] and info["model_max_length"] == 1024
    text = "Hello <|im_end|> world"
    r = served.post("/tokenize", {"prompt": text}).json()
    assert r["tokens"] == tok.encode(text, bos=True) and r["count"] == len(r["tokens"])
    r = served.post("/tokenize", {"prompt": text, "add_special_tokens": False,
                                  "return_token_strs": True}).json()
    assert "".join(r["token_strs"]) == text
    back = served.post("/detokenize", {"tokens": r["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    r = served.post("/detokenize", {"tokens": [10 ** 6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    check_key(served, KEY)
