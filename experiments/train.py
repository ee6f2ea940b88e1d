"""Train a decoder from config, resuming from WORKDIR's checkpoints.

    python -m experiments.train --config=configs/train.py:smoke --workdir=/tmp/smoke

Writes WORKDIR/config.json, metrics.jsonl, loss.png, checkpoints/ and results.json with initial_loss,
final_loss, steps, tokens_per_s, mfu, num_params. With a ``lora`` section (presets lora, qlora and their _smoke
variants) only LoRA adapters train on a frozen pretrained base (packed 4-bit for qlora); results.json then adds
trainable_params, eval_perplexity_before, eval_perplexity_after and bytes_held, and the adapter is written in Hugging
Face PEFT's layout to WORKDIR/adapter/. Kill it at any point and rerun the same command to resume;
Ctrl-C or SIGTERM stops after the step in flight. A rerun may change only the settings in RESUMABLE_CHANGES
(the change is appended to WORKDIR/config_history.jsonl); any other change is refused with the list of keys.
"""

from llmopt_jax import cli

# Settings that do not change what a resumed run computes: its length, logging, checkpoint cadence, MFU's peak,
# how processes are started, the device mesh (elastic restore: checkpoints are resharded onto the new mesh; the
# numbers change only by the order of float reductions), and the AOT-memory experiment's section. Everything else
# (model, data, optim, seed, init_from, qat, sharding_rules, ...) must match the stored config.json to resume.
RESUMABLE_CHANGES = frozenset({
    "train.steps", "train.log_every", "train.progress", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoint", "train.peak_flops_per_s", "distributed", "cluster", "mesh", "aot",
    # Fine-tuning's held-out evaluation runs outside training (the base's perplexity is cached per eval setting).
    "eval.text_file", "eval.seq_len", "eval.batch_size", "eval.max_windows",
})


def main(config, workdir):
    from llmopt_jax.config_checks import check_train_settings

    check_train_settings(config)  # a bad value fails here, before any device or the workdir is touched
    process_index = 0
    if config.get("distributed", False):
        import jax

        from llmopt_jax.parallel.distributed import maybe_initialize

        # jax.distributed first (nothing has touched a device yet); each host then locks its own file.
        maybe_initialize(True, **(config.cluster.to_dict() if "cluster" in config else {}))
        process_index = jax.process_index()
    # Before the heavy imports: a busy or mis-set workdir is reported within seconds.
    workdir = cli.prepare_workdir(config, workdir, resumable=RESUMABLE_CHANGES, process_index=process_index)
    from llmopt_jax.train.loop import train

    results = train(config, workdir)
    print(
        f"steps={results['steps']} initial_loss={results['initial_loss']:.4f} final_loss={results['final_loss']:.4f} "
        f"tokens/s={results['tokens_per_s']:,.0f} mfu={results['mfu']:.2%} params={results['num_params']:,}"
    )


if __name__ == "__main__":
    cli.run(main)
