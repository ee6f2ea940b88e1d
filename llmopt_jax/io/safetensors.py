"""Read and write Hugging Face LLaMA-family checkpoint directories (``config.json`` + ``*.safetensors``), no torch.

HF stores q/k projections in the rotate-half rotary layout, which is our default (``rope_interleaved=False``),
so weights are used as stored. A model loaded from GGUF (Meta's interleaved layout) has its q/k output
features permuted back on export, so the written directory is a correct HF checkpoint either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from llmopt_jax.errors import LlmoptError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.layout import layer_params, layers_are_stacked, stack_layers
from llmopt_jax.models.rope import permute_rotary_features

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
# Mixtral's expert weights: w1 = gate, w3 = up, w2 = down (models/moe.py's gate_proj, up_proj, down_proj).
_EXPERT_LINEARS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Files an export writes; an existing directory holding anything else is not ours to replace.
_OWN_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", SINGLE_FILE, INDEX_FILE)

_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
            "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
            "down_proj": "mlp.down_proj"}


class SafetensorsError(LlmoptError):
    """A Hugging Face checkpoint directory that is missing, incomplete, corrupted or not a model we can map."""


def _specs(cfg: ModelConfig) -> list[tuple[str, tuple, tuple, tuple | None]]:
    """``(hf_name, our_path, in_shape, out_shape)`` per tensor in HF order; ``out_shape=None``: stored as is."""
    d, h, k, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    io = {"q_proj": ((d,), (h, hd)), "k_proj": ((d,), (k, hd)), "v_proj": ((d,), (k, hd)),
          "o_proj": ((h, hd), (d,)), "gate_proj": ((d,), (f,)), "up_proj": ((d,), (f,)), "down_proj": ((f,), (d,))}
    specs = [("model.embed_tokens.weight", ("embed", "embedding"), (cfg.vocab_size, d), None)]
    moe_layers = cfg.moe_layer_indices()
    fe, e = cfg.expert_dim, cfg.num_experts
    expert_io = {"gate_proj": ((d,), (fe,)), "up_proj": ((d,), (fe,)), "down_proj": ((fe,), (d,))}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        specs += [(p + hf + ".weight", ("layers", i, ours, "scale"), (d,), None) for ours, hf in _NORMS.items()]
        if i not in moe_layers:
            specs += [(p + hf + ".weight", ("layers", i, ours, "kernel"), *io[ours]) for ours, hf in _LINEARS.items()]
            continue
        # A routed layer, in Mixtral's names: the router (HF [E, d]) and each expert's three linears; our
        # path's trailing int is the expert's index along the stacked kernel's leading axis.
        specs += [(p + hf + ".weight", ("layers", i, ours, "kernel"), *io[ours]) for ours, hf in _LINEARS.items()
                  if not hf.startswith("mlp.")]
        specs.append((p + "block_sparse_moe.gate.weight", ("layers", i, "moe", "router"), (d,), (e,)))
        specs += [(f"{p}block_sparse_moe.experts.{j}.{hf}.weight", ("layers", i, "moe", ours, "kernel", j),
                   *expert_io[ours]) for j in range(e) for ours, hf in _EXPERT_LINEARS.items()]
    specs.append(("model.norm.weight", ("final_norm", "scale"), (d,), None))
    if not cfg.tie_embeddings:
        specs.append(("lm_head.weight", ("lm_head", "kernel"), (d,), (cfg.vocab_size,)))
    return specs


def _hf_shape(in_shape: tuple, out_shape: tuple | None) -> tuple:
    return in_shape if out_shape is None else (int(np.prod(out_shape)), int(np.prod(in_shape)))


def config_from_hf(config: dict, path: str = "config.json", **overrides: Any) -> ModelConfig:
    """Our :class:`ModelConfig` (``rope_interleaved=False``) from an HF ``config.json`` dict; ``overrides`` win."""
    archs = config.get("architectures") or []
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
        raise SafetensorsError(f"{path}: unsupported model_type {config.get('model_type')!r} / architectures "
                               f"{archs}; supported: {SUPPORTED_MODEL_TYPES}")
    # transformers 5 moves rope_theta/rope_scaling into rope_parameters; only unscaled RoPE maps onto our model.
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise SafetensorsError(f"{path}: RoPE scaling {rope!r} is not supported")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, ok) != ok:
            raise SafetensorsError(f"{path}: {key}={config[key]!r} is not supported (need {ok!r})")

    def get(key: str, default: Any = None) -> Any:
        if config.get(key) is None and default is None:
            raise SafetensorsError(f"{path}: key {key!r} is missing")
        return default if config.get(key) is None else config[key]

    heads = int(get("num_attention_heads"))
    values = dict(
        vocab_size=int(get("vocab_size")), d_model=int(get("hidden_size")), num_layers=int(get("num_hidden_layers")),
        num_heads=heads, num_kv_heads=int(get("num_key_value_heads", heads)), mlp_dim=int(get("intermediate_size")),
        head_dim=int(get("head_dim", 0) or 0), rope_base=float(get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_interleaved=False, rms_eps=float(get("rms_norm_eps", 1e-6)),  # HF LlamaConfig's defaults
        tie_embeddings=bool(get("tie_word_embeddings", False)), max_seq_len=int(get("max_position_embeddings", 2048)),
        init_std=float(get("initializer_range", 0.02)),
    )
    if config.get("num_local_experts"):
        # Mixtral: intermediate_size is one expert's width; the moe_* keys are ours (absent: Mixtral's semantics,
        # softmax over the top-k router logits, every layer routed).
        values.update(
            num_experts=int(config["num_local_experts"]), moe_top_k=int(get("num_experts_per_tok", 2)),
            moe_expert_dim=values["mlp_dim"], mlp_dim=int(get("dense_intermediate_size", values["mlp_dim"])),
            moe_layers=str(get("moe_layers", "all")), moe_gating=str(get("moe_gating", "softmax_topk")),
            moe_dispatch=str(get("moe_dispatch", "dropless")),
            moe_capacity_factor=float(get("moe_capacity_factor", 1.25)),
            moe_load_balance_weight=float(get("router_aux_loss_coef", 1e-2)),
        )
        if values["moe_layers"] != "all":
            values["scan_layers"] = False  # a partly routed model cannot scan one block structure
    values.update(overrides)
    return ModelConfig.from_mapping(values)


def _open(path: str, stack: contextlib.ExitStack) -> Any:
    from safetensors import safe_open

    try:
        return stack.enter_context(safe_open(path, framework="numpy"))
    except Exception as e:  # noqa: BLE001 - the Rust binding raises its own untyped errors for bad bytes
        raise SafetensorsError(f"{path}: truncated or corrupted safetensors file ({e})") from e


def read_hf_checkpoint(path: str, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """``(cfg, params)`` from an HF checkpoint directory (single ``model.safetensors`` or sharded with an index).

    ``params`` is the pure nested dict of :func:`params_from_gguf`: float32 NumPy arrays, kernels
    ``[in, out]`` (q ``[d, heads, head_dim]``, o ``[heads, head_dim, d]``), layers stacked when
    ``cfg.scan_layers`` else keyed ``0..L-1``, ``lm_head`` only when embeddings are untied.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise SafetensorsError(f"checkpoint directory not found: {path}")
    if not os.path.isfile(config_path):
        raise SafetensorsError(f"{config_path} not found (not a Hugging Face checkpoint directory)")
    try:
        with open(config_path) as fh:
            cfg = config_from_hf(json.load(fh), config_path, **config_overrides)
    except json.JSONDecodeError as e:
        raise SafetensorsError(f"{config_path}: invalid JSON ({e})") from e
    index_path, single_path = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
    with contextlib.ExitStack() as stack:
        if os.path.isfile(index_path):
            try:
                with open(index_path) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SafetensorsError(f"{index_path}: not a safetensors index ({e!r})") from e
            files = {}
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(path, shard)):
                    raise SafetensorsError(f"{index_path}: names shard {shard!r}, which is missing")
                files[shard] = _open(os.path.join(path, shard), stack)
            where = {name: (os.path.join(path, s), files[s]) for name, s in weight_map.items()}
            missing_in = index_path
        elif os.path.isfile(single_path):
            f = _open(single_path, stack)
            where = {name: (single_path, f) for name in f.keys()}
            missing_in = single_path
        else:
            raise SafetensorsError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

        layers: list[dict] = [{} for _ in range(cfg.num_layers)]
        params: dict = {}
        for name, our_path, in_shape, out_shape in _specs(cfg):
            if name not in where:
                raise SafetensorsError(f"{missing_in}: tensor {name!r} is missing")
            file_path, f = where[name]
            try:
                array = f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - an index entry whose shard lacks the tensor
                raise SafetensorsError(f"{file_path}: tensor {name!r} is missing ({e})") from e
            expected = _hf_shape(in_shape, out_shape)
            if array.shape != expected:
                raise SafetensorsError(f"{file_path}: tensor {name!r} has shape {array.shape}, expected {expected}")
            array = np.asarray(array, np.float32)
            if out_shape is not None:  # HF Linear weights are [out, in]
                array = np.ascontiguousarray(array.T).reshape(in_shape + out_shape)
            if cfg.rope_interleaved and our_path[-2] in ("q_proj", "k_proj"):
                array = np.ascontiguousarray(permute_rotary_features(array, cfg.head_dim, to_interleaved=True))
            if our_path[0] == "layers":
                node = layers[our_path[1]]
                for key in our_path[2:-1]:
                    node = node.setdefault(key, {})
                node[our_path[-1]] = array  # an int key: one expert of a stacked kernel, stacked below
            else:
                params.setdefault(our_path[0], {})[our_path[1]] = array
    for layer in layers:
        for name, linear in layer.get("moe", {}).items():
            if isinstance(linear, dict):
                linear["kernel"] = np.stack([linear["kernel"][j] for j in range(cfg.num_experts)])
    params["layers"] = stack_layers(layers, cfg.scan_layers)
    return cfg, params


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The ``config.json`` dict of ``cfg`` as a ``LlamaForCausalLM`` checkpoint stored in ``dtype``; a MoE
    config as ``MixtralForCausalLM`` (see :func:`moe_hf_config`)."""
    if cfg.num_experts:
        return moe_hf_config(cfg, dtype)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_base, "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
        "attention_bias": False, "mlp_bias": False, "initializer_range": cfg.init_std,
    }


def moe_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """A MoE config as a Mixtral ``config.json`` (``num_local_experts``, ``num_experts_per_tok``,
    ``intermediate_size`` = one expert's width) plus our keys ``moe_gating``, ``moe_layers``,
    ``dense_intermediate_size``, ``moe_dispatch``, ``moe_capacity_factor``. Hugging Face's Mixtral always weights
    experts by the softmax of the top-k logits and routes every layer: a model with ``moe_gating="unit"``
    (MoEfication) or dense layers loads there with other semantics; our reader restores them exactly."""
    config = {**hf_config(dataclasses.replace(cfg, num_experts=0)), "architectures": ["MixtralForCausalLM"],
              "model_type": "mixtral", "torch_dtype": dtype}
    config.update(
        intermediate_size=cfg.expert_dim, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_top_k,
        router_aux_loss_coef=cfg.moe_load_balance_weight, output_router_logits=False,
        moe_gating=cfg.moe_gating, moe_layers=cfg.moe_layers, dense_intermediate_size=cfg.mlp_dim,
        moe_dispatch=cfg.moe_dispatch, moe_capacity_factor=cfg.moe_capacity_factor,
    )
    return config


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as fh:
        json.dump(value, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_hf_checkpoint(path: str, cfg: ModelConfig, params: Any, *, dtype: str = "float32",
                        max_shard_bytes: int = 2 * 1024**3, tokenizer: Any = None) -> list[str]:
    """Writes ``params`` (``nnx.State`` or pure dict, possibly sharded jax arrays) as an HF LLaMA checkpoint.

    Tensors are stored in ``dtype`` (float32, bfloat16 or float16) in HF layout (Linear weights ``[out, in]``,
    q/k in rotate-half order), in one ``model.safetensors`` or, past ``max_shard_bytes``, in shards
    ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``; ``tokenizer`` (with a
    ``.tokenizer`` ``tokenizers.Tokenizer``) adds ``tokenizer.json``. The directory appears whole or not at all.
    Returns the written file paths.
    """
    from safetensors.numpy import save_file

    if dtype not in EXPORT_DTYPES:
        raise SafetensorsError(f"{path}: export dtype {dtype!r} is not one of {tuple(EXPORT_DTYPES)}")
    target = os.path.abspath(path)
    if os.path.isdir(target):
        foreign = [n for n in os.listdir(target) if n not in _OWN_FILES and not n.startswith("model-")]
        if foreign:
            raise SafetensorsError(f"{path}: refusing to replace a directory that holds {foreign[0]!r}")
    elif os.path.exists(target):
        raise SafetensorsError(f"{path} exists and is not a directory")
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    np_dtype = EXPORT_DTYPES[dtype]
    stacked = layers_are_stacked(pure.get("layers", {}))

    @functools.lru_cache(maxsize=1)  # tensors come block by block: each block is sliced out once
    def block(i: int) -> Any:
        # Indexing a stacked jax array on device: only this layer's slice crosses to the host.
        return layer_params(pure["layers"], i, stacked)

    def tensor(our_path: tuple, in_shape: tuple, out_shape: tuple | None) -> np.ndarray:
        at = "/".join(map(str, our_path))
        try:
            if our_path[0] == "layers":
                leaf = block(our_path[1])
                for key in our_path[2:]:
                    leaf = leaf[key]  # an int key takes one expert of a stacked expert kernel
            else:
                leaf = pure[our_path[0]][our_path[1]]
        except (KeyError, IndexError) as e:
            raise SafetensorsError(f"{path}: parameter {at} is missing") from e
        array = np.asarray(jax.device_get(leaf))
        if array.shape != in_shape + (out_shape or ()):
            raise SafetensorsError(f"{path}: parameter {at} has shape {array.shape}, "
                                   f"config expects {in_shape + (out_shape or ())}")
        if cfg.rope_interleaved and our_path[-2] in ("q_proj", "k_proj"):
            array = permute_rotary_features(array, cfg.head_dim, to_interleaved=False)
        if out_shape is not None:
            array = array.reshape(int(np.prod(in_shape)), int(np.prod(out_shape))).T
        return np.ascontiguousarray(array.astype(np_dtype))  # safetensors copies raw memory: must be contiguous

    # HF's sharding rule: fill shards in order, start a new one when the next tensor would overflow it.
    shards: list[list] = [[]]
    sizes: list[int] = [0]
    for spec in _specs(cfg):
        nbytes = int(np.prod(_hf_shape(spec[2], spec[3]))) * np.dtype(np_dtype).itemsize
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(spec)
        sizes[-1] += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    parent, base = os.path.split(target)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would otherwise become the checkpoint's permissions
        config = hf_config(cfg, dtype)
        written = ["config.json"]
        for name, shard in zip(names, shards):
            tensors = {hf_name: tensor(our_path, in_shape, out_shape) for hf_name, our_path, in_shape, out_shape in shard}
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            os.chmod(os.path.join(tmp, name), 0o644)  # safetensors writes 0o600 files
            written.append(name)
        if len(shards) > 1:
            weight_map = {spec[0]: name for name, shard in zip(names, shards) for spec in shard}
            _write_json(os.path.join(tmp, INDEX_FILE), {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
            written.append(INDEX_FILE)
        if tokenizer is not None:
            tokenizer.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            # tokenizer_config.json carries what tokenizer.json cannot: BOS/EOS and the chat template.
            ids = {k: getattr(tokenizer, f"{k}_id", None) for k in ("bos", "eos")}
            ids = {k: int(v) for k, v in ids.items() if v is not None}
            config.update({f"{k}_token_id": v for k, v in ids.items()})
            special = {f"{k}_token": tokenizer.tokenizer.id_to_token(v) for k, v in ids.items()}
            template = {"chat_template": tokenizer.chat_template} if getattr(tokenizer, "chat_template", None) else {}
            _write_json(os.path.join(tmp, "tokenizer_config.json"),
                        {"tokenizer_class": "PreTrainedTokenizerFast", **special, **template})
            written += ["tokenizer.json", "tokenizer_config.json"]
        _write_json(os.path.join(tmp, "config.json"), config)
        if os.path.isdir(target):  # swap whole directories so a reader never sees old and new files mixed
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.replace(target, os.path.join(old, base))
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(os.path.join(old, base), target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(path, name) for name in written]
