"""analyze_probe_from_cache.py without a prepared cache: extract the vectors' layers, then analyse.

A door: the code, and what each flag means, are in `steering.analyze_model`; `-h` lists the flags.
"""
from steering.analyze_model import cli

if __name__ == "__main__":
    cli()
