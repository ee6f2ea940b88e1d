"""Compress a pretrained model in one shot and measure its perplexity.

    python -m experiments.compress --config=configs/compress.py:sparsegpt --config.sparsity=0.5 \
        --config.eval.text_file=my.txt --workdir=runs/sparsegpt50
    python -m experiments.compress --config=configs/compress.py:gptq --config.bits=3 --config.group_size=64 \
        --config.act_order=True --workdir=runs/gptq3g64

Quantized models are evaluated from packed weights (``compress/packed.py``). Writes WORKDIR/config.json,
layers.json (per matrix: shape, sparsity, relative reconstruction error, seconds) and results.json: method,
perplexity, num_eval_tokens, sparsity (measured fraction of zeros over all compressed matrices), bits,
group_size, bits_per_weight (stored bits of the compressed matrices, scales and offsets included, per weight;
32 for float matrices), model_bytes (bytes of every array the evaluated model holds), seconds_compress, plus
calibration (calib_windows, calib_seq_len, calib_text) and evaluation sizes.
"""

from llmopt_jax import cli


def main(config, workdir):
    import dataclasses
    import os

    import numpy as np
    from flax import nnx

    from llmopt_jax.compress.calibrate import measured_sparsity
    from llmopt_jax.compress.packed import block_bits_per_weight
    from llmopt_jax.compress.smoothquant import smoothquant_w8a8
    from llmopt_jax.compress.study import compress_model
    from llmopt_jax.compress.prune import parse_pattern
    from llmopt_jax.compress.recipe import from_recipe
    from llmopt_jax.data.text import calibration_windows, check_calibration_text, load_texts, stdlib_docstrings_text
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.eval.perplexity import evaluate_perplexity
    from llmopt_jax.infer.roofline import tree_bytes
    from llmopt_jax.io.gguf_write import TENSOR_TYPES
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.jsonio import write_json

    workdir = cli.prepare_workdir(config, workdir)
    step = compression_step(config)
    if step is not None:
        from_recipe([step])  # validates before the model loads
    if config.embedding_bits and (config.method == "smoothquant" or not 2 <= config.embedding_bits <= 8):
        raise ConfigError(f"embedding_bits={config.embedding_bits}: use 0 (float) or 2..8, and not with smoothquant")
    if config.save.endswith(".gguf") and config.save_type not in TENSOR_TYPES:
        raise ConfigError(f"save_type={config.save_type!r}; choose one of {', '.join(TENSOR_TYPES)}")
    eval_text = load_texts(config.eval.text_file) if config.eval.text_file else stdlib_docstrings_text()
    check_calibration_text(config.calib.text_file, config.calib.sources)  # fails before the model loads

    model = load_pretrained(config.model)
    tok = model.require_tokenizer()
    for key in ("calib", "eval"):
        if not 2 <= config[key].seq_len <= model.cfg.max_seq_len:
            raise ConfigError(f"{key}.seq_len={config[key].seq_len} must be in [2, {model.cfg.max_seq_len}] "
                              "(the model's context)")
    calib = None
    if config.method != "dense":
        calib = calibration_windows(tok, config.calib.text_file, config.calib.sources, config.calib.num_samples,
                                    config.calib.seq_len, config.calib.seed)
    # Quantized kernels stay packed in `params`: the evaluation below runs from the packed weights.
    if config.method == "smoothquant":
        graphdef, params, pure, report = smoothquant_w8a8(model, calib, config.smoothquant_alpha,
                                                          config.calib.batch_size, config.progress)
    else:
        graphdef, params, pure, report = compress_model(model, calib, step, config.calib.batch_size, config.progress,
                                                        embedding_bits=config.embedding_bits,
                                                        compute_dtype=config.calib.compute_dtype)
    seconds, layers = report.get("seconds", 0.0), report.get("layers", [])
    result = evaluate_perplexity(graphdef, params, np.asarray(tok.encode(eval_text)), config.eval.seq_len,
                                 config.eval.batch_size, max_windows=config.eval.max_windows, progress=config.progress)

    model_bytes = tree_bytes(params)
    results = {
        "method": config.method,
        "pattern": config.pattern or "unstructured",
        "target_sparsity": 0.0 if step is None or "sparsity" not in step
        else parse_pattern(config.sparsity, config.pattern).sparsity,
        "perplexity": result.perplexity,
        "num_eval_tokens": result.num_eval_tokens,
        "sparsity": measured_sparsity(pure),
        "bits": int(config.bits),
        "group_size": int(config.group_size),
        "act_order": bool(config.act_order),
        "bits_per_weight": block_bits_per_weight(nnx.to_pure_dict(params)),
        "embedding_bits": int(config.embedding_bits),
        "model_bytes": model_bytes,
        "seconds_compress": seconds,
        **{key: report[key] for key in ("seconds_statistics", "seconds_solve", "seconds_propagate", "seconds_other")
           if key in report},
        "calib_compute_dtype": config.calib.compute_dtype,
        "seconds_eval": result.seconds,
        "calib_windows": 0 if calib is None else int(config.calib.num_samples),
        "calib_seq_len": int(config.calib.seq_len),
        "calib_text": config.calib.text_file or config.calib.sources,
        "model": model.path,
    }
    write_json(f"{workdir}/layers.json", [dataclasses.asdict(r) for r in layers])
    if config.save:
        save_model(config.save, model, pure, config.save_type, report.get("quantized"))
        results["saved_to"] = os.path.abspath(config.save)
    write_json(f"{workdir}/results.json", results)
    print(f"{config.method} ({results['pattern']}, {results['bits_per_weight']:.2f} bits/weight): perplexity="
          f"{result.perplexity:.3f} over {result.num_eval_tokens:,} tokens, sparsity={results['sparsity']:.4f}, "
          f"model {model_bytes / 2**20:.1f} MiB, compress {seconds:.1f} s")


QUANTIZING = ("rtn", "gptq", "sparsegpt_gptq", "smoothquant")


def compression_step(config) -> dict | None:
    """The recipe step ``config`` describes (None for ``dense``); raises ``ConfigError`` on a bad combination."""
    from llmopt_jax.errors import ConfigError

    methods = ("dense", "magnitude", "wanda", "sparsegpt") + QUANTIZING
    if config.method not in methods:
        raise ConfigError(f"unknown method {config.method!r}; choose one of {', '.join(methods)}")
    if config.method not in QUANTIZING and config.bits != 32:
        raise ConfigError(f"bits={config.bits} needs a quantizing method ({', '.join(QUANTIZING)}); "
                          f"{config.method} keeps 32-bit weights")
    if config.method in QUANTIZING and config.bits == 32:
        raise ConfigError(f"method {config.method} quantizes: set --config.bits to 2..8")
    if config.method == "smoothquant" and config.bits != 8:
        raise ConfigError(f"smoothquant is W8A8: bits must be 8, got {config.bits}")
    if config.method in ("dense", "smoothquant"):
        return None
    prune = {"sparsity": config.sparsity, "pattern": config.pattern}
    grid = {"bits": config.bits, "group_size": config.group_size}
    solver = {"blocksize": config.sparsegpt.blocksize, "damp_fraction": config.sparsegpt.damp_fraction}
    if config.method == "rtn":
        return {"name": "rtn", **grid, "symmetric": config.symmetric, "zero_point": config.zero_point}
    if config.method == "gptq":
        return {"name": "gptq", **grid, "symmetric": config.symmetric, "act_order": config.act_order,
                "static_groups": config.static_groups, "zero_point": config.zero_point, **solver}
    if config.method == "sparsegpt_gptq":  # one pass; a pruned zero is its group's zero-point code
        if config.zero_point != "int":
            raise ConfigError("sparsegpt_gptq needs zero_point='int' (0 must be a level of the grid)")
        return {"name": "sparsegpt", **prune, **solver, **grid, "symmetric": config.symmetric}
    step = {"name": config.method, **prune}
    return {**step, **solver} if config.method == "sparsegpt" else step


def save_model(path, model, pure, tensor_type="F32", quantized=None):
    """A GGUF in ``tensor_type`` when ``path`` ends in .gguf (tokenizer copied from a GGUF source; Q8_0/Q4_0/Q4_1 keep
    the codes of weights quantized on their own grid), else a float32 safetensors directory."""
    if path.endswith(".gguf"):
        from llmopt_jax.io.gguf import read_gguf
        from llmopt_jax.io.gguf_write import write_gguf

        source = read_gguf(model.path) if model.path.endswith(".gguf") else None
        write_gguf(path, model.cfg, pure, tensor_type=tensor_type, metadata_from=source, quantized=quantized)
    else:
        from llmopt_jax.io.safetensors import write_hf_checkpoint

        write_hf_checkpoint(path, model.cfg, pure, tokenizer=model.tokenizer)


if __name__ == "__main__":
    cli.run(main)
