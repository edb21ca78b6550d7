"""Extract per-layer activations of a prompt CSV into an activation cache (the seed's command).

A door: the code, and what each flag means, are in `activations.example`; `-h` lists the flags.
"""
from activations.example import cli

if __name__ == "__main__":
    cli()
