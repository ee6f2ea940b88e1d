"""Checks of config values that run before anything slow (a model load, a compile, a calibration pass).

Each raises :class:`~llmopt_jax.errors.ConfigError` (or :class:`~llmopt_jax.errors.DataError` for a text) with a
message that names the key and the value at fault; the CLIs print it as one ``error:`` line and exit 2. This
module imports nothing heavy, so an experiment can call it before its other imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

from llmopt_jax.errors import ConfigError, DataError

_KIND_NAMES = {int: "an integer", float: "a number"}
_EXAMPLES = {int: "1,8", float: "0.5,0.7", str: "a,b"}


def parse_list(value: Any, key: str, kind: Callable[[str], Any] = int, *, positive: bool = False,
               item: str = "value", example: str | None = None, choices: Sequence[str] | None = None) -> list:
    """The elements of the comma-separated config value ``value`` (key ``key``), each converted with ``kind``.

    Blank elements are skipped (``"4,"`` is ``[4]``, ``""`` is ``[]``); a number or a list given instead of a
    string is taken element by element. ``positive``: every element must be > 0 (``item`` names one element in
    that message: ``a batch must be positive``). ``choices``: the allowed strings. The error names ``key`` and the
    first bad element, e.g. ``sparsities: 'abc' is not a number (comma-separated list, e.g. 0.5,0.7)``.
    """
    example = example or _EXAMPLES.get(kind, "a,b")
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = [str(p).strip() for p in value]
    else:
        parts = [str(value).strip()]
    out = []
    for part in (p for p in parts if p):
        try:
            if kind is int and not part.lstrip("+-").isdigit():  # int("1.5") would fail too, int(1.5) would not
                raise ValueError(part)
            element = kind(part)
        except ValueError:
            what = _KIND_NAMES.get(kind, f"a valid {item}")
            raise ConfigError(f"{key}: {part!r} is not {what} (comma-separated list, e.g. {example})") from None
        if choices is not None and element not in choices:
            raise ConfigError(f"{key}: unknown {item} {part!r}; choose from {', '.join(choices)}")
        if positive and not element > 0:
            raise ConfigError(f"{key}: {part} is not positive: a {item} must be positive "
                              f"(comma-separated list, e.g. {example})")
        out.append(element)
    return out


def check_positive(config: Mapping, *keys: str) -> None:
    """Raises ``ConfigError`` unless every dotted ``key`` of ``config`` holds a number > 0."""
    for key in keys:
        value = lookup(config, key)
        if not value > 0:
            raise ConfigError(f"{key}={value} must be positive")


def lookup(config: Mapping, key: str) -> Any:
    """``config["a"]["b"]`` for ``key="a.b"``."""
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def check_eval_settings(eval_config: Mapping, prefix: str = "eval") -> None:
    """The ``eval`` block: ``seq_len >= 2``, ``batch_size >= 1``, and every ``*max_windows`` key > 0, or 0 / -1
    for every window."""
    if "seq_len" in eval_config and eval_config["seq_len"] < 2:
        raise ConfigError(f"{prefix}.seq_len={eval_config['seq_len']} must be at least 2 (tokens per window)")
    if "batch_size" in eval_config and eval_config["batch_size"] < 1:
        raise ConfigError(f"{prefix}.batch_size={eval_config['batch_size']} must be positive (windows per call)")
    for key, value in eval_config.items():
        if key.endswith("max_windows") and value < -1:
            raise ConfigError(f"{prefix}.{key}={value} must be positive, or 0 / -1 for every window")


def check_context(key: str, seq_len: int, max_seq_len: int) -> None:
    """Raises ``ConfigError`` unless windows of ``seq_len`` tokens fit the model's context ``max_seq_len``."""
    if not 2 <= seq_len <= max_seq_len:
        raise ConfigError(f"{key}={seq_len} must be in [2, {max_seq_len}] (the model's context)")


def check_text_length(text: str, seq_len: int, what: str, key: str = "eval.seq_len") -> None:
    """Raises ``DataError`` when ``text`` is certainly shorter than one window of ``seq_len`` tokens, before any
    tokenizer is loaded.

    A byte-level BPE token (every GGUF tokenizer we read, and the byte tokenizer) spans at least one byte of the
    text, and a SentencePiece tokenizer adds at most one prefix token: a text of ``B`` UTF-8 bytes has at most
    ``B + 1`` tokens. Texts that pass can still be too short once tokenized; the exact check runs on the tokens
    (:func:`llmopt_jax.eval.perplexity.check_eval_tokens`).
    """
    if not text.strip():
        raise DataError(f"the {what} is empty")
    size = len(text.encode("utf-8"))
    if size + 1 < seq_len:
        raise DataError(f"the {what} has {size} bytes, fewer than one window of {key}={seq_len} tokens: give a "
                        f"longer text or a smaller {key}")


def check_train_settings(config: Mapping) -> None:
    """The settings of ``configs/train.py`` that would otherwise fail (or silently diverge) mid-run: positive
    ``train.steps``, ``train.log_every``, ``optim.learning_rate`` and data sizes; ``optim.warmup_steps >= 0``
    (a warmup longer than the run shrinks to fit, :func:`llmopt_jax.train.optim.fit_warmup`)."""
    check_positive(config, "train.steps", "train.log_every", "optim.learning_rate", "data.seq_len",
                   "data.batch_size", "data.grad_accum")
    for key in ("optim.warmup_steps", "optim.total_steps"):
        if lookup(config, key) < 0:
            raise ConfigError(f"{key}={lookup(config, key)} must be >= 0")
    check_pipeline_settings(config)
    check_finetune_settings(config)


def check_finetune_settings(config: Mapping) -> None:
    """``data.documents``, and the LoRA settings (``lora`` section with ``rank`` > 0): rank, dropout, targets, a
    pretrained ``init_from``, the QLoRA base grid and an existing ``eval.text_file`` (before the model loads)."""
    import os

    documents = config["data"].get("documents", "")
    if documents not in ("", "files", "paragraphs"):
        raise ConfigError(f"data.documents={documents!r}; choose 'files', 'paragraphs' or '' (one token stream)")
    lora = config.get("lora", None)
    if lora is None or int(lora.get("rank", 0)) <= 0:
        return
    if not 0.0 <= float(lora.get("dropout", 0.0)) < 1.0:
        raise ConfigError(f"lora.dropout={lora['dropout']} must be in [0, 1)")
    if not parse_list(lora.get("targets", ""), "lora.targets", str, item="layer",
                      choices=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
        raise ConfigError("lora.targets is empty: name some of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    if not config.get("init_from", ""):
        raise ConfigError("LoRA fine-tunes a pretrained model: set init_from (a model name or path)")
    if bool(config["train"].get("offload_optimizer", False)):  # the adapters' optimizer state is not placed by it
        raise ConfigError("train.offload_optimizer does not apply to LoRA fine-tuning (the adapters' optimizer "
                          "state is small and stays on the device); leave it False")
    if int(lora.get("base_bits", 0)) not in (0, 2, 3, 4, 8):
        raise ConfigError(f"lora.base_bits={lora['base_bits']}: 0 (float base) or 2, 3, 4, 8 (packed)")
    group = int(lora.get("base_group_size", 64))
    if group == 0 or group < -1:
        raise ConfigError(f"lora.base_group_size={group} must be > 0 or -1 (per channel)")
    check_positive(config, "eval.seq_len", "eval.batch_size")
    text_file = config["eval"].get("text_file", "")
    for path in [p for p in text_file.split(",") if p]:
        if not os.path.isfile(path):
            raise DataError(f"text file not found: {path} (eval.text_file)")


def check_pipeline(num_layers: int, stages: int, microbatches: int, repeats: int = 1, *,
                   scan_layers: bool = True, num_experts: int = 0, batch_size: int | None = None,
                   batch_ways: int = 1) -> None:
    """Pipeline parallelism's constraints (``parallel/pipeline.py``); a one-line :class:`ConfigError` names the keys.

    ``batch_size``: the global batch of one pipelined forward (``data.batch_size``); ``batch_ways``: how many ways
    the batch mesh axes (data, fsdp, ...) split each microbatch.
    """
    if stages < 1 or microbatches < 1 or repeats < 1:
        raise ConfigError(f"mesh.stage={stages}, train.microbatches={microbatches} and "
                          f"train.pipeline_repeats={repeats} must be positive")
    if (stages, microbatches, repeats) == (1, 1, 1):
        return
    if not scan_layers:
        raise ConfigError("pipeline parallelism (mesh.stage > 1 or train.microbatches > 1) needs "
                          "model.scan_layers=True")
    if num_experts:
        raise ConfigError("pipeline parallelism does not support mixture-of-experts models yet "
                          f"(model.num_experts={num_experts}); use mesh.stage=1 and train.microbatches=1")
    if num_layers % (stages * repeats):
        what = f"mesh.stage={stages}" if repeats == 1 else \
            f"mesh.stage x train.pipeline_repeats = {stages} x {repeats}"
        raise ConfigError(f"model.num_layers={num_layers} is not divisible by {what}")
    if repeats > 1 and microbatches < stages:
        raise ConfigError(f"a circular pipeline (train.pipeline_repeats={repeats}) needs "
                          f"train.microbatches={microbatches} >= mesh.stage={stages}")
    if batch_size is not None and batch_size % (microbatches * batch_ways):
        raise ConfigError(f"data.batch_size={batch_size} is not divisible by train.microbatches x batch mesh axes "
                          f"= {microbatches} x {batch_ways}")


def check_pipeline_settings(config: Mapping) -> None:
    """:func:`check_pipeline` on what a train config fixes before any device is seen: ``mesh.stage``,
    ``train.microbatches``, ``train.pipeline_repeats``, ``model.num_layers`` (unless ``init_from`` replaces the
    model) and ``data.batch_size`` over ``mesh.data x mesh.fsdp`` when both are given (not -1). The training loop
    repeats the check with the resolved mesh."""
    train, mesh = config.get("train", {}), config.get("mesh", {})
    stages, micro = int(mesh.get("stage", 1)), int(train.get("microbatches", 1))
    repeats = int(train.get("pipeline_repeats", 1))
    if stages == -1:
        raise ConfigError("mesh.stage=-1: give the number of pipeline stages explicitly")
    model = config.get("model", {})
    pretrained = bool(config.get("init_from", ""))
    ways = [int(mesh.get(a, 1)) for a in ("data", "fsdp", "expert")]
    check_pipeline(
        int(model.get("num_layers", 0)) if not pretrained else stages * repeats, stages, micro, repeats,
        scan_layers=bool(model.get("scan_layers", True)),
        num_experts=0 if pretrained else int(model.get("num_experts", 0)),
        batch_size=int(lookup(config, "data.batch_size")) if -1 not in ways else None,
        batch_ways=ways[0] * ways[1] * ways[2],
    )
