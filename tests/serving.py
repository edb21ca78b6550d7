"""A real server for tests: scripts/serve.py in a subprocess on a free 127.0.0.1 port.

    with Served(["--model", path, "--max_batch", "4"]) as s:
        r = s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
        s.client()                                      # an openai.OpenAI on this server

    launched = Served([...]).start()   # loads while this process does something else
    with launched as s: ...            # ready from here

    generated(model, ["Hi"], tmp, 12)  # scripts/generate.py's greedy answers, to compare with
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx
from conftest import ROOT, in_process

READY = re.compile(r"serving (\S+) on (http://\S+)")
START_LIMIT_S = 600  # a loaded shared machine can take minutes to start torch and a model


class Served:
    def __init__(self, args, launcher=None, env=None, api_key=None):
        self.args = list(args)
        self.launcher = launcher or [sys.executable]
        self.env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
        self.api_key = api_key

    def start(self) -> "Served":
        """Launch the server without waiting for it (`with` waits until it is ready; it
        launches it first when start() was not called)."""
        self.err = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = self.launcher + [os.path.join(ROOT, "scripts", "serve.py"), "--port", "0",
                               *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env=self.env, cwd=ROOT, start_new_session=True)
        self.lines = []
        return self

    def __enter__(self):
        if not hasattr(self, "proc"):
            self.start()
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = READY.search(line)
            if m:
                self.model, self.url = m.group(1), m.group(2)
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                self.http = httpx.Client(base_url=self.url, timeout=300, headers=headers)
                return self
        os.killpg(self.proc.pid, signal.SIGKILL)  # and what it started (vLLM's engine core)
        raise RuntimeError(f"the server did not start: {self.lines} {self.stderr()}")

    def stderr(self) -> str:
        self.err.flush()
        with open(self.err.name) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM) -> subprocess.CompletedProcess:
        """Signal the server (rank 0's launcher); returns its exit code and remaining output."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=120)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                           "".join(self.lines) + out, self.stderr())

    def __exit__(self, *exc):
        if hasattr(self, "http"):
            self.http.close()
        if self.proc.poll() is None:
            self.stop()
        if os.path.exists(self.err.name):
            os.unlink(self.err.name)

    def post(self, path, body, **kw):
        return self.http.post(path, json=body, **kw)

    def complete(self, prompt, **kw) -> dict:
        r = self.post("/v1/completions", {"prompt": prompt, "temperature": 0, **kw})
        assert r.status_code == 200, r.text
        return r.json()

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0,
                      timeout=300)

    def stream(self, path, body) -> list:
        """The parsed `data:` chunks of a streamed answer, [DONE] left out (asserted last)."""
        chunks = []
        with self.http.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
        assert chunks[-1] == "[DONE]", chunks[-3:]
        return [json.loads(c) for c in chunks[:-1]]


def generated(model, prompts, workdir, max_gen_len, *flags) -> list:
    """scripts/generate.py's greedy completions of `prompts` (one prompt per batch, as the server
    runs a lone request), run in this process -> [(completion, tokens)]."""
    import steering.generate as generate_cmd

    src = os.path.join(str(workdir), f"prompts{abs(hash((tuple(prompts), flags)))}.json")
    with open(src, "w") as f:
        json.dump(prompts, f)
    out = os.path.join(str(workdir), "out.jsonl")
    r = in_process(["generate.py", "--model", model, "--prompts", src, "--output", out,
                    "--max_gen_len", max_gen_len, "--batch_size", 1, *flags],
                   lambda: generate_cmd.command(generate_cmd.main))
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    return [(row["completion"], row["tokens"]) for row in rows]
