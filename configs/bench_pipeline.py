"""Pipeline-bubble benchmark presets: ``--config=configs/bench_pipeline.py:PRESET`` with PRESET in default, smoke."""

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

PRESETS = {
    # The smoke model's width at 8 layers (2 per stage; circular rows with 2 repeats of 1 layer per stage).
    "default": dict(num_layers=8, d_model=256, mlp_dim=768, batch_size=32, seq_len=32, microbatches="1,2,4,8,16",
                    pipeline_repeats="1,2", timing_repeats=5),
    "smoke": dict(num_layers=4, d_model=64, mlp_dim=128, batch_size=8, seq_len=16, microbatches="1,4",
                  pipeline_repeats="1", timing_repeats=2),
}


def get_config(preset: str = "default") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown bench_pipeline preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.num_devices = 8  # fake CPU devices when the backend is CPU (XLA_FLAGS is set before JAX starts)
    c.stages = 4  # pipeline stages (mesh.stage); the rest of the devices is data parallelism
    c.model = ConfigDict(dict(vocab_size=512, d_model=p["d_model"], num_layers=p["num_layers"], num_heads=8,
                              num_kv_heads=4, mlp_dim=p["mlp_dim"], max_seq_len=512, remat="none"))
    c.batch_size = p["batch_size"]  # global batch (windows) of one forward+backward of the layer stack
    c.seq_len = p["seq_len"]
    c.microbatches = p["microbatches"]  # comma-separated M values (each must divide batch_size / data)
    c.pipeline_repeats = p["pipeline_repeats"]  # comma-separated R values (R > 1: circular, only for M >= stages)
    c.timing_repeats = p["timing_repeats"]  # timed runs per row after a compiling run; the median is reported
    return c
