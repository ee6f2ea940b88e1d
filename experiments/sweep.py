"""A grid sweep over train-config keys: every combination trains, the table and plot rank them.

    python -m experiments.sweep --config=configs/sweep.py:default --workdir=runs/sweep_lr_bs
    python -m experiments.sweep --config=configs/sweep.py:default \
        --config.sweep.grid="optim.learning_rate=3e-4,1e-3;optim.warmup_steps=0,10" --workdir=W

Each run trains in WORKDIR/runs/NAME exactly like ``experiments.train`` (checkpoints, resume); finished runs are
rows of WORKDIR/rows.jsonl, so a killed sweep resumes where it stopped. Writes WORKDIR/results.json (``rows``:
each run's ``values`` of the grid keys, the metric, final loss, tokens/s; ``best``), table.md and sweep.png (the metric against the first
key, one line per value of the second).
"""

from llmopt_jax import cli


def parse_assignments(spec: str, what: str) -> list[tuple[str, list[str]]]:
    """``"a.b=1,2;c=x"`` -> ``[("a.b", ["1", "2"]), ("c", ["x"])]``."""
    from llmopt_jax.errors import ConfigError

    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ConfigError(f"{what}: cannot read {item!r}; expected KEY=V1,V2,... separated by ';'")
        out.append((key.strip(), vals))
    return out


def typed(base, key: str, text: str):
    """``text`` converted to the type of ``base``'s value at dotted ``key`` (ConfigError if no such key)."""
    from llmopt_jax.errors import ConfigError

    node = base
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node or not hasattr(node[part], "keys"):
            raise ConfigError(f"sweep: the train config has no key {key!r}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"sweep: the train config has no key {key!r}")
    old = node[parts[-1]]
    try:
        if isinstance(old, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        return type(old)(float(text)) if isinstance(old, int) and float(text).is_integer() else type(old)(text)
    except ValueError:
        raise ConfigError(f"sweep: {key}={text!r} is not a {type(old).__name__} like the train config's "
                          f"{old!r}") from None


def run_name(settings: dict) -> str:
    """A directory name for one combination: ``learning_rate=0.001,batch_size=8``."""
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in settings.items())


def plot(rows: list[dict], keys: list[str], metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    first, second = keys[0], keys[1] if len(keys) > 1 else None
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["values"].get(second) if second else None, []).append(r)
    for value, group in groups.items():
        group = sorted(group, key=lambda r: r["values"][first])
        ax.plot([r["values"][first] for r in group], [r[metric] for r in group], "o-",
                label=f"{second}={value}" if second else None)
    if all(isinstance(r["values"][first], (int, float)) and r["values"][first] > 0 for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel(first)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    if second:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(config, workdir):
    import importlib.util
    import itertools
    import os

    from llmopt_jax.compress.study import ResumableRows, require_finished_rows
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.jsonio import write_json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("configs_train", os.path.join(root, "configs", "train.py"))
    train_configs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_configs)
    s = config.sweep
    base = train_configs.get_config(s.base)
    grid = parse_assignments(s.grid, "sweep.grid")
    fixed = parse_assignments(s.set, "sweep.set") if s.set else []
    if not grid:
        raise ConfigError("sweep.grid is empty; e.g. optim.learning_rate=1e-3,3e-3")
    if int(s.steps) < 1:
        raise ConfigError(f"sweep.steps must be >= 1, got {s.steps}")
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"sweep.grid names a key twice: {keys}")
    combos = [dict(zip(keys, (typed(base, k, v) for k, v in zip(keys, values))))
              for values in itertools.product(*(vals for _, vals in grid))]
    overrides = {k: typed(base, k, vals[-1]) for k, vals in fixed}
    settings = {"base": s.base, "steps": int(s.steps), "metric": s.metric, "set": overrides}
    key = lambda r: run_name(r["values"])  # noqa: E731
    if config.report_only:
        require_finished_rows(ResumableRows(os.path.join(workdir, "rows.jsonl"), key, settings),
                              [{"values": c} for c in combos], workdir)
    workdir = cli.prepare_workdir(config, workdir)
    finished = ResumableRows(os.path.join(workdir, "rows.jsonl"), key, settings)

    from experiments.train import RESUMABLE_CHANGES
    from llmopt_jax.train.loop import train

    for combo in combos:
        if config.report_only or finished.get({"values": combo}) is not None:
            continue
        run = train_configs.get_config(s.base)
        run.train.steps = int(s.steps)
        run.train.progress = bool(config.progress)
        for k, v in {**overrides, **combo}.items():
            run.update_from_flattened_dict({k: v})
        run_dir = cli.prepare_workdir(run, os.path.join(workdir, "runs", run_name(combo)), resumable=RESUMABLE_CHANGES)
        results = train(run, run_dir)
        if s.metric not in results:
            raise ConfigError(f"sweep.metric={s.metric!r} is not in a run's results.json ({sorted(results)})")
        row = finished.add({"values": combo, s.metric: float(results[s.metric]),
                            "final_loss": results["final_loss"], "tokens_per_s": results["tokens_per_s"],
                            "run_dir": run_dir})
        print(f"{run_name(combo)}: {s.metric}={row[s.metric]:.4f}", flush=True)

    rows = [finished.get({"values": c}) for c in combos if finished.get({"values": c}) is not None]
    ranked = sorted(rows, key=lambda r: r[s.metric])
    lines = ["| " + " | ".join(keys) + f" | {s.metric} | final loss | tokens/s |", "|" + "---|" * (len(keys) + 3)]
    for r in ranked:
        lines.append("| " + " | ".join(str(r["values"][k]) for k in keys) +
                     f" | {r[s.metric]:.4f} | {r['final_loss']:.4f} | {r['tokens_per_s']:,.0f} |")
    table = "\n".join(lines) + "\n"
    write_json(os.path.join(workdir, "results.json"), {"rows": rows, "keys": keys, "metric": s.metric,
                                                        "best": ranked[0]["values"] if ranked else None,
                                                        "base": s.base, "steps": int(s.steps)})
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table)
    if rows:
        plot(rows, keys, s.metric, os.path.join(workdir, "sweep.png"))
    print(table)


if __name__ == "__main__":
    cli.run(main)
