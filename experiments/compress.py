"""Compress a pretrained model in one shot and measure its perplexity.

    python -m experiments.compress --config=configs/compress.py:sparsegpt --config.sparsity=0.5 \
        --config.eval.text_file=my.txt --workdir=runs/sparsegpt50

Writes WORKDIR/config.json, layers.json (per matrix: shape, sparsity, relative reconstruction error, seconds)
and results.json: method, perplexity, num_eval_tokens, sparsity (measured fraction of zeros over all pruned
matrices), bits_per_weight, model_bytes, seconds_compress, plus calibration (calib_windows, calib_seq_len,
calib_text) and evaluation sizes.
"""

from llmopt_jax import cli


def main(config, workdir):
    import dataclasses
    import os

    import jax
    import numpy as np

    from llmopt_jax.compress.calibrate import compress_sequentially, measured_sparsity
    from llmopt_jax.compress.prune import parse_pattern
    from llmopt_jax.compress.recipe import from_recipe
    from llmopt_jax.data.text import calibration_windows, check_calibration_text, load_texts, stdlib_docstrings_text
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.eval.perplexity import evaluate_perplexity
    from llmopt_jax.infer.roofline import tree_bytes
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.jsonio import write_json
    from llmopt_jax.parallel.sharded_init import load_params

    workdir = cli.prepare_workdir(config, workdir)
    if config.method not in ("dense", "magnitude", "wanda", "sparsegpt"):
        raise ConfigError(f"unknown method {config.method!r}; choose dense, magnitude, wanda or sparsegpt")
    if config.bits != 32:
        raise ConfigError(f"bits={config.bits}: quantization is not available yet (only 32-bit storage)")
    step = {"name": config.method, "sparsity": config.sparsity, "pattern": config.pattern}
    if config.method == "sparsegpt":
        step.update(blocksize=config.sparsegpt.blocksize, damp_fraction=config.sparsegpt.damp_fraction)
    transform = None if config.method == "dense" else from_recipe([step])  # validates before the model loads
    eval_text = load_texts(config.eval.text_file) if config.eval.text_file else stdlib_docstrings_text()
    check_calibration_text(config.calib.text_file, config.calib.sources)  # fails before the model loads

    model = load_pretrained(config.model)
    tok = model.require_tokenizer()
    for key in ("calib", "eval"):
        if not 2 <= config[key].seq_len <= model.cfg.max_seq_len:
            raise ConfigError(f"{key}.seq_len={config[key].seq_len} must be in [2, {model.cfg.max_seq_len}] "
                              "(the model's context)")
    params, seconds, layers = model.params, 0.0, []
    if transform is not None:
        calib = calibration_windows(tok, config.calib.text_file, config.calib.sources, config.calib.num_samples,
                                    config.calib.seq_len, config.calib.seed)
        pure, report = compress_sequentially(model.cfg, model.params, calib, transform,
                                             batch_size=config.calib.batch_size, progress=config.progress)
        _, params = load_params(model.cfg, pure)
        seconds, layers = report["seconds"], report["layers"]
    result = evaluate_perplexity(model.graphdef, params, np.asarray(tok.encode(eval_text)), config.eval.seq_len,
                                 config.eval.batch_size, max_windows=config.eval.max_windows, progress=config.progress)

    model_bytes = tree_bytes(params)
    results = {
        "method": config.method,
        "pattern": config.pattern or "unstructured",
        "target_sparsity": 0.0 if transform is None else parse_pattern(config.sparsity, config.pattern).sparsity,
        "perplexity": result.perplexity,
        "num_eval_tokens": result.num_eval_tokens,
        "sparsity": measured_sparsity(params),
        "bits_per_weight": 8.0 * model_bytes / sum(int(np.size(x)) for x in jax.tree.leaves(params)),
        "model_bytes": model_bytes,
        "seconds_compress": seconds,
        "seconds_eval": result.seconds,
        "calib_windows": 0 if transform is None else int(config.calib.num_samples),
        "calib_seq_len": int(config.calib.seq_len),
        "calib_text": config.calib.text_file or config.calib.sources,
        "model": model.path,
    }
    write_json(f"{workdir}/layers.json", [dataclasses.asdict(r) for r in layers])
    if config.save:
        save_model(config.save, model, params)
        results["saved_to"] = os.path.abspath(config.save)
    write_json(f"{workdir}/results.json", results)
    print(f"{config.method} ({results['pattern']}): perplexity={result.perplexity:.3f} over {result.num_eval_tokens:,} "
          f"tokens, sparsity={results['sparsity']:.4f}, compress {seconds:.1f} s")


def save_model(path, model, params):
    """F32 GGUF when ``path`` ends in .gguf (tokenizer copied from a GGUF source), else a safetensors directory."""
    if path.endswith(".gguf"):
        from llmopt_jax.io.gguf import read_gguf
        from llmopt_jax.io.gguf_write import write_gguf

        source = read_gguf(model.path) if model.path.endswith(".gguf") else None
        write_gguf(path, model.cfg, params, tensor_type="F32", metadata_from=source)
    else:
        from llmopt_jax.io.safetensors import write_hf_checkpoint

        write_hf_checkpoint(path, model.cfg, params, tokenizer=model.tokenizer)


if __name__ == "__main__":
    cli.run(main)
