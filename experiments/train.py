"""Train a decoder from config, resuming from WORKDIR's checkpoints.

    python -m experiments.train --config=configs/train.py:smoke --workdir=/tmp/smoke

Writes WORKDIR/config.json, metrics.jsonl, loss.png, checkpoints/ and results.json with initial_loss,
final_loss, steps, tokens_per_s, mfu, num_params. Kill it at any point and rerun the same command to resume.
"""

from llmopt_jax import cli


def main(config, workdir):
    from llmopt_jax.train.loop import train

    workdir = cli.prepare_workdir(config, workdir)
    results = train(config, workdir)
    print(
        f"steps={results['steps']} initial_loss={results['initial_loss']:.4f} final_loss={results['final_loss']:.4f} "
        f"tokens/s={results['tokens_per_s']:,.0f} mfu={results['mfu']:.2%} params={results['num_params']:,}"
    )


if __name__ == "__main__":
    cli.run(main)
