"""Probes on an activation cache: CCS (Burns et al. 2022) and its baselines, on every layer.

A door: the code, and what each flag means, are in `probes.commands`; `-h` lists the flags.
"""
try:
    from probes.commands import cli
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements.txt` in the llama-ccs "
                     "clone's root folder") from None

if __name__ == "__main__":
    cli()
