"""The sequential engine: statistics come from the compressed previous blocks; purity; layouts; masks."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from conftest import TINY_CFG
from llmopt_jax.compress import calibrate
from llmopt_jax.compress.calibrate import auto_batch_size, compress_sequentially, kernel_to_matrix, measured_sparsity
from llmopt_jax.compress.prune import magnitude_prune, parse_pattern
from llmopt_jax.compress.recipe import chain, from_recipe, magnitude, sparsegpt, wanda
from llmopt_jax.errors import ConfigError
from llmopt_jax.models.layout import layer_params, stack_layers
from llmopt_jax.parallel.sharded_init import init_model, load_params

CFG = dataclasses.replace(TINY_CFG, scan_layers=False)


@pytest.fixture(scope="module")
def setup():
    graphdef, params = init_model(CFG, seed=1)
    windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (6, 16))
    return graphdef, nnx.to_pure_dict(params), windows


def copy_tree(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


def test_identity_transform_changes_nothing(setup):
    _, pure, windows = setup
    new, report = compress_sequentially(CFG, pure, windows, lambda w, s: (w, {}), batch_size=4, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new, pure)
    assert len(report["layers"]) == 2 * 7 and all(r.relative_error == 0 for r in report["layers"])


@pytest.mark.parametrize("compute_dtype, rtol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_block_statistics_come_from_the_compressed_previous_block(setup, compute_dtype, rtol):
    """Block 1's attention-input Hessian must equal 2XᵀX/n with X = attn_norm(compressed block 0's output)
    (exactly in float32; within bfloat16 rounding with bfloat16 matmuls). 6 windows in batches of 4: the padded
    last batch must not count."""
    _, pure, windows = setup
    calls = []
    inner = sparsegpt(0.5)

    def recording(w, stats):
        calls.append(stats)
        return inner(w, stats)

    new, _ = compress_sequentially(CFG, pure, windows, recording, batch_size=4, progress=False,
                                   compute_dtype=compute_dtype)
    assert int(calls[0].count) == windows.size
    graphdef, params = load_params(CFG, new)
    model = nnx.merge(graphdef, params)
    tokens = jnp.asarray(windows)
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    x = model.embed(tokens)
    x, _ = model.layers[0](x, positions)
    h = np.asarray(model.layers[1].attn_norm(x), np.float64).reshape(-1, CFG.d_model)
    close = lambda got, want: np.linalg.norm(np.asarray(got) - want) <= rtol * np.linalg.norm(want)  # noqa: E731
    assert close(calls[7].hessian, 2 * h.T @ h / len(h))
    # ... and block 0's statistics were taken on the dense embeddings (nothing compressed before it).
    e = np.asarray(model.layers[0].attn_norm(model.embed(tokens)), np.float64).reshape(-1, CFG.d_model)
    assert close(calls[0].hessian, 2 * e.T @ e / len(e))


def test_pure_masks_sparsity_and_determinism(setup):
    _, pure, windows = setup
    before = copy_tree(pure)
    a, report = compress_sequentially(CFG, pure, windows, from_recipe([{"method": "sparsegpt", "sparsity": 0.5}]),
                                      progress=False)
    b, _ = compress_sequentially(CFG, pure, windows, from_recipe([{"method": "sparsegpt", "sparsity": 0.5}]),
                                 progress=False)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), pure, before)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert abs(measured_sparsity(a) - 0.5) < 1e-3
    for i in range(CFG.num_layers):
        for name, mask in report["masks"]["layers"][i].items():
            kernel = np.asarray(a["layers"][i][name]["kernel"])
            assert mask["kernel"].shape == kernel.shape
            assert (kernel[~mask["kernel"]] == 0).all()
    # Embeddings and norms are left alone.
    np.testing.assert_array_equal(a["embed"]["embedding"], pure["embed"]["embedding"])


def test_scan_and_list_layouts_agree(setup):
    _, pure, windows = setup
    stacked_cfg = dataclasses.replace(CFG, scan_layers=True)
    stacked = {**pure, "layers": stack_layers([layer_params(pure["layers"], i, False) for i in range(2)], True)}
    transform = wanda(0.5, "2:4")
    listed, _ = compress_sequentially(CFG, pure, windows, transform, progress=False)
    scanned, report = compress_sequentially(stacked_cfg, stacked, windows, transform, progress=False)
    for i in range(2):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x[i], y, rtol=1e-5, atol=1e-6),
                     scanned["layers"], listed["layers"][i])
    assert report["masks"]["layers"]["q_proj"]["kernel"].shape[0] == 2


def test_magnitude_needs_no_calibration_and_matches_direct_pruning(setup):
    _, pure, windows = setup
    new, report = compress_sequentially(CFG, pure, windows, magnitude(0.3), progress=False)
    w = kernel_to_matrix("o_proj", pure["layers"][1]["o_proj"]["kernel"])
    expected, _ = magnitude_prune(w, parse_pattern(0.3))
    np.testing.assert_array_equal(kernel_to_matrix("o_proj", new["layers"][1]["o_proj"]["kernel"]), expected)
    assert all(r.relative_error is None for r in report["layers"])
    assert not chain(magnitude(0.3)).needs_calibration and chain(magnitude(0.3), wanda(0.1)).needs_calibration


def test_chain_keeps_earlier_zeros(setup):
    _, pure, windows = setup
    revive = lambda w, s: (w + 1.0, {})  # noqa: E731 - a step that would make every weight nonzero
    new, report = compress_sequentially(CFG, pure, windows, chain(sparsegpt(0.5), revive), progress=False)
    assert abs(measured_sparsity(new) - 0.5) < 1e-3


def test_errors(setup):
    _, pure, windows = setup
    with pytest.raises(ConfigError, match="unknown compression method 'prune'"):
        from_recipe([{"method": "prune"}])
    with pytest.raises(ConfigError, match="compression step 'wanda'"):
        from_recipe([{"method": "wanda", "bits": 4}])
    with pytest.raises(ConfigError, match="sparsity must be in"):
        from_recipe([{"method": "sparsegpt", "sparsity": 1.5}])
    with pytest.raises(ConfigError, match="non-empty"):
        compress_sequentially(CFG, pure, np.zeros((0, 16), int), magnitude(0.5), progress=False)
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        compress_sequentially(CFG, pure, windows, sparsegpt(0.5), batch_size=-1, progress=False)
    with pytest.raises(ConfigError, match="compute_dtype must be one of"):
        compress_sequentially(CFG, pure, windows, sparsegpt(0.5), compute_dtype="float16", progress=False)


def test_batch_size_changes_only_float_rounding(setup):
    """Batches (auto, 4 with a padded last batch, all 6 at once) sum the same statistics in another order."""
    _, pure, windows = setup
    assert auto_batch_size(512) == 2 and auto_batch_size(16) == 64  # ~1024 tokens per step on CPU
    seen = {}
    for batch in (0, 4, 6):
        calls = []
        compress_sequentially(CFG, pure, windows, lambda w, s: (calls.append(s) or w, {}), batch_size=batch,
                              progress=False, compute_dtype="float32")
        seen[batch] = calls
    for a, b in zip(seen[0], seen[4]):
        np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-5, atol=1e-6)
        assert int(a.count) == int(b.count) == windows.size
    for a, b in zip(seen[0], seen[6]):
        np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-5, atol=1e-6)


def test_pruned_weights_keep_code_for_zero_on_the_default_asymmetric_grid(setup):
    """Pruning then quantizing: the integer zero-point grid has 0 as a level, so a pruned weight's code is its group's
    zero-point and dequantizes to exactly 0; a float-offset grid is refused (0 is not one of its levels)."""
    from llmopt_jax.compress.recipe import rtn

    _, pure, windows = setup
    new, report = compress_sequentially(CFG, pure, windows, chain(magnitude(0.5), rtn(bits=3, group_size=16)),
                                        progress=False)
    qm = report["quantized"]["layers"][0]["up_proj"]["kernel"]
    keep = report["masks"]["layers"][0]["up_proj"]["kernel"]
    w = np.asarray(qm.dequantize())
    assert np.all(w[~kernel_to_matrix("up_proj", keep).astype(bool)] == 0)
    zero = np.repeat(np.asarray(qm.zero), w.shape[1] // qm.zero.shape[1], axis=1)
    pruned = ~np.asarray(kernel_to_matrix("up_proj", keep)).astype(bool)
    np.testing.assert_array_equal(np.asarray(qm.codes)[pruned], zero[pruned])
    with pytest.raises(ConfigError, match="0 is not a level of a float-offset grid"):
        chain(magnitude(0.5), rtn(bits=3, zero_point="float"))


def test_auto_compute_dtype_is_bfloat16_only_where_the_hardware_multiplies_it(monkeypatch):
    """``auto``: bfloat16 for pruning where the hardware multiplies it natively, float32 elsewhere and for every
    quantizing transform."""
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(calibrate, "cpu_has_native_bfloat16", lambda native=native: native)
        assert calibrate.resolve_compute_dtype("auto") == want
        assert calibrate.resolve_compute_dtype("auto", quantizes=True) == "float32"
    assert calibrate.resolve_compute_dtype("bfloat16", quantizes=True) == "bfloat16"  # an explicit choice is kept
    assert calibrate.resolve_compute_dtype("mixed") == "mixed"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert calibrate.resolve_compute_dtype("auto") == "bfloat16"
    assert calibrate.resolve_compute_dtype("auto", quantizes=True) == "float32"


def test_mixed_passes_take_statistics_in_bfloat16_and_propagate_in_float32(setup):
    """``mixed``: the statistics pass is the bfloat16 runner's, bit for bit, and the propagation the float32
    runner's; the two differ (so the check can tell them apart)."""
    from llmopt_jax.compress.hessian import InputStats

    _, pure, windows = setup
    block = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), layer_params(pure["layers"], 0, False))
    xs = jax.random.normal(jax.random.key(0), (2, 3, 16, CFG.d_model))
    real = jnp.ones((2, 3), bool)
    dims = {"attn_in": CFG.d_model, "attn_out": CFG.num_heads * CFG.head_dim, "mlp_in": CFG.d_model,
            "mlp_out": CFG.mlp_dim}
    runs = {}
    for dtype in ("bfloat16", "float32", "mixed"):
        runner = calibrate._BlockRunner(CFG, dtype)
        stats = runner.statistics(block, xs, real, {g: InputStats.zeros(d) for g, d in dims.items()})
        runs[dtype] = (np.asarray(stats["mlp_out"].xtx), np.asarray(runner.forward(block, xs)))
    np.testing.assert_array_equal(runs["mixed"][0], runs["bfloat16"][0])
    np.testing.assert_array_equal(runs["mixed"][1], runs["float32"][1])
    assert not np.array_equal(runs["bfloat16"][1], runs["float32"][1])
    assert not np.array_equal(runs["bfloat16"][0], runs["float32"][0])


def test_report_names_the_resolved_dtype_and_skips_the_last_blocks_output(setup, monkeypatch):
    _, pure, windows = setup
    forwards = []
    runner_cls = calibrate._BlockRunner

    class Counting(runner_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inner = self.forward
            self.forward = lambda *a: forwards.append(1) or inner(*a)

    monkeypatch.setattr(calibrate, "_BlockRunner", Counting)
    _, report = compress_sequentially(CFG, pure, windows, sparsegpt(0.5), progress=False, compute_dtype="float32")
    assert report["compute_dtype"] == "float32"
    _, report = compress_sequentially(CFG, pure, windows, from_recipe([{"method": "gptq", "bits": 4}]),
                                      progress=False, compute_dtype="mixed")
    assert report["compute_dtype"] == "mixed"
    assert len(forwards) == 2 * (CFG.num_layers - 1)  # nothing reads the last block's output


def test_low_precision_error_report_matches_float32():
    """The bfloat16 error report (what bfloat16 calibration passes use) agrees with the float32 ratio
    ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (re-derived in NumPy float64) to well under 1 %, for a pruned matrix and for a
    small (quantization-sized) change."""
    from llmopt_jax.compress.calibrate import relative_reconstruction_error

    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 96)) @ (np.eye(96) + 0.3 * rng.standard_normal((96, 96)))
    h = 2 * x.T @ x / len(x)
    w = rng.standard_normal((64, 96))
    for new_w in (np.where(np.abs(w) > 0.7, w, 0.0), w + 0.01 * rng.standard_normal(w.shape)):
        delta = w - new_w
        exact = np.sum((delta @ h) * delta) / np.sum((w @ h) * w)
        assert relative_reconstruction_error(w, new_w, h) == pytest.approx(exact, rel=1e-4)
        assert relative_reconstruction_error(w, new_w, h, low_precision=True) == pytest.approx(exact, rel=1e-2)
