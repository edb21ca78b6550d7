"""Complete prompts with a model (greedy or sampled), optionally steered.

A door: the code, and what each flag means, are in `steering.generate`; `-h` lists the flags.
"""
from steering.generate import cli

if __name__ == "__main__":
    cli()
