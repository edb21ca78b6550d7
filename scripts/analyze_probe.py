"""analyze_probe_from_cache.py without a prepared cache: extract the vectors' layers first, then analyse.

    python scripts/analyze_probe.py --model MODEL --vectors RUN/normalized_vectors --data FILE --output DIR [--token all] [--visualize]

The cache goes to --cache (default DIR/cache) and is reused when run again with the same settings.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analyze_probe_from_cache import analyze  # noqa: E402
from llama.errors import LlamaError, cli  # noqa: E402


def main(model: str, vectors: str, data: str, output: str = "probe_results", layers=None, token: str = "all",
         dtype: str = "float32", cache: str = None, visualize: bool = False):
    from llama.extract import run

    if layers is None:
        found = sorted(int(m.group(1)) for m in map(re.compile(r"layer_(\d+)\.safetensors").fullmatch, os.listdir(vectors)) if m) \
            if os.path.isdir(vectors) else []
        if not found:
            raise LlamaError(f"{vectors} holds no layer_{{L}}.safetensors vectors")
        layers = tuple(found)
    cache = cache or os.path.join(output, "cache")
    run(model=model, data=data, output=cache, layers=layers, token=token, dtype=dtype)
    analyze(cache, vectors, output, data, None, None, visualize)


if __name__ == "__main__":
    import fire

    cli(fire.Fire, main)
