"""The serve command: load the model, vectors and probe on every rank, then rank 0 serves HTTP
(uvicorn) and runs the scheduler while the other ranks follow its steps.

    python scripts/serve.py --model PATH [--host 127.0.0.1] [--port 8000] [--vectors DIR ...]
        [--probe RUN/probes/METHOD.safetensors [--probe_layer L]] [--max_batch 8]
    torchrun --nproc_per_node MP scripts/serve.py --model PATH ...
"""
import contextlib
import io
import os
import signal
import socket
from typing import List, Optional

import torch

from llama.errors import LlamaError

LOCAL = ("127.0.0.1", "localhost", "::1")


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


@torch.inference_mode()
def residual_norms(model, tokenizer, layers) -> dict:
    """{layer: mean residual-stream norm} over the positions after the first (position 0, the
    attention sink, is far larger) of the built-in prompts: the unit of scale "residual"."""
    from llama.generation import BUILTIN_PROMPTS

    if not layers:
        return {}
    device = model.norm.weight.device
    sums = {layer: 0.0 for layer in layers}
    count = 0
    for text in BUILTIN_PROMPTS:
        ids = torch.tensor([tokenizer.encode(text, bos=True)], device=device)
        out = model(ids, layers=sorted(layers))
        for layer in layers:
            sums[layer] += float(out[layer][0, 1:].float().norm(dim=-1).sum())
        count += ids.shape[1] - 1
    return {layer: s / count for layer, s in sums.items()}


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
          name: Optional[str] = None):
    """Serve a model over an OpenAI-compatible HTTP API, with per-request steering and probe
    read-outs.

    model: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    host: the address to listen on (another than 127.0.0.1 needs --api_key or --no_auth)
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
    no_auth: allow listening on a non-local address without a key
    max_body: request bodies over this many bytes are refused (413)
    threads: torch CPU threads (0: torch's default)
    compute_dtype: of the model's weights and arithmetic: float32, float16 or bfloat16
    device: auto, cpu or cuda (default: auto)
    tokenizer_path: the tokenizer file, when the model's own is not found beside it
    name: the model id clients use (default: the model file or folder name)
    """
    from llama.dist import setup, teardown
    from llama.generation import Generator
    from llama.vectors import load_vectors

    from .engine import Engine, StepChannel, follow

    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise LlamaError(f"--api_key_env {api_key_env}: the variable is unset or empty")
    if host not in LOCAL and api_key is None and not no_auth:
        raise LlamaError(f"--host {host} is not a local address: give --api_key (or "
                         "--api_key_env) or, to serve without authentication, --no_auth")
    for flag, v in (("max_batch", max_batch), ("max_seq_len", max_seq_len),
                    ("max_body", max_body)):
        if v < 1:
            raise LlamaError(f"--{flag} {v} is not a positive integer")
    if threads < 0:
        raise LlamaError(f"--threads {threads} is negative")
    if threads:
        torch.set_num_threads(threads)
    import torch.distributed as tdist

    own_group = not tdist.is_initialized()  # a caller's process group is left alone
    with contextlib.redirect_stdout(io.StringIO()):  # fairscale's set-up lines: stdout is
        proc = setup(0, device)  # the ready line only
    try:
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
        norms = residual_norms(gen.model, gen.tokenizer, {x for v in loaded.values() for x in v})
        engine = Engine(gen.model, loaded, norms, the_probe, max_batch, context)
        channel = StepChannel()
        if not proc.is_main:
            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 says when to stop
                signal.signal(sig, signal.SIG_IGN)
            follow(engine, channel)
            return
        model_id = name or os.path.splitext(os.path.basename(os.path.normpath(model)))[0]
        info = [{"id": n, "object": "vector", "source": p, "layers": sorted(loaded[n]),
                 "norms": {str(x): float(v.norm()) for x, v in sorted(loaded[n].items())},
                 "residual_norms": {str(x): norms[x] for x in sorted(loaded[n])}}
                for n, p in vector_sources(vectors or [])]
        probe_info = None if the_probe is None else {
            "source": the_probe.source, "layer": the_probe.layer, "read_out": the_probe.kind,
            "bias": the_probe.bias, "threshold": the_probe.threshold, "text": the_probe.text,
            "positive": the_probe.positive}
        run_http(engine, gen.tokenizer, channel, sock, model_id, context, info, probe_info,
                 api_key, max_batch, max_body, host)
    finally:
        if own_group:
            teardown()


def run_http(engine, tokenizer, channel, sock, model_id, context, info, probe_info, api_key,
             max_batch, max_body, host):
    import uvicorn

    from .app import Served, build_app
    from .scheduler import Scheduler
    from .schemas import Limits

    limits = Limits(model_id, context, engine.model.params.n_layers, engine.vectors,
                    engine.probe is not None)
    scheduler = Scheduler(engine, tokenizer, channel, max_batch)
    app = build_app(Served(scheduler, tokenizer, limits, info, probe_info, api_key, max_body))
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # stop gracefully; exit 0 after, not re-raised
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:
                print(f"serving {model_id} on http://{shown}:{port}", flush=True)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=30)
    scheduler.start()
    try:
        Server(config).run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()
    if scheduler.error:
        raise LlamaError(scheduler.error)
    print("stopped", flush=True)


def cli():
    """The command line."""
    from llama.cli import command

    command(serve)
