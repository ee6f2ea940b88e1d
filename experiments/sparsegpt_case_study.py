"""SparseGPT case study: perplexity vs sparsity for magnitude, Wanda and SparseGPT on the real model.

    python -m experiments.sparsegpt_case_study --config=configs/sparsegpt_case_study.py:default --workdir=runs/case

Every finished row is appended to WORKDIR/rows.jsonl, so a killed run continues where it stopped. At the end:
results.json (rows + settings), table.md (perplexity on the close and far texts, measured sparsity, seconds to
compress) and perplexity_vs_sparsity.png (log scale, one line per method and text).
"""

from llmopt_jax import cli


def grid(config) -> list[dict]:
    """Dense, then every method at every unstructured sparsity and N:M pattern of the config."""
    from llmopt_jax.compress.prune import parse_pattern
    from llmopt_jax.config_checks import parse_list

    methods = parse_list(config.methods, "methods", str, item="method", example="magnitude,wanda,sparsegpt")
    sparsities = parse_list(config.sparsities, "sparsities", float, example="0.5,0.7")
    patterns = parse_list(config.patterns, "patterns", str, item="pattern", example="2:4,4:8")
    nm = {p: parse_pattern(0.0, p) for p in patterns}  # "N:M" with 0 < N < M, or a one-line error
    rows = [{"method": "dense", "pattern": "unstructured", "sparsity_target": 0.0}]
    for method in methods:
        for s in sparsities:
            rows.append({"method": method, "pattern": "unstructured", "sparsity_target": s})
        for pattern in patterns:
            rows.append({"method": method, "pattern": pattern, "sparsity_target": 1 - nm[pattern].n / nm[pattern].m})
    return rows


def row_key(row: dict) -> str:
    return f"{row['method']}/{row['pattern']}/{row['sparsity_target']:.4f}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | pattern | target | measured sparsity | ppl close | ppl far | compress s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity_target']:.0%} | {r['sparsity']:.4f} | "
                     f"{r['perplexity_close']:.2f} | {r['perplexity_far']:.2f} | {r['seconds_compress']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for ax, text in zip(axes, ("close", "far")):
        for method, color in (("magnitude", "tab:red"), ("wanda", "tab:green"), ("sparsegpt", "tab:blue")):
            line = sorted((r for r in rows if r["method"] == method and r["pattern"] == "unstructured"),
                          key=lambda r: r["sparsity_target"])
            if line:
                ax.plot([r["sparsity_target"] for r in line], [r[f"perplexity_{text}"] for r in line], "o-",
                        color=color, label=method)
            for r in rows:
                if r["method"] == method and r["pattern"] != "unstructured":
                    ax.scatter([r["sparsity_target"]], [r[f"perplexity_{text}"]], marker="s", color=color)
                    ax.annotate(r["pattern"], (r["sparsity_target"], r[f"perplexity_{text}"]), fontsize=7)
        if dense:
            ax.axhline(dense[f"perplexity_{text}"], color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of every block linear layer")
        ax.set_title(f"{text}-domain text")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("perplexity (log)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(config, workdir):
    import os

    from llmopt_jax.compress.study import (case_study_settings, check_case_study_inputs, compress_and_evaluate,
                                           open_case_study, print_row)
    from llmopt_jax.jsonio import write_json

    todo = grid(config)
    for row in todo:  # validate every recipe before anything slow happens
        row_recipe(config, row)
    texts = check_case_study_inputs(config)  # and the texts, before the workdir is touched
    workdir = cli.prepare_workdir(config, workdir)
    finished, model, texts, calib = open_case_study(config, workdir, row_key, case_study_settings(config), texts)

    for row in todo:
        if finished.get(row) is not None:
            continue
        row = finished.add({**row, **compress_and_evaluate(model, row_recipe(config, row), calib, texts,
                                                           config.eval.seq_len, config.eval.batch_size,
                                                           config.calib.batch_size, config.progress)})
        print_row(f"{row['method']:9s} {row['pattern']:12s} {row['sparsity_target']:.0%}", row)

    rows = [finished.get(r) for r in todo]
    write_json(os.path.join(workdir, "results.json"), {
        "rows": rows, "calib_windows": config.calib.num_samples, "calib_seq_len": config.calib.seq_len,
        "calib_text": config.calib.text_file or config.calib.sources,
        "close_text": config.eval.close_text_file or "stdlib docstrings", "far_text": config.eval.far_text_file or
        "Python LICENSE.txt", "model": model.path})
    table = markdown_table(rows)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(workdir, "perplexity_vs_sparsity.png"))
    print(table)


def row_recipe(config, row: dict) -> list[dict]:
    """The recipe of ``row``: its method at its unstructured sparsity or N:M pattern (``dense``: none)."""
    from llmopt_jax.compress.api import method_recipe

    structured = row["pattern"] != "unstructured"
    return method_recipe(row["method"], sparsity=row["sparsity_target"],
                         pattern=row["pattern"] if structured else "", blocksize=config.sparsegpt.blocksize,
                         damp_fraction=config.sparsegpt.damp_fraction)


if __name__ == "__main__":
    cli.run(main)
