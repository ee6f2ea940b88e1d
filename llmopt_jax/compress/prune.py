"""One-shot pruning of weight matrices: magnitude, Wanda and SparseGPT, unstructured or N:M.

Matrices are in the papers' layout ``W`` float32 ``[rows = outputs, cols = inputs]``; every function returns a
new matrix and a boolean keep-mask of the same shape (the input is never modified). The model-level transform
(``compress/calibrate.py``) maps our ``[in, out]`` kernels to this layout.

- magnitude: drop the smallest ``|W|`` of the whole matrix (or of each group of M inputs for N:M).
- Wanda (Sun et al., 2023): drop the smallest ``|W_ij|·‖X_j‖₂`` within each output row (or each N:M group).
- SparseGPT (Frantar & Alistarh, 2023): go through the columns left to right in blocks; choose the mask of a
  block from ``w²/[H⁻¹]_jj²`` (its OBS saliency), zero the pruned weights and spread each column's error over
  the not-yet-visited columns with the Cholesky factor of the damped inverse Hessian (lazy batched updates
  between blocks). An optional quantizer rounds the kept weights in the same pass (joint sparse + quantized).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from llmopt_jax.compress.hessian import damped_inverse_cholesky
from llmopt_jax.errors import ConfigError

HIGHEST = jax.lax.Precision.HIGHEST
SUB_BLOCK = 16  # columns per inner pass of SparseGPT (an implementation detail; the mask block is `blocksize`)
# The blocks of SparseGPT run as up to this many loops, each over a contiguous run of blocks whose lazy updates
# reach only the columns right of the run's start: the update work falls from rows*cols² to ~(1+1/S)/2 of it,
# at the price of S compiled loop bodies. Matrices with at most SEGMENT_MIN_COLS inputs use one loop: there the
# saved work is milliseconds while each extra loop body adds about a second of XLA compile time (measured on
# SmolLM2's 576/1536-wide matrices on CPU: 6-10 s to compile with 8 loops, 2 s with one, and no slower to run).
MAX_SEGMENTS = 8
SEGMENT_MIN_COLS = 2048
# A quantizer for SparseGPT's joint mode: (column values [rows], column index, its parameters) -> rounded column.
# The parameters (e.g. a grid's scales) are a traced argument, so one compiled solver serves every matrix.
ColumnQuantizer = Callable[[jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class SparsityPattern:
    """Unstructured sparsity (``n = m = 0``) or N:M: keep ``n`` of every ``m`` consecutive inputs of a row."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.0%} unstructured"


def parse_pattern(sparsity: float, pattern: str = "") -> SparsityPattern:
    """``pattern`` ``""``/``"unstructured"`` uses ``sparsity`` in [0, 1); ``"N:M"`` (0 < N < M) implies ``1 - N/M``."""
    if pattern in ("", "unstructured"):
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
        return SparsityPattern(float(sparsity))
    match = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
    if not match:
        raise ConfigError(f"pattern must be 'N:M' (e.g. '2:4') or 'unstructured', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"pattern {pattern!r}: need 0 < N < M (keep N weights of every M)")
    return SparsityPattern(1.0 - n / m, n, m)


def _check_nm(cols: int, pattern: SparsityPattern) -> None:
    if pattern.is_nm and cols % pattern.m:
        raise ConfigError(f"pattern {pattern}: {cols} input columns are not divisible by M={pattern.m}")


def _drop_smallest(metric: jax.Array, k) -> jax.Array:
    """Keep-mask that drops exactly the ``k`` smallest entries of a non-negative ``metric`` (ties by position).

    The k-th smallest value is found by bisection on the float bits (the order of non-negative floats is the
    order of their int32 bit patterns): 32 counting passes, much cheaper than sorting on CPU.
    """
    flat = metric.reshape(-1)
    bits = jax.lax.bitcast_convert_type(flat.astype(jnp.float32), jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds  # invariant: count(bits <= lo) < k <= count(bits <= hi)
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid) >= k
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    _, kth = jax.lax.fori_loop(0, 32, halve, (jnp.int32(-1), jnp.int32(0x7F800000)))  # 0x7F800000 = +inf
    below = bits < kth
    ties = bits == kth
    tie_rank = jnp.cumsum(ties)  # 1-based position among equal values
    drop = below | (ties & (tie_rank <= k - jnp.sum(below)))
    return (~drop | (k <= 0)).reshape(metric.shape)


def _nm_keep(metric: jax.Array, n: int, m: int) -> jax.Array:
    """Keep-mask with the ``n`` largest entries of every ``m`` consecutive ones along the last axis."""
    groups = metric.reshape(*metric.shape[:-1], metric.shape[-1] // m, m)
    _, idx = jax.lax.top_k(groups, n)
    keep = jnp.sum(jax.nn.one_hot(idx, m, dtype=jnp.int32), axis=-2) > 0
    return keep.reshape(metric.shape)


def mask_from_metric(metric: jax.Array, pattern: SparsityPattern, per_row: bool) -> jax.Array:
    """Keep-mask from an importance ``metric`` ``[rows, cols]`` (larger = more important)."""
    _check_nm(metric.shape[1], pattern)
    if pattern.is_nm:
        return _nm_keep(metric, pattern.n, pattern.m)
    if per_row:
        # Every row drops k or k + 1 entries so that the matrix as a whole drops floor(sparsity * size) exactly
        # (a plain floor per row would fall up to one weight per row short of the target).
        rows, cols = metric.shape
        total = int(math.floor(pattern.sparsity * rows * cols))
        counts = total // rows + (jnp.arange(rows) < total % rows)
        return jax.vmap(_drop_smallest)(metric, counts)
    return _drop_smallest(metric, int(math.floor(pattern.sparsity * metric.size)))


@functools.partial(jax.jit, static_argnames=("pattern",))
def magnitude_prune(w: jax.Array, pattern: SparsityPattern) -> tuple[jax.Array, jax.Array]:
    """Zeroes the smallest-magnitude weights of ``w`` ``[rows, cols]``; returns ``(pruned, keep_mask)``."""
    keep = mask_from_metric(jnp.abs(w), pattern, per_row=False)
    return jnp.where(keep, w, 0).astype(w.dtype), keep


@functools.partial(jax.jit, static_argnames=("pattern",))
def wanda_prune(w: jax.Array, column_norms: jax.Array, pattern: SparsityPattern) -> tuple[jax.Array, jax.Array]:
    """Wanda: drops the smallest ``|W_ij|·‖X_j‖`` per output row (``column_norms`` ``[cols]``)."""
    keep = mask_from_metric(jnp.abs(w) * column_norms[None, :], pattern, per_row=True)
    return jnp.where(keep, w, 0).astype(w.dtype), keep


@functools.partial(jax.jit, static_argnames=("pattern", "blocksize", "damp_fraction", "quantize"))
def sparsegpt_prune(
    w: jax.Array,
    hessian: jax.Array,
    pattern: SparsityPattern,
    blocksize: int = 128,
    damp_fraction: float = 0.01,
    quantize: ColumnQuantizer | None = None,
    quant_params: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT on ``w`` ``[rows, cols]`` with the input Hessian ``hessian`` ``[cols, cols]`` (``2XᵀX/n``).

    Returns ``(pruned and updated weights, keep_mask)``. ``cols`` need not divide by ``blocksize``: the last
    block is padded with inert columns (zero weight, identity Hessian) that are never counted or kept.
    ``quantize(column, index, quant_params)``, when given, rounds the kept weights of each column.
    """
    rows, cols = w.shape
    _check_nm(cols, pattern)
    bs = min(blocksize, cols)
    if pattern.is_nm and bs % pattern.m:
        raise ConfigError(f"blocksize {bs} must be a multiple of M={pattern.m}")
    sub = SUB_BLOCK if bs % SUB_BLOCK == 0 and SUB_BLOCK % max(pattern.m, 1) == 0 else bs
    padded = -(-cols // bs) * bs
    upper, dead = damped_inverse_cholesky(hessian.astype(jnp.float32), damp_fraction)
    w = jnp.where(dead[None, :], 0.0, w.astype(jnp.float32))
    if padded != cols:
        extra = padded - cols
        w = jnp.pad(w, ((0, 0), (0, extra)))
        upper = jnp.pad(upper, ((0, extra), (0, extra))).at[cols:, cols:].set(jnp.eye(extra, dtype=upper.dtype))
    valid_cols = jnp.arange(padded) < cols

    def block(b, carry, upper, valid_cols, start):
        # One mask block on a segment: `w`, `upper`, `valid_cols` hold columns start.. of the whole problem.
        w, keep = carry
        width = w.shape[1]
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, bs))
        u1 = jax.lax.dynamic_slice(upper, (i1, i1), (bs, bs))
        d = jnp.diag(u1)
        valid = jax.lax.dynamic_slice(valid_cols, (i1,), (bs,))
        if pattern.is_nm:
            keep1 = jnp.ones((rows, bs), bool)  # chosen group by group as the columns are reached
        else:
            saliency = jnp.where(valid[None, :], w1**2 / d[None, :] ** 2, jnp.inf)
            k = jnp.floor(pattern.sparsity * rows * jnp.sum(valid)).astype(jnp.int32)
            keep1 = _drop_smallest(saliency, k)

        # Columns are visited in sub-blocks of `sub` columns: each column updates only its sub-block, and a
        # sub-block's errors reach the rest of the block in one matmul (the same arithmetic, fewer passes over
        # the [rows, bs] block). The sub-blocks are one loop, not unrolled: XLA compiles it in a fraction of the time.
        def column(i, state, d_sub, u_sub, offset):
            w_sub, q_sub, err_sub, keep_sub = state
            col = jax.lax.dynamic_slice(w_sub, (0, i), (rows, 1))[:, 0]
            kept = jax.lax.dynamic_slice(keep_sub, (0, i), (rows, 1))[:, 0]
            q = jnp.where(kept, col, 0.0)
            if quantize is not None:
                q = jnp.where(kept, quantize(q, offset + i, quant_params), 0.0)
            err = (col - q) / d_sub[i]
            # Row i of the upper factor is zero left of i: this updates columns i.. of the sub-block only.
            w_sub = w_sub - err[:, None] * jax.lax.dynamic_slice(u_sub, (i, 0), (1, sub))
            q_sub = jax.lax.dynamic_update_slice(q_sub, q[:, None], (0, i))
            err_sub = jax.lax.dynamic_update_slice(err_sub, err[:, None], (0, i))
            return w_sub, q_sub, err_sub, keep_sub

        def group(g, state, d_sub, u_sub, offset):
            # N:M: a group's mask is chosen from its weights as updated when its first column is reached.
            w_sub, q_sub, err_sub, keep_sub = state
            first = g * pattern.m
            metric = jax.lax.dynamic_slice(w_sub, (0, first), (rows, pattern.m)) ** 2
            metric = metric / jax.lax.dynamic_slice(d_sub, (first,), (pattern.m,))[None, :] ** 2
            keep_sub = jax.lax.dynamic_update_slice(keep_sub, _nm_keep(metric, pattern.n, pattern.m), (0, first))
            state = (w_sub, q_sub, err_sub, keep_sub)
            for t in range(pattern.m):
                state = column(first + t, state, d_sub, u_sub, offset)
            return state

        step, steps = (group, sub // pattern.m) if pattern.is_nm else (column, sub)

        def sub_block(s, state):
            # Columns j.. j+sub: solved one by one inside the sub-block, then their errors reach every later
            # column of the block in one matmul (columns left of j meet zeros of the upper factor; the sub-block's
            # own columns are final and no longer read).
            w1, q1, err1, keep1 = state
            j = s * sub
            zeros = jnp.zeros((rows, sub), jnp.float32)
            body = functools.partial(step, d_sub=jax.lax.dynamic_slice(d, (j,), (sub,)),
                                     u_sub=jax.lax.dynamic_slice(u1, (j, j), (sub, sub)), offset=start + i1 + j)
            _, q_sub, err_sub, keep_sub = jax.lax.fori_loop(
                0, steps, body, (jax.lax.dynamic_slice(w1, (0, j), (rows, sub)), zeros, zeros,
                                 jax.lax.dynamic_slice(keep1, (0, j), (rows, sub))))
            w1 = w1 - jnp.matmul(err_sub, jax.lax.dynamic_slice(u1, (j, 0), (sub, bs)), precision=HIGHEST)
            return (w1, jax.lax.dynamic_update_slice(q1, q_sub, (0, j)),
                    jax.lax.dynamic_update_slice(err1, err_sub, (0, j)),
                    jax.lax.dynamic_update_slice(keep1, keep_sub, (0, j)))

        zeros = jnp.zeros((rows, bs), jnp.float32)
        _, q1, err1, keep1 = jax.lax.fori_loop(0, bs // sub, sub_block, (w1, zeros, zeros, keep1))

        # Lazy batched update of every later column of the segment; earlier ones see zeros of the upper factor.
        w = w - jnp.matmul(err1, jax.lax.dynamic_slice(upper, (i1, 0), (bs, width)), precision=HIGHEST)
        w = jax.lax.dynamic_update_slice(w, q1, (0, i1))
        keep = jax.lax.dynamic_update_slice(keep, keep1, (0, i1))
        return w, keep

    keep = jnp.ones((rows, padded), bool)
    for b0, b1 in _segments(padded // bs, MAX_SEGMENTS if cols > SEGMENT_MIN_COLS else 1):
        c0 = b0 * bs  # columns left of c0 are final: this segment neither reads nor updates them
        body = functools.partial(block, upper=upper[c0:, c0:], valid_cols=valid_cols[c0:], start=c0)
        w_seg, keep_seg = jax.lax.fori_loop(0, b1 - b0, body, (w[:, c0:], keep[:, c0:]))
        w, keep = w.at[:, c0:].set(w_seg), keep.at[:, c0:].set(keep_seg)
    keep = keep[:, :cols] & ~dead[None, :]
    return w[:, :cols], keep


def _segments(num_blocks: int, max_segments: int) -> list[tuple[int, int]]:
    """Splits blocks ``0..num_blocks`` into at most ``max_segments`` contiguous ``(start, stop)`` runs of near-equal
    length."""
    count = min(num_blocks, max_segments)
    bounds = [round(i * num_blocks / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
