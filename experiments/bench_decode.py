"""Decode and prefill speed of a pretrained model, next to llama.cpp and the memory-bandwidth bound.

    python -m experiments.bench_decode --config=configs/bench_decode.py:smollm2 --workdir=runs/bench_decode

For each dtype x batch, and for each packed format (``packed``: RTN-quantized weights that stay packed, symmetric
like llama.cpp's Q8_0/Q4_0, the embedding too unless ``packed_embedding=False``): prefill tokens/s (``batch * prompt_len`` prompt tokens through the jitted prefill)
and decode tokens/s (new tokens per second summed over the batch), medians of ``repeats`` timed runs after
a warm-up run that compiles. Baselines measured in the same process: (a) llama.cpp (llama-cpp-python,
batch 1, same prompt) on F32/F16 GGUFs written from the same weights, and (b) the bandwidth bound
``batch / (bytes read per decode step / memory bandwidth)`` with the bandwidth measured by a large jitted
reduction. Writes results.json (``rows``, plus flat keys ``{engine}_{dtype}_b{batch}_{prefill|decode}_tokens_per_s``,
``memory_bandwidth_bytes_per_s``) and decode.png.
"""

from llmopt_jax import cli


def time_ours(model, dtype, batch, prompt, new_tokens, repeats):
    """Median prefill and decode tokens/s of our Generator (greedy, no stop tokens)."""
    import statistics

    from llmopt_jax.infer.generate import Generator

    gen = Generator(model.graphdef, model.params)
    gen.generate([prompt] * batch, new_tokens)  # compiles
    runs = [gen.generate([prompt] * batch, new_tokens) for _ in range(repeats)]
    assert gen.num_compiled == {"prefill": 1, "decode": 1}
    return (
        statistics.median(r.prefill_tokens_per_s for r in runs),
        statistics.median(r.decode_tokens_per_s for r in runs),
        runs[0].tokens[0],
    )


def time_llama_cpp(path, prompt, new_tokens, repeats, threads):
    """Median prefill and decode tokens/s of llama.cpp at batch 1 (greedy, F16 KV cache as it ships)."""
    import statistics
    import time

    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + new_tokens + 8, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    prefill, decode, tokens = [], [], []
    for _ in range(repeats + 1):  # the first run warms caches and is dropped
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        tokens = [nxt]
        for _ in range(new_tokens - 1):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(nxt)
        t2 = time.perf_counter()
        prefill.append(len(prompt) / (t1 - t0))
        decode.append((new_tokens - 1) / (t2 - t1))
    return statistics.median(prefill[1:]), statistics.median(decode[1:]), tokens


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


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['engine']}\n{r['dtype']} b{r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    ax.bar(labels, [r["decode_tokens_per_s"] for r in rows], color="tab:blue", label="measured decode")
    bounds = [r.get("bandwidth_bound_tokens_per_s") for r in rows]
    ax.scatter(labels, [b or float("nan") for b in bounds], color="tab:red", marker="_", s=600, label="bandwidth bound")
    ax.set_ylabel("decode tokens/s (sum over batch)")
    ax.legend()
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(config, workdir):
    import importlib.util
    import os
    import tempfile

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # llama.cpp's spinning OpenMP threads starve JAX here
    from types import SimpleNamespace

    import jax
    import numpy as np

    from llmopt_jax.compress.study import compress_model
    from llmopt_jax.data.text import default_text
    from llmopt_jax.errors import ConfigError
    from llmopt_jax.infer.roofline import decode_bytes_per_step, measure_memory_bandwidth, tree_bytes
    from llmopt_jax.io.gguf import config_from_gguf, params_from_gguf, read_gguf, resolve_model_path
    from llmopt_jax.io.gguf_write import write_gguf
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.jsonio import write_json

    workdir = cli.prepare_workdir(config, workdir)
    dtypes = [d for d in config.dtypes.split(",") if d]
    batches = [int(b) for b in config.batches.split(",") if b]
    if config.prompt_len < 1 or config.new_tokens < 2 or config.repeats < 1 or not dtypes or not batches:
        raise ConfigError("bench_decode needs prompt_len >= 1, new_tokens >= 2, repeats >= 1, dtypes and batches")
    bandwidth = measure_memory_bandwidth()
    print(f"memory bandwidth (jitted 1 GiB reduction): {bandwidth / 1e9:.1f} GB/s")

    packed = [parse_packed(spec) for spec in config.packed.split(",") if spec]
    rows = []
    prompt = None
    for dtype in dtypes:
        model = load_pretrained(config.model, dtype=dtype, param_dtype=dtype, scan_layers=config.scan_layers)
        if prompt is None:
            prompt = model.tokenizer.encode(default_text())[: config.prompt_len]
        weight_bytes = tree_bytes(model.params)
        for batch in batches:
            prefill, decode, tokens = time_ours(model, dtype, batch, prompt, config.new_tokens, config.repeats)
            # The mean context over the decode steps sets the KV bytes read per step.
            context = config.prompt_len + config.new_tokens // 2
            step_bytes = decode_bytes_per_step(model.cfg, batch, context, weight_bytes, np.dtype(dtype).itemsize)
            bound = batch * bandwidth / step_bytes
            rows.append(dict(engine="jax", dtype=dtype, batch=batch, prefill_tokens_per_s=prefill,
                             decode_tokens_per_s=decode, bandwidth_bound_tokens_per_s=bound,
                             fraction_of_bound=decode / bound, weight_bytes=weight_bytes, greedy_tokens=tokens))
            print(f"jax {dtype:8s} b{batch}: prefill {prefill:8,.0f} tok/s  decode {decode:7,.1f} tok/s "
                  f"({decode / bound:.0%} of the {bound:,.1f} tok/s bandwidth bound)")
        del model

    for bits, group in packed:  # float32 compute from packed weights (RTN, symmetric: llama.cpp's Q8_0/Q4_0 grid)
        # Scanned layers: with unrolled layers XLA:CPU fuses each kernel's dequantization into its dot and runs
        # that as a naive loop (measured 5.8 vs 46 tokens/s for int4 at batch 1).
        model = load_pretrained(config.model, scan_layers=True)
        step = {"name": "rtn", "bits": bits, "group_size": group, "symmetric": True}
        graphdef, params, _, _ = compress_model(model, None, step, embedding_bits=bits if config.packed_embedding else 0)
        quantized = SimpleNamespace(graphdef=graphdef, params=params, cfg=model.cfg)
        dtype = f"int{bits}" + (f"_g{group}" if group > 0 else "")
        weight_bytes = tree_bytes(params)
        for batch in batches:
            prefill, decode, tokens = time_ours(quantized, dtype, batch, prompt, config.new_tokens, config.repeats)
            context = config.prompt_len + config.new_tokens // 2
            bound = batch * bandwidth / decode_bytes_per_step(model.cfg, batch, context, weight_bytes, 4)
            rows.append(dict(engine="jax", dtype=dtype, batch=batch, prefill_tokens_per_s=prefill,
                             decode_tokens_per_s=decode, bandwidth_bound_tokens_per_s=bound,
                             fraction_of_bound=decode / bound, weight_bytes=weight_bytes, greedy_tokens=tokens))
            print(f"jax {dtype:8s} b{batch}: prefill {prefill:8,.0f} tok/s  decode {decode:7,.1f} tok/s "
                  f"({decode / bound:.0%} of the {bound:,.1f} tok/s bandwidth bound), {weight_bytes / 2**20:.1f} MiB")
        del model, quantized, params

    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if config.llama_cpp and not have_llama_cpp:
        print("llama-cpp-python not installed (pip install -e '.[reference]'): no llama.cpp rows")
    if config.llama_cpp and have_llama_cpp:
        source = read_gguf(resolve_model_path(config.model))
        cfg = config_from_gguf(source)
        params = params_from_gguf(source, cfg)
        threads = config.threads or os.cpu_count()
        with tempfile.TemporaryDirectory() as tmp:
            for gguf_type in [t for t in config.llama_cpp_types.split(",") if t]:
                path = os.path.join(tmp, f"model-{gguf_type}.gguf")
                write_gguf(path, cfg, params, tensor_type=gguf_type, metadata_from=source)
                prefill, decode, tokens = time_llama_cpp(path, prompt, config.new_tokens, config.repeats, threads)
                dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(gguf_type, gguf_type.lower())
                weight_bytes = os.path.getsize(path)
                context = config.prompt_len + config.new_tokens // 2
                bound = bandwidth / decode_bytes_per_step(cfg, 1, context, weight_bytes, 2)  # F16 KV cache
                rows.append(dict(engine="llama.cpp", dtype=dtype, batch=1, prefill_tokens_per_s=prefill,
                                 decode_tokens_per_s=decode, bandwidth_bound_tokens_per_s=bound,
                                 fraction_of_bound=decode / bound, weight_bytes=weight_bytes, greedy_tokens=tokens,
                                 threads=threads))
                print(f"llama.cpp {gguf_type:5s} b1: prefill {prefill:8,.0f} tok/s  decode {decode:7,.1f} tok/s "
                      f"({decode / bound:.0%} of the {bound:,.1f} tok/s bandwidth bound)")

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
    plot(rows, f"{workdir}/decode.png")


if __name__ == "__main__":
    cli.run(main)
