"""Perplexity of a pretrained model on a text file (protocol in design.md).

    python -m experiments.perplexity --config=configs/perplexity.py:smollm2 \
        --config.eval.text_file=my.txt --workdir=runs/ppl

Writes WORKDIR/config.json and results.json: perplexity, num_eval_tokens (scored tokens), seconds (scoring
wall time, compilation included), plus nll_sum, num_windows, tokens_per_s, model and text sizes.
"""

from llmopt_jax import cli


def main(config, workdir):
    import time

    import numpy as np

    from llmopt_jax.config_checks import check_context, check_eval_settings, check_text_length
    from llmopt_jax.data.text import load_texts
    from llmopt_jax.eval.perplexity import check_eval_tokens, evaluate_perplexity
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.jsonio import write_json
    from llmopt_jax.parallel.mesh import create_mesh, describe
    from llmopt_jax.parallel.rules import normalize_rules

    # A bad setting, a missing file or a text shorter than one window fails before the workdir and the model.
    check_eval_settings(config.eval)
    what = f"evaluation text {config.eval.text_file}" if config.eval.text_file else "evaluation text"
    text = load_texts(config.eval.text_file or None)
    check_text_length(text, config.eval.seq_len, what)
    workdir = cli.prepare_workdir(config, workdir)
    rules = normalize_rules(config.sharding_rules)
    mesh = create_mesh(config.mesh)
    t0 = time.perf_counter()
    model = load_pretrained(config.model, mesh=mesh, rules=rules, dtype=config.dtype, param_dtype=config.dtype)
    load_seconds = time.perf_counter() - t0
    check_context("eval.seq_len", config.eval.seq_len, model.cfg.max_seq_len)  # before anything compiles
    tokens = np.asarray(model.require_tokenizer().encode(text), np.int32)
    check_eval_tokens(tokens, config.eval.seq_len, what)
    result = evaluate_perplexity(
        model.graphdef, model.params, tokens, config.eval.seq_len, config.eval.batch_size,
        max_windows=config.eval.max_windows, mesh=mesh, rules=rules, progress=config.progress,
    )
    results = {
        "perplexity": result.perplexity,
        "num_eval_tokens": result.num_eval_tokens,
        "seconds": result.seconds,
        "nll_sum": result.nll_sum,
        "num_windows": result.num_windows,
        "tokens_per_s": result.num_eval_tokens / result.seconds,
        "text_tokens": int(len(tokens)),
        "text_chars": len(text),
        "model": model.path,
        "dtype": config.dtype,
        "seconds_load": load_seconds,
        "mesh": describe(mesh),
    }
    write_json(f"{workdir}/results.json", results)
    print(
        f"perplexity={result.perplexity:.4f} over {result.num_eval_tokens:,} tokens ({result.num_windows} windows "
        f"of {config.eval.seq_len}) in {result.seconds:.1f} s"
    )


if __name__ == "__main__":
    cli.run(main)
