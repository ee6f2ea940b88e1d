"""The training loop behind ``experiments/train.py``: config in, checkpoints/metrics/results out.

Resumes automatically: if ``WORKDIR/checkpoints`` holds a checkpoint, the state and the data position are
restored from the newest one and training continues; the result is bit-identical to an uninterrupted run.
SIGINT/SIGTERM stop the loop between two steps (a second signal abandons the step in flight): the run waits for
an asynchronous save in flight, raises :class:`~llmopt_jax.interrupt.Interrupted` with the step a rerun resumes
from, and the CLI exits 130/143.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from llmopt_jax.data.text import ByteTokenizer, WindowBatches, load_texts
from llmopt_jax.errors import ConfigError
from llmopt_jax.interrupt import Interrupted, StopFlag
from llmopt_jax.jsonio import write_json
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.distributed import global_array, maybe_initialize
from llmopt_jax.parallel.mesh import create_mesh, describe
from llmopt_jax.parallel.rules import check_batch_fits_mesh, normalize_rules
from llmopt_jax.train.checkpoint import Checkpointer, complete_steps
from llmopt_jax.train.metrics import MetricsLog, measure_peak_flops, model_flops_utilization, total_peak_flops
from llmopt_jax.train.optim import fit_warmup, learning_rate_schedule, make_optimizer
from llmopt_jax.train.step import batch_sharding, init_train_state, jit_train_step


def optimizer_config(config: ConfigDict) -> dict:
    """The ``optim`` section with ``total_steps`` defaulting to ``train.steps`` and ``warmup_steps`` shrunk to fit
    a run shorter than it (:func:`~llmopt_jax.train.optim.fit_warmup`)."""
    optim = dict(config.optim)
    if int(optim.get("total_steps", 0)) <= 0:
        optim["total_steps"] = int(config.train.steps)
    optim["warmup_steps"] = fit_warmup(optim["warmup_steps"], optim["total_steps"])
    return optim


def make_tokenizer(name: str):
    """``data.tokenizer``: ``byte`` (UTF-8 bytes) or a model name or path whose own BPE tokenizer is loaded
    (``smollm2-135m``, a GGUF file, a ``tokenizer.json`` or a Hugging Face model directory)."""
    if name == "byte":
        return ByteTokenizer()
    from llmopt_jax.io.load import load_tokenizer

    return load_tokenizer(name)


def training_batches(config: ConfigDict, tokenizer, seq_len: int, batch_size: int, finetuning: bool = False):
    """The resumable batch iterator of ``config.data``: with ``data.documents`` (``files`` or ``paragraphs``) the
    documents are packed with EOS separators and segment ids (``data/packing.py``), else the text is one token
    stream cut into windows. Fine-tuning's default text is the training split of ``pydoc_data.topics``."""
    from llmopt_jax.data.packing import PackedBatches, encode_documents, load_documents
    from llmopt_jax.data.text import topics_split

    mode = config.data.get("documents", "")
    default = topics_split("train") if finetuning else None
    if not mode:
        use_default = default is not None and not config.data.text_files
        text = "\n\n".join(default) if use_default else load_texts(config.data.text_files)
        return WindowBatches(np.asarray(tokenizer.encode(text), np.int32), seq_len, batch_size, seed=int(config.seed))
    docs = encode_documents(tokenizer, load_documents(config.data.text_files, mode, default))
    return PackedBatches(docs, seq_len, batch_size, int(config.seed), tokenizer.eos_id)


def plot_loss(records: list[dict], path: str) -> None:
    """Writes the loss curve to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def start_point(config: ConfigDict):
    """``(model config, tokenizer, initial pure params or None, pretrained model or None)``.

    With ``init_from`` (a model name or path) training continues a pretrained model: its architecture and
    tokenizer replace ``config.model`` except for the compute settings ``dtype``, ``remat`` and ``attention``.
    """
    source = config.get("init_from", "")
    if not source:
        return ModelConfig.from_mapping(config.model), make_tokenizer(config.data.tokenizer), None, None
    import dataclasses

    from flax import nnx

    from llmopt_jax.io.load import load_pretrained

    model = load_pretrained(source)
    cfg = dataclasses.replace(model.cfg, dtype=config.model.dtype, remat=config.model.remat,
                              attention=config.model.attention)
    return cfg, model.require_tokenizer(), nnx.to_pure_dict(model.params), model


def qat_dot_general(config: ConfigDict):
    """The fake-quantizing matmul for ``config.qat`` (``bits`` 0 = no quantization-aware training)."""
    qat = config.get("qat", None)
    if qat is None or not qat.bits:
        return jax.lax.dot_general
    from llmopt_jax.compress.qat import FakeQuantDotGeneral
    from llmopt_jax.compress.quantize import QuantGrid

    return FakeQuantDotGeneral(QuantGrid(int(qat.bits), int(qat.group_size), bool(qat.symmetric)))


def interrupted(signum: int, step: int, checkpoints: str) -> Interrupted:
    """The stop of a training run after ``step``, with the step a rerun resumes from (newest complete checkpoint)."""
    steps = complete_steps(checkpoints)
    resume = steps[-1] if steps else 0
    return Interrupted(signum, f"interrupted at step {step}; rerun the same command to resume from step {resume}")


def train(config: ConfigDict, workdir: str) -> dict:
    """Trains per ``config``, checkpointing into ``workdir``; returns (and writes) ``results.json``'s dict.

    With ``init_from`` the trained model is also written to ``WORKDIR/model`` (safetensors + tokenizer).
    """
    # Multi-host: before anything touches a device, including the pretrained model that init_from loads.
    maybe_initialize(bool(config.get("distributed", False)), **(config.cluster.to_dict() if "cluster" in config else {}))
    dot_general = qat_dot_general(config)
    model_cfg, tokenizer, initial_params, pretrained = start_point(config)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} < tokenizer vocabulary {tokenizer.vocab_size}")
    seq_len, micro, accum = int(config.data.seq_len), int(config.data.batch_size), int(config.data.grad_accum)
    if seq_len <= 0 or micro <= 0 or accum <= 0:
        raise ConfigError("data.seq_len, data.batch_size and data.grad_accum must be positive")
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    from llmopt_jax.peft.finetune import lora_enabled

    finetuning = lora_enabled(config)  # LoRA/QLoRA: only adapters train, on a frozen (maybe packed) base
    data = training_batches(config, tokenizer, seq_len, micro * accum, finetuning)

    mesh = create_mesh(config.mesh)
    rules = normalize_rules(config.sharding_rules)
    check_batch_fits_mesh(micro, mesh, rules)
    from llmopt_jax.parallel import pipeline

    model_cfg = pipeline.configure(model_cfg, config, mesh, rules)  # mesh.stage / train.microbatches (GPipe)
    optim_cfg = optimizer_config(config)
    if optim_cfg["warmup_steps"] != int(config.optim.warmup_steps) and jax.process_index() == 0:
        print(f"note: optim.warmup_steps={int(config.optim.warmup_steps)} does not fit a run of "
              f"{optim_cfg['total_steps']} steps: warming up over {optim_cfg['warmup_steps']} steps",
              file=sys.stderr, flush=True)
    optimizer = make_optimizer(optim_cfg)
    schedule = learning_rate_schedule(optim_cfg)
    finetune = None
    if finetuning:
        from llmopt_jax.peft.finetune import LoraFineTune

        finetune = LoraFineTune(config, model_cfg, initial_params, mesh, rules, tokenizer)
        graphdef = finetune.graphdef
        state, shardings = finetune.init_state(optimizer)
    else:
        graphdef, state, shardings = init_train_state(
            model_cfg, optimizer, mesh, rules, seed=int(config.seed), dot_general=dot_general,
            initial_params=initial_params, offload_optimizer=bool(config.train.get("offload_optimizer", False)))
    del initial_params
    num_params = finetune.num_params if finetune else sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), config.train.checkpoint_every, config.train.keep_checkpoints,
        async_save=bool(config.train.async_checkpoint),
    )
    log = MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    is_main = jax.process_index() == 0  # one writer per workdir on multi-host runs
    start = checkpointer.latest_step() or 0
    if start > int(config.train.steps):
        raise ConfigError(
            f"train.steps={int(config.train.steps)} is below step {start} of the newest checkpoint in "
            f"{checkpointer.directory}; set train.steps >= {start} or use another workdir"
        )
    if start:
        state, position = checkpointer.restore(start, state)
        data.restore(position)
    if is_main:
        log.truncate_after(start)

    before = finetune.perplexity_before(workdir) if finetune else None  # held-out perplexity of the base
    frozen_args = () if finetune is None else (finetune.frozen,)
    step_fn = jit_train_step(graphdef, optimizer, shardings, mesh, rules, **({} if finetune is None else dict(
        combine=finetune.combine, frozen_shardings=finetune.frozen_shardings)))
    in_sharding = batch_sharding(mesh, rules)
    peak = float(config.train.peak_flops_per_s) or total_peak_flops(measure_peak_flops(model_cfg.compute_dtype))
    flops_per_token = model_cfg.train_flops_per_token(seq_len)
    tokens_per_step = micro * accum * seq_len
    total = int(config.train.steps)

    bar = tqdm(
        range(start + 1, total + 1), initial=start, total=total, desc="train",
        disable=not (config.train.progress and is_main),
    )
    done = start  # the last step whose update, log line and checkpoint request are complete
    try:
        # A first SIGINT/SIGTERM is only noted, and checked between steps, so no step is torn; a second one
        # raises Interrupted at once and abandons the step in flight.
        with StopFlag() as stop:
            first_in_process = True
            for step in bar:
                if stop.requested:
                    break
                batch = jax.tree.map(lambda x: x.reshape(accum, micro, seq_len + 1), data.next())
                t0 = time.perf_counter()
                state, metrics = step_fn(state, jax.tree.map(lambda x: global_array(x, in_sharding), batch),
                                         *frozen_args)
                loss = float(metrics["loss"])  # also waits for the step: the timing below is real
                seconds = time.perf_counter() - t0
                tokens_per_s = tokens_per_step / seconds
                record = {
                    "step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                    "learning_rate": float(schedule(step - 1)), "seconds": seconds, "tokens_per_s": tokens_per_s,
                    "mfu": model_flops_utilization(tokens_per_s, flops_per_token, peak),
                    "includes_compile": first_in_process,
                }
                if "expert_counts" in metrics:  # a MoE model: routing statistics of this step's tokens
                    record.update({k: float(metrics[k]) for k in ("router_z_loss", "load_balance_loss",
                                                                   "dropped_fraction")})
                    record["expert_counts"] = np.asarray(metrics["expert_counts"]).round(2).tolist()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}")
                first_in_process = False
                if is_main and (step % int(config.train.log_every) == 0 or step == total):
                    log.write(record)
                checkpointer.maybe_save(step, state, data.position(), force=(step == total))
                done = step
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{record['mfu']:.1%}")
            bar.close()
            checkpointer.close()  # an asynchronous save in flight is committed before we stop
    except Interrupted as e:
        # Second signal: the step in flight and any uncommitted save are abandoned (orbax renames a checkpoint
        # into place only once complete, so the newest finalized one on disk is intact).
        bar.close()
        raise interrupted(e.signum, done, checkpointer.directory) from None
    if stop.requested:
        raise interrupted(stop.signum, done, checkpointer.directory)

    records = log.read()
    timed = [r for r in records if not r["includes_compile"]] or records
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in timed)
    results = {
        "initial_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "final_loss_mean_last10": float(np.mean([r["loss"] for r in records[-10:]])),
        "steps": records[-1]["step"],
        "tokens_per_s": tokens_per_s,
        "mfu": model_flops_utilization(tokens_per_s, flops_per_token, peak),
        "num_params": num_params,
        "flops_per_token": flops_per_token,
        "peak_flops_per_s": peak,
        "resumed_from_step": start,
        "warmup_steps": optim_cfg["warmup_steps"],  # after fitting a short run
        "mesh": describe(mesh),
        "backend": jax.default_backend(),
        "num_processes": jax.process_count(),
        "num_devices": jax.device_count(),
    }
    if finetune is not None:  # held-out perplexity after, the adapter in PEFT's layout, memory held
        results.update(finetune.finish(state, workdir, before))
    elif pretrained is not None and is_main:
        from llmopt_jax.io.safetensors import write_hf_checkpoint

        results["saved_to"] = os.path.join(workdir, "model")
        write_hf_checkpoint(results["saved_to"], model_cfg, state["params"], tokenizer=pretrained.tokenizer)
    if is_main:
        write_json(os.path.join(workdir, "results.json"), results)
        plot_loss(records, os.path.join(workdir, "loss.png"))
    return results
