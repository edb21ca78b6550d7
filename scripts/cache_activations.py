"""Cache per-layer activations of a prompt file (the cached workflow's command).

A door: the code, and what each flag means, are in `activations.cache_activations`;
`-h` lists the flags.
"""
from activations.cache_activations import cli

if __name__ == "__main__":
    cli()
