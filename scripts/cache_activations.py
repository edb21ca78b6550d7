"""Cache per-layer activations of a prompt file (the cached workflow's command).

A door: the code, and what each flag means, are in `activations.cache_activations`;
`-h` lists the flags.
"""
try:
    from activations.cache_activations import cli
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements.txt` in the llama-ccs "
                     "clone's root folder") from None

if __name__ == "__main__":
    cli()
