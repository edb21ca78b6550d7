"""Serve a model over an OpenAI-compatible HTTP API with per-request steering and probe
read-outs (the work is in server/; see server/main.py and the README's "Serve" section).

    python scripts/serve.py --model PATH [--host 127.0.0.1] [--port 8000] [--vectors DIR ...]
        [--probe RUN/probes/METHOD.safetensors --probe_layer L] [--max_batch 8]
    torchrun --nproc_per_node MP scripts/serve.py --model PATH ...   # rank 0 serves HTTP
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama.cli import command  # noqa: E402
from server.main import serve  # noqa: E402

if __name__ == "__main__":
    command(serve)
