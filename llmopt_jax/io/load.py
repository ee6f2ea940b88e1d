"""One entry point for pretrained models: a known name, a GGUF file, or a Hugging Face safetensors directory."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from llmopt_jax.errors import LlmoptError
from llmopt_jax.io.gguf import MODEL_PACKAGES, config_from_gguf, params_from_gguf, read_gguf, resolve_model_path
from llmopt_jax.io.tokenizer import GGUFTokenizer, tokenizer_from_gguf, tokenizer_from_json
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.rules import DEFAULT_RULES, Rules
from llmopt_jax.parallel.sharded_init import load_params


@dataclasses.dataclass
class PretrainedModel:
    """A loaded model: config, ``nnx`` graphdef + parameter state (possibly sharded), tokenizer, source path."""

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: GGUFTokenizer | None
    path: str

    @property
    def bytes_held(self) -> int:
        """Bytes of every array the model holds (packed weights count their packed size)."""
        from llmopt_jax.infer.roofline import tree_bytes

        return tree_bytes(self.params)

    def linear_weight(self, block: int, name: str) -> Any:
        """Block ``block``'s linear layer ``name`` (``q_proj`` ... ``down_proj``) as the papers' float32 matrix
        ``W [outputs, inputs]`` (dequantized when packed)."""
        from llmopt_jax.compress.calibrate import kernel_to_matrix
        from llmopt_jax.compress.packed import PackedTensor
        from llmopt_jax.models.layout import layer_params

        pure = getattr(self, "float_params", None) or nnx.to_pure_dict(self.params)
        kernel = layer_params(pure["layers"], block, self.cfg.scan_layers)[name]["kernel"]
        return kernel_to_matrix(name, kernel.dequantize() if isinstance(kernel, PackedTensor) else kernel)

    def require_tokenizer(self) -> GGUFTokenizer:
        """The tokenizer, or an ``LlmoptError`` naming the model when none was found beside it."""
        if self.tokenizer is None:
            raise LlmoptError(f"{self.path}: no tokenizer found next to the model (tokenizer.json)")
        return self.tokenizer


def load_pretrained(
    name_or_path: str,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    **config_overrides: Any,
) -> PretrainedModel:
    """Loads ``name_or_path`` (``smollm2-135m``, a ``.gguf`` file, or a directory with ``config.json``).

    ``config_overrides`` replace :class:`ModelConfig` fields (e.g. ``dtype="bfloat16"``, ``scan_layers=False``);
    parameters are stored in ``param_dtype`` and placed with ``rules`` on ``mesh`` when given.
    """
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) or path.endswith(".safetensors"):
        from llmopt_jax.io.safetensors import read_hf_checkpoint

        directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
        cfg, pure = read_hf_checkpoint(directory, **config_overrides)
        tok_path = os.path.join(directory, "tokenizer.json")
        tokenizer = tokenizer_from_json(tok_path) if os.path.isfile(tok_path) else None
    elif os.path.isfile(path):
        f = read_gguf(path)
        cfg = config_from_gguf(f, **config_overrides)
        pure = params_from_gguf(f, cfg)
        tokenizer = tokenizer_from_gguf(f)
    else:
        raise LlmoptError(
            f"model {name_or_path!r} not found: give a known name ({', '.join(MODEL_PACKAGES)}), "
            "a GGUF file or a directory with config.json + *.safetensors"
        )
    graphdef, params = load_params(cfg, pure, mesh, rules)
    return PretrainedModel(cfg=cfg, graphdef=graphdef, params=params, tokenizer=tokenizer, path=path)


def load_tokenizer(name_or_path: str) -> GGUFTokenizer:
    """The tokenizer of a model name (``smollm2-135m``), a GGUF file, a ``tokenizer.json`` or a Hugging Face model
    directory holding one, without loading any weights."""
    path = resolve_model_path(name_or_path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if path.endswith(".json"):
        return tokenizer_from_json(path)
    if os.path.isfile(path):
        return tokenizer_from_gguf(read_gguf(path))
    raise LlmoptError(f"tokenizer {name_or_path!r} not found: give 'byte', a known model name "
                      f"({', '.join(MODEL_PACKAGES)}), a GGUF file, a tokenizer.json or a model directory")
