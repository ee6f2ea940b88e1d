"""Autoregressive generation: one jitted prefill and one jitted single-token decode over a preallocated KV cache.

Prompts are right-padded to a bucket length (a power of two), so prompts of similar length share one
compiled prefill; the cache is allocated once for ``bucket + max_new_tokens`` slots and every decode step
has the same shapes, so decoding compiles exactly once per (batch, cache length). Both functions are
compiled ahead of time (``jit(...).lower(...).compile()``): a shape change raises instead of silently
recompiling. Sampling (greedy, temperature, top-k, top-p) runs inside the jitted step with explicit keys.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmopt_jax.errors import ConfigError
from llmopt_jax.models.kv_cache import KVCache

MIN_BUCKET = 16


def count_by_kind(compiled: dict[tuple, Callable]) -> dict[str, int]:
    """Executables per kind (``prefill``, ``decode``, ...) in a cache keyed ``(kind, *shapes)``."""
    counts: dict[str, int] = {}
    for kind, *_ in compiled:
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn: ``greedy`` (argmax) or from ``softmax(logits / temperature)`` restricted
    to the ``top_k`` most likely tokens (0 = all) and the smallest set whose probability reaches ``top_p``."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ConfigError(f"temperature must be positive when sampling, got {self.temperature} (use greedy=True)")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next-token ids int32 ``[B]`` drawn from float32 logits ``[B, V]`` (see :class:`SamplingConfig`)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Float32 logits ``[..., V]`` of the distribution :func:`sample_logits` draws from when sampling: divided by
    the temperature, tokens outside top-k / top-p set to the float32 minimum (speculative decoding needs the
    probabilities themselves, not just a draw)."""
    lead = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32) / sampling.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass strictly before it is below top_p (so the most likely token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits.reshape(*lead, logits.shape[-1])


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two ``>= max(n, minimum)`` (prompt lengths are padded to it)."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def _prefill(graphdef, params, tokens, lengths, cache, key, sampling: SamplingConfig):
    """Runs right-padded prompts ``[B, Lb]`` through the model; returns (first new tokens ``[B]``, cache)."""
    logits, cache = nnx.merge(graphdef, params)(tokens, cache=cache, logit_index=lengths - 1)
    last = logits[:, 0]
    # The padded tail was written to the cache but lies beyond each sequence's length: decode overwrites it.
    cache = dataclasses.replace(cache, lengths=lengths)
    return sample_logits(last, key, sampling), cache


def _decode(graphdef, params, tokens, cache, key, sampling: SamplingConfig):
    """Feeds one token per sequence ``[B]``; returns (next tokens ``[B]``, cache advanced by one)."""
    logits, cache = nnx.merge(graphdef, params)(tokens[:, None], cache=cache)
    return sample_logits(logits[:, -1], key, sampling), cache


def _decode_many(graphdef, params, tokens, cache, key, first_step, limit, done, stops, sampling: SamplingConfig,
                 chunk: int):
    """Up to ``min(chunk, limit)`` decode steps in one dispatch (a ``lax.while_loop`` on the device), stopping
    early once every sequence has produced a stop id. Step ``i`` draws with ``fold_in(key, first_step + i)``, as
    one step per dispatch would. Returns (tokens ``[chunk, B]`` (rows past the steps run are zeros), last tokens
    ``[B]``, cache, done ``[B]``, steps run)."""
    batch = tokens.shape[0]

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < jnp.minimum(limit, chunk)) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, done, out = carry
        nxt, cache = _decode(graphdef, params, tok, cache, jax.random.fold_in(key, first_step + i), sampling)
        done = done | jnp.any(nxt[:, None] == stops[None, :], axis=1)
        return i + 1, nxt, cache, done, out.at[i].set(nxt)

    out = jnp.zeros((chunk, batch), tokens.dtype)
    steps, last, cache, done, out = jax.lax.while_loop(cond, body, (jnp.int32(0), tokens, cache, done, out))
    return out, last, cache, done, steps


@dataclasses.dataclass
class Generation:
    """Result of :func:`generate`: new token ids per prompt (stop token excluded) and timings."""

    tokens: list[list[int]]
    prompt_lengths: list[int]
    stopped: list[bool]  # True where a stop token ended the sequence, False where max_new_tokens did
    seconds_prefill: float
    seconds_decode: float
    decode_steps: int
    seconds_compile: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(self.prompt_lengths) / self.seconds_prefill

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced per second by the decode steps, summed over the batch."""
        return len(self.prompt_lengths) * self.decode_steps / self.seconds_decode if self.decode_steps else 0.0


class Generator:
    """Compiled prefill/decode for one model, batch size, prompt bucket and cache length.

    Build once (``Generator(model)`` with a loaded or compressed model, or ``Generator(graphdef, params)``) and
    call :meth:`generate` many times; compiled functions are cached per shape, so repeated calls with prompts in
    the same bucket never recompile.
    """

    def __init__(self, graphdef, params: nnx.State | None = None, cache_dtype=None,
                 steps_per_dispatch: int | None = None):
        # Decode steps per device call (no host sync in between). Default 8 on accelerators, where the per-token
        # round trip dominates a small model's step; 1 on CPU, where a step takes tens of milliseconds, the round
        # trip a fraction of one, and the while loop's longer compile would be the only effect.
        if steps_per_dispatch is None:
            steps_per_dispatch = 1 if jax.default_backend() == "cpu" else 8
        if steps_per_dispatch < 1:
            raise ConfigError(f"steps_per_dispatch must be >= 1, got {steps_per_dispatch}")
        self.steps_per_dispatch = steps_per_dispatch
        if params is None:  # a model object
            graphdef, params = graphdef.graphdef, graphdef.params
        self.graphdef = graphdef
        self.params = params
        self.cfg = nnx.merge(graphdef, params).cfg
        self.cache_dtype = cache_dtype or self.cfg.compute_dtype
        # XLA:CPU runs a bf16/f16 matrix-vector product ~15x slower than a two-row matrix product (measured:
        # 31.6 ms vs 1.8 ms for a 576x46080 bf16 weight), so a single sequence is decoded with a dummy twin.
        half = jnp.dtype(self.cfg.compute_dtype).itemsize == 2
        self.min_batch = 2 if half and jax.default_backend() == "cpu" else 1
        self._compiled: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0

    def _empty_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        return KVCache.create(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, self.cache_dtype)

    def _compile(self, kind: str, sampling: SamplingConfig, *args) -> Callable:
        shapes = tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
        key = (kind, sampling, shapes, self.steps_per_dispatch if kind == "decode" else 0)
        if key not in self._compiled:
            t0 = time.perf_counter()
            if kind == "prefill":
                fn = _prefill
            elif self.steps_per_dispatch == 1:
                fn = _decode
            else:
                fn = functools.partial(_decode_many, chunk=self.steps_per_dispatch)
            jitted = jax.jit(
                lambda p, *a: fn(self.graphdef, p, *a, sampling=sampling),
                donate_argnums=(3,) if kind == "prefill" else (2,),
            )
            self._compiled[key] = jitted.lower(self.params, *args).compile()
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[key]

    @property
    def num_compiled(self) -> dict[str, int]:
        """How many executables exist per kind (one decode per batch/cache shape means no recompilation)."""
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
    ) -> Generation:
        """Continues each prompt (token ids) by up to ``max_new_tokens`` tokens; stops a sequence at ``stop_ids``.

        ``on_token`` receives each step's new tokens ``[B]`` (for streaming). Random draws use
        ``fold_in(key(seed), step)``, so a seed reproduces a sample exactly.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
        real = len(prompts)
        prompts = list(prompts) + [prompts[0]] * max(0, self.min_batch - real)
        lengths = [len(p) for p in prompts]
        bucket = bucket_length(max(lengths))
        max_len = bucket + max_new_tokens
        if max_len > self.cfg.max_seq_len:
            raise ConfigError(
                f"prompt bucket {bucket} + max_new_tokens {max_new_tokens} exceeds the model's context "
                f"of {self.cfg.max_seq_len} tokens"
            )
        batch = len(prompts)
        padded = np.zeros((batch, bucket), np.int32)
        for i, p in enumerate(prompts):
            padded[i, : len(p)] = p
        tokens, lens = jnp.asarray(padded), jnp.asarray(lengths, jnp.int32)
        cache = self._empty_cache(batch, max_len)
        base_key = jax.random.key(seed)
        compile_before = self.compile_seconds
        stops = np.asarray(sorted(set(int(s) for s in stop_ids)), np.int64)
        stops_device = jnp.asarray(stops if len(stops) else np.asarray([-1]), jnp.int32)
        prefill = self._compile("prefill", sampling, tokens, lens, cache, base_key)
        many = self.steps_per_dispatch > 1
        decode_args = (lens, cache, base_key) + ((jnp.int32(0), jnp.int32(0), jnp.zeros(batch, bool),
                                                  stops_device) if many else ())
        decode = self._compile("decode", sampling, *decode_args)

        t0 = time.perf_counter()
        nxt, cache = prefill(self.params, tokens, lens, cache, jax.random.fold_in(base_key, 0))
        nxt_host = np.asarray(nxt)
        seconds_prefill = time.perf_counter() - t0

        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch, bool)
        steps = 0
        t0 = time.perf_counter()
        done[real:] = True  # padding rows never count
        pending = [nxt_host]  # tokens produced but not yet looked at, in order
        step = 0
        while pending:
            nxt_host = pending.pop(0)
            step += 1
            for i in np.flatnonzero(~done):
                if nxt_host[i] in stops:
                    done[i] = True
                else:
                    out[i].append(int(nxt_host[i]))
            if on_token is not None:
                on_token(nxt_host[:real])
            if done.all() or step == max_new_tokens:
                break
            if pending:
                continue
            if many:  # several steps on the device; the host looks at their tokens afterwards
                limit = jnp.int32(max_new_tokens - step)
                block, nxt, cache, _, ran = decode(self.params, nxt, cache, base_key, jnp.int32(step), limit,
                                                   jnp.asarray(done), stops_device)
                ran = int(ran)
                pending.extend(np.asarray(block)[:ran])
                steps += ran
            else:
                nxt, cache = decode(self.params, nxt, cache, jax.random.fold_in(base_key, step))
                pending.append(np.asarray(nxt))
                steps += 1
        seconds_decode = time.perf_counter() - t0
        return Generation(
            tokens=out[:real], prompt_lengths=lengths[:real], stopped=done[:real].tolist(), seconds_prefill=seconds_prefill,
            seconds_decode=seconds_decode, decode_steps=steps, seconds_compile=self.compile_seconds - compile_before,
        )


def chat_prompt(tokenizer, prompt: str, system: str = "") -> tuple[list[int], tuple[int, ...]]:
    """Token ids of ``prompt`` as one user turn in the tokenizer's chat template (with ``system`` as the system
    turn when given, BOS when the model wants one) and the ids that end the assistant's turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return ([tokenizer.bos_id] + ids if tokenizer.add_bos else ids), tuple(tokenizer.stop_ids)


def chat(model, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(), *,
         system: str = "", seed: int = 0) -> str:
    """The model's reply to ``prompt`` (one user turn in its chat template), decoded to text."""
    tokenizer = model.require_tokenizer()
    ids, stop_ids = chat_prompt(tokenizer, prompt, system)
    out = Generator(model).generate([ids], max_new_tokens, sampling, seed=seed, stop_ids=stop_ids)
    return tokenizer.decode([t for t in out.tokens[0] if t not in stop_ids])
