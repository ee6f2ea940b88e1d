"""Calibration study: how the calibration set moves Wanda and SparseGPT on close- and far-domain text.

    python -m experiments.calibration_study --config=configs/calibration_study.py:default --workdir=runs/calib

Every finished row is appended to WORKDIR/rows.jsonl (a killed run continues where it stopped). At the end:
results.json, table.md (one line per calibration set: perplexities of each method on both texts) and
calibration.png (perplexity vs number of calibration windows, the other sets as labelled points).
``--config.report_only=True`` writes those from the rows finished so far without pruning anything.
"""

from __future__ import annotations

import re

from llmopt_jax import cli
from llmopt_jax.errors import ConfigError

VARIANT = re.compile(r"^([a-z]+(?:\+[a-z]+)*)/(\d+)x(\d+)$")


def parse_variant(text: str) -> dict:
    """``"topics+code/128x512"`` -> ``{"variant", "sources": "topics,code", "num_samples": 128, "seq_len": 512}``."""
    match = VARIANT.match(text.strip())
    if not match or int(match[2]) < 1 or int(match[3]) < 2:
        raise ConfigError(f"calibration variant {text!r} must look like SOURCES/NxL, e.g. topics+code/128x512")
    if int(match[2]) < len(match[1].split("+")):
        raise ConfigError(f"calibration variant {text!r}: {match[2]} windows cannot cover {match[1].count('+') + 1} "
                          "sources")
    return {"variant": text.strip(), "sources": match[1].replace("+", ","), "num_samples": int(match[2]),
            "seq_len": int(match[3])}


def study_rows(config) -> list[dict]:
    """Every (calibration set, method, dampening) row of the study, in run order."""
    from llmopt_jax.config_checks import parse_list

    methods = parse_list(config.methods, "methods", str, example="sparsegpt,wanda")
    for m in methods:
        if m not in ("sparsegpt", "wanda", "magnitude"):
            raise ConfigError(f"unknown method {m!r} in methods; choose from sparsegpt, wanda, magnitude")
    damps = parse_list(config.damp_fractions, "damp_fractions", float, example="0.01,0.1")
    damps = [d for d in dict.fromkeys(damps) if d != config.sparsegpt.damp_fraction]  # no row twice
    damp_variant = parse_variant(config.damp_variant)["variant"] if damps else None
    rows = []
    for variant in parse_list(config.variants, "variants", str, example="topics/128x512,topics+code/128x512"):
        calib = parse_variant(variant)
        for method in methods:
            damp = config.sparsegpt.damp_fraction if method == "sparsegpt" else None
            rows.append({**calib, "method": method, "damp_fraction": damp})
        if calib["variant"] == damp_variant:  # the dampening rows run right after their calibration set
            rows.extend({**calib, "method": "sparsegpt", "damp_fraction": d} for d in damps)
            damp_variant = None
    if damp_variant is not None:
        rows.extend({**parse_variant(damp_variant), "method": "sparsegpt", "damp_fraction": d} for d in damps)
    return rows


def row_key(row: dict) -> str:
    return f"{row['variant']}/{row['method']}/{row['damp_fraction']}"


def settings(config) -> dict:
    """Everything besides the row itself that decides a row's numbers (stored with each row)."""
    return {"model": config.model, "sparsity": config.sparsity, "pattern": config.pattern,
            "blocksize": config.sparsegpt.blocksize, "seed": config.calib.seed,
            "eval": {k: v for k, v in config.eval.to_dict().items() if k != "batch_size"}}


def row_recipe(config, row: dict) -> list[dict]:
    """The recipe of ``row`` (its method at the study's sparsity; SparseGPT with the row's dampening)."""
    from llmopt_jax.compress.api import method_recipe

    damp = config.sparsegpt.damp_fraction if row["damp_fraction"] is None else row["damp_fraction"]
    return method_recipe(row["method"], sparsity=config.sparsity, pattern=config.pattern,
                         blocksize=config.sparsegpt.blocksize, damp_fraction=damp)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| calibration set | tokens | method | damp | ppl close | ppl far | compress s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        damp = "" if r["damp_fraction"] is None else f"{r['damp_fraction']:g}"
        lines.append(f"| {r['variant']} | {r['num_samples'] * r['seq_len']:,} | {r['method']} | {damp} | "
                     f"{r['perplexity_close']:.2f} | {r['perplexity_far']:.2f} | {r['seconds_compress']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, default_damp: float) -> None:
    """Perplexity vs calibration windows for each method, a line through the sets that share the first row's
    sources and window length; every other set is a labelled point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmopt_jax.compress.study import finish_text_panels

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"sparsegpt": "tab:blue", "wanda": "tab:green", "magnitude": "tab:red"}
    base, base_len = (rows[0]["sources"], rows[0]["seq_len"]) if rows else ("topics", 512)
    for ax, text in zip(axes, ("close", "far")):
        for method, color in colors.items():
            mine = [r for r in rows if r["method"] == method and r["damp_fraction"] in (None, default_damp)]
            sweep = sorted((r for r in mine if r["sources"] == base and r["seq_len"] == base_len),
                           key=lambda r: r["num_samples"])
            if sweep:
                ax.plot([r["num_samples"] for r in sweep], [r[f"perplexity_{text}"] for r in sweep], "o-",
                        color=color, label=f"{method} ({base.replace(',', '+')}, {base_len}-token windows)")
            for r in (r for r in rows if r["method"] == method and r not in sweep):
                other_damp = r["damp_fraction"] not in (None, default_damp)
                label = r["variant"] + (f" damp {r['damp_fraction']:g}" if other_damp else "")
                ax.scatter([r["num_samples"]], [r[f"perplexity_{text}"]], marker="^" if other_damp else "s",
                           color=color)
                ax.annotate(label, (r["num_samples"], r[f"perplexity_{text}"]), fontsize=7)
    finish_text_panels(fig, axes, path, "calibration windows", log_y=False, legend_size=7)


def main(config, workdir):
    import os

    import numpy as np

    from llmopt_jax.compress.study import (ResumableRows, compress_and_evaluate, eval_texts, print_row,
                                           read_eval_texts, require_finished_rows)
    from llmopt_jax.config_checks import check_context, check_eval_settings
    from llmopt_jax.data.text import calibration_source_text, mixed_calibration_windows, parse_calibration_sources
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.jsonio import write_json

    todo = study_rows(config)
    for row in todo:  # every problem in the config fails here, before the workdir is touched or the model loads
        row_recipe(config, row)
        parse_calibration_sources(row["sources"])
    if config.report_only:
        require_finished_rows(ResumableRows(os.path.join(workdir, "rows.jsonl"), row_key, settings(config)), todo,
                              workdir)
    else:
        check_eval_settings(config.eval)
        eval_text = read_eval_texts(config.eval.close_text_file, config.eval.far_text_file, config.eval.seq_len)
    workdir = cli.prepare_workdir(config, workdir)
    finished = ResumableRows(os.path.join(workdir, "rows.jsonl"), row_key, settings(config))
    if not config.report_only:
        model = load_pretrained(config.model)
        for row in todo:
            if row["seq_len"] > model.cfg.max_seq_len:
                raise ConfigError(f"variant {row['variant']}: windows of {row['seq_len']} tokens exceed the model's "
                                  f"context of {model.cfg.max_seq_len}")
        check_context("eval.seq_len", config.eval.seq_len, model.cfg.max_seq_len)
        tok = model.require_tokenizer()
        texts = eval_texts(tok, config.eval.close_text_file, config.eval.far_text_file, config.eval.close_max_windows,
                           config.eval.far_max_windows, seq_len=config.eval.seq_len, texts=eval_text)
        names = sorted({n for row in todo for n in row["sources"].split(",")})
        sources = {n: np.asarray(tok.encode(calibration_source_text(n))) for n in names}  # each tokenized once
        for row in todo:
            if finished.get(row) is not None:
                continue
            calib = mixed_calibration_windows([sources[n] for n in row["sources"].split(",")], row["num_samples"],
                                              row["seq_len"], config.calib.seed)
            row = finished.add({**row, **compress_and_evaluate(model, row_recipe(config, row), calib, texts,
                                                               config.eval.seq_len, config.eval.batch_size,
                                                               config.calib.batch_size, config.progress)})
            print_row(f"{row['variant']:28s} {row['method']:9s} damp={row['damp_fraction']}", row)

    rows = [finished.get(r) for r in todo if finished.get(r) is not None]
    write_json(os.path.join(workdir, "results.json"), {
        "rows": rows, "sparsity": config.sparsity, "pattern": config.pattern or "unstructured",
        "close_text": config.eval.close_text_file or "stdlib docstrings",
        "far_text": config.eval.far_text_file or "Python LICENSE.txt", "model": config.model})
    table = markdown_table(rows)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(workdir, "calibration.png"), config.sparsegpt.damp_fraction)
    print(table)


if __name__ == "__main__":
    cli.run(main)
