"""Plots of the benchmarks (PNG files, matplotlib's Agg backend): solver times ours vs baseline, the end-to-end
time breakdown, and decode speed against the bandwidth bound."""

from __future__ import annotations

from collections.abc import Sequence


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> None:
    """Writes ``fig`` to ``path`` (PNG, 120 dpi) and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_solver_rows(rows: list[dict], path: str, title: str = "SparseGPT solve time, same CPU") -> None:
    """Bar chart of ours vs the PyTorch reference, one pair per row (``row["label"]`` names it when present)."""
    import numpy as np

    plt = _pyplot()
    labels = [r.get("label") or (f"{r['size']}² {r['pattern']}" if r["kind"] == "matrix" else
                                 f"model solves\n{r['pattern']}") for r in rows]
    x = np.arange(len(rows))
    ours = [r["ours_seconds"] for r in rows]
    theirs = [r["torch_seconds"] if r["torch_seconds"] is not None else np.nan for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    ax.bar(x - 0.2, ours, 0.4, label="ours (JAX)", color="tab:blue")
    ax.bar(x + 0.2, theirs, 0.4, label="PyTorch reference", color="tab:orange")
    for i, r in enumerate(rows):
        if r["speedup"]:
            ax.annotate(f"{r['speedup']:.1f}x", (x[i], max(ours[i], theirs[i])), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median)")
    ax.set_title(title)
    ax.legend()
    _save(plt, fig, path)


def plot_phase_breakdown(e2e: dict, phases: Sequence[str], path: str) -> None:
    """Stacked bars: each end-to-end engine's seconds by phase (keys ``e2e_{engine}_seconds_{phase}``), annotated
    with its total and the pruned model's perplexity."""
    plt = _pyplot()
    engines = [k[len("e2e_"):-len("_seconds")] for k in e2e if k.startswith("e2e_") and k.endswith("_seconds")
               and not k.endswith("eval_seconds")]
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(engines)
    for phase in phases:
        values = [e2e[f"e2e_{e}_seconds_{phase}"] for e in engines]
        ax.bar(engines, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, e in enumerate(engines):
        ax.annotate(f"{bottom[i]:.0f} s\nppl {e2e[f'e2e_{e}_perplexity']:.2f}", (i, bottom[i]), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylim(0, 1.15 * max(bottom))
    ax.set_ylabel("seconds")
    ax.set_title("SparseGPT, whole model end to end, same CPU")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_decode(rows: list[dict], path: str) -> None:
    """Decode tokens/s of each engine/dtype/batch row as bars, its memory-bandwidth bound as a marker."""
    plt = _pyplot()
    labels = [f"{r['engine']}\n{r['dtype']} b{r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    ax.bar(labels, [r["decode_tokens_per_s"] for r in rows], color="tab:blue", label="measured decode")
    bounds = [r.get("bandwidth_bound_tokens_per_s") for r in rows]
    ax.scatter(labels, [b or float("nan") for b in bounds], color="tab:red", marker="_", s=600, label="bandwidth bound")
    ax.set_ylabel("decode tokens/s (sum over batch)")
    ax.legend()
    ax.tick_params(axis="x", labelsize=8)
    _save(plt, fig, path)
