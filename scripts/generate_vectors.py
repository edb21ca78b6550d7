"""generate_vectors_from_cache.py without a prepared cache: extract the layers, then the vectors.

A door: the code, and what each flag means, are in `steering.mean_diff_model`;
`-h` lists the flags.
"""
try:
    from steering.mean_diff_model import cli
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements.txt` in the llama-ccs "
                     "clone's root folder") from None

if __name__ == "__main__":
    cli()
