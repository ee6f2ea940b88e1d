"""Generation: cached prefill/decode equals a full forward per token; sampling; compile-once; stops; seeds."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from conftest import TINY_CFG
from llmopt_jax.errors import ConfigError
from llmopt_jax.infer.generate import Generator, SamplingConfig, bucket_length, sample_logits
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.sharded_init import init_model

CFG = dataclasses.replace(TINY_CFG, max_seq_len=128)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=5)


def naive_greedy(graphdef, params, prompt, steps, width=32):
    """Argmax continuation by re-running the whole sequence without a cache at every step.

    The sequence is right-padded to a fixed width (causal attention: padding after position i cannot change
    position i's logits), so the forward compiles once.
    """
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0][0])
    ids = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(ids)] = ids
        ids.append(int(jnp.argmax(forward(params, jnp.asarray(padded))[len(ids) - 1])))
    return ids[len(prompt):]


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def test_greedy_batch_of_ragged_prompts_equals_full_forward(model):
    graphdef, params = model
    batch = prompts([3, 11, 7])
    out = Generator(graphdef, params).generate(batch, 12)
    for p, got in zip(batch, out.tokens):
        assert got == naive_greedy(graphdef, params, p, 12)
    assert out.stopped == [False, False, False] and out.decode_steps == 11


def test_decode_compiles_once_and_prompts_share_buckets(model):
    graphdef, params = model
    gen = Generator(graphdef, params)
    first = gen.generate(prompts([5]), 20)
    again = gen.generate(prompts([9], seed=1), 20)  # same bucket (16), same cache length
    assert gen.num_compiled == {"prefill": 1, "decode": 1}
    assert first.seconds_compile > 0 and again.seconds_compile == 0
    gen.generate(prompts([20]), 20)  # bucket 32: one more prefill and decode shape
    assert gen.num_compiled == {"prefill": 2, "decode": 2}
    assert [bucket_length(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_stop_tokens_end_each_sequence_independently(model):
    graphdef, params = model
    gen = Generator(graphdef, params)
    batch = prompts([4, 6], seed=3)
    free = gen.generate(batch, 10).tokens
    stop = free[0][3]
    out = gen.generate(batch, 10, stop_ids=[stop])
    assert out.tokens[0] == free[0][: free[0].index(stop)] and out.stopped[0]
    expected_1 = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert out.tokens[1] == expected_1


def test_sampling_is_reproducible_per_seed(model):
    graphdef, params = model
    gen = Generator(graphdef, params)
    sampling = SamplingConfig(greedy=False, temperature=1.5)
    a = gen.generate(prompts([4]) * 2, 16, sampling, seed=7).tokens
    b = gen.generate(prompts([4]) * 2, 16, sampling, seed=7).tokens
    c = gen.generate(prompts([4]) * 2, 16, sampling, seed=8).tokens
    assert a == b and a != c
    assert a[0] != a[1]  # rows of a batch draw independently


def test_bfloat16_cache_and_compute_stay_close_to_float32(model):
    graphdef, params = model
    out32 = Generator(graphdef, params).generate(prompts([6]), 8)
    out16 = Generator(graphdef, params, cache_dtype=jnp.bfloat16).generate(prompts([6]), 8)
    assert out16.tokens[0][:3] == out32.tokens[0][:3]


def test_sample_logits_support_and_frequencies():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
    key = jax.random.key(0)

    def draw(**kw):
        return np.asarray(sample_logits(logits, key, SamplingConfig(greedy=False, **kw)))

    freq = np.bincount(draw(), minlength=4) / 20000
    np.testing.assert_allclose(freq, probs, atol=0.015)
    assert set(draw(top_k=2)) == {0, 1}
    freq = np.bincount(draw(top_p=0.7), minlength=4) / 20000  # 0.5 + 0.3 reaches 0.7: keep two tokens
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    assert set(draw(top_p=0.4)) == {0}  # the most likely token always survives
    cold = np.bincount(draw(temperature=0.25), minlength=4) / 20000
    assert cold[0] > 0.85
    assert (np.asarray(sample_logits(logits[:3], key, SamplingConfig())) == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(greedy=False, temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p")],
)
def test_sampling_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)


def test_generation_errors(model):
    graphdef, params = model
    gen = Generator(graphdef, params)
    with pytest.raises(ConfigError, match="context of 128"):
        gen.generate(prompts([40]), 100)
    with pytest.raises(ConfigError, match="at least one token"):
        gen.generate([[]], 4)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        gen.generate(prompts([4]), 0)


def test_half_precision_single_prompt_on_cpu_is_padded_to_two_rows():
    cfg = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
    graphdef, params = init_model(cfg, seed=5)
    gen = Generator(graphdef, params)
    assert gen.min_batch == (2 if jax.default_backend() == "cpu" else 1)
    single = gen.generate(prompts([5]), 6, stop_ids=[])
    pair = gen.generate(prompts([5]) * 2, 6)
    assert len(single.tokens) == 1 and single.tokens[0] == pair.tokens[0]
    assert single.prompt_lengths == [5] and len(single.stopped) == 1


@pytest.mark.parametrize("stop_first", [False, True])
def test_several_steps_per_dispatch_equal_one_step_per_dispatch(model, stop_first):
    graphdef, params = model
    batch = prompts([3, 9, 5], seed=4)
    sampling = SamplingConfig(temperature=0.8, top_k=20)
    one = Generator(graphdef, params, steps_per_dispatch=1)
    free = one.generate(batch, 15, sampling, seed=2).tokens
    stop_ids = [free[0][2]] if stop_first else []  # sequence 0 stops early, mid-dispatch
    streamed = []
    ref = one.generate(batch, 15, sampling, seed=2, stop_ids=stop_ids)
    for chunk in (4, 7, 32):
        got = Generator(graphdef, params, steps_per_dispatch=chunk).generate(
            batch, 15, sampling, seed=2, stop_ids=stop_ids, on_token=lambda t: streamed.append(t.tolist()))
        assert got.tokens == ref.tokens and got.stopped == ref.stopped and got.decode_steps == ref.decode_steps
    assert len(streamed) == 3 * (ref.decode_steps + 1)  # on_token still sees every step, in order
    free_one = one.generate(batch[:1], 6, sampling, seed=2).tokens[0]
    first = free_one.index(free_one[3])  # where the stop id first comes
    everyone_stops = Generator(graphdef, params, steps_per_dispatch=8).generate(
        batch[:1], 15, sampling, seed=2, stop_ids=[free_one[3]])
    assert everyone_stops.stopped == [True] and everyone_stops.decode_steps == first  # the loop left at the stop
