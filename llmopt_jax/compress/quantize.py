"""Weight quantization as pure transforms: grids, round-to-nearest (RTN) and GPTQ.

Matrices are in the papers' layout ``W`` float32 ``[rows = outputs, cols = inputs]``. A :class:`QuantGrid` says
how values are rounded: ``bits`` in 2..8, symmetric or asymmetric, and one scale per tensor, per output row
(channel) or per group of ``group_size`` consecutive inputs of a row.

- symmetric: ``w ≈ d·q`` with ``q`` in ``[-2^(b-1), 2^(b-1)-1]`` and ``d = m / -2^(b-1)``, ``m`` the group's
  value of largest magnitude (llama.cpp's Q4_0/Q8_0 rule: every level is used and 0 is exact, so a pruned
  weight stays zero).
- asymmetric with an integer zero-point (``zero_point="int"``, the default): the range ``[min, max]`` is widened
  to include 0, ``d = (max - min) / (2^b - 1)``, ``z = round(-min / d)`` an integer code, ``q = clamp(round(w/d) + z,
  0, 2^b-1)`` and ``w ≈ d·(q - z)`` (the GPTQ/SparseGPT reference code's quantizer). 0 is a level, so the many
  near-zero weights of a row round to exactly 0 or to both sides of it and their errors cancel; a pruned weight
  stays exactly zero.
- asymmetric with a float offset (``zero_point="float"``): ``w ≈ d·q + o`` with ``d = (max - min) / (2^b - 1)``,
  ``o = min`` (llama.cpp's Q4_1 rule). Use it to reproduce a Q4_1/Q5_1 file's blocks code for code; 0 is
  generally *not* a level, so near-zero weights all move the same way, and where they multiply inputs whose
  mean is not zero that shift adds up in the output (on SmolLM2, RTN 3-bit per channel gives perplexity 14,589 on
  this grid vs 323 with an integer zero-point, on the quantization case study's close text).

- ternary (``ternary=True``, QMoE's grid, Frantar & Alistarh 2023): three levels per group ``{lo, 0, hi}`` with
  ``lo = min(min w, 0)`` and ``hi = max(max w, 0)`` (an all-zero group gets ``{-1, 0, 1}``; ``symmetric`` makes
  ``lo = -hi`` where the group has a negative weight, QMoE's ``sym`` rule). Codes are ``-1, 0, 1`` (int8) and a
  weight becomes ``hi`` when ``w > hi/2``, ``lo`` when ``w < lo/2`` and 0 otherwise (strict inequalities, as in
  the qmoe repository's ``quantize``). The grid is not affine in the code, so ``scale`` holds ``hi`` and
  ``offset`` holds ``lo`` (QMoE repurposes its ``scale``/``zero`` the same way) and :func:`dequantize_grid`
  maps codes to levels. ``bits`` stays 2 (what a plain 2-bit packing of the codes takes); ``compress/codec.py``
  stores them in under one bit.

Every other grid is stored as ``w ≈ scale·q + offset`` per group; with an integer zero-point ``offset = -z·scale``
exactly (a float16 scale times an integer below 2^8 is exact in float32), and :attr:`QuantizedMatrix.zero`
recovers ``z``.

Scales and offsets are rounded to float16 before the codes are chosen, because float16 is how they are stored
(``compress/packed.py``, GGUF): the dequantized values here are exactly what a packed model computes with.

GPTQ (Frantar et al., 2022) quantizes the columns left to right and spreads each column's rounding error
over the columns not yet visited with the upper Cholesky factor of the damped inverse Hessian, in blocks of
``blocksize`` columns whose updates to later blocks are batched into one matmul (lazy updates). With
``act_order`` the columns are visited in order of decreasing ``H_jj`` and the permutation is undone at the
end. Group scales are fitted when a group's first column is reached, from the weights as updated so far, or
from the original weights up front with ``static_groups`` (implied by ``act_order``, so that groups stay
contiguous runs of inputs in storage).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from llmopt_jax.compress.hessian import damped_inverse_cholesky
from llmopt_jax.errors import ConfigError

HIGHEST = jax.lax.Precision.HIGHEST


ZERO_POINTS = ("int", "float")


@dataclasses.dataclass(frozen=True)
class QuantGrid:
    """How weights are rounded. ``group_size`` > 0: groups of that many inputs; 0 or -1: one group per row."""

    bits: int = 4
    group_size: int = -1
    symmetric: bool = False
    per_tensor: bool = False
    zero_point: str = "int"  # asymmetric grids: "int" (GPTQ reference, 0 exact) or "float" (llama.cpp Q4_1)
    ternary: bool = False  # QMoE's {lo, 0, hi} grid (module docstring); needs bits=2

    def __post_init__(self):
        if self.ternary and self.bits != 2:
            raise ConfigError(f"a ternary grid has codes -1/0/1 and bits=2, got bits={self.bits!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.zero_point not in ZERO_POINTS:
            raise ConfigError(f"zero_point must be one of {ZERO_POINTS}, got {self.zero_point!r}")
        if self.group_size < -1:
            raise ConfigError(f"group_size must be > 0, or 0 / -1 for per-channel, got {self.group_size}")
        if self.per_tensor and self.group_size > 0:
            raise ConfigError("a per-tensor grid has no groups: leave group_size at -1")

    @property
    def levels(self) -> tuple[int, int]:
        """Smallest and largest integer code."""
        if self.ternary:
            return -1, 1
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @property
    def integer_zero(self) -> bool:
        """True when the grid has an integer zero-point (asymmetric, ``zero_point="int"``)."""
        return not self.ternary and not self.symmetric and self.zero_point == "int"

    @property
    def zero_exact(self) -> bool:
        """True when 0 is always a level (symmetric, an integer zero-point, or ternary)."""
        return self.ternary or self.symmetric or self.zero_point == "int"

    @property
    def code_dtype(self):
        return jnp.int8 if self.symmetric or self.ternary else jnp.uint8

    def group_width(self, cols: int) -> int:
        """Inputs per group for a matrix with ``cols`` inputs; raises if ``group_size`` does not divide it."""
        if self.group_size <= 0:
            return cols
        if cols % self.group_size:
            raise ConfigError(f"group_size {self.group_size} does not divide the input dimension {cols}")
        return self.group_size

    def num_groups(self, cols: int) -> int:
        return cols // self.group_width(cols)

    @property
    def param_bits(self) -> int:
        """Bits stored per group besides the codes: a float16 scale, plus a uint8 zero-point or a float16 offset
        (ternary: the two float16 levels)."""
        if self.ternary:
            return 32
        return 16 + (0 if self.symmetric else 8 if self.integer_zero else 16)

    def storage_bits(self, rows: int, cols: int) -> int:
        """Bits held for a ``[rows, cols]`` matrix: codes plus each group's :attr:`param_bits`."""
        params = 1 if self.per_tensor else rows * self.num_groups(cols)
        return rows * cols * self.bits + params * self.param_bits

    def describe(self) -> str:
        layout = "per tensor" if self.per_tensor else ("per channel" if self.group_size <= 0 else f"g{self.group_size}")
        if self.ternary:
            return f"ternary {'sym' if self.symmetric else '{min,0,max}'} {layout}"
        kind = "sym" if self.symmetric else "asym" if self.integer_zero else "asym-float-offset"
        return f"{self.bits}-bit {kind} {layout}"


@struct.dataclass
class QuantizedMatrix:
    """Integer codes ``[rows, cols]`` (int8 symmetric or ternary / uint8 asymmetric) and float32 ``scale``/``offset``
    ``[rows or 1, groups]`` (float16-exact; offset is zero when symmetric; ternary: the levels ``hi``/``lo``).
    ``dequantize()`` gives the weights."""

    codes: jax.Array
    scale: jax.Array
    offset: jax.Array
    grid: QuantGrid = struct.field(pytree_node=False)

    def dequantize(self) -> jax.Array:
        """Float32 ``[rows, cols]`` weights the codes stand for."""
        return dequantize_grid(self.codes, self.scale, self.offset, self.grid)

    @property
    def zero(self) -> jax.Array:
        """Integer zero-point of each group, int32 ``[rows or 1, groups]`` (the code that stands for 0; 0 on a
        symmetric grid). Only defined for grids with :attr:`QuantGrid.zero_exact`."""
        if not self.grid.zero_exact:
            raise ConfigError("a float-offset grid has no integer zero-point")
        if self.grid.ternary:  # code 0 is the level 0
            return jnp.zeros(self.scale.shape, jnp.int32)
        return zero_codes(self.scale, self.offset)


def _fit_groups(groups: jax.Array, grid: QuantGrid) -> tuple[jax.Array, jax.Array]:
    """Scale and offset (float16-rounded, float32) of each row of ``groups`` ``[..., width]`` -> ``[...]``."""
    lo, hi = grid.levels
    f16 = lambda a: a.astype(jnp.float16).astype(jnp.float32)  # noqa: E731
    if grid.ternary:  # QMoE: [min, max] widened to include 0, an all-zero group gets [-1, 1]
        gmin = jnp.minimum(jnp.min(groups, axis=-1), 0.0)
        gmax = jnp.maximum(jnp.max(groups, axis=-1), 0.0)
        if grid.symmetric:  # QMoE's sym rule: the larger magnitude, mirrored where the group has a negative weight
            gmax = jnp.maximum(-gmin, gmax)
            gmin = jnp.where(gmin < 0, -gmax, gmin)
        empty = (gmin == 0) & (gmax == 0)
        return f16(jnp.where(empty, 1.0, gmax)), f16(jnp.where(empty, -1.0, gmin))
    if grid.symmetric:
        idx = jnp.argmax(jnp.abs(groups), axis=-1)
        signed_max = jnp.take_along_axis(groups, idx[..., None], axis=-1)[..., 0]
        return f16(signed_max / lo), jnp.zeros(signed_max.shape, jnp.float32)
    gmin, gmax = jnp.min(groups, axis=-1), jnp.max(groups, axis=-1)
    if grid.zero_point == "float":
        return f16((gmax - gmin) / hi), f16(gmin)
    # The reference quantizer: widen the range to include 0 (an all-zero group gets [-1, 1]), integer zero-point.
    gmin, gmax = jnp.minimum(gmin, 0.0), jnp.maximum(gmax, 0.0)
    empty = (gmin == 0) & (gmax == 0)
    gmin, gmax = jnp.where(empty, -1.0, gmin), jnp.where(empty, 1.0, gmax)
    scale = f16((gmax - gmin) / hi)
    zero = jnp.clip(jnp.round(-gmin / jnp.where(scale == 0, 1.0, scale)), lo, hi)
    return scale, -zero * scale


def fit_grid(w: jax.Array, grid: QuantGrid) -> tuple[jax.Array, jax.Array]:
    """Scale and offset float32 ``[rows, groups]`` (``[1, 1]`` per tensor) of ``w`` ``[rows, cols]``."""
    rows, cols = w.shape
    w = jnp.asarray(w, jnp.float32)
    if grid.per_tensor:
        scale, offset = _fit_groups(w.reshape(1, 1, -1), grid)
        return scale, offset
    g = grid.num_groups(cols)
    return _fit_groups(w.reshape(rows, g, cols // g), grid)


def _expand(param: jax.Array, rows: int, cols: int) -> jax.Array:
    """``[rows or 1, groups]`` -> ``[rows, cols]``: each group's value repeated over its columns."""
    return jnp.broadcast_to(jnp.repeat(param, cols // param.shape[1], axis=1), (rows, cols))


def zero_codes(scale: jax.Array, offset: jax.Array) -> jax.Array:
    """Integer zero-points ``-offset / scale`` (exact for a zero-exact grid) as int32, same shape."""
    return jnp.round(-offset / jnp.where(scale == 0, 1.0, scale)).astype(jnp.int32)


def _nearest_level(x: jax.Array, scale: jax.Array, offset: jax.Array, grid: QuantGrid) -> jax.Array:
    """The level (an integer, as float32) nearest to each ``x`` on the grid ``scale·q + offset`` (same shapes)."""
    lo, hi = grid.levels
    if grid.ternary:  # scale = hi, offset = lo; thresholds at half of each level, strict as in QMoE
        return jnp.where(x > scale / 2, 1.0, jnp.where(x < offset / 2, -1.0, 0.0))
    safe = jnp.where(scale == 0, 1.0, scale)
    if grid.integer_zero:  # round(w / d) + z, as the reference quantizer does (z = -offset / d exactly)
        return jnp.clip(jnp.round(x / safe) + zero_codes(scale, offset), lo, hi)
    return jnp.clip(jnp.round((x - offset) / safe), lo, hi)


def encode(w: jax.Array, scale: jax.Array, offset: jax.Array, grid: QuantGrid) -> jax.Array:
    """Nearest integer codes of ``w`` ``[rows, cols]`` on the grid given by ``scale``/``offset`` (int32)."""
    rows, cols = w.shape
    return _nearest_level(w, _expand(scale, rows, cols), _expand(offset, rows, cols), grid).astype(jnp.int32)


def dequantize(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """``scale·codes + offset`` float32 ``[rows, cols]`` (scale/offset per group, expanded over columns)."""
    rows, cols = codes.shape
    return _expand(scale, rows, cols) * codes.astype(jnp.float32) + _expand(offset, rows, cols)


def _levels(q: jax.Array, scale: jax.Array, offset: jax.Array, grid: QuantGrid) -> jax.Array:
    """The value of code ``q`` (any int or float dtype) with its group's ``scale``/``offset`` (same shapes)."""
    if grid.ternary:
        return jnp.where(q > 0, scale, jnp.where(q < 0, offset, 0.0))
    return scale * q.astype(jnp.float32) + offset


def dequantize_grid(codes: jax.Array, scale: jax.Array, offset: jax.Array, grid: QuantGrid) -> jax.Array:
    """Float32 ``[rows, cols]`` weights of ``codes`` on ``grid`` (:func:`dequantize`, or ternary levels)."""
    rows, cols = codes.shape
    return _levels(codes, _expand(scale, rows, cols), _expand(offset, rows, cols), grid)


def quantize_column(col: jax.Array, scale: jax.Array, offset: jax.Array, grid: QuantGrid) -> jax.Array:
    """One column ``[rows]`` rounded to the grid with per-row ``scale``/``offset`` ``[rows]`` (float32)."""
    return _levels(_nearest_level(col, scale, offset, grid), scale, offset, grid)


def _check_matrix(w, grid: QuantGrid) -> None:
    if getattr(w, "is_packed", False):
        raise ConfigError("this tensor is already packed: quantize the float weights, not a PackedTensor")
    if getattr(w, "ndim", None) != 2:
        raise ConfigError(f"expected a [rows, cols] weight matrix, got shape {getattr(w, 'shape', None)}")
    if jnp.issubdtype(w.dtype, jnp.integer):
        raise ConfigError(f"expected float weights, got {w.dtype}: the tensor is already quantized")
    grid.group_width(w.shape[1])


@functools.partial(jax.jit, static_argnames=("grid",))
def _rtn(w: jax.Array, grid: QuantGrid) -> QuantizedMatrix:
    scale, offset = fit_grid(w, grid)
    codes = encode(w, scale, offset, grid).astype(grid.code_dtype)
    return QuantizedMatrix(codes, scale, offset, grid)


def rtn_quantize(w: jax.Array, grid: QuantGrid) -> tuple[jax.Array, QuantizedMatrix]:
    """Round-to-nearest: each weight of ``w`` ``[rows, cols]`` to its nearest level of ``grid``.

    Returns ``(dequantized float32 weights, QuantizedMatrix)``.
    """
    _check_matrix(w, grid)
    qm = _rtn(jnp.asarray(w, jnp.float32), grid)
    return qm.dequantize(), qm


def gptq_quantize(
    w: jax.Array,
    hessian: jax.Array,
    grid: QuantGrid,
    *,
    blocksize: int = 128,
    damp_fraction: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> tuple[jax.Array, QuantizedMatrix]:
    """GPTQ on ``w`` ``[rows, cols]`` with the input Hessian ``hessian`` ``[cols, cols]`` (``2XᵀX/n``).

    Returns ``(dequantized float32 weights, QuantizedMatrix)``. Inputs that were never active
    (``H_jj = 0``) get weight 0 before rounding (0 exactly on zero-exact grids, the level nearest 0 otherwise).
    """
    _check_matrix(w, grid)
    if blocksize < 1 or damp_fraction < 0:
        raise ConfigError(f"gptq needs blocksize >= 1 and damp_fraction >= 0, got {blocksize}, {damp_fraction}")
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ConfigError(f"Hessian {hessian.shape} does not match a matrix with {w.shape[1]} inputs")
    static = static_groups or act_order or grid.group_size <= 0 or grid.per_tensor
    qm = _gptq(jnp.asarray(w, jnp.float32), jnp.asarray(hessian, jnp.float32), grid, blocksize, damp_fraction,
               act_order, static)
    return qm.dequantize(), qm


# Columns per inner pass of GPTQ: each column's error updates only its sub-block of SUB_BLOCK columns, and the
# sub-block's errors reach the rest of the block in one matmul (SparseGPT's solver does the same). The arithmetic
# is the same; XLA:CPU runs the short per-column loop on [rows, 16] instead of [rows, blocksize] operands.
SUB_BLOCK = 16


def _sub_block_width(bs: int, width: int, static: bool, sub_block: int) -> int:
    """The sub-block width for blocks of ``bs`` columns and groups of ``width``: ``sub_block`` where a dynamic
    group's first column is also where its columns are up to date (the group lies inside one sub-block, or starts
    one and spans whole sub-blocks); else ``bs`` (one sub-block per block)."""
    if sub_block <= 0 or bs % sub_block:
        return bs
    if static or width % sub_block == 0 or sub_block % width == 0:
        return sub_block
    return bs


@functools.partial(jax.jit, static_argnames=("grid", "blocksize", "damp_fraction", "act_order", "static", "sub_block"))
def _gptq(w, hessian, grid: QuantGrid, blocksize: int, damp_fraction: float, act_order: bool, static: bool,
          sub_block: int = SUB_BLOCK):
    rows, cols = w.shape
    width = grid.group_width(cols)
    dead = jnp.diag(hessian) == 0
    w = jnp.where(dead[None, :], 0.0, w)
    if static:
        scale, offset = fit_grid(w, grid)
    else:
        scale = offset = jnp.zeros((rows, cols // width), jnp.float32)
    group_of = jnp.zeros(cols, jnp.int32) if grid.per_tensor else jnp.arange(cols, dtype=jnp.int32) // width

    # Act-order solves in order of decreasing H_jj (dead inputs last) with the factor of the permuted Hessian.
    perm = jnp.argsort(-jnp.diag(hessian)) if act_order else jnp.arange(cols)
    upper, _ = damped_inverse_cholesky(hessian[perm][:, perm] if act_order else hessian, damp_fraction)
    w, group_of = w[:, perm], group_of[perm]

    # Dynamic groups are fitted at their first column inside a block, so a block holds whole groups.
    bs = min(blocksize, cols) if static else -(-min(blocksize, cols) // width) * width
    sub = _sub_block_width(bs, width, static, sub_block)
    padded = -(-cols // bs) * bs
    if padded != cols:  # inert columns: zero weight, identity factor, a group of their own that is never read
        extra = padded - cols
        w = jnp.pad(w, ((0, 0), (0, extra)))
        upper = jnp.pad(upper, ((0, extra), (0, extra))).at[cols:, cols:].set(jnp.eye(extra, dtype=upper.dtype))
        group_of = jnp.pad(group_of, (0, extra), constant_values=-1)
        if not static:
            scale = jnp.pad(scale, ((0, 0), (0, -(-extra // width))))
            offset = jnp.pad(offset, ((0, 0), (0, -(-extra // width))))

    def refit(params, group_weights, first):
        # A dynamic group's scale and offset, from its weights as updated so far (at its first column `first`).
        s, o = _fit_groups(group_weights, grid)
        return (jax.lax.dynamic_update_slice(params[0], s[:, None], (0, first // width)),
                jax.lax.dynamic_update_slice(params[1], o[:, None], (0, first // width)))

    def column(i, state, d_sub, u_sub, offset0):
        # Column `i` of a sub-block that starts at column `offset0` of the (permuted, padded) matrix.
        w_sub, q_sub, err_sub, scale, offset = state
        j = offset0 + i
        if not static and sub % width == 0:  # groups lie inside a sub-block: fit each at its first column
            scale, offset = jax.lax.cond(
                j % width == 0, lambda p: refit(p, jax.lax.dynamic_slice(w_sub, (0, i), (rows, width)), j),
                lambda p: p, (scale, offset))
        col = jax.lax.dynamic_slice(w_sub, (0, i), (rows, 1))[:, 0]
        g = jnp.maximum(group_of[j], 0)
        pick = lambda p: jax.lax.dynamic_slice(p, (0, g), (p.shape[0], 1))[:, 0]  # noqa: E731
        q = quantize_column(col, pick(scale), pick(offset), grid)
        q = jnp.where(group_of[j] < 0, 0.0, q)
        err = (col - q) / d_sub[i]
        # Row i of the upper factor is zero left of i: this updates columns i.. of the sub-block only.
        w_sub = w_sub - err[:, None] * jax.lax.dynamic_slice(u_sub, (i, 0), (1, sub))
        q_sub = jax.lax.dynamic_update_slice(q_sub, q[:, None], (0, i))
        err_sub = jax.lax.dynamic_update_slice(err_sub, err[:, None], (0, i))
        return w_sub, q_sub, err_sub, scale, offset

    def block(b, state):
        w, scale, offset = state
        i1 = b * bs
        w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, bs))
        u1 = jax.lax.dynamic_slice(upper, (i1, i1), (bs, bs))
        d = jnp.diag(u1)

        def sub_block_pass(s, state):
            # Columns j.. j+sub solved one by one, then their errors reach every later column of the block in one
            # matmul (columns left of j meet zeros of the upper factor; the sub-block's own are final).
            w1, q1, err1, scale, offset = state
            j = s * sub
            if not static and sub % width:  # a group starts here and spans whole sub-blocks, all up to date now
                scale, offset = jax.lax.cond(
                    (i1 + j) % width == 0, lambda p: refit(p, jax.lax.dynamic_slice(w1, (0, j), (rows, width)), i1 + j),
                    lambda p: p, (scale, offset))
            zeros = jnp.zeros((rows, sub), jnp.float32)
            body = functools.partial(column, d_sub=jax.lax.dynamic_slice(d, (j,), (sub,)),
                                     u_sub=jax.lax.dynamic_slice(u1, (j, j), (sub, sub)), offset0=i1 + j)
            _, q_sub, err_sub, scale, offset = jax.lax.fori_loop(
                0, sub, body, (jax.lax.dynamic_slice(w1, (0, j), (rows, sub)), zeros, zeros, scale, offset))
            if sub < bs:
                w1 = w1 - jnp.matmul(err_sub, jax.lax.dynamic_slice(u1, (j, 0), (sub, bs)), precision=HIGHEST)
            return (w1, jax.lax.dynamic_update_slice(q1, q_sub, (0, j)),
                    jax.lax.dynamic_update_slice(err1, err_sub, (0, j)), scale, offset)

        zeros = jnp.zeros((rows, bs), jnp.float32)
        _, q1, err1, scale, offset = jax.lax.fori_loop(0, bs // sub, sub_block_pass, (w1, zeros, zeros, scale, offset))
        # Lazy batched update of every later column; earlier ones meet zeros of the upper factor.
        w = w - jnp.matmul(err1, jax.lax.dynamic_slice(upper, (i1, 0), (bs, padded)), precision=HIGHEST)
        return jax.lax.dynamic_update_slice(w, q1, (0, i1)), scale, offset

    w, scale, offset = jax.lax.fori_loop(0, padded // bs, block, (w, scale, offset))
    inverse = jnp.argsort(perm)
    w = w[:, :cols][:, inverse]
    groups = 1 if grid.per_tensor else cols // width
    scale, offset = scale[:, :groups], offset[:, :groups]
    codes = encode(w, scale, offset, grid).astype(grid.code_dtype)
    return QuantizedMatrix(codes, scale, offset, grid)


@dataclasses.dataclass(frozen=True)
class GridColumnQuantizer:
    """SparseGPT's joint-mode column quantizer: rounds input column ``j`` with its group's ``(scale, offset)``.

    Hashable and compared by value, so the jitted solver compiles once per matrix shape, not per matrix.
    """

    grid: QuantGrid
    width: int  # inputs per group of the matrix being solved

    def __call__(self, col: jax.Array, j: jax.Array, params: tuple[jax.Array, jax.Array]) -> jax.Array:
        scale, offset = params
        g = 0 if self.grid.per_tensor else j // self.width  # padded columns past the end clamp to the last group
        pick = lambda p: jnp.broadcast_to(jax.lax.dynamic_slice(p, (0, g), (p.shape[0], 1))[:, 0], col.shape)  # noqa
        return quantize_column(col, pick(scale), pick(offset), self.grid)
