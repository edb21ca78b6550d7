"""analyze_probe_from_cache.py without a prepared cache: extract the vectors' layers, then analyse.

    python scripts/analyze_probe.py --model MODEL --vectors RUN/normalized_vectors --data FILE \
        --output DIR [--visualize]

The cache goes to --cache (default DIR/cache) and is reused when run again with the same settings.
Extraction as scripts/cache_activations.py's defaults (every token), so both routes give the same
probe_stats.
"""
import os
import re
import sys
from typing import Literal, Optional


from steering.analyze import analyze, no_vectors
from activations.readout import Token
from llama.cli import command
from llama.errors import LlamaError


def main(model: str, vectors: str, data: str, output: str = "probe_results",
         layers: Optional[str] = None, token: Token = "all",
         dtype: Literal["float32", "float16", "bfloat16"] = "float32", cache: Optional[str] = None,
         visualize: bool = False):
    """Extract the vectors' layers of --data's prompts, then write per-question probe statistics.

    model: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache
    vectors: a folder of layer_{L}.safetensors (RUN_TIMESTAMP/normalized_vectors)
    data: the {question, type} JSON the statistics are for
    output: the folder for probe_stats_layer{L}.csv (and plots)
    layers: which of the vectors' layers (default: all of them)
    token: all (per-token statistics; as scripts/cache_activations.py), last or mean
    dtype: of the cache on disk
    cache: the cache folder (default: OUTPUT/cache)
    visualize: also write auroc_by_layer.png and scores_by_type.png
    """
    from activations.extract import Extraction, run

    if not os.path.isdir(vectors):
        raise no_vectors(vectors)
    if layers is None:
        names = map(re.compile(r"layer_(\d+)\.safetensors").fullmatch, os.listdir(vectors))
        found = sorted(int(m.group(1)) for m in names if m)
        if not found:
            raise LlamaError(f"{vectors} holds no layer_{{L}}.safetensors vectors")
        layers = ",".join(map(str, found))
    cache = cache or os.path.join(output, "cache")
    run(Extraction(model=model, data=data, output=cache, layers=layers, token=token, dtype=dtype))
    analyze(cache, vectors, output, data, None, None, visualize)


def cli():
    """The command line."""
    command(main)
