"""Packed quantized weights that hold real bits, and the dequantizing matmul the model runs them with.

A :class:`PackedTensor` replaces a linear layer's float kernel ``[*in_shape, *out_shape]``. Its codes are packed
along the (flattened) input axis: every 8 consecutive ``b``-bit codes of an output column occupy ``b`` bytes
(int8: one byte each; int4: two per byte; int2: four per byte; int3: eight in three bytes), stored as
``uint8 [in·b/8, out]``. Scales are float16 ``[groups, out]``, with uint8 integer zero-points ``[groups, out]``
(asymmetric grids, the default) or float16 offsets (float-offset grids, llama.cpp's Q4_1 rule). Nothing else is
kept, so ``model_bytes`` (:func:`held_bytes`) is the memory these arrays really take.

:func:`packed_dot_general` is injected into every ``Linear`` (``models/layers.py``): when its right operand is
a ``PackedTensor`` it unpacks and dequantizes that one kernel inside the jitted step and multiplies; the float
weights of the whole model never exist at once (with scanned layers, one layer's at a time).

Ternary grids (QMoE's ``{lo, 0, hi}``) are stored by ``compress/codec.py``'s dictionary code instead
(:class:`~llmopt_jax.compress.codec.TernaryCodec`, under one bit per weight); :func:`pack_matrix` and
:func:`pack_params` hand them over, and everything here that runs or counts packed kernels takes any leaf with
``is_packed`` and a ``dequantize(dtype)`` method.

Why our own format rather than Qwix/AQT: both keep int4/int3/int2 codes in one byte per value on CPU (XLA's
``int4``/``int2`` dtypes are not packed there), neither has asymmetric int3/int2, and neither takes codes from
an outside solver without their own containers; see the quantization issue's note.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmopt_jax.compress.quantize import QuantizedMatrix, zero_codes
from llmopt_jax.errors import ConfigError
from llmopt_jax.infer.roofline import tree_bytes


def pack_codes(codes: jax.Array, bits: int, lo: int) -> jax.Array:
    """``codes`` int ``[n, out]`` in ``[lo, lo + 2^bits)`` -> ``uint8 [n·bits/8, out]`` (``n`` divisible by 8)."""
    n, out = codes.shape
    if n % 8:
        raise ConfigError(f"packing needs an input dimension divisible by 8, got {n}")
    u = (jnp.asarray(codes, jnp.int32) - lo).astype(jnp.uint32)
    if 8 % bits == 0:  # whole codes per byte: OR the shifted codes of each byte together
        per = 8 // bits
        u = u.reshape(n // per, per, out) << (bits * jnp.arange(per, dtype=jnp.uint32))[None, :, None]
        return jnp.sum(u, axis=1).astype(jnp.uint8)
    # Any width: lay the bits of 8 codes end to end (8·bits bits) and cut them into bits bytes.
    bit = (u.reshape(n // 8, 8, 1, out) >> jnp.arange(bits, dtype=jnp.uint32)[None, None, :, None]) & 1
    bit = bit.reshape(n // 8, bits, 8, out)
    byte = jnp.sum(bit << jnp.arange(8, dtype=jnp.uint32)[None, None, :, None], axis=2)
    return byte.reshape(n // 8 * bits, out).astype(jnp.uint8)


def unpack_codes(data: jax.Array, bits: int, lo: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: ``uint8 [n·bits/8, out]`` -> int32 codes ``[n, out]``."""
    rows, out = data.shape
    d = data.astype(jnp.int32)
    if 8 % bits == 0:
        per = 8 // bits
        u = (d[:, None, :] >> (bits * jnp.arange(per, dtype=jnp.int32))[None, :, None]) & (2**bits - 1)
        return u.reshape(rows * per, out) + lo
    n8 = rows // bits
    bit = (d.reshape(n8, bits, 1, out) >> jnp.arange(8, dtype=jnp.int32)[None, None, :, None]) & 1
    bit = bit.reshape(n8, 8, bits, out)
    u = jnp.sum(bit << jnp.arange(bits, dtype=jnp.int32)[None, None, :, None], axis=2)
    return u.reshape(n8 * 8, out) + lo


@struct.dataclass
class PackedTensor:
    """A packed quantized kernel (see module docstring). ``shape`` is the float kernel's shape (one layer: stacked
    layers add a leading axis to every array but not to ``shape``)."""

    data: jax.Array  # uint8 [..., in·bits/8, out]
    scale: jax.Array  # float16 [..., groups, out] ([..., 1, 1] per tensor)
    offset: jax.Array | None  # float16 like scale on a float-offset grid, else None
    zero: jax.Array | None  # uint8 like scale: integer zero-points of an asymmetric grid, else None
    bits: int = struct.field(pytree_node=False)
    lo: int = struct.field(pytree_node=False)  # smallest code (-2^(bits-1) symmetric, 0 asymmetric)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    n_in: int = struct.field(pytree_node=False)  # leading kernel dims that are inputs

    is_packed = True  # lets quantizers refuse a packed tensor without importing this module

    @property
    def dtype(self):
        return jnp.uint8

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float kernel ``[..., *shape]`` in ``dtype``: one layer, or a stack (e.g. a MoE layer's experts,
        ``data [E, in·bits/8, out]`` -> ``[E, *shape]``)."""
        if self.data.ndim > 2:
            return jax.vmap(lambda t: t.dequantize(dtype))(self)
        codes = unpack_codes(self.data, self.bits, self.lo)
        w = self._scale_groups(codes, self.scale, self.offset, self.zero)
        return w.reshape(self.shape).astype(dtype)

    @staticmethod
    def _scale_groups(codes: jax.Array, scale: jax.Array, offset: jax.Array | None,
                      zero: jax.Array | None) -> jax.Array:
        """``scale·(codes - zero) + offset`` float32 ``[n, cols]`` for codes ``[n, cols]`` whose ``n`` rows fall in
        ``scale.shape[0]`` equal groups; ``scale``/``offset``/``zero`` ``[groups, cols or 1]`` (absent = 0)."""
        n, cols = codes.shape
        groups = scale.shape[0]
        q = codes.reshape(groups, n // groups, cols)
        if zero is not None:
            q = q - zero.astype(jnp.int32)[:, None, :]
        w = q.astype(jnp.float32) * scale.astype(jnp.float32)[:, None, :]
        if offset is not None:
            w = w + offset.astype(jnp.float32)[:, None, :]
        return w.reshape(n, cols)

    def embed_rows(self, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
        """For a packed embedding table (kernel ``[d, vocab]``: the tied LM head's layout), the rows of tokens
        ``ids`` int ``[...]`` -> ``[..., d]``, unpacking only those columns."""
        flat = ids.reshape(-1)
        codes = unpack_codes(jnp.take(self.data, flat, axis=1), self.bits, self.lo)
        pick = lambda p: None if p is None else jnp.take(p, flat if p.shape[1] > 1 else jnp.zeros_like(flat), axis=1)  # noqa
        w = self._scale_groups(codes, pick(self.scale), pick(self.offset), pick(self.zero))
        return w.T.reshape(ids.shape + (codes.shape[0],)).astype(dtype)


def is_packed(x) -> bool:
    """True for a packed kernel of any format (:class:`PackedTensor`, ``codec.TernaryCodec``)."""
    return isinstance(x, PackedTensor) or getattr(x, "is_packed", False) is True


def pack_matrix(qm: QuantizedMatrix, kernel_shape: tuple[int, ...], n_in: int = 1, dictionary=None, *,
                ternary_codec: str = "dictionary", block_rows: int = 1):
    """Packs a :class:`QuantizedMatrix` (``[outputs, inputs]`` layout; optionally stacked ``[layers, ...]``) as
    the kernel of shape ``kernel_shape`` (one layer) whose first ``n_in`` dims are inputs. A ternary grid is
    coded by ``compress/codec.py`` (``ternary_codec``: ``"dictionary"``, QMoE's scheme with ``dictionary`` as
    its table, default one fitted to this matrix, or ``"ans"``; ``block_rows`` rows per stream, 0 = auto)."""
    grid = qm.grid
    if grid.ternary:
        from llmopt_jax.compress.codec import encode_matrix

        return encode_matrix(qm, tuple(kernel_shape), n_in, dictionary, codec=ternary_codec, block_rows=block_rows)
    codes, scale, offset = (jnp.asarray(a) for a in (qm.codes, qm.scale, qm.offset))
    data, s, o, z = _pack_arrays(codes, scale, offset, grid, codes.ndim == 3)
    return PackedTensor(data, s, o, z, grid.bits, grid.levels[0], tuple(kernel_shape), n_in)


# One compiled program per grid and shape: run op by op (and vmapped over stacked layers) the packing of one
# model's matrices compiled ~50 small programs and took ~11 s on a 2-core CPU.
@functools.partial(jax.jit, static_argnames=("grid", "stacked"))
def _pack_arrays(codes: jax.Array, scale: jax.Array, offset: jax.Array, grid, stacked: bool):
    """``(data, scale, offset or None, zero or None)`` of :class:`PackedTensor` for codes ``[outputs, inputs]``
    (``[layers, outputs, inputs]`` when ``stacked``) and their ``[outputs, groups]`` scale and offset."""

    def one(codes, scale, offset):
        if grid.per_tensor:
            scale, offset = scale[:1, :1], offset[:1, :1]
        data = pack_codes(codes.T, grid.bits, grid.levels[0])
        zero = zero_codes(scale, offset).T.astype(jnp.uint8) if grid.integer_zero else None
        float_offset = None if grid.zero_exact else offset.T.astype(jnp.float16)
        return data, scale.T.astype(jnp.float16), float_offset, zero

    return jax.vmap(one)(codes, scale, offset) if stacked else one(codes, scale, offset)


def embedding_record(table: Any, grid) -> QuantizedMatrix:
    """RTN of the token embedding ``table`` ``[vocab, d]`` (also the tied LM head's ``[outputs, inputs]``) on
    ``grid``: the :class:`QuantizedMatrix` whose groups run along d, the LM head's contraction axis."""
    from llmopt_jax.compress.quantize import rtn_quantize

    if isinstance(table, PackedTensor):
        raise ConfigError("this tensor is already packed")
    return rtn_quantize(jnp.asarray(table, jnp.float32), grid)[1]


def pack_embedding(pure: dict, grid) -> dict:
    """``pure`` with the token embedding rounded to ``grid`` by RTN (:func:`embedding_record`) and packed as a
    ``[d, vocab]`` kernel."""
    table = pure["embed"]["embedding"]
    record = embedding_record(table, grid)
    return {**pure, "embed": {"embedding": pack_matrix(record, (table.shape[1], table.shape[0]))}}


def packed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                       cpu_kernel: bool = True):
    """``jax.lax.dot_general`` that accepts a packed right operand (a :class:`PackedTensor` or a ternary
    ``codec.TernaryCodec``), dequantized (decoded) in the step.

    On the CPU, a decode-sized product (a few rows) with an int2/int4/int8 kernel runs the compiled kernel of
    ``kernels/cpu.py`` instead, which never writes the float weights out (same result up to float summation order);
    ``cpu_kernel=False`` keeps XLA's path (what :func:`packed_model` uses on a multi-device mesh, where XLA would
    gather the kernel's operands onto every device).
    """
    if is_packed(rhs):
        if cpu_kernel and _use_cpu_kernel(lhs, rhs, dimension_numbers):
            from llmopt_jax.kernels import cpu

            y = cpu.packed_matmul(lhs, rhs)
            return y.astype(preferred_element_type or lhs.dtype)
        rhs = rhs.dequantize(lhs.dtype)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def _use_cpu_kernel(lhs, rhs, dimension_numbers) -> bool:
    """Whether this product goes to the CPU kernel: CPU backend, the layer's own contraction (trailing dims of
    ``lhs`` with the kernel's input dims, no batch dims), a shape the kernel takes, and the kernel builds."""
    if not isinstance(rhs, PackedTensor):
        return False
    (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
    n_in = rhs.n_in
    if batch_l or batch_r or tuple(contract_r) != tuple(range(n_in)) or \
            tuple(contract_l) != tuple(range(lhs.ndim - n_in, lhs.ndim)):
        return False
    from llmopt_jax.kernels import cpu

    return cpu.supports(lhs.shape, rhs) and cpu.active()


def pack_params(pure: dict, quantized: dict, kernel_input_dims: dict[str, int], dictionary=None, *,
                ternary_codec: str = "dictionary", block_rows: int = 1) -> dict:
    """``pure`` params with every kernel that has a record in ``quantized`` (``compress_sequentially``'s
    ``report["quantized"]``) replaced by its :class:`PackedTensor`; ternary records are coded by
    ``compress/codec.py`` (see :func:`pack_matrix`; the dictionary codec's kernels share ``dictionary``, default one
    fitted to all of them); other leaves unchanged."""
    if dictionary is None and quantized and ternary_codec == "dictionary":
        from llmopt_jax.compress.codec import records_dictionary

        dictionary = records_dictionary(quantized)

    def walk(params, records, name=None):
        if isinstance(records, QuantizedMatrix):
            shape = np.shape(params)
            if is_packed(params):
                raise ConfigError("this tensor is already packed")
            one_layer = shape[1:] if records.codes.ndim == 3 else shape
            return pack_matrix(records, one_layer, kernel_input_dims.get(name, 1), dictionary,
                               ternary_codec=ternary_codec, block_rows=block_rows)
        if isinstance(records, dict):
            out = dict(params)
            for key, sub in records.items():
                out[key] = walk(params[key], sub, key if key != "kernel" else name)
            return out
        raise TypeError(f"unexpected record {type(records)}")

    return walk(pure, quantized) if quantized else pure


def packed_model(cfg, pure: dict, dot_general=None, mesh=None, rules=None) -> tuple[Any, Any]:
    """``(graphdef, params)`` of a decoder whose linear layers run ``dot_general`` (default
    :func:`packed_dot_general`, without the CPU kernel on a multi-device ``mesh``) on ``pure`` (float leaves cast
    to the model's weight dtype; :class:`PackedTensor` kernels kept packed).

    With a ``mesh``, every array is placed in the sharding its float kernel would have under ``rules`` (default
    ``DEFAULT_RULES``; see :func:`packed_shardings`) and activations are constrained like the float model's.
    """
    from flax import nnx

    from llmopt_jax.parallel.rules import DEFAULT_RULES, check_divisible
    from llmopt_jax.parallel.sharded_init import model_factory

    rules = DEFAULT_RULES if rules is None else rules
    if dot_general is None:  # the CPU kernel has no sharding rule: on a mesh XLA would replicate its operands
        sharded = mesh is not None and mesh.size > 1
        dot_general = functools.partial(packed_dot_general, cpu_kernel=False) if sharded else packed_dot_general
    graphdef, abstract = nnx.split(nnx.eval_shape(model_factory(cfg, 0, mesh, rules, dot_general)))
    state = jax.tree.map(lambda x: x, abstract)
    cast = lambda x: x if is_packed(x) else jnp.asarray(x, cfg.weight_dtype)  # noqa: E731
    nnx.replace_by_pure_dict(state, jax.tree.map(cast, pure, is_leaf=is_packed))
    if mesh is not None:
        check_divisible(abstract, mesh, rules)
        state = jax.device_put(state, packed_shardings(state, abstract, mesh, rules))
    return graphdef, state


def packed_shardings(state, abstract, mesh, rules):
    """Shardings for ``state`` (params whose kernels may be packed) from the float model's ``abstract`` params.

    A packed kernel's codes ``[in·bits/8, out]`` and scales/offsets/zero-points ``[groups, out]`` take the mesh axes
    of the float kernel's input dims on their first axis and of its output dims on their last (flattening keeps
    shards contiguous when the sharded dims lead). An axis stays replicated where that does not hold, where a shard
    would split a group or a block of 8 packed codes, and for a packed embedding (stored transposed).
    """
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from llmopt_jax.parallel.rules import tree_shardings

    def one(var, float_var, float_sharding):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        if is_packed(value) and not isinstance(value, PackedTensor):  # a codec's variable-length stream: replicated
            return float_sharding.replace(jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), value))
        if not isinstance(value, PackedTensor):
            return float_sharding
        lead = value.data.ndim - 2  # stacked layers
        dims = tuple(float_sharding.get_value().spec)
        dims += (None,) * (len(float_var.get_value().shape) - len(dims))
        if tuple(float_var.get_value().shape[lead:]) != value.shape:  # a packed embedding: [d, vocab] of [vocab, d]
            dims = (None,) * (lead + len(value.shape))
        kernel, n_in = dims[lead:], value.n_in
        groups, out = value.scale.shape[-2:]
        ins = _flattened_axes(kernel[:n_in], value.shape[:n_in])
        if ins is not None:
            ways = math.prod(mesh.shape[a] for a in ((ins,) if isinstance(ins, str) else ins))
            if (math.prod(value.shape[:n_in]) // 8) % ways or (groups > 1 and groups % ways):
                ins = None
        outs = _flattened_axes(kernel[n_in:], value.shape[n_in:])
        named = lambda *axes: NamedSharding(mesh, PartitionSpec(*dims[:lead], *axes))  # noqa: E731
        grouped = named(ins if groups > 1 else None, outs if out > 1 else None)
        return float_sharding.replace(dataclasses.replace(
            value, data=named(ins, outs), scale=grouped, offset=None if value.offset is None else grouped,
            zero=None if value.zero is None else grouped))

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(one, state, abstract, tree_shardings(abstract, mesh, rules), is_leaf=is_var)


def _flattened_axes(specs: tuple, sizes: tuple):
    """The mesh axes of kernel dims with ``specs`` once they are flattened into one (row-major): those of the
    only sharded dim when every dim before it has size 1 (then each shard stays contiguous), else None."""
    sharded = [i for i, spec in enumerate(specs) if spec is not None]
    if len(sharded) != 1 or any(size > 1 for size in sizes[: sharded[0]]):
        return None
    return specs[sharded[0]]


def block_linear_sizes(pure: dict) -> tuple[int, int]:
    """``(bytes held, weights stood for)`` by the decoder blocks' linear kernels in ``pure``: packed ones count
    their codes, scales and offsets or zero-points, float ones their dtype's width; ternary codec kernels their
    codewords, offsets and levels, plus each distinct codeword dictionary once."""
    flat = jax.tree_util.tree_flatten_with_path(pure["layers"], is_leaf=is_packed)[0]
    held = weights = 0
    dictionaries = {}
    for path, leaf in flat:
        if getattr(path[-1], "key", None) != "kernel":
            continue
        held += tree_bytes(leaf)
        if isinstance(leaf, PackedTensor):
            weights += int(np.size(leaf.data)) * 8 // leaf.bits
        elif is_packed(leaf):
            weights += leaf.num_weights
            if getattr(leaf, "dictionary", None) is not None:
                dictionaries[leaf.dictionary.digest] = leaf.dictionary.nbytes
        else:
            weights += int(np.size(leaf))
    return held + sum(dictionaries.values()), weights


def block_bits_per_weight(pure: dict) -> float:
    """Stored bits per weight of the decoder blocks' linear kernels (see :func:`block_linear_sizes`)."""
    held, weights = block_linear_sizes(pure)
    return 8.0 * held / weights
