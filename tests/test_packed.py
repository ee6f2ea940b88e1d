"""Packed int2..int8 storage: exact round trips, real byte counts, packed matmul == dequantized matmul, and a
whole model (forward and decode) running from packed weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_CFG
from llmopt_jax.compress.calibrate import KERNEL_INPUT_DIMS, compress_sequentially, kernel_to_matrix
from llmopt_jax.compress.packed import (
    PackedTensor, block_bits_per_weight, block_linear_sizes, pack_codes, pack_embedding, pack_matrix, pack_params, packed_dot_general, packed_model,
    unpack_codes,
)
from llmopt_jax.compress.quantize import QuantGrid, rtn_quantize
from llmopt_jax.compress.recipe import from_recipe
from llmopt_jax.errors import ConfigError, ShardingError
from llmopt_jax.infer.generate import Generator
from llmopt_jax.infer.roofline import tree_bytes
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.mesh import create_mesh
from llmopt_jax.parallel.sharded_init import init_model, load_params


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_round_trip_is_exact_and_holds_bits_per_code(bits, symmetric):
    lo = -(2 ** (bits - 1)) if symmetric else 0
    codes = np.random.default_rng(bits).integers(lo, lo + 2**bits, (64, 24))
    codes[0, 0], codes[1, 0] = lo, lo + 2**bits - 1  # both extremes
    data = pack_codes(jnp.asarray(codes), bits, lo)
    assert data.dtype == jnp.uint8 and data.shape == (64 * bits // 8, 24)
    np.testing.assert_array_equal(np.asarray(unpack_codes(data, bits, lo)), codes)


def test_four_bit_codes_are_two_per_byte_low_nibble_first():
    codes = jnp.asarray([[1], [2], [3], [4], [5], [6], [7], [15]])
    np.testing.assert_array_equal(np.asarray(pack_codes(codes, 4, 0))[:, 0], [0x21, 0x43, 0x65, 0xF7])


def test_packing_needs_a_multiple_of_8_inputs():
    with pytest.raises(ConfigError, match="divisible by 8"):
        pack_codes(jnp.zeros((12, 4), jnp.int32), 3, 0)


@pytest.mark.parametrize("grid", [QuantGrid(4, 16), QuantGrid(3), QuantGrid(2, 32, symmetric=True),
                                  QuantGrid(8, symmetric=True), QuantGrid(4, per_tensor=True),
                                  QuantGrid(4, 16, zero_point="float"), QuantGrid(3, zero_point="float")])
@pytest.mark.parametrize("kernel_shape, n_in", [((64, 24), 1), ((4, 16, 24), 2)])
def test_packed_matmul_equals_dequantized_matmul(grid, kernel_shape, n_in):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal(kernel_shape).astype(np.float32)
    name = "o_proj" if n_in == 2 else "q_proj"
    w_hat, qm = rtn_quantize(kernel_to_matrix(name, kernel), grid)
    packed = pack_matrix(qm, kernel_shape, n_in)
    # What is stored per group: a float16 scale, plus uint8 zero-points (integer) or float16 offsets (float).
    assert packed.scale.dtype == jnp.float16
    assert (packed.zero is not None) == grid.integer_zero and (packed.offset is not None) == (not grid.zero_exact)
    if packed.zero is not None:
        assert packed.zero.dtype == jnp.uint8 and packed.zero.shape == packed.scale.shape
    dense = np.asarray(w_hat).T.reshape(kernel_shape)
    np.testing.assert_array_equal(np.asarray(packed.dequantize()), dense)
    x = jnp.asarray(rng.standard_normal((3, 5) + kernel_shape[:n_in]), jnp.float32)
    dims = ((tuple(range(2, 2 + n_in)), tuple(range(n_in))), ((), ()))
    got = packed_dot_general(x, packed, dims, preferred_element_type=jnp.float32)
    want = jax.lax.dot_general(x, jnp.asarray(dense), dims, preferred_element_type=jnp.float32)
    # On the CPU these few rows go to the compiled kernel (kernels/cpu.py), which sums per group as
    # scale·Σx·u + (zero-point term)·Σx: a different rounding order, so the tolerance is relative to the outputs.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


CFG = TINY_CFG


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "list"])
def quantized(request):
    cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": request.param})
    graphdef, params = init_model(cfg, seed=3)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16))
    step = {"method": "gptq", "bits": 4, "group_size": 16, "act_order": True}
    new, report = compress_sequentially(cfg, params, windows, from_recipe([step]), batch_size=2, progress=False)
    return cfg, graphdef, params, new, report, windows


def test_packed_model_equals_the_dequantized_float_model(quantized):
    cfg, graphdef, _, new, report, windows = quantized
    pgraph, pparams = packed_model(cfg, pack_params(new, report["quantized"], KERNEL_INPUT_DIMS))
    kernels = [x for x in jax.tree.leaves(nnx.to_pure_dict(pparams), is_leaf=lambda x: isinstance(x, PackedTensor))
               if isinstance(x, PackedTensor)]
    assert len(kernels) == 7 * (1 if cfg.scan_layers else cfg.num_layers)  # every block linear is packed
    _, fparams = load_params(cfg, new)
    got, _ = nnx.merge(pgraph, pparams)(jnp.asarray(windows))
    want, _ = nnx.merge(graphdef, fparams)(jnp.asarray(windows))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # Greedy decoding from the packed weights (KV cache, prefill + decode steps) picks the same tokens.
    prompt = [list(windows[0, :6])]
    packed_tokens = Generator(pgraph, pparams).generate(prompt, 8).tokens
    assert packed_tokens == Generator(graphdef, fparams).generate(prompt, 8).tokens


def test_sharded_packed_model_equals_unsharded_and_shards_codes_like_the_float_kernels(quantized):
    cfg, _, _, new, report, windows = quantized
    packed = pack_params(new, report["quantized"], KERNEL_INPUT_DIMS)
    graph, params = packed_model(cfg, packed)
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    graph_s, params_s = packed_model(cfg, packed, mesh=mesh)
    blocks = nnx.to_pure_dict(params_s)["layers"]
    block = blocks if cfg.scan_layers else blocks[0]
    # q: [embed (fsdp) -> heads (tensor) x head_dim]; o and down: [heads or mlp (tensor) -> embed (fsdp)]
    expect = {"q_proj": ("fsdp", "tensor"), "o_proj": ("tensor", "fsdp"), "down_proj": ("tensor", "fsdp")}
    for name, axes in expect.items():
        kernel = block[name]["kernel"]
        assert tuple(kernel.data.sharding.spec)[-2:] == axes, name
        assert tuple(kernel.scale.sharding.spec)[-2:] == axes, name  # 2 groups of 16 inputs per shard
        assert len(kernel.data.sharding.device_set) == 8
    got, _ = nnx.merge(graph_s, params_s)(jnp.asarray(windows))
    want, _ = nnx.merge(graph, params)(jnp.asarray(windows))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # On a mesh the linears keep XLA's path: the CPU kernel (kernels/cpu.py) has no sharding rule, so XLA would
    # gather its operands onto every device.
    linears = [m for _, m in nnx.iter_graph(nnx.merge(graph_s, params_s)) if hasattr(m, "dot_general")]
    assert linears and all(m.dot_general.keywords == {"cpu_kernel": False} for m in linears)
    with pytest.raises(ShardingError, match="not divisible"):  # 4 heads over 8 tensor shards
        packed_model(cfg, packed, mesh=create_mesh(dict(data=1, fsdp=1, tensor=8)))


@pytest.mark.parametrize("case", ["groups_split_by_shards", "per_channel_symmetric_with_packed_embedding"])
def test_sharded_packed_model_replicates_what_cannot_be_split(quantized, case):
    cfg, _, params, new, report, windows = quantized
    if case == "groups_split_by_shards":  # 2 groups of 16 inputs over 4 fsdp shards: the input axis is replicated
        mesh_shape, packed = dict(data=1, fsdp=4, tensor=2), pack_params(new, report["quantized"], KERNEL_INPUT_DIMS)
        expect = {"q_proj": (None, "tensor"), "o_proj": ("tensor", "fsdp")}
        scales = {"q_proj": (None, "tensor"), "o_proj": ("tensor", "fsdp")}
    else:  # one scale per output channel, no offsets; the packed embedding ([d, vocab] of [vocab, d]) replicated
        mesh_shape = dict(data=2, fsdp=2, tensor=2)
        pure, rep = compress_sequentially(cfg, params, windows, from_recipe([{"method": "rtn", "bits": 4,
                                                                             "symmetric": True}]), progress=False)
        packed = pack_embedding(pack_params(pure, rep["quantized"], KERNEL_INPUT_DIMS), QuantGrid(8, 32, symmetric=True))
        expect = {"q_proj": ("fsdp", "tensor"), "o_proj": ("tensor", "fsdp")}
        scales = {"q_proj": (None, "tensor"), "o_proj": (None, "fsdp")}
    graph, params_1 = packed_model(cfg, packed)
    graph_s, params_s = packed_model(cfg, packed, mesh=create_mesh(mesh_shape))
    pure_s = nnx.to_pure_dict(params_s)
    block = pure_s["layers"] if cfg.scan_layers else pure_s["layers"][0]
    for name, axes in expect.items():
        kernel = block[name]["kernel"]
        assert tuple(kernel.data.sharding.spec)[-2:] == axes, name
        assert tuple(kernel.scale.sharding.spec)[-2:] == scales[name], name
        assert kernel.offset is None and (kernel.zero is None) == (case != "groups_split_by_shards")
        if kernel.zero is not None:
            assert tuple(kernel.zero.sharding.spec)[-2:] == scales[name], name
    embedding = pure_s["embed"]["embedding"]
    assert isinstance(embedding, PackedTensor) == (case != "groups_split_by_shards")
    if isinstance(embedding, PackedTensor):
        assert embedding.data.sharding.is_fully_replicated and embedding.scale.sharding.is_fully_replicated
    got, _ = nnx.merge(graph_s, params_s)(jnp.asarray(windows))
    want, _ = nnx.merge(graph, params_1)(jnp.asarray(windows))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_packed_4bit_linear_bytes_are_at_most_0_3x_float32(quantized):
    cfg, _, params, new, report, _ = quantized
    _, pparams = packed_model(cfg, pack_params(new, report["quantized"], KERNEL_INPUT_DIMS))
    pure_f, pure_p = nnx.to_pure_dict(params), nnx.to_pure_dict(pparams)
    (packed_bytes, n), (float_bytes, n_f) = block_linear_sizes(pure_p), block_linear_sizes(pure_f)
    assert n == n_f and float_bytes == 4 * n
    assert packed_bytes == n * 4 // 8 + (2 + 1) * n // 16  # codes, then an f16 scale and a u8 zero per 16 weights
    assert packed_bytes <= 0.3 * float_bytes
    assert block_bits_per_weight(pure_p) == pytest.approx(4 + 24 / 16)
    assert tree_bytes(pparams) == tree_bytes(params) - float_bytes + packed_bytes  # nothing else is held


def test_quantizing_a_packed_tensor_is_refused(quantized):
    cfg, _, _, new, report, _ = quantized
    packed = pack_params(new, report["quantized"], KERNEL_INPUT_DIMS)
    kernel = (packed["layers"]["q_proj"] if cfg.scan_layers else packed["layers"][0]["q_proj"])["kernel"]
    with pytest.raises(ConfigError, match="already packed"):
        rtn_quantize(kernel, QuantGrid(4))
    with pytest.raises(ConfigError, match="already packed"):
        pack_params(packed, report["quantized"], KERNEL_INPUT_DIMS)


@pytest.mark.parametrize("grid", [QuantGrid(8, 32, symmetric=True), QuantGrid(4, 16)])
def test_packed_embedding_serves_lookup_and_tied_head(quantized, grid):
    cfg, graphdef, _, new, report, windows = quantized
    packed = pack_embedding(pack_params(new, report["quantized"], KERNEL_INPUT_DIMS), grid)
    assert isinstance(packed["embed"]["embedding"], PackedTensor)
    pgraph, pparams = packed_model(cfg, packed)
    table, _ = rtn_quantize(jnp.asarray(new["embed"]["embedding"]), grid)
    _, fparams = load_params(cfg, {**new, "embed": {"embedding": np.asarray(table)}})
    got, _ = nnx.merge(pgraph, pparams)(jnp.asarray(windows))
    want, _ = nnx.merge(graphdef, fparams)(jnp.asarray(windows))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    emb = packed["embed"]["embedding"]
    np.testing.assert_array_equal(np.asarray(emb.embed_rows(jnp.asarray([[3, 0], [63, 3]]))),
                                  np.asarray(table)[[[3, 0], [63, 3]]])
    with pytest.raises(ConfigError, match="already packed"):
        pack_embedding(packed, grid)
