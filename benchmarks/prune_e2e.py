"""End-to-end rows of the pruning benchmark: the whole model pruned with SparseGPT by our engine and by the PyTorch
port of the reference sequential procedure, on the same calibration windows, each timed by phase and scored by the
perplexity of the pruned model."""

from __future__ import annotations

import functools

PHASES = ("statistics", "solve", "propagate", "other")  # the engine report's ``seconds_{phase}`` split


def end_to_end_rows(config, with_torch: bool) -> dict:
    """Prunes the whole model with our engine (each ``e2e_dtypes``) and with the PyTorch port, ``e2e_repeats``
    times interleaved; flat result keys ``e2e_{engine}_seconds`` (the median run) with that run's
    ``e2e_{engine}_seconds_{phase}``, ``e2e_{engine}_seconds_runs`` (every run), ``e2e_{engine}_perplexity``,
    ``e2e_{engine}_eval_seconds`` (the first run's model) and, with torch, ``speedup_e2e_{dtype}`` (medians)."""
    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.prune_rows import first_layers
    from llmopt_jax.compress.calibrate import compress_sequentially
    from llmopt_jax.compress.recipe import sparsegpt
    from llmopt_jax.data.text import calibration_windows, stdlib_docstrings_text
    from llmopt_jax.eval.perplexity import evaluate_perplexity
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.parallel.sharded_init import load_params

    model = load_pretrained(config.model)
    tok = model.require_tokenizer()
    cfg, pure = first_layers(model.cfg, jax.tree.map(np.asarray, nnx.to_pure_dict(model.params)),
                             config.model_layers)
    windows = calibration_windows(tok, "", config.calib.sources, config.calib.num_samples, config.calib.seq_len,
                                  config.calib.seed)
    eval_tokens = np.asarray(tok.encode(stdlib_docstrings_text()))
    pattern = config.model_pattern
    n, m = (int(v) for v in pattern.split(":")) if pattern else (0, 0)
    del model
    out: dict = {}

    def evaluate(engine, new_pure):
        result = evaluate_perplexity(*load_params(cfg, new_pure), eval_tokens, config.eval_seq_len,
                                     max_windows=config.e2e_eval_windows, progress=False)
        out[f"e2e_{engine}_perplexity"] = result.perplexity
        out[f"e2e_{engine}_eval_seconds"] = result.seconds

    def ours(dtype):
        jax.clear_caches()  # each run compiles as a fresh process would (from the persistent cache, if enabled)
        transform = sparsegpt(config.sparsity, pattern, config.blocksize, config.damp_fraction)
        new_pure, report = compress_sequentially(cfg, pure, windows, transform, batch_size=config.calib.batch_size,
                                                 progress=config.progress, compute_dtype=dtype)
        return new_pure, {"seconds": report["seconds"], **{p: report[f"seconds_{p}"] for p in PHASES}}

    def torch_port():
        from benchmarks.baselines.sparsegpt_torch_model import prune_model_torch

        new_pure, report = prune_model_torch(cfg, pure, windows, sparsity=config.sparsity, n=n, m=m,
                                             blocksize=config.blocksize, percdamp=config.damp_fraction,
                                             batch_size=config.e2e_torch_batch_size, threads=threads)
        phases = {"statistics": report["seconds_stats"], "solve": report["seconds_solve"],
                  "propagate": report["seconds_forward"]}
        return new_pure, {"seconds": report["seconds"], **phases,
                          "other": report["seconds"] - sum(phases.values())}

    engines = {f"ours_{dtype}": functools.partial(ours, dtype) for dtype in e2e_dtypes(config)}
    if with_torch:
        import torch

        threads = config.e2e_torch_threads or torch.get_num_threads()
        engines["torch"] = torch_port
        out["e2e_torch_threads"] = threads
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    repeats = config.e2e_repeats
    for repeat in range(repeats):  # interleaved, so that a shared CPU slows every engine alike
        for engine, run in engines.items():
            new_pure, timing = run()
            runs[engine].append(timing)
            if repeat == 0:  # the pruned model is the same every run
                evaluate(engine, new_pure)
            print(f"end to end {engine} (run {repeat + 1}/{repeats}): {timing['seconds']:.1f} s ("
                  + ", ".join(f"{p} {timing[p]:.1f}" for p in PHASES)
                  + f"), perplexity {out[f'e2e_{engine}_perplexity']:.3f}", flush=True)
    for engine, timings in runs.items():
        median_run = sorted(timings, key=lambda t: t["seconds"])[(len(timings) - 1) // 2]  # phases of that run
        out[f"e2e_{engine}_seconds"] = median_run["seconds"]
        out.update({f"e2e_{engine}_seconds_{p}": median_run[p] for p in PHASES})
        out[f"e2e_{engine}_seconds_runs"] = [t["seconds"] for t in timings]
    out["e2e_repeats"] = repeats
    if with_torch:
        for dtype in e2e_dtypes(config):
            out[f"speedup_e2e_{dtype}"] = out["e2e_torch_seconds"] / out[f"e2e_ours_{dtype}_seconds"]
    return out


def e2e_dtypes(config) -> list[str]:
    """The calibration matmul dtypes of our engine's end-to-end rows (``config.e2e_dtypes``, comma-separated)."""
    return [d for d in config.e2e_dtypes.split(",") if d]


def summary_rows(e2e: dict, dtypes: list[str]) -> list[dict]:
    """The end-to-end totals as rows of the solver-time plot (one per dtype of ours, with torch's total)."""
    return [dict(kind="e2e", label=f"end to end\nours {dtype}", key=f"e2e_{dtype}",
                 ours_seconds=e2e[f"e2e_ours_{dtype}_seconds"], torch_seconds=e2e.get("e2e_torch_seconds"),
                 speedup=e2e.get(f"speedup_e2e_{dtype}")) for dtype in dtypes]
