"""Decode and prefill speed of a pretrained model, next to llama.cpp and the memory-bandwidth bound.

    python -m experiments.bench_decode --config=configs/bench_decode.py:smollm2 --workdir=runs/bench_decode

For each dtype x batch, and for each packed format (``packed``: RTN-quantized weights that stay packed, symmetric
like llama.cpp's Q8_0/Q4_0, the embedding too per ``packed_embedding``): prefill tokens/s (``batch *
prompt_len`` prompt tokens through the jitted prefill) and decode tokens/s (new tokens per second summed over the
batch), medians of ``repeats`` timed runs after a warm-up run that compiles (``benchmarks/decode_timing.py``).
Baselines measured in the same process: (a) llama.cpp (llama-cpp-python, batch 1, same prompt) on GGUFs of
``llama_cpp_types`` written from the same weights, and (b) the bandwidth bound ``batch / (bytes read per decode
step / memory bandwidth)`` with the bandwidth measured by a large jitted reduction. Writes results.json (``rows``,
plus flat keys ``{engine}_{dtype}_b{batch}_{prefill|decode}_tokens_per_s``, ``memory_bandwidth_bytes_per_s``) and
decode.png.
"""

from llmopt_jax import cli


def parse_packed(spec: str) -> tuple[int, int]:
    """``"int4/32"`` -> ``(4, 32)``: bits and group size (-1 = per channel) of a packed-weights row."""
    from llmopt_jax.errors import ConfigError

    name, _, group = spec.strip().partition("/")
    if not name.startswith("int") or not name[3:].isdigit():
        raise ConfigError(f"packed row {spec!r} must look like intBITS/GROUP, e.g. int4/32 or int8/-1")
    try:
        return int(name[3:]), int(group or -1)
    except ValueError as e:
        raise ConfigError(f"packed row {spec!r}: group size must be an integer") from e


def kernel_takes(bits: int) -> bool:
    """Whether the compiled CPU kernel (``llmopt_jax/kernels``) multiplies ``bits``-bit packed weights here."""
    from llmopt_jax.kernels import cpu

    return bits in cpu.SUPPORTED_BITS and cpu.active()


def main(config, workdir):
    from llmopt_jax.config_checks import parse_list
    from llmopt_jax.errors import ConfigError

    # Every list and size is checked before JAX starts, the workdir is touched or a model loads.
    dtypes = parse_list(config.dtypes, "dtypes", str, example="float32,bfloat16")
    batches = parse_list(config.batches, "batches", int, positive=True, item="batch", example="1,8")
    packed = [parse_packed(spec) for spec in parse_list(config.packed, "packed", str, example="int8/32,int4/32")]
    llama_cpp_types = parse_list(config.llama_cpp_types, "llama_cpp_types", str, example="F32,Q8_0,Q4_0")
    if config.packed_embedding not in ("auto", "yes", "no"):
        raise ConfigError(f"packed_embedding must be auto, yes or no, got {config.packed_embedding!r}")
    if config.prompt_len < 1 or config.new_tokens < 2 or config.repeats < 1 or not dtypes or not batches:
        raise ConfigError("bench_decode needs prompt_len >= 1, new_tokens >= 2, repeats >= 1, dtypes and batches")

    import importlib.util
    import os
    import tempfile

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # llama.cpp's spinning OpenMP threads starve JAX here

    import jax
    import numpy as np

    from benchmarks.decode_timing import decode_row, time_llama_cpp, time_ours
    from benchmarks.plots import plot_decode
    from llmopt_jax.compress.api import compress
    from llmopt_jax.data.text import default_text
    from llmopt_jax.infer.roofline import decode_bytes_per_step, measure_memory_bandwidth, tree_bytes
    from llmopt_jax.io.gguf import config_from_gguf, params_from_gguf, read_gguf, resolve_model_path
    from llmopt_jax.io.gguf_write import write_gguf
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.jsonio import write_json

    workdir = cli.prepare_workdir(config, workdir)
    bandwidth = measure_memory_bandwidth()
    print(f"memory bandwidth (jitted 1 GiB reduction): {bandwidth / 1e9:.1f} GB/s")

    context = config.prompt_len + config.new_tokens // 2  # the mean context of the decode steps: KV bytes per step
    rows = []
    prompt = None
    for dtype in dtypes:
        model = load_pretrained(config.model, dtype=dtype, param_dtype=dtype, scan_layers=config.scan_layers)
        if prompt is None:
            prompt = model.tokenizer.encode(default_text())[: config.prompt_len]
        weight_bytes = tree_bytes(model.params)
        for batch in batches:
            prefill, decode, tokens = time_ours(model, batch, prompt, config.new_tokens, config.repeats)
            step_bytes = decode_bytes_per_step(model.cfg, batch, context, weight_bytes, np.dtype(dtype).itemsize)
            rows.append(decode_row("jax", dtype, batch, prefill, decode, batch * bandwidth / step_bytes,
                                   weight_bytes, tokens))
        del model

    for bits, group in packed:  # float32 compute from packed weights (RTN, symmetric: llama.cpp's Q8_0/Q4_0 grid)
        # Scanned layers: with unrolled layers XLA:CPU fuses each kernel's dequantization into its dot and runs
        # that as a naive loop (measured 5.8 vs 46 tokens/s for int4 at batch 1). With the compiled CPU kernel
        # (llmopt_jax/kernels: decode-sized int4/int8 products) scanned is still a little faster (77 vs 69).
        model = load_pretrained(config.model, scan_layers=True)
        recipe = [{"method": "rtn", "bits": bits, "group_size": group, "symmetric": True}]
        if config.packed_embedding == "yes" or (config.packed_embedding == "auto" and kernel_takes(bits)):
            recipe.append({"method": "embedding", "bits": bits})
        quantized = compress(model, recipe, progress=False)
        dtype = f"int{bits}" + (f"_g{group}" if group > 0 else "")
        weight_bytes = quantized.bytes_held
        for batch in batches:
            prefill, decode, tokens = time_ours(quantized, batch, prompt, config.new_tokens, config.repeats)
            bound = batch * bandwidth / decode_bytes_per_step(model.cfg, batch, context, weight_bytes, 4)
            rows.append(decode_row("jax", dtype, batch, prefill, decode, bound, weight_bytes, tokens))
        del model, quantized

    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if config.llama_cpp and not have_llama_cpp:
        print("llama-cpp-python not installed (pip install -e '.[reference]'): no llama.cpp rows")
    if config.llama_cpp and have_llama_cpp:
        source = read_gguf(resolve_model_path(config.model))
        cfg = config_from_gguf(source)
        params = params_from_gguf(source, cfg)
        threads = config.threads or os.cpu_count()
        with tempfile.TemporaryDirectory() as tmp:
            for gguf_type in llama_cpp_types:
                path = os.path.join(tmp, f"model-{gguf_type}.gguf")
                write_gguf(path, cfg, params, tensor_type=gguf_type, metadata_from=source)
                prefill, decode, tokens = time_llama_cpp(path, prompt, config.new_tokens, config.repeats, threads)
                dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(gguf_type, gguf_type.lower())
                weight_bytes = os.path.getsize(path)
                bound = bandwidth / decode_bytes_per_step(cfg, 1, context, weight_bytes, 2)  # F16 KV cache
                rows.append(decode_row("llama.cpp", dtype, 1, prefill, decode, bound, weight_bytes, tokens,
                                       threads=threads))

    results = {"rows": rows, "memory_bandwidth_bytes_per_s": bandwidth, "prompt_len": config.prompt_len,
               "new_tokens": config.new_tokens, "repeats": config.repeats, "device": str(jax.devices()[0]),
               "cpu_count": os.cpu_count()}
    for r in rows:
        key = f"{r['engine'].replace('.', '_')}_{r['dtype']}_b{r['batch']}"
        results[f"{key}_prefill_tokens_per_s"] = r["prefill_tokens_per_s"]
        results[f"{key}_decode_tokens_per_s"] = r["decode_tokens_per_s"]
    # Same-run ratios: ours over llama.cpp at the same precision, batch 1.
    for ours_dtype, theirs in (("float32", "float32"), ("bfloat16", "float16"), ("int8_g32", "q8_0"),
                               ("int4_g32", "q4_0")):
        a = results.get(f"jax_{ours_dtype}_b1_decode_tokens_per_s")
        b = results.get(f"llama_cpp_{theirs}_b1_decode_tokens_per_s")
        if a and b:
            results[f"decode_ratio_jax_{ours_dtype}_vs_llama_cpp_{theirs}"] = a / b
            print(f"decode ratio jax {ours_dtype} / llama.cpp {theirs}: {a / b:.2f}x")
    write_json(f"{workdir}/results.json", results)
    plot_decode(rows, f"{workdir}/decode.png")


if __name__ == "__main__":
    cli.run(main)
