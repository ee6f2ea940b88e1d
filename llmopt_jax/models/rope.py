"""Rotary position embedding (RoPE) in both weight layouts in use, and the q/k permutation between them."""

from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

ArrayT = TypeVar("ArrayT", np.ndarray, jax.Array)


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


def rotary_feature_permutation(head_dim: int, to_interleaved: bool) -> np.ndarray:
    """Int ``[head_dim]`` index ``p`` such that ``x[..., p]`` re-lays one head's q/k features.

    ``to_interleaved=True``: rotate-half (Hugging Face) -> interleaved (Meta/llama.cpp), i.e. the result's
    features ``2i`` and ``2i+1`` are the input's ``i`` and ``i + head_dim/2`` (the pair one rotation mixes; the
    permute of llama.cpp's convert script). ``False`` gives the inverse permutation.
    """
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    half = head_dim // 2
    to_inter = np.stack([np.arange(half), np.arange(half) + half], -1).reshape(-1)
    return to_inter if to_interleaved else np.argsort(to_inter)


def permute_rotary_features(x: ArrayT, head_dim: int, to_interleaved: bool, axis: int = -1) -> ArrayT:
    """``x`` (NumPy or jax) with the q/k features along ``axis`` re-laid per head by
    :func:`rotary_feature_permutation`; same shape and dtype, values moved, not changed.

    ``axis`` is either one head's features (a kernel ``[in, heads, head_dim]``, ``axis=-1``) or heads ×
    head_dim features, head-major (GGUF/HF ``[out, in]`` rows: ``axis=0``).
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    if n % head_dim:
        raise ValueError(f"axis {axis} of shape {x.shape} is not a whole number of heads of {head_dim} features")
    perm = rotary_feature_permutation(head_dim, to_interleaved)
    index = (np.arange(n // head_dim)[:, None] * head_dim + perm).reshape(-1)
    return x[(slice(None),) * axis + (index,)]
