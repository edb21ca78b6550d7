"""Probe / steering vectors from an activation cache: per layer, the difference of the class means.

A door: the code, and what each flag means, are in `steering.mean_diff`; `-h` lists the flags.
"""
from steering.mean_diff import cli

if __name__ == "__main__":
    cli()
