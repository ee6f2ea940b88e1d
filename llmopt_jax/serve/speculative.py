"""Speculative decoding inside the serving engine: a decode strategy (``Engine(..., decode_strategy=...)``).

:class:`SelfSpeculativeDecode` drafts with the first ``draft_layers`` blocks of the served model (early exit
through its final norm and head, ``infer/speculative.py:self_draft``), so it needs no second model and no second
cache: those blocks compute exactly the keys and values the target's first blocks compute for the same tokens, so
the draft reads the target's own pages for them. Each round, for the greedy requests of the batch:

1. the draft proposes ``num_draft`` tokens one at a time (one jitted loop), writing its provisional KV into a copy
   of the first ``draft_layers`` layers' pools, which is then dropped;
2. the target verifies ``[last, d_1 .. d_k]`` in one forward pass over the paged cache, writing their KV into its
   pages (all layers);
3. the longest prefix of drafts equal to the target's argmax is kept, plus the target's next token, cut at the
   request's stop ids and token budget; the sequence's computed length moves past every kept token but the last,
   as the engine's contract for strategies asks (the KV of rejected drafts lies beyond it and is overwritten later).

Greedy output is therefore the target's own, token for token (tested against single-request ``Generator``).
Requests that sample (temperature > 0), steps of one token (the scheduler's choice while others wait to
prefill) and sequences whose pages do not reach ``k + 1`` tokens ahead decode the usual way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmopt_jax.errors import ConfigError
from llmopt_jax.infer.generate import SamplingConfig
from llmopt_jax.infer.speculative import verify_drafts
from llmopt_jax.serve.kv_pages import PagedKV


class SelfSpeculativeDecode:
    """Decode strategy: greedy requests draft with the model's first ``draft_layers`` blocks, ``num_draft`` tokens
    per round (module docstring). ``proposed`` / ``accepted`` count drafted and kept tokens."""

    def __init__(self, draft_layers: int, num_draft: int = 4):
        if draft_layers < 1 or num_draft < 1:
            raise ConfigError(f"draft_layers and num_draft must be >= 1, got {draft_layers}, {num_draft}")
        self.draft_layers, self.num_draft = draft_layers, num_draft
        self.proposed = self.accepted = self.rounds = 0
        self._draft = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def _setup(self, engine) -> None:
        from llmopt_jax.infer.speculative import self_draft
        from llmopt_jax.serve.engine import forward

        graphdef, params = self_draft(engine.graphdef, engine.params, self.draft_layers)
        self._draft_params = params
        self._draft = jax.jit(functools.partial(_propose, graphdef, forward, num_draft=self.num_draft))

    def __call__(self, engine, seqs, steps: int) -> list[list[int]]:
        from llmopt_jax.serve.engine import _pow2

        k = self.num_draft
        page = engine.config.page_size
        fast = [s for s in seqs if steps > 1 and s.params.temperature == 0 and s.remaining > 1
                and len(s.pages) * page >= s.num_computed + k + 1]
        slow = [s for s in seqs if s not in fast]
        out = dict(zip(map(id, slow), engine.decode(slow, steps))) if slow else {}
        if fast:
            if self._draft is None:
                self._setup(engine)
            b = _pow2(len(fast), engine.config.min_batch_bucket)
            rows = list(fast) + [None] * (b - len(fast))
            last = np.zeros(b, np.int32)
            starts = np.zeros(b, np.int32)
            for i, s in enumerate(fast):
                last[i], starts[i] = s.tokens[-1], s.num_computed
            table = engine._page_table(rows, int(starts.max()) + k + 1)
            n = self.draft_layers
            draft_kv = PagedKV(engine.kv.keys[:n], engine.kv.values[:n])  # a copy: the draft's writes are dropped
            drafts = np.asarray(self._draft(self._draft_params, draft_kv, last, starts, table))  # [b, k]
            tokens = np.concatenate([last[:, None], drafts], axis=1)
            valid = np.asarray([k + 1 if r is not None else 0 for r in rows], np.int32)
            logits, engine.kv = engine._forward(engine.params, engine.kv, tokens, starts, valid, table, None)
            # infer/speculative.py's acceptance rule, greedy: no draft logits or key needed
            num_kept, new_token = map(np.asarray, verify_drafts(logits, None, jnp.asarray(drafts), None,
                                                                SamplingConfig(greedy=True)))
            self.rounds += 1
            for i, s in enumerate(fast):
                kept = int(num_kept[i])
                self.proposed += k
                self.accepted += kept
                emitted = [int(t) for t in drafts[i, :kept]] + [int(new_token[i])]
                emitted = emitted[:min(steps, s.remaining)]
                stop = next((j for j, t in enumerate(emitted) if t in s.params.stop_ids), None)
                if stop is not None:
                    emitted = emitted[:stop + 1]
                s.num_computed += len(emitted)
                out[id(s)] = emitted
        return [out[id(s)] for s in seqs]


def _propose(graphdef, forward, params, kv: PagedKV, last, starts, table, *, num_draft: int):
    """``num_draft`` greedy draft tokens ``[B, num_draft]`` after ``last`` ``[B]`` (one forward per token over the
    draft's pools ``kv``, which it writes)."""
    def body(j, carry):
        tok, kv, out = carry
        logits, kv = forward(graphdef, params, kv, tok[:, None], starts + j, jnp.ones_like(starts), table,
                             jnp.zeros_like(starts))
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return nxt, kv, out.at[:, j].set(nxt)

    out = jnp.zeros((last.shape[0], num_draft), jnp.int32)
    _, _, out = jax.lax.fori_loop(0, num_draft, body, (jnp.asarray(last), kv, out))
    return out
