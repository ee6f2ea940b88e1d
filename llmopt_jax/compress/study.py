"""Shared machinery of the compression studies: prune one configuration, evaluate it on several texts, and keep
finished rows in a JSON-lines file so that a killed study resumes where it stopped."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np


class ResumableRows:
    """Finished rows, keyed by ``key(row)``, appended one JSON line each to ``path`` as they finish."""

    def __init__(self, path: str, key: Callable[[dict], str]):
        self.path = path
        self.key = key
        self.done: dict[str, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                text = f.read()
            complete, _, partial = text.rpartition("\n")
            if partial:  # a run killed mid-write: drop the unfinished row, it is computed again
                with open(path, "w") as f:
                    f.write(complete + "\n" if complete else "")
            for line in complete.splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.done[key(row)] = row

    def get(self, row: dict) -> dict | None:
        """The finished row with the same key as ``row``, or None."""
        return self.done.get(self.key(row))

    def add(self, row: dict) -> dict:
        with open(self.path, "a") as f:  # one line per finished row: the resume point
            f.write(json.dumps(row) + "\n")
        self.done[self.key(row)] = row
        return row


def prune_and_evaluate(model, calib: np.ndarray | None, step: dict | None, texts: dict[str, tuple[np.ndarray, int]],
                       eval_seq_len: int, eval_batch_size: int, calib_batch_size: int = 8,
                       progress: bool = False) -> dict[str, Any]:
    """Compresses ``model`` with one recipe ``step`` (``None`` = dense) calibrated on ``calib`` ``[n, len]`` and
    measures perplexity on every ``texts[name] = (tokens, max_windows)``.

    Returns ``sparsity`` (measured), ``seconds_compress`` and ``perplexity_NAME`` / ``num_eval_tokens_NAME``.
    """
    from llmopt_jax.compress.calibrate import compress_sequentially, measured_sparsity
    from llmopt_jax.compress.recipe import from_recipe
    from llmopt_jax.eval.perplexity import evaluate_perplexity
    from llmopt_jax.parallel.sharded_init import load_params

    params, seconds = model.params, 0.0
    if step is not None:
        pure, report = compress_sequentially(model.cfg, model.params, calib, from_recipe([step]),
                                             batch_size=calib_batch_size, progress=progress)
        _, params = load_params(model.cfg, pure)
        seconds = report["seconds"]
    row: dict[str, Any] = {"sparsity": measured_sparsity(params), "seconds_compress": seconds}
    for name, (tokens, max_windows) in texts.items():
        result = evaluate_perplexity(model.graphdef, params, tokens, eval_seq_len, eval_batch_size,
                                     max_windows=max_windows, progress=False)
        row[f"perplexity_{name}"] = result.perplexity
        row[f"num_eval_tokens_{name}"] = result.num_eval_tokens
    return row
