"""Real results: SmolLM2-135M-Instruct on the real datasets, end to end, summed up in

A door: the code, and what each flag means, are in `llama_ccs.real_results`; `-h` lists the flags.
"""
from llama_ccs.real_results import cli

if __name__ == "__main__":
    cli()
