"""Speculative decoding (Leviathan et al., 2023): a cheap draft proposes ``k`` tokens, the target verifies them in
one forward pass over its KV cache and keeps the longest acceptable prefix plus one token of its own.

Greedy decoding keeps a draft token while it equals the target's argmax, so the output is the target's own greedy
output token for token. Sampling keeps draft token ``d`` with probability ``min(1, p(d) / q(d))`` (``p`` target,
``q`` draft, both after temperature / top-k / top-p) and at the first rejection draws from ``max(0, p - q)``
renormalised; when all ``k`` are kept it draws a bonus token from the target's next distribution. Every emitted
token is then distributed exactly as the target's (the paper's Theorem 1).

Any decoder with the target's vocabulary can draft: a compressed copy (``lj.compress``), or the first layers of the
target itself (:func:`self_draft`, sharing its weights; early exit through the final norm and tied head).

The pieces, smallest first:

- :func:`verify_drafts` -- the acceptance rule alone, on the two models' logits: for a caller that runs the
  models itself (a serving engine over a paged cache).
- :func:`speculative_round` -- one propose/verify round over :class:`SpecState` (both contiguous KV caches, the
  newest token). Pure and jittable: the hook for a caller that owns its own batching and stop logic.
- :func:`speculative_prefill` -- runs the prompts through both models and returns the first token and the state.
- :class:`SpeculativeGenerator` -- ``generate()`` like :class:`~llmopt_jax.infer.generate.Generator` (same
  arguments, a :class:`~llmopt_jax.infer.generate.Generation` result with acceptance statistics); all rounds run in
  one ``lax.while_loop`` with the stop checks on device, so the host sees the tokens once, at the end.

Cache bookkeeping. Sequence ``b`` has committed tokens ``x_0 .. x_n`` (``n = target_cache.lengths[b]``); the
target cache holds ``x_0 .. x_{n-1}`` and ``last = x_n`` is fed at the start of the next verify pass. Rejected
tokens are rolled back by lowering ``lengths`` only: a slot beyond a sequence's length is masked by causality and
overwritten later. The draft runs ``k + 1`` one-token steps (``last, d_1 .. d_k``), the last only to write ``d_k``
into its cache, so after any number of accepted drafts it too holds every committed token: one length serves both.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from llmopt_jax.errors import ConfigError
from llmopt_jax.infer.generate import Generation, SamplingConfig, bucket_length, count_by_kind, filter_logits
from llmopt_jax.models.kv_cache import KVCache


@struct.dataclass
class SpecState:
    """What one speculative round reads and writes, per sequence of the batch.

    ``target_cache`` / ``draft_cache``: the two models' KV caches, both holding the ``n`` committed tokens before
    ``last`` (``target_cache.lengths`` int32 ``[B]`` is ``n``; the draft cache's own ``lengths`` are ignored).
    ``last`` int32 ``[B]``: the newest token ``x_n``, not yet in either cache.
    """

    target_cache: KVCache
    draft_cache: KVCache
    last: jax.Array


def self_draft(graphdef: nnx.GraphDef, params: nnx.State, num_layers: int) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of the first ``num_layers`` blocks of a decoder, then its final norm and head.

    With unrolled layers (``scan_layers=False``, what generation uses) the returned parameters are the target's
    own arrays, so the draft costs no memory beyond its KV cache; stacked (scanned) layers are sliced (a copy).
    """
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    if not 1 <= num_layers < cfg.num_layers:
        raise ConfigError(f"a self-speculative draft needs 1 <= draft layers < {cfg.num_layers}, got {num_layers}")
    new_cfg = dataclasses.replace(cfg, num_layers=num_layers)
    if cfg.scan_layers:
        layer_graph, layer_state = nnx.split(model.layers)
        model.layers = nnx.merge(layer_graph, jax.tree.map(lambda x: x[:num_layers], layer_state))
    else:
        model.layers = nnx.List(list(model.layers)[:num_layers])
    model.cfg = new_cfg
    return nnx.split(model)


def _as_pair(model: Any) -> tuple[nnx.GraphDef, nnx.State]:
    if isinstance(model, tuple):
        return model
    return model.graphdef, model.params


def _pick(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Draft token int32 ``[B]`` from processed logits ``[B, V]`` (argmax when greedy)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _processed(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    return logits.astype(jnp.float32) if sampling.greedy else filter_logits(logits, sampling)


def verify_drafts(
    target_logits: jax.Array, draft_logits: jax.Array | None, drafts: jax.Array, key: jax.Array | None,
    sampling: SamplingConfig,
) -> tuple[jax.Array, jax.Array]:
    """The acceptance rule alone, for callers that run the two models themselves (a serving engine, paged caches).

    ``target_logits`` float ``[B, k + 1, V]``: the target's raw logits after ``last, d_1 .. d_k``; ``draft_logits``
    float ``[B, k, V]``: the draft's logits each ``d_i`` was drawn from, already through :func:`filter_logits` when
    sampling (unused when greedy: None is fine there, as is ``key``); ``drafts`` int32 ``[B, k]``. Returns (``num_accepted`` int32 ``[B]`` in
    ``0 .. k``, ``new_token`` int32 ``[B]``: the target's correction at the first rejection or its bonus token after
    ``d_k``). Greedy keeps ``d_i`` while it is the target's argmax; sampling keeps it with probability
    ``min(1, p/q)`` and draws the new token from ``max(0, p - q)`` renormalised (``p`` after ``d_k``).
    """
    k = drafts.shape[1]
    p_logits = _processed(target_logits, sampling)  # [B, k + 1, V]
    if sampling.greedy:
        target_choice = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)  # [B, k + 1]
        kept = drafts == target_choice[:, :k]
        num_acc = jnp.sum(jnp.cumprod(kept, axis=1), axis=1).astype(jnp.int32)
        return num_acc, jnp.take_along_axis(target_choice, num_acc[:, None], axis=1)[:, 0]
    accept_key, resid_key = jax.random.split(key)
    p = jax.nn.softmax(p_logits, axis=-1)
    q = jax.nn.softmax(draft_logits.astype(jnp.float32), axis=-1)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(accept_key, p_d.shape)
    kept = u * q_d < p_d  # u < p/q without dividing; q_d > 0 since d was drawn from q
    num_acc = jnp.sum(jnp.cumprod(kept, axis=1), axis=1).astype(jnp.int32)
    # A zero draft row after the last makes the residual at index k the target's own bonus distribution.
    q_ext = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    p_m = jnp.take_along_axis(p, num_acc[:, None, None], axis=1)[:, 0]
    q_m = jnp.take_along_axis(q_ext, num_acc[:, None, None], axis=1)[:, 0]
    resid = jnp.maximum(p_m - q_m, 0.0)
    # p == q up to rounding leaves no residual mass (rejection then had probability ~0): fall back to p.
    resid = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0, resid, p_m)
    return num_acc, jax.random.categorical(resid_key, jnp.log(resid), axis=-1).astype(jnp.int32)


def speculative_round(
    target_graphdef: nnx.GraphDef,
    target_params: nnx.State,
    draft_graphdef: nnx.GraphDef,
    draft_params: nnx.State,
    state: SpecState,
    key: jax.Array,
    sampling: SamplingConfig,
    num_draft: int,
    active: jax.Array | None = None,
) -> tuple[SpecState, jax.Array, jax.Array, jax.Array]:
    """One propose/verify round (``k = num_draft``): ``k + 1`` one-token draft passes, one target pass of ``k + 1``.

    Returns ``(state, tokens, num_new, num_accepted)``: ``tokens`` int32 ``[B, k + 1]`` whose first ``num_new``
    int32 ``[B]`` (``1 .. k + 1``) entries are the newly committed tokens (accepted drafts, then the target's
    correction or bonus token, which becomes ``state.last``); ``num_accepted`` = ``num_new - 1`` drafts kept.
    Rows where ``active`` bool ``[B]`` is False keep their state and report ``num_new = 0``.

    Both caches need ``k + 1`` free slots past ``n`` in every row: ``lengths + k + 1 <= max_len`` (an inactive row
    beyond that is still computed and its cache tail clobbered).
    """
    k = num_draft
    if k < 1:
        raise ConfigError(f"num_draft must be at least 1, got {k}")
    target, draft = nnx.merge(target_graphdef, target_params), nnx.merge(draft_graphdef, draft_params)
    n = state.target_cache.lengths
    if active is None:
        active = jnp.ones_like(n, dtype=bool)
    draft_keys = jax.random.split(jax.random.fold_in(key, 0), k + 1)

    # Propose: one token per draft step (on XLA:CPU a two-token pass costs twice a one-token one: 180 vs 91 ms for
    # SmolLM2). k + 1 steps: the last feeds d_k, whose proposal is unused, so that the draft cache holds every token
    # before the next round's `last` whatever is accepted; one step shape keeps one draft copy in the program.
    def propose(carry, step_key):
        tok, cache = carry
        logits, cache = draft(tok[:, None], cache=cache)
        q = _processed(logits[:, -1], sampling)
        nxt = _pick(q, step_key, sampling)
        return (nxt, cache), (nxt, q)

    dcache = dataclasses.replace(state.draft_cache, lengths=n)
    (_, dcache), (proposed, q_logits) = jax.lax.scan(propose, (state.last, dcache), draft_keys)
    drafts, q_logits = proposed[:k].T, jnp.swapaxes(q_logits[:k], 0, 1)  # [B, k], [B, k, V]

    # Verify: the target scores last and all k drafts in one pass; p[:, i] is its distribution for drafts[:, i].
    seq = jnp.concatenate([state.last[:, None], drafts], axis=1)  # [B, k + 1] = x_n, d_1 .. d_k
    logits, tcache = target(seq, cache=state.target_cache)
    num_acc, new_tok = verify_drafts(logits, q_logits, drafts, jax.random.fold_in(key, 1), sampling)

    positions = jnp.arange(k + 1)[None, :]
    tokens = jnp.where(positions == num_acc[:, None], new_tok[:, None],
                       jnp.concatenate([drafts, drafts[:, -1:]], axis=1))
    lengths = jnp.where(active, n + num_acc + 1, n)
    new_state = SpecState(
        target_cache=dataclasses.replace(tcache, lengths=lengths),
        draft_cache=dataclasses.replace(dcache, lengths=lengths),
        last=jnp.where(active, new_tok, state.last),
    )
    num_new = jnp.where(active, num_acc + 1, 0).astype(jnp.int32)
    return new_state, tokens, num_new, jnp.where(active, num_acc, 0).astype(jnp.int32)


def speculative_prefill(
    target_graphdef, target_params, draft_graphdef, draft_params, tokens: jax.Array, lengths: jax.Array,
    target_cache: KVCache, draft_cache: KVCache, key: jax.Array, sampling: SamplingConfig,
) -> tuple[jax.Array, SpecState]:
    """Runs right-padded prompts int32 ``[B, Lb]`` (true ``lengths`` ``[B]``, each >= 1) through both models.

    Returns (first new token int32 ``[B]``, drawn from the target; the :class:`SpecState` to continue from).
    """
    from llmopt_jax.infer.generate import sample_logits

    target, draft = nnx.merge(target_graphdef, target_params), nnx.merge(draft_graphdef, draft_params)
    logits, tcache = target(tokens, cache=target_cache, logit_index=lengths - 1)
    first = sample_logits(logits[:, 0], key, sampling)
    # The draft needs only the cache; one logit row keeps its vocabulary projection small.
    _, dcache = draft(tokens, cache=draft_cache, logit_index=lengths - 1)
    state = SpecState(
        target_cache=dataclasses.replace(tcache, lengths=lengths),
        draft_cache=dataclasses.replace(dcache, lengths=lengths),
        last=first,
    )
    return first, state


def _decode_loop(target_graphdef, target_params, draft_graphdef, draft_params, first, state, key, stop_ids,
                 done, *, sampling: SamplingConfig, num_draft: int, max_new_tokens: int):
    """Rounds until every row is done, in one ``while_loop``; returns (tokens ``[B, max_new + k + 1]``, counts
    ``[B]``, stopped ``[B]``, rounds, accepted ``[B]``, drafted ``[B]``)."""
    k = num_draft
    b = first.shape[0]
    is_stop = lambda t: jnp.any(t[..., None] == stop_ids, axis=-1)  # noqa: E731
    first_stop = is_stop(first) & ~done
    out = jnp.zeros((b, max_new_tokens + k + 1), jnp.int32).at[:, 0].set(first)
    count = jnp.where(done | first_stop, 0, 1).astype(jnp.int32)
    stopped = first_stop
    done = done | first_stop | (count >= max_new_tokens)
    zeros = jnp.zeros((b,), jnp.int32)

    def cond(carry):
        return ~jnp.all(carry[3])

    def body(carry):
        state, out, count, done, stopped, rounds, accepted, drafted = carry
        active = ~done
        state, toks, num_new, num_acc = speculative_round(
            target_graphdef, target_params, draft_graphdef, draft_params, state, jax.random.fold_in(key, rounds),
            sampling, k, active,
        )
        idx = jnp.arange(k + 1)[None, :]
        stop_at = is_stop(toks) & (idx < num_new[:, None])
        has_stop = jnp.any(stop_at, axis=1)
        first_at = jnp.argmax(stop_at, axis=1).astype(jnp.int32)
        room = max_new_tokens - count
        # A stop token within the budget ends the row (and is not emitted), as in Generator.generate.
        hit = active & has_stop & (first_at < room)
        emit = jnp.minimum(jnp.where(has_stop, first_at, num_new), room)
        emit = jnp.where(active, emit, 0)
        out = jax.vmap(lambda row, t, c: jax.lax.dynamic_update_slice(row, t, (c,)))(out, toks, count)
        count = count + emit
        stopped = stopped | hit
        done = done | hit | (count >= max_new_tokens)
        return (state, out, count, done, stopped, rounds + 1, accepted + num_acc,
                drafted + jnp.where(active, k, 0))

    carry = (state, out, count, done, stopped, jnp.int32(0), zeros, zeros)
    _, out, count, _, stopped, rounds, accepted, drafted = jax.lax.while_loop(cond, body, carry)
    return out, count, stopped, rounds, accepted, drafted


@dataclasses.dataclass
class SpeculativeGeneration(Generation):
    """:class:`Generation` plus the speculation statistics of one :meth:`SpeculativeGenerator.generate` call.

    ``rounds``: propose/verify rounds, i.e. target forward passes after the prefill (``decode_steps`` too);
    ``drafted`` / ``accepted``: draft tokens proposed / kept per sequence (a row stops counting when it is done).
    """

    rounds: int = 0
    drafted: list[int] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)
    num_draft: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Kept / proposed draft tokens over the batch (0 when nothing was proposed)."""
        total = sum(self.drafted)
        return sum(self.accepted) / total if total else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens committed per verify round per sequence: ``1 + accepted / rounds`` (at most ``k + 1``)."""
        rounds = sum(d // self.num_draft for d in self.drafted) if self.num_draft else 0
        return 1.0 + sum(self.accepted) / rounds if rounds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which the prefill makes) per second of the decode loop, summed over the batch."""
        after_first = sum(max(0, len(t) - 1) for t in self.tokens)
        return after_first / self.seconds_decode if self.seconds_decode else 0.0


class SpeculativeGenerator:
    """Speculative decoding with a draft model: ``generate()`` takes and returns what ``Generator.generate`` does.

    ``SpeculativeGenerator(target, draft, num_draft=4)``: ``target`` a loaded or compressed model (or a
    ``(graphdef, params)`` pair); ``draft`` another model with the same vocabulary, a pair, or an ``int`` N for the
    self-speculative draft made of the target's first N layers (:func:`self_draft`). Executables are compiled
    ahead of time per (batch, prompt bucket, cache length, sampling) and reused.
    """

    def __init__(self, target: Any, draft: Any, num_draft: int = 4, cache_dtype=None):
        self.graphdef, self.params = _as_pair(target)
        self.cfg = nnx.merge(self.graphdef, self.params).cfg
        if isinstance(draft, int):
            self.draft_graphdef, self.draft_params = self_draft(self.graphdef, self.params, draft)
        else:
            self.draft_graphdef, self.draft_params = _as_pair(draft)
        self.draft_cfg = nnx.merge(self.draft_graphdef, self.draft_params).cfg
        if self.draft_cfg.vocab_size != self.cfg.vocab_size:
            raise ConfigError(f"draft vocabulary ({self.draft_cfg.vocab_size}) differs from the target's "
                              f"({self.cfg.vocab_size})")
        if num_draft < 1:
            raise ConfigError(f"num_draft must be at least 1, got {num_draft}")
        self.num_draft = num_draft
        self.cache_dtype = cache_dtype or self.cfg.compute_dtype
        # Same reason as Generator.min_batch: XLA:CPU's half-precision matrix-vector product is slow.
        half = jnp.dtype(self.cfg.compute_dtype).itemsize == 2
        self.min_batch = 2 if half and jax.default_backend() == "cpu" else 1
        self._compiled: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0

    def _cache(self, cfg, batch: int, max_len: int) -> KVCache:
        return KVCache.create(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, self.cache_dtype)

    def _compile(self, kind: str, static: tuple, fn: Callable, donate: tuple, *args) -> Callable:
        shapes = tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        key = (kind, static, shapes)
        if key not in self._compiled:
            t0 = time.perf_counter()
            jitted = jax.jit(fn, donate_argnums=donate)
            self._compiled[key] = jitted.lower(self.params, self.draft_params, *args).compile()
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[key]

    @property
    def num_compiled(self) -> dict[str, int]:
        """Executables per kind (``prefill``, ``decode``): one each per shape means no recompilation."""
        return count_by_kind(self._compiled)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        *,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        on_token: Callable[[np.ndarray], None] | None = None,
    ) -> SpeculativeGeneration:
        """Continues each prompt by up to ``max_new_tokens`` tokens, stopping a sequence at ``stop_ids``.

        Greedy output equals ``Generator.generate``'s; sampled output has the target's distribution (not the same
        draws: the random stream differs). ``on_token`` is called once per token position with that position's
        tokens ``[B]`` (a row that has ended shows a stop id) after decoding finishes: the loop runs on device, so
        there is nothing to stream mid-loop.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
        k = self.num_draft
        real = len(prompts)
        prompts = list(prompts) + [prompts[0]] * max(0, self.min_batch - real)
        lengths = [len(p) for p in prompts]
        bucket = bucket_length(max(lengths))
        max_len = bucket + max_new_tokens + k  # a row still running verifies k + 1 tokens from n <= P + max_new - 1
        context = min(self.cfg.max_seq_len, self.draft_cfg.max_seq_len)
        if max_len > context:
            raise ConfigError(f"prompt bucket {bucket} + max_new_tokens {max_new_tokens} + num_draft {k} exceeds "
                              f"the models' context of {context} tokens")
        batch = len(prompts)
        padded = np.zeros((batch, bucket), np.int32)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = p
        tokens, lens = jnp.asarray(padded), jnp.asarray(lengths, jnp.int32)
        tcache, dcache = self._cache(self.cfg, batch, max_len), self._cache(self.draft_cfg, batch, max_len)
        base_key = jax.random.key(seed)
        stops = jnp.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], jnp.int32)
        done = jnp.asarray(np.arange(batch) >= real)  # padding rows never run
        compile_before = self.compile_seconds
        tgd, dgd = self.graphdef, self.draft_graphdef
        prefill = self._compile(
            "prefill", (sampling,),
            lambda tp, dp, *a: speculative_prefill(tgd, tp, dgd, dp, *a, sampling=sampling),
            (4, 5), tokens, lens, tcache, dcache, base_key,
        )
        first_shape = jax.ShapeDtypeStruct((batch,), jnp.int32)
        state_shape = jax.eval_shape(
            lambda tp, dp, *a: speculative_prefill(tgd, tp, dgd, dp, *a, sampling=sampling)[1],
            self.params, self.draft_params, tokens, lens, tcache, dcache, base_key,
        )
        decode = self._compile(
            "decode", (sampling, k, max_new_tokens),
            lambda tp, dp, *a: _decode_loop(tgd, tp, dgd, dp, *a, sampling=sampling, num_draft=k,
                                            max_new_tokens=max_new_tokens),
            (), first_shape, state_shape, base_key, stops, done,
        )

        t0 = time.perf_counter()
        first, state = prefill(self.params, self.draft_params, tokens, lens, tcache, dcache,
                               jax.random.fold_in(base_key, 0))
        first.block_until_ready()
        seconds_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out, count, stopped, rounds, accepted, drafted = jax.device_get(
            decode(self.params, self.draft_params, first, state, jax.random.fold_in(base_key, 1), stops, done)
        )
        seconds_decode = time.perf_counter() - t0
        new = [out[i, : count[i]].tolist() for i in range(real)]
        if on_token is not None:  # replayed: a row that has ended shows a stop id, as Generator's rows do
            pad = min(int(s) for s in stop_ids) if len(stop_ids) else 0
            for step in range(max((len(t) for t in new), default=0)):
                on_token(np.asarray([t[step] if step < len(t) else pad for t in new], np.int32))
        return SpeculativeGeneration(
            tokens=new, prompt_lengths=lengths[:real], stopped=[bool(s) for s in stopped[:real]],
            seconds_prefill=seconds_prefill, seconds_decode=seconds_decode, decode_steps=int(rounds),
            seconds_compile=self.compile_seconds - compile_before, rounds=int(rounds),
            drafted=[int(d) for d in drafted[:real]], accepted=[int(a) for a in accepted[:real]], num_draft=k,
        )
