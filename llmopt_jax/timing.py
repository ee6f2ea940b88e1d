"""Wall-clock timing of jitted work."""

from __future__ import annotations

import time
from typing import Callable

import jax


def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` (results blocked on), after one untimed warm-up call."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best
