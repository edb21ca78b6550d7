"""Step 2, extraction: hidden states of chosen layers -> the activation cache."""
