"""Speculative decoding: greedy output equals the target's own (batch 1 and a ragged batch, stop ids, two drafts),
and the sampling rule reproduces the target's next-token distribution (chi-square on token frequencies)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from llmopt_jax.errors import ConfigError
from llmopt_jax.infer.generate import Generator, SamplingConfig, filter_logits
from llmopt_jax.infer.speculative import (SpeculativeGenerator, SpecState, self_draft, speculative_prefill,
                                          speculative_round)
from llmopt_jax.models.decoder import Decoder
from llmopt_jax.models.kv_cache import KVCache


def _model(cfg, seed: int, sharpness: float):
    """A random tiny decoder whose logits are scaled by ``sharpness`` (random init gives near-uniform ones)."""
    m = Decoder(cfg, rngs=nnx.Rngs(seed))
    m.final_norm.scale[...] = m.final_norm.scale[...] * sharpness
    return nnx.split(m)


@pytest.fixture(scope="module")
def target(tiny_cfg):
    return _model(dataclasses.replace(tiny_cfg, num_layers=3), 0, 4.0)


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]


def test_greedy_equals_target_self_draft(target):
    ref = Generator(*target).generate(PROMPTS, 20)
    gen = SpeculativeGenerator(target, 1, num_draft=3)  # the target's first layer drafts
    out = gen.generate(PROMPTS, 20)
    assert out.tokens == ref.tokens
    assert out.stopped == [False] * 3
    assert 0 < out.acceptance_rate <= 1 and 1 <= out.tokens_per_round <= 4
    assert out.rounds == out.decode_steps >= np.ceil(19 / 4)
    # A stop id that occurs mid-sequence in one row: that row ends before it, the others run on.
    stop = ref.tokens[0][6]
    ref_stop = Generator(*target).generate(PROMPTS, 20, stop_ids=[stop])
    out_stop = gen.generate(PROMPTS, 20, stop_ids=[stop])
    assert out_stop.tokens == ref_stop.tokens and out_stop.stopped == ref_stop.stopped
    assert out_stop.stopped[0]
    # Batch 1, a budget that ends mid-round.
    assert gen.generate(PROMPTS[:1], 7).tokens == [ref.tokens[0][:7]]
    assert gen.num_compiled == {"prefill": 2, "decode": 2}


def test_greedy_perfect_draft_accepts_everything(target, tiny_cfg):
    # The target drafting for itself: every draft is kept, k + 1 tokens per verify pass.
    out = SpeculativeGenerator(target, target, num_draft=2).generate(PROMPTS[1:2], 13)
    assert out.tokens == Generator(*target).generate(PROMPTS[1:2], 13).tokens
    assert out.acceptance_rate == 1.0 and out.rounds == 4 and out.tokens_per_round == 3.0


def test_sampled_generation_is_reproducible_per_seed(target):
    gen = SpeculativeGenerator(target, 1, num_draft=2)
    sampling = SamplingConfig(greedy=False, temperature=1.0, top_p=0.9)
    a, b = (gen.generate(PROMPTS[:2], 12, sampling, seed=3) for _ in range(2))
    c = gen.generate(PROMPTS[:2], 12, sampling, seed=4)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert [len(t) for t in a.tokens] == [12, 12] and all(0 <= x < 64 for t in a.tokens for x in t)
    assert sum(a.accepted) <= sum(a.drafted) <= 2 * 2 * a.rounds  # rows x k x rounds


def test_verify_drafts_greedy_rule():
    from llmopt_jax.infer.speculative import verify_drafts

    choice = np.asarray([[3, 5, 9, 2], [3, 5, 7, 2], [1, 5, 7, 2]])  # the target's argmax after last, d1, d2, d3
    logits = jnp.asarray(np.eye(10)[choice] * 5.0)
    drafts = jnp.asarray([[3, 5, 7]] * 3, jnp.int32)
    num_acc, new = verify_drafts(logits, jnp.zeros((3, 3, 10)), drafts, jax.random.key(0), SamplingConfig())
    assert num_acc.tolist() == [2, 3, 0] and new.tolist() == [9, 2, 1]  # correction, bonus, correction


def test_self_draft_shares_weights_and_checks(target, tiny_cfg):
    # Scanned layers are sliced (the greedy tests above use them); unrolled ones are the target's own arrays.
    unrolled = _model(dataclasses.replace(tiny_cfg, num_layers=3, scan_layers=False), 0, 1.0)
    gd, params = self_draft(*unrolled, 2)
    assert nnx.merge(gd, params).cfg.num_layers == 2
    t_leaves = {id(x) for x in jax.tree.leaves(unrolled[1])}
    assert all(id(x) in t_leaves for x in jax.tree.leaves(params))
    with pytest.raises(ConfigError):
        self_draft(*target, 3)
    with pytest.raises(ConfigError):
        SpeculativeGenerator(target, 1, num_draft=0)


def _chi_square_ok(samples: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(statistic, 99.9 % critical value) of a chi-square goodness-of-fit test of ``samples`` against ``p``;
    bins expected below 5 counts are pooled, and a token of probability 0 must never occur."""
    n = len(samples)
    counts = np.bincount(samples, minlength=len(p)).astype(float)
    assert counts[p == 0].sum() == 0
    big = n * p >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(n * p[big], n * p[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, float(stats.chi2.ppf(0.999, keep.sum() - 1))


def test_sampling_preserves_target_distribution(target, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, num_layers=3)
    draft = _model(dataclasses.replace(tiny_cfg, num_layers=1), 1, 4.0)  # an unrelated model: p != q
    sampling = SamplingConfig(greedy=False, temperature=0.9, top_k=24)
    k, n_rows, prompt, last = 3, 6000, [1, 2, 3, 4, 5], 7
    draft_cfg = nnx.merge(*draft).cfg
    tokens = jnp.asarray([prompt] * n_rows, jnp.int32)
    lengths = jnp.full((n_rows,), len(prompt), jnp.int32)

    def cache(c):
        return KVCache.create(c.num_layers, n_rows, 24, c.num_kv_heads, c.head_dim, jnp.float32)

    # One compiled round, called twice (the second round's first token matters where the first emitted only one).
    prefill = jax.jit(lambda key: speculative_prefill(*target, *draft, tokens, lengths, cache(cfg), cache(draft_cfg),
                                                      key, sampling)[1])
    one_round = jax.jit(lambda state, key: speculative_round(*target, *draft, state, key, sampling, k)[:3])
    key = jax.random.key(0)
    state = prefill(key)
    state = SpecState(state.target_cache, state.draft_cache, jnp.full((n_rows,), last, jnp.int32))
    state, t1, n1 = one_round(state, jax.random.fold_in(key, 1))
    _, t2, _ = one_round(state, jax.random.fold_in(key, 2))
    t1, n1, t2 = np.asarray(t1), np.asarray(n1), np.asarray(t2)
    first = t1[:, 0]
    second = np.where(n1 >= 2, t1[:, 1], t2[:, 0])

    @functools.partial(jax.jit, static_argnums=2)
    def probs(params, seq, graphdef):
        logits, _ = nnx.merge(graphdef, params)(seq)
        return jax.nn.softmax(filter_logits(logits[0, -1], sampling))

    def dist(model, seq):
        return np.asarray(probs(model[1], jnp.asarray([seq], jnp.int32), model[0]), np.float64)

    p1, q1 = dist(target, prompt + [last]), dist(draft, prompt + [last])
    stat, crit = _chi_square_ok(first, p1)
    assert stat < crit, (stat, crit)
    # The test has power: samples from the draft alone would fail it by far.
    assert n_rows * np.sum((q1 - p1) ** 2 / np.where(p1 > 0, p1, 1)) > 10 * crit or np.any((q1 > 0) & (p1 == 0))
    # The first draft token is kept with probability sum_x min(p(x), q(x)) (the paper's acceptance rate).
    alpha = np.minimum(p1, q1).sum()
    assert abs((n1 >= 2).mean() - alpha) < 5 * np.sqrt(alpha * (1 - alpha) / n_rows)
    # The second token, given the most frequent first one, follows the target's conditional distribution.
    a = int(np.bincount(first).argmax())
    stat, crit = _chi_square_ok(second[first == a], dist(target, prompt + [last, a]))
    assert stat < crit, (stat, crit)


@pytest.mark.slow
def test_bench_speculative_smoke_on_smollm2(tmp_path):
    # The real model, its first 24 layers drafting: greedy output identical, the statistics reported.
    from conftest import run_cli

    proc = run_cli(["experiments.bench_speculative", "--config=configs/bench_speculative.py:smoke",
                    "--config.drafts=self", "--config.max_new_tokens=6", f"--workdir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    r = json.loads((tmp_path / "results.json").read_text())
    assert r["self_greedy_identical"] is True
    assert 0 <= r["self_acceptance_rate"] <= 1 and 1 <= r["self_tokens_per_target_forward"] <= 5
    assert r["self_speedup"] > 0 and r["plain_seconds"] > 0


@pytest.mark.parametrize("args, message", [
    (["experiments.generate", "--config=configs/generate.py:smoke", "--config.draft_layers=2",
      "--config.draft_model=x"], "set draft_layers (self-speculative) or draft_model, not both"),
    (["experiments.bench_speculative", "--config=configs/bench_speculative.py:smoke", "--config.drafts=self,big"],
     "drafts"),
])
def test_cli_errors_before_loading(tmp_path, args, message):
    from conftest import run_cli

    proc = run_cli(args + [f"--workdir={tmp_path}/w"], timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()
