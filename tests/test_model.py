"""Decoder numerics: causality, KV-cache decoding, scan/list/remat/attention equivalence, RoPE layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmopt_jax.errors import ConfigError
from llmopt_jax.models.attention import attention, causal_chunked_attention, causal_mask
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.decoder import Decoder
from llmopt_jax.models.layout import layer_params, stack_layers
from llmopt_jax.models.rope import apply_rope, permute_rotary_features, rotary_feature_permutation

BASE = ModelConfig(vocab_size=97, d_model=48, num_layers=3, num_heads=6, num_kv_heads=2, mlp_dim=80, rope_base=500.0)


def build(cfg=BASE, seed=0, **kwargs):
    return Decoder(cfg, rngs=nnx.Rngs(params=seed), **kwargs)


def tokens(b=2, l=12, seed=1, vocab=97):
    return jax.random.randint(jax.random.key(seed), (b, l), 0, vocab)


def numpy_attention(q, k, v, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", probs, v)


@pytest.mark.parametrize("impl", ["xla", "dot_product"])
def test_attention_matches_numpy_reference(impl):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 6, 8))
    k = jax.random.normal(kk, (2, 7, 2, 8))
    v = jax.random.normal(kv, (2, 7, 2, 8))
    q_pos = jnp.array([[2, 3, 4, 5, 6], [0, 1, 2, 3, 4]])
    mask = causal_mask(q_pos, jnp.broadcast_to(jnp.arange(7), (2, 7)))
    out = attention(q, k, v, mask, impl)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_causal_chunked_attention_equals_full_attention():
    """Skipping the score blocks that causality masks changes nothing (self-attention, ascending positions, with
    L a multiple of the chunk; other shapes fall through to plain xla)."""
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 256, 6, 8))
    k = jax.random.normal(kk, (2, 256, 2, 8))
    v = jax.random.normal(kv, (2, 256, 2, 8))
    pos = jnp.broadcast_to(jnp.arange(256), (2, 256))
    mask = causal_mask(pos, pos)
    want = numpy_attention(q, k, v, mask)
    np.testing.assert_allclose(causal_chunked_attention(q, k, v, mask, chunk=64), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attention(q, k, v, mask, "xla_causal"), want, rtol=1e-5, atol=1e-5)
    odd = causal_chunked_attention(q[:, :100], k[:, :100], v[:, :100], mask[:, :100, :100], chunk=64)
    np.testing.assert_allclose(odd, want[:, :100], rtol=1e-5, atol=1e-5)


def numpy_rope_halves(x, positions, base):
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = np.asarray(positions)[..., None, None] * inv  # [B, L, 1, D/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def test_rope_matches_numpy_and_interleaved_is_a_permutation():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    pos = jnp.broadcast_to(jnp.arange(5) * 7, (2, 5))
    halves = apply_rope(x, pos, 1000.0, interleaved=False)
    np.testing.assert_allclose(halves, numpy_rope_halves(x, pos, 1000.0), rtol=1e-5, atol=1e-5)
    # Interleaved layout = halves layout after permuting head_dim as [0, D/2, 1, D/2+1, ...].
    perm = rotary_feature_permutation(8, to_interleaved=True)
    inter = apply_rope(x[..., perm], pos, 1000.0, interleaved=True)
    np.testing.assert_allclose(inter, np.asarray(halves)[..., perm], rtol=1e-5, atol=1e-5)
    # Rotation preserves norms.
    np.testing.assert_allclose(jnp.linalg.norm(halves, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_interleaved_model_with_permuted_qk_weights_matches():
    """The GGUF option: q/k weights stored in Meta's interleaved layout give identical logits."""
    model = build()
    inter_cfg = dataclasses.replace(BASE, rope_interleaved=True)
    inter = build(inter_cfg)
    pure = nnx.to_pure_dict(nnx.state(model))
    for name in ("q_proj", "k_proj"):
        pure["layers"][name]["kernel"] = permute_rotary_features(pure["layers"][name]["kernel"], BASE.head_dim, True)
    inter_state = nnx.state(inter)
    nnx.replace_by_pure_dict(inter_state, pure)
    nnx.update(inter, inter_state)
    t = tokens()
    np.testing.assert_allclose(inter(t)[0], model(t)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_causality(scan):
    model = build(dataclasses.replace(BASE, scan_layers=scan))
    t = tokens(l=10)
    base_logits = model(t)[0]
    for pos in (0, 4, 9):
        changed = t.at[:, pos].set((t[:, pos] + 1) % BASE.vocab_size)
        logits = model(changed)[0]
        np.testing.assert_array_equal(logits[:, :pos], base_logits[:, :pos])
        assert not np.allclose(logits[:, pos], base_logits[:, pos])


@pytest.mark.parametrize("scan,impl", [(True, "xla"), (False, "xla"), (True, "dot_product"), (True, "xla_causal")])
def test_kv_cache_decoding_matches_full_forward(scan, impl):
    model = build(dataclasses.replace(BASE, scan_layers=scan, attention=impl))
    t = tokens(l=11)
    full = model(t)[0]
    cache = model.init_cache(batch=2, max_len=16)
    prefill, cache = model(t[:, :5], cache=cache)
    steps = [prefill]
    for i in range(5, 11):
        logits, cache = model(t[:, i : i + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [11, 11])


def test_kv_cache_sequences_at_different_lengths():
    """Each sequence continues at its own length: sequence 1 decodes from an empty cache."""
    model = build()
    t = tokens(l=6)
    cache = model.init_cache(batch=2, max_len=8)
    cache = cache.replace(lengths=jnp.array([0, 0]))
    _, cache = model(t[:, :3], cache=cache)
    cache = cache.replace(lengths=jnp.array([3, 0]))  # forget sequence 1's prefix
    logits, cache = model(t[:, 3:4], cache=cache)
    np.testing.assert_allclose(logits[0], model(t[:1, :4])[0][0, 3:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1], model(t[1:, 3:4])[0][0], rtol=1e-5, atol=1e-5)


def stacked_state_from_list(list_model, scan_model):
    _, list_state = nnx.split(list_model)
    graphdef, scan_state = nnx.split(scan_model)
    pure = nnx.to_pure_dict(list_state)
    pure["layers"] = stack_layers([layer_params(pure["layers"], i, False) for i in range(BASE.num_layers)], True)
    nnx.replace_by_pure_dict(scan_state, pure)
    return nnx.merge(graphdef, scan_state)


def test_scan_and_list_layers_agree():
    list_model = build(dataclasses.replace(BASE, scan_layers=False))
    scan_model = stacked_state_from_list(list_model, build(BASE))
    t = tokens()
    np.testing.assert_allclose(scan_model(t)[0], list_model(t)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_loss_and_gradients(remat):
    t = tokens()

    def loss_and_grads(cfg):
        graphdef, params = nnx.split(build(cfg))

        def loss(p):
            logits = nnx.merge(graphdef, p)(t)[0]
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(params)

    l0, g0 = loss_and_grads(BASE)
    l1, g1 = loss_and_grads(dataclasses.replace(BASE, remat=remat))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = build(dataclasses.replace(BASE, dtype="bfloat16"))
    ref = build(BASE)
    t = tokens()
    logits = model(t)[0]
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model)))
    ref_probs = jax.nn.softmax(ref(t)[0])
    assert float(jnp.abs(jax.nn.softmax(logits) - ref_probs).max()) < 2e-2


def test_injected_dot_general_is_used_by_every_linear():
    calls = []

    def counting_dot_general(lhs, rhs, dims, precision=None, preferred_element_type=None):
        calls.append(rhs.shape)
        return jax.lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type)

    model = build(dataclasses.replace(BASE, scan_layers=False), dot_general=counting_dot_general)
    reference = build(dataclasses.replace(BASE, scan_layers=False))
    t = tokens()
    np.testing.assert_allclose(model(t)[0], reference(t)[0], rtol=1e-6)
    assert len(calls) == 7 * BASE.num_layers  # q, k, v, o, gate, up, down per block


def test_every_parameter_has_logical_axes():
    _, state = nnx.split(build(BASE))
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var[...].ndim, path
        assert axes[0] == "layers" or "layers" not in str(path), path


def test_param_count_matches_config():
    for cfg in (BASE, dataclasses.replace(BASE, tie_embeddings=False)):
        _, state = nnx.split(build(cfg))
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.num_params()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_heads=6, num_kv_heads=4), "multiple of model.num_kv_heads"),
        (dict(attention="flash9"), "model.attention"),
        (dict(remat="sometimes"), "model.remat"),
        (dict(d_model=0), "model.d_model"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(BASE, **kwargs)


def test_unknown_model_key_is_named():
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_mapping({**dataclasses.asdict(BASE), "hidden_size": 3})


def test_logit_index_computes_only_the_requested_positions():
    model = build()
    t = tokens()
    full, _ = model(t)
    index = jnp.array([3, 11])
    picked, _ = model(t, logit_index=index)
    assert picked.shape == (2, 1, BASE.vocab_size)
    np.testing.assert_allclose(picked[:, 0], full[jnp.arange(2), index], rtol=1e-6, atol=1e-6)
