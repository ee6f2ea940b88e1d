"""Case study 2: QMoE sub-1-bit compression of a mixture-of-experts model made from SmolLM2.

    python -m experiments.qmoe_case_study --config=configs/qmoe_case_study.py:default \
        --config.eval.close_text_file=A --config.eval.far_text_file=B --workdir=runs/qmoe

Rows and settings: ``configs/qmoe_case_study.py``. Writes to WORKDIR: ``rows.jsonl`` (finished rows; a killed run
resumes), ``moe_model/`` (the MoEfied model, reused on resume), ``results.json`` (``rows``: ``label``,
``bits_per_expert_param``, ``ppl_close``, ``ppl_far``, ``model_bytes``, ``zero_fraction``, ``seconds_compress``,
``decode_tokens_per_s``, ...; ``switch_scale``: the SwitchTransformer table), ``table.md``, ``switch_scale.md`` and
``perplexity_vs_bits.png``.
"""

from llmopt_jax import cli

TERNARY = {"rtn_ternary": "rtn", "gptq_ternary": "gptq"}
TWO_BIT = {"rtn_2bit": "rtn", "gptq_2bit": "gptq"}


def parse_rows(spec: str) -> list[str]:
    """The rows named in ``spec`` (comma-separated), checked against the config's ``ROWS``."""
    from llmopt_jax.config_checks import parse_list
    from llmopt_jax.errors import ConfigError

    known = ("dense", "moe", *TERNARY, *TWO_BIT)
    rows = parse_list(spec, "rows", str)
    bad = [r for r in rows if r not in known]
    if bad or not rows:
        raise ConfigError(f"rows: unknown {bad or 'empty list'}; choose from {list(known)}")
    return rows


def check_config(config) -> None:
    """Every setting that can be wrong, before anything slow happens."""
    import os

    from llmopt_jax.compress.codec import CODECS
    from llmopt_jax.errors import ConfigError

    parse_rows(config.rows)
    m = config.moe
    if int(m.num_experts) < 1 or not 1 <= int(m.top_k) <= int(m.num_experts):
        raise ConfigError(f"moe.top_k={m.top_k} must be in 1..moe.num_experts={m.num_experts} (num_experts >= 1)")
    if config.qmoe.codec not in CODECS:
        raise ConfigError(f"qmoe.codec must be one of {CODECS}, got {config.qmoe.codec!r}")
    if not 0.0 < float(config.qmoe.damp_fraction):
        raise ConfigError(f"qmoe.damp_fraction must be > 0, got {config.qmoe.damp_fraction}")
    if int(config.qmoe.block_rows) < 0 or int(config.qmoe.max_tokens_per_expert) < 0:
        raise ConfigError("qmoe.block_rows and qmoe.max_tokens_per_expert must be >= 0")
    if int(config.qmoe.stream_symbols) < 1:
        raise ConfigError(f"qmoe.stream_symbols must be >= 1, got {config.qmoe.stream_symbols}")
    if int(config.num_layers) < 0:
        raise ConfigError(f"num_layers must be >= 0 (0 = all), got {config.num_layers}")
    if config.moe.model and not os.path.isdir(config.moe.model):
        raise ConfigError(f"moe.model={config.moe.model!r} is not a directory (a MoE model written by "
                          "experiments.moefy, or empty to MoEfy here)")


def build_moe(config, dense, calib, workdir: str):
    """The MoE model: ``moe.model`` when given, else WORKDIR/moe_model when an earlier run left it, else MoEfied
    from ``dense`` now (and saved there). Returns ``(PretrainedModel, seconds spent MoEfying, source)``."""
    import os
    import time

    from flax import nnx

    from llmopt_jax.compress.moefy import moefy, with_top_k
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.io.load import PretrainedModel, load_pretrained
    from llmopt_jax.io.safetensors import write_hf_checkpoint
    from llmopt_jax.parallel.sharded_init import load_params

    path = config.moe.model or os.path.join(workdir, "moe_model")
    if os.path.isdir(path):
        model = load_pretrained(path)
        if model.cfg.num_experts != int(config.moe.num_experts) or model.cfg.num_layers != dense.cfg.num_layers:
            raise ConfigError(f"{path}: a MoE model with {model.cfg.num_experts} experts and {model.cfg.num_layers} "
                              f"layers, not the {config.moe.num_experts} x {dense.cfg.num_layers} configured")
        cfg = with_top_k(model.cfg, int(config.moe.top_k))
        graphdef, params = load_params(cfg, nnx.to_pure_dict(model.params))
        return PretrainedModel(cfg, graphdef, params, dense.tokenizer, path), 0.0, path
    t0 = time.perf_counter()
    cfg, pure, _ = moefy(dense.cfg, nnx.to_pure_dict(dense.params), calib, int(config.moe.num_experts),
                         int(config.moe.top_k), batch_size=int(config.calib.batch_size),
                         ridge=float(config.moe.router_ridge), iterations=int(config.moe.cluster_iterations),
                         seed=int(config.calib.seed), progress=config.progress)
    seconds = time.perf_counter() - t0
    write_hf_checkpoint(path, cfg, pure, tokenizer=dense.tokenizer)
    graphdef, params = load_params(cfg, pure)
    return PretrainedModel(cfg, graphdef, params, dense.tokenizer, path), seconds, "moefied here"


def compress_experts(config, moe, calib, label: str):
    """QMoE on ``moe``'s experts for row ``label``: ``(model running from the packed experts, numbers)``."""
    import time

    import numpy as np
    from flax import nnx

    from llmopt_jax.compress.codec import CODECS, bits_per_param, ternary_stats
    from llmopt_jax.compress.packed import packed_model
    from llmopt_jax.compress.qmoe import expert_storage, pack_experts, quantize_experts
    from llmopt_jax.compress.quantize import QuantGrid
    from llmopt_jax.io.load import PretrainedModel

    ternary = label in TERNARY
    method = TERNARY.get(label) or TWO_BIT[label]
    grid = QuantGrid(2, ternary=ternary)
    q = config.qmoe
    t0 = time.perf_counter()
    deq, report = quantize_experts(moe.cfg, nnx.to_pure_dict(moe.params), calib if method == "gptq" else None, grid,
                                   method=method, batch_size=int(config.calib.batch_size), blocksize=int(q.blocksize),
                                   damp_fraction=float(q.damp_fraction),
                                   max_tokens_per_expert=int(q.max_tokens_per_expert), progress=config.progress)
    seconds_quantize = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = pack_experts(moe.cfg, deq, report, codec=q.codec, block_rows=int(q.block_rows),
                          stream_symbols=int(q.stream_symbols))
    seconds_encode = time.perf_counter() - t0
    graphdef, params = packed_model(moe.cfg, packed)
    model = PretrainedModel(moe.cfg, graphdef, params, moe.tokenizer, f"{moe.path} ({label})")
    records = [layer["moe"][name]["kernel"] for layer in report["quantized"] if layer for name in layer["moe"]]
    codes = [np.asarray(r.codes) for r in records]
    numbers = {**expert_storage(packed), "seconds_compress": seconds_quantize + seconds_encode,
               "seconds_quantize": seconds_quantize, "seconds_encode": seconds_encode,
               "seconds_solve": report["seconds_solve"], "rtn_fallback_experts": report["rtn_fallback_experts"],
               "grid": grid.describe(), "method": method}
    if report["tokens_per_expert"]:
        tokens = np.stack(report["tokens_per_expert"])
        numbers["calib_tokens_per_expert"] = {"min": int(tokens.min()), "mean": float(tokens.mean()),
                                              "max": int(tokens.max())}
    if ternary:
        stats = ternary_stats(codes)
        numbers.update(zero_fraction=stats["zero_fraction"], entropy_bits=stats["entropy_bits"], codec=q.codec)
        # The other codec on the same codes, for the rate comparison (bytes only; the model runs from q.codec's).
        other = next(c for c in CODECS if c != q.codec)
        alt = bits_per_param(pack_experts(moe.cfg, deq, report, codec=other, block_rows=int(q.block_rows),
                                          stream_symbols=int(q.stream_symbols))["layers"])
        numbers["other_codec"] = {"codec": other, "bits_per_expert_param": alt["bits_per_param"],
                                  "bits_per_expert_param_without_dictionary": alt["bits_per_param_without_dictionary"]}
    else:
        numbers["zero_fraction"] = zero_fraction(mlp_kernels(deq, moe.cfg))
    return model, numbers


def mlp_kernels(pure: dict, cfg) -> list:
    """Every layer's float MLP kernels as NumPy: the expert stacks ``[E, in, out]`` of a MoE layer, the dense
    ``gate/up/down`` kernels otherwise."""
    import numpy as np

    from llmopt_jax.compress.qmoe import EXPERT_LINEARS
    from llmopt_jax.models.layout import layer_params

    blocks = [layer_params(pure["layers"], i, cfg.scan_layers) for i in range(cfg.num_layers)]
    return [np.asarray((b["moe"] if "moe" in b else b)[n]["kernel"]) for b in blocks for n in EXPERT_LINEARS]


def zero_fraction(kernels: list) -> float:
    """Fraction of exact zeros over ``kernels``."""
    return float(sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels))


def float_row(model, label: str) -> dict:
    """Bytes and bits of the MLP weights as ``model`` holds them (float): experts for a MoE, the MLP if dense."""
    from flax import nnx

    kernels = mlp_kernels(nnx.to_pure_dict(model.params), model.cfg)
    nbytes, params = sum(k.nbytes for k in kernels), sum(k.size for k in kernels)
    return {"expert_bytes": int(nbytes), "expert_params": int(params), "bits_per_expert_param": 8.0 * nbytes / params,
            "zero_fraction": zero_fraction(kernels), "seconds_compress": 0.0, "method": label}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| row | bits / expert param (unpadded) | expert MiB | model MiB | zeros | ppl close | ppl far | "
             "decode tok/s | compress s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        decode = f"{r['decode_tokens_per_s']:.1f}" if r.get("decode_tokens_per_s") else ""
        unpadded = r.get("bits_per_expert_param_unpadded", r["bits_per_expert_param"])
        bits = f"{r['bits_per_expert_param']:.3f}" + (f" ({unpadded:.3f})" if unpadded < r["bits_per_expert_param"] else "")
        lines.append(f"| {r['label']} | {bits} | {r['expert_bytes'] / 2**20:.2f} | "
                     f"{r['model_bytes'] / 2**20:.1f} | {r['zero_fraction']:.3f} | {r['ppl_close']:.2f} | "
                     f"{r['ppl_far']:.2f} | {decode} | {r['seconds_compress']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmopt_jax.compress.study import finish_text_panels

    colors = {"dense": "black", "moe": "gray", "rtn_ternary": "tab:red", "gptq_ternary": "tab:blue",
              "rtn_2bit": "tab:orange", "gptq_2bit": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, text in zip(axes, ("close", "far")):
        for r in rows:
            ax.scatter(r["bits_per_expert_param"], r[f"ppl_{text}"], color=colors.get(r["label"], "k"),
                       marker="*" if r["label"] in ("dense", "moe") else "o", s=50, label=r["label"])
    finish_text_panels(fig, axes, path, "bits per expert (MLP) parameter, from the bytes held")


def main(config, workdir):
    import os

    import jax

    from llmopt_jax.compress.moe_scale import SWITCH_SPECS, scale_markdown, scale_table, time_expert_solve
    from llmopt_jax.compress.study import (ResumableRows, check_case_study_inputs, decode_tokens_per_s,
                                           open_case_study, require_finished_rows)
    from llmopt_jax.infer.roofline import tree_bytes
    from llmopt_jax.jsonio import write_json
    from llmopt_jax.models.layout import truncate_layers

    check_config(config)
    labels = parse_rows(config.rows)
    settings = {"model": config.model, "num_layers": int(config.num_layers), "moe": config.moe.to_dict(),
                "qmoe": config.qmoe.to_dict(),
                "calib": {k: v for k, v in config.calib.to_dict().items() if k != "batch_size"},
                "eval": {k: v for k, v in config.eval.to_dict().items() if k != "batch_size"}}
    key = lambda r: r["label"]  # noqa: E731
    if config.report_only:
        require_finished_rows(ResumableRows(os.path.join(workdir, "rows.jsonl"), key, settings),
                              [{"label": x} for x in labels], workdir)
    else:
        texts = check_case_study_inputs(config)
    workdir = cli.prepare_workdir(config, workdir)
    if config.report_only:
        finished = ResumableRows(os.path.join(workdir, "rows.jsonl"), key, settings)
    else:
        finished, dense, texts, calib = open_case_study(config, workdir, key, settings, texts)
        if int(config.num_layers):
            from flax import nnx

            from llmopt_jax.io.load import PretrainedModel
            from llmopt_jax.parallel.sharded_init import load_params

            cfg, pure = truncate_layers(dense.cfg, nnx.to_pure_dict(dense.params), int(config.num_layers))
            dense = PretrainedModel(cfg, *load_params(cfg, pure), dense.tokenizer, dense.path)
        prompt = list(texts["close"][0][:32])
        moe = None

    for label in labels:
        if config.report_only or finished.get({"label": label}) is not None:
            continue
        extra = {}
        if label == "dense":
            model, numbers = dense, float_row(dense, label)
        else:
            if moe is None:
                moe, seconds_moefy, source = build_moe(config, dense, calib, workdir)
            extra = {"seconds_moefy": seconds_moefy, "moe_source": source, "top_k": moe.cfg.moe_top_k,
                     "num_experts": moe.cfg.num_experts}
            model, numbers = (moe, float_row(moe, label)) if label == "moe" else compress_experts(config, moe, calib,
                                                                                                   label)
        scores = evaluate_model_scores(model, texts, config)
        decode = (decode_tokens_per_s(model, prompt, int(config.decode_tokens), int(config.decode_repeats))
                  if int(config.decode_tokens) > 0 else 0.0)
        row = finished.add({"label": label, **numbers, **scores, **extra, "model_bytes": tree_bytes(model.params),
                            "decode_tokens_per_s": decode})
        print(f"{label:13s} {row['bits_per_expert_param']:7.3f} bits/expert param  close {row['ppl_close']:10.2f}  "
              f"far {row['ppl_far']:10.2f}  zeros {row['zero_fraction']:.3f}  ({row['seconds_compress']:.0f} s)",
              flush=True)
        del model

    rows = [finished.get({"label": x}) for x in labels if finished.get({"label": x}) is not None]
    results = {"rows": rows, "model": config.model, "num_layers": int(config.num_layers),
               "calib_windows": config.calib.num_samples, "calib_seq_len": config.calib.seq_len,
               "calib_text": config.calib.text_file or config.calib.sources,
               "close_text": config.eval.close_text_file or "stdlib docstrings",
               "far_text": config.eval.far_text_file or "Python LICENSE.txt", "backend": jax.default_backend()}
    ternary = [r for r in rows if r["label"] in ("gptq_ternary", "rtn_ternary")]
    if ternary:  # at GPTQ's rate when that row ran (QMoE's method), else RTN's
        bits = next((r for r in ternary if r["label"] == "gptq_ternary"), ternary[0])["bits_per_expert_param"]
        seconds = None
        if config.scale.measure_solve and not config.report_only:
            seconds = {name: time_expert_solve(spec) for name, spec in SWITCH_SPECS.items()}
        scale = scale_table(bits, seconds_per_expert=seconds)
        results["switch_scale"] = scale
        results["switch_scale_device"] = f"{jax.default_backend()}, {os.cpu_count()} cores" if seconds else ""
        with open(os.path.join(workdir, "switch_scale.md"), "w") as f:
            f.write(scale_markdown(scale, results["switch_scale_device"]))
    write_json(os.path.join(workdir, "results.json"), results)
    table = markdown_table(rows)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(workdir, "perplexity_vs_bits.png"))
    print(table)
    if ternary:
        print(scale_markdown(results["switch_scale"], results["switch_scale_device"]))


def evaluate_model_scores(model, texts, config) -> dict:
    """``ppl_close``/``ppl_far`` and token counts of ``model`` (run as it is held: packed experts decode)."""
    from llmopt_jax.eval.perplexity import evaluate_perplexity

    out = {}
    for name, (tokens, max_windows) in texts.items():
        r = evaluate_perplexity(model, tokens, config.eval.seq_len, config.eval.batch_size, max_windows=max_windows,
                                progress=False)
        out[f"ppl_{name}"] = r.perplexity
        out[f"num_eval_tokens_{name}"] = r.num_eval_tokens
        out[f"seconds_eval_{name}"] = r.seconds
    return out


if __name__ == "__main__":
    cli.run(main)
