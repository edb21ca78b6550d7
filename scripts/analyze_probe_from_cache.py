"""Project cached activations onto probe vectors; per-question score statistics per layer.

A door: the code, and what each flag means, are in `steering.analyze`; `-h` lists the flags.
"""
from steering.analyze import cli

if __name__ == "__main__":
    cli()
