"""llmopt_jax: LLM performance techniques (training, inference, compression) in JAX/Flax."""

__version__ = "0.1.0"
