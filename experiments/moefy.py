"""Make a mixture-of-experts model out of a dense one by MoEfication, and measure it.

    python -m experiments.moefy --config=configs/moefy.py:smollm2 --config.num_experts=8 --config.top_k=2 \
        --config.eval.text_file=my.txt --workdir=runs/moefy_k2

Splits each SwiGLU MLP into ``num_experts`` balanced clusters of co-activating hidden units, fits a linear router
per layer to predict the experts with the largest output norms (``llmopt_jax/compress/moefy.py``), and writes
WORKDIR/model (and, with ``save_gguf``, WORKDIR/model.gguf with llama.cpp's ffn_*_exps tensors) (a safetensors directory in Mixtral's layout, ``num_local_experts`` in config.json, loadable by
``experiments.perplexity --config.model=WORKDIR/model``). results.json: perplexity (the MoE model at top_k),
dense_perplexity (the dense model on the same windows), num_eval_tokens, mlp_flops_fraction (MLP matmul FLOPs per
token relative to dense, router included), plus per-layer router accuracy, the sweep over eval.sweep_top_k and
timings.
"""

from llmopt_jax import cli


def main(config, workdir):
    import dataclasses
    import os
    import time

    import numpy as np
    from flax import nnx

    from llmopt_jax.compress.moefy import mlp_flops_fraction, moefy, with_top_k
    from llmopt_jax.config_checks import check_context, check_eval_settings, check_text_length, parse_list
    from llmopt_jax.data.text import calibration_windows, check_calibration_text, load_texts, stdlib_docstrings_text
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.eval.perplexity import check_eval_tokens, evaluate_perplexity
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.io.safetensors import write_hf_checkpoint
    from llmopt_jax.jsonio import write_json
    from llmopt_jax.models.layout import truncate_layers
    from llmopt_jax.parallel.mesh import create_mesh
    from llmopt_jax.parallel.rules import normalize_rules
    from llmopt_jax.parallel.sharded_init import load_params

    num_experts, top_k = int(config.num_experts), int(config.top_k)
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k={top_k} must be in 1..num_experts={num_experts} (num_experts >= 1)")
    sweep = parse_list(config.eval.sweep_top_k, "eval.sweep_top_k", int, positive=True) if config.eval.sweep_top_k else []
    bad = [k for k in sweep if k > num_experts]
    if bad:
        raise ConfigError(f"eval.sweep_top_k: {bad} exceed num_experts={num_experts}")
    check_eval_settings(config.eval)
    what = f"evaluation text {config.eval.text_file}" if config.eval.text_file else "evaluation text"
    text = load_texts(config.eval.text_file) if config.eval.text_file else stdlib_docstrings_text()
    check_text_length(text, config.eval.seq_len, what)
    check_calibration_text(config.calib.text_file, config.calib.sources)
    workdir = cli.prepare_workdir(config, workdir)

    model = load_pretrained(config.model)
    tok = model.require_tokenizer()
    cfg, pure, source_path = model.cfg, nnx.to_pure_dict(model.params), str(model.path)
    if cfg.mlp_dim % num_experts:
        raise ConfigError(f"num_experts={num_experts} must divide the model's MLP width {cfg.mlp_dim}")
    if int(config.num_layers):
        cfg, pure = truncate_layers(cfg, pure, int(config.num_layers))
    for key in ("calib", "eval"):
        check_context(f"{key}.seq_len", config[key].seq_len, cfg.max_seq_len)
    tokens = np.asarray(tok.encode(text), np.int32)
    check_eval_tokens(tokens, config.eval.seq_len, what)
    windows = calibration_windows(tok, config.calib.text_file, config.calib.sources, config.calib.num_samples,
                                  config.calib.seq_len, config.calib.seed)

    t0 = time.perf_counter()
    moe_cfg, moe_pure, report = moefy(
        cfg, pure, windows, num_experts, top_k, batch_size=int(config.calib.batch_size),
        ridge=float(config.router_ridge), iterations=int(config.cluster_iterations), seed=int(config.calib.seed),
        progress=config.progress)
    seconds_moefy = time.perf_counter() - t0

    mesh = create_mesh(config.mesh)
    rules = normalize_rules(config.sharding_rules)

    def score(c, params):
        graphdef, state = load_params(c, params, mesh, rules)
        return evaluate_perplexity(graphdef, state, tokens, config.eval.seq_len, config.eval.batch_size,
                                   max_windows=config.eval.max_windows, mesh=mesh, rules=rules,
                                   progress=config.progress)

    dense = score(cfg, pure)
    del model
    moe = score(moe_cfg, moe_pure)
    rows = []
    for k in sweep:
        r = moe if k == top_k else score(with_top_k(moe_cfg, k), moe_pure)
        rows.append({"top_k": k, "perplexity": r.perplexity,
                     "mlp_flops_fraction": mlp_flops_fraction(with_top_k(moe_cfg, k))})

    model_dir = os.path.join(workdir, "model")
    write_hf_checkpoint(model_dir, moe_cfg, moe_pure, tokenizer=tok)
    results = {
        "perplexity": moe.perplexity,
        "dense_perplexity": dense.perplexity,
        "relative_difference": moe.perplexity / dense.perplexity - 1.0,
        "num_eval_tokens": moe.num_eval_tokens,
        "mlp_flops_fraction": mlp_flops_fraction(moe_cfg),
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_dim": moe_cfg.expert_dim,
        "num_layers": cfg.num_layers,
        "sweep": rows,
        "router_top1_accuracy_mean": float(np.mean(report.router_top1_accuracy)),
        "router_topk_recall_mean": float(np.mean(report.router_topk_recall)),
        "router_top1_accuracy": report.router_top1_accuracy,
        "router_topk_recall": report.router_topk_recall,
        "cluster_similarity": report.cluster_similarity,
        "num_calibration_tokens": report.num_calibration_tokens,
        "seconds_moefy": seconds_moefy,
        "seconds_eval_dense": dense.seconds,
        "seconds_eval_moe": moe.seconds,
        "model_dir": model_dir,
        "model": config.model,
        "moe_config": dataclasses.asdict(moe_cfg),
    }
    if config.save_gguf:  # llama.cpp's MoE names; the dense GGUF's tokenizer metadata is copied along
        from llmopt_jax.io.gguf import read_gguf
        from llmopt_jax.io.gguf_write import write_gguf

        results["gguf"] = os.path.join(workdir, "model.gguf")
        source = read_gguf(source_path) if source_path.endswith(".gguf") else None
        write_gguf(results["gguf"], moe_cfg, moe_pure, tensor_type="F32", metadata_from=source)
    write_json(f"{workdir}/results.json", results)
    print(f"MoE top-{top_k}/{num_experts}: perplexity={moe.perplexity:.4f} (dense {dense.perplexity:.4f}, "
          f"{results['relative_difference']:+.2e}) over {moe.num_eval_tokens:,} tokens; MLP FLOPs "
          f"{results['mlp_flops_fraction']:.3f} of dense; router top-1 accuracy "
          f"{results['router_top1_accuracy_mean']:.3f}; model in {model_dir}")
    for row in rows:
        print(f"  top-{row['top_k']}: perplexity={row['perplexity']:.4f} (MLP FLOPs {row['mlp_flops_fraction']:.3f})")


if __name__ == "__main__":
    cli.run(main)
