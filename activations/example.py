"""Extract per-layer activations of a prompt CSV into an activation cache (the seed's command).

    torchrun --nproc_per_node MP example.py --ckpt_dir DIR --tokenizer_path FILE \\
        --save_activations_path OUT --prompt_csv FILE [--layers all] [--token last|mean|all] \\
        [--dtype float32|float16|bfloat16] [--max_batch_tokens 2048] [--zero_shot] [--overwrite]

Without --prompt_csv it generates text for a few built-in prompts, as Meta's example did:

    torchrun --nproc_per_node MP example.py --ckpt_dir DIR --tokenizer_path FILE \\
        [--temperature 0.8] [--top_p 0.95] [--max_gen_len 64]

The seed's flag names and the cached workflow's are both accepted (--ckpt_dir / --model,
--prompt_csv / --data, --save_activations_path / --output); `python example.py -h` lists them all.
Plain `python example.py ...` runs it in one process. Same implementation as
scripts/cache_activations.py: activations/extract.py.
"""
from dataclasses import dataclass
from typing import Optional

from llama.cli import command
from activations.extract import Extraction


@dataclass
class Seed(Extraction):
    """Extraction settings, with --data and --output optional: without them, the seed's text
    generation runs.

    data: the prompt CSV (or JSON file generate_dataset.py reads); without it, generate text
    output: the cache folder (with --data)
    """
    data: Optional[str] = None
    output: Optional[str] = None


def main(cfg: Seed, temperature: float = 0.8, top_p: float = 0.95, max_gen_len: int = 64,
         max_seq_len: Optional[int] = None, seed: int = 0):
    """Cache the hidden states of --data's prompts in --output, or without --data complete a few
    built-in prompts, as Meta's example.py did.

    temperature: sampling temperature (without --data)
    top_p: nucleus sampling threshold (without --data)
    max_gen_len: tokens to generate per prompt (without --data)
    max_seq_len: longest sequence the model is built for (without --data; default: the model's)
    seed: sampling seed (without --data)
    """
    from activations.extract import run
    from llama.dist import owned_group
    from llama.errors import LlamaError
    from llama.generation import builtin_demo

    with owned_group():
        if cfg.data is None:
            dtype = cfg.compute_dtype or "float32"
            return builtin_demo(cfg.model, cfg.tokenizer_path, temperature, top_p, max_gen_len,
                                max_seq_len, seed, cfg.mp, cfg.device, dtype)
        if cfg.output is None:
            raise LlamaError("--data needs --output, the cache folder")
        run(cfg)


def cli():
    """The command line."""
    command(main)
