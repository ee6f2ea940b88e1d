"""Rotary position embedding (RoPE) in both weight layouts in use."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """``positions`` int ``[B, L]`` -> ``(cos, sin)`` float32 ``[B, L, head_dim/2]``."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, base: float, interleaved: bool) -> jax.Array:
    """Rotates ``x`` ``[B, L, H, D]`` by its ``positions`` ``[B, L]``; returns the same shape and dtype.

    ``interleaved=False`` rotates the pair ``(i, i + D/2)`` (Hugging Face "rotate_half");
    ``interleaved=True`` rotates ``(2i, 2i+1)`` (Meta's original layout, used by llama.cpp/GGUF).
    """
    cos, sin = rope_angles(positions, x.shape[-1], base)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = x32[..., :half], x32[..., half:]
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
