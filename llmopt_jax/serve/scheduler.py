"""Which sequences run in the next engine step: admission, chunked prefill under a token budget, preemption.

Every step the scheduler (1) grows the pages of the sequences that decode, preempting the most recently admitted
running sequence by recomputation when the pool runs out (its pages are released; it goes back to the front of the
queue and later re-prefills its prompt plus what it has generated, much of it often straight from the prefix
cache), (2) spends the prefill token budget on the prompt chunks of sequences still prefilling and then on newly
admitted ones (Sarathi-style chunked prefill: a long prompt never stalls decoding for more than one chunk).

Policies: ``fcfs`` admits in arrival order; ``spf`` (shortest prompt first, length-aware as in TurboTransformers)
admits the waiting request with the fewest prompt tokens. Modes: ``continuous`` admits whenever there is room;
``static`` admits a new batch only when the previous one has completely finished, and decodes it at the width it was
admitted with (finished rows keep their slots, as in classic static batching; the baseline of the benchmark). ``max_running=1`` serves one request at a time (the sequential baseline).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Sequence

from llmopt_jax.errors import ConfigError
from llmopt_jax.serve.kv_pages import PagePool, page_hashes

POLICIES = ("fcfs", "spf")
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)
MODES = ("continuous", "static")


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings. ``temperature`` 0 = greedy; ``top_k`` 0 = off; ``seed`` fixes the draws
    (token ``i`` uses ``fold_in(key(seed, stream), i)``, whatever the batch); ``stop_ids`` end the answer
    (excluded from it), ``stop`` strings cut the text before them; ``logprobs`` asks for the log-probability of
    each generated token under the model (log-softmax of its logits, before temperature and truncation) and of the
    ``logprobs`` most likely tokens at that position."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely tokens

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (or None), got {self.logprobs}")


@dataclasses.dataclass(eq=False)
class Sequence_:
    """One request's state. ``tokens`` = prompt + generated; ``num_computed`` of them have KV in ``pages``."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    stream: int = 0  # index of this choice among a request's n (folded into the sampling key)
    output: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # prefix hashes of the full pages registered
    num_computed: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at the last admission
    num_preemptions: int = 0
    first_token_time: float | None = None
    finished: bool = False
    finish_reason: str | None = None
    text_sent: str = ""  # detokenized text already handed to the caller
    final_text: str | None = None  # the answer cut at a stop string
    key_data: Any = None  # uint32 [2]: this choice's base sampling key
    # TokenLogprobs of the tokens the last device calls produced, in order, until the engine accepts them.
    pending_logprobs: list = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefilling(self) -> bool:
        """True until every token has KV (then the last token is fed by decode steps)."""
        return self.num_computed < len(self.prompt) + len(self.output) - (1 if self.output else 0)

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output)


@dataclasses.dataclass
class PrefillChunk:
    seq: Sequence_
    start: int
    length: int

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the end of the sequence's tokens (its last logits are sampled)."""
        return self.start + self.length == len(self.seq.tokens)


@dataclasses.dataclass
class Plan:
    prefills: list[PrefillChunk]
    decode: list[Sequence_]
    decode_steps: int
    preempted: list[Sequence_]


class Scheduler:
    """Holds the waiting queue and the running set; :meth:`schedule` plans one engine step."""

    def __init__(self, pool: PagePool, *, max_running: int, prefill_budget: int, max_decode_steps: int = 1,
                 policy: str = "fcfs", mode: str = "continuous", max_model_len: int):
        if policy not in POLICIES:
            raise ConfigError(f"unknown scheduling policy {policy!r}; choose one of {POLICIES}")
        if mode not in MODES:
            raise ConfigError(f"unknown batching mode {mode!r}; choose one of {MODES}")
        if max_running < 1 or prefill_budget < 1 or max_decode_steps < 1:
            raise ConfigError("max_running, prefill_budget and max_decode_steps must be positive, got "
                              f"{max_running}, {prefill_budget}, {max_decode_steps}")
        self.pool = pool
        self.max_running = max_running
        self.prefill_budget = prefill_budget
        self.max_decode_steps = max_decode_steps
        self.policy = policy
        self.mode = mode
        self.max_model_len = max_model_len
        self.waiting: collections.deque[Sequence_] = collections.deque()
        self.running: list[Sequence_] = []  # in admission order
        self.num_preemptions = 0
        # Static batching holds a batch at the width it was admitted with until its last request finishes, as
        # static batching does (FasterTransformer, HF generate): finished rows keep their slot in every decode.
        self.batch_width = 0

    # ----------------------------------------------------------------------------------------------- queue
    def add(self, seq: Sequence_) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence_) -> None:
        """Takes ``seq`` out of the queue or the running set and releases its pages (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence_) -> None:
        self.pool.release(seq.pages)
        seq.pages = []
        seq.hashes = []
        seq.num_computed = 0

    def _preempt(self, seq: Sequence_) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ----------------------------------------------------------------------------------------------- pages
    def _pages_for(self, seq: Sequence_, upto: int) -> int:
        """How many more pages ``seq`` needs for positions ``< upto``."""
        return max(0, -(-upto // self.pool.page_size) - len(seq.pages))

    def _grow(self, seq: Sequence_, upto: int) -> bool:
        need = self._pages_for(seq, upto)
        if need == 0:
            return True
        pages = self.pool.allocate(need)
        if pages is None:
            return False
        seq.pages.extend(pages)
        return True

    def register_full_pages(self, seq: Sequence_) -> None:
        """Names the pages that became full of computed KV by their prefix hashes (prefix caching)."""
        if not self.pool.prefix_caching:
            return
        full = seq.num_computed // self.pool.page_size
        if full > len(seq.hashes):
            parent = seq.hashes[-1] if seq.hashes else b""
            ps = self.pool.page_size
            new = page_hashes(seq.tokens[len(seq.hashes) * ps: full * ps], ps, parent)
            for i, h in enumerate(new):
                self.pool.register(seq.pages[len(seq.hashes) + i], h)
            seq.hashes.extend(new)

    def _admit(self, seq: Sequence_) -> bool:
        """Gives a waiting sequence its cached prefix pages; False if the pool cannot hold its first chunk."""
        tokens = seq.tokens
        # Keep at least one token to compute, so the last position's logits exist.
        hashes = page_hashes(tokens[:len(tokens) - 1], self.pool.page_size)
        cached = self.pool.match_prefix(hashes)
        seq.pages = cached
        seq.hashes = hashes[:len(cached)]
        seq.num_computed = len(cached) * self.pool.page_size
        seq.num_cached_tokens = seq.num_computed
        if not self._grow(seq, seq.num_computed + 1):
            self._release(seq)
            return False
        return True

    def _next_waiting(self) -> Sequence_ | None:
        if not self.waiting:
            return None
        if self.policy == "spf":
            return min(self.waiting, key=lambda s: len(s.tokens))
        return self.waiting[0]

    # ----------------------------------------------------------------------------------------------- plan
    def schedule(self) -> Plan:
        """Plans one step: decode for every sequence past its prefill, prefill chunks within the budget."""
        preempted: list[Sequence_] = []
        decoding = [s for s in self.running if not s.prefilling]
        busy = any(s.prefilling for s in self.running) or (self.waiting and self._may_admit())
        steps = 1 if busy else self.max_decode_steps
        # Pages for the decode tokens: the most recently admitted sequence is preempted first (vLLM's choice: it
        # has the least work to redo). Several steps per dispatch only while nothing else would wait for them.
        for seq in list(decoding):
            if seq not in self.running:
                continue
            want = seq.num_computed + min(steps, seq.remaining)
            while not self._grow(seq, want):
                if steps > 1:
                    steps, want = 1, seq.num_computed + 1
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
        decoding = [s for s in decoding if s in self.running]

        prefills: list[PrefillChunk] = []
        budget = self.prefill_budget
        if self.mode == "static" and not self.running:
            # A static batch: as many as fit are admitted together, then the batch is closed until it drains.
            while self.waiting and len(self.running) < self.max_running:
                seq = self._next_waiting()
                if not self._admit(seq):
                    break
                self.waiting.remove(seq)
                self.running.append(seq)
            self.batch_width = len(self.running)
        for seq in [s for s in self.running if s.prefilling]:
            if budget <= 0:
                break
            chunk = self._chunk(seq, budget)
            if chunk is None:
                break
            prefills.append(chunk)
            budget -= chunk.length
        while self.mode == "continuous" and budget > 0 and self.waiting and len(self.running) < self.max_running:
            seq = self._next_waiting()
            if not self._admit(seq):
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            chunk = self._chunk(seq, budget)
            if chunk is None:
                break
            prefills.append(chunk)
            budget -= chunk.length
        if not prefills and not decoding and len(self.running) > 1:
            # Every running sequence is stuck prefilling in a full pool: free the newest one's pages and retry.
            victim = self.running[-1]
            self._preempt(victim)
            later = self.schedule()
            return dataclasses.replace(later, preempted=preempted + [victim] + later.preempted)
        return Plan(prefills=prefills, decode=decoding, decode_steps=steps, preempted=preempted)

    def _may_admit(self) -> bool:
        if self.mode == "static":
            return not self.running
        return len(self.running) < self.max_running

    def _chunk(self, seq: Sequence_, budget: int) -> PrefillChunk | None:
        """The next prefill chunk of ``seq`` (at most ``budget`` tokens, pages allocated), or None when the pool is
        full (the sequence then waits a step; decoding sequences finish and free pages)."""
        start = seq.num_computed
        length = min(budget, len(seq.tokens) - start)
        while length > 0 and not self._grow(seq, start + length):
            length = min(length, (len(seq.pages) * self.pool.page_size) - start)
            if length <= 0:
                return None
        return PrefillChunk(seq, start, length) if length > 0 else None

    def min_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.pool.page_size)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raises ConfigError when a request can never run (context or pool too small)."""
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise ConfigError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                              f"context of {self.max_model_len} tokens")
        if self.min_pages_for(total) > self.pool.num_usable:
            raise ConfigError(f"prompt + max_tokens = {total} tokens needs more KV pages than the pool's "
                              f"{self.pool.num_usable}")


def sequence_ids(seqs: Sequence[Sequence_]) -> list[str]:
    return [s.request_id for s in seqs]
