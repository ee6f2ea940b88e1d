"""Write our LLaMA-family parameters as a GGUF file that llama.cpp runs (architecture ``llama``).

:func:`write_gguf` is the exact inverse of :func:`llmopt_jax.io.gguf.params_from_gguf`: q/k rows are stored in
llama.cpp's interleaved rotary layout (permuted from the Hugging Face layout when ``cfg.rope_interleaved`` is
False), 2-D weights in ``tensor_type``, norm vectors always in F32 (llama.cpp requires it).

Q8_0/Q4_0 need each row (a weight's input dimension) to be a multiple of 32 values; a weight whose row is not
is written as F16 instead, with a warning naming it (llama.cpp's converter and quantizer fall back alike).

Already-quantized weights (``quantized``: ``compress_sequentially``'s records, e.g. GPTQ's) are re-encoded
exactly when their grid is the block format's own (groups of 32; symmetric 8 bits for Q8_0 / 4 bits for Q4_0:
``value = d·q`` with a float16 ``d`` per block; asymmetric 4 bits for Q4_1: ``value = d·q + m`` with float16
``d`` and ``m``): their integer codes and scales are written as they are, so llama.cpp computes with the very
weights GPTQ chose. On an integer zero-point grid Q4_1's ``m = -z·d`` is rounded to float16 (the codes stay;
each weight moves by at most ``z·d·2^-11``, a warning says so); a float-offset grid (``zero_point="float"``,
llama.cpp's own Q4_1 rule) is written bit for bit. Weights on any other grid are re-rounded from their float
values by gguf-py's quantizer (round-to-nearest), with a warning.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from typing import Any

import numpy as np

from llmopt_jax.io.gguf import GGUFError, GGUFFile
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.layout import layer_params
from llmopt_jax.models.rope import permute_rotary_features

TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
BLOCK_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}  # bits of the grid of 32-value blocks each block format stores
SYMMETRIC_BLOCKS = ("Q8_0", "Q4_0")  # d·q; Q4_1 is d·q + m
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _to_numpy(x: Any) -> np.ndarray:
    import jax

    return np.asarray(jax.device_get(x)).astype(np.float32, copy=False)  # gathers sharded arrays; no copy if f32


def _gguf_tensors(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """llama.cpp tensor names -> float32 arrays in GGUF's NumPy order (``[out, in]`` for linear weights)."""
    from flax import nnx

    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    d, h, k, hd, ff, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size

    def get(tree: Any, path: tuple, shape: tuple[int, ...], at: str = "") -> np.ndarray:
        at = at or "/".join(map(str, path))
        node = tree
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise GGUFError(f"parameter {at} is missing")
            node = node[key]
        array = _to_numpy(node)
        if array.shape != shape:
            raise GGUFError(f"parameter {at} has shape {array.shape}, expected {shape}")
        return array

    layers = params.get("layers", {}) if isinstance(params, dict) else {}

    @functools.lru_cache(maxsize=1)  # a block's tensors are read in a row: slice each block out once
    def block(i: int) -> Any:
        try:  # a stacked jax leaf is sliced on device: only block i's slice crosses to the host
            return layer_params(layers, i, cfg.scan_layers)
        except (KeyError, IndexError) as e:
            raise GGUFError(f"parameter layers/{i} is missing") from e

    def layer(i: int, name: str, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
        return get(block(i), (name, leaf), shape, at=f"layers/{i}/{name}/{leaf}")

    out = {"token_embd.weight": get(params, ("embed", "embedding"), (v, d))}
    moe_layers = cfg.moe_layer_indices()
    for i in range(cfg.num_layers):
        q, kk = layer(i, "q_proj", "kernel", (d, h, hd)), layer(i, "k_proj", "kernel", (d, k, hd))
        if not cfg.rope_interleaved:  # llama.cpp rotates interleaved pairs
            q = permute_rotary_features(q, hd, to_interleaved=True)
            kk = permute_rotary_features(kk, hd, to_interleaved=True)
        p = f"blk.{i}."
        out |= {
            p + "attn_norm.weight": layer(i, "attn_norm", "scale", (d,)),
            p + "attn_q.weight": q.reshape(d, h * hd).T,
            p + "attn_k.weight": kk.reshape(d, k * hd).T,
            p + "attn_v.weight": layer(i, "v_proj", "kernel", (d, k, hd)).reshape(d, k * hd).T,
            p + "attn_output.weight": layer(i, "o_proj", "kernel", (h, hd, d)).reshape(h * hd, d).T,
            p + "ffn_norm.weight": layer(i, "mlp_norm", "scale", (d,)),
        }
        if i in moe_layers:  # llama.cpp's MoE tensors (Mixtral): router [E, d], experts [E, out, in]
            moe = lambda path, shape: get(block(i), ("moe", *path), shape, at=f"layers/{i}/moe/{'/'.join(path)}")  # noqa: E731
            fe, e = cfg.expert_dim, cfg.num_experts
            out |= {
                p + "ffn_gate_inp.weight": moe(("router",), (d, e)).T,
                p + "ffn_gate_exps.weight": moe(("gate_proj", "kernel"), (e, d, fe)).transpose(0, 2, 1),
                p + "ffn_up_exps.weight": moe(("up_proj", "kernel"), (e, d, fe)).transpose(0, 2, 1),
                p + "ffn_down_exps.weight": moe(("down_proj", "kernel"), (e, fe, d)).transpose(0, 2, 1),
            }
            continue
        out |= {
            p + "ffn_gate.weight": layer(i, "gate_proj", "kernel", (d, ff)).T,
            p + "ffn_up.weight": layer(i, "up_proj", "kernel", (d, ff)).T,
            p + "ffn_down.weight": layer(i, "down_proj", "kernel", (ff, d)).T,
        }
    out["output_norm.weight"] = get(params, ("final_norm", "scale"), (d,))
    if not cfg.tie_embeddings:
        out["output.weight"] = get(params, ("lm_head", "kernel"), (d, v)).T
    return out


def encode_blocks(codes: np.ndarray, scale: np.ndarray, tensor_type: str, offset: np.ndarray | None = None
                  ) -> np.ndarray:
    """ggml's Q8_0 / Q4_0 / Q4_1 bytes of a ``[rows, cols]`` matrix given as integer ``codes`` (``[-128, 127]`` /
    ``[-8, 7]`` / ``[0, 15]``) and one float16-exact ``scale`` (and, for Q4_1, ``offset``: ``value = scale·code +
    offset``) per row and block of 32 (``[rows, cols / 32]``): each block is its float16 scale (Q4_1: then its
    float16 offset) then the codes (Q8_0: 32 int8; Q4_0/Q4_1: 16 bytes, element j in the low nibble of byte j and
    element j + 16 in its high nibble, Q4_0's offset by 8). Returns ``uint8 [rows, cols / 32 * block bytes]``."""
    rows, cols = codes.shape
    blocks = codes.reshape(rows, cols // 32, 32).astype(np.int16)
    half = lambda a: np.asarray(a, np.float16).reshape(rows, cols // 32, 1).view(np.uint8)  # noqa: E731
    head = [half(scale)] + ([half(offset)] if tensor_type == "Q4_1" else [])
    if tensor_type == "Q8_0":
        q = blocks.astype(np.int8).view(np.uint8)
    else:
        u = (blocks + (8 if tensor_type == "Q4_0" else 0)).astype(np.uint8)
        q = u[..., :16] | (u[..., 16:] << 4)
    return np.concatenate([*head, q], axis=-1).reshape(rows, -1)


def _add_tensor(writer: Any, name: str, array: np.ndarray, tensor_type: str, record: Any = None) -> tuple[bool, float]:
    """Adds ``name`` in ``tensor_type`` (F32 for vectors); ``record`` (a ``QuantizedMatrix`` of the same
    ``[out, in]`` matrix) is written code for code when it fits the block format. Returns whether a block
    format had to fall back to F16, and the relative change ``‖stored - array‖ / ‖array‖`` of the values written
    (0 when they are stored exactly)."""
    import gguf

    array = np.ascontiguousarray(array, np.float32)
    if array.ndim == 1 or tensor_type == "F32":
        writer.add_tensor(name, array)
        return False, 0.0
    if record is not None and _fits_blocks(record.grid, tensor_type):
        qtype = gguf.GGMLQuantizationType[tensor_type]
        data = encode_blocks(np.asarray(record.codes), np.asarray(record.scale), tensor_type,
                             np.asarray(record.offset))
        writer.add_tensor(name, data, raw_dtype=qtype)
        return False, _relative_change(array, gguf.quants.dequantize(data, qtype))
    fallback = tensor_type in BLOCK_BITS and array.shape[-1] % 32 != 0
    if fallback or tensor_type == "F16":
        stored = array.astype(np.float16)
        writer.add_tensor(name, stored)
        return fallback, _relative_change(array, stored)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    data = gguf.quants.quantize(array, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)
    return fallback, _relative_change(array, gguf.quants.dequantize(data, qtype))


def _relative_change(original: np.ndarray, stored: np.ndarray) -> float:
    norm = float(np.linalg.norm(original))
    diff = float(np.linalg.norm(np.asarray(stored, np.float32).reshape(original.shape) - original))
    return diff / norm if norm else diff


def _fits_blocks(grid: Any, tensor_type: str) -> bool:
    return (tensor_type in BLOCK_BITS and grid.symmetric == (tensor_type in SYMMETRIC_BLOCKS)
            and not grid.per_tensor and grid.group_size == 32 and grid.bits == BLOCK_BITS[tensor_type])


def _grid_name(tensor_type: str) -> str:
    kind = "symmetric" if tensor_type in SYMMETRIC_BLOCKS else "asymmetric"
    return f"{BLOCK_BITS[tensor_type]}-bit {kind}, groups of 32"


def _gguf_records(cfg: ModelConfig, quantized: dict) -> dict[str, Any]:
    """llama.cpp tensor names -> ``QuantizedMatrix`` (``[out, in]``, rows in llama.cpp's order) of one layer."""
    from llmopt_jax.compress.quantize import QuantizedMatrix

    layers = quantized.get("layers", {})
    out = {}
    for i in range(cfg.num_layers):
        try:
            block = layer_params(layers, i, cfg.scan_layers)
        except KeyError:
            continue  # no records for this block
        for name, gguf_name in GGUF_NAMES.items():
            qm = block.get(name, {}).get("kernel")
            if qm is None:
                continue
            permute = name in ("q_proj", "k_proj") and not cfg.rope_interleaved
            rows = np.shape(qm.codes)[0]
            # q/k rows go to llama.cpp's interleaved order per head; a per-tensor [1, groups] scale fits every row.
            arrays = [permute_rotary_features(np.asarray(a), cfg.head_dim, to_interleaved=True, axis=0)
                      if permute and np.shape(a)[0] == rows else np.asarray(a) for a in (qm.codes, qm.scale, qm.offset)]
            out[f"blk.{i}.{gguf_name}.weight"] = QuantizedMatrix(*arrays, qm.grid)
    return out


def _value_type(value: Any) -> Any:
    """The GGUF type llama.cpp expects for a Python metadata value (ids UINT32, token types INT32, ...)."""
    from gguf import GGUFValueType as T

    if isinstance(value, bool):
        return T.BOOL
    if isinstance(value, int):
        return T.UINT32 if value >= 0 else T.INT32
    if isinstance(value, float):
        return T.FLOAT32
    if isinstance(value, str):
        return T.STRING
    raise GGUFError(f"cannot copy metadata value of type {type(value).__name__}")


def _copy_tokenizer(writer: Any, source: GGUFFile) -> None:
    from gguf import GGUFValueType as T

    for key, value in source.metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, list):
            if not value:
                continue  # GGUF has no empty arrays
            # arrays of ints are token types (INT32 in llama.cpp); strings and floats keep their scalar type
            sub = T.INT32 if isinstance(value[0], int) and not isinstance(value[0], bool) else _value_type(value[0])
            writer.add_key_value(key, value, T.ARRAY, sub_type=sub)
        else:
            writer.add_key_value(key, value, _value_type(value))


def write_gguf(
    path: str,
    cfg: ModelConfig,
    params: Any,
    *,
    tensor_type: str = "F32",
    metadata_from: GGUFFile | None = None,
    name: str = "llmopt_jax",
    quantized: dict | None = None,
) -> dict[str, float]:
    """Writes ``params`` (an ``nnx.State`` or pure dict) for ``cfg`` as a llama.cpp ``llama`` GGUF at ``path``.

    Tokenizer metadata (``tokenizer.*``) is copied from ``metadata_from`` when given; without it the file
    declares no vocabulary (``tokenizer.ggml.model = "none"``, token ids in, logits out). ``quantized``
    (``compress_sequentially``'s ``report["quantized"]``) lets Q8_0/Q4_0 store those weights' own codes (see
    the module docstring; a record under ``quantized["embed"]["embedding"]`` does the same for the token
    embedding). The file appears atomically: a temporary file in the same directory is renamed over ``path``
    only once complete. Returns ``{tensor name: relative change}`` of every tensor whose stored values differ
    from ``params`` (re-rounded to ``tensor_type``, or F16 fallbacks).
    """
    import gguf

    if tensor_type not in TENSOR_TYPES:
        raise GGUFError(f"{path}: unknown GGUF tensor_type {tensor_type!r}; choose one of {TENSOR_TYPES}")
    file_type = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
                 "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}[tensor_type]
    records = _gguf_records(cfg, quantized) if quantized else {}
    embedding_record = (quantized or {}).get("embed", {}).get("embedding")
    if embedding_record is not None:
        records["token_embd.weight"] = embedding_record
    off_grid = sorted({qm.grid.describe() for qm in records.values() if not _fits_blocks(qm.grid, tensor_type)})
    if tensor_type in BLOCK_BITS and off_grid:
        warnings.warn(f"{path}: weights quantized {', '.join(off_grid)} are not on {tensor_type}'s grid "
                      f"({_grid_name(tensor_type)}); re-rounded to nearest")
    if tensor_type == "Q4_1" and any(qm.grid.integer_zero and _fits_blocks(qm.grid, tensor_type)
                                     for qm in records.values()):
        warnings.warn(f"{path}: Q4_1 stores the offset m = -zero·d in float16; the integer zero-points' offsets "
                      "are rounded to it (codes unchanged; each weight moves by at most zero·d·2^-11)")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would otherwise become the final file's mode
    except OSError as e:
        raise GGUFError(f"{path}: cannot write into {directory} ({e.strerror or e})") from e
    w = None
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        w.add_file_type(int(gguf.LlamaFileType[file_type]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.num_layers)
        if cfg.num_experts:
            # llama.cpp reads feed_forward_length as each expert's width; expert_used_count is its top-k. Its
            # llama graph weights experts by the softmax over the top-k logits; our llmopt.* keys restore the
            # gating (MoEfication's unit gates), dense layers' width and the dispatch for our reader.
            w.add_feed_forward_length(cfg.expert_dim)
            w.add_expert_count(cfg.num_experts)
            w.add_expert_used_count(cfg.moe_top_k)
            w.add_string("llmopt.moe_gating", cfg.moe_gating)
            w.add_string("llmopt.moe_layers", cfg.moe_layers)
            w.add_string("llmopt.moe_dispatch", cfg.moe_dispatch)
            w.add_float32("llmopt.moe_capacity_factor", cfg.moe_capacity_factor)
            w.add_uint32("llmopt.dense_feed_forward_length", cfg.mlp_dim)
        else:
            w.add_feed_forward_length(cfg.mlp_dim)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        # llama.cpp derives head size from d_model / heads unless these say otherwise
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_base)
        w.add_layer_norm_rms_eps(cfg.rms_eps)  # FLOAT32 (llama.cpp checks): 1e-5 reads back as 9.9999997e-6
        w.add_vocab_size(cfg.vocab_size)
        if metadata_from is not None:
            _copy_tokenizer(w, metadata_from)
        else:
            w.add_tokenizer_model("none")
        fallbacks, changes = [], {}
        for n, a in _gguf_tensors(cfg, params).items():
            fallback, change = _add_tensor(w, n, a, tensor_type, records.get(n))
            if fallback:
                fallbacks.append(n)
            if change > 0:
                changes[n] = change
        if fallbacks:
            names = ", ".join(fallbacks)
            warnings.warn(f"{path}: rows of {names} are not a multiple of 32 values; written as F16, not "
                          f"{tensor_type}")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
        return changes
    except BaseException as e:
        if w is not None:
            w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise GGUFError(f"{path}: write failed ({e.strerror or e})") from e
        raise
