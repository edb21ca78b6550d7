"""Cache per-layer activations of a prompt file (the cached workflow's command).

    torchrun --nproc_per_node MP scripts/cache_activations.py --model PATH --data FILE \\
        --layers 10,20,23 --output DIR --dtype bfloat16 [--token all|last|mean] [--zero_shot]

Every token by default, as the caching workflow's original did (its vectors and per-token
statistics need them). Plain `python` when MP is 1; `-h` lists every flag.
Same implementation as example.py: activations/extract.py.
"""
from dataclasses import dataclass

from activations.extract import Extraction
from activations.readout import Token
from llama.cli import command


@dataclass
class Cached(Extraction):
    """token: all (every token of every prompt; default), last or mean"""
    token: Token = "all"


def main(cfg: Cached):
    """Cache the hidden states of --data's prompts in --output."""
    from activations.extract import run
    from llama.dist import owned_group

    with owned_group():  # the same run as example.py with --data, without going through it
        run(cfg)


def cli():
    """The command line."""
    command(main)
