"""The per-layer parameter layout (stacked vs unrolled blocks) and the rotary q/k feature permutation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmopt_jax.compress.quantize import QuantGrid, QuantizedMatrix
from llmopt_jax.errors import ConfigError
from llmopt_jax.io.gguf_write import _gguf_records
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.layout import layer_params, layers_are_stacked, stack_layers, truncate_layers
from llmopt_jax.models.rope import permute_rotary_features, rotary_feature_permutation
from llmopt_jax.parallel.sharded_init import abstract_model, load_params

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=24)


def random_blocks(num_layers: int = 3, seed: int = 0) -> list[dict]:
    """Block trees of one structure with leaves of several shapes and dtypes."""
    rng = np.random.default_rng(seed)
    return [{"q_proj": {"kernel": rng.standard_normal((4, 2, 6)).astype(np.float32)},
             "attn_norm": {"scale": rng.standard_normal(4).astype(np.float16)},
             "mask": {"kernel": rng.integers(0, 2, (3, 5)).astype(bool)}} for _ in range(num_layers)]


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stack_and_unstack_round_trip():
    blocks = random_blocks()
    stacked = stack_layers(blocks, stacked=True)
    assert stacked["q_proj"]["kernel"].shape == (3, 4, 2, 6) and stacked["attn_norm"]["scale"].dtype == np.float16
    assert layers_are_stacked(stacked)
    unrolled = stack_layers(blocks, stacked=False)
    assert list(unrolled) == [0, 1, 2] and not layers_are_stacked(unrolled)
    with_str_keys = {str(i): b for i, b in unrolled.items()}  # what a JSON/orbax round trip leaves
    assert not layers_are_stacked(with_str_keys)
    for i, block in enumerate(blocks):
        assert_trees_equal(layer_params(stacked, i, stacked=True), block)
        assert layer_params(unrolled, i, stacked=False) is block
        assert layer_params(with_str_keys, i, stacked=False) is block
    # unrolled (either key type) -> stacked -> unrolled gives the blocks back bit for bit
    for layers in (unrolled, with_str_keys):
        again = stack_layers([layer_params(layers, i, False) for i in range(3)], stacked=True)
        assert_trees_equal(again, stacked)
        assert_trees_equal(stack_layers([layer_params(again, i, True) for i in range(3)], False), unrolled)
    assert stack_layers([], stacked=True) == {} and stack_layers([], stacked=False) == {}
    assert not layers_are_stacked({})


def test_missing_blocks_raise_instead_of_clamping():
    blocks = random_blocks(2)
    with pytest.raises(KeyError):
        layer_params(stack_layers(blocks, False), 2, stacked=False)
    for stacked in (stack_layers(blocks, True), jax.tree.map(jnp.asarray, stack_layers(blocks, True))):
        with pytest.raises(IndexError, match="block 2"):  # a jax array alone would clamp to block 1
            layer_params(stacked, 2, stacked=True)


def test_layer_params_slices_jax_arrays_and_pytree_nodes():
    grid = QuantGrid(4, 32, symmetric=True)
    codes = np.arange(2 * 3 * 4, dtype=np.int8).reshape(2, 3, 4)
    records = {"q_proj": {"kernel": QuantizedMatrix(jnp.asarray(codes), np.ones((2, 3, 1)), np.zeros((2, 3, 1)),
                                                    grid)}}
    qm = layer_params(records, 1, stacked=True)["q_proj"]["kernel"]
    assert isinstance(qm, QuantizedMatrix) and qm.grid == grid
    np.testing.assert_array_equal(qm.codes, codes[1])


@pytest.mark.parametrize("scan", [True, False])
def test_truncate_layers_keeps_the_first_blocks_of_a_loadable_model(scan):
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    rng = np.random.default_rng(1)
    pure = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                        nnx.to_pure_dict(abstract_model(cfg)[1]))
    if not scan:  # as read back from a JSON/orbax round trip
        pure["layers"] = {str(i): b for i, b in pure["layers"].items()}
    short_cfg, short = truncate_layers(cfg, pure, 2)
    assert short_cfg == dataclasses.replace(cfg, num_layers=2)
    assert short["embed"] is pure["embed"] and short["final_norm"] is pure["final_norm"]
    for i in range(2):
        assert_trees_equal(layer_params(short["layers"], i, scan), layer_params(pure["layers"], i, scan))
    if scan:
        assert short["layers"]["q_proj"]["kernel"].shape[0] == 2
    else:
        assert list(short["layers"]) == [0, 1]
    load_params(short_cfg, short)  # the tree is exactly a 2-layer model's
    for k in (0, 4):
        with pytest.raises(ConfigError, match=f"cannot keep {k} of the model's 3 layers"):
            truncate_layers(cfg, pure, k)


@pytest.mark.parametrize("head_dim", [2, 8, 64])
def test_rotary_permutation_and_its_inverse(head_dim):
    to_inter = rotary_feature_permutation(head_dim, to_interleaved=True)
    to_halves = rotary_feature_permutation(head_dim, to_interleaved=False)
    np.testing.assert_array_equal(np.sort(to_inter), np.arange(head_dim))
    np.testing.assert_array_equal(to_inter[to_halves], np.arange(head_dim))
    np.testing.assert_array_equal(to_halves[to_inter], np.arange(head_dim))
    # for one head: interleaved feature 2i / 2i+1 is rotate-half feature i / i + D/2
    half = head_dim // 2
    for i in range(half):
        assert (to_inter[2 * i], to_inter[2 * i + 1]) == (i, i + half)
    with pytest.raises(ValueError, match="even"):
        rotary_feature_permutation(head_dim + 1, to_interleaved=True)


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` (HF rotate-half rows -> GGUF interleaved rows)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def test_permuting_rows_and_kernels_matches_llama_cpp_and_inverts():
    heads, hd, d = 3, 8, 5
    rows = np.random.default_rng(2).standard_normal((heads * hd, d)).astype(np.float32)  # HF [out, in]
    inter = permute_rotary_features(rows, hd, to_interleaved=True, axis=0)
    np.testing.assert_array_equal(inter, llama_cpp_permute(rows, heads))
    for h in range(heads):  # the rule, row by row
        for i in range(hd // 2):
            np.testing.assert_array_equal(inter[h * hd + 2 * i], rows[h * hd + i])
            np.testing.assert_array_equal(inter[h * hd + 2 * i + 1], rows[h * hd + i + hd // 2])
    np.testing.assert_array_equal(permute_rotary_features(inter, hd, to_interleaved=False, axis=0), rows)
    # Our kernels are [in, heads, head_dim]: the same permutation on the last axis, for NumPy and jax arrays.
    kernel = rows.T.reshape(d, heads, hd)
    for k in (kernel, jnp.asarray(kernel)):
        inter_kernel = permute_rotary_features(k, hd, to_interleaved=True)
        assert type(inter_kernel) is type(k)
        np.testing.assert_array_equal(np.asarray(inter_kernel).reshape(d, heads * hd).T, inter)
        np.testing.assert_array_equal(permute_rotary_features(inter_kernel, hd, to_interleaved=False), k)
    with pytest.raises(ValueError, match="whole number of heads"):
        permute_rotary_features(rows[:-1], hd, to_interleaved=True, axis=0)


@pytest.mark.parametrize("scan", [True, False])
def test_gguf_records_reorder_qk_rows_in_either_layout(scan):
    """GPTQ records of a rotate-half model are written with llama.cpp's q/k row order; a per-tensor scale
    ``[1, 1]`` serves every row and stays as it is."""
    cfg = dataclasses.replace(CFG, num_layers=2, scan_layers=scan)
    rng = np.random.default_rng(3)
    out_q, out_v, cols = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.d_model

    def record(rows: int, per_tensor: bool) -> QuantizedMatrix:
        scale_rows = 1 if per_tensor else rows
        return QuantizedMatrix(rng.integers(-8, 8, (rows, cols)).astype(np.int8),
                               rng.random((scale_rows, 1)).astype(np.float32), np.zeros((scale_rows, 1), np.float32),
                               QuantGrid(4, -1, symmetric=True, per_tensor=per_tensor))

    blocks = [{"q_proj": {"kernel": record(out_q, False)}, "k_proj": {"kernel": record(out_v, True)},
               "v_proj": {"kernel": record(out_v, False)}} for _ in range(2)]
    layers = stack_layers(blocks, True) if scan else {str(i): b for i, b in enumerate(blocks)}
    got = _gguf_records(cfg, {"layers": layers})
    assert sorted(got) == sorted(f"blk.{i}.attn_{n}.weight" for i in range(2) for n in "qkv")
    for i, block in enumerate(blocks):
        q, k, v = (got[f"blk.{i}.attn_{n}.weight"] for n in "qkv")
        want_q = block["q_proj"]["kernel"]
        for name in ("codes", "scale", "offset"):
            np.testing.assert_array_equal(getattr(q, name), llama_cpp_permute(getattr(want_q, name), cfg.num_heads))
            np.testing.assert_array_equal(getattr(v, name), getattr(block["v_proj"]["kernel"], name))
        np.testing.assert_array_equal(k.codes, llama_cpp_permute(block["k_proj"]["kernel"].codes, cfg.num_kv_heads))
        np.testing.assert_array_equal(k.scale, block["k_proj"]["kernel"].scale)
        assert k.grid.per_tensor
