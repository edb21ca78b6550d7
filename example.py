"""Extract per-layer activations of a prompt CSV into an activation cache (the seed tool's command).

    torchrun --nproc_per_node MP example.py --ckpt_dir DIR --tokenizer_path FILE \\
        --save_activations_path OUT --prompt_csv FILE [--layers all] [--token last|mean|all] \\
        [--dtype float32|float16|bfloat16] [--max_batch_tokens 2048] [--zero_shot] [--overwrite]

Plain `python example.py ...` runs it in one process. Same implementation as
scripts/cache_activations.py: llama/extract.py.
"""
import fire

from llama.errors import cli


def main(ckpt_dir, save_activations_path, prompt_csv, tokenizer_path=None, layers="all", token="last",
         dtype="float32", model_dtype=None, max_batch_tokens=2048, batch_size=None, mp=0, device="auto",
         zero_shot=False, overwrite=False, commit_every=10.0):
    """See llama.extract.run for every flag (ckpt_dir: a Meta dir, Hugging Face dir or .gguf)."""
    from llama.dist import teardown
    from llama.extract import run

    try:
        run(ckpt_dir, prompt_csv, save_activations_path, layers=layers, token=token, dtype=dtype,
            model_dtype=model_dtype, max_batch_tokens=max_batch_tokens, batch_size=batch_size, mp=mp,
            device=device, zero_shot=zero_shot, overwrite=overwrite, tokenizer=tokenizer_path,
            commit_every=commit_every)
    finally:
        teardown()


if __name__ == "__main__":
    cli(fire.Fire, main)
