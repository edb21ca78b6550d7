"""The native server's bad and hostile requests (tests/bad_requests.py, the same tables) against
`llama-ccs serve --engine vllm`: each is a 4xx JSON error naming its field, or an answer, and the
server serves on; after each hostile one an innocent greedy request beside a longer running one
answers what it answers alone, also after a steering push that overflows inside vLLM's model
(that request alone ends, with the native engine's error; its KV-cache blocks are cleared).
Runs in the .venv-vllm/ of `make setup-vllm` (`make test-heavy`); one vLLM server for the module.

Left out, native-only by nature: a scheduler that fails under a monkeypatched Engine.run and
torchrun ranks that exit with it (test_serve_tiny.py: vLLM's engine is its own process tree). Not
repeated here: the SIGTERM grace test (test_serve_tiny.py; it ends its server, and a second vLLM
start costs minutes: the HTTP side that it tests, server/main.py run_http, is the same code on
both engines)."""
import pytest
import torch
from bad_requests import (BAD, BAD_COMPLETIONS, INNOCENT, check_bad, check_bad_completion,
                          check_clients_let_go, check_hostile, check_http, check_neutral,
                          hostile)
from serving import Served
from smol import push_vectors, smol_hf

pytestmark = pytest.mark.heavy

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
LONG = 900  # tokens of the request running beside the innocent one (context 1024)


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory):
    """A vectors folder: a random vector of norm 40 at layers 10 and 20."""
    return push_vectors(tmp_path_factory.mktemp("vec"))


@pytest.fixture(scope="module")
def served(vector_dir):
    """Keyless on 127.0.0.1 (so the Host check is on), the alias `pushed` that BAD_COMPLETIONS
    names, --read_timeout 2 (check_clients_let_go)."""
    server = Served(["--engine", "vllm", "--model", smol_hf(), "--vectors",
                     f"push={vector_dir[0]}", "--alias", "pushed=push:10:1.0",
                     "--max_batch", "4", "--max_seq_len", "1024", "--read_timeout", "2"],
                    env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
    with server as s:
        yield s
        r = s.stop()
    assert r.returncode == 0 and r.stdout.rstrip().endswith("stopped"), r.stderr[-2000:]


def test_bad_requests_are_4xx_json_and_the_server_goes_on(served):
    check_bad(served, BAD)


@pytest.mark.parametrize("body, param", BAD_COMPLETIONS)
def test_bad_completion_requests_are_400(served, body, param):
    check_bad_completion(served, body, param)


def test_unserved_fields_at_neutral_values_are_accepted(served):
    check_neutral(served, INNOCENT)


def test_hostile_requests_leave_the_server_and_other_requests_alone(served, vector_dir):
    """The overflow: a multiplier whose push at each of layers 10 and 20 fits float32 (0.9 of
    its range at the largest entry; SteerSettings.check lets it through) but whose sum does not:
    vLLM itself samples token 0 from NaN logits without a word, and the KV-cache blocks it wrote
    NaN into turned the next request on them into NaN (seen before the guard)."""
    innocent = served.complete(INNOCENT, max_tokens=8)["choices"][0]["text"]
    peak = max(float(v.abs().max()) for v in vector_dir[1].values())
    overflow = {"vector": "push", "layers": [10, 20], "multiplier": 0.9 * FLOAT32_MAX / peak}
    steer = {"vector": "push", "layers": [10], "multiplier": 1.0}
    check_hostile(served, hostile(steer, overflow), innocent, long_tokens=LONG)
    plain = {"prompt": INNOCENT, "max_tokens": 8, "temperature": 0}
    scored = served.post("/v1/completions", {**plain, "steering": overflow, "echo": True,
                                             "max_tokens": 0, "logprobs": 1})
    assert scored.status_code == 400 and "non-finite" in scored.json()["error"]["message"]
    assert served.complete(INNOCENT, max_tokens=8)["choices"][0]["text"] == innocent


def test_http_refusals_and_routes(served):
    check_http(served)


def test_clients_that_leave_or_crawl_are_let_go(served):
    check_clients_let_go(served, max_tokens=1000)
