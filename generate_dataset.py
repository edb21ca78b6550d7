"""Datasets -> prompt CSV (the format is in ARCHITECTURE.md, "Prompt CSV").

A door: the code, and what each flag means, are in `prompts.dataset`; `-h` lists the flags.
"""
from prompts.dataset import cli

if __name__ == "__main__":
    cli()
