"""The model side of llama-ccs: LLaMA with fairscale tensor parallelism, checkpoints, tokenizers,
generation and the steering vectors a Steer adds. Nothing here imports another package of the
project (the steps build on it: prompts, activations, probes, steering, server, pages)."""
