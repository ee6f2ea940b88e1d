"""Perplexity of a causal LM over non-overlapping token windows (the protocol in design.md).

The text is tokenized without BOS and cut into windows of ``seq_len`` tokens (the last partial window is
dropped); in each window, positions 1..L-1 are scored given the tokens before them in the same window.
``perplexity = exp(sum NLL / number of scored tokens)``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm  # text bars: tqdm.auto needs ipywidgets in notebooks and warns without it

from llmopt_jax.data.text import token_windows
from llmopt_jax.errors import ConfigError, DataError
from llmopt_jax.parallel.rules import DEFAULT_RULES, Rules, check_batch_fits_mesh, logical_to_spec


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    num_eval_tokens: int
    nll_sum: float  # nats, summed over every scored token
    num_windows: int
    seconds: float
    window_nll_sums: list[float]


def window_nll_sums(graphdef: nnx.GraphDef, params: nnx.State, windows: jax.Array) -> jax.Array:
    """Summed NLL (float32 nats) of positions 1..L-1 of each window ``[B, L]`` -> ``[B]``."""
    logits, _ = nnx.merge(graphdef, params)(windows)
    logits = logits[:, :-1].astype(jnp.float32)
    targets = windows[:, 1:]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - target_logits, axis=-1)


def evaluate_perplexity(model, *args, **kwargs) -> PerplexityResult:
    """Perplexity of a model on a text or token array.

    ``evaluate_perplexity(model, text_or_tokens, seq_len=512, batch_size=4, *, max_windows=0, mesh=None,
    rules=DEFAULT_RULES, progress=True)`` with ``model`` any loaded or compressed model (``.graphdef``,
    ``.params``; a ``str`` text is tokenized with its tokenizer, without BOS), or
    ``evaluate_perplexity(graphdef, params, tokens, seq_len, ...)`` with the parts. See :func:`perplexity_of`.
    """
    if hasattr(model, "graphdef") and hasattr(model, "params"):
        tokens, *rest = args
        if isinstance(tokens, str):
            tokens = model.require_tokenizer().encode(tokens)
        return perplexity_of(model.graphdef, model.params, tokens, *rest, **kwargs)
    return perplexity_of(model, *args, **kwargs)


def check_eval_tokens(tokens, seq_len: int, what: str = "evaluation text") -> None:
    """Raises ``DataError`` unless ``tokens`` hold at least one full window of ``seq_len`` tokens."""
    if seq_len < 2:
        raise ConfigError(f"eval.seq_len must be at least 2, got {seq_len}")
    n = len(tokens)
    if n < seq_len:
        raise DataError(f"the {what} has {n} tokens, fewer than one window of eval.seq_len={seq_len}: give a "
                        "longer text or a smaller eval.seq_len")


def perplexity_of(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: np.ndarray,
    seq_len: int = 512,
    batch_size: int = 4,
    *,
    max_windows: int = 0,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``tokens`` (1-D int) in windows of ``seq_len``, ``batch_size`` windows per jitted call.

    ``max_windows > 0`` evaluates only the first windows (0 or -1: all). With a ``mesh``, each batch is split over the
    axes ``act_batch`` maps to (``batch_size`` must divide by them). The last batch is padded with copies
    of a real window whose scores are discarded, so the function compiles once; without a mesh a text of fewer
    windows than ``batch_size`` is one batch of just those windows.
    """
    check_eval_tokens(tokens, seq_len)
    if batch_size < 1:
        raise ConfigError(f"eval.batch_size must be positive, got {batch_size}")
    if max_windows < -1:
        raise ConfigError(f"eval.max_windows must be positive, or 0 / -1 for every window, got {max_windows}")
    windows = token_windows(np.asarray(tokens, np.int32), seq_len)
    if max_windows > 0:
        windows = windows[:max_windows]
    n = len(windows)
    sharding = None
    if mesh is None:
        batch_size = min(batch_size, n)  # fewer windows than a batch: no padding windows to compute and discard
    else:
        check_batch_fits_mesh(batch_size, mesh, rules, what="eval.batch_size")
        sharding = NamedSharding(mesh, logical_to_spec(("act_batch", None), rules, mesh))
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    score = jax.jit(window_nll_sums, static_argnums=0, out_shardings=replicated)

    t0 = time.perf_counter()
    sums: list[float] = []
    bar = tqdm(total=n * (seq_len - 1), unit="tok", desc="perplexity", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
        batch = jnp.asarray(batch) if sharding is None else jax.device_put(batch, sharding)
        sums.extend(np.asarray(score(graphdef, params, batch), np.float64)[:real].tolist())
        bar.update(real * (seq_len - 1))
    bar.close()
    seconds = time.perf_counter() - t0
    scored = n * (seq_len - 1)
    total = float(np.sum(sums))
    return PerplexityResult(
        perplexity=float(np.exp(total / scored)), num_eval_tokens=scored, nll_sum=total, num_windows=n,
        seconds=seconds, window_nll_sums=sums,
    )
