"""Shared machinery of the compression studies: prune one configuration, evaluate it on several texts, and keep
finished rows in a JSON-lines file so that a killed study resumes where it stopped."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

from llmopt_jax.errors import ConfigError, DataError


class ResumableRows:
    """Finished rows, keyed by ``key(row)``, appended one JSON line each to ``path`` as they finish.

    Every row carries ``settings`` (whatever else decides its numbers: model, calibration, evaluation); rows on
    disk made with other settings are refused instead of being reused under the wrong label.
    """

    def __init__(self, path: str, key: Callable[[dict], str], settings: dict):
        self.path = path
        self.key = key
        self.settings = json.loads(json.dumps(settings))  # the form it takes after a round trip through JSON
        self.done: dict[str, dict] = {}
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.read().split("\n")
        for number, line in enumerate(lines[:-1], 1):  # the last piece is "" or a row killed mid-write
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row_key = key(row)
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{number} is not a row of this study ({e}); use another workdir") from e
            if row.get("settings") != self.settings:
                raise ConfigError(f"{path}:{number} was computed with other settings ({row.get('settings')}); "
                                  f"now {self.settings}: use another workdir")
            self.done[row_key] = row

    def get(self, row: dict) -> dict | None:
        """The finished row with the same key as ``row``, or None."""
        return self.done.get(self.key(row))

    def add(self, row: dict) -> dict:
        """Appends ``row`` (with the settings) as one line; returns the stored row."""
        row = {**row, "settings": self.settings}
        with open(self.path, "a+") as f:
            f.seek(0)
            text = f.read()
        if text and not text.endswith("\n"):  # drop a row that a killed run left half-written
            with open(self.path, "w") as f:
                f.write(text[: text.rfind("\n") + 1])
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.done[self.key(row)] = row
        return row


def case_study_settings(config, **extra) -> dict:
    """What decides a case-study row's numbers besides the row itself: model, calibration, solver and evaluation
    settings (batch sizes change speed, not results) and ``extra``."""
    def without_batch(d):
        return {k: v for k, v in d.to_dict().items() if k != "batch_size"}

    return {"model": config.model, "calib": without_batch(config.calib), "sparsegpt": config.sparsegpt.to_dict(),
            "eval": without_batch(config.eval), **extra}


def open_case_study(config, workdir: str, key: Callable[[dict], str], settings: dict):
    """The common start of a case study (``config.model``, ``config.calib``, ``config.eval.{close,far}_*``):
    ``(finished rows, model, evaluation texts, calibration windows)``; the calibration settings are checked and
    the finished rows read before the model loads."""
    from llmopt_jax.data.text import calibration_windows, check_calibration_text
    from llmopt_jax.io.load import load_pretrained

    check_calibration_text(config.calib.text_file, config.calib.sources)
    finished = ResumableRows(os.path.join(workdir, "rows.jsonl"), key, settings)
    model = load_pretrained(config.model)
    tok = model.require_tokenizer()
    texts = eval_texts(tok, config.eval.close_text_file, config.eval.far_text_file, config.eval.close_max_windows,
                       config.eval.far_max_windows)
    calib = calibration_windows(tok, config.calib.text_file, config.calib.sources, config.calib.num_samples,
                                config.calib.seq_len, config.calib.seed)
    return finished, model, texts, calib


def eval_texts(tokenizer, close_file: str, far_file: str, close_max_windows: int,
               far_max_windows: int) -> dict[str, tuple[np.ndarray, int]]:
    """``{"close": (tokens, max_windows), "far": ...}``: the files when given, else standard-library docstrings
    (close to the ``pydoc_data.topics`` calibration text) and Python's LICENSE.txt (far from it)."""
    from llmopt_jax.data.text import load_texts, python_license_text, stdlib_docstrings_text

    close = load_texts(close_file) if close_file else stdlib_docstrings_text()
    far = load_texts(far_file) if far_file else python_license_text()
    return {"close": (np.asarray(tokenizer.encode(close)), close_max_windows),
            "far": (np.asarray(tokenizer.encode(far)), far_max_windows)}


def compress_model(model, calib: np.ndarray | None, step: dict | None, calib_batch_size: int = 0,
                   progress: bool = False, embedding_bits: int = 0, compute_dtype: str = "bfloat16"
                   ) -> tuple[Any, Any, dict, dict]:
    """Compresses ``model`` with one recipe ``step`` (``None`` = unchanged) calibrated on ``calib`` ``[n, len]``;
    ``embedding_bits`` > 0 also rounds the token embedding (the tied LM head) to a symmetric grid with groups
    of 32 (llama.cpp's Q8_0/Q4_0 layout) and packs it. ``compute_dtype``: the calibration passes' matmul operands
    (``compress_sequentially``).

    Returns ``(graphdef, params, float pure params, report)``: quantized tensors stay packed in ``params``
    (``compress/packed.py``); the pure params hold their dequantized values; ``report`` is
    ``compress_sequentially``'s (empty for ``None``).
    """
    from flax import nnx

    from llmopt_jax.compress.calibrate import KERNEL_INPUT_DIMS, compress_sequentially
    from llmopt_jax.compress.packed import pack_embedding, pack_params, packed_model
    from llmopt_jax.compress.quantize import QuantGrid
    from llmopt_jax.compress.recipe import from_recipe
    from llmopt_jax.parallel.sharded_init import load_params

    pure, report = nnx.to_pure_dict(model.params), {}
    if step is not None:
        pure, report = compress_sequentially(model.cfg, model.params, calib, from_recipe([step]),
                                             batch_size=calib_batch_size, progress=progress,
                                             compute_dtype=compute_dtype)
    if not report.get("quantized") and not embedding_bits:
        return (model.graphdef, model.params, pure, report) if step is None else \
            (*load_params(model.cfg, pure), pure, report)
    packed = pack_params(pure, report.get("quantized"), KERNEL_INPUT_DIMS)
    if embedding_bits:
        packed = pack_embedding(packed, QuantGrid(embedding_bits, 32, symmetric=True))
        pure = {**pure, "embed": {"embedding": np.asarray(packed["embed"]["embedding"].dequantize().T)}}
    return (*packed_model(model.cfg, packed), pure, report)


def evaluate_model(graphdef, params, pure: dict, report: dict, texts: dict[str, tuple[np.ndarray, int]],
                   eval_seq_len: int, eval_batch_size: int) -> dict[str, Any]:
    """Measures the model ``(graphdef, params)`` (``pure``: its weights as floats, ``report``: how it was
    compressed, may be empty) on every ``texts[name] = (tokens, max_windows)``.

    Returns ``sparsity`` (measured), ``seconds_compress``, ``bits_per_weight`` (of the block linear layers),
    ``model_bytes`` (every array the evaluated model holds) and ``perplexity_NAME`` / ``num_eval_tokens_NAME``.
    """
    from flax import nnx

    from llmopt_jax.compress.calibrate import measured_sparsity
    from llmopt_jax.compress.packed import block_bits_per_weight
    from llmopt_jax.eval.perplexity import evaluate_perplexity
    from llmopt_jax.infer.roofline import tree_bytes

    row: dict[str, Any] = {"sparsity": measured_sparsity(pure), "seconds_compress": report.get("seconds", 0.0),
                           "bits_per_weight": block_bits_per_weight(nnx.to_pure_dict(params)),
                           "model_bytes": tree_bytes(params)}
    for name, (tokens, max_windows) in texts.items():
        result = evaluate_perplexity(graphdef, params, tokens, eval_seq_len, eval_batch_size,
                                     max_windows=max_windows, progress=False)
        row[f"perplexity_{name}"] = result.perplexity
        row[f"num_eval_tokens_{name}"] = result.num_eval_tokens
    return row


def prune_and_evaluate(model, calib: np.ndarray | None, step: dict | None, texts: dict[str, tuple[np.ndarray, int]],
                       eval_seq_len: int, eval_batch_size: int, calib_batch_size: int = 0,
                       progress: bool = False) -> dict[str, Any]:
    """:func:`compress_model` with one recipe ``step`` (``None`` = dense), then :func:`evaluate_model`."""
    graphdef, params, pure, report = compress_model(model, calib, step, calib_batch_size, progress)
    return evaluate_model(graphdef, params, pure, report, texts, eval_seq_len, eval_batch_size)


def print_row(label: str, row: dict) -> None:
    """One progress line per finished row."""
    print(f"{label}: close {row['perplexity_close']:9.2f}  far {row['perplexity_far']:9.2f}  "
          f"({row['seconds_compress']:.0f} s to compress)", flush=True)
