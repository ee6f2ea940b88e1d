"""Save a loaded or compressed model as a llama.cpp GGUF file or a Hugging Face safetensors directory."""

from __future__ import annotations

import os
import warnings
from typing import Any

from flax import nnx

from llmopt_jax.errors import ConfigError

FORMATS = ("gguf", "safetensors")
# A tensor whose stored values moved by less than this (relative Frobenius norm) is float16 rounding of a float
# weight or the float16 offset of an integer zero-point: far below what changes a perplexity.
NOTICEABLE_CHANGE = 1e-3


def _float_params(model: Any) -> dict:
    float_params = getattr(model, "float_params", None)
    return float_params if float_params else nnx.to_pure_dict(model.params)


def save_model(model: Any, path: str, *, format: str | None = None, tensor_type: str = "F32") -> dict[str, Any]:
    """Writes ``model`` (from ``load_pretrained`` or ``compress``) to ``path``.

    ``format``: ``"gguf"`` (one file, tensors in ``tensor_type``: F32, F16, BF16, Q8_0, Q4_0 or Q4_1; weights a
    recipe quantized on that type's own grid keep their codes) or ``"safetensors"`` (a directory with
    ``config.json``, float32 weights and the tokenizer); default: GGUF when ``path`` ends in ``.gguf``.
    When the file stores weights other than the model's own (re-rounded to ``tensor_type``), one warning names
    the largest changes. Returns ``{"path", "format", "tensor_type", "rerounded": {tensor: relative change}}``
    (changes above :data:`NOTICEABLE_CHANGE`; a re-rounded model's perplexity differs from the one measured
    before saving, so measure the file itself).
    """
    format = format or ("gguf" if path.endswith(".gguf") else "safetensors")
    if format not in FORMATS:
        raise ConfigError(f"save format {format!r}; choose one of {FORMATS}")
    check_writable(path)
    report = getattr(model, "report", {}) or {}
    if report.get("smoothing") is not None:
        warnings.warn(f"{path}: the W8A8 model's int8 activations are not stored; the file holds its smoothed "
                      "int8 weights as floats", stacklevel=2)
    if format == "safetensors":
        from llmopt_jax.io.safetensors import write_hf_checkpoint

        write_hf_checkpoint(path, model.cfg, _float_params(model), tokenizer=model.tokenizer)
        return {"path": os.path.abspath(path), "format": format, "tensor_type": "F32", "rerounded": {}}

    from llmopt_jax.io.gguf import read_gguf
    from llmopt_jax.io.gguf_write import write_gguf

    source = read_gguf(model.path) if str(model.path).endswith(".gguf") else None
    with warnings.catch_warnings(record=True) as caught:  # folded into the one warning below
        warnings.simplefilter("always")
        changes = write_gguf(path, model.cfg, _float_params(model), tensor_type=tensor_type, metadata_from=source,
                             quantized=report.get("quantized") or None)
    rerounded = {name: change for name, change in changes.items() if change > NOTICEABLE_CHANGE}
    notes = [str(w.message).removeprefix(f"{path}: ") for w in caught]
    if rerounded or notes:
        worst = sorted(rerounded.items(), key=lambda kv: -kv[1])[:3]
        listed = ", ".join(f"{name} by {change:.1%}" for name, change in worst)
        summary = (f"{len(rerounded)} tensor(s) re-rounded to {tensor_type}, the model's own weights changed "
                   f"(largest relative change: {listed}); its perplexity can differ from the model's: measure the "
                   f"file (experiments.perplexity --config.model={path})") if rerounded else ""
        warnings.warn(f"{path}: " + "; ".join(filter(None, [summary, *notes])), stacklevel=2)
    return {"path": os.path.abspath(path), "format": format, "tensor_type": tensor_type, "rerounded": rerounded}


def check_writable(path: str) -> None:
    """Raises ``ConfigError`` unless ``path`` can be created: its parent directory exists and is writable (checked
    before a long computation whose result goes there)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot save to {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot save to {path}: directory {parent} is not writable")
    try:  # os.access says yes to root everywhere; creating a file is the real test (e.g. /proc refuses it)
        import tempfile

        fd, probe = tempfile.mkstemp(dir=parent, prefix=".write_check_")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        raise ConfigError(f"cannot save to {path}: directory {parent} is not writable") from None
    if os.path.isdir(path) and path.endswith(".gguf"):
        raise ConfigError(f"cannot save to {path}: it is a directory")
