"""Project cached activations onto probe vectors; per-question score statistics per layer.

A door: the code, and what each flag means, are in `steering.analyze`; `-h` lists the flags.
"""
try:
    from steering.analyze import cli
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements.txt` in the llama-ccs "
                     "clone's root folder") from None

if __name__ == "__main__":
    cli()
