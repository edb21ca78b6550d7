"""Step 1, prompts: dataset files -> contrast pairs in the model's chat template."""
