"""Shared machinery of the compression studies: compress with one recipe, evaluate on several texts, and keep
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


def require_finished_rows(finished: ResumableRows, todo: list[dict], workdir: str) -> None:
    """Raises ``ConfigError`` naming ``workdir`` when none of the rows ``todo`` is finished there (what a
    ``report_only`` run needs: a table of nothing is not a report)."""
    if any(finished.get(row) is not None for row in todo):
        return
    where = (f"{finished.path} holds none of the {len(todo)} rows of this config" if os.path.exists(finished.path)
             else f"no {finished.path}")
    raise ConfigError(f"report_only=True: workdir {workdir} has no finished rows ({where}); run the study without "
                      "report_only first, or give the workdir of a study")


def case_study_settings(config, **extra) -> dict:
    """What decides a case-study row's numbers besides the row itself: model, calibration, solver and evaluation
    settings (batch sizes change speed, not results) and ``extra``."""
    def without_batch(d):
        return {k: v for k, v in d.to_dict().items() if k != "batch_size"}

    return {"model": config.model, "calib": without_batch(config.calib), "sparsegpt": config.sparsegpt.to_dict(),
            "eval": without_batch(config.eval), **extra}


def check_case_study_inputs(config) -> dict[str, str]:
    """Checks a case study's calibration and evaluation settings (``config.calib``, ``config.eval``) and reads its
    evaluation texts (:func:`read_eval_texts`), before the workdir is prepared or the model loads."""
    from llmopt_jax.config_checks import check_eval_settings
    from llmopt_jax.data.text import check_calibration_text

    check_eval_settings(config.eval)
    check_calibration_text(config.calib.text_file, config.calib.sources)
    return read_eval_texts(config.eval.close_text_file, config.eval.far_text_file, config.eval.seq_len)


def open_case_study(config, workdir: str, key: Callable[[dict], str], settings: dict,
                    texts: dict[str, str] | None = None):
    """The common start of a case study (``config.model``, ``config.calib``, ``config.eval.{close,far}_*``):
    ``(finished rows, model, evaluation texts, calibration windows)``; the settings are checked and the finished
    rows read before the model loads, the evaluation texts' lengths before the calibration windows are drawn.
    ``texts``: the evaluation texts :func:`check_case_study_inputs` returned (read here when None)."""
    from llmopt_jax.config_checks import check_context
    from llmopt_jax.data.text import calibration_windows
    from llmopt_jax.io.load import load_pretrained

    texts = texts if texts is not None else check_case_study_inputs(config)
    finished = ResumableRows(os.path.join(workdir, "rows.jsonl"), key, settings)
    model = load_pretrained(config.model)
    for block in ("calib", "eval"):
        check_context(f"{block}.seq_len", config[block].seq_len, model.cfg.max_seq_len)
    tok = model.require_tokenizer()
    tokens = eval_texts(tok, config.eval.close_text_file, config.eval.far_text_file, config.eval.close_max_windows,
                        config.eval.far_max_windows, seq_len=config.eval.seq_len, texts=texts)
    calib = calibration_windows(tok, config.calib.text_file, config.calib.sources, config.calib.num_samples,
                                config.calib.seq_len, config.calib.seed)
    return finished, model, tokens, calib


def _eval_text_name(name: str, path: str) -> str:
    """How an error message names the close or far evaluation text."""
    return f"{name} evaluation text {path} (eval.{name}_text_file)" if path else f"default {name} evaluation text"


def read_eval_texts(close_file: str, far_file: str, seq_len: int = 2) -> dict[str, str]:
    """``{"close": text, "far": text}``: the files when given, else standard-library docstrings (close to the
    ``pydoc_data.topics`` calibration text) and Python's LICENSE.txt (far from it). Raises ``DataError`` for a
    missing, empty or certainly too short text (fewer bytes than one window of ``seq_len`` tokens)."""
    from llmopt_jax.config_checks import check_text_length
    from llmopt_jax.data.text import load_texts, python_license_text, stdlib_docstrings_text

    texts = {"close": load_texts(close_file) if close_file else stdlib_docstrings_text(),
             "far": load_texts(far_file) if far_file else python_license_text()}
    for name, path in (("close", close_file), ("far", far_file)):
        check_text_length(texts[name], seq_len, _eval_text_name(name, path))
    return texts


def eval_texts(tokenizer, close_file: str, far_file: str, close_max_windows: int, far_max_windows: int, *,
               seq_len: int | None = None, texts: dict[str, str] | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """``{"close": (tokens, max_windows), "far": ...}`` of :func:`read_eval_texts` (or of ``texts``, already
    read). With ``seq_len``, raises ``DataError`` for a text shorter than one window of that many tokens."""
    from llmopt_jax.eval.perplexity import check_eval_tokens

    texts = texts if texts is not None else read_eval_texts(close_file, far_file, seq_len or 2)
    out = {}
    for name, path, max_windows in (("close", close_file, close_max_windows), ("far", far_file, far_max_windows)):
        tokens = np.asarray(tokenizer.encode(texts[name]))
        if seq_len is not None:
            check_eval_tokens(tokens, seq_len, _eval_text_name(name, path))
        out[name] = (tokens, max_windows)
    return out


def evaluate_model(model, texts: dict[str, tuple[np.ndarray, int]], eval_seq_len: int,
                   eval_batch_size: int) -> dict[str, Any]:
    """Measures ``model`` (a ``CompressedModel``) on every ``texts[name] = (tokens, max_windows)``.

    Returns the model's ``summary()`` (``sparsity``, ``bits_per_weight``, ``model_bytes``, ``seconds_compress``,
    ...) and ``perplexity_NAME`` / ``num_eval_tokens_NAME``.
    """
    from llmopt_jax.eval.perplexity import evaluate_perplexity

    row: dict[str, Any] = model.summary()
    for name, (tokens, max_windows) in texts.items():
        result = evaluate_perplexity(model, tokens, eval_seq_len, eval_batch_size, max_windows=max_windows,
                                     progress=False)
        row[f"perplexity_{name}"] = result.perplexity
        row[f"num_eval_tokens_{name}"] = result.num_eval_tokens
    return row


def compress_and_evaluate(model, recipe: list[dict], calib: np.ndarray | None,
                          texts: dict[str, tuple[np.ndarray, int]], eval_seq_len: int, eval_batch_size: int,
                          calib_batch_size: int = 0, progress: bool = False,
                          compute_dtype: str = "auto") -> dict[str, Any]:
    """``compress(model, recipe, calib)`` then :func:`evaluate_model`."""
    from llmopt_jax.compress.api import compress

    compressed = compress(model, recipe, calib, batch_size=calib_batch_size, progress=progress,
                          compute_dtype=compute_dtype)
    return evaluate_model(compressed, texts, eval_seq_len, eval_batch_size)


def print_row(label: str, row: dict) -> None:
    """One progress line per finished row."""
    print(f"{label}: close {row['perplexity_close']:9.2f}  far {row['perplexity_far']:9.2f}  "
          f"({row['seconds_compress']:.0f} s to compress)", flush=True)


def decode_tokens_per_s(model, prompt: list[int], new_tokens: int, repeats: int) -> float:
    """Median greedy decode tokens/s of ``model`` at batch 1 (after a compiling run)."""
    import statistics

    from llmopt_jax.infer.generate import Generator

    gen = Generator(model)
    gen.generate([prompt], new_tokens)
    return statistics.median(gen.generate([prompt], new_tokens).decode_tokens_per_s for _ in range(repeats))


def finish_text_panels(fig, axes, path: str, xlabel: str, *, log_y: bool = True, legend_size: int = 8) -> None:
    """Labels a case study's figure of one panel per evaluation text (``axes`` in the order close, far): x on a
    log2 scale labelled ``xlabel``, perplexity on y (log scale with ``log_y``), titles, grid and a legend on the
    first panel; saves it to ``path`` and closes it."""
    import matplotlib.pyplot as plt

    for ax, text in zip(axes, ("close", "far")):
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"{text}-domain text")
        ax.grid(alpha=0.3, which="both" if log_y else "major")
    axes[0].set_ylabel("perplexity (log)" if log_y else "perplexity")
    axes[0].legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
