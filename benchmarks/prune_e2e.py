"""End-to-end rows of the pruning benchmark: the whole model pruned with SparseGPT by our engine and by the PyTorch
port of the reference sequential procedure, on the same calibration windows, each timed by phase and scored by the
perplexity of the pruned model."""

from __future__ import annotations

PHASES = ("statistics", "solve", "propagate", "other")  # the engine report's ``seconds_{phase}`` split


def end_to_end_rows(config, with_torch: bool) -> dict:
    """Prunes the whole model with our engine (each ``e2e_dtypes``) and with the PyTorch port; flat result keys
    ``e2e_{engine}_seconds``, ``e2e_{engine}_seconds_{phase}``, ``e2e_{engine}_perplexity``,
    ``e2e_{engine}_eval_seconds`` and, with torch, ``speedup_e2e_{dtype}``."""
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
        print(f"end to end {engine}: {out[f'e2e_{engine}_seconds']:.1f} s ("
              + ", ".join(f"{p} {out[f'e2e_{engine}_seconds_{p}']:.1f}" for p in PHASES)
              + f"), perplexity {result.perplexity:.3f}", flush=True)

    for dtype in e2e_dtypes(config):
        transform = sparsegpt(config.sparsity, pattern, config.blocksize, config.damp_fraction)
        new_pure, report = compress_sequentially(cfg, pure, windows, transform, batch_size=config.calib.batch_size,
                                                 progress=config.progress, compute_dtype=dtype)
        out[f"e2e_ours_{dtype}_seconds"] = report["seconds"]
        out.update({f"e2e_ours_{dtype}_seconds_{p}": report[f"seconds_{p}"] for p in PHASES})
        evaluate(f"ours_{dtype}", new_pure)
    if with_torch:
        import torch

        from benchmarks.baselines.sparsegpt_torch_model import prune_model_torch

        threads = config.e2e_torch_threads or torch.get_num_threads()
        new_pure, report = prune_model_torch(cfg, pure, windows, sparsity=config.sparsity, n=n, m=m,
                                             blocksize=config.blocksize, percdamp=config.damp_fraction,
                                             batch_size=config.e2e_torch_batch_size, threads=threads)
        out.update(e2e_torch_seconds=report["seconds"], e2e_torch_threads=threads,
                   e2e_torch_seconds_statistics=report["seconds_stats"],
                   e2e_torch_seconds_solve=report["seconds_solve"],
                   e2e_torch_seconds_propagate=report["seconds_forward"])
        out["e2e_torch_seconds_other"] = report["seconds"] - sum(out[f"e2e_torch_seconds_{p}"] for p in PHASES[:3])
        evaluate("torch", new_pure)
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
