"""The memory-bandwidth bound of decoding: every step reads all weights once plus the filled KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmopt_jax.models.config import ModelConfig
from llmopt_jax.timing import best_seconds


def measure_memory_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s read by a jitted sum over a ``num_bytes`` float32 array on the default device (best of ``repeats``).

    A reduction reads each byte once and writes almost nothing, like a decode step streaming its weights.
    """
    x = jax.device_put(jnp.ones((num_bytes // 4,), jnp.float32), jax.devices()[0])
    total = jax.jit(jnp.sum)
    return num_bytes / best_seconds(lambda: total(x), repeats)


def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: int, weight_bytes: int, cache_itemsize: int) -> int:
    """Bytes a decode step must read: the weights once (shared by the batch) plus keys and values of
    ``context`` positions per sequence. The embedding table is counted once (the tied LM head reads it all;
    the input lookup reads one row per sequence)."""
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache_itemsize
    return int(weight_bytes + batch * context * kv)


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
