"""Planner presets: ``--config=configs/plan.py:PRESET`` (default | llama2_70b | smoke).

A plan is a train config (``configs/train.py``; its model, optimizer and data keys are kept) compiled abstractly
for every candidate mesh and remat policy on a virtual device set (``llmopt_jax/train/plan.py:DEVICE_SETS``):
``default`` plans LLaMA-2-7B on 8xH100, ``llama2_70b`` a 70B model on 64xH100 (the 65B-class 3D-parallel
configurations of CoLLiE), ``smoke`` the tiny model on 8 fake CPU devices (seconds).
"""

import importlib.util
import os

from llmopt_jax.errors import ConfigError

_train = importlib.util.spec_from_file_location("configs_train", os.path.join(os.path.dirname(__file__), "train.py"))
train = importlib.util.module_from_spec(_train)
_train.loader.exec_module(train)

PRESETS = {
    # model preset, device set, sequence length, sequences per step, remat policies, stage sizes tried
    "default": dict(model="llama2_7b", devices="8xH100", seq_len=4096, batch=8, remat="none,full", stages="1,2"),
    "llama2_70b": dict(model="llama2_70b", devices="64xH100", seq_len=4096, batch=64, remat="full", stages="1,2,4"),
    "smoke": dict(model="tiny", devices="8xCPU (test)", seq_len=64, batch=8, remat="none", stages="1,2"),
}


def get_config(preset: str = "default"):
    if preset not in PRESETS:
        raise ConfigError(f"unknown plan preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = train.get_config("smoke")  # the train config's keys; the model and data below replace the smoke run's
    c.preset = preset
    from llmopt_jax.models.presets import MODEL_PRESETS

    c.model.update(MODEL_PRESETS[p["model"]])
    c.model.dtype = "bfloat16"  # bf16 compute, float32 master weights and optimizer state
    c.data.seq_len = p["seq_len"]
    c.data.batch_size = p["batch"]  # sequences per step (global)
    c.data.grad_accum = 1
    c.plan = dict(
        model=p["model"],  # a name of llmopt_jax.models.presets.MODEL_PRESETS (recorded; c.model holds its shape)
        devices=p["devices"],  # a name of llmopt_jax.train.plan.DEVICE_SETS
        meshes="auto",  # "auto" (train/plan.py:candidate_meshes) or "fsdp=8;fsdp=4,tensor=2;..." (';' between meshes)
        tensor_sizes="1,2,4,8",  # tried by "auto"
        stage_sizes=p["stages"],  # tried by "auto"
        remat=p["remat"],  # comma-separated policies of model.remat (none, full, dots, dots_no_batch)
        microbatches=0,  # pipelined meshes; 0 = 2 x stage
        max_compiles=32,
    )
    import ml_collections

    c.plan = ml_collections.ConfigDict(c.plan)
    return c
