"""QMoE's ternary grid (RTN and GPTQ) and the sub-1-bit codecs (QMoE's dictionary, per-row rANS): the qmoe
repository's rounding rule, a prefix-closed deterministic dictionary, bit-exact decoding, the rate at QMoE-like
zero fractions, and a model running from the compressed bytes equal to the dequantized model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_CFG
from llmopt_jax.compress import codec
from llmopt_jax.compress.calibrate import KERNEL_INPUT_DIMS, kernel_to_matrix
from llmopt_jax.compress.packed import block_linear_sizes, pack_params, packed_dot_general, packed_model
from llmopt_jax.compress.quantize import QuantGrid, QuantizedMatrix, gptq_quantize, rtn_quantize
from llmopt_jax.errors import ConfigError
from llmopt_jax.parallel.sharded_init import init_model, load_params

TERNARY = QuantGrid(2, ternary=True)


def qmoe_reference(w: np.ndarray, sym: bool = False) -> np.ndarray:
    """The qmoe repository's ternary quantizer (``find_params`` + ``quantize`` with ``maxq < 0``), in NumPy, with
    the levels rounded to float16 first as our grids store them."""
    lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    if sym:
        hi = np.maximum(-lo, hi)
        lo = np.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = np.where(empty, -1, lo), np.where(empty, 1, hi)
    lo, hi = (a.astype(np.float16).astype(np.float32)[:, None] for a in (lo, hi))
    return (w > hi / 2) * hi + (w < lo / 2) * lo


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_ternary_is_qmoes_rule(sym):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 40)).astype(np.float32)
    w[1] = 0.0  # an all-zero row gets levels -1 / 1 and stays 0
    w[2] = np.abs(w[2])  # no negative weight: lo = 0
    w[3, :] = np.linspace(-1, 1, 40)
    w[3, 5] = -0.5  # exactly lo/2: not below it (strict), so 0
    w_hat, qm = rtn_quantize(jnp.asarray(w), QuantGrid(2, symmetric=sym, ternary=True))
    np.testing.assert_array_equal(np.asarray(w_hat), qmoe_reference(w, sym))
    assert qm.codes.dtype == jnp.int8 and set(np.unique(np.asarray(qm.codes))) <= {-1, 0, 1}
    assert np.asarray(w_hat)[3, 5] == 0 and np.all(np.asarray(w_hat)[1] == 0)
    np.testing.assert_array_equal(np.asarray(qm.zero), 0)  # code 0 is the value 0 (pruned weights stay 0)


def test_ternary_grid_options_and_existing_grids_unchanged():
    assert TERNARY.levels == (-1, 1) and TERNARY.zero_exact and not TERNARY.integer_zero
    assert TERNARY.storage_bits(4, 8) == 4 * 8 * 2 + 4 * 32 and "ternary" in TERNARY.describe()
    with pytest.raises(ConfigError, match="bits=2"):
        QuantGrid(4, ternary=True)
    assert QuantGrid(2).levels == (0, 3) and QuantGrid(2).code_dtype == jnp.uint8  # the 2-bit grid as before
    w = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    w_hat, qm = rtn_quantize(jnp.asarray(w), QuantGrid(2))
    np.testing.assert_array_equal(np.asarray(w_hat), np.asarray(qm.scale * (qm.codes - qm.zero)))


def test_gptq_ternary_uses_the_grid_and_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((512, 32)) @ rng.standard_normal((32, 64))  # correlated inputs
    w = rng.standard_normal((24, 64)).astype(np.float32)
    h = jnp.asarray(2 * x.T @ x / len(x), jnp.float32)
    w_g, qm = gptq_quantize(jnp.asarray(w), h, TERNARY, damp_fraction=0.1, blocksize=16)
    w_r, _ = rtn_quantize(jnp.asarray(w), TERNARY)
    levels = np.stack([np.asarray(qm.offset)[:, 0], np.zeros(24), np.asarray(qm.scale)[:, 0]], 1)
    np.testing.assert_array_equal(np.asarray(w_g), np.take_along_axis(levels, np.asarray(qm.codes) + 1, 1))
    err = lambda v: float(np.sum(((np.asarray(v) - w) @ x.T) ** 2))  # noqa: E731
    assert err(w_g) < 0.7 * err(w_r)


@pytest.mark.parametrize("unit, max_symbols", [(2, 28), (2, 42), (1, 14)])
def test_dictionary_is_prefix_closed_deterministic_and_has_every_unit(unit, max_symbols):
    d = codec.build_dictionary(zero_fraction=0.9, unit=unit, max_symbols=max_symbols)
    words = -(-max_symbols // codec.SYMS_PER_WORD)
    assert d.num_codes == 2**16 and d.words.shape == (2**16, words) and d.nbytes == 2**16 * 4 * words
    assert d is codec.build_dictionary(zero_fraction=0.9, unit=unit, max_symbols=max_symbols)  # cached
    lengths, entries = d.lengths, d.entries()
    known = {(n, e[:n].tobytes()) for n, e in zip(lengths, entries)}
    assert lengths.min() == unit and lengths.max() == max_symbols and len(known) == d.num_codes  # distinct
    assert np.all(lengths % unit == 0)
    assert all((n - unit, e[: n - unit].tobytes()) in known for n, e in zip(lengths, entries) if n > unit)  # prefixes
    singles = {tuple(e[:unit]) for n, e in zip(lengths, entries) if n == unit}
    assert len(singles) == 3**unit  # every unit is an entry: any row parses
    np.testing.assert_array_equal(d.entry(int(np.argmax(lengths))), np.zeros(max_symbols))  # the longest: zeros
    small = codec._build.__wrapped__(d.unit_probs, 4096, unit, max_symbols)  # rebuilt from scratch: equal bytes
    np.testing.assert_array_equal(small.words, codec._build.__wrapped__(d.unit_probs, 4096, unit, max_symbols).words)


@pytest.mark.parametrize("shape, unit", [((2, 7, 33), 2), ((3, 1), 2), ((5, 9), 3)],
                         ids=["stacked_odd", "one_column", "triples"])
def test_encoding_is_deterministic_and_decoding_bit_exact(shape, unit):
    rng = np.random.default_rng(sum(shape))
    codes = rng.choice(np.array([0, -1, 1], np.int8), size=shape, p=[0.8, 0.1, 0.1])
    codes.reshape(-1, shape[-1])[0] = 0  # an all-zero row
    codes.reshape(-1, shape[-1])[-1] = np.resize([1, -1, 1, 1], shape[-1])  # a dense row
    lo, hi = -rng.uniform(0.1, 1, shape[:-1]), rng.uniform(0.1, 1, shape[:-1])
    d = codec.build_dictionary([codes], num_codes=512, unit=unit)
    a, b = codec.encode_ternary(codes, lo, hi, d), codec.encode_ternary(codes, lo, hi, d)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.codes.dtype == jnp.uint16 and a.offsets.dtype == jnp.int32 and a.levels.dtype == jnp.float16
    np.testing.assert_array_equal(codec.decode_ternary(a), codes)
    lo16, hi16 = lo.astype(np.float16)[..., None], hi.astype(np.float16)[..., None]
    want = np.where(codes > 0, hi16, np.where(codes < 0, lo16, 0))
    np.testing.assert_array_equal(np.asarray(a.matrix()), want.astype(np.float32))
    # Row r's codewords decode to exactly row r (the offsets address rows independently).
    flat, offs = np.asarray(a.codes).reshape(-1, a.codes.shape[-1]), np.asarray(a.offsets).reshape(-1, shape[-2] + 1)
    row_words = flat[0][offs[0][1]: offs[0][2]] if shape[-2] > 1 else flat[0][: offs[0][1]]
    row = np.concatenate([d.entry(int(c)) for c in row_words])[: shape[-1]]
    np.testing.assert_array_equal(row, codes.reshape(-1, shape[-2], shape[-1])[0][min(1, shape[-2] - 1)])


@pytest.mark.parametrize("block_rows", [1, 0], ids=["per_row", "auto_blocks"])
def test_ans_codec_is_deterministic_and_bit_exact(block_rows):
    rng = np.random.default_rng(7)
    codes = rng.choice(np.array([0, -1, 1], np.int8), size=(2, 12, 40), p=[0.9, 0.07, 0.03])
    codes[0, 0], codes[0, 1], codes[1, 2] = 0, 1, -1  # all zero, all +1, all -1: the extremes of the row model
    lo, hi = -rng.uniform(0.1, 1, (2, 12)), rng.uniform(0.1, 1, (2, 12))
    a, b = (codec.encode_ternary_ans(codes, lo, hi, block_rows=block_rows) for _ in range(2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.block_rows == (1 if block_rows == 1 else 12)  # auto: 12 rows x 40 < 1024 symbols: one stream
    assert a.offsets.shape == (2, 12 // a.block_rows + 1) and a.freq.shape == (2, 12 // a.block_rows, 2)
    np.testing.assert_array_equal(codec.decode_ternary(a), codes)
    assert codec.bits_per_param(a)["bytes_dictionary"] == 0
    # The dictionary codec takes the same blocks.
    d = codec.build_dictionary([codes], num_codes=1024)
    blocked = codec.encode_ternary(codes, lo, hi, d, block_rows=3)
    assert blocked.offsets.shape == (2, 5)
    np.testing.assert_array_equal(codec.decode_ternary(blocked), codes)
    with pytest.raises(ConfigError, match="divide"):
        codec.encode_ternary_ans(codes, lo, hi, block_rows=5)


def test_rate_at_qmoe_like_zero_fractions():
    """~90 % zeros (what GPTQ ternary with dampening gives QMoE) on SmolLM2's gate/up shape: codewords alone near
    0.66 bits per weight (entropy 0.57), with offsets and levels under 0.8. The dictionary (768 KiB) is shared
    by a whole model: over SmolLM2's 90 MLP matrices it adds 0.08 (benchmarks/codec_rate.py measures the real
    model); QMoE's 14-pair layout costs more per codeword."""
    rng = np.random.default_rng(0)
    z = 0.9
    codes = rng.choice(np.array([0, -1, 1], np.int8), size=(768, 576), p=[z, (1 - z) / 2, (1 - z) / 2])
    tc = codec.encode_ternary(codes, -np.ones(768), np.ones(768))
    np.testing.assert_array_equal(codec.decode_ternary(tc), codes)
    stats, rate = codec.ternary_stats(codes), codec.bits_per_param(tc)
    assert abs(stats["zero_fraction"] - z) < 0.01 and abs(stats["entropy_bits"] - 0.569) < 0.01
    without_dictionary = 8 * (rate["bytes_total"] - rate["bytes_dictionary"]) / rate["num_params"]
    assert stats["entropy_bits"] < rate["bits_per_param_codes"] < 0.68 and without_dictionary < 0.8
    assert rate["bytes_dictionary"] == 3 * 2**18 and rate["bytes_offsets"] == 4 * 769
    assert rate["bytes_levels"] == 4 * 768
    assert without_dictionary + 8 * 3 * 2**18 / (90 * 1536 * 576) < 0.85  # amortised as in SmolLM2's MLPs
    qmoe = codec.bits_per_param(codec.encode_ternary(codes, -np.ones(768), np.ones(768), codec.qmoe_dictionary()))
    assert qmoe["bits_per_param_codes"] > rate["bits_per_param_codes"]
    # Per-row rANS: near each row's entropy, no table; 32 bits of final state per row (blocks of 2 rows halve it).
    ans = codec.encode_ternary_ans(codes, -np.ones(768), np.ones(768), block_rows=0)
    np.testing.assert_array_equal(codec.decode_ternary(ans), codes)
    ans_rate = codec.bits_per_param(ans)
    assert ans.block_rows == 2 and ans_rate["bits_per_param"] < 0.7
    assert stats["entropy_bits"] < ans_rate["bits_per_param_codes"] < stats["entropy_bits"] + 0.05


def test_codec_errors():
    with pytest.raises(ConfigError, match="-1, 0 or 1"):
        codec.encode_ternary(np.full((2, 4), 2), 0, 1)
    ones, codes = jnp.ones((2, 2)), jnp.zeros((2, 8), jnp.int8)
    with pytest.raises(ConfigError, match="per channel"):
        codec.encode_matrix(QuantizedMatrix(codes, ones, -ones, QuantGrid(2, 4, ternary=True)))
    with pytest.raises(ConfigError, match="ternary"):
        codec.encode_matrix(QuantizedMatrix(codes, ones, ones, QuantGrid(4, 4)))


def ternary_records(pure: dict) -> tuple[dict, dict]:
    """``(report["quantized"]``-style RTN-ternary records of every block kernel of a stacked-layers model (what
    ``compress_sequentially`` with ``{"method": "rtn", "ternary": True}`` returns, without its block passes), and
    the params with those kernels dequantized)."""
    out, new = {}, jax.tree.map(np.asarray, pure)
    for name, sub in pure["layers"].items():
        if "kernel" not in sub:
            continue
        pairs = [rtn_quantize(kernel_to_matrix(name, k), TERNARY) for k in sub["kernel"]]
        out[name] = {"kernel": QuantizedMatrix(*(np.stack([np.asarray(getattr(q, f)) for _, q in pairs])
                                                 for f in ("codes", "scale", "offset")), TERNARY)}
        new["layers"][name]["kernel"] = np.stack([np.asarray(w).T.reshape(k.shape) for (w, _), k in
                                                  zip(pairs, sub["kernel"])])
    return {"layers": out}, new


@pytest.mark.parametrize("which", ["dictionary", "ans"])
def test_model_from_compressed_bytes_equals_the_dequantized_model(which):
    cfg = TINY_CFG
    graphdef, params = init_model(cfg, seed=5)
    pure = nnx.to_pure_dict(params)
    quantized, new = ternary_records(pure)
    packed = pack_params(pure, quantized, KERNEL_INPUT_DIMS, ternary_codec=which, block_rows=0)
    leaves = codec.codec_leaves(packed)
    assert len(leaves) == 7 and len({x.dictionary for x in leaves}) == 1  # one table for the model (or none)
    # The codec's kernels are the dequantized float kernels, bit for bit.
    np.testing.assert_array_equal(np.asarray(packed["layers"]["o_proj"]["kernel"].dequantize()),
                                  new["layers"]["o_proj"]["kernel"])
    windows = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
    pgraph, pparams = packed_model(cfg, packed)
    got, _ = nnx.merge(pgraph, pparams)(windows)
    _, fparams = load_params(cfg, new)
    want, _ = nnx.merge(graphdef, fparams)(windows)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    held, weights = block_linear_sizes(packed)  # codes, offsets, levels, and the one dictionary once
    rate = codec.bits_per_param(packed)
    assert held == rate["bytes_total"]
    assert weights == rate["num_params"] == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)  # q, o; k, v; mlp
    # The decoding matmul on its own (o_proj's kernel has two input dims) is the dense matmul exactly.
    one = jax.tree.map(lambda a: a[0], packed["layers"]["o_proj"]["kernel"])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3,) + one.shape[:2]), jnp.float32)
    dims = (((1, 2), (0, 1)), ((), ()))
    np.testing.assert_array_equal(np.asarray(packed_dot_general(x, one, dims)),
                                  np.asarray(jax.lax.dot_general(x, one.dequantize(), dims)))
