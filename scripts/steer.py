"""Steering sweep: does adding the vector move the model's answer, how hard is it pushed, and

A door: the code, and what each flag means, are in `steering.steer`; `-h` lists the flags.
"""
try:
    from steering.steer import cli
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements.txt` in the llama-ccs "
                     "clone's root folder") from None

if __name__ == "__main__":
    cli()
