"""The smoke-sized model the server and its load test run in seconds: a randomly initialised decoder of the
``smoke`` shape (``models/presets.py``) with a byte-level tokenizer and a ChatML chat template."""

from __future__ import annotations

import dataclasses

from flax import nnx

from llmopt_jax.data.text import ByteTokenizer
from llmopt_jax.io.tokenizer import DEFAULT_CHAT_TEMPLATE, GGUFTokenizer
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.presets import MODEL_PRESETS

SMOKE_NAME = "smoke"


class ByteChatTokenizer(ByteTokenizer):
    """UTF-8 bytes as ids (BOS 256, EOS 257) plus a ChatML template rendered as plain text; EOS ends an answer."""

    add_bos = True
    stop_ids = (ByteTokenizer.eos_id,)
    chat_template = DEFAULT_CHAT_TEMPLATE
    apply_chat_template = GGUFTokenizer.apply_chat_template

    def decode(self, ids, skip_special: bool = False) -> str:
        return super().decode(ids)


@dataclasses.dataclass
class SmokeModel:
    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: ByteChatTokenizer
    path: str = SMOKE_NAME


def smoke_model(seed: int = 0, **overrides) -> SmokeModel:
    """A random ``smoke``-shaped decoder (``overrides`` replace :class:`ModelConfig` fields) and its tokenizer."""
    from llmopt_jax.models.decoder import Decoder

    cfg = ModelConfig(**{**MODEL_PRESETS["smoke"], **overrides})
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))
    return SmokeModel(cfg, graphdef, params, ByteChatTokenizer())
