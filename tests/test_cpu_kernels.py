"""The compiled CPU kernel for packed int2/int4/int8 matmuls (``llmopt_jax/kernels``): equal to a NumPy re-derivation
of the dequantized product for every grid it takes (groups, per channel, per tensor, integer and float zero-points,
column tails, several rows, the threaded path), differentiable, usable under jit/scan/vmap, chosen by
``packed_dot_general`` only for decode-sized products, and clear errors when it cannot be built."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmopt_jax.compress.packed import pack_matrix, packed_dot_general
from llmopt_jax.compress.quantize import QuantGrid, rtn_quantize
from llmopt_jax.kernels import cpu

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler or no AVX-512 on this CPU")

GRIDS = [QuantGrid(4, 32, symmetric=True), QuantGrid(4, 16), QuantGrid(4, 16, zero_point="float"),
         QuantGrid(4, per_tensor=True), QuantGrid(4, -1, symmetric=True), QuantGrid(8, 32, symmetric=True),
         QuantGrid(8), QuantGrid(2, 64, symmetric=True), QuantGrid(2, 16)]


def _packed(grid, k, n, seed=0):
    """A packed ``[k, n]`` kernel and its dequantized float64 weights, re-derived in NumPy from the RTN record."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    _, qm = rtn_quantize(jnp.asarray(w), grid)
    packed = pack_matrix(qm, (k, n))
    # scale·(code - zero) + offset per group, from what is stored: float16 scales, uint8 zero-points / f16 offsets
    codes = np.asarray(qm.codes, np.float64)  # [n, k]
    groups = packed.scale.shape[0]
    expand = lambda a: np.repeat(np.asarray(a, np.float64).T, k // groups, axis=1) if a.shape != (1, 1) \
        else np.full((n, k), float(np.asarray(a)[0, 0]))  # noqa: E731
    zero = 0.0 if packed.zero is None else expand(packed.zero)
    offset = 0.0 if packed.offset is None else expand(packed.offset)
    dense = expand(packed.scale) * (codes - zero) + offset
    return packed, dense.T  # [k, n]


def grid_id(g: QuantGrid) -> str:
    kind = "pt" if g.per_tensor else f"g{g.group_size}"
    return f"int{g.bits}-{kind}-" + ("sym" if g.symmetric else f"{g.zero_point}zero")


@needs_kernel
@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
@pytest.mark.parametrize("k, n, rows", [(64, 24, 3), (576, 200, 1), (576, 576, 5), (192, 1536, 16)])
def test_kernel_equals_numpy_dequantized_product(grid, k, n, rows):
    packed, dense = _packed(grid, k, n)
    np.testing.assert_allclose(np.asarray(packed.dequantize(), np.float64), dense, rtol=1e-6, atol=1e-6)
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    got = np.asarray(jax.jit(cpu.packed_matmul)(jnp.asarray(x), packed))
    assert got.dtype == np.float32 and got.shape == (rows, n)
    want = x.astype(np.float64) @ dense
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@needs_kernel
@pytest.mark.parametrize("grid", [QuantGrid(8, -1, symmetric=True), QuantGrid(8), QuantGrid(8, per_tensor=True),
                                  QuantGrid(4, -1, symmetric=True)], ids=grid_id)
def test_long_groups_and_activations_with_a_large_mean_keep_float32_accuracy(grid):
    """Codes are centred before the multiply-add: otherwise scale·Σx·u and the zero-point term scale·(lo-zero)·Σx
    are both ~2^(bits-1)·Σx and cancel (measured 1.6e-4 relative error at K=4096, mean(x)=1, int8 per channel)."""
    packed, dense = _packed(grid, 4096, 256, seed=9)
    x = (10.0 + np.random.default_rng(10).standard_normal((2, 4096))).astype(np.float32)
    want = x.astype(np.float64) @ dense
    got = np.asarray(cpu.packed_matmul(jnp.asarray(x), packed))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5  # float32 sums over 4096 terms (was 1.6e-4..3e-4)


@needs_kernel
def test_threaded_product_of_a_large_kernel_and_several_rows():
    packed, dense = _packed(QuantGrid(4, 32, symmetric=True), 576, 4099, seed=2)  # > 2^17 weights: pool threads
    x = np.random.default_rng(3).standard_normal((2, 3, 576)).astype(np.float32)
    got = np.asarray(cpu.packed_matmul(jnp.asarray(x), packed))
    want = x.astype(np.float64) @ dense
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got, np.asarray(cpu.packed_matmul(jnp.asarray(x), packed)))  # deterministic


@needs_kernel
def test_multi_dim_inputs_like_the_attention_output_projection():
    w = np.random.default_rng(4).standard_normal((24, 4 * 16)).astype(np.float32)
    _, qm = rtn_quantize(jnp.asarray(w), QuantGrid(4, 16))
    packed = pack_matrix(qm, (4, 16, 24), n_in=2)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 2, 4, 16)), jnp.float32)
    dims = (((2, 3), (0, 1)), ((), ()))
    want = jax.lax.dot_general(x, packed.dequantize(), dims)
    got = packed_dot_general(x, packed, dims, preferred_element_type=jnp.float32)
    assert cpu.supports(x.shape, packed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_gradient_in_x_and_vmap_and_scan():
    packed, dense = _packed(QuantGrid(4, 16), 64, 40)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 64)), jnp.float32)
    loss = lambda x: jnp.sum(jnp.sin(cpu.packed_matmul(x, packed)))  # noqa: E731
    ref = lambda x: jnp.sum(jnp.sin(x @ packed.dequantize()))  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(x)), np.asarray(jax.grad(ref)(x)), rtol=1e-4, atol=1e-5)
    tangent = jnp.ones_like(x)
    _, forward = jax.jvp(lambda x: cpu.packed_matmul(x, packed), (x,), (tangent,))  # forward mode too
    np.testing.assert_allclose(np.asarray(forward), np.asarray(tangent @ packed.dequantize()), rtol=1e-5, atol=1e-5)
    xs = jnp.stack([x, 2 * x, -x])
    batched = jax.vmap(lambda x: cpu.packed_matmul(x, packed))(xs)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(xs @ packed.dequantize()), rtol=1e-5, atol=1e-5)
    square, _ = _packed(QuantGrid(4, 16), 64, 64, seed=7)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), square)  # two layers, scanned
    scanned = jax.lax.scan(lambda c, p: (cpu.packed_matmul(c, p), None), x, stacked)[0]
    w = square.dequantize()
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(x @ w @ w), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_packed_dot_general_picks_the_kernel_for_decode_sized_products_only():
    packed, _ = _packed(QuantGrid(4, 32, symmetric=True), 64, 48)
    dims = (((2,), (0,)), ((), ()))

    def lowered(rows):
        x = jnp.zeros((1, rows, 64), jnp.float32)
        return jax.jit(lambda x, p: packed_dot_general(x, p, dims)).lower(x, packed).as_text()

    assert "llmopt_packed_matmul" in lowered(cpu.MAX_ROWS)
    assert "llmopt_packed_matmul" not in lowered(cpu.MAX_ROWS + 1)  # prefill: XLA's matrix-matrix product
    three_bit = pack_matrix(rtn_quantize(jnp.ones((48, 64)), QuantGrid(3))[1], (64, 48))
    assert not cpu.supports((1, 64), three_bit)
    assert not cpu.supports((1, 32), packed)  # inputs that do not match the kernel's: XLA's path (and its error)
    two_in = pack_matrix(rtn_quantize(jnp.ones((48, 64)), QuantGrid(4, 16))[1], (4, 16, 48), n_in=2)
    assert cpu.supports((1, 4, 16), two_in) and not cpu.supports((1, 16, 4), two_in)



def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LLMOPT_JAX_CPU_KERNELS", "0")
    cpu._target_name.cache_clear()
    try:
        assert not cpu.available()
        packed, dense = _packed(QuantGrid(4, 32, symmetric=True), 64, 48)
        x = jnp.ones((1, 64), jnp.float32)
        text = jax.jit(lambda x, p: packed_dot_general(x, p, (((1,), (0,)), ((), ())))).lower(x, packed).as_text()
        assert "llmopt_packed_matmul" not in text
    finally:
        monkeypatch.delenv("LLMOPT_JAX_CPU_KERNELS")
        cpu._target_name.cache_clear()


def test_a_source_that_does_not_compile_is_a_clear_error(tmp_path, monkeypatch):
    if cpu._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("LLMOPT_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.cc"
    bad.write_text("this is not C++;\n")
    with pytest.raises(RuntimeError, match="compiling broken.cc failed"):
        cpu.build(bad)
    assert not [p for p in (tmp_path / "cache").iterdir()]  # no partial library left behind


def test_a_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        cpu.build()


def test_the_library_is_built_once_and_reused(tmp_path, monkeypatch):
    if cpu._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("LLMOPT_JAX_KERNEL_CACHE", str(tmp_path))
    first = cpu.build()
    stamp = os.stat(first).st_mtime_ns
    assert cpu.build() == first and os.stat(first).st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
