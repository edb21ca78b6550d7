"""The serve command: load the model, vectors and probe on every rank, then rank 0 serves HTTP
(uvicorn) and runs the scheduler while the other ranks follow its steps.

    python scripts/serve.py --model PATH [--host 127.0.0.1] [--port 8000] [--vectors DIR ...]
        [--probe RUN/probes/METHOD.safetensors [--probe_layer L]] [--max_batch 8]
        [--alias NAME=VECTOR:LAYERS:MULTIPLIER[:residual] ...]
    torchrun --nproc_per_node MP scripts/serve.py --model PATH ...
"""
import contextlib
import io
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import List, Optional

import torch

from llama.errors import LlamaError, fail

LOCAL = ("127.0.0.1", "localhost", "::1")
STOP_WAIT_S = 10.0  # after a scheduler failure: how long its thread may take to tell the ranks


def vector_sources(entries: List[str]) -> List[tuple]:
    """--vectors entries, PATH or NAME=PATH -> [(name, path)] (name: the file or folder name
    without extension)."""
    out = []
    for e in entries:
        name, _, path = e.partition("=") if "=" in e else ("", "", e)
        name = name or os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        if any(name == n for n, _ in out):
            raise LlamaError(f"--vectors: two vectors are named {name!r} (name them: NAME=PATH)")
        out.append((name, path))
    return out


def load_probe(path: str, layer: Optional[int], dim: int, n_layers: int, fingerprint):
    """A saved ccs.py probe read at `layer` (engine.Probe), through llama.vectors.read_probe (the
    reader the report's heat-map uses too); layer None: the layer ccs.py chose on validation rows,
    recorded in the probe."""
    from llama.vectors import read_probe

    from .engine import Probe

    saved = read_probe(path, dim, fingerprint)
    if layer is None:
        layer = saved.chosen_layer
    if layer is None:
        raise LlamaError(f"--probe {path} records no chosen layer (saved by an older ccs.py): "
                         f"give --probe_layer L{summary_layer(path)}")
    if not 0 <= layer <= n_layers:
        raise LlamaError(f"--probe_layer {layer} is not in the model (layers 0..{n_layers})")
    weight, bias, threshold = saved.at(layer)
    return Probe(layer, torch.from_numpy(weight.astype("float32").copy()), bias, path,
                 saved.kind, threshold, saved.text, str(saved.info.get("positive_class", "")))


def summary_layer(path: str) -> str:
    """", e.g. --probe_layer 22 (the layer RUN/summary.csv chose for lr)" for a probe in
    RUN/probes/, or "" when that table is not found."""
    import csv

    method = os.path.splitext(os.path.basename(path))[0]
    summary = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "summary.csv")
    try:
        with open(summary, newline="") as f:
            rows = {r.get("method"): r.get("layer") for r in csv.DictReader(f)}
    except OSError:
        return ""
    layer = rows.get(method + "_signed") or rows.get(method)
    if not layer or not layer.split(",")[0].isdigit():
        return ""
    return f", e.g. --probe_layer {layer.split(',')[0]} (the layer {summary} chose for {method})"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads. Its protocol is named (IPPROTO_TCP):
    asyncio sets TCP_NODELAY only on sockets that say so, and without it each answer on a reused
    connection waits on Nagle's algorithm and delayed ACKs (~40 ms a request)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted ones
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LlamaError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    return sock


def serve(model: str, host: str = "127.0.0.1", port: int = 8000,
          vectors: Optional[List[str]] = None, probe: Optional[str] = None,
          probe_layer: Optional[int] = None, max_batch: int = 8, max_seq_len: int = 2048,
          api_key: Optional[str] = None, api_key_env: Optional[str] = None,
          no_auth: bool = False, max_body: int = 1 << 20, threads: int = 0,
          compute_dtype: str = "float32", device: str = "auto",
          tokenizer_path: Optional[str] = None,
          name: Optional[str] = None, shutdown_grace: float = 30.0,
          read_timeout: float = 30.0, engine: str = "native", tensor_parallel_size: int = 1,
          pipeline_parallel_size: int = 1, alias: Optional[List[str]] = None):
    """Serve a model over an OpenAI-compatible HTTP API, with per-request steering and probe
    read-outs.

    model: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    host: the address to listen on. A loopback one (127.0.0.1, localhost, ::1) without a key
        answers only requests whose Host header names a loopback address (421 otherwise: a web
        page cannot reach it through DNS rebinding); another address needs --api_key or
        --no_auth
    port: the TCP port (0: any free one, printed in the ready line)
    vectors: steering vectors, PATH or NAME=PATH, the flag given once per source: a vectors
        folder (scripts/generate_vectors_from_cache.py) or a saved linear probe's direction
    probe: a saved ccs.py probe, RUN/probes/METHOD.safetensors, for "probe": true read-outs
    probe_layer: the layer the probe reads (default: the layer ccs.py chose on validation
        rows, recorded in the probe)
    max_batch: requests decoded together at most (rows of the KV cache)
    max_seq_len: tokens per request (prompt + max_tokens) at most, capped at the model's
    api_key: every request must send Authorization: Bearer KEY
    api_key_env: the environment variable holding the key (keeps it out of the process list)
    no_auth: allow listening on a non-local address without a key: then nothing but the
        network protects it (no key, no Host check; bodies must still be application/json,
        so a cross-site form cannot post one): use it only behind a firewall or a proxy
        that authenticates
    max_body: request bodies over this many bytes are refused (413)
    threads: torch CPU threads (0: torch's default)
    compute_dtype: of the model's weights and arithmetic: float32, float16 or bfloat16
    device: auto, cpu or cuda (default: auto)
    tokenizer_path: the tokenizer file, when the model's own is not found beside it
    name: the model id clients use (default: the model file or folder name)
    shutdown_grace: seconds requests still running at SIGTERM or Ctrl-C get to finish; then
        each is ended with a 503 error (an error event and [DONE] when streaming)
    read_timeout: seconds a client has to send a request's headers (from connecting or from
        its previous answer) and its body (408); a slower connection is closed
    engine: native (this project's engine: torchrun model parallelism, the exact float32
        reference) or vllm (vLLM's engine with the steering plugin, server/vllm_engine.py: run
        from the .venv-vllm/ of `make setup-vllm`; --model a Hugging Face folder)
    tensor_parallel_size: vLLM's tensor parallelism (--engine vllm): each layer split across N
        processes (GPUs); the steering vector is added where the residual stream is whole
    pipeline_parallel_size: vLLM's pipeline parallelism (--engine vllm): the layers split into
        N stages, one per process (GPU or node); each stage steers, probes and measures
        steering_push at its own layers. On a CPU without VLLM_CPU_OMP_THREADS_BIND set, the
        server gives vLLM's tensor x pipeline workers every core, split evenly
    alias: a steered model by name, NAME=VECTOR:LAYERS:MULTIPLIER[:SCALE] (layers
        comma-separated, SCALE raw or residual; e.g. sent=sentiment:10,14:0.25:residual) or
        NAME={JSON steering settings}, the flag given once per alias: /v1/models lists NAME and
        a request for model NAME is steered so
    """
    from llama.dist import owned_group, setup
    from llama.generation import Generator
    from llama.vectors import load_vectors
    from steering.scale import unit_norms_of

    from .aliases import read_aliases
    from .engine import Engine, StepChannel, follow
    from .scheduler import Scheduler
    from .schemas import Limits

    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise LlamaError(f"--api_key_env {api_key_env}: the variable is unset or empty")
    elif api_key is not None and not api_key.strip():
        raise LlamaError("--api_key is empty: give a key, or leave the flag out")
    for flag, v in (("shutdown_grace", shutdown_grace), ("read_timeout", read_timeout)):
        if not v >= 0 or v == float("inf"):
            raise LlamaError(f"--{flag} {v} is not a finite number of seconds >= 0")
    if host not in LOCAL and api_key is None and not no_auth:
        raise LlamaError(f"--host {host} is not a local address: give --api_key (or "
                         "--api_key_env) or, to serve without authentication, --no_auth")
    for flag, v in (("max_batch", max_batch), ("max_seq_len", max_seq_len),
                    ("max_body", max_body)):
        if v < 1:
            raise LlamaError(f"--{flag} {v} is not a positive integer")
    if threads < 0:
        raise LlamaError(f"--threads {threads} is negative")
    if engine not in ("native", "vllm"):
        raise LlamaError(f"--engine {engine!r}: choose native or vllm")
    http = Http(host, api_key, max_body, shutdown_grace, read_timeout)
    if engine == "vllm":
        return serve_on_vllm(model, port, vectors, probe, max_batch, max_seq_len,
                             compute_dtype, (tensor_parallel_size, pipeline_parallel_size),
                             name, http, alias or [], probe_layer)
    for flag, v in (("tensor_parallel_size", tensor_parallel_size),
                    ("pipeline_parallel_size", pipeline_parallel_size)):
        if v != 1:
            raise LlamaError(f"--{flag} is vLLM's (--engine vllm); the native engine splits "
                             "the model with torchrun --nproc_per_node N")
    if threads:
        torch.set_num_threads(threads)
    with owned_group():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale's set-up lines: stdout is
            proc = setup(0, device)  # the ready line only
        if proc.dp != 1:
            raise LlamaError(f"serve runs one model across the whole world: {proc.world} "
                             "processes "
                             f"with model parallelism {proc.mp}")
        sock = bind(host, port) if proc.is_main else None
        gen = Generator.build(model, proc, compute_dtype, None, tokenizer_path)
        a = gen.model.params
        context = min(max_seq_len, a.max_seq_len)
        loaded = {n: load_vectors(p, None, a.dim, a.n_layers, gen.fingerprint)
                  for n, p in vector_sources(vectors or [])}
        the_probe = None if probe is None else load_probe(probe, probe_layer, a.dim, a.n_layers,
                                                          gen.fingerprint)
        units = unit_norms_of(gen.model, gen.tokenizer,  # scale residual's, per vector
                              {n: (p, loaded[n]) for n, p in vector_sources(vectors or [])})
        norms = {n: {x: u[0] for x, u in per.items()} for n, per in units.items()}
        model_id = name or os.path.splitext(os.path.basename(os.path.normpath(model)))[0]
        limits = Limits(model_id, context, a.n_layers, loaded, the_probe is not None, norms,
                        vocab=min(a.vocab_size, gen.tokenizer.n_words))
        limits.aliases = read_aliases(alias or [], limits)  # every rank refuses a bad one
        engine = Engine(gen.model, loaded, norms, the_probe, max_batch, context)
        channel = StepChannel()
        if not proc.is_main:
            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 says when to stop
                signal.signal(sig, signal.SIG_IGN)
            follow(engine, channel)
            return
        info = [{"id": n, "object": "vector", "source": shown_path(p),
                 "layers": sorted(loaded[n]),
                 "norms": {str(x): float(v.norm()) for x, v in sorted(loaded[n].items())},
                 "residual_norms": {str(x): norms[n][x] for x in sorted(loaded[n])},
                 "residual_norms_from": {str(x): units[n][x][1] for x in sorted(loaded[n])}}
                for n, p in vector_sources(vectors or [])]
        run_http(Scheduler(engine, gen.tokenizer, channel, max_batch), gen.tokenizer, sock,
                 limits, info, probe_description(the_probe), http)


def probe_description(probe) -> Optional[dict]:
    """What GET /v1/vectors says of the loaded probe (None: no probe)."""
    if probe is None:
        return None
    return {"source": shown_path(probe.source), "layer": probe.layer, "read_out": probe.kind,
            "bias": probe.bias, "threshold": probe.threshold, "text": probe.text,
            "positive": probe.positive}


def serve_on_vllm(model, port, vectors, probe, max_batch, max_seq_len, dtype,
                  parallel: tuple, name, http: "Http", alias: List[str], probe_layer=None):
    """serve --engine vllm: the same routes over vLLM's AsyncLLM (server/vllm_engine.py), the
    loaded vectors' layers and the probe's layer wrapped by the plugin (server/vllm_steer.py);
    parallel: (tensor, pipeline) parallel sizes;
    the aliases checked before the engine starts; the residual norms of scale "residual" (where
    a vector records none) measured inside vLLM at start-up."""
    from llama.checkpoint import fingerprint, open_source, read_args
    from llama.tokenizer import load_tokenizer
    from llama.vectors import load_vectors

    from steering.scale import recorded_norms

    from .aliases import read_aliases
    from .schemas import Limits
    from .vllm_engine import VllmScheduler, cpu_thread_binding, engine_args

    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise LlamaError("--engine vllm needs vLLM in this environment: run `make setup-vllm`, "
                         "then .venv-vllm/bin/llama-ccs serve --engine vllm ...")
    if not os.path.isfile(os.path.join(str(model), "config.json")):
        raise LlamaError(f"--engine vllm loads a Hugging Face folder; convert {model} first: "
                         f"python -m llama.convert {model} DIR --to hf")
    for flag, v in zip(("tensor_parallel_size", "pipeline_parallel_size"), parallel):
        if v < 1:
            raise LlamaError(f"--{flag} {v} is not a positive integer")
    a = read_args(model)
    weights = open_source(str(model))[0]
    print_ = fingerprint(weights, weights.args)
    loaded = {n: load_vectors(p, None, a.dim, a.n_layers, print_)
              for n, p in vector_sources(vectors or [])}
    the_probe = None if probe is None else load_probe(probe, probe_layer, a.dim, a.n_layers,
                                                      print_)
    tok = load_tokenizer(model)
    # with a probe vLLM runs one token past the answer (vllm_engine.ProbeHold)
    context = min(max_seq_len, a.max_seq_len - (the_probe is not None))
    model_id = name or os.path.basename(os.path.normpath(model))
    layers = sorted({x for v in loaded.values() for x in v})
    recorded = {n: recorded_norms(p) for n, p in vector_sources(vectors or [])}
    # the aliases are checked before the engine starts (minutes), with a stand-in unit of 1 for
    # scale "residual" where a vector records no norm, and again once vLLM has measured them
    stand_in = {n: {x: recorded[n].get(x, 1.0) for x in loaded[n]} for n in loaded}
    read_aliases(alias, Limits(model_id, context, a.n_layers, loaded, the_probe is not None,
                               stand_in, engine="vllm", vocab=min(a.vocab_size, tok.n_words)))
    if parallel[1] > a.n_layers:
        raise LlamaError(f"--pipeline_parallel_size {parallel[1]}: the model has only "
                         f"{a.n_layers} layers to split into stages")
    binding = cpu_thread_binding(parallel[0] * parallel[1])
    if not torch.cuda.is_available() and binding and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding  # read by vLLM's workers
    sock = bind(http.host, port)
    scheduler = VllmScheduler(
        engine_args(str(model), context, max_batch, parallel, dtype, layers,
                    None if the_probe is None else the_probe.layer),
        tok, loaded, the_probe, layers, recorded)
    scheduler.start()
    scheduler.ready.wait()
    if scheduler.error:
        raise LlamaError(scheduler.error)
    units = scheduler.units  # {vector: {layer: (norm, where)}} (vllm_engine.unit_norms)
    info = [{"id": n, "object": "vector", "source": shown_path(p), "layers": sorted(loaded[n]),
             "norms": {str(x): float(v.norm()) for x, v in sorted(loaded[n].items())},
             "residual_norms": {str(x): units[n][x][0] for x in sorted(loaded[n])
                                if x in units[n]},
             "residual_norms_from": {str(x): units[n][x][1] for x in sorted(loaded[n])
                                     if x in units[n]}}
            for n, p in vector_sources(vectors or [])]
    limits = Limits(model_id, context, a.n_layers, loaded, the_probe is not None,
                    {n: {x: u[0] for x, u in per.items()} for n, per in units.items()},
                    engine="vllm", vocab=min(a.vocab_size, tok.n_words))
    limits.aliases = read_aliases(alias, limits)
    run_http(scheduler, tok, sock, limits, info, probe_description(the_probe), http)


@dataclass
class Http:
    """The HTTP side's settings (serve's flags)."""
    host: str
    api_key: Optional[str]
    max_body: int
    shutdown_grace: float
    read_timeout: float


def shown_path(path: str) -> str:
    """What GET /v1/vectors shows of a file the server read: its name, never the folders above."""
    return os.path.basename(os.path.normpath(path))


def run_http(scheduler, tokenizer, sock, limits, info, probe_info, http: Http):
    """Serve the routes on `sock` until a signal (or the scheduler's failure). scheduler: the
    engine behind the routes, scheduler.Scheduler (native) or vllm_engine.VllmScheduler; both
    take Jobs by submit() and answer with their events."""
    import uvicorn

    from .app import Served, build_app
    from .http11 import TimedH11

    model_id = limits.model_id
    app = build_app(Served(scheduler, tokenizer, limits, info, probe_info, http.api_key,
                           http.max_body, http.read_timeout,
                           check_host=http.host in LOCAL and http.api_key is None))
    port = sock.getsockname()[1]
    shown = f"[{http.host}]" if ":" in http.host else http.host
    grace = threading.Timer(http.shutdown_grace, scheduler.halt.set)  # then every job: 503
    grace.daemon = True

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # stop gracefully; exit 0 after, not re-raised
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            if not self.should_exit:
                grace.start()
            self.should_exit = True

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:
                print(f"serving {model_id} on http://{shown}:{port}", flush=True)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            http=TimedH11, timeout_graceful_shutdown=http.shutdown_grace + 10)
    config.read_timeout = http.read_timeout  # read by TimedH11
    server = Server(config)

    def stopped():  # the scheduler failed: no request can be answered, so the process ends
        server.should_exit = True

    scheduler.on_error = stopped
    if not scheduler.is_alive():
        scheduler.start()
    try:
        server.run(sockets=[sock])
    finally:
        grace.cancel()
        scheduler.stop(timeout=STOP_WAIT_S if scheduler.error else None)
        sock.close()
    if scheduler.error:  # one error line, exit 2; every other rank: its "stop" step says it,
        if scheduler.is_alive():  # or this process's end breaks the step it is stuck in
            try:  # stuck telling a stuck rank: no clean teardown is possible
                fail(scheduler.error)
            finally:
                os._exit(2)
        raise LlamaError(scheduler.error)
    print("stopped", flush=True)


def cli():
    """The command line."""
    from llama.cli import command

    command(serve)
