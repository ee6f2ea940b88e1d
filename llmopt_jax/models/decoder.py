"""The LLaMA-family decoder (SmolLM2, LLaMA, Mistral shapes): RMSNorm, RoPE, GQA, SwiGLU, tied embeddings.

Layers are either a Python list of blocks or, with ``scan_layers``, one block whose parameters carry a
leading ``layers`` axis and run under ``jax.lax.scan`` (one compiled block body whatever the depth). Both run
the same :class:`Block`; the block body can be rematerialised with a named policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax.models.attention import attention, causal_mask
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.kv_cache import KVCache, write_kv
from llmopt_jax.models.layers import ActivationConstraint, DotGeneral, Embed, Linear, RMSNorm, no_constraint
from llmopt_jax.models.moe import MoeMLP, combine_aux
from llmopt_jax.models.rope import apply_rope

ACT_HIDDEN = ("act_batch", "act_length", "act_embed")
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Like dots_no_batch, but the saved matmul outputs wait for the backward pass in host memory (JAX memory
    # kinds): activation memory moves off the accelerator at the cost of device<->host copies.
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class Block(nnx.Module):
    """One pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    ``moe`` (default: every layer of a MoE config) replaces the dense SwiGLU MLP with routed experts
    (``self.moe``, :class:`~llmopt_jax.models.moe.MoeMLP`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dot_general: DotGeneral = jax.lax.dot_general,
        constrain: ActivationConstraint = no_constraint,
        moe: bool | None = None,
    ):
        self.cfg = cfg
        self.constrain = constrain
        self.is_moe = bool(cfg.num_experts) if moe is None else moe
        d, h, k, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
        dense = dict(
            dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs, dot_general=dot_general
        )
        # Residual-branch outputs start smaller so the residual stream's variance stays O(1) with depth.
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        norm = dict(eps=cfg.rms_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(d, **norm)
        self.q_proj = Linear((d,), (h, hd), ("embed",), ("heads", "head_dim"), init_std=cfg.init_std, **dense)
        self.k_proj = Linear((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), init_std=cfg.init_std, **dense)
        self.v_proj = Linear((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"), init_std=cfg.init_std, **dense)
        self.o_proj = Linear((h, hd), (d,), ("heads", "head_dim"), ("embed",), init_std=out_std, **dense)
        self.mlp_norm = RMSNorm(d, **norm)
        if self.is_moe:
            self.moe = MoeMLP(cfg, rngs=rngs, dot_general=dot_general, constrain=constrain)
            return
        self.gate_proj = Linear((d,), (f,), ("embed",), ("mlp",), init_std=cfg.init_std, **dense)
        self.up_proj = Linear((d,), (f,), ("embed",), ("mlp",), init_std=cfg.init_std, **dense)
        self.down_proj = Linear((f,), (d,), ("mlp",), ("embed",), init_std=out_std, **dense)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        cache_starts: jax.Array | None = None,
        return_aux: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """``x`` ``[B, L, D]`` at ``positions`` ``[B, L]`` -> ``([B, L, D], updated kv)``.

        With ``kv`` (this layer's cache, ``[B, S, K, hd]`` each) the new keys/values are written at
        ``cache_starts`` ``[B]`` and attention runs over the whole cache; slot ``j`` holds position ``j``.
        ``return_aux`` appends the routed MLP's :class:`~llmopt_jax.models.moe.MoeAux` (``None`` when dense).
        ``segment_ids`` int ``[B, L]`` (no cache; packed documents, ``data/packing.py``) also masks attention
        between tokens of different segments.
        """
        cfg, c = self.cfg, self.constrain
        h = self.attn_norm(x)
        q = apply_rope(self.q_proj(h), positions, cfg.rope_base, cfg.rope_interleaved)
        k = apply_rope(self.k_proj(h), positions, cfg.rope_base, cfg.rope_interleaved)
        v = self.v_proj(h)
        q = c(q, ("act_batch", "act_length", "act_heads", None))
        if kv is None:
            keys, values, k_positions = k, v, positions
            new_kv = None
        else:
            keys, values = write_kv(kv[0], kv[1], k, v, cache_starts)
            new_kv = (keys, values)
            slots = jnp.arange(keys.shape[1], dtype=positions.dtype)
            k_positions = jnp.broadcast_to(slots, (x.shape[0], keys.shape[1]))
        mask = causal_mask(positions, k_positions)
        if segment_ids is not None and kv is None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        attn = attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask, cfg.attention)
        x = x + self.o_proj(attn)
        x = c(x, ACT_HIDDEN)
        h = self.mlp_norm(x)
        aux = None
        if self.is_moe:
            y, aux = self.moe(h)
            x = x + y
        else:
            gated = jax.nn.silu(self.gate_proj(h)) * self.up_proj(h)
            gated = c(gated, ("act_batch", "act_length", "act_mlp"))
            x = x + self.down_proj(gated)
        if return_aux:
            return c(x, ACT_HIDDEN), new_kv, aux
        return c(x, ACT_HIDDEN), new_kv


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, dot_general, constrain) -> Block:
    """One :class:`Block` whose every parameter has a leading ``layers`` axis of size ``cfg.num_layers``."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r: nnx.Rngs) -> Block:
        return Block(cfg, rngs=r, dot_general=dot_general, constrain=constrain)

    return make(rngs)


class Decoder(nnx.Module):
    """Token ids -> next-token logits, with an optional KV cache for incremental decoding."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dot_general: DotGeneral = jax.lax.dot_general,
        constrain: ActivationConstraint = no_constraint,
    ):
        self.cfg = cfg
        self.constrain = constrain
        self.embed = Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
            init_std=cfg.init_std, rngs=rngs, constrain=constrain,
        )
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs, dot_general, constrain)
        else:
            moe_layers = cfg.moe_layer_indices()
            self.layers = nnx.List(
                [Block(cfg, rngs=rngs, dot_general=dot_general, constrain=constrain, moe=i in moe_layers)
                 for i in range(cfg.num_layers)]
            )
        self.final_norm = RMSNorm(
            cfg.d_model, eps=cfg.rms_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs
        )
        if not cfg.tie_embeddings:
            self.lm_head = Linear(
                (cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",), dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype, init_std=cfg.init_std, rngs=rngs, dot_general=dot_general,
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        logit_index: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """``tokens`` int ``[B, L]`` -> (logits float32 ``[B, L, vocab]``, updated cache or None).

        Without a cache, ``positions`` default to ``0..L-1``. With a cache, the tokens continue each sequence
        at ``cache.lengths`` and the returned cache has ``lengths + L``. ``logit_index`` int ``[B]`` computes
        logits only at that position of each sequence (``[B, 1, vocab]``): a prefill needs just the last
        prompt position, and the vocabulary projection is the largest matmul of a short sequence.
        ``segment_ids`` int ``[B, L]`` (no cache) keeps packed documents from attending to each other; pass
        positions that restart per segment with them (``data.packing.segment_positions``).
        """
        b, l = tokens.shape
        if cache is not None:
            positions = cache.lengths[:, None] + jnp.arange(l, dtype=jnp.int32)[None, :]
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        x = self.constrain(self.embed(tokens), ACT_HIDDEN)
        x, new_kv, _ = self._run_layers(x, positions, cache, segment_ids)
        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        logits = self.constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))
        if cache is None:
            return logits, None
        return logits, KVCache(keys=new_kv[0], values=new_kv[1], lengths=cache.lengths + l)

    def forward_with_aux(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``tokens`` int ``[B, L]`` at positions ``0..L-1`` -> (logits float32 ``[B, L, vocab]``, MoE metrics).

        The metrics (:func:`~llmopt_jax.models.moe.combine_aux`): ``router_z_loss`` and ``load_balance_loss``
        averaged over the MoE layers, ``expert_counts`` ``[num_moe_layers, E]``, ``dropped_fraction``; empty
        for a dense model. Training adds the weighted losses to the cross-entropy.
        """
        b, l = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        x = self.constrain(self.embed(tokens), ACT_HIDDEN)
        x, _, aux = self._run_layers(x, positions, None)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        logits = self.constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))
        return logits, ({} if aux is None else combine_aux(aux))

    def _run_layers(self, x, positions, cache: KVCache | None, segment_ids: jax.Array | None = None):
        """``(x, (keys, values) or None, per-layer MoeAux: stacked, a list, or None when dense)``."""
        starts = None if cache is None else cache.lengths
        if self.cfg.pipelined and cache is None:
            return self._run_pipelined(x, positions, segment_ids), None, None

        def block_fn(graphdef, block_state, x, kv):
            return nnx.merge(graphdef, block_state)(x, positions, kv, starts, return_aux=True,
                                                    segment_ids=segment_ids)

        if self.cfg.remat != "none":
            block_fn = jax.checkpoint(
                block_fn, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers,
                static_argnums=(0,),
            )

        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(x, layer):
                block_state, kv = layer
                x, new_kv, aux = block_fn(graphdef, block_state, x, kv)
                return x, (new_kv, aux)

            kv_in = None if cache is None else (cache.keys, cache.values)
            x, (kv_out, aux) = jax.lax.scan(body, x, (state, kv_in))
            return x, kv_out, aux

        new_keys, new_values, auxes = [], [], []
        for i, block in enumerate(self.layers):
            graphdef, state = nnx.split(block)
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, new_kv, aux = block_fn(graphdef, state, x, kv)
            if aux is not None:
                auxes.append(aux)
            if new_kv is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])
        auxes = auxes or None
        if cache is None:
            return x, None, auxes
        return x, (jnp.stack(new_keys), jnp.stack(new_values)), auxes

    def _run_pipelined(self, x, positions, segment_ids):
        """The scanned layers as a GPipe pipeline over the mesh axis ``stage`` (``parallel/pipeline.py``):
        ``x`` ``[B, L, D]`` -> ``[B, L, D]``, equal to the plain scan."""
        from llmopt_jax.parallel.pipeline import pipeline_layers

        cfg = self.cfg
        graphdef, state = nnx.split(self.layers)

        def block_fn(block_state, x, side):
            pos, seg = side
            return nnx.merge(graphdef, block_state)(x, pos, segment_ids=seg)[0]

        if cfg.remat != "none":
            block_fn = jax.checkpoint(block_fn, policy=REMAT_POLICIES[cfg.remat])

        def stage_fn(chunk_state, x, side):  # one stage's consecutive layers on one microbatch
            return jax.lax.scan(lambda x, layer: (block_fn(layer, x, side), None), x, chunk_state)[0]

        is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
        axes = [v.get_metadata().get("out_sharding") for v in jax.tree.leaves(state, is_leaf=is_var)]
        return pipeline_layers(
            stage_fn, state, x, (positions, segment_ids), stages=cfg.pipeline_stages,
            microbatches=cfg.pipeline_microbatches, repeats=cfg.pipeline_repeats, constrain=self.constrain,
            layer_axes=axes,
        )

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens."""
        cfg = self.cfg
        return KVCache.create(
            cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype or cfg.compute_dtype
        )

