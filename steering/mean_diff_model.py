"""generate_vectors_from_cache.py without a prepared cache: extract the layers, then the vectors.

    python scripts/generate_vectors.py --model MODEL --data FILE --output NAME [--layers 10,20]

The cache goes to --cache (default NAME_cache) and is reused when run again with the same settings.
Extraction as scripts/cache_activations.py's defaults (every token): both routes, the same vectors.
"""
import os
import sys
from typing import Literal, Optional


from steering.mean_diff import generate
from activations.readout import Token
from llama.cli import command


def main(model: str, data: str, output: str, layers: str = "all",
         token: Token = "all",
         dtype: Literal["float32", "float16", "bfloat16"] = "float32",
         cache: Optional[str] = None):
    """Extract --layers of --data's prompts, then write the class-mean difference vectors.

    model: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    data: the prompt file (CSV, or a JSON file generate_dataset.py reads)
    output: the vectors' run name: NAME_TIMESTAMP/vectors and NAME_TIMESTAMP/normalized_vectors
    layers: all, 12, 10,20,23 or ranges 0-5
    token: all (every token, as scripts/cache_activations.py), last or mean
    dtype: of the cache on disk
    cache: the cache folder (default: NAME_cache)
    """
    from activations.extract import Extraction, run

    cache = cache or f"{output}_cache"
    run(Extraction(model=model, data=data, output=cache, layers=layers, token=token, dtype=dtype))
    generate(cache, output)


def cli():
    """The command line."""
    command(main)
