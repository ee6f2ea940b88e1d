"""LoRA and QLoRA as pure transforms over a decoder's params pytree, and adapters in Hugging Face PEFT's format.

LoRA (Hu et al., 2021) freezes a linear layer's kernel ``W`` and learns a low-rank update: ``y = x·W +
(alpha/r)·dropout(x)·A·B`` with ``A [*in, r]`` (random) and ``B [r, *out]`` (zeros, so training starts from the
unchanged model). Here the adapters are a separate pytree that mirrors the parameters (``{"layers": {"q_proj":
{"lora_a", "lora_b"}, ...}}``, with a leading layer axis when the layers are stacked), and
:func:`apply_adapters` swaps each chosen kernel for a :class:`LoraKernel` holding the frozen kernel and its
adapter. The model is not rewritten: its linear layers multiply through the injectable ``dot_general``, and
:func:`lora_dot_general` recognises a :class:`LoraKernel` (the MaxText pattern ``compress/packed.py`` uses for
packed weights). Gradients are taken with respect to the adapters only, so the optimizer holds state only for
them.

QLoRA (Dettmers et al., 2023) holds the frozen base quantized: :func:`quantize_base` rounds the block linears
with our RTN quantizer (``compress/quantize.py``; int4 with an integer zero-point per group of 64 inputs by
default, not the paper's NF4 codebook) and packs them (``compress/packed.py``: two codes per byte). A
:class:`LoraKernel`'s base is then a ``PackedTensor``, unpacked and dequantized inside the matmul one layer at a
time; the adapters stay float32.

:func:`merge_adapters` folds ``(alpha/r)·A·B`` into float kernels (for export or faster inference) and
:func:`unmerge_adapters` takes it out again. :func:`save_peft_adapter` / :func:`load_peft_adapter` write and read
``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` ``[r, in_features]``, ``...lora_B.weight``
``[out_features, r]``), so ``peft.PeftModel.from_pretrained`` loads them onto the Hugging Face model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmopt_jax.compress.packed import PackedTensor, packed_dot_general
from llmopt_jax.errors import ConfigError, LlmoptError
from llmopt_jax.models.layout import layers_are_stacked

# The linear layers of a block LoRA can adapt, with (leading input dims, trailing output dims) of our kernels.
KERNEL_DIMS = {"q_proj": (1, 2), "k_proj": (1, 2), "v_proj": (1, 2), "o_proj": (2, 1), "gate_proj": (1, 1),
               "up_proj": (1, 1), "down_proj": (1, 1)}
LORA_TARGETS = tuple(KERNEL_DIMS)
# Hugging Face module paths of those layers inside ``model.layers.N`` (what PEFT's keys and target_modules name).
HF_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers."
# Hugging Face names of the models ``load_pretrained`` knows by name (PEFT's base_model_name_or_path).
HF_MODEL_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank ``rank``, scaling ``alpha / rank``, input dropout ``dropout`` (training only) on the ``targets``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets is empty: name some of " + ",".join(LORA_TARGETS))
        for name in self.targets:
            if name not in KERNEL_DIMS:
                raise ConfigError(f"lora.targets: unknown layer {name!r}; choose from {','.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @classmethod
    def from_mapping(cls, m) -> "LoraConfig":
        """From a config section with ``rank``, ``alpha``, ``dropout`` and ``targets`` (comma-separated or a list)."""
        targets = m.get("targets", ",".join(LORA_TARGETS))
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return cls(int(m["rank"]), float(m["alpha"]), float(m.get("dropout", 0.0)), tuple(targets))


@struct.dataclass
class LoraKernel:
    """A frozen kernel (float ``[*in, *out]`` or a :class:`PackedTensor`) with its LoRA factors ``a`` ``[*in, r]``
    and ``b`` ``[r, *out]`` (stacked layers add a leading axis to every array). ``key`` (raw uint32 ``[2]`` per
    layer, or None) draws the dropout mask of the adapter's input."""

    base: Any
    a: jax.Array
    b: jax.Array
    key: jax.Array | None
    scale: float = struct.field(pytree_node=False)
    dropout: float = struct.field(pytree_node=False)

    def astype(self, dtype) -> "LoraKernel":
        """The kernel with float parts in ``dtype`` (``Linear`` casts kernels to its compute dtype); a packed base
        stays packed."""
        base = self.base if isinstance(self.base, PackedTensor) else self.base.astype(dtype)
        return self.replace(base=base, a=self.a.astype(dtype), b=self.b.astype(dtype))


def lora_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``jax.lax.dot_general`` for a ``Linear``'s ``x · W`` that also accepts a :class:`LoraKernel` (and, through
    :func:`~llmopt_jax.compress.packed.packed_dot_general`, a packed kernel): ``x·W + scale·(drop(x)·A)·B``."""
    if not isinstance(rhs, LoraKernel):
        return packed_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    (_, _), (batch_lhs, _) = dimension_numbers
    if batch_lhs:
        raise ValueError("lora_dot_general supports contractions without batch dimensions (Linear layers)")
    y = packed_dot_general(lhs, rhs.base, dimension_numbers, precision, preferred_element_type)
    x = lhs
    if rhs.key is not None and rhs.dropout > 0:
        keep = jax.random.bernoulli(rhs.key, 1.0 - rhs.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - rhs.dropout), 0).astype(lhs.dtype)
    # The adapter's A has the kernel's input dims, so it contracts with the same dimension numbers: [..., r].
    xa = jax.lax.dot_general(x, rhs.a.astype(lhs.dtype), dimension_numbers, preferred_element_type=jnp.float32)
    delta = jax.lax.dot_general(xa.astype(lhs.dtype), rhs.b.astype(lhs.dtype), (((xa.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
    return (y.astype(jnp.float32) + rhs.scale * delta).astype(y.dtype)


# --- walking the block linears --------------------------------------------------------------------------------


def _kernel_lead(name: str, kernel: Any) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """``(stacked-layer dims, in_shape, out_shape)`` of block linear ``name``'s kernel (float or packed)."""
    n_in, n_out = KERNEL_DIMS[name]
    if isinstance(kernel, PackedTensor):
        shape, lead = kernel.shape, kernel.data.ndim - 2
        return lead, tuple(shape[:n_in]), tuple(shape[n_in:])
    shape = tuple(np.shape(kernel))
    lead = len(shape) - n_in - n_out
    return lead, shape[lead : lead + n_in], shape[lead + n_in :]


def _blocks(layers: dict) -> list[tuple[tuple, dict]]:
    """``[(key path under layers, block dict)]``: one stacked block, or each unrolled block by index."""
    if layers_are_stacked(layers):
        return [((), layers)]
    return [((k,), v) for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))]


def _leading_shape(kernel: Any, lead: int) -> tuple[int, ...]:
    data = kernel.data if isinstance(kernel, PackedTensor) else kernel
    return tuple(np.shape(data)[:lead])


def init_adapters(pure: dict, lcfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Adapters for ``pure`` params: per target, ``lora_a`` ``[*in, r]`` uniform in ``±1/sqrt(fan_in)`` (PEFT's
    Kaiming-uniform default) and ``lora_b`` ``[r, *out]`` zeros, with the kernel's stacked-layer axis if any."""
    out: dict = {}
    for path, block in _blocks(pure["layers"]):
        entry = {}
        for name in lcfg.targets:
            if name not in block:
                raise ConfigError(f"lora.targets: the model's blocks have no {name!r} (a MoE layer?)")
            kernel = block[name]["kernel"]
            lead, ins, outs = _kernel_lead(name, kernel)
            lead_shape = _leading_shape(kernel, lead)
            bound = 1.0 / math.sqrt(math.prod(ins))
            key, sub = jax.random.split(key)
            a = jax.random.uniform(sub, lead_shape + ins + (lcfg.rank,), dtype, -bound, bound)
            entry[name] = {"lora_a": a, "lora_b": jnp.zeros(lead_shape + (lcfg.rank,) + outs, dtype)}
        if path:
            out[path[0]] = entry
        else:
            out = entry
    return {"layers": out}


def _adapter_blocks(adapters: dict, pure_layers: dict) -> list[tuple[tuple, dict, dict]]:
    ad = adapters["layers"]
    if layers_are_stacked(pure_layers):
        return [((), pure_layers, ad)]
    lookup = lambda d, k: d[k] if k in d else d[str(k) if not isinstance(k, str) else int(k)]  # noqa: E731
    return [(path, block, lookup(ad, path[0])) for path, block in _blocks(pure_layers)]


def _map_targets(pure: dict, adapters: dict, fn) -> dict:
    """``pure`` with ``block[name]["kernel"]`` replaced by ``fn(name, kernel, adapter, layer_index_or_None)`` for
    every adapted linear; everything else is shared, not copied."""
    layers = pure["layers"]
    stacked = layers_are_stacked(layers)
    new_layers = dict(layers)
    for path, block, ad_block in _adapter_blocks(adapters, layers):
        new_block = dict(block)
        for name, ad in ad_block.items():
            index = None if stacked else path[0]
            new_block[name] = {**block[name], "kernel": fn(name, block[name]["kernel"], ad, index)}
        if stacked:
            new_layers = new_block
        else:
            new_layers[path[0]] = new_block
    return {**pure, "layers": new_layers}


def apply_adapters(pure: dict, adapters: dict, lcfg: LoraConfig, dropout_key: jax.Array | None = None) -> dict:
    """``pure`` with every adapted kernel replaced by a :class:`LoraKernel` (run with :func:`lora_dot_general`).

    ``dropout_key`` (a raw uint32 key) turns on ``lcfg.dropout`` with a different mask per layer and linear;
    without it (evaluation) there is no dropout."""
    use_dropout = dropout_key is not None and lcfg.dropout > 0
    names = {n: i for i, n in enumerate(LORA_TARGETS)}

    def one(name, kernel, ad, index):
        key = None
        if use_dropout:
            key = jax.random.fold_in(dropout_key, names[name] + 16 * (0 if index is None else int(index) + 1))
            lead, _, _ = _kernel_lead(name, kernel)
            if lead:
                key = jax.random.split(key, _leading_shape(kernel, lead)[0])
        return LoraKernel(kernel, ad["lora_a"], ad["lora_b"], key, lcfg.scale, lcfg.dropout if use_dropout else 0.0)

    return _map_targets(pure, adapters, one)


def adapted_state(frozen, adapters: dict, lcfg: LoraConfig, dropout_key: jax.Array | None = None):
    """The ``nnx.State`` of ``frozen`` (a model's params, float or packed) with :func:`apply_adapters`' kernels:
    merge it with a graphdef built with :func:`lora_dot_general`. Pure, so it runs inside ``jit`` and ``grad``."""
    from flax import nnx

    pure = apply_adapters(nnx.to_pure_dict(frozen), adapters, lcfg, dropout_key)
    state = jax.tree.map(lambda x: x, frozen)  # a new State of the same Variables (the input is left alone)
    nnx.replace_by_pure_dict(state, pure)
    return state


def adapter_delta(name: str, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale · A·B`` float32 in the kernel's shape ``[..., *in, *out]`` (``a`` ``[..., *in, r]``, ``b``
    ``[..., r, *out]``)."""
    n_in, n_out = KERNEL_DIMS[name]
    lead = a.ndim - n_in - 1
    ins, r, outs = a.shape[lead:-1], a.shape[-1], b.shape[lead + 1 :]
    a2 = jnp.asarray(a, jnp.float32).reshape(a.shape[:lead] + (math.prod(ins), r))
    b2 = jnp.asarray(b, jnp.float32).reshape(b.shape[:lead] + (r, math.prod(outs)))
    return (scale * (a2 @ b2)).reshape(a.shape[:lead] + tuple(ins) + tuple(outs))


def _float_kernel(kernel: Any) -> jax.Array:
    if not isinstance(kernel, PackedTensor):
        return jnp.asarray(kernel, jnp.float32)
    if kernel.data.ndim == 2:
        return kernel.dequantize(jnp.float32)
    return jax.vmap(lambda p: p.dequantize(jnp.float32))(kernel)


def merge_adapters(pure: dict, adapters: dict, lcfg: LoraConfig) -> dict:
    """``pure`` with ``scale·A·B`` added to every adapted kernel (float32; a packed base is dequantized first):
    the plain model that computes what the adapted one does."""
    return _map_targets(pure, adapters, lambda name, k, ad, _: (_float_kernel(k) + adapter_delta(
        name, ad["lora_a"], ad["lora_b"], lcfg.scale)).astype(jnp.float32 if isinstance(k, PackedTensor) else k.dtype))


def unmerge_adapters(pure: dict, adapters: dict, lcfg: LoraConfig) -> dict:
    """Inverse of :func:`merge_adapters` for a float base: ``scale·A·B`` subtracted from the adapted kernels."""
    return _map_targets(pure, adapters, lambda name, k, ad, _: (jnp.asarray(k, jnp.float32) - adapter_delta(
        name, ad["lora_a"], ad["lora_b"], lcfg.scale)).astype(k.dtype))


def count_params(tree: Any) -> int:
    """Number of array elements in ``tree``."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def quantize_base(pure: dict, bits: int = 4, group_size: int = 64, names: Sequence[str] = LORA_TARGETS) -> dict:
    """QLoRA's frozen base: ``pure`` with the block linears ``names`` rounded to an asymmetric ``bits``-bit grid
    with one scale and integer zero-point per ``group_size`` inputs (RTN, ``compress/quantize.py``) and packed
    (``compress/packed.py``); embeddings and norms stay float."""
    from llmopt_jax.compress.calibrate import kernel_to_matrix
    from llmopt_jax.compress.packed import pack_matrix
    from llmopt_jax.compress.quantize import QuantGrid, rtn_quantize

    grid = QuantGrid(bits=bits, group_size=group_size)

    def one(name, kernel):
        lead, ins, outs = _kernel_lead(name, kernel)
        if isinstance(kernel, PackedTensor):
            raise ConfigError(f"{name} is already packed: QLoRA quantizes a float base")
        layers = [kernel] if not lead else [kernel[i] for i in range(np.shape(kernel)[0])]
        records = [rtn_quantize(kernel_to_matrix(name, k), grid)[1] for k in layers]
        record = records[0] if not lead else jax.tree.map(lambda *x: jnp.stack(x), *records)
        return pack_matrix(record, ins + outs, KERNEL_DIMS[name][0])

    fake = {"layers": {}}
    for path, block in _blocks(pure["layers"]):
        entry = {n: {"lora_a": None, "lora_b": None} for n in names if n in block}
        if path:
            fake["layers"][path[0]] = entry
        else:
            fake["layers"] = entry
    return _map_targets(pure, fake, lambda name, k, ad, _: one(name, k))


# --- Hugging Face PEFT format ----------------------------------------------------------------------------------


def _layer_arrays(adapters: dict, name: str, part: str, num_layers: int) -> list[np.ndarray]:
    """Layer ``i``'s ``lora_a``/``lora_b`` of linear ``name`` for ``i < num_layers`` (stacked or unrolled)."""
    layers = adapters["layers"]
    if name in layers:  # stacked
        stacked = np.asarray(jax.device_get(layers[name][part]), np.float32)
        return [stacked[i] for i in range(num_layers)]
    out = []
    for i in range(num_layers):
        block = layers[i] if i in layers else layers[str(i)]
        out.append(np.asarray(jax.device_get(block[name][part]), np.float32))
    return out


def peft_adapter_config(lcfg: LoraConfig, base_model_name_or_path: str = "") -> dict:
    """``adapter_config.json``'s contents for PEFT's ``LoraConfig``."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "revision": None, "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout,
        "target_modules": sorted(lcfg.targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
    }


def peft_state_dict(adapters: dict, lcfg: LoraConfig, cfg) -> dict[str, np.ndarray]:
    """PEFT's tensors: ``...layers.N.<module>.lora_A.weight`` ``[r, in_features]`` and ``lora_B.weight``
    ``[out_features, r]`` float32, in Hugging Face's rotary layout for q/k (a GGUF-loaded model's interleaved q/k
    output features are permuted back, like ``io/safetensors.py`` does for the weights)."""
    from llmopt_jax.models.rope import permute_rotary_features

    tensors = {}
    for name in lcfg.targets:
        a_layers = _layer_arrays(adapters, name, "lora_a", cfg.num_layers)
        b_layers = _layer_arrays(adapters, name, "lora_b", cfg.num_layers)
        for i, (a, b) in enumerate(zip(a_layers, b_layers)):
            if cfg.rope_interleaved and name in ("q_proj", "k_proj"):
                b = permute_rotary_features(b, cfg.head_dim, to_interleaved=False)
            prefix = f"{PEFT_PREFIX}{i}.{HF_MODULES[name]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, lcfg.rank).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(lcfg.rank, -1).T)
    return tensors


def save_peft_adapter(directory: str, adapters: dict, lcfg: LoraConfig, cfg, base_model_name_or_path: str = "") -> str:
    """Writes ``directory/adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's layout); returns
    ``directory``."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(peft_state_dict(adapters, lcfg, cfg), os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(peft_adapter_config(lcfg, base_model_name_or_path), f, indent=2)
        f.write("\n")
    return directory


def load_peft_adapter(directory: str, cfg, stacked: bool | None = None) -> tuple[dict, LoraConfig]:
    """``(adapters, LoraConfig)`` read from a PEFT LoRA directory for a model of config ``cfg`` (stacked layers
    per ``cfg.scan_layers`` unless ``stacked`` is given). Raises ``LlmoptError`` naming a missing file or tensor
    or a config PEFT features we do not implement (DoRA, rsLoRA, per-layer ranks, biases)."""
    from safetensors.numpy import load_file

    from llmopt_jax.models.rope import permute_rotary_features

    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise LlmoptError(f"not a PEFT adapter directory: {path} is missing")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise LlmoptError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("rank_pattern", {}), ("alpha_pattern", {}),
                    ("bias", "none")):
        if config.get(key, ok) not in (ok, None):
            raise LlmoptError(f"{config_path}: {key}={config[key]!r} is not supported")
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    lcfg = LoraConfig(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)),
                      tuple(t for t in LORA_TARGETS if t in targets))
    tensors = load_file(weights_path)
    stacked = cfg.scan_layers if stacked is None else stacked
    per_layer = []
    for i in range(cfg.num_layers):
        entry = {}
        for name in lcfg.targets:
            n_in, _ = KERNEL_DIMS[name]
            ins, outs = _hf_io_shapes(cfg, name)
            prefix = f"{PEFT_PREFIX}{i}.{HF_MODULES[name]}"
            try:
                a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
            except KeyError as e:
                raise LlmoptError(f"{weights_path}: tensor {e.args[0]} is missing") from None
            if a.shape != (lcfg.rank, math.prod(ins)) or b.shape != (math.prod(outs), lcfg.rank):
                raise LlmoptError(f"{weights_path}: {prefix} has lora_A {a.shape} / lora_B {b.shape}, expected "
                                  f"{(lcfg.rank, math.prod(ins))} / {(math.prod(outs), lcfg.rank)}")
            b = b.T.reshape((lcfg.rank,) + outs)
            if cfg.rope_interleaved and name in ("q_proj", "k_proj"):
                b = permute_rotary_features(b, cfg.head_dim, to_interleaved=True)
            entry[name] = {"lora_a": jnp.asarray(a.T.reshape(ins + (lcfg.rank,)), jnp.float32),
                           "lora_b": jnp.asarray(b, jnp.float32)}
        per_layer.append(entry)
    if stacked:
        return {"layers": jax.tree.map(lambda *x: jnp.stack(x), *per_layer)}, lcfg
    return {"layers": dict(enumerate(per_layer))}, lcfg


def _hf_io_shapes(cfg, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Our kernel's ``(in_shape, out_shape)`` for block linear ``name`` of a model of config ``cfg``."""
    d, h, k, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    return {"q_proj": ((d,), (h, hd)), "k_proj": ((d,), (k, hd)), "v_proj": ((d,), (k, hd)), "o_proj": ((h, hd), (d,)),
            "gate_proj": ((d,), (f,)), "up_proj": ((d,), (f,)), "down_proj": ((f,), (d,))}[name]
