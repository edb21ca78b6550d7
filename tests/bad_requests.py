"""Bad and hostile requests, and what a server must answer, for the servers of both engines: the
native one (tests/test_serve.py, test_serve_scoring.py, test_serve_tiny.py) and vLLM
(tests/on_vllm/test_vllm_hostile.py). Each bad request is a 4xx JSON error in OpenAI's shape
naming its field, and the server serves on; after each hostile one, an innocent greedy request
beside a longer running one answers what it answers alone.

    check_bad(server, BAD)                     # SmolLM2 with a vector "push" (no layer 12)
    check_bad_completion(server, body, param)  # each of BAD_COMPLETIONS (alias "pushed")
    check_neutral(server, prompt)              # those fields at values that change nothing
    check_hostile(server, hostile(steer, overflow), innocent_text, long_tokens=1800)
    check_http(server)                         # a keyless loopback server
    check_clients_let_go(server, max_tokens)   # a server started with --read_timeout 2
"""
import json

import pytest

BAD = [  # (body or raw text, endpoint, status, param): SmolLM2 (30 layers), vector "push"
    ("{not json", "completions", 400, None),
    ({"prompt": "x", "steering": {"vector": "nope"}}, "completions", 400, "steering.vector"),
    ({"prompt": "x", "steering": {"vector": "push", "layers": [31]}}, "completions", 400,
     "steering.layers"),
    ({"prompt": "x", "steering": {"vector": "push", "layers": [12]}}, "completions", 400,
     "steering.layers"),
    ('{"prompt": "x", "steering": {"vector": "push", "multiplier": NaN}}', "completions", 400,
     "steering.multiplier"),
    ({"prompt": "x", "steering": {"vector": "push", "multiplier": "2"}}, "completions", 400,
     "steering.multiplier"),
    ({"prompt": "x", "steering": {"vector": "push", "strength": 2}}, "completions", 400,
     "steering.strength"),
    ({"prompt": "x", "temperature": -0.5}, "completions", 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, "completions", 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "completions", 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "completions", 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5000}, "completions", 400, "max_tokens"),
    ({"prompt": ""}, "completions", 400, "prompt"),
    ({"messages": []}, "chat/completions", 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "chat/completions", 400,
     "messages.0.role"),
    ({"prompt": "x", "model": "gpt-4"}, "completions", 404, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}, "chat/completions",
     400, "presence_penalty"),
]

BAD_COMPLETIONS = [  # (body, param) of /v1/completions, each a 400; "pushed": a steered alias
    ({"prompt": []}, "prompt"), ({"prompt": ["ok", 3]}, "prompt.1"),
    ({"prompt": [[1, 2], []]}, "prompt.1"), ({"prompt": [1, 10 ** 6]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"), ({"prompt": ["ok", ""]}, "prompt.1"),
    ({"prompt": "a", "n": 0}, "n"), ({"prompt": "a", "n": 100}, "n"),
    ({"prompt": "a", "echo": "yes"}, "echo"), ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "echo": True, "stream": True}, "stream"),
    ({"prompt": ["a", "b"], "stream": True}, "stream"),
    ({"prompt": "a", "model": "pushed", "steering": {"vector": "push", "layers": [1],
                                                     "multiplier": 3.0}}, "steering"),
    # fields neither engine implements, at values that would change the answer
    ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "a", "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": "a", "top_k": 5}, "top_k"),
    ({"prompt": "a", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "a", "best_of": 2}, "best_of"),
]
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "top_k": -1,
           "response_format": {"type": "text"}, "best_of": 1, "suffix": None, "user": "u1"}


def check_bad(server, table):
    """Every entry of a BAD-shaped table: its status and param; a short answer after each; a body
    over the limit (413); /health still ok."""
    for body, path, status, param in table:
        if isinstance(body, str):
            r = server.http.post(f"/v1/{path}", content=body,
                                 headers={"Content-Type": "application/json"})
        else:
            r = server.post(f"/v1/{path}", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"], (body, err)
        assert server.complete("Hi", max_tokens=1)["choices"][0]["text"]
    r = server.http.post("/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert server.http.get("/health").json()["status"] == "ok"


def check_bad_completion(server, body, param):
    r = server.post("/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert server.complete("a", max_tokens=2)["choices"]  # still serving


def check_neutral(server, prompt: str):
    """Fields no engine implements, sent at the values that change nothing (as clients send their
    defaults), are accepted: the same answer as without them."""
    want = server.complete(prompt, max_tokens=4)["choices"][0]["text"]
    assert server.complete(prompt, max_tokens=4, **NEUTRAL)["choices"][0]["text"] == want


INNOCENT = "the cat sat"
POISON = "x" * 100  # 100 byte tokens: a row written far past where the innocent prompt reaches


def hostile(steer: dict, overflow: dict) -> list:
    """(extra body fields, status, param, words of the message) of hostile requests; steer: a
    steering the server takes; overflow: one whose every push fits float32 (it passes the
    checks) but that overflows inside the model."""
    return [
        ({"temperature": 1e-300}, 200, None, ()),  # greedy, not NaN probabilities
        ({"temperature": 1e-300, "top_p": 0.5, "seed": 3}, 200, None, ()),
        ({"steering": {**steer, "multiplier": 1e308}}, 400, "steering.multiplier", ("float32",)),
        ({"steering": {**steer, "multiplier": 3e38}}, 400, "steering.multiplier", ("float32",)),
        # passes the checks, overflows in the model: only its row ends, and nothing of it stays
        ({"steering": overflow}, 400, "steering.multiplier", ("non-finite logits at step 1",)),
        ({"steering": overflow, "temperature": 0.8}, 400, "steering.multiplier",
         ("non-finite logits at step 1",)),
        ({"seed": 2 ** 64}, 400, "seed", ()),
        ({"seed": -(2 ** 63) - 1}, 400, "seed", ()),
    ]


def innocent_beside_a_longer_one(server, extra: dict, long_tokens: int):
    """A long request holds a row; the hostile request (`extra` fields on POISON) runs and leaves;
    the innocent greedy request then runs while the long one (further along) runs beside it.
    -> (hostile's answer, innocent text, requests running then)."""
    import httpx

    long = {"prompt": "y" * 30, "max_tokens": long_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=300, headers=server.http.headers) as other:
        with other.stream("POST", "/v1/completions", json=long) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # it is running
            bad = server.post("/v1/completions", {"prompt": POISON, "max_tokens": 4, **extra})
            text = server.complete(INNOCENT, max_tokens=8)["choices"][0]["text"]
            running = server.http.get("/health").json()["running"]
    return bad, text, running


def check_hostile(server, cases: list, innocent: str, long_tokens: int):
    """Each hostile case answers its status (an OpenAI-shaped 400 naming its field) and leaves
    the innocent request's text as `innocent` and /health ok; streamed, the overflowing case
    (the fifth) ends in an error event, then [DONE]."""
    for extra, status, param, words in cases:
        bad, text, running = innocent_beside_a_longer_one(server, extra, long_tokens)
        assert bad.status_code == status, (extra, bad.text)
        if status != 200:
            err = bad.json()["error"]
            assert err["param"] == param and all(w in err["message"] for w in words), err
            assert err["type"] == "invalid_request_error"
        assert text == innocent, extra
        assert running >= 1, "the long request had ended: the innocent one ran alone"
        health = server.http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
    overflow = cases[4][0]["steering"]
    chunks = server.stream("/v1/completions", {"prompt": POISON, "max_tokens": 4,
                                               "steering": overflow})
    assert chunks[-1]["error"]["param"] == "steering.multiplier"
    assert "non-finite logits at step 1" in chunks[-1]["error"]["message"]
    assert server.complete(INNOCENT, max_tokens=8)["choices"][0]["text"] == innocent


def check_http(server):
    """Content-Type must be JSON (415), a keyless loopback server answers only loopback Host names
    (421: DNS rebinding), unknown paths 404 and known ones with another method 405, deep JSON 400,
    the playground at /; the server serves on after each."""
    import httpx

    hi = {"prompt": "hi", "max_tokens": 1, "temperature": 0}
    r = server.http.post("/v1/completions", content=json.dumps(hi),
                         headers={"Content-Type": "text/plain"})  # a cross-site "simple" post
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = server.http.post("/v1/completions", content=json.dumps(hi))
    assert r.status_code == 415
    port = server.url.rsplit(":", 1)[1]
    for host, status in (("evil.example", 421), (f"evil.example:{port}", 421),
                         (f"localhost:{port}", 200), (f"[::1]:{port}", 200)):
        r = server.http.post("/v1/completions", json=hi, headers={"Host": host})
        assert r.status_code == status, (host, r.text)
    with httpx.Client(base_url=server.url, headers={"Host": "attacker.test"}) as rebound:
        assert rebound.get("/health").status_code == 421
        assert rebound.get("/").status_code == 421
    for method, path, status in (("POST", "/v1/nope", 404), ("GET", "/nope", 404),
                                 ("GET", "/v1/completions", 405),
                                 ("DELETE", "/v1/models", 405)):
        r = server.http.request(method, path)
        assert r.status_code == status and r.json()["error"]["message"], (method, path, r.text)
    assert server.http.get("/").status_code == 200  # the playground page
    r = server.http.post("/v1/completions", content="[" * 100000 + "]" * 100000,
                         headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
    assert server.complete("hi", max_tokens=2)["usage"]["completion_tokens"] >= 1


def check_key(server, key: str):
    """Every API route needs `Authorization: Bearer KEY` (401 in OpenAI's shape otherwise), the
    openai client included; the playground at / does not (its requests carry the key)."""
    import httpx
    from openai import AuthenticationError, OpenAI

    routes = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/v1/vectors"),
              ("GET", "/health"), ("POST", "/v1/chat/completions"), ("GET", "/tokenizer_info"),
              ("POST", "/tokenize"), ("POST", "/detokenize")]
    with httpx.Client(base_url=server.url, timeout=60) as anon:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
                r = anon.request(method, path, headers=headers, json={"prompt": "a"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert anon.get("/").status_code == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = server.client().completions.create(model=server.model, prompt="a", max_tokens=2,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


def check_clients_let_go(server, max_tokens: int):
    """Whole-answer clients that give up free their rows at once (they held them until
    max_tokens); a connection that sends its headers or its body too slowly (--read_timeout 2)
    is closed, or answered 408, instead of being held for ever. max_tokens: what the abandoned
    requests ask for (far more than they get to generate)."""
    import socket
    import time

    import httpx

    before = server.http.get("/health").json()["dropped"]
    body = {"prompt": "z", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    for _ in range(4):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.5,
                       headers=server.http.headers)
    deadline = time.monotonic() + 120  # a bound for a loaded machine, not a timing assertion
    while time.monotonic() < deadline:
        h = server.http.get("/health").json()
        if h["dropped"] == before + 4 and h["running"] == 0:
            break
        time.sleep(0.1)
    assert h["dropped"] == before + 4 and h["running"] == 0 and h["waiting"] == 0, h
    host, port = server.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
        start = time.monotonic()
        assert slow.recv(1000) == b""  # closed by the server
        assert time.monotonic() - start < 50
    with socket.create_connection((host, int(port)), timeout=60) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{")
        answer = b""
        while b"\r\n\r\n{" not in answer or not answer.endswith(b"}"):
            chunk = slow.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive" in answer, answer
    assert server.complete("hi", max_tokens=2)["usage"]["completion_tokens"] >= 1
