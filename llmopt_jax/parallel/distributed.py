"""Multi-host start-up: one process per host (Cloud TPU VMs, multi-GPU nodes)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Sharding


def maybe_initialize(enabled: bool) -> None:
    """Calls ``jax.distributed.initialize()`` (cluster auto-detection) once, when ``enabled``.

    Must run before any other JAX call touches a backend. On one machine leave it off.
    """
    if enabled and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def global_array(host_batch: np.ndarray, sharding: Sharding) -> jax.Array:
    """A global ``jax.Array`` from a batch every host holds in full; each host transfers only its own shards.

    Token batches are small, so every host draws the same global batch from the same seeded iterator and
    keeps the rows its devices own: the data order is then independent of the number of hosts.
    """
    return jax.make_array_from_callback(host_batch.shape, sharding, lambda index: host_batch[index])
