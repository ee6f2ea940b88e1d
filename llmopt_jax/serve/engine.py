"""The continuous-batching engine: requests in, token streams out, over a paged KV cache.

One :meth:`Engine.step` asks the :class:`~llmopt_jax.serve.scheduler.Scheduler` for a plan, runs the planned
prefill chunks (one dispatch each), then one decode dispatch for every sequence past its prefill, and turns the new
tokens into per-request outputs (token ids, text delta, finish reason). A decode dispatch runs up to
``max_decode_steps`` tokens inside one ``lax.while_loop`` with sampling and stop-id checks on the device, so the
host is not consulted per token while nothing waits to be admitted.

Every device function has static shapes: the batch is padded to a power-of-two bucket, the page table to a
power-of-two number of pages, prompt chunks to a power-of-two length; so the set of executables is small and
each is compiled once (jit's cache, plus the persistent XLA cache the CLIs enable).

Sampling is per row (temperature, top-k, top-p; temperature 0 = greedy) with a per-request key: token ``i`` of a
request draws with ``fold_in(fold_in(key(seed), stream), i)``, so a seeded request gives the same tokens whatever
else is in the batch, and after a preemption.

Draft models (speculative decoding) plug in through ``decode_strategy``: any callable
``(engine, seqs, steps) -> list[list[int]]`` that returns each sequence's new tokens and leaves the KV of every
token except each sequence's last one in its pages (see :class:`MultiStepDecode`, the default, and
:meth:`Engine.forward` for a verification pass that needs the logits of every position).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmopt_jax.errors import ConfigError
from llmopt_jax.models.kv_cache import KVCache
from llmopt_jax.serve.kv_pages import NULL_PAGE, PagedKV, PagePool, gather_pages, scatter_tokens
from llmopt_jax.serve.scheduler import (
    MAX_TOP_LOGPROBS, MODES, POLICIES, PrefillChunk, SamplingParams, Scheduler, Sequence_,
)

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine sizes and policies (``configs/serve.py`` sets them under ``engine``)."""

    page_size: int = 16
    num_pages: int = 512  # of page_size tokens each, page 0 reserved
    max_running: int = 16  # sequences decoded together
    prefill_budget: int = 256  # prompt tokens prefilled per step (chunked prefill)
    max_decode_steps: int = 8  # tokens per decode dispatch when nothing waits
    policy: str = "fcfs"  # fcfs | spf (shortest prompt first)
    mode: str = "continuous"  # continuous | static
    prefix_caching: bool = True
    max_model_len: int = 0  # 0 = the model's context
    min_batch_bucket: int = 1  # smallest padded decode batch
    min_pages_bucket: int = 4  # smallest padded page table

    def __post_init__(self):
        for name in ("page_size", "num_pages", "max_running", "prefill_budget", "max_decode_steps",
                     "min_batch_bucket", "min_pages_bucket"):
            if getattr(self, name) < 1:
                raise ConfigError(f"engine.{name} must be positive, got {getattr(self, name)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"engine.policy={self.policy!r}; choose one of {POLICIES}")
        if self.mode not in MODES:
            raise ConfigError(f"engine.mode={self.mode!r}; choose one of {MODES}")
        if self.max_model_len < 0:
            raise ConfigError(f"engine.max_model_len must be >= 0 (0 = the model's context), got {self.max_model_len}")


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model and the most likely tokens at its position
    (``top``: ``(token id, log-probability)`` pairs, most likely first, as many as the request asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request choice: new tokens/text, and at the end the finish reason."""

    request_id: str
    stream: int
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of ``token_ids`` when the request asked for them


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def prefill_bucket(n: int, minimum: int = 16) -> int:
    """The padded length of an ``n``-token prefill chunk: the smallest ``2^k`` or ``1.5·2^k`` (at least ``minimum``)
    that holds it. Half-octave steps pad a chunk by at most a third (pure powers of two: up to a half; a 134-token
    prompt computes 192 positions, not 256), for twice the executables; prefill is compute-bound, so padding costs
    its share of the time."""
    p = _pow2(n, minimum)
    three_quarters = 3 * p // 4
    return three_quarters if n <= three_quarters and three_quarters >= minimum and p % 4 == 0 else p


# ----------------------------------------------------------------------------------------------- device functions
def forward(graphdef, params, kv: PagedKV, tokens, starts, num_valid, page_table, logit_index):
    """Runs ``tokens`` int32 ``[B, L]`` at positions ``starts[b] + j`` over the paged cache.

    ``page_table`` int32 ``[B, P]`` with ``P * page_size >= starts + L``; only the first ``num_valid[b]`` tokens of a
    row write KV. Returns (float32 logits ``[B, vocab]`` at ``logit_index`` ``[B]``, or ``[B, L, vocab]`` when
    ``logit_index`` is None; the updated pool).

    Unrolled layers gather and update one layer's pages at a time (the gathered context stays small and hot in
    cache, and the pool is updated in place); a layer scan gathers every layer's context into one contiguous cache
    for the whole model, then scatters the new tokens back.
    """
    model = nnx.merge(graphdef, params)
    length = tokens.shape[1]

    def fresh(c, axis):  # the L slots just written at ``starts`` along ``axis`` (the sequence axis)
        return jax.vmap(lambda cb, s: jax.lax.dynamic_slice_in_dim(cb, s, length, axis=axis - 1), in_axes=(axis - 1, 0),
                        out_axes=axis - 1)(c, starts)

    if model.cfg.scan_layers:
        cache = KVCache(gather_pages(kv.keys, page_table), gather_pages(kv.values, page_table), starts)
        logits, new = model(tokens, cache=cache, logit_index=logit_index)
        kv = PagedKV(scatter_tokens(kv.keys, page_table, starts, fresh(new.keys, 2), num_valid),
                     scatter_tokens(kv.values, page_table, starts, fresh(new.values, 2), num_valid))
        return (logits if logit_index is None else logits[:, 0]), kv

    b = tokens.shape[0]
    positions = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    x = model.embed(tokens)
    keys, values = kv.keys, kv.values
    for i, block in enumerate(model.layers):
        k_ctx = keys[i][page_table].reshape(b, -1, *keys.shape[3:])
        v_ctx = values[i][page_table].reshape(b, -1, *values.shape[3:])
        x, (k_all, v_all) = block(x, positions, (k_ctx, v_ctx), starts)
        keys = scatter_tokens(keys, page_table, starts, fresh(k_all, 1)[None], num_valid, layer=i)
        values = scatter_tokens(values, page_table, starts, fresh(v_all, 1)[None], num_valid, layer=i)
    if logit_index is not None:
        x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)
    x = model.final_norm(x)
    logits = (model.embed.attend(x) if model.cfg.tie_embeddings else model.lm_head(x)).astype(jnp.float32)
    return (logits if logit_index is None else logits[:, 0]), PagedKV(keys, values)


def sample_rows(logits, key_data, index, temperature, top_k, top_p):
    """Per-row sampling: float32 ``logits [B, V]``, uint32 ``key_data [B, 2]`` (each row's base key), int32 draw
    ``index [B]``, float32 ``temperature [B]`` (0 = greedy), int32 ``top_k [B]`` (0 = off), float32 ``top_p [B]``
    -> int32 ``[B]``."""
    greedy = temperature <= 0
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        keys = jax.vmap(lambda kd, i: jax.random.fold_in(jax.random.wrap_key_data(kd), i))(key_data, index)
        x = logits / jnp.where(greedy, 1.0, temperature)[:, None]
        neg = jnp.finfo(jnp.float32).min
        srt = -jnp.sort(-x, axis=-1)
        vocab = x.shape[-1]
        kth = jnp.take_along_axis(srt, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=1)
        kth = jnp.where(top_k[:, None] > 0, kth, neg)
        probs = jax.nn.softmax(srt, axis=-1)
        # Keep a token while the mass strictly before it is below top_p (the most likely token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        pth = jnp.min(jnp.where(mass_before < top_p[:, None], srt, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < jnp.maximum(kth, pth), neg, x)
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

    # The sort over the vocabulary is the costly part: an all-greedy batch skips it.
    sampled = jax.lax.cond(jnp.all(greedy), lambda: argmax, draw)
    return jnp.where(greedy, argmax, sampled)


def token_logprobs(logits, chosen, want):
    """Log-probabilities of ``chosen`` int32 ``[B]`` under float32 ``logits`` ``[B, V]`` (log-softmax, before any
    temperature or truncation) and the ``MAX_TOP_LOGPROBS`` most likely tokens: ``(logprob [B], top_ids [B, K],
    top_logprobs [B, K])``. Skipped (zeros) unless some row ``want`` s them: the top-k over the vocabulary is not free."""
    b = logits.shape[0]
    k = min(MAX_TOP_LOGPROBS, logits.shape[-1])

    def compute():
        lp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, k)
        return jnp.take_along_axis(lp, chosen[:, None], axis=1)[:, 0], top_ids.astype(jnp.int32), top_lp

    def skip():
        return jnp.zeros((b,), jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)

    return jax.lax.cond(jnp.any(want), compute, skip)


def _prefill_fn(graphdef, params, kv, tokens, start, num_valid, page_table, logit_index, key_data, index, temperature,
                top_k, top_p, want_logprobs):
    logits, kv = forward(graphdef, params, kv, tokens, start, num_valid, page_table, logit_index)
    tok = sample_rows(logits, key_data, index, temperature, top_k, top_p)
    return tok, token_logprobs(logits, tok, want_logprobs), kv


def _decode_fn(graphdef, params, kv, tokens, starts, page_table, active, budget, stop_ids, key_data, index,
               temperature, top_k, top_p, want_logprobs, num_steps, *, max_steps: int, vocab_size: int):
    """Up to ``num_steps`` (traced, ``<= max_steps``) decode steps for ``[B]`` rows in one dispatch; a row stops at a
    stop id or after ``budget[b]`` tokens. Returns (tokens int32 ``[B, max_steps]``, count int32 ``[B]``, the
    :func:`token_logprobs` of each step stacked on axis 1, pool). The step count is an argument, not a shape, so one
    executable serves one step (while requests wait) and many."""
    b = tokens.shape[0]
    k = min(MAX_TOP_LOGPROBS, vocab_size)

    def cond(c):
        return (c[0] < num_steps) & ~jnp.all(c[3])

    def body(c):
        i, kv, tok, done, count, out, (lp, top_ids, top_lp) = c
        logits, kv = forward(graphdef, params, kv, tok[:, None], starts + count, (~done).astype(jnp.int32),
                             page_table, jnp.zeros((b,), jnp.int32))
        nxt = sample_rows(logits, key_data, index + count, temperature, top_k, top_p)
        step_lp, step_ids, step_top = token_logprobs(logits, nxt, want_logprobs & ~done)
        out = out.at[:, i].set(nxt)
        lps = (lp.at[:, i].set(step_lp), top_ids.at[:, i].set(step_ids), top_lp.at[:, i].set(step_top))
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.any(nxt[:, None] == stop_ids, axis=1) | (count >= budget)
        return i + 1, kv, nxt, done, count, out, lps

    lps = (jnp.zeros((b, max_steps), jnp.float32), jnp.zeros((b, max_steps, k), jnp.int32),
           jnp.zeros((b, max_steps, k), jnp.float32))
    init = (jnp.int32(0), kv, tokens, ~active, jnp.zeros((b,), jnp.int32), jnp.zeros((b, max_steps), jnp.int32), lps)
    _, kv, _, _, count, out, lps = jax.lax.while_loop(cond, body, init)
    return out, count, lps, kv


# ----------------------------------------------------------------------------------------------- decode strategies
class DecodeStrategy(Protocol):
    def __call__(self, engine: "Engine", seqs: list[Sequence_], steps: int) -> list[list[int]]: ...


class MultiStepDecode:
    """Plain autoregressive decoding, ``steps`` tokens per dispatch (stops checked on the device)."""

    def __call__(self, engine: "Engine", seqs: list[Sequence_], steps: int) -> list[list[int]]:
        return engine.decode(seqs, steps)


# ----------------------------------------------------------------------------------------------- the engine
class Engine:
    """Continuous batching over a paged KV cache for one model. Not thread-safe: one thread calls
    :meth:`add_request`, :meth:`abort` and :meth:`step` (see :class:`~llmopt_jax.serve.http.AsyncEngine`)."""

    def __init__(self, model, params: nnx.State | None = None, config: EngineConfig = EngineConfig(), *,
                 tokenizer=None, decode_strategy: DecodeStrategy | None = None):
        if params is None:
            graphdef, params = model.graphdef, model.params
            tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        else:
            graphdef = model
        self.graphdef, self.params = graphdef, params
        self.cfg = nnx.merge(graphdef, params).cfg
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = min(config.max_model_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        c = self.cfg
        self.kv = PagedKV.create(c.num_layers, config.num_pages, config.page_size, c.num_kv_heads, c.head_dim,
                                 c.compute_dtype)
        self.pool = PagePool(config.num_pages, config.page_size, config.prefix_caching)
        self.scheduler = Scheduler(
            self.pool, max_running=config.max_running, prefill_budget=config.prefill_budget,
            max_decode_steps=config.max_decode_steps, policy=config.policy, mode=config.mode,
            max_model_len=self.max_model_len)
        self.decode_strategy = decode_strategy or MultiStepDecode()
        self.requests: dict[tuple[str, int], Sequence_] = {}
        self._prefill = jax.jit(functools.partial(_prefill_fn, graphdef), donate_argnums=(1,))
        self._decode = jax.jit(functools.partial(_decode_fn, graphdef, max_steps=config.max_decode_steps,
                                                 vocab_size=self.cfg.vocab_size), donate_argnums=(1,))
        self._forward = jax.jit(functools.partial(forward, graphdef), donate_argnums=(1,))
        self._ids = itertools.count()
        self.stats = EngineStats()

    # ------------------------------------------------------------------------------------------- requests
    def add_request(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), *,
                    request_id: str | None = None, n: int = 1, arrival: float | None = None) -> str:
        """Queues ``n`` choices continuing ``prompt`` (token ids); returns the request id."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ConfigError("the prompt needs at least one token")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise ConfigError(f"prompt token ids must lie in [0, {self.cfg.vocab_size})")
        if n < 1:
            raise ConfigError(f"n must be positive, got {n}")
        self.scheduler.check_fits(len(prompt), params.max_tokens)
        if params.logprobs is not None and not self.supports_logprobs:
            raise ConfigError("logprobs are not available with speculative decoding (the drafts' tokens are "
                              "verified without per-token log-probabilities)")
        request_id = request_id or f"req-{next(self._ids)}"
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(np.random.randint(0, 2**31 - 1)))
        arrival = time.monotonic() if arrival is None else arrival
        for stream in range(n):
            seq = Sequence_(request_id=request_id, prompt=list(prompt), params=params, stream=stream, arrival=arrival)
            seq.key_data = np.asarray(jax.random.key_data(
                jax.random.fold_in(jax.random.key(params.seed), stream)), np.uint32)
            self.requests[(request_id, stream)] = seq
            self.scheduler.add(seq)
        self.stats.requests_received += 1
        return request_id

    def abort(self, request_id: str) -> None:
        """Drops every choice of ``request_id`` (queued or running) and frees its pages."""
        for key in [k for k in self.requests if k[0] == request_id]:
            seq = self.requests.pop(key)
            self.scheduler.remove(seq)
            self.stats.requests_aborted += 1

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def supports_logprobs(self) -> bool:
        """Whether requests may ask for log-probabilities (not with a speculative decode strategy)."""
        return isinstance(self.decode_strategy, MultiStepDecode)

    # ------------------------------------------------------------------------------------------- device calls
    def _page_table(self, seqs: Sequence[Sequence_ | None], min_slots: int) -> np.ndarray:
        """Padded page tables ``[len(seqs), P]`` with ``P`` a power of two covering ``min_slots`` positions."""
        ps = self.config.page_size
        need = max([-(-min_slots // ps)] + [len(s.pages) for s in seqs if s is not None])
        p = _pow2(need, self.config.min_pages_bucket)
        table = np.full((len(seqs), p), NULL_PAGE, np.int32)
        for i, s in enumerate(seqs):
            if s is not None:
                table[i, :len(s.pages)] = s.pages
        return table

    @staticmethod
    def _sampling_arrays(seqs: Sequence[Sequence_ | None]):
        b = len(seqs)
        key_data = np.zeros((b, 2), np.uint32)
        temp, top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
        top_k, index = np.zeros(b, np.int32), np.zeros(b, np.int32)
        want = np.zeros(b, bool)
        for i, s in enumerate(seqs):
            if s is not None:
                key_data[i] = s.key_data
                temp[i], top_k[i], top_p[i] = s.params.temperature, s.params.top_k, s.params.top_p
                index[i] = len(s.output)
                want[i] = s.params.logprobs is not None
        return key_data, index, temp, top_k, top_p, want

    def prefill(self, chunk: PrefillChunk) -> int | None:
        """Computes one prompt chunk's KV; returns the sampled next token when the chunk ends the prompt."""
        seq, start, n = chunk.seq, chunk.start, chunk.length
        length = prefill_bucket(n)
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :n] = seq.tokens[start:start + n]
        # The page table of a prefill always spans the whole context: prefill is compute-bound, so gathering unused
        # (null) pages costs little, and one table width means one executable per chunk length.
        table = self._page_table([seq], max(start + length, self.max_model_len))
        tok, lps, self.kv = self._prefill(
            self.params, self.kv, tokens, np.asarray([start], np.int32), np.asarray([n], np.int32), table,
            np.asarray([n - 1], np.int32), *self._sampling_arrays([seq]))
        seq.num_computed = start + n
        if not chunk.completes:
            return None
        tok = int(tok[0])
        self._keep_logprobs(seq, [tok], *(np.asarray(a)[0, None] for a in lps))
        return tok

    def decode(self, seqs: list[Sequence_], steps: int) -> list[list[int]]:
        """Up to ``steps`` tokens for each of ``seqs`` (pages for them already allocated) in one dispatch."""
        b = _pow2(max(len(seqs), self.scheduler.batch_width), self.config.min_batch_bucket)
        rows: list[Sequence_ | None] = list(seqs) + [None] * (b - len(seqs))
        tokens = np.zeros(b, np.int32)
        starts = np.zeros(b, np.int32)
        active = np.zeros(b, bool)
        budget = np.zeros(b, np.int32)
        stops = [s.params.stop_ids for s in seqs]
        # Stop-id columns padded to a power of two (>= 4): a new request with more stop ids rarely means a new shape.
        stop_ids = np.full((b, _pow2(max([1] + [len(x) for x in stops]), 4)), -1, np.int32)
        for i, s in enumerate(seqs):
            tokens[i], starts[i], active[i] = s.tokens[-1], s.num_computed, True
            budget[i] = min(steps, s.remaining)
            stop_ids[i, :len(stops[i])] = stops[i]
        steps = min(steps, self.config.max_decode_steps)
        table = self._page_table(rows, int(starts.max()) + steps)
        out, count, lps, self.kv = self._decode(
            self.params, self.kv, tokens, starts, table, active, budget, stop_ids, *self._sampling_arrays(rows),
            np.int32(steps))
        out, count = np.asarray(out), np.asarray(count)
        new = [out[i, :count[i]].tolist() for i in range(len(seqs))]
        if any(s.params.logprobs is not None for s in seqs):
            lp, top_ids, top_lp = (np.asarray(a) for a in lps)
            for i, s in enumerate(seqs):
                self._keep_logprobs(s, new[i], lp[i], top_ids[i], top_lp[i])
        for i, s in enumerate(seqs):
            s.num_computed += int(count[i])
        return new

    @staticmethod
    def _keep_logprobs(seq: Sequence_, tokens: list[int], lp, top_ids, top_lp) -> None:
        """Queues a :class:`TokenLogprob` per new token of ``seq`` (``lp`` ``[T]``, ``top_*`` ``[T, K]``) when the
        request asked for log-probabilities; :meth:`_accept` hands them out with the tokens it accepts."""
        k = seq.params.logprobs
        if k is None:
            return
        for j, tok in enumerate(tokens):
            top = tuple((int(t), float(v)) for t, v in zip(top_ids[j, :k], top_lp[j, :k]))
            seq.pending_logprobs.append(TokenLogprob(int(tok), float(lp[j]), top))

    def forward(self, seqs: list[Sequence_], tokens: np.ndarray, num_valid: np.ndarray) -> np.ndarray:
        """Logits float32 ``[B, L, vocab]`` of ``tokens`` ``[B, L]`` placed after each sequence's computed KV, and
        that KV written (for a draft-verification pass; the caller allocates pages and moves ``num_computed``)."""
        starts = np.asarray([s.num_computed for s in seqs], np.int32)
        table = self._page_table(seqs, int(starts.max()) + tokens.shape[1])
        logits, self.kv = self._forward(self.params, self.kv, np.asarray(tokens, np.int32), starts,
                                        np.asarray(num_valid, np.int32), table, None)
        return np.asarray(logits)

    # ------------------------------------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns the outputs of every request that produced tokens or finished."""
        plan = self.scheduler.schedule()
        t0 = time.perf_counter()
        touched: dict[int, Sequence_] = {}
        new_tokens: dict[int, list[int]] = {}
        for chunk in plan.prefills:
            tok = self.prefill(chunk)
            self.scheduler.register_full_pages(chunk.seq)
            self.stats.prompt_tokens_computed += chunk.length
            if tok is not None:
                new_tokens.setdefault(id(chunk.seq), []).append(tok)
                touched[id(chunk.seq)] = chunk.seq
        if plan.decode:
            results = self.decode_strategy(self, plan.decode, plan.decode_steps)
            self.stats.decode_dispatches += 1
            for seq, toks in zip(plan.decode, results):
                self.scheduler.register_full_pages(seq)
                new_tokens.setdefault(id(seq), []).extend(toks)
                touched[id(seq)] = seq
        outputs = [self._accept(seq, new_tokens[key]) for key, seq in touched.items()]
        self.stats.busy_seconds += time.perf_counter() - t0
        self.stats.steps += 1
        return outputs

    def _accept(self, seq: Sequence_, tokens: list[int]) -> RequestOutput:
        """Appends new tokens to ``seq`` up to a stop (id, string, max_tokens); returns its output, finishing it
        (pages released) when it stopped."""
        now = time.monotonic()
        if seq.first_token_time is None and tokens:
            seq.first_token_time = now
            self.stats.observe_ttft(now - seq.arrival)
        accepted: list[int] = []
        params = seq.params
        pending, seq.pending_logprobs = seq.pending_logprobs, []
        for tok in tokens:
            if tok in params.stop_ids:
                seq.finished, seq.finish_reason = True, "stop"
                break
            seq.output.append(tok)
            accepted.append(tok)
            if params.stop and self.tokenizer is not None and self._cut_at_stop_string(seq):
                break
            if len(seq.output) >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
                seq.finished, seq.finish_reason = True, "length"
                break
        self.stats.generated_tokens += len(accepted)
        text = self._text_delta(seq)
        if seq.finished:
            self.scheduler.remove(seq)
            self.requests.pop((seq.request_id, seq.stream), None)
            self.stats.requests_finished += 1
        logprobs = pending[:len(accepted)] if params.logprobs is not None else None
        return RequestOutput(seq.request_id, seq.stream, accepted, text, seq.finished, seq.finish_reason,
                             len(seq.prompt), len(seq.output), seq.num_cached_tokens, logprobs=logprobs)

    def _cut_at_stop_string(self, seq: Sequence_) -> bool:
        text = self.tokenizer.decode(seq.output)
        longest = max(len(s) for s in seq.params.stop)
        window = max(0, len(seq.text_sent) - longest)
        hits = [i for i in (text.find(s, window) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.final_text = text[:min(hits)]
        seq.finished, seq.finish_reason = True, "stop"
        return True

    def _text_delta(self, seq: Sequence_) -> str:
        """The text not yet sent, holding back an incomplete UTF-8 character and a possible stop-string start."""
        if self.tokenizer is None:
            return ""
        text = seq.final_text
        if text is None:
            text = self.tokenizer.decode(seq.output)
            if not seq.finished:
                if text.endswith("\ufffd"):
                    text = text[:-1]
                hold = max([k for s in seq.params.stop for k in range(1, len(s)) if text.endswith(s[:k])] + [0])
                text = text[:len(text) - hold]
        if not text.startswith(seq.text_sent):  # a tokenizer that rewrote earlier text: send only what is new
            delta = text[len(seq.text_sent):]
        else:
            delta = text[len(seq.text_sent):]
        seq.text_sent = text if len(text) >= len(seq.text_sent) else seq.text_sent
        return delta

    # ------------------------------------------------------------------------------------------- convenience
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] =
                 SamplingParams(), *, max_steps: int = 100_000) -> list[list[int]]:
        """Runs ``prompts`` to completion (all queued at once); returns each one's new token ids (stops excluded)."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        out: dict[str, list[int]] = {i: [] for i in ids}
        for _ in range(max_steps):
            if not self.has_unfinished():
                break
            for o in self.step():
                out[o.request_id].extend(o.token_ids)
        return [out[i] for i in ids]

    def metrics(self) -> dict:
        """A snapshot of the gauges and counters ``/metrics`` exports."""
        s = self.stats
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "kv_pages_used": self.pool.num_used, "kv_pages_free": self.pool.num_available,
            "kv_pages_total": self.pool.num_usable,
            "prefix_cache_queries": self.pool.prefix_queries, "prefix_cache_hits": self.pool.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
            "executables": self._prefill._cache_size() + self._decode._cache_size() + self._forward._cache_size(),
            **dataclasses.asdict(s),
            **({"speculative_proposed": self.decode_strategy.proposed,
                "speculative_accepted": self.decode_strategy.accepted}
               if hasattr(self.decode_strategy, "proposed") else {}),
        }


@dataclasses.dataclass
class EngineStats:
    requests_received: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens_computed: int = 0
    generated_tokens: int = 0
    steps: int = 0
    decode_dispatches: int = 0
    busy_seconds: float = 0.0
    ttft_count: int = 0
    ttft_sum: float = 0.0
    ttft_buckets: list = dataclasses.field(default_factory=lambda: [0] * len(TTFT_BUCKETS))

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_count += 1
        self.ttft_sum += seconds
        for i, edge in enumerate(TTFT_BUCKETS):
            if seconds <= edge:
                self.ttft_buckets[i] += 1
