"""Model hyperparameters as a frozen dataclass, validated once at construction."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from llmopt_jax.errors import ConfigError

# xla_causal: xla, skipping score blocks that causality masks; only for positions that ascend along each
# sequence (the default 0..L-1 without a cache; with a cache it is plain xla).
ATTENTION_IMPLS = ("xla", "xla_causal", "dot_product", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload_dots_no_batch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MOE_DISPATCH = ("dropless", "capacity")
MOE_GATING = ("softmax_topk", "switch", "unit")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-family decoder.

    ``rope_interleaved`` selects which pairs of head dimensions rotate together: ``False`` pairs ``i`` with
    ``i + head_dim/2`` (Hugging Face checkpoints), ``True`` pairs ``2i`` with ``2i+1`` (the original Meta
    layout, which llama.cpp and GGUF files use for q/k weights).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    head_dim: int = 0  # 0: d_model // num_heads
    rope_base: float = 10000.0
    rope_interleaved: bool = False
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (fp32 master weights by default)
    attention: str = "xla"
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02
    # Mixture of experts (models/moe.py); num_experts 0 = dense. moe_layers: "all" or comma-separated layer
    # indices (a subset needs scan_layers=False: scanned layers share one structure). moe_expert_dim 0 = mlp_dim.
    num_experts: int = 0
    moe_top_k: int = 2
    moe_layers: str = "all"
    moe_expert_dim: int = 0
    moe_gating: str = "softmax_topk"
    moe_dispatch: str = "dropless"
    moe_capacity_factor: float = 1.25
    moe_z_loss_weight: float = 1e-3
    moe_load_balance_weight: float = 1e-2
    # Pipeline parallelism (parallel/pipeline.py), set from mesh.stage / train.microbatches /
    # train.pipeline_repeats by the training loop: the scanned layers run as `pipeline_stages` stages over
    # `pipeline_microbatches` microbatches (1/1/1 = no pipeline). Only the uncached forward is pipelined.
    pipeline_stages: int = 1
    pipeline_microbatches: int = 1
    pipeline_repeats: int = 1

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // max(self.num_heads, 1))
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}; choose one of {tuple(DTYPES)}")
        if self.num_experts:
            self._check_moe()
        if self.pipelined:
            from llmopt_jax.config_checks import check_pipeline

            check_pipeline(self.num_layers, self.pipeline_stages, self.pipeline_microbatches, self.pipeline_repeats,
                           scan_layers=self.scan_layers, num_experts=self.num_experts)

    @property
    def pipelined(self) -> bool:
        """Whether the uncached forward runs its layers as a pipeline (parallel/pipeline.py)."""
        return (self.pipeline_stages, self.pipeline_microbatches, self.pipeline_repeats) != (1, 1, 1)

    def _check_moe(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"model.num_experts={self.num_experts} must be >= 0 (0 = dense)")
        if not 1 <= self.moe_top_k <= self.num_experts:
            raise ConfigError(f"model.moe_top_k={self.moe_top_k} must be in 1..num_experts={self.num_experts}")
        if self.moe_gating not in MOE_GATING:
            raise ConfigError(f"model.moe_gating={self.moe_gating!r}; choose one of {MOE_GATING}")
        if self.moe_gating == "switch" and self.moe_top_k != 1:
            raise ConfigError(f"model.moe_gating='switch' routes each token to one expert; got moe_top_k={self.moe_top_k}")
        if self.moe_dispatch not in MOE_DISPATCH:
            raise ConfigError(f"model.moe_dispatch={self.moe_dispatch!r}; choose one of {MOE_DISPATCH}")
        if self.moe_capacity_factor <= 0:
            raise ConfigError(f"model.moe_capacity_factor={self.moe_capacity_factor} must be positive")
        if self.moe_expert_dim < 0:
            raise ConfigError(f"model.moe_expert_dim={self.moe_expert_dim} must be >= 0 (0 = mlp_dim)")
        layers = self.moe_layer_indices()
        if not layers:
            raise ConfigError(f"model.moe_layers={self.moe_layers!r} selects no layer")
        if self.scan_layers and len(layers) != self.num_layers:
            raise ConfigError(f"model.moe_layers={self.moe_layers!r} routes only some layers: set "
                              "model.scan_layers=False (scanned layers share one structure)")

    @property
    def expert_dim(self) -> int:
        """Hidden size of one expert's SwiGLU MLP."""
        return self.moe_expert_dim or self.mlp_dim

    def moe_layer_indices(self) -> tuple[int, ...]:
        """Indices of the layers with a routed MLP (``()`` for a dense model)."""
        if not self.num_experts:
            return ()
        spec = str(self.moe_layers).strip()
        if spec == "all":
            return tuple(range(self.num_layers))
        try:
            layers = sorted({int(part) for part in spec.split(",") if part.strip()})
        except ValueError:
            raise ConfigError(f"model.moe_layers={self.moe_layers!r}: give 'all' or comma-separated layer indices") from None
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"model.moe_layers={self.moe_layers!r}: layer(s) {bad} outside 0..{self.num_layers - 1}")
        return tuple(layers)

    def is_moe_layer(self, index: int) -> bool:
        return index in self.moe_layer_indices()

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a dict or ConfigDict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = dict(values)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def _mlp_params(self, active: bool) -> int:
        """MLP parameters summed over layers; ``active``: only the ``moe_top_k`` experts a token runs (+ router)."""
        dense = 3 * self.d_model * self.mlp_dim
        n_moe = len(self.moe_layer_indices())
        experts = self.moe_top_k if active else self.num_experts
        routed = 3 * self.d_model * self.expert_dim * experts + self.d_model * self.num_experts
        return (self.num_layers - n_moe) * dense + n_moe * routed

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied; all experts)."""
        d, h, k, hd = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = d * hd * (2 * h + 2 * k) + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + self._mlp_params(active=False) + embed + d

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: all linear kernels plus the LM head (for a MoE, the
        router and the ``moe_top_k`` experts a token is routed to)."""
        d, h, k, hd = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim
        return self.num_layers * d * hd * (2 * h + 2 * k) + self._mlp_params(active=True) + self.vocab_size * d

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per trained token (forward + backward), PaLM appendix B convention.

        ``6 * matmul_params + 12 * layers * heads * head_dim * seq_len``; the attention term counts the full
        (unmasked) score matrix, as MaxText and the PaLM paper do. Rematerialisation is not counted (MFU,
        not hardware FLOPs utilisation).
        """
        return 6.0 * self.matmul_params() + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len
