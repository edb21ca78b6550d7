"""Probes on an activation cache: CCS (Burns et al. 2022) and its baselines, on every layer.

A door: the code, and what each flag means, are in `probes.commands`; `-h` lists the flags.
"""
from probes.commands import cli

if __name__ == "__main__":
    cli()
