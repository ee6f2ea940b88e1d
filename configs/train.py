"""Training presets: ``--config=configs/train.py:PRESET`` with PRESET in smoke, tiny, smollm2_135m, llama2_7b,
qat (quantization-aware fine-tuning of the pretrained SmolLM2-135M at 3 bits per channel), qat_smoke, moe_smoke
(the smoke model with 8 routed experts, top-2, expert-parallel over all devices) and mixtral_8x7b (AOT only)."""

import importlib.util
import os

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError
from llmopt_jax.models.presets import MODEL_PRESETS

# Config files are loaded by path (--config=configs/FILE.py:PRESET), not imported from a package: load the shared
# blocks by path too, so that no sys.path entry is needed.
_common = importlib.util.spec_from_file_location("configs_common", os.path.join(os.path.dirname(__file__), "common.py"))
common = importlib.util.module_from_spec(_common)
_common.loader.exec_module(common)

# steps, seq_len, global batch, grad_accum, lr, warmup, checkpoint_every, compute dtype, remat
RUN_PRESETS = {
    "smoke": dict(steps=60, seq_len=128, batch_size=8, grad_accum=1, lr=3e-3, warmup=10, ckpt=20),
    "tiny": dict(steps=20, seq_len=64, batch_size=8, grad_accum=1, lr=3e-3, warmup=4, ckpt=10),
    "smollm2_135m": dict(steps=200, seq_len=512, batch_size=8, grad_accum=4, lr=1e-3, warmup=20, ckpt=50),
    "llama2_7b": dict(steps=1000, seq_len=4096, batch_size=8, grad_accum=1, lr=3e-4, warmup=100, ckpt=100),
    "qat": dict(steps=60, seq_len=256, batch_size=4, grad_accum=1, lr=5e-4, warmup=5, ckpt=10),
    "qat_smoke": dict(steps=3, seq_len=64, batch_size=2, grad_accum=1, lr=1e-4, warmup=1, ckpt=3),
    "lora": dict(steps=60, seq_len=256, batch_size=4, grad_accum=1, lr=2e-3, warmup=5, ckpt=20),
    "lora_smoke": dict(steps=3, seq_len=64, batch_size=2, grad_accum=1, lr=2e-3, warmup=1, ckpt=3),
    "qlora": dict(steps=60, seq_len=256, batch_size=4, grad_accum=1, lr=2e-3, warmup=5, ckpt=20),
    "qlora_smoke": dict(steps=3, seq_len=64, batch_size=2, grad_accum=1, lr=2e-3, warmup=1, ckpt=3),
    "moe_smoke": dict(steps=60, seq_len=128, batch_size=8, grad_accum=1, lr=3e-3, warmup=10, ckpt=20),
    "mixtral_8x7b": dict(steps=1000, seq_len=4096, batch_size=8, grad_accum=1, lr=3e-4, warmup=100, ckpt=100),
}
MOE_PRESETS = ("moe_smoke", "mixtral_8x7b")
QAT_PRESETS = ("qat", "qat_smoke")
# LoRA / QLoRA fine-tuning of the pretrained SmolLM2-135M (llmopt_jax/peft): rank-4 adapters on every block linear
# (0.9 % of the weights), held-out perplexity before/after, the adapter written in PEFT's layout to WORKDIR/adapter.
LORA_PRESETS = ("lora", "lora_smoke", "qlora", "qlora_smoke")
PRETRAINED_PRESETS = QAT_PRESETS + LORA_PRESETS


def get_config(preset: str = "smoke") -> ConfigDict:
    if preset not in RUN_PRESETS:
        raise ConfigError(f"unknown train preset {preset!r}; choose one of {sorted(RUN_PRESETS)}")
    run = RUN_PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.seed = 0
    c.distributed = False  # True on multi-host runs: calls jax.distributed.initialize() (one process per host)
    # Where the processes meet. Empty / 0 / -1: detected (Cloud TPU VMs, SLURM, Open MPI, Kubernetes); set all
    # three to launch by hand (several GPU hosts; or local processes: coordinator_address="127.0.0.1:PORT").
    c.cluster = ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))

    c.model = ConfigDict(
        dict(
            vocab_size=0, d_model=0, num_layers=0, num_heads=0, num_kv_heads=0, mlp_dim=0, head_dim=0,
            rope_base=10000.0, rope_interleaved=False, rms_eps=1e-5, tie_embeddings=True, max_seq_len=2048,
            dtype="float32", param_dtype="float32", attention="xla", scan_layers=True, remat="none", init_std=0.02,
            # Mixture of experts (llmopt_jax/models/moe.py); num_experts 0 = dense.
            num_experts=0, moe_top_k=2, moe_layers="all", moe_expert_dim=0, moe_gating="softmax_topk",
            moe_dispatch="dropless", moe_capacity_factor=1.25, moe_z_loss_weight=1e-3, moe_load_balance_weight=1e-2,
        )
    )
    c.model.update(MODEL_PRESETS["smollm2_135m" if preset in PRETRAINED_PRESETS else preset])
    # A model name or path to continue training from (its architecture and tokenizer replace model/data.tokenizer
    # except for dtype/remat/attention); the trained weights are then also written to WORKDIR/model.
    c.init_from = "smollm2-135m" if preset in PRETRAINED_PRESETS else ""
    # Quantization-aware training: the linear layers see their weights rounded to this grid (straight-through
    # gradients); bits 0 = off. Evaluate with RTN at the same grid (experiments/quantization_case_study.py).
    c.qat = ConfigDict(dict(bits=3 if preset in QAT_PRESETS else 0, group_size=-1, symmetric=False))
    if preset in ("smollm2_135m", "llama2_7b", "mixtral_8x7b"):
        c.model.dtype = "bfloat16"  # bf16 compute over fp32 master weights
        c.model.remat = "full"

    # Mesh axis sizes (-1 = the devices left over) and the logical-axis -> mesh-axis rules.
    c.mesh = common.mesh_config(fsdp=-1)  # FSDP over all devices
    if preset == "moe_smoke":
        c.mesh = common.mesh_config(expert=-1)  # expert parallelism over all devices (8 experts)
    elif preset == "mixtral_8x7b":
        c.mesh = common.mesh_config(fsdp=-1, expert=8)  # 8 experts over 8-way expert parallelism, FSDP across
    c.sharding_rules = common.sharding_rules()

    c.data = ConfigDict()
    c.data.text_files = ""  # comma-separated UTF-8 files; empty = pydoc_data.topics
    c.data.tokenizer = "byte"  # or a model name/path: its own tokenizer (init_from's replaces it)
    # "" = the text as one token stream cut into windows; "files" / "paragraphs" = documents (each file, or the
    # blank-line-separated paragraphs) packed into windows with EOS separators, positions restarting per document
    # and attention and loss kept inside each document (llmopt_jax/data/packing.py).
    c.data.documents = "files" if preset in LORA_PRESETS else ""
    c.data.seq_len = run["seq_len"]
    c.data.batch_size = run["batch_size"]  # global micro-batch, in windows
    c.data.grad_accum = run["grad_accum"]  # micro-batches per optimizer step

    # Linear warmup over warmup_steps, then cosine decay to final_lr_fraction at total_steps. A run shorter than its
    # warmup (the smoke preset at --config.train.steps=5) warms up over half the run instead, with a note on stderr
    # and the steps used in results.json's warmup_steps (llmopt_jax.train.optim.fit_warmup).
    c.optim = ConfigDict(
        dict(
            name="adamw", learning_rate=run["lr"], warmup_steps=run["warmup"], total_steps=0,  # 0 = train.steps
            final_lr_fraction=0.1, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0,
        )
    )

    if preset in PRETRAINED_PRESETS:
        c.optim.weight_decay = 0.0  # fine-tuning a pretrained model: no pull towards zero

    c.train = ConfigDict()
    c.train.steps = run["steps"]
    c.train.log_every = 1
    c.train.checkpoint_every = run["ckpt"]
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.peak_flops_per_s = 0.0  # 0 = measure with a matmul on the default device
    c.train.progress = True
    # Pipeline parallelism over mesh.stage (llmopt_jax/parallel/pipeline.py): each micro-batch of data.batch_size
    # windows is split into `microbatches` GPipe microbatches; pipeline_repeats > 1 = circular schedule (virtual
    # stages, smaller bubble (S-1)/(M*R+S-1), needs microbatches >= mesh.stage). 1/1 with mesh.stage=1 = off.
    c.train.microbatches = 1
    c.train.pipeline_repeats = 1
    # Keep the optimizer state in host memory (JAX memory kind pinned_host; fetched to the device for each update):
    # frees 2x the parameters' bytes of accelerator memory for AdamW at the cost of host<->device copies per step.
    # Offloading activations instead: model.remat="offload_dots_no_batch".
    c.train.offload_optimizer = False

    # experiments/aot_memory.py: compile the train step for a fake mesh of CPU devices, allocate nothing.
    c.aot = ConfigDict()
    c.aot.num_devices = 8

    if preset in LORA_PRESETS:
        # Adapters of rank `rank` (scaling alpha/rank, input dropout) on the `targets` linears; base_bits 4 = QLoRA:
        # the frozen base's block linears held packed (int4, one scale and zero-point per base_group_size inputs).
        c.lora = ConfigDict(dict(rank=4, alpha=8.0, dropout=0.05,
                                 targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                 base_bits=4 if preset.startswith("qlora") else 0, base_group_size=64))
        # Held-out perplexity before and after (text_file "" = the held-out split of pydoc_data.topics, while the
        # default training text is its training split; max_windows 0 = every window).
        smoke = preset.endswith("_smoke")
        c.eval = ConfigDict(dict(text_file="", seq_len=64 if smoke else 256, batch_size=4,
                                 max_windows=2 if smoke else 0))
    return c
