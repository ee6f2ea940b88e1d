"""Sub-1-bit storage of ternary weights: QMoE's dictionary of 16-bit codewords, and a per-row rANS coder.

QMoE (Frantar & Alistarh, 2023) stores ternary expert weights (codes ``-1, 0, 1``, ~90 % zeros) in under one bit
each. Its format, which :class:`TernaryCodec` reproduces with our own code:

- the ternary symbols of each output row are read in parse units (QMoE: pairs, 9 values), and a row is parsed
  greedily (longest match) into entries of a dictionary of up to 2^16 runs; each entry is one 16-bit codeword
  (``uint16``). Parsing restarts at every row (or every ``block_rows`` rows), so rows decode independently;
- the dictionary is the set of the most probable unit sequences under a memoryless model of the units
  (best-first growth from the empty sequence: every prefix of an entry is an entry and every single unit is
  one, so any row parses). QMoE fixes the model at 88.5 % zeros and entries at 14 pairs
  (:func:`qmoe_dictionary`); :func:`build_dictionary` fits it to the data's unit frequencies (the
  variable-to-fixed code of Tunstall, 1967, in its "every node is a codeword" form), with entries up to 21 pairs
  by default (on SmolLM2's ternary MLP codes 0.725 bits per weight for the codewords vs 0.761 with 14 pairs;
  single symbols or triples do no better);
- per row: an int32 offset into the codeword stream (``offsets [rows + 1]``) and the two float16 levels
  ``(lo, hi)`` of the ternary grid (``compress/quantize.py``, ``QuantGrid(2, ternary=True)``).

The decoder holds the dictionary as ``uint32 [num_codes, W]``: the two-bit symbols of an entry (0 = zero,
1 = ``lo``, 2 = ``hi``), 14 per word from the low bits, and its length in symbols in 4-bit nibbles on top of the
words (QMoE's table packs 7 pairs and a length per word the same way). One dictionary serves a whole model, so
:func:`bits_per_param` counts it once per distinct dictionary, next to the codes, offsets and levels: every byte
the decoder needs. At 2^16 entries it is 768 KiB, which QMoE's 1.6 T parameters make negligible and SmolLM2's
80 M MLP weights do not (0.08 bits per weight); ``bits_per_param_without_dictionary`` reports the first regime.

A Tunstall dictionary reaches its best rate only when every row has the same statistics. Real ternary rows do
not (a row's zero fraction follows its largest weight), and one table for all costs 24 % over the order-0
entropy on SmolLM2 RTN-ternary codes and 43 % on GPTQ-ternary codes. :class:`TernaryANS` is the entropy coder
the issue allows instead: per row (or block of rows) one byte picks ``P(±1)`` on a log grid, and rANS (Duda,
2013; 32-bit state, 16-bit words, frequencies out of 2^16) codes the row at close to that model's entropy,
plus its 32-bit final state. It needs no table, and its decoder is a ``lax.scan`` over the columns
that runs every row's stream in lockstep (the per-row offsets say where each starts).

Encoding is host-side NumPy (deterministic: fixed tie-breaks, no hashing order). Decoding is XLA: for the
dictionary (:meth:`TernaryCodec.symbols`), a gather of each codeword's length, a prefix sum for where its run
starts, a scatter of one mark per run and a cumulative sum that tells every output position its codeword, then
a gather of the symbol from the dictionary; for rANS, the scan. Both types are pytrees with ``is_packed``, so
``compress/packed.py``'s ``packed_dot_general`` decodes them inside the jitted step and multiplies (decode,
then matmul); QMoE's CUDA kernel instead fuses decoding into a matrix-vector product.

Measured on SmolLM2-135M's 90 MLP matrices (``benchmarks/codec_rate.py``, ``docs/results/codec_rate_smollm2_cpu.json``),
bits per weight from the bytes held, everything counted: RTN ternary (89.5 % zeros, entropy 0.589) 0.898 with
the dictionary (0.819 without its table), 0.757 with per-row rANS, 0.721 with rANS over blocks of rows
(``block_rows=0``); GPTQ ternary with dampening 0.1 (87.0 % zeros, entropy 0.687: GPTQ makes SmolLM2's ternary
codes denser, not sparser) 1.153 / 1.074 / 0.959 / 0.922. On synthetic codes with 90 % zeros the dictionary's
codewords take 0.66 bits and rANS 0.61 (tests/test_codec.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmopt_jax.errors import ConfigError

SYMS_PER_WORD = 14  # a uint32 word: 14 two-bit symbols, and a 4-bit nibble of the entry's length on top
MAX_CODES = 2**16  # codewords are uint16
QMOE_ZERO_FRACTION = 0.885  # the zero probability QMoE's fixed dictionary assumes
QMOE_UNIT, QMOE_MAX_SYMBOLS = 2, 28  # QMoE parses pairs, up to 14 per entry (two words)
DEFAULT_UNIT, DEFAULT_MAX_SYMBOLS = 2, 42  # ours: pairs, up to 21 (three words): a lower rate at ~90 % zeros

# ternary code -> stored symbol: 0 -> 0, -1 (the level lo) -> 1, +1 (the level hi) -> 2, as in QMoE's table
_SYMBOL_OF_CODE = np.array([1, 0, 2], np.uint8)  # indexed by code + 1
_CODE_OF_SYMBOL = np.array([0, -1, 1], np.int8)


@dataclasses.dataclass(frozen=True, eq=False)
class TernaryDictionary:
    """The codeword dictionary (module docstring). Hashable by content, so it can be a static pytree field.

    ``words`` uint32 ``[num_codes, W]`` is what the decoder holds; ``child`` int32 ``[num_codes + 1, 3^unit]`` is
    the encoder's trie over parse units of ``unit`` symbols (row ``num_codes`` is the root; -1: no such entry),
    not held by a compressed model.
    """

    words: np.ndarray
    child: np.ndarray
    unit: int
    unit_probs: tuple[float, ...]
    digest: str

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other) -> bool:
        return isinstance(other, TernaryDictionary) and other.digest == self.digest

    @property
    def num_codes(self) -> int:
        return int(self.words.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the decoder holds (the ``words`` table)."""
        return int(self.words.nbytes)

    @property
    def lengths(self) -> np.ndarray:
        """Entry lengths in symbols, int32 ``[num_codes]``."""
        return _lengths(self.words)

    def table(self) -> jax.Array:
        """``words`` as one device array per process (one constant however many kernels decode with it)."""
        return _device_table(self)

    def entries(self) -> np.ndarray:
        """Every entry's ternary codes int8 ``[num_codes, 14·W]``, zero past each entry's length."""
        k = np.arange(SYMS_PER_WORD * self.words.shape[1])
        sym = (self.words[:, k // SYMS_PER_WORD] >> (2 * (k % SYMS_PER_WORD)).astype(np.uint32)) & 3
        return _CODE_OF_SYMBOL[sym]

    def entry(self, i: int) -> np.ndarray:
        """Ternary codes int8 ``[length]`` of entry ``i``."""
        k = np.arange(int(self.lengths[i]))
        return _CODE_OF_SYMBOL[(self.words[i, k // SYMS_PER_WORD] >> (2 * (k % SYMS_PER_WORD)).astype(np.uint32)) & 3]


def _lengths(words):
    """Entry lengths in symbols ``[num_codes]`` from the 4-bit nibbles on top of each word (NumPy or JAX)."""
    xp = np if isinstance(words, np.ndarray) else jnp
    nibbles = (words >> 28).astype(xp.int32) << (4 * xp.arange(words.shape[1], dtype=xp.int32))
    return nibbles.sum(axis=1).astype(xp.int32)


@functools.lru_cache(maxsize=8)
def _device_table(dictionary: TernaryDictionary) -> jax.Array:
    with jax.ensure_compile_time_eval():  # a concrete array even when first asked for inside a trace
        return jnp.asarray(dictionary.words)


def _unit_values(codes: np.ndarray, unit: int) -> np.ndarray:
    """Ternary codes int ``[R, cols]`` -> parse-unit values uint8 ``[R, ceil(cols/unit)]``, ``s0 + 3·s1 + ...``
    of each unit's symbols (a short last unit is padded with zero symbols)."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ConfigError(f"ternary codes must be -1, 0 or 1; got values in [{codes.min()}, {codes.max()}]")
    sym = _SYMBOL_OF_CODE[codes.astype(np.int64) + 1]
    pad = -sym.shape[-1] % unit
    if pad:
        sym = np.concatenate([sym, np.zeros(sym.shape[:-1] + (pad,), np.uint8)], axis=-1)
    return sum(sym[..., t::unit].astype(np.uint8) * 3**t for t in range(unit)).astype(np.uint8)


def unit_counts(codes_list: Iterable[Any], unit: int = DEFAULT_UNIT) -> np.ndarray:
    """Counts int64 ``[3^unit]`` of the parse-unit values of ternary code arrays ``[..., cols]``."""
    counts = np.zeros(3**unit, np.int64)
    for codes in codes_list:
        c = np.asarray(codes)
        counts += np.bincount(_unit_values(c.reshape(-1, c.shape[-1]), unit).ravel(), minlength=3**unit)
    return counts


def build_dictionary(
    codes_list: Iterable[Any] = (), *, counts: Any = None, zero_fraction: float | None = None,
    num_codes: int = MAX_CODES, unit: int = DEFAULT_UNIT, max_symbols: int = DEFAULT_MAX_SYMBOLS,
) -> TernaryDictionary:
    """The ``num_codes`` most probable sequences of parse units (``unit`` = 1: single symbols, 2: pairs as in
    QMoE) of up to ``max_symbols`` symbols, under a memoryless model of the units fitted to the ternary code
    arrays ``codes_list`` (or given as unit ``counts`` ``[3^unit]``, or as a ``zero_fraction`` with the rest split
    evenly between -1 and 1, QMoE's choice). Add-one smoothing keeps every unit possible. Equal inputs give an
    equal (and, within a process, the same) dictionary."""
    if unit not in (1, 2, 3, 4) or max_symbols % unit or not unit <= max_symbols <= 4 * SYMS_PER_WORD:
        raise ConfigError(f"unit must be 1 or 2 and max_symbols a multiple of it in [unit, {4 * SYMS_PER_WORD}], "
                          f"got {unit}, {max_symbols}")
    if not 3**unit <= num_codes <= MAX_CODES:
        raise ConfigError(f"num_codes must be in [{3**unit}, {MAX_CODES}], got {num_codes}")
    if zero_fraction is not None:
        if not 0 < zero_fraction < 1:
            raise ConfigError(f"zero_fraction must be in (0, 1), got {zero_fraction}")
        p = np.array([zero_fraction, (1 - zero_fraction) / 2, (1 - zero_fraction) / 2])
        probs = p if unit == 1 else np.outer(p, p).ravel()  # symmetric: s0 + 3·s1 indexes [s1, s0]
    else:
        c = unit_counts(codes_list, unit) if counts is None else np.asarray(counts, np.float64)
        if c.shape != (3**unit,):
            raise ConfigError(f"unit counts must have shape ({3**unit},), got {c.shape}")
        probs = (c + 1.0) / (c.sum() + 3**unit)
    return _build(tuple(float(x) for x in probs), int(num_codes), int(unit), int(max_symbols))


def qmoe_dictionary(zero_fraction: float = QMOE_ZERO_FRACTION) -> TernaryDictionary:
    """QMoE's fixed dictionary: i.i.d. ternary symbols with ``zero_fraction`` zeros, 2^16 entries of 1..14
    pairs."""
    return build_dictionary(zero_fraction=zero_fraction, unit=QMOE_UNIT, max_symbols=QMOE_MAX_SYMBOLS)


@functools.lru_cache(maxsize=16)
def _build(unit_probs: tuple[float, ...], num_codes: int, unit: int, max_symbols: int) -> TernaryDictionary:
    logp = np.log(np.asarray(unit_probs, np.float64))
    arity = len(unit_probs)
    # Grow the tree level by level, keeping only nodes that can still be among the num_codes most probable: a
    # node's log-probability is below its parent's, so one under the num_codes-th best seen so far (a bound that
    # only rises) is out, and so are its descendants.
    lp_levels, parent_levels, value_levels = [], [], []
    front_lp, front_id = np.zeros(1), np.array([-1])
    seen = np.zeros(0)
    start = 0
    for level in range(1, max_symbols // unit + 1):
        lp = (front_lp[:, None] + logp[None, :]).ravel()
        lp_levels.append(lp)
        parent_levels.append(np.repeat(front_id, arity))
        value_levels.append(np.tile(np.arange(arity), len(front_id)))
        seen = np.concatenate([seen, lp])
        bound = np.partition(seen, len(seen) - num_codes)[len(seen) - num_codes] if len(seen) > num_codes else -np.inf
        seen = seen[seen >= bound]
        keep = lp >= bound
        front_lp, front_id = lp[keep], start + np.flatnonzero(keep)
        start += len(lp)
        if not len(front_lp):
            break
    lp = np.concatenate(lp_levels)
    parent = np.concatenate(parent_levels)
    value = np.concatenate(value_levels)
    level = np.concatenate([np.full(len(a), i + 1) for i, a in enumerate(lp_levels)])
    # Rank: the single units first (any row must parse), then by probability; ties by generation order, which
    # is deterministic. A parent is strictly more probable than its child, so the chosen set is prefix-closed.
    key = np.where(level == 1, np.inf, lp)
    order = np.lexsort((np.arange(len(lp)), -key))[:num_codes]
    sel = np.full(len(lp), -1, np.int64)
    sel[order] = np.arange(len(order))
    n = len(order)
    nwords = -(-int(level[order].max()) * unit // SYMS_PER_WORD)
    words = np.zeros((n, nwords), np.uint32)
    child = np.full((n + 1, arity), -1, np.int32)
    p_sel = np.where(parent[order] < 0, n, sel[np.maximum(parent[order], 0)])  # parent's index (root: n)
    lvl, val = level[order], value[order]
    for depth in range(1, int(lvl.max()) + 1):  # parents first: their words are complete when a child reads them
        idx = np.flatnonzero(lvl == depth)
        par = p_sel[idx]
        base = np.where((par == n)[:, None], 0, words[np.minimum(par, n - 1)]).astype(np.uint32)
        base &= np.uint32(0x0FFFFFFF)  # drop the parent's length
        v = val[idx].astype(np.uint32)
        for t in range(unit):  # this unit's symbols: (depth - 1)·unit + t
            k = (depth - 1) * unit + t
            base[:, k // SYMS_PER_WORD] |= ((v // 3**t) % 3) << np.uint32(2 * (k % SYMS_PER_WORD))
        length = depth * unit
        for i in range(nwords):  # the length in symbols, 4 bits on top of each word (low nibble first)
            base[:, i] |= np.uint32((length >> (4 * i)) & 15) << np.uint32(28)
        words[idx] = base
        child[par, val[idx]] = idx
    digest = hashlib.sha256(words.tobytes() + bytes([unit])).hexdigest()[:32]
    words.setflags(write=False)
    child.setflags(write=False)
    return TernaryDictionary(words, child, unit, unit_probs, digest)


def _parse_rows(units: np.ndarray, child: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy longest-match parse of every row of ``units`` uint8 ``[R, P]`` (all rows at once, one unit column
    per step) -> (codewords int32 ``[R, P]``, left-aligned; count int64 ``[R]``)."""
    r, p = units.shape
    root = child.shape[0] - 1
    out = np.zeros((r, p), np.int32)
    count = np.zeros(r, np.int64)
    rows = np.arange(r)
    if p == 0:
        return out, count
    node = child[root, units[:, 0]].astype(np.int64)
    for i in range(1, p):
        nxt = child[node, units[:, i]]
        emit = nxt < 0
        e = rows[emit]
        out[e, count[e]] = node[emit]
        count[e] += 1
        node = np.where(emit, child[root, units[:, i]], nxt)
    out[rows, count] = node
    count += 1
    return out, count


class _TernaryMatrix:
    """What both codecs share once a subclass's ``_sym()`` decodes its symbols int32 ``[..., rows, cols]`` in
    {0, 1, 2} (0, ``lo``, ``hi``): symbols, the ternary matrix and the float kernel it stands for."""

    is_packed = True  # the model hands it to its dot_general, quantizers refuse it

    @property
    def dtype(self):
        return jnp.uint16

    @property
    def num_weights(self) -> int:
        """Weights stood for (all matrices of a stack)."""
        return int(np.prod(self.codes.shape[:-1], dtype=np.int64)) * self.rows * self.cols

    def symbols(self) -> jax.Array:
        """Decoded ternary codes int8 ``[..., rows, cols]`` in ``{-1, 0, 1}`` (jittable)."""
        sym = self._sym()
        return jnp.where(sym == 2, 1, -(sym == 1).astype(jnp.int32)).astype(jnp.int8)  # 0, 1, 2 -> 0, -1, 1

    def matrix(self, dtype=jnp.float32) -> jax.Array:
        """The ternary weights ``[..., rows, cols]`` in ``dtype`` (levels per row)."""
        sym = self._sym()
        lv = self.levels.astype(jnp.float32)
        w = jnp.where(sym == 2, lv[..., 1:2], jnp.where(sym == 1, lv[..., 0:1], 0.0))
        return w.astype(dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float kernel ``[..., *shape]`` in ``dtype`` (the transposed :meth:`matrix`)."""
        w = self.matrix(dtype)
        lead = w.shape[:-2]
        return jnp.swapaxes(w, -1, -2).reshape(lead + tuple(self.shape))


@struct.dataclass
class TernaryCodec(_TernaryMatrix):
    """A ternary matrix ``[rows = outputs, cols = inputs]`` (optionally stacked: leading axes on every array)
    compressed by the dictionary code, standing for a float kernel of ``shape`` (one matrix; its first ``n_in``
    dims are inputs, like :class:`~llmopt_jax.compress.packed.PackedTensor`).

    ``codes`` uint16 ``[..., n]`` (each matrix's codewords row after row, zero-padded to the longest matrix of a
    stack), ``offsets`` int32 ``[..., rows + 1]`` (row ``r``'s codewords are ``codes[offsets[r]:offsets[r+1]]``),
    ``levels`` float16 ``[..., rows, 2]`` (``lo``, ``hi``)."""

    codes: jax.Array
    offsets: jax.Array
    levels: jax.Array
    dictionary: TernaryDictionary = struct.field(pytree_node=False)
    rows: int = struct.field(pytree_node=False)
    cols: int = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    n_in: int = struct.field(pytree_node=False)
    block_rows: int = struct.field(pytree_node=False, default=1)  # rows per stream (offsets per block of rows)

    def _sym(self) -> jax.Array:
        sym = _decode(self.codes, self.offsets, self.dictionary.table(), self.rows // self.block_rows,
                      self.cols * self.block_rows, self.dictionary.unit)
        return sym.reshape(self.codes.shape[:-1] + (self.rows, self.cols))


@functools.partial(jax.jit, static_argnames=("rows", "cols", "unit"))
def _decode(codes: jax.Array, offsets: jax.Array, words: jax.Array, rows: int, cols: int, unit: int) -> jax.Array:
    """:func:`_decode_symbols` over any leading (stacked) axes; jitted, so eager calls compile once per shape."""
    fn = functools.partial(_decode_symbols, words=words, rows=rows, cols=cols, unit=unit)
    for _ in range(codes.ndim - 1):
        fn = jax.vmap(fn)
    return fn(codes, offsets)


def _decode_symbols(codes: jax.Array, offsets: jax.Array, *, words: jax.Array, rows: int, cols: int,
                    unit: int) -> jax.Array:
    """One matrix: codewords uint16 ``[n]`` -> symbols int32 ``[rows, cols]`` in {0, 1, 2} (0, lo, hi)."""
    width = -(-cols // unit) * unit  # a row's symbols with the padding of its last unit
    total = rows * width
    c = codes.astype(jnp.int32)
    nwords = words.shape[1]
    flat = words.reshape(-1)
    used = jnp.arange(c.shape[0], dtype=jnp.int32) < offsets[-1]  # a stack pads the shorter matrices
    length = jnp.where(used, _lengths(words)[c], 0)
    start = jnp.cumsum(length) - length  # rows concatenate exactly: each decodes to `width` symbols
    mark = jnp.zeros(total, jnp.int32).at[start].add(1, mode="drop")  # padding starts at `total`: dropped
    which = jnp.cumsum(mark) - 1  # the codeword each output position comes from
    k = jnp.arange(total, dtype=jnp.int32) - start[which]
    word = flat[nwords * c[which] + k // SYMS_PER_WORD]
    sym = (word >> (2 * (k % SYMS_PER_WORD)).astype(jnp.uint32)) & 3
    return sym.astype(jnp.int32).reshape(rows, width)[:, :cols]


MIN_STREAM_SYMBOLS = 1024  # block_rows=0 (auto): the fewest rows per stream that give a stream this long


def auto_block_rows(rows: int, cols: int, min_symbols: int = MIN_STREAM_SYMBOLS) -> int:
    """The smallest divisor ``b`` of ``rows`` with ``b·cols >= min_symbols`` (``rows`` if none): rows per stream
    that keep the per-stream costs (offset, rANS state and model byte, the last codeword) small next to the
    stream, e.g. for an expert's short rows."""
    return next((b for b in range(1, rows + 1) if rows % b == 0 and b * cols >= min_symbols), rows)


def _prepare(codes, lo, hi, kernel_shape, n_in, block_rows, stream_symbols=MIN_STREAM_SYMBOLS):
    """Checks; ``(lead, rows, cols, b, lo, hi, kernel_shape, streams [M, rows/b, b·cols])``."""
    codes = np.asarray(codes)
    if codes.ndim < 2:
        raise ConfigError(f"expected ternary codes [..., rows, cols], got shape {codes.shape}")
    *lead, rows, cols = codes.shape
    lo, hi = (np.broadcast_to(np.asarray(a, np.float32), (*lead, rows)) for a in (lo, hi))
    kernel_shape = tuple(kernel_shape or (cols, rows))
    if math.prod(kernel_shape[:n_in]) != cols or math.prod(kernel_shape[n_in:]) != rows:
        raise ConfigError(f"kernel shape {kernel_shape} (n_in={n_in}) does not hold a [{rows}, {cols}] matrix")
    b = auto_block_rows(rows, cols, stream_symbols) if block_rows == 0 else int(block_rows)
    if b < 1 or rows % b:
        raise ConfigError(f"block_rows must divide the {rows} rows (or be 0 = auto), got {block_rows}")
    return lead, rows, cols, b, lo, hi, kernel_shape, codes.reshape(-1, rows // b, b * cols)


def encode_ternary(
    codes: Any, lo: Any, hi: Any, dictionary: TernaryDictionary | None = None, *,
    kernel_shape: tuple[int, ...] | None = None, n_in: int = 1, block_rows: int = 1,
    stream_symbols: int = MIN_STREAM_SYMBOLS,
) -> TernaryCodec:
    """Compresses ternary ``codes`` int ``[..., rows, cols]`` in {-1, 0, 1} with per-row levels ``lo``/``hi``
    float ``[..., rows]`` (stored as float16; value of -1 and +1). ``dictionary`` default: one fitted to these
    codes (:func:`build_dictionary`). ``kernel_shape`` (default ``(cols, rows)``) is the float kernel's shape
    with ``n_in`` leading input dims. ``block_rows`` rows share one stream and offset (1: per row, as QMoE; 0:
    :func:`auto_block_rows` with streams of at least ``stream_symbols``). Deterministic; host-side NumPy."""
    lead, rows_, cols_, b, lo, hi, kernel_shape, streams = _prepare(codes, lo, hi, kernel_shape, n_in, block_rows,
                                                                    stream_symbols)
    if dictionary is None:
        dictionary = build_dictionary([streams])
    rows, cols = streams.shape[1:]
    words, count = _parse_rows(_unit_values(streams.reshape(-1, cols), dictionary.unit), dictionary.child)
    count = count.reshape(-1, rows)
    offsets = np.zeros((count.shape[0], rows + 1), np.int64)
    offsets[:, 1:] = np.cumsum(count, axis=1)
    n = max(int(offsets[:, -1].max()), 1)
    if n >= 2**31:
        raise ConfigError(f"a matrix of {rows}x{cols} needs {n} codewords: more than int32 offsets address")
    stream = np.zeros((count.shape[0], n), np.uint16)
    words = words.reshape(count.shape[0], rows, -1)
    for m in range(count.shape[0]):  # each matrix's rows, concatenated (a Python loop over matrices, not rows)
        keep = np.arange(words.shape[2])[None, :] < count[m][:, None]
        flat = words[m][keep]
        stream[m, : flat.size] = flat
    levels = np.stack([lo, hi], axis=-1).astype(np.float16)
    return TernaryCodec(
        jnp.asarray(stream.reshape(*lead, n)), jnp.asarray(offsets.reshape(*lead, rows + 1).astype(np.int32)),
        jnp.asarray(levels), dictionary, rows_, cols_, kernel_shape, int(n_in), b)


def decode_ternary(tc: TernaryCodec) -> np.ndarray:
    """Ternary codes int8 ``[..., rows, cols]`` of ``tc`` (the XLA decoder, run eagerly)."""
    return np.asarray(tc.symbols())


CODECS = ("ans", "dictionary")


def encode_matrix(qm, kernel_shape: tuple[int, ...] | None = None, n_in: int = 1,
                  dictionary: TernaryDictionary | None = None, *, codec: str = "dictionary", block_rows: int = 1,
                  stream_symbols: int = MIN_STREAM_SYMBOLS):
    """A :class:`~llmopt_jax.compress.quantize.QuantizedMatrix` on a ternary grid with one pair of levels per row
    (per channel or per tensor; ``[rows, cols]`` or stacked ``[layers, rows, cols]``) coded by ``codec``:
    ``"dictionary"`` (:func:`encode_ternary`, QMoE's scheme) or ``"ans"`` (:func:`encode_ternary_ans`)."""
    if codec not in CODECS:
        raise ConfigError(f"ternary codec must be one of {CODECS}, got {codec!r}")
    grid = qm.grid
    if not getattr(grid, "ternary", False):
        raise ConfigError(f"the codec stores ternary grids, got {grid.describe()}")
    if grid.group_size > 0 and grid.group_size != qm.codes.shape[-1]:
        raise ConfigError("the codec keeps one pair of levels per row: quantize ternary per channel "
                          f"(group_size -1), not groups of {grid.group_size}")
    scale, offset = np.asarray(qm.scale)[..., 0], np.asarray(qm.offset)[..., 0]  # [..., rows or 1]: hi, lo
    if codec == "ans":
        return encode_ternary_ans(np.asarray(qm.codes), offset, scale, kernel_shape=kernel_shape, n_in=n_in,
                                  block_rows=block_rows, stream_symbols=stream_symbols)
    return encode_ternary(np.asarray(qm.codes), offset, scale, dictionary, kernel_shape=kernel_shape, n_in=n_in,
                          block_rows=block_rows, stream_symbols=stream_symbols)


# ----------------------------------------------------------------------------------------------------------
# Per-row rANS: an entropy coder that reaches each row's own entropy (module docstring).

ANS_BITS = 16  # frequencies sum to 2^16; state in [2^16, 2^32); 16-bit words in and out
_ANS_L = 1 << ANS_BITS
# Per-row frequencies of -1 and of +1 (out of 2^16) on a log grid of 256 steps of 2^(1/16): a byte each per row.
ANS_FREQ = np.maximum(1, np.round(32767 * 2.0 ** (-(255 - np.arange(256)) / 16))).astype(np.int64)


@struct.dataclass
class TernaryANS(_TernaryMatrix):
    """A ternary matrix ``[rows, cols]`` (optionally stacked) coded row by row with rANS (Duda, 2013) under a
    per-row model ``P(-1) = f₋/2^16``, ``P(+1) = f₊/2^16``, ``P(0)`` the rest
    (``f± = ANS_FREQ[freq[..., 0 or 1]]``, two bytes per row: an asymmetric grid's rows can have many more of one
    sign).

    ``codes`` uint16 ``[..., n]`` (each row's stream: its final 32-bit state, then the words the encoder
    emitted, last first; rows one after the other), ``offsets`` int32 ``[..., rows + 1]``, ``freq`` uint8
    ``[..., rows, 2]``, ``levels`` float16 ``[..., rows, 2]`` (``lo``, ``hi``). Same interface as
    :class:`TernaryCodec`."""

    codes: jax.Array
    offsets: jax.Array
    freq: jax.Array
    levels: jax.Array
    rows: int = struct.field(pytree_node=False)
    cols: int = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    n_in: int = struct.field(pytree_node=False)
    block_rows: int = struct.field(pytree_node=False, default=1)

    dictionary = None

    def _sym(self) -> jax.Array:
        sym = _ans_decode(self.codes, self.offsets, self.freq, self.cols * self.block_rows)
        return sym.reshape(self.codes.shape[:-1] + (self.rows, self.cols))


def _ans_row_freq(sym: np.ndarray) -> np.ndarray:
    """Per row of symbols uint8 ``[R, cols]`` (0, 1 = -1, 2 = +1) the indices uint8 ``[R, 2]`` into
    :data:`ANS_FREQ` nearest (in log scale) to the row's frequencies of -1 and +1; an absent sign gets the
    smallest."""
    idx = []
    for v in (1, 2):
        n = (sym == v).sum(axis=1, dtype=np.int64)
        f = np.maximum(n * (_ANS_L / sym.shape[1]), 0.5)
        idx.append(np.clip(np.round(255 + 16 * np.log2(f / 32767)), 0, 255))
    return np.stack(idx, axis=1).astype(np.uint8)


def encode_ternary_ans(codes: Any, lo: Any, hi: Any, *, kernel_shape: tuple[int, ...] | None = None,
                       n_in: int = 1, block_rows: int = 1, stream_symbols: int = MIN_STREAM_SYMBOLS) -> TernaryANS:
    """Like :func:`encode_ternary`, with per-row (per ``block_rows`` rows) rANS instead of the dictionary: no
    shared table, one model byte per stream. Host-side NumPy, all streams at once, deterministic."""
    lead, rows_, cols_, b, lo, hi, kernel_shape, streams = _prepare(codes, lo, hi, kernel_shape, n_in, block_rows,
                                                                    stream_symbols)
    rows, cols = streams.shape[1:]
    sym = _unit_values(streams.reshape(-1, cols), 1)
    r = sym.shape[0]
    freq = _ans_row_freq(sym)
    f1, f2 = ANS_FREQ[freq[:, 0]].astype(np.uint64), ANS_FREQ[freq[:, 1]].astype(np.uint64)
    f0 = np.uint64(_ANS_L) - f1 - f2
    fs_of = np.stack([f0, f1, f2], 1)
    cs_of = np.stack([np.zeros_like(f0), f0, f0 + f1], 1)
    x = np.full(r, _ANS_L, np.uint64)
    emitted = np.zeros((r, cols), np.uint16)
    count = np.zeros(r, np.int64)
    idx = np.arange(r)
    for j in range(cols - 1, -1, -1):  # rANS codes backwards so that the decoder reads forwards
        s = sym[:, j]
        fs, cs = fs_of[idx, s], cs_of[idx, s]
        emit = x >= (fs << np.uint64(ANS_BITS))
        e = idx[emit]
        emitted[e, count[e]] = (x[emit] & np.uint64(0xFFFF)).astype(np.uint16)
        count[e] += 1
        x = np.where(emit, x >> np.uint64(16), x)
        x = ((x // fs) << np.uint64(ANS_BITS)) + x % fs + cs
    lengths = (count + 2).reshape(-1, rows)
    offsets = np.zeros((lengths.shape[0], rows + 1), np.int64)
    offsets[:, 1:] = np.cumsum(lengths, axis=1)
    n = max(int(offsets[:, -1].max()), 1)
    if n >= 2**31:
        raise ConfigError(f"a matrix of {rows}x{cols} needs {n} words: more than int32 offsets address")
    stream = np.zeros((lengths.shape[0], n), np.uint16)
    head = np.stack([(x >> np.uint64(16)), x & np.uint64(0xFFFF)], 1).astype(np.uint16)
    # Row i: its state, then its emitted words last first.
    rev = np.where(np.arange(cols)[None, :] < count[:, None],
                   np.take_along_axis(emitted, np.maximum(count[:, None] - 1 - np.arange(cols)[None, :], 0), 1), 0)
    body = np.concatenate([head, rev], axis=1).reshape(-1, rows, cols + 2)
    for m in range(body.shape[0]):
        keep = np.arange(cols + 2)[None, :] < lengths[m][:, None]
        flat = body[m][keep]
        stream[m, : flat.size] = flat
    levels = np.stack([lo, hi], axis=-1).astype(np.float16)
    return TernaryANS(jnp.asarray(stream.reshape(*lead, n)),
                      jnp.asarray(offsets.reshape(*lead, rows + 1).astype(np.int32)),
                      jnp.asarray(freq.reshape(*lead, rows, 2)), jnp.asarray(levels), rows_, cols_, kernel_shape,
                      int(n_in), b)


@functools.partial(jax.jit, static_argnames=("cols",))
def _ans_decode(codes: jax.Array, offsets: jax.Array, freq: jax.Array, cols: int) -> jax.Array:
    """Symbols int32 ``[..., rows, cols]`` in {0, 1, 2}: every row's rANS decoder run in lockstep, one column per
    step of a scan (rows are independent streams, found by their offsets)."""
    def one(codes, offsets, freq):
        words = codes.astype(jnp.uint32)
        last = codes.shape[0] - 1
        table = jnp.asarray(ANS_FREQ, jnp.uint32)
        f1, f2 = table[freq[:, 0].astype(jnp.int32)], table[freq[:, 1].astype(jnp.int32)]
        f0 = jnp.uint32(_ANS_L) - f1 - f2
        start = offsets[:-1]
        x = (words[start] << 16) | words[jnp.minimum(start + 1, last)]

        def step(carry, _):
            x, ptr = carry
            slot = x & jnp.uint32(0xFFFF)
            s = (slot >= f0).astype(jnp.int32) + (slot >= f0 + f1).astype(jnp.int32)
            fs = jnp.where(s == 0, f0, jnp.where(s == 1, f1, f2))
            cs = jnp.where(s == 0, 0, jnp.where(s == 1, f0, f0 + f1)).astype(jnp.uint32)
            x = fs * (x >> 16) + (slot - cs)
            need = x < jnp.uint32(_ANS_L)
            x = jnp.where(need, (x << 16) | words[jnp.minimum(ptr, last)], x)
            return (x, ptr + need.astype(jnp.int32)), s

        _, sym = jax.lax.scan(step, (x, start + 2), None, length=cols)
        return sym.T

    fn = one
    for _ in range(codes.ndim - 1):
        fn = jax.vmap(fn)
    return fn(codes, offsets, freq)


def codec_leaves(tree: Any) -> list:
    """The :class:`TernaryCodec` and :class:`TernaryANS` leaves of a pytree (or ``[tree]`` if it is one)."""
    is_codec = lambda x: isinstance(x, (TernaryCodec, TernaryANS))  # noqa: E731
    return [x for x in jax.tree.leaves(tree, is_leaf=is_codec) if is_codec(x)]


def bits_per_param(tree: Any) -> dict[str, float]:
    """Storage of the codec leaves (:class:`TernaryCodec`, :class:`TernaryANS`) of ``tree`` measured from the
    arrays held: bytes of ``codes``, ``offsets``, ``levels``, rANS's per-row ``freq`` and each distinct dictionary
    once, the weights they stand for, ``bits_per_param`` (all of it), ``bits_per_param_codes`` (the code stream
    only) and ``bits_per_param_without_dictionary`` (what a model large enough to make the shared table
    negligible would pay, QMoE's regime)."""
    leaves = codec_leaves(tree)
    if not leaves:
        raise ConfigError("no TernaryCodec or TernaryANS in this tree")
    nbytes = lambda a: int(np.prod(a.shape, dtype=np.int64)) * jnp.dtype(a.dtype).itemsize  # noqa: E731
    codes = sum(nbytes(x.codes) for x in leaves)
    offsets = sum(nbytes(x.offsets) for x in leaves)
    levels = sum(nbytes(x.levels) for x in leaves)
    side = sum(nbytes(x.freq) for x in leaves if isinstance(x, TernaryANS))
    dicts = {x.dictionary.digest: x.dictionary.nbytes for x in leaves if x.dictionary is not None}
    weights = sum(x.num_weights for x in leaves)
    total = codes + offsets + levels + side + sum(dicts.values())
    return {
        "bits_per_param": 8.0 * total / weights, "bits_per_param_codes": 8.0 * codes / weights,
        "bits_per_param_without_dictionary": 8.0 * (total - sum(dicts.values())) / weights,
        "bytes_total": total, "bytes_codes": codes, "bytes_offsets": offsets, "bytes_levels": levels,
        "bytes_row_freq": side, "bytes_dictionary": sum(dicts.values()), "num_dictionaries": len(dicts),
        "num_params": weights,
    }


def ternary_stats(codes: Any) -> dict[str, float]:
    """Empirical statistics of ternary codes (an array ``[..., cols]``, or a list of them): ``zero_fraction``,
    ``entropy_bits`` (order-0 entropy per symbol, the rate of an ideal memoryless coder) and ``pair_entropy_bits``
    (per symbol, of the pairs the codec reads), and ``num_params``."""
    arrays = codes if isinstance(codes, (list, tuple)) else [codes]
    sym = np.zeros(3, np.int64)
    for c in arrays:
        sym += np.bincount(np.asarray(c).astype(np.int64).ravel() + 1, minlength=3)[:3]
    pairs = unit_counts(arrays, 2)
    entropy = lambda n: float(-(n[n > 0] / n.sum() * np.log2(n[n > 0] / n.sum())).sum())  # noqa: E731
    return {"zero_fraction": float(sym[1] / sym.sum()), "entropy_bits": entropy(sym),
            "pair_entropy_bits": entropy(pairs) / 2, "num_params": int(sym.sum())}


def records_dictionary(quantized: Any, **kwargs) -> TernaryDictionary | None:
    """One dictionary fitted to every ternary :class:`~llmopt_jax.compress.quantize.QuantizedMatrix` in a
    ``report["quantized"]`` tree (None if there is none): one table for a whole model, as QMoE holds."""
    from llmopt_jax.compress.quantize import QuantizedMatrix

    is_qm = lambda x: isinstance(x, QuantizedMatrix)  # noqa: E731
    codes = [np.asarray(x.codes) for x in jax.tree.leaves(quantized, is_leaf=is_qm) if is_qm(x) and x.grid.ternary]
    return build_dictionary(codes, **kwargs) if codes else None


def benchmark_decode_matmul(
    rows: int = 3072, cols: int = 768, tokens: int = 1, zero_fraction: float = 0.9, repeats: int = 20,
    dtype=jnp.bfloat16, seed: int = 0, codec: str = "dictionary",
) -> dict[str, Any]:
    """Median seconds of a jitted ``x [tokens, cols] @ W.T`` three ways on the default backend: the dense
    ``dtype`` matmul, decode-only (codes -> ``dtype`` weights) and decode-then-matmul, for random ternary
    ``W [rows, cols]`` with ``zero_fraction`` zeros coded by ``codec`` (``"dictionary"`` or ``"ans"``, per row).
    Also the codec's bits per parameter without the dictionary (shared by a whole model)."""
    if codec not in CODECS:
        raise ConfigError(f"ternary codec must be one of {CODECS}, got {codec!r}")
    rng = np.random.default_rng(seed)
    codes = rng.choice(np.array([0, -1, 1], np.int8), size=(rows, cols),
                       p=[zero_fraction, (1 - zero_fraction) / 2, (1 - zero_fraction) / 2])
    lo, hi = -rng.uniform(0.01, 0.1, rows), rng.uniform(0.01, 0.1, rows)
    tc = (encode_ternary(codes, lo, hi, build_dictionary([codes])) if codec == "dictionary"
          else encode_ternary_ans(codes, lo, hi))
    dense = jnp.asarray(np.asarray(tc.matrix(jnp.float32)), dtype)
    x = jnp.asarray(rng.standard_normal((tokens, cols)), dtype)

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    mm = lambda x, w: jnp.matmul(x, w.T, preferred_element_type=jnp.float32)  # noqa: E731
    t_dense = timed(jax.jit(mm), x, dense)
    t_decode = timed(jax.jit(lambda t: t.matrix(dtype)), tc)
    t_both = timed(jax.jit(lambda x, t: mm(x, t.matrix(dtype))), x, tc)
    return {
        "codec": codec, "backend": jax.default_backend(), "rows": rows, "cols": cols, "tokens": tokens,
        "dtype": jnp.dtype(dtype).name, "zero_fraction": zero_fraction, "seconds_dense_matmul": t_dense,
        "seconds_decode": t_decode, "seconds_decode_matmul": t_both, "slowdown": t_both / t_dense,
        "bits_per_param_without_dictionary": bits_per_param(tc)["bits_per_param_without_dictionary"],
    }
