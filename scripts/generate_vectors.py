"""generate_vectors_from_cache.py without a prepared cache: extract the layers, then the vectors.

A door: the code, and what each flag means, are in `steering.mean_diff_model`;
`-h` lists the flags.
"""
from steering.mean_diff_model import cli

if __name__ == "__main__":
    cli()
