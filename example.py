"""Extract per-layer activations of a prompt CSV into an activation cache (the seed's command).

A door: the code, and what each flag means, are in `activations.example`; `-h` lists the flags.
"""
try:
    from activations.example import cli
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements.txt` in the llama-ccs "
                     "clone's root folder") from None

if __name__ == "__main__":
    cli()
