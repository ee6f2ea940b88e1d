"""Perplexity: the protocol against a NumPy re-derivation, batching/padding, sharding, errors."""

import numpy as np
import pytest

import jax
from flax import nnx

from conftest import TINY_CFG
from llmopt_jax.data.text import token_windows
from llmopt_jax.errors import ConfigError, DataError, ShardingError
from llmopt_jax.eval.perplexity import evaluate_perplexity
from llmopt_jax.parallel.mesh import create_mesh
from llmopt_jax.parallel.sharded_init import init_model, load_params

CFG = TINY_CFG


def numpy_perplexity(graphdef, params, tokens, seq_len):
    """exp(mean NLL) of positions 1..L-1 in each full window, one window at a time, log-softmax in float64."""
    total, count = 0.0, 0
    for w in token_windows(tokens, seq_len):
        logits = np.asarray(nnx.merge(graphdef, params)(w[None])[0][0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        total -= sum(logp[i, w[i + 1]] for i in range(seq_len - 1))
        count += seq_len - 1
    return float(np.exp(total / count)), count


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=3)


def test_matches_numpy_reference_and_drops_the_partial_window(model):
    graphdef, params = model
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 7 * 16 + 5)  # 7 full windows + 5 spare tokens
    expected, count = numpy_perplexity(graphdef, params, tokens, 16)
    for batch_size in (1, 3, 7, 8):  # 3 pads the last batch with repeated windows that must not count
        result = evaluate_perplexity(graphdef, params, tokens, 16, batch_size, progress=False)
        assert result.num_eval_tokens == count == 7 * 15
        assert result.num_windows == 7
        np.testing.assert_allclose(result.perplexity, expected, rtol=1e-5)
    limited = evaluate_perplexity(graphdef, params, tokens, 16, 2, max_windows=3, progress=False)
    assert limited.num_eval_tokens == 3 * 15
    np.testing.assert_allclose(limited.window_nll_sums, result.window_nll_sums[:3], rtol=1e-6)


def test_a_uniform_model_has_perplexity_equal_to_the_vocabulary_size():
    """All-zero weights give uniform next-token probabilities: perplexity is exactly V."""
    graphdef, params = init_model(CFG, seed=0)
    graphdef, zero = load_params(CFG, jax.tree.map(np.zeros_like, nnx.to_pure_dict(params)))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 64)
    result = evaluate_perplexity(graphdef, zero, tokens, 16, 2, progress=False)
    np.testing.assert_allclose(result.perplexity, CFG.vocab_size, rtol=1e-6)


def test_sharded_batch_equals_single_device(model):
    graphdef, params = model
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, 10 * 16)
    single = evaluate_perplexity(graphdef, params, tokens, 16, 4, progress=False)
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2))
    graphdef_s, params_s = load_params(CFG, nnx.to_pure_dict(params), mesh)
    sharded = evaluate_perplexity(graphdef_s, params_s, tokens, 16, 4, mesh=mesh, progress=False)
    np.testing.assert_allclose(sharded.perplexity, single.perplexity, rtol=1e-5)
    assert sharded.num_eval_tokens == single.num_eval_tokens


def test_errors(model):
    graphdef, params = model
    with pytest.raises(DataError, match="fewer than one window"):
        evaluate_perplexity(graphdef, params, np.arange(10) % CFG.vocab_size, 16, progress=False)
    with pytest.raises(ConfigError, match="seq_len"):
        evaluate_perplexity(graphdef, params, np.arange(10), 1, progress=False)
    mesh = create_mesh(dict(data=8, fsdp=1, tensor=1))
    with pytest.raises(ShardingError, match="eval.batch_size=3"):
        evaluate_perplexity(graphdef, params, np.arange(64) % CFG.vocab_size, 16, 3, mesh=mesh, progress=False)
