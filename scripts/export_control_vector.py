"""Write steering vectors as a llama.cpp control-vector GGUF, to steer the same model there:

A door: the code, and what each flag means, are in `steering.export`; `-h` lists the flags.
"""
from steering.export import cli

if __name__ == "__main__":
    cli()
