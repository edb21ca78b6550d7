"""`llama-ccs serve --engine vllm` (server/vllm_engine.py) as a real subprocess on 127.0.0.1: the
project's routes and request fields over vLLM, steered greedy text equal to the native engine's,
steering_push in the answer (whole and streamed), 400s for what this engine does not do. Runs in
the .venv-vllm/ of `make setup-vllm` (`make test-heavy`)."""
import pytest
import torch
from serving import Served
from smol import smol_hf

pytestmark = pytest.mark.heavy

NEW = 16


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory):
    """A vectors folder: a random vector of norm 40 at layers 10 and 20 (layer_L.safetensors)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("vec") / "push"
    path.mkdir()
    vecs = {}
    for layer in (10, 20):
        v = torch.randn(576, generator=g)
        vecs[layer] = v / v.norm() * 40
        save_file({"vector": vecs[layer].contiguous()}, str(path / f"layer_{layer}.safetensors"))
    return path, vecs


@pytest.fixture(scope="module")
def served(tmp_path_factory, vector_dir):
    hf = smol_hf()
    server = Served(["--engine", "vllm", "--model", str(hf), "--vectors",
                     f"push={vector_dir[0]}", "--max_batch", "16", "--max_seq_len", "1024"],
                    env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
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
])
def test_refusals_are_400_naming_the_field(served, field, value, param):
    r = served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_refusals_at_start_name_the_way_out(vector_dir):
    """A GGUF (or Meta) model: the conversion command."""
    from conftest import in_process, one_line_error

    from llama.gguf import default_model_path
    from server.main import cli

    r = in_process(["serve", "--engine", "vllm", "--model", default_model_path()], cli)
    one_line_error(r, "Hugging Face folder", "--to hf")
