"""LLaMA-family decoder models (Flax NNX) and their configuration."""
