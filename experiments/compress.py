"""Compress a pretrained model in one shot and measure its perplexity.

    python -m experiments.compress --config=configs/compress.py:sparsegpt --config.sparsity=0.5 \
        --config.eval.text_file=my.txt --workdir=runs/sparsegpt50
    python -m experiments.compress --config=configs/compress.py:gptq --config.bits=3 --config.group_size=64 \
        --config.act_order=True --workdir=runs/gptq3g64

The method and its flat options become a recipe (``llmopt_jax.compress.api.method_recipe``) that
``lj.compress`` runs; quantized models are evaluated from packed weights. Writes WORKDIR/config.json,
layers.json (per matrix: shape, sparsity, relative reconstruction error, seconds) and results.json: method,
perplexity, num_eval_tokens, sparsity (measured fraction of zeros over all compressed matrices), bits,
group_size, bits_per_weight (stored bits of the compressed matrices, scales and offsets included, per weight;
32 for float matrices), model_bytes (bytes of every array the evaluated model holds), seconds_compress, plus
calibration (calib_windows, calib_seq_len, calib_text) and evaluation sizes. With ``--config.save`` the model is
written (``lj.save_model``); when the file re-rounds weights (``saved_rerounded``: tensor -> relative change),
the file's own perplexity is measured too (``saved_perplexity``).
"""

from llmopt_jax import cli


def recipe_from_config(config) -> list[dict]:
    """The recipe ``config``'s flat keys describe (``llmopt_jax.compress.api.method_recipe``)."""
    from llmopt_jax.compress.api import method_recipe

    return method_recipe(
        config.method, sparsity=config.sparsity, pattern=config.pattern, bits=config.bits,
        group_size=config.group_size, symmetric=config.symmetric, zero_point=config.zero_point,
        act_order=config.act_order, static_groups=config.static_groups, blocksize=config.sparsegpt.blocksize,
        damp_fraction=config.sparsegpt.damp_fraction, embedding_bits=config.embedding_bits,
        smoothquant_alpha=config.smoothquant_alpha)


def main(config, workdir):
    import dataclasses

    import numpy as np

    import llmopt_jax as lj
    from llmopt_jax.compress.api import plan_recipe
    from llmopt_jax.compress.prune import parse_pattern
    from llmopt_jax.config_checks import check_context, check_eval_settings, check_text_length
    from llmopt_jax.data.text import check_calibration_text, load_texts, stdlib_docstrings_text
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.eval.perplexity import check_eval_tokens
    from llmopt_jax.io.gguf_write import TENSOR_TYPES
    from llmopt_jax.io.save import check_writable
    from llmopt_jax.jsonio import write_json

    # Everything that can be checked is checked before the model loads and long before compression ends.
    recipe = recipe_from_config(config)
    plan = plan_recipe(recipe)
    if config.save:
        if config.save.endswith(".gguf") and config.save_type not in TENSOR_TYPES:
            raise ConfigError(f"save_type={config.save_type!r}; choose one of {', '.join(TENSOR_TYPES)}")
        check_writable(config.save)
    check_eval_settings(config.eval)
    eval_what = f"evaluation text {config.eval.text_file}" if config.eval.text_file else "evaluation text"
    eval_text = load_texts(config.eval.text_file) if config.eval.text_file else stdlib_docstrings_text()
    check_text_length(eval_text, config.eval.seq_len, eval_what)
    check_calibration_text(config.calib.text_file, config.calib.sources)
    workdir = cli.prepare_workdir(config, workdir)

    model = lj.load_pretrained(config.model)
    tok = model.require_tokenizer()
    for key in ("calib", "eval"):
        check_context(f"{key}.seq_len", config[key].seq_len, model.cfg.max_seq_len)
    eval_tokens = np.asarray(tok.encode(eval_text))
    check_eval_tokens(eval_tokens, config.eval.seq_len, eval_what)
    calib = None
    if plan.needs_calibration:
        calib = lj.calibration_windows(tok, config.calib.text_file, config.calib.sources, config.calib.num_samples,
                                       config.calib.seq_len, config.calib.seed)
    compressed = lj.compress(model, recipe, calib, batch_size=config.calib.batch_size,
                             compute_dtype=config.calib.compute_dtype, progress=config.progress)
    # Quantized kernels stay packed: the evaluation runs from the packed weights.
    result = lj.evaluate_perplexity(compressed, eval_tokens, config.eval.seq_len, config.eval.batch_size,
                                    max_windows=config.eval.max_windows, progress=config.progress)
    pruning = next((s for s in recipe if "sparsity" in s or "pattern" in s), None)
    results = {
        "method": config.method,
        "recipe": recipe,
        "pattern": config.pattern or "unstructured",
        "target_sparsity": 0.0 if pruning is None else parse_pattern(pruning["sparsity"], pruning["pattern"]).sparsity,
        "perplexity": result.perplexity,
        "num_eval_tokens": result.num_eval_tokens,
        "bits": int(config.bits),
        "group_size": int(config.group_size),
        "act_order": bool(config.act_order),
        "embedding_bits": int(config.embedding_bits),
        **compressed.summary(),
        "calib_compute_dtype": compressed.report.get("compute_dtype", config.calib.compute_dtype),  # "auto" resolved
        "seconds_eval": result.seconds,
        "calib_windows": 0 if calib is None else int(config.calib.num_samples),
        "calib_seq_len": int(config.calib.seq_len),
        "calib_text": config.calib.text_file or config.calib.sources,
        "model": model.path,
    }
    write_json(f"{workdir}/layers.json", [dataclasses.asdict(r) for r in compressed.report.get("layers", [])])
    if config.save:
        saved = lj.save_model(compressed, config.save, tensor_type=config.save_type)
        results["saved_to"], results["saved_rerounded"] = saved["path"], saved["rerounded"]
        if saved["rerounded"]:  # the file is not the model measured above: measure the file too
            again = lj.evaluate_perplexity(lj.load_pretrained(config.save), eval_tokens, config.eval.seq_len,
                                           config.eval.batch_size, max_windows=config.eval.max_windows,
                                           progress=config.progress)
            results["saved_perplexity"] = again.perplexity
            print(f"saved file {config.save}: perplexity {again.perplexity:.3f} (re-rounded: "
                  f"{', '.join(saved['rerounded'])})")
    write_json(f"{workdir}/results.json", results)
    print(f"{config.method} ({results['pattern']}, {results['bits_per_weight']:.2f} bits/weight): perplexity="
          f"{result.perplexity:.3f} over {result.num_eval_tokens:,} tokens, sparsity={results['sparsity']:.4f}, "
          f"model {results['model_bytes'] / 2**20:.1f} MiB, compress {results['seconds_compress']:.1f} s")


if __name__ == "__main__":
    cli.run(main)
