"""Multi-host start-up: one process per host (Cloud TPU VMs, multi-GPU nodes)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Sharding

from llmopt_jax.errors import ConfigError


def maybe_initialize(enabled: bool, coordinator_address: str = "", num_processes: int = 0,
                     process_id: int = -1) -> None:
    """Calls ``jax.distributed.initialize`` once, when ``enabled``: with the cluster detected (Cloud TPU VMs,
    SLURM, Open MPI, Kubernetes) when the three settings are unset (``""``, ``0``, ``-1``), else with them (hosts
    launched by hand: every process gets the same ``coordinator_address`` ``HOST:PORT`` and ``num_processes``,
    and its own ``process_id``). A coordinator on 127.0.0.1 / localhost also binds there only, not on every
    interface. CPU processes exchange collectives through gloo (JAX's default).

    Must run before any other JAX call touches a backend. On one machine leave it off.
    """
    if not enabled or jax.distributed.is_initialized():
        return
    given = [bool(coordinator_address), num_processes > 0, process_id >= 0]
    if any(given) and not all(given):
        raise ConfigError("cluster: set coordinator_address, num_processes and process_id together (or none of "
                          f"them, to detect the cluster); got {coordinator_address!r}, {num_processes}, {process_id}")
    if not any(given):
        jax.distributed.initialize()
        return
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"cluster.process_id={process_id} must be in 0..num_processes-1={num_processes - 1}")
    host = coordinator_address.rsplit(":", 1)[0]
    bind = coordinator_address if host in ("127.0.0.1", "localhost") else None
    jax.distributed.initialize(coordinator_address, num_processes, process_id, coordinator_bind_address=bind)


def global_array(host_batch: np.ndarray, sharding: Sharding) -> jax.Array:
    """A global ``jax.Array`` from a batch every host holds in full; each host transfers only its own shards.

    Token batches are small, so every host draws the same global batch from the same seeded iterator and
    keeps the rows its devices own: the data order is then independent of the number of hosts.
    """
    return jax.make_array_from_callback(host_batch.shape, sharding, lambda index: host_batch[index])
