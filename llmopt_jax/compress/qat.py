"""Quantization-aware training: the forward pass sees quantized weights, the gradient passes straight through.

:class:`FakeQuantDotGeneral` is injected into every ``Linear`` (like the packed and W8A8 matmuls): it rounds
the float kernel to the grid that round-to-nearest would use (``compress/quantize.py``, same float16 scales)
and multiplies with the rounded values; the straight-through estimator (``w + stop_gradient(q(w) - w)``)
makes the gradient with respect to the float master weights that of the rounded ones. After training, RTN
with the same grid gives exactly the weights the model was trained to work with.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from llmopt_jax.compress.quantize import QuantGrid, dequantize, encode, fit_grid


def fake_quantize(w: jax.Array, grid: QuantGrid) -> jax.Array:
    """``w`` ``[rows, cols]`` rounded to ``grid`` in the forward pass, identity in the backward pass."""
    w32 = w.astype(jnp.float32)
    scale, offset = fit_grid(jax.lax.stop_gradient(w32), grid)
    q = dequantize(encode(w32, scale, offset, grid), scale, offset)
    return (w32 + jax.lax.stop_gradient(q - w32)).astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class FakeQuantDotGeneral:
    """``dot_general`` whose right operand (a kernel ``[*in, *out]`` contracted on its leading axes) is
    fake-quantized per output channel / group of inputs. Hashable, so it can live in a module's graph."""

    grid: QuantGrid

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        (_, contract_w), batch = dimension_numbers
        if batch == ((), ()) and contract_w == tuple(range(len(contract_w))):
            n_in = math.prod(rhs.shape[: len(contract_w)])
            matrix = rhs.reshape(n_in, -1).T  # the papers' [outputs, inputs] layout
            rhs = fake_quantize(matrix, self.grid).T.reshape(rhs.shape)
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
