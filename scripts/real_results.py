"""Real results: SmolLM2-135M-Instruct on the real datasets, end to end, summed up in

A door: the code, and what each flag means, are in `llama_ccs.real_results`; `-h` lists the flags.
"""
try:
    from llama_ccs.real_results import cli
except ImportError as e:  # the project or a dependency is not installed: what to run
    raise SystemExit(f"error: {e}: run `pip install -r requirements.txt` in the llama-ccs "
                     "clone's root folder") from None

if __name__ == "__main__":
    cli()
