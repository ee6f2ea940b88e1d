"""Text -> token windows: packing, seeded shuffling, a resumable batch iterator, calibration sampling.

Tokens of all input text are concatenated (packed) and cut into non-overlapping windows of ``seq_len + 1``
tokens (inputs plus the shifted targets). Each epoch visits the windows in an order drawn from
``numpy.random.default_rng((seed, epoch))``, so the position ``{"epoch", "index"}`` alone determines every
later batch: saving it with a checkpoint makes a resumed run see exactly the same data.
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol, Sequence

import numpy as np

from llmopt_jax.errors import DataError


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids ``0..255``; ids ``256`` (BOS) and ``257`` (EOS) are reserved."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def default_text() -> str:
    """Python's own documentation topics (``pydoc_data.topics``), joined with blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def topics_split(part: str, every: int = 4) -> list[str]:
    """One split of ``pydoc_data.topics`` as documents (one per topic, in sorted order): ``heldout`` is every
    ``every``-th topic (the ``every-1``-th, ``2·every-1``-th, ...), ``train`` the others. Fine-tuning's default
    texts: the same domain, no shared document."""
    from pydoc_data.topics import topics

    if part not in ("train", "heldout"):
        raise DataError(f"unknown split {part!r}; choose 'train' or 'heldout'")
    keys = sorted(topics)
    return [topics[k] for i, k in enumerate(keys) if (i % every == every - 1) == (part == "heldout")]


# Standard-library modules whose docstrings make a held-out English text in the calibration text's domain.
DOCSTRING_MODULES = (
    "argparse", "collections", "functools", "json", "subprocess", "unittest", "asyncio", "logging", "pathlib",
    "re", "os", "itertools", "csv", "sqlite3", "threading", "datetime", "decimal", "fractions", "statistics",
    "random", "string", "textwrap", "difflib", "pickle", "shutil", "tempfile",
)


def stdlib_docstrings_text() -> str:
    """Docstrings of standard-library modules and their public classes and functions, joined with blank lines.

    Technical English like ``pydoc_data.topics`` but different text: the default held-out evaluation text
    when calibrating on the topics.
    """
    import importlib
    import inspect

    parts = []
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        parts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(inspect.getmembers(module), key=lambda item: item[0]):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "").startswith(module_name):
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def python_license_text() -> str:
    """Python's own ``LICENSE.txt`` (legal English, far from the documentation domain of the other texts)."""
    import sysconfig

    path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if not os.path.isfile(path):
        raise DataError(f"Python's LICENSE.txt is not installed at {path}; pass a text file instead")
    with open(path, encoding="utf-8") as f:
        return f.read()


# Standard-library modules whose source code (code and comments) makes a code-domain calibration text; none of
# them is in DOCSTRING_MODULES, so calibrating on it never sees the held-out evaluation text.
SOURCE_MODULES = (
    "ast", "bisect", "calendar", "contextlib", "dataclasses", "heapq", "tokenize", "email.message", "http.client",
    "xml.dom.minidom",
)



def stdlib_source_text() -> str:
    """Python source of the :data:`SOURCE_MODULES`, joined with blank lines."""
    import importlib
    import inspect

    try:
        return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in SOURCE_MODULES)
    except (OSError, TypeError) as e:  # a Python installed without its .py files
        raise DataError(f"the standard library's source is not installed ({e}); use another calibration source") from e


def idle_prose_text() -> str:
    """IDLE's READMEs, change logs and notes: every ``*.txt`` of the installed ``idlelib`` (names vary between
    Python versions), in sorted order."""
    import glob
    import sysconfig

    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "idlelib", "*.txt")))
    text = load_texts(paths) if paths else ""
    if len(text) < 20_000:
        raise DataError("idlelib's text files are not installed (this Python has no IDLE); use another source")
    return text


# Calibration text sources by name: one domain each. ``mixed_calibration_windows`` draws equal shares.
CALIBRATION_SOURCES = {"topics": default_text, "code": stdlib_source_text, "prose": idle_prose_text}


def calibration_source_text(name: str) -> str:
    """The text of the calibration source ``name`` (a key of :data:`CALIBRATION_SOURCES`)."""
    if name not in CALIBRATION_SOURCES:
        raise DataError(f"unknown calibration source {name!r}; choose from {sorted(CALIBRATION_SOURCES)}")
    return CALIBRATION_SOURCES[name]()


def mixed_calibration_windows(token_sources: Sequence[np.ndarray], num: int, length: int, seed: int) -> np.ndarray:
    """``num`` windows ``[num, length]``, an equal share (the first ones one more) from each token source.

    Source ``i`` is sampled like :func:`sample_windows` with seed ``seed + i``, so one source alone gives the same
    windows as :func:`sample_windows`.
    """
    if not token_sources:
        raise DataError("mixed calibration needs at least one text source")
    if num < len(token_sources):
        raise DataError(f"{num} calibration windows cannot cover {len(token_sources)} sources")
    shares = [num // len(token_sources) + (i < num % len(token_sources)) for i in range(len(token_sources))]
    return np.concatenate([sample_windows(t, k, length, seed + i) for i, (t, k) in enumerate(zip(token_sources, shares))])


def parse_calibration_sources(sources: str) -> list[str]:
    """The names in a comma-separated ``sources`` string, each checked against :data:`CALIBRATION_SOURCES`."""
    names = [n.strip() for n in sources.split(",") if n.strip()]
    if not names:
        raise DataError("calib.sources is empty: name at least one of " + ", ".join(sorted(CALIBRATION_SOURCES)))
    for name in names:
        if name not in CALIBRATION_SOURCES:
            raise DataError(f"unknown calibration source {name!r}; choose from {sorted(CALIBRATION_SOURCES)}")
    return names


def check_calibration_text(text_file: str, sources: str) -> None:
    """Raises :class:`DataError` for what :func:`calibration_windows` would fail on (a missing or non-UTF-8
    ``text_file``, an unknown source name) before anything slow, such as loading a model, happens."""
    if text_file:
        load_texts(text_file)
    else:
        parse_calibration_sources(sources)


def calibration_windows(tokenizer: Tokenizer, text_file: str = "", sources: str = "topics,code,prose",
                        num: int = 128, length: int = 512, seed: int = 0) -> np.ndarray:
    """Calibration windows int ``[num, length]`` sampled with ``seed``: from ``text_file`` (comma-separated paths)
    when given, else equal shares of the comma-separated :data:`CALIBRATION_SOURCES` named in ``sources``."""
    if text_file:
        return sample_windows(np.asarray(tokenizer.encode(load_texts(text_file))), num, length, seed)
    texts = [calibration_source_text(n) for n in parse_calibration_sources(sources)]
    return mixed_calibration_windows([np.asarray(tokenizer.encode(t)) for t in texts], num, length, seed)


def load_texts(paths: Iterable[str] | str | None) -> str:
    """The UTF-8 contents of ``paths`` joined with blank lines; the default text when none are given."""
    if paths is None or paths == "" or (not isinstance(paths, str) and len(list(paths)) == 0):
        return default_text()
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    parts = []
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"text file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
        except UnicodeDecodeError as e:
            raise DataError(f"text file is not UTF-8: {path} ({e.reason} at byte {e.start})") from e
    return "\n\n".join(parts)


def token_windows(tokens: np.ndarray, window: int) -> np.ndarray:
    """Non-overlapping windows ``[N, window]`` of a 1-D token array (the last partial window is dropped)."""
    tokens = np.asarray(tokens)
    n = len(tokens) // window
    if n == 0:
        raise DataError(f"text has {len(tokens)} tokens, fewer than one window of {window}")
    return tokens[: n * window].reshape(n, window)


def sample_windows(tokens: np.ndarray, num: int, length: int, seed: int) -> np.ndarray:
    """``num`` windows ``[num, length]`` starting at seeded random offsets (calibration sampling)."""
    tokens = np.asarray(tokens)
    if len(tokens) < length:
        raise DataError(f"calibration text has {len(tokens)} tokens, fewer than one window of {length}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length + 1, size=num)
    return np.stack([tokens[s : s + length] for s in starts])


class WindowBatches:
    """Shuffled batches ``[batch, seq_len + 1]`` of packed windows, resumable from :meth:`position`."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.windows = token_windows(np.asarray(tokens, np.int32), seq_len + 1)
        if len(self.windows) < batch_size:
            raise DataError(
                f"text gives {len(self.windows)} windows of {seq_len + 1} tokens, fewer than one batch of {batch_size}"
            )
        self._start(batch_size, seed)

    def _start(self, batch_size: int, seed: int) -> None:
        """Epoch 0, nothing taken yet, over ``self.windows``."""
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0  # batches already taken in this epoch
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.windows) // self.batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.windows))

    def position(self) -> dict:
        """JSON-serialisable position; :meth:`restore` of it continues with the same batches."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_windows": len(self.windows)}

    def restore(self, position: dict) -> None:
        if position.get("num_windows", len(self.windows)) != len(self.windows) or position.get(
            "seed", self.seed
        ) != self.seed:
            raise DataError(
                f"saved data position {position} does not match this dataset "
                f"({len(self.windows)} windows, seed {self.seed}): the text or seq_len changed"
            )
        self.epoch, self.index = int(position["epoch"]), int(position["index"])
        self._order = self._epoch_order(self.epoch)

    def _next_rows(self) -> np.ndarray:
        """Indices of the next batch's windows; wraps to a freshly shuffled epoch."""
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
            self._order = self._epoch_order(self.epoch)
        rows = self._order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return rows

    def next(self) -> np.ndarray:
        """The next batch ``[batch, seq_len + 1]`` int32; wraps to a freshly shuffled epoch."""
        return self.windows[self._next_rows()]
