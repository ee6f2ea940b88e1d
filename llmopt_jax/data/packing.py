"""Documents -> fixed windows with EOS separators, segment ids and per-document positions (packing).

Each document's tokens are followed by EOS and the documents are laid end to end, then cut into non-overlapping
windows of ``window`` tokens (the last partial window is dropped), so no window carries padding. Each window
numbers the document pieces it holds ``1, 2, ...`` (its *segment ids*); a document cut by a window boundary
continues as a new segment of the next window. The model restarts positions at every segment start and masks
attention across segments (:func:`segment_positions`, ``models.decoder``), and the loss scores a target only
when it continues the same segment as its input (:func:`target_weights`), so every packed document is trained on
exactly as if it were alone: the property the tests check.

Token batches are then dicts ``{"tokens": int32 [..., L+1], "segment_ids": int32 [..., L+1]}`` instead of a
plain ``[..., L+1]`` array.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmopt_jax.data.text import WindowBatches, load_texts
from llmopt_jax.errors import ConfigError, DataError

DOCUMENT_MODES = ("", "files", "paragraphs")


def split_documents(texts: Sequence[str], mode: str) -> list[str]:
    """The documents of ``texts`` (one string per file): ``files`` keeps each file whole, ``paragraphs`` splits
    each at blank lines; empty documents are dropped."""
    if mode not in DOCUMENT_MODES or not mode:
        raise ConfigError(f"data.documents={mode!r}; choose 'files' or 'paragraphs' (or '' for one token stream)")
    if mode == "files":
        docs = list(texts)
    else:
        docs = [p for t in texts for p in t.replace("\r\n", "\n").split("\n\n")]
    return [d.strip("\n") for d in docs if d.strip()]


def load_documents(text_files: str, mode: str, default: Sequence[str] | None = None) -> list[str]:
    """Documents of the comma-separated UTF-8 ``text_files`` (``default`` texts, else the default training text,
    when empty), split per :func:`split_documents`."""
    paths = [p for p in text_files.split(",") if p] if text_files else []
    texts = [load_texts([p]) for p in paths] if paths else list(default or [load_texts("")])
    return split_documents(texts, mode)


def pack_documents(docs: Sequence[Sequence[int]], window: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, segment_ids)`` int32 ``[N, window]`` of the token lists ``docs``, each followed by ``eos_id``.

    Segment ids count the document pieces of each window from 1; a window holds a piece of every document it
    overlaps. The last partial window is dropped.
    """
    if eos_id is None:
        raise ConfigError("packing documents needs a tokenizer with an EOS token")
    lengths = np.asarray([len(d) + 1 for d in docs], np.int64)
    stream = np.concatenate([np.append(np.asarray(d, np.int32), np.int32(eos_id)) for d in docs]) if docs else \
        np.zeros(0, np.int32)
    n = len(stream) // window
    if n == 0:
        raise DataError(f"the documents hold {len(stream)} tokens with their EOS, fewer than one window of {window}")
    stream = stream[: n * window].reshape(n, window)
    # A new segment starts at every document start and at every window start.
    starts = np.zeros(len(lengths) and int(lengths.sum()), bool)
    starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    starts = starts[: n * window].reshape(n, window)
    starts[:, 0] = True
    segments = np.cumsum(starts, axis=1).astype(np.int32)
    return stream.astype(np.int32), segments


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions int32 ``[B, L]`` that restart at 0 wherever ``segment_ids`` ``[B, L]`` changes value."""
    b, l = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    change = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(change, index, 0), axis=1)
    return index - start


def target_weights(segment_ids: jax.Array) -> jax.Array:
    """Float32 ``[B, L]`` weights of the targets of a window's ``segment_ids`` ``[B, L+1]``: 1 where the target
    continues its input's segment (segment 0 = padding never counts), else 0 (a document's first token has no
    context of its own document)."""
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return same.astype(jnp.float32)


class PackedBatches(WindowBatches):
    """:class:`~llmopt_jax.data.text.WindowBatches` over packed documents: each batch is
    ``{"tokens", "segment_ids"}`` int32 ``[batch, seq_len + 1]``; shuffling and resuming are the same."""

    def __init__(self, docs: Sequence[Sequence[int]], seq_len: int, batch_size: int, seed: int, eos_id: int):
        self.windows, self.segments = pack_documents(docs, seq_len + 1, eos_id)
        if len(self.windows) < batch_size:
            raise DataError(
                f"documents give {len(self.windows)} windows of {seq_len + 1} tokens, fewer than one batch of "
                f"{batch_size}"
            )
        self._start(batch_size, seed)

    def next(self) -> dict:
        """The next batch ``{"tokens", "segment_ids"}`` ``[batch, seq_len + 1]``; wraps to a new shuffled epoch."""
        rows = self._next_rows()
        return {"tokens": self.windows[rows], "segment_ids": self.segments[rows]}


def encode_documents(tokenizer, docs: Sequence[str]) -> list[list[int]]:
    """Token ids of each document (no BOS), batched through the ``tokenizers`` library when available."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "encode_batch"):
        return [e.ids for e in inner.encode_batch(list(docs), add_special_tokens=False)]
    return [tokenizer.encode(d) for d in docs]


def describe_packing(segments: np.ndarray) -> dict:
    """Summary of packed windows: documents pieces per window and the fraction of targets scored."""
    per_window = segments.max(axis=1)
    scored = float(np.mean(segments[:, 1:] == segments[:, :-1]))
    return {"windows": int(len(segments)), "mean_segments_per_window": float(per_window.mean()),
            "scored_target_fraction": scored}


__all__ = ["DOCUMENT_MODES", "PackedBatches", "describe_packing", "encode_documents", "load_documents",
           "pack_documents", "segment_positions", "split_documents", "target_weights"]
