"""A preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys and values of every layer, plus how many positions of each sequence are filled.

    ``keys``/``values``: ``[layers, B, max_len, kv_heads, head_dim]``; ``lengths``: int32 ``[B]``. Slot ``j`` of
    sequence ``b`` holds the token at position ``j``; slots ``>= lengths[b]`` are free.
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype):
        """An empty cache (all lengths zero)."""
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]


def write_kv(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, starts: jax.Array):
    """Writes ``k``/``v`` ``[B, L, K, D]`` into one layer's ``cache_k``/``cache_v`` ``[B, S, K, D]`` at ``starts`` ``[B]``."""

    def one(ck, cv, kb, vb, start):
        idx = (start, 0, 0)
        return (
            jax.lax.dynamic_update_slice(ck, kb.astype(ck.dtype), idx),
            jax.lax.dynamic_update_slice(cv, vb.astype(cv.dtype), idx),
        )

    return jax.vmap(one)(cache_k, cache_v, k, v, starts)
