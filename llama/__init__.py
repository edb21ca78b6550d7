"""The model side of llama-ccs: LLaMA with fairscale tensor parallelism, checkpoints, tokenizers
and the activation cache. Nothing here imports probe code."""
