"""The serving engine: paged attention equals the contiguous cache, the page pool's reference counts and prefix
cache, and continuous batching (random arrivals, chunk sizes, page sizes, preemption, prefix hits, static mode)
giving every request exactly the greedy tokens of single-request ``Generator``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_CFG
from llmopt_jax.errors import ConfigError
from llmopt_jax.infer.generate import Generator
from llmopt_jax.models.attention import causal_mask, xla_attention
from llmopt_jax.models.decoder import Decoder
from llmopt_jax.serve.engine import Engine, EngineConfig, prefill_bucket
from llmopt_jax.serve.kv_pages import PagePool, gather_pages, page_hashes, paged_attention, scatter_tokens
from llmopt_jax.serve.scheduler import SamplingParams

# A larger init scale than training's so greedy continuations vary instead of repeating one token.
CFG = dataclasses.replace(TINY_CFG, max_seq_len=128, init_std=0.3)
MAX_NEW = 12


@pytest.fixture(scope="module")
def model():
    return nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def unrolled(prompts):
    """The same shape with unrolled layers (the engine's per-layer paged path) and its Generator reference."""
    graphdef, params = nnx.split(Decoder(dataclasses.replace(CFG, scan_layers=False), rngs=nnx.Rngs(0)))
    gen = Generator(graphdef, params)
    return (graphdef, params), [gen.generate([p], MAX_NEW).tokens[0] for p in prompts]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    # Lengths up to 16: one Generator prompt bucket (one compile), still several chunks and pages each.
    out = [rng.integers(0, CFG.vocab_size, size=int(n)).tolist() for n in rng.integers(1, 17, size=9)]
    out.append(out[0][:5] + out[1])  # shares nothing page-aligned beyond its own pages
    shared = rng.integers(0, CFG.vocab_size, size=12).tolist()  # a "system prompt" two requests share
    out += [shared + [1, 2], shared + [3]]
    return out


@pytest.fixture(scope="module")
def reference(model, prompts):
    gen = Generator(*model)
    return [gen.generate([p], MAX_NEW).tokens[0] for p in prompts]


def test_prefill_buckets_are_half_octaves_that_hold_the_chunk():
    buckets = {prefill_bucket(n) for n in range(1, 513)}
    assert sorted(buckets) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    for n in range(1, 513):
        b = prefill_bucket(n)
        assert b >= n and (n <= 16 or b <= 1.5 * n)  # at most a third of a padded chunk is padding
    assert prefill_bucket(5, minimum=4) == 6 and prefill_bucket(3, minimum=4) == 4


def test_paged_attention_equals_contiguous_cache_under_random_page_tables():
    rng = np.random.default_rng(1)
    b, l, h, k, d, ps, pages_per_seq, num_pages = 3, 5, 4, 2, 8, 4, 6, 32
    q = jnp.asarray(rng.normal(size=(b, l, h, d)), jnp.float32)
    contiguous_k = jnp.asarray(rng.normal(size=(b, pages_per_seq * ps, k, d)), jnp.float32)
    contiguous_v = jnp.asarray(rng.normal(size=(b, pages_per_seq * ps, k, d)), jnp.float32)
    # Each sequence gets distinct random pages (never the null page 0) in a random order.
    table = jnp.asarray(rng.permutation(np.arange(1, num_pages))[:b * pages_per_seq].reshape(b, pages_per_seq),
                        jnp.int32)
    pool_k = jnp.zeros((1, num_pages, ps, k, d))
    pool_v = jnp.zeros((1, num_pages, ps, k, d))
    everything = jnp.full((b,), pages_per_seq * ps, jnp.int32)
    pool_k = scatter_tokens(pool_k, table, jnp.zeros((b,), jnp.int32), contiguous_k[None], everything)
    pool_v = scatter_tokens(pool_v, table, jnp.zeros((b,), jnp.int32), contiguous_v[None], everything)
    np.testing.assert_array_equal(gather_pages(pool_k, table)[0], contiguous_k)
    lengths = jnp.asarray([3, 11, 24 - l], jnp.int32)
    positions = lengths[:, None] + jnp.arange(l)[None]
    s = pages_per_seq * ps
    expected = xla_attention(q, contiguous_k, contiguous_v,
                             causal_mask(positions, jnp.broadcast_to(jnp.arange(s), (b, s))))
    got = paged_attention(q, pool_k[0], pool_v[0], table, positions)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_scatter_sends_padding_to_the_null_page():
    pool = jnp.zeros((1, 4, 2, 1, 1))
    table = jnp.asarray([[2, 3]], jnp.int32)
    new = jnp.arange(1, 4, dtype=jnp.float32).reshape(1, 1, 3, 1, 1)
    out = scatter_tokens(pool, table, jnp.asarray([1]), new, jnp.asarray([2]))
    np.testing.assert_array_equal(out[0, 2, :, 0, 0], [0, 1])  # position 1 -> page 2, offset 1
    np.testing.assert_array_equal(out[0, 3, :, 0, 0], [2, 0])  # position 2 -> page 3, offset 0
    np.testing.assert_array_equal(out[0, 1], 0)  # untouched


def test_page_pool_refcounts_prefix_cache_and_eviction():
    pool = PagePool(num_pages=5, page_size=2)
    a = pool.allocate(3)
    assert 0 not in a and pool.num_available == 1
    hashes = page_hashes([1, 2, 3, 4, 5], 2)
    assert len(hashes) == 2 and page_hashes([1, 2, 3, 9], 2)[0] == hashes[0] != page_hashes([1, 3, 3, 4], 2)[0]
    pool.register(a[0], hashes[0])
    pool.register(a[1], hashes[1])
    assert pool.match_prefix(hashes) == a[:2] and pool.refcount[a[0]] == 2
    pool.release(a)
    pool.release(a[:2])
    assert pool.num_used == 0 and pool.num_available == 4  # two free + two idle cached
    assert pool.match_prefix(hashes[:1]) == a[:1]  # an idle cached page comes back
    pool.release(a[:1])
    assert pool.allocate(5) is None
    got = pool.allocate(4)  # evicts both cached pages, LRU first
    assert sorted(got) == [1, 2, 3, 4] and pool.match_prefix(hashes) == []
    assert pool.prefix_hits == 3 and pool.prefix_queries == 5


def run_with_arrivals(engine, prompts, params, seed, max_steps=2000):
    """Adds the prompts at random steps (a few per step, random order) and steps until everything finished."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))
    pending = list(order)
    outputs = {}
    ids = {}
    for _ in range(max_steps):
        for _ in range(int(rng.integers(0, 3))):
            if pending:
                i = pending.pop(0)
                ids[engine.add_request(prompts[i], params)] = i
        if not pending and not engine.has_unfinished():
            break
        for o in engine.step():
            outputs.setdefault(ids[o.request_id], []).extend(o.token_ids)
    assert not pending and not engine.has_unfinished()
    return [outputs.get(i, []) for i in range(len(prompts))]


@pytest.mark.parametrize("config, seed, scan", [
    # Small pool: preemption by recomputation; tiny chunks: many chunks per prompt.
    (EngineConfig(page_size=4, num_pages=12, max_running=4, prefill_budget=5, max_decode_steps=4,
                  min_batch_bucket=4, min_pages_bucket=8), 0, True),
    # Larger pages, shortest-prompt-first, long multi-step decode dispatches, no prefix cache.
    (EngineConfig(page_size=8, num_pages=64, max_running=8, prefill_budget=16, max_decode_steps=8, policy="spf",
                  prefix_caching=False, min_batch_bucket=8, min_pages_bucket=4), 1, True),
    # Unrolled layers (per-layer gather and in-place page writes), small pool: preemption again.
    (EngineConfig(page_size=4, num_pages=14, max_running=4, prefill_budget=6, max_decode_steps=4,
                  min_batch_bucket=4, min_pages_bucket=8), 3, False),
    # Static batching (the benchmark's baseline) with odd page size.
    (EngineConfig(page_size=3, num_pages=64, max_running=3, prefill_budget=16, max_decode_steps=4, mode="static",
                  min_batch_bucket=4, min_pages_bucket=16), 2, True),
])
def test_greedy_continuous_batching_equals_single_request_generator(model, unrolled, prompts, reference, config,
                                                                   seed, scan):
    if not scan:
        model, reference = unrolled
    engine = Engine(*model, config)
    got = run_with_arrivals(engine, prompts, SamplingParams(max_tokens=MAX_NEW), seed)
    assert got == reference
    m = engine.metrics()
    assert m["kv_pages_used"] == 0 and m["running"] == m["waiting"] == 0
    if config.num_pages <= 14:
        assert m["preemptions"] > 0
    if config.prefix_caching:
        assert m["prefix_cache_hits"] > 0
    # One executable each: the step count is traced, the prefill page table spans the whole context.
    assert engine._decode._cache_size() == 1 and engine._prefill._cache_size() == 1


def test_seeded_sampling_ignores_batch_composition_and_stops(model, prompts):
    config = EngineConfig(page_size=4, num_pages=64, max_running=4, prefill_budget=8, max_decode_steps=4,
                          min_batch_bucket=4, min_pages_bucket=8)
    engine = Engine(*model, config)
    hot = SamplingParams(max_tokens=MAX_NEW, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    alone = engine.generate([prompts[2]], hot)[0]
    crowd = engine.generate(prompts[:4], [SamplingParams(max_tokens=MAX_NEW, temperature=1.0, seed=i)
                                          for i in range(2)] + [hot, SamplingParams(max_tokens=MAX_NEW)])
    assert crowd[2] == alone and len(alone) == MAX_NEW
    assert engine.generate([prompts[2]], dataclasses.replace(hot, seed=8))[0] != alone
    # A stop id ends the answer before it; max_tokens caps it.
    greedy = engine.generate([prompts[3]], SamplingParams(max_tokens=MAX_NEW))[0]
    stop_at = greedy[4]
    first = greedy.index(stop_at)
    assert engine.generate([prompts[3]], SamplingParams(max_tokens=MAX_NEW, stop_ids=(stop_at,)))[0] == greedy[:first]
    assert engine.generate([prompts[3]], SamplingParams(max_tokens=3))[0] == greedy[:3]


class LetterTokenizer:
    """Token ``i`` is the letter ``chr(ord('a') + i % 26)`` (enough for stop strings and text deltas)."""

    def decode(self, ids):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_stop_strings_cut_text_and_deltas_add_up(model, prompts):
    engine = Engine(*model, EngineConfig(page_size=4, num_pages=64, max_running=4, prefill_budget=8,
                                         max_decode_steps=4, min_batch_bucket=4, min_pages_bucket=8),
                    tokenizer=LetterTokenizer())
    greedy = engine.generate([prompts[5]], SamplingParams(max_tokens=MAX_NEW))[0]
    full = LetterTokenizer().decode(greedy)
    stop = full[5:7]
    engine.add_request(prompts[5], SamplingParams(max_tokens=MAX_NEW, stop=(stop,)))
    text, reason = "", None
    for _ in range(100):
        for o in engine.step():
            text += o.text
            reason = o.finish_reason or reason
        if not engine.has_unfinished():
            break
    assert text == full[:full.index(stop)] and reason == "stop"


def test_requests_that_cannot_fit_are_refused(model):
    engine = Engine(*model, EngineConfig(page_size=4, num_pages=8))
    with pytest.raises(ConfigError, match="exceeds the context"):
        engine.add_request([1] * 100, SamplingParams(max_tokens=40))
    with pytest.raises(ConfigError, match="KV pages"):
        engine.add_request([1] * 20, SamplingParams(max_tokens=20))
    with pytest.raises(ConfigError, match="token ids"):
        engine.add_request([CFG.vocab_size], SamplingParams())
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_abort_frees_pages(model, prompts):
    engine = Engine(*model, EngineConfig(page_size=4, num_pages=64, max_running=4, prefill_budget=8,
                                         min_batch_bucket=4, min_pages_bucket=8))
    rid = engine.add_request(prompts[0], SamplingParams(max_tokens=MAX_NEW))
    engine.step()
    assert engine.metrics()["kv_pages_used"] > 0
    engine.abort(rid)
    assert engine.metrics()["kv_pages_used"] == 0 and not engine.has_unfinished()


def test_static_batching_keeps_its_admitted_width_until_the_batch_drains(model, prompts):
    engine = Engine(*model, EngineConfig(page_size=4, num_pages=64, max_running=8, prefill_budget=64,
                                         max_decode_steps=2, mode="static", min_batch_bucket=1))
    widths = []
    decode = engine._decode
    engine._decode = lambda params, kv, tokens, *a: (widths.append(len(tokens)), decode(params, kv, tokens, *a))[1]
    for i, p in enumerate(prompts[:5]):  # one long request among short ones
        engine.add_request(p, SamplingParams(max_tokens=12 if i == 0 else 2))
    while engine.has_unfinished():
        engine.step()
    assert widths and set(widths) == {8}  # 5 admitted -> bucket 8, also once only the long request is left


@pytest.mark.parametrize("num_draft", [3])
def test_self_speculative_decoding_in_the_engine_gives_the_greedy_tokens(model, prompts, reference, num_draft):
    from llmopt_jax.serve.speculative import SelfSpeculativeDecode

    strategy = SelfSpeculativeDecode(draft_layers=1, num_draft=num_draft)
    engine = Engine(*model, EngineConfig(page_size=4, num_pages=128, max_running=8, prefill_budget=32,
                                         max_decode_steps=8, min_batch_bucket=4), decode_strategy=strategy)
    got = run_with_arrivals(engine, prompts, SamplingParams(max_tokens=MAX_NEW), 0)
    assert got == reference
    assert strategy.rounds > 0 and 0 <= strategy.accepted <= strategy.proposed
    assert engine.metrics()["kv_pages_used"] == 0


def test_logprobs_are_the_models_log_softmax_at_every_generated_token(model, prompts):
    """Greedy and sampled requests, mixed with requests that ask for none, several tokens per dispatch and a
    prompt split in chunks: each token's log-probability and its top alternatives equal a full forward pass of the
    prompt plus the answer. (The layer layouts differ only in the forward, which the tests above compare.)"""
    graphdef, params = model
    engine = Engine(graphdef, params, EngineConfig(page_size=4, num_pages=128, prefill_budget=6, max_decode_steps=3))
    asks = [SamplingParams(max_tokens=7, logprobs=3), SamplingParams(max_tokens=5),
            SamplingParams(max_tokens=6, temperature=0.8, seed=1, logprobs=0)]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:3], asks)]
    tokens = {i: [] for i in ids}
    logprobs = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] += o.token_ids
            if o.logprobs is None:
                assert asks[ids.index(o.request_id)].logprobs is None
            else:
                assert [lp.token_id for lp in o.logprobs] == o.token_ids
                logprobs[o.request_id] += o.logprobs
    module = nnx.merge(graphdef, params)
    for rid, prompt, sp in zip(ids, prompts[:3], asks):
        if sp.logprobs is None:
            assert logprobs[rid] == []
            continue
        full = jnp.asarray([prompt + tokens[rid]], jnp.int32)
        reference = np.asarray(jax.nn.log_softmax(module(full)[0].astype(jnp.float32), axis=-1))[0]
        got = logprobs[rid]
        assert len(got) == len(tokens[rid]) == sp.max_tokens
        for j, lp in enumerate(got):
            row = reference[len(prompt) - 1 + j]
            np.testing.assert_allclose(lp.logprob, row[lp.token_id], rtol=1e-4, atol=1e-4)
            assert len(lp.top) == sp.logprobs
            order = np.argsort(-row, kind="stable")[:sp.logprobs]
            np.testing.assert_allclose([v for _, v in lp.top], row[order], rtol=1e-4, atol=1e-4)
            if sp.temperature == 0 and lp.top:
                assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token


def test_logprobs_bad_values_and_speculative_refusal(model):
    with pytest.raises(ConfigError, match="logprobs must be in"):
        SamplingParams(logprobs=21)
    from llmopt_jax.serve.speculative import SelfSpeculativeDecode

    engine = Engine(*model, EngineConfig(page_size=4, num_pages=32), decode_strategy=SelfSpeculativeDecode(1, 2))
    with pytest.raises(ConfigError, match="not available with speculative decoding"):
        engine.add_request([1, 2, 3], SamplingParams(logprobs=1))
