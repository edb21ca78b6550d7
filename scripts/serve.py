"""Serve a model over an OpenAI-compatible HTTP API with per-request steering and probe
read-outs (the work is in server/; see server/main.py and the README's "Serve" section).

    python scripts/serve.py --model PATH [--host 127.0.0.1] [--port 8000] [--vectors DIR ...]
        [--probe RUN/probes/METHOD.safetensors --probe_layer L] [--max_batch 8]
    torchrun --nproc_per_node MP scripts/serve.py --model PATH ...   # rank 0 serves HTTP
"""
try:
    from server.main import cli
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements.txt` in the llama-ccs "
                     "clone's root folder") from None

if __name__ == "__main__":
    cli()
