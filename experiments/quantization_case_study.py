"""Quantization case study: perplexity vs bits per weight on the real model (RTN, GPTQ, SparseGPT+GPTQ,
SmoothQuant W8A8, QAT), with the bytes the packed model holds and its decode speed.

    python -m experiments.quantization_case_study --config=configs/quantization_case_study.py:default \
        --workdir=runs/quant_case

Every finished row is appended to WORKDIR/rows.jsonl, so a killed run continues where it stopped. At the end:
results.json (rows + settings), table.md and perplexity_vs_bits.png (perplexity against bits per weight of the
block linear layers, one panel per text, with the Pareto front of each text). ``--config.report_only=True`` writes
them from the rows finished so far (and names the missing ones) without computing anything.
"""

from llmopt_jax import cli
from llmopt_jax.errors import ConfigError


def grid(config) -> list[dict]:
    """Rows in the order they run (see ``configs/quantization_case_study.py``): the cheap ones and the headline
    ones first, so a study stopped early still has them."""
    from llmopt_jax.config_checks import parse_list

    act_order = set(parse_list(config.act_order, "act_order", bits_group, item="BITS/GROUP setting",
                               example="4/-1,3/64"))
    methods = parse_list(config.methods, "methods", str, example="rtn,gptq")
    bits_list = parse_list(config.bits, "bits", int, example="3,4")
    groups = parse_list(config.group_sizes, "group_sizes", int, example="-1,64")
    rows = [row("float32"), row("bfloat16")]
    if "rtn" in methods:  # no calibration: seconds each
        rows += [row("rtn", bits, group) for bits in bits_list for group in groups]

    def gptq_rows(group_subset):
        out = []
        for group in group_subset:
            for bits in bits_list:
                out.append(row("gptq", bits, group))
                if (bits, group) in act_order:
                    out.append(row("gptq", bits, group, act_order=True))
        return out if "gptq" in methods else []

    extras = {"sparsegpt_gptq": row("sparsegpt_gptq", 4, -1), "smoothquant": row("smoothquant", 8, -1),
              "w8a8": row("w8a8", 8, -1),
              "qat": {**row("qat", config.qat_bits, -1), "model": config.qat_model},
              "gptq_int8_embedding": {**row("gptq", 4, 64, act_order=True), "embedding_bits": 8}}
    extra_names = parse_list(config.extras, "extras", str, example="sparsegpt_gptq,smoothquant")
    for name in extra_names:
        if name not in extras:
            raise ConfigError(f"unknown extra row {name!r}; choose from {sorted(extras)}")
    rows += gptq_rows(groups[:1]) + [extras[e] for e in extra_names] + gptq_rows(groups[1:])
    for (bits, group) in sorted(act_order):  # act-order settings outside the bits x groups grid
        if bits not in bits_list or group not in groups:
            rows.append(row("gptq", bits, group, act_order=True))
    return rows


def bits_group(item: str) -> tuple[int, int]:
    """``"3/64"`` -> ``(3, 64)`` (an ``act_order`` setting: bits and group size); ``ValueError`` otherwise."""
    bits, slash, group = item.partition("/")
    if not slash:
        raise ValueError(item)
    return int(bits), int(group)


def row(method: str, bits: int = 32, group_size: int = -1, act_order: bool = False) -> dict:
    return {"method": method, "bits": bits, "group_size": group_size, "act_order": act_order}


def row_key(r: dict) -> str:
    emb = f"/emb{r['embedding_bits']}" if r.get("embedding_bits") else ""
    return f"{r['method']}/{r['bits']}/{r['group_size']}/{'act' if r['act_order'] else 'seq'}{emb}"


def label(r: dict) -> str:
    if r["method"] in ("float32", "bfloat16"):
        return r["method"]
    layout = "per channel" if r["group_size"] <= 0 else f"g{r['group_size']}"
    extra = {"sparsegpt_gptq": " + 50% sparse", "smoothquant": " W8A8", "w8a8": " (no smoothing)",
             "qat": " (QAT, then RTN)"}.get(r["method"], "")
    name = {"sparsegpt_gptq": "SparseGPT+GPTQ", "smoothquant": "SmoothQuant", "w8a8": "W8A8",
            "qat": "QAT"}.get(r["method"], r["method"])
    emb = f" + int{r['embedding_bits']} embedding" if r.get("embedding_bits") else ""
    return f"{name} {r['bits']}-bit {layout}{' act-order' if r['act_order'] else ''}{extra}{emb}"


# Rows whose label is not a method of ``method_recipe``: the float32 model is ``dense``; the QAT row is RTN of the
# QAT-trained model at the bits it was trained for.
RECIPE_METHOD = {"float32": "dense", "qat": "rtn"}


def row_recipe(config, r: dict) -> list[dict]:
    """The compression recipe of row ``r``."""
    from llmopt_jax.compress.api import method_recipe

    return method_recipe(RECIPE_METHOD.get(r["method"], r["method"]), bits=r["bits"], group_size=r["group_size"],
                         act_order=r["act_order"], blocksize=config.sparsegpt.blocksize,
                         damp_fraction=config.sparsegpt.damp_fraction, embedding_bits=r.get("embedding_bits", 0),
                         smoothquant_alpha=config.smoothquant_alpha)


def storage_format(r: dict) -> str:
    """Rows with the same format hold the same arrays, so decode is timed once per format."""
    if r["method"] in ("smoothquant", "w8a8"):  # smoothing changes the values, not the arrays or the matmul
        return "w8a8"
    if r["method"] in ("float32", "bfloat16"):
        return r["method"]
    emb = f"/emb{r['embedding_bits']}" if r.get("embedding_bits") else ""
    return f"int{r['bits']}/{r['group_size']}/asym{emb}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| row | bits/weight | model MiB | ppl close | ppl far | decode tok/s | compress s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        decode = f"{r['decode_tokens_per_s']:.1f}" if r.get("decode_tokens_per_s") else ""
        lines.append(f"| {label(r)} | {r['bits_per_weight']:.2f} | {r['model_bytes'] / 2**20:.1f} | "
                     f"{r['perplexity_close']:.2f} | {r['perplexity_far']:.2f} | {decode} | "
                     f"{r['seconds_compress']:.1f} |")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (fewer bits and lower perplexity), sorted by bits."""
    front, best = [], float("inf")
    for bits, ppl in sorted(points):
        if ppl < best:
            front.append((bits, ppl))
            best = ppl
    return front


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmopt_jax.compress.study import finish_text_panels

    styles = {"rtn": ("tab:red", "o"), "gptq": ("tab:blue", "s"), "sparsegpt_gptq": ("tab:purple", "D"),
              "smoothquant": ("tab:orange", "^"), "w8a8": ("tab:brown", "v"), "qat": ("tab:green", "P"), "float32": ("black", "*"),
              "bfloat16": ("gray", "*")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, text in zip(axes, ("close", "far")):
        seen = set()
        for r in rows:
            color, marker = styles[r["method"]]
            name = r["method"] + (" act-order" if r["act_order"] else "")
            ax.scatter(r["bits_per_weight"], r[f"perplexity_{text}"], color=color, marker=marker,
                       facecolors="none" if r["act_order"] else color, label=None if name in seen else name, s=30)
            seen.add(name)
        front = pareto_front([(r["bits_per_weight"], r[f"perplexity_{text}"]) for r in rows])
        ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front")
    finish_text_panels(fig, axes, path, "stored bits per weight of the block linear layers (scales included)",
                       legend_size=7)


def evaluate_row(config, model, calib, texts, r: dict):
    """Compresses per row ``r`` and evaluates; returns ``(numbers, compressed model)``."""
    import llmopt_jax as lj
    from llmopt_jax.compress.study import evaluate_model

    source = lj.load_pretrained(r["model"]) if r.get("model") else model
    compressed = lj.compress(source, row_recipe(config, r), calib, batch_size=config.calib.batch_size,
                             progress=config.progress, compute_dtype=config.calib.compute_dtype)
    return evaluate_model(compressed, texts, config.eval.seq_len, config.eval.batch_size), compressed


def main(config, workdir):
    import os

    from llmopt_jax.compress.calibrate import resolve_compute_dtype
    from llmopt_jax.compress.study import (ResumableRows, case_study_settings, check_case_study_inputs,
                                           decode_tokens_per_s, open_case_study, print_row, require_finished_rows)
    from llmopt_jax.jsonio import write_json

    todo = grid(config)
    for r in todo:  # validate every recipe before anything slow happens
        row_recipe(config, r)
    # The grid and the calibration passes' precision decide the numbers too: rows made before the integer
    # zero-point grid (the quantization-grid issue) carry neither key and are refused, not mixed in. The precision
    # is stored resolved ("auto" means another mix on another host, and changed with the engine): the calibrated
    # rows all quantize.
    passes = resolve_compute_dtype(config.calib.compute_dtype, quantizes=True)
    settings = case_study_settings(config, smoothquant_alpha=config.smoothquant_alpha, qat_model=config.qat_model,
                                   zero_point="int", compute_dtype=passes)
    settings["calib"]["compute_dtype"] = passes  # "auto" and the dtype it resolves to give the same rows
    done = ResumableRows(os.path.join(workdir, "rows.jsonl"), row_key, settings)
    missing_models = sorted({r["model"] for r in todo if r.get("model") and done.get(r) is None
                             and not os.path.isdir(r["model"])})
    if missing_models and not config.report_only:
        raise ConfigError(f"qat_model={missing_models[0]!r} is not a directory: run the QAT preset first "
                          "(python -m experiments.train --config=configs/train.py:qat) or drop 'qat' from extras")
    if config.report_only:
        require_finished_rows(done, todo, workdir)
    else:
        texts = check_case_study_inputs(config)  # before the workdir is touched
    workdir = cli.prepare_workdir(config, workdir)
    finished = ResumableRows(os.path.join(workdir, "rows.jsonl"), row_key, settings)
    if config.report_only:
        missing = [label(r) for r in todo if finished.get(r) is None]
        if missing:
            print(f"{len(missing)} rows not run yet: {', '.join(missing)}")
        todo = [r for r in todo if finished.get(r) is not None]
    elif any(finished.get(r) is None for r in todo):  # every row on disk: the table is rewritten without the model
        finished, model, texts, calib = open_case_study(config, workdir, row_key, settings, texts)
        prompt = list(texts["close"][0][:32])
    decode_by_format = {storage_format(r): r["decode_tokens_per_s"] for r in finished.done.values()
                        if r.get("decode_tokens_per_s")}

    for r in todo:
        if finished.get(r) is not None:
            continue
        numbers, compressed = evaluate_row(config, model, calib, texts, r)
        fmt = storage_format(r)
        if config.decode_tokens > 0 and fmt not in decode_by_format:
            decode_by_format[fmt] = decode_tokens_per_s(compressed, prompt, config.decode_tokens,
                                                        config.decode_repeats)
        del compressed
        done = finished.add({**r, **numbers, "storage_format": fmt,
                             "decode_tokens_per_s": decode_by_format.get(fmt, 0.0)})
        print_row(f"{label(done):42s} {done['bits_per_weight']:5.2f} b/w", done)

    rows = [finished.get(r) for r in todo]
    write_json(os.path.join(workdir, "results.json"), {
        "rows": rows, "calib_windows": config.calib.num_samples, "calib_seq_len": config.calib.seq_len,
        "calib_text": config.calib.text_file or config.calib.sources,
        "close_text": config.eval.close_text_file or "stdlib docstrings",
        "far_text": config.eval.far_text_file or "Python LICENSE.txt", "model": config.model})
    table = markdown_table(rows)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(workdir, "perplexity_vs_bits.png"))
    print(table)


if __name__ == "__main__":
    cli.run(main)
