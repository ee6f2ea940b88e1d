"""LoRA / QLoRA fine-tuning inside the training loop (``configs/train.py:lora`` / ``qlora``).

:class:`LoraFineTune` holds the frozen base (float, or packed 4-bit for QLoRA) placed on the mesh with a graphdef
whose linears run :func:`~llmopt_jax.peft.lora.lora_dot_general`, and gives the loop what it needs: the train state
over the adapters only (so optimizer moments exist only for them; checkpoints hold only them), the ``combine``
function that builds the model's parameters inside the jitted step, held-out perplexity before and after, and the
adapter written in PEFT's layout to ``WORKDIR/adapter``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llmopt_jax.errors import ConfigError
from llmopt_jax.infer.roofline import tree_bytes
from llmopt_jax.peft.lora import (
    HF_MODEL_NAMES, LoraConfig, adapted_state, count_params, init_adapters, lora_dot_general, quantize_base,
    save_peft_adapter,
)


def lora_enabled(config) -> bool:
    """Whether ``config`` asks for LoRA fine-tuning (a ``lora`` section with ``rank`` > 0)."""
    lora = config.get("lora", None)
    return lora is not None and int(lora.get("rank", 0)) > 0


def eval_tokens(config, tokenizer) -> np.ndarray:
    """Token ids (no BOS) of the held-out text: ``eval.text_file``, else the held-out split of
    ``pydoc_data.topics`` (``data.text.topics_split``) joined with blank lines."""
    from llmopt_jax.data.text import load_texts, topics_split

    text_file = config.eval.get("text_file", "")
    text = load_texts(text_file) if text_file else "\n\n".join(topics_split("heldout"))
    return np.asarray(tokenizer.encode(text), np.int32)


class LoraFineTune:
    """The frozen base, adapters and evaluation of one fine-tuning run (see module docstring)."""

    def __init__(self, config, model_cfg, initial_params: dict, mesh, rules, tokenizer):
        from llmopt_jax.compress.packed import packed_model
        from llmopt_jax.parallel.sharded_init import load_params

        if initial_params is None:
            raise ConfigError("LoRA fine-tunes a pretrained model: set init_from (a model name or path)")
        self.config, self.cfg, self.mesh, self.rules, self.tokenizer = config, model_cfg, mesh, rules, tokenizer
        self.lcfg = LoraConfig.from_mapping(config.lora)
        self.base_bits = int(config.lora.get("base_bits", 0))
        seed = int(config.seed)
        self.num_params = count_params(initial_params)  # the float model's weights, whatever the base holds
        adapters = init_adapters(initial_params, self.lcfg, jax.random.PRNGKey(seed))
        if self.base_bits:
            packed = quantize_base(initial_params, self.base_bits, int(config.lora.base_group_size), self.lcfg.targets)
            self.graphdef, self.frozen = packed_model(model_cfg, packed, dot_general=lora_dot_general, mesh=mesh,
                                                      rules=rules)
        else:
            self.graphdef, self.frozen = load_params(model_cfg, initial_params, mesh, rules,
                                                     dot_general=lora_dot_general)
        replicated = NamedSharding(mesh, PartitionSpec())
        # Adapters are small (< 1 % of the model): every device holds them whole.
        self.adapters = jax.device_put(adapters, replicated)
        self.frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
        self.trainable_params = count_params(adapters)
        self._dropout_key = jax.random.PRNGKey(seed + 1)

    def combine(self, frozen, adapters, rng_step):
        """The model's parameters: ``frozen`` with ``adapters``; dropout masks drawn from ``rng_step`` (None: off)."""
        key = None if rng_step is None else jax.random.fold_in(self._dropout_key, rng_step)
        return adapted_state(frozen, adapters, self.lcfg, key)

    def init_state(self, optimizer) -> tuple[dict, Any]:
        """``(state, shardings)`` of the train state over the adapters only (replicated)."""
        import jax.numpy as jnp

        replicated = NamedSharding(self.mesh, PartitionSpec())
        opt_state = jax.jit(optimizer.init, out_shardings=replicated)(self.adapters)
        state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated), "params": self.adapters,
                 "opt_state": opt_state}
        shardings = jax.tree.map(lambda _: replicated, state)
        return state, shardings

    def perplexity(self, adapters=None, tokens=None) -> Any:
        """Held-out perplexity (``eval`` section) of the base with ``adapters`` (None: the base alone)."""
        from llmopt_jax.eval.perplexity import perplexity_of

        ev = self.config.eval
        params = self.frozen if adapters is None else adapted_state(self.frozen, adapters, self.lcfg)
        tokens = eval_tokens(self.config, self.tokenizer) if tokens is None else tokens
        return perplexity_of(self.graphdef, params, tokens, int(ev.seq_len), int(ev.batch_size),
                             max_windows=int(ev.max_windows), mesh=self.mesh, rules=self.rules,
                             progress=bool(self.config.train.progress))

    def perplexity_before(self, workdir: str) -> dict:
        """The base's held-out perplexity, cached in ``WORKDIR/eval_before.json`` (a resumed run reuses it)."""
        path = os.path.join(workdir, "eval_before.json")
        settings = {k: self.config.eval[k] for k in sorted(self.config.eval.keys())}
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
            if cached.get("eval") == settings:
                return cached
        result = self.perplexity()
        record = {"eval": settings, "perplexity": result.perplexity, "num_eval_tokens": result.num_eval_tokens,
                  "seconds": result.seconds}
        if jax.process_index() == 0:
            from llmopt_jax.jsonio import write_json

            write_json(path, record)
        return record

    def bytes_held(self, state) -> dict:
        """Bytes of the arrays training holds: frozen base (packed for QLoRA), adapters and optimizer state, and
        what a full fine-tune's float32 weights and two Adam moments would hold for comparison."""
        base, adapters, opt = tree_bytes(self.frozen), tree_bytes(state["params"]), tree_bytes(state["opt_state"])
        return {"bytes_held": base + adapters + opt, "bytes_held_base": base, "bytes_held_adapters": adapters,
                "bytes_held_opt_state": opt, "bytes_held_full_finetune": 3 * 4 * self.num_params}

    def finish(self, state, workdir: str, before: dict) -> dict:
        """Held-out perplexity after training, the adapter written to ``WORKDIR/adapter`` (PEFT layout), and the
        results keys of fine-tuning."""
        adapters = jax.device_get(state["params"])
        after = self.perplexity(adapters)
        source = self.config.get("init_from", "")
        directory = os.path.join(workdir, "adapter")
        if jax.process_index() == 0:
            save_peft_adapter(directory, adapters, self.lcfg, self.cfg, HF_MODEL_NAMES.get(source, source))
        return {
            "trainable_params": self.trainable_params,
            "trainable_fraction": self.trainable_params / self.num_params,
            "eval_perplexity_before": before["perplexity"],
            "eval_perplexity_after": after.perplexity,
            "eval_num_tokens": after.num_eval_tokens,
            "eval_seconds_after": after.seconds,
            **self.bytes_held(state),
            "base_bits": self.base_bits,
            "lora_rank": self.lcfg.rank,
            "lora_alpha": self.lcfg.alpha,
            "lora_targets": ",".join(self.lcfg.targets),
            "adapter_dir": directory,
        }
