"""Hand-written kernels for what XLA does not generate well on a platform (see each module)."""
