"""generate_vectors_from_cache.py without a prepared cache: extract the layers first, then build the vectors.

    python scripts/generate_vectors.py --model MODEL --data FILE --output NAME [--layers 10,20] [--token last] [--dtype float32]

The cache goes to --cache (default NAME_cache) and is reused when run again with the same settings.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from generate_vectors_from_cache import generate  # noqa: E402
from llama.errors import cli  # noqa: E402


def main(model: str, data: str, output: str, layers="all", token: str = "last", dtype: str = "float32", cache: str = None):
    from llama.extract import run

    cache = cache or f"{output}_cache"
    run(model=model, data=data, output=cache, layers=layers, token=token, dtype=dtype)
    generate(cache, output)


if __name__ == "__main__":
    import fire

    cli(fire.Fire, main)
