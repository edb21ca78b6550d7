"""Cache per-layer activations of a prompt file (the cached workflow's command).

    torchrun --nproc_per_node MP scripts/cache_activations.py --model PATH --data FILE \\
        --layers 10,20,23 --output DIR --dtype bfloat16 [--token last|mean|all] [--zero_shot]

--model: a Meta dir, a Hugging Face dir, a .gguf file or a Hugging Face id in the local cache.
--data: a prompt CSV, or a JSON file generate_dataset.py reads. Plain `python` when MP is 1.
Same implementation as example.py: llama/extract.py.
"""
import os
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama.errors import cli  # noqa: E402


def main(model, data, output, layers="all", token="last", dtype="float32", model_dtype=None,
         max_batch_tokens=2048, batch_size=None, mp=0, device="auto", zero_shot=False, overwrite=False,
         tokenizer=None, commit_every=10.0):
    """See llama.extract.run for every flag."""
    from llama.dist import teardown
    from llama.extract import run

    try:
        run(model, data, output, layers=layers, token=token, dtype=dtype, model_dtype=model_dtype,
            max_batch_tokens=max_batch_tokens, batch_size=batch_size, mp=mp, device=device,
            zero_shot=zero_shot, overwrite=overwrite, tokenizer=tokenizer, commit_every=commit_every)
    finally:
        teardown()


if __name__ == "__main__":
    cli(fire.Fire, main)
