"""Decode/prefill benchmark presets: ``--config=configs/bench_decode.py:PRESET`` with PRESET in smollm2, smoke."""

from ml_collections import ConfigDict

from llmopt_jax.errors import ConfigError

PRESETS = {
    "smollm2": dict(dtypes="float32,bfloat16", batches="1,8", prompt_len=128, new_tokens=64, repeats=3,
                    packed="int8/32,int4/32,int3/64,int2/64", llama_cpp_types="F32,F16,Q8_0,Q4_0"),
    "smoke": dict(dtypes="float32", batches="1", prompt_len=32, new_tokens=8, repeats=1, packed="int4/32",
                  llama_cpp_types="F32"),
}


def get_config(preset: str = "smollm2") -> ConfigDict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown bench_decode preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ConfigDict()
    c.preset = preset
    c.model = "smollm2-135m"
    # Unrolled layers decode faster than a layer scan here (XLA:CPU slices stacked bf16 weights slowly: 6 vs
    # 47 tokens/s at batch 1); compiling takes a few seconds longer.
    c.scan_layers = False
    c.dtypes = p["dtypes"]  # comma-separated: float32, bfloat16
    c.batches = p["batches"]  # comma-separated batch sizes
    c.prompt_len = p["prompt_len"]  # prompt tokens per sequence (prefill)
    c.new_tokens = p["new_tokens"]  # tokens generated per sequence (decode)
    c.repeats = p["repeats"]  # timed runs per row; the median is reported
    c.llama_cpp = True  # also time llama.cpp on F32/F16 GGUFs of the same weights when llama-cpp-python is installed
    c.llama_cpp_types = p["llama_cpp_types"]
    # Packed quantized weights, comma-separated intBITS/GROUP (GROUP -1 = per channel): decoded from the packed
    # arrays (compress/packed.py); int8/32 and int4/32 are llama.cpp's Q8_0 and Q4_0 grids.
    c.packed = p["packed"]
    # Also pack the token embedding / tied LM head at the row's bits, as llama.cpp's files do: "yes", "no", or
    # "auto" = where the compiled CPU kernel (llmopt_jax/kernels) takes those bits. With the kernel the packed head
    # is the faster one (int4 batch 1: 77 vs 64 tokens/s); on XLA's dequantize-then-dot path (int3, no AVX-512,
    # GPU) dequantizing the whole 49152 x 576 head every token is much slower (int4: 16 vs 40 tokens/s).
    c.packed_embedding = "auto"
    c.threads = 0  # llama.cpp threads; 0 = os.cpu_count()
    return c
