"""Named model shapes shared by the config files (``configs/*.py``)."""

from __future__ import annotations

MODEL_PRESETS: dict[str, dict] = {
    # A few million parameters: trains visibly in a minute on 2 CPU cores (byte-level vocab padded to 512).
    "smoke": dict(
        vocab_size=512, d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, mlp_dim=768, rope_base=10000.0,
        tie_embeddings=True, max_seq_len=512,
    ),
    # The smallest shape that still exercises GQA, scan and tensor sharding: unit tests.
    "tiny": dict(
        vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, rope_base=10000.0,
        tie_embeddings=True, max_seq_len=256,
    ),
    # The smoke shape with every MLP routed over 8 experts of a quarter of its width, top-2 (twice the MLP
    # parameters, half the MLP FLOPs per token): the MoE training smoke test and expert-parallel demos. Capacity
    # dispatch (Switch, factor 1.25): its einsums shard into all-to-alls, and XLA:CPU lowers ragged_dot (the
    # dropless path) to a masked matmul over all experts, ~8x slower here.
    "moe_smoke": dict(
        vocab_size=512, d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, mlp_dim=768, rope_base=10000.0,
        tie_embeddings=True, max_seq_len=512, num_experts=8, moe_top_k=2, moe_expert_dim=192,
        moe_dispatch="capacity", moe_capacity_factor=1.25,
    ),
    # Mixtral-8x7B's shape (46.7B parameters, 12.9B active): AOT memory estimates of expert parallelism only.
    "mixtral_8x7b": dict(
        vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336, head_dim=128,
        rope_base=1e6, rms_eps=1e-5, tie_embeddings=False, max_seq_len=4096, num_experts=8, moe_top_k=2,
    ),
    # SmolLM2-135M (HuggingFaceTB), the real model of the case studies.
    "smollm2_135m": dict(
        vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, mlp_dim=1536, head_dim=64,
        rope_base=100000.0, rms_eps=1e-5, tie_embeddings=True, max_seq_len=8192,
    ),
    # TinyLlama-1.1B's shape (the MFU goal of the training issue): GQA with 4 KV heads.
    "tinyllama_1b": dict(
        vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, mlp_dim=5632, head_dim=64,
        rope_base=10000.0, rms_eps=1e-5, tie_embeddings=False, max_seq_len=2048,
    ),
    # LLaMA-2-13B and -70B (GQA, 8 KV heads): AOT planning only (experiments/plan.py).
    "llama2_13b": dict(
        vocab_size=32000, d_model=5120, num_layers=40, num_heads=40, num_kv_heads=40, mlp_dim=13824,
        head_dim=128, rope_base=10000.0, rms_eps=1e-5, tie_embeddings=False, max_seq_len=4096,
    ),
    "llama2_70b": dict(
        vocab_size=32000, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8, mlp_dim=28672,
        head_dim=128, rope_base=10000.0, rms_eps=1e-5, tie_embeddings=False, max_seq_len=4096,
    ),
    # LLaMA-2-7B: used for abstract (AOT) compilation and memory estimates only.
    "llama2_7b": dict(
        vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008,
        head_dim=128, rope_base=10000.0, rms_eps=1e-5, tie_embeddings=False, max_seq_len=4096,
    ),
}
