"""Steering sweep: does adding the vector move the model's answer, how hard is it pushed, and

A door: the code, and what each flag means, are in `steering.steer`; `-h` lists the flags.
"""
from steering.steer import cli

if __name__ == "__main__":
    cli()
