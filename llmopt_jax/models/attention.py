"""Grouped-query attention kernels: a plain XLA reference and ``jax.nn.dot_product_attention``.

All take ``q`` ``[B, L, H, D]``, ``k``/``v`` ``[B, S, K, D]`` with ``H`` a multiple of ``K``, and a boolean
``mask`` ``[B, L, S]`` (True = may attend), and return ``[B, L, H, D]`` in ``q``'s dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmopt_jax.errors import ConfigError


def causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """Mask ``[B, L, S]`` from query positions ``[B, L]`` and key positions ``[B, S]``: key ``<=`` query."""
    return k_positions[:, None, :] <= q_positions[:, :, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention: softmax in float32 over explicit scores; GQA by grouping query heads."""
    b, l, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    qg = q.reshape(b, l, kv_heads, groups, d)
    scores = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
    return out.reshape(b, l, h, d)


def library_attention(q, k, v, mask, implementation: str | None) -> jax.Array:
    """``jax.nn.dot_product_attention`` (``implementation='cudnn'`` for the fused GPU kernel)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation=implementation)


def attention(q, k, v, mask, impl: str) -> jax.Array:
    """Dispatches to the attention implementation named by ``impl`` (``xla``, ``dot_product``, ``cudnn``)."""
    if impl == "xla":
        return xla_attention(q, k, v, mask)
    if impl == "dot_product":
        return library_attention(q, k, v, mask, None)
    if impl == "cudnn":
        return library_attention(q, k, v, mask, "cudnn")
    raise ConfigError(f"unknown attention implementation {impl!r}")
