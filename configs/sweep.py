"""Hyperparameter sweeps over any keys of a train config: ``--config=configs/sweep.py:PRESET`` (default | smoke).

``sweep.grid`` names the keys and their values, ``KEY=V1,V2,...`` separated by ``;``; every combination trains
``sweep.base`` (a preset of ``configs/train.py``) for ``sweep.steps`` steps in ``WORKDIR/runs/NAME`` (resumable),
and the sweep reports ``sweep.metric`` from each run's results.json. ``default``: learning rate x batch size on
the smoke model (9 runs of 60 steps); ``smoke``: 2 learning rates x 3 steps (seconds, for tests).
"""

import ml_collections

from llmopt_jax.errors import ConfigError

PRESETS = {
    "default": dict(base="smoke", grid="optim.learning_rate=1e-3,3e-3,1e-2;data.batch_size=4,8,16", steps=60),
    "smoke": dict(base="tiny", grid="optim.learning_rate=1e-3,1e-2", steps=3),
}


def get_config(preset: str = "default"):
    if preset not in PRESETS:
        raise ConfigError(f"unknown sweep preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.sweep = ml_collections.ConfigDict(dict(
        base=p["base"],  # a preset of configs/train.py
        grid=p["grid"],  # KEY=V1,V2,...;KEY=... (dotted keys of the train config)
        steps=p["steps"],  # train.steps of every run
        metric="final_loss_mean_last10",  # a number in each run's results.json; lower is better
        set="",  # fixed overrides for every run, KEY=VALUE;KEY=VALUE
    ))
    c.report_only = False  # True: table and plot from the runs finished so far
    c.progress = True
    return c
