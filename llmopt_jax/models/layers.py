"""Building blocks: parameters with logical axis names, linear layers with an injectable matmul, norms.

Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata holds one *logical* axis name per
dimension (``embed``, ``mlp``, ``heads``, ...). Nothing here knows about meshes: ``parallel.rules`` maps the
names to mesh axes. ``eager_sharding=False`` keeps construction mesh-free, so the same module builds on a
laptop, inside ``jax.eval_shape`` and inside a jitted initialiser with ``out_shardings``.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DotGeneral = Callable[..., jax.Array]


class ActivationConstraint(Protocol):
    """``(x, logical_axes) -> x``: pins an activation's sharding; identity when running unsharded."""

    def __call__(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array: ...


def no_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Default :class:`ActivationConstraint`: leaves ``x`` alone."""
    del logical_axes
    return x


def logical_param(
    key: jax.Array, shape: Sequence[int], axes: Sequence[str | None], dtype, init: Callable
) -> nnx.Param:
    """An ``nnx.Param`` of ``shape`` initialised by ``init(key, shape, dtype)``, tagged with logical ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes {tuple(axes)} for a parameter of shape {tuple(shape)}")
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """``y = x · W`` contracting the last ``len(in_shape)`` axes of ``x`` with the leading axes of ``W``.

    ``W`` has shape ``in_shape + out_shape`` and logical axes ``in_axes + out_axes``. The matmul is
    ``dot_general`` (default ``jax.lax.dot_general``), injectable so quantized or packed kernels can replace
    it without touching the model (the MaxText pattern). Inputs and weights are cast to ``dtype`` first; a
    packed kernel (``compress/packed.py``) is handed to ``dot_general`` as it is.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Sequence[str | None],
        out_axes: Sequence[str | None],
        *,
        dtype,
        param_dtype,
        init_std: float,
        rngs: nnx.Rngs,
        dot_general: DotGeneral = jax.lax.dot_general,
    ):
        self.in_shape = tuple(in_shape)
        self.dtype = dtype
        self.dot_general = dot_general
        fan_in = 1
        for s in self.in_shape:
            fan_in *= s
        init = jax.nn.initializers.normal(stddev=init_std)
        self.kernel = logical_param(
            rngs.params(), self.in_shape + tuple(out_shape), tuple(in_axes) + tuple(out_axes), param_dtype, init
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in :] != self.in_shape:
            raise ValueError(f"Linear expects trailing input shape {self.in_shape}, got {x.shape}")
        contract_x = tuple(range(x.ndim - n_in, x.ndim))
        contract_w = tuple(range(n_in))
        kernel = self.kernel.get_value()
        if not getattr(kernel, "is_packed", False):  # a packed kernel is left to its dot_general to dequantize
            kernel = kernel.astype(self.dtype)
        # Accumulate in float32: more accurate for bf16, and XLA:CPU only has fast bf16 dots in this form.
        y = self.dot_general(
            x.astype(self.dtype), kernel, ((contract_x, contract_w), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table ``(vocab, embed)``; ``attend`` reuses it as a tied output projection."""

    def __init__(
        self, vocab_size: int, d_model: int, *, dtype, param_dtype, init_std: float, rngs: nnx.Rngs,
        constrain: ActivationConstraint = no_constraint,
    ):
        self.dtype = dtype
        self.constrain = constrain
        init = jax.nn.initializers.normal(stddev=init_std)
        self.embedding = logical_param(rngs.params(), (vocab_size, d_model), ("vocab", "embed"), param_dtype, init)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """``token_ids`` int ``[B, L]`` -> embeddings ``[B, L, D]`` in the compute dtype."""
        table = self.embedding.get_value()
        if getattr(table, "is_packed", False):  # compress/packed.py: unpack only the rows looked up
            return table.embed_rows(token_ids, self.dtype)
        # XLA's SPMD partitioner cannot gather rows from a vocab-sharded table into a batch-sharded output
        # without replicating it anyway ("involuntary full rematerialization"); gathering the table first
        # says so explicitly and costs the same one all-gather.
        table = self.constrain(table, (None, None))
        return jnp.take(table, token_ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """``x`` ``[B, L, D]`` -> logits ``[B, L, V]`` against the embedding table."""
        table = self.embedding.get_value()
        if getattr(table, "is_packed", False):  # packed as the LM head's [D, V] kernel
            from llmopt_jax.compress.packed import packed_dot_general

            return packed_dot_general(x.astype(self.dtype), table, (((2,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return jnp.einsum("bld,vd->blv", x.astype(self.dtype), table.astype(self.dtype),
                          preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32 for stability."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.dtype = dtype
        self.scale = logical_param(None, (dim,), ("norm",), param_dtype, lambda k, s, d: jnp.ones(s, d))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)
