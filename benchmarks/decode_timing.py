"""Decode benchmark measurements: prefill and decode tokens/s of our Generator and of llama.cpp (the baseline), and
the result row each gives next to the memory-bandwidth bound."""

from __future__ import annotations

import statistics
import time


def time_ours(model, batch: int, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float, list]:
    """Median prefill and decode tokens/s of our Generator (greedy, no stop tokens) and the first sequence's tokens."""
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


def time_llama_cpp(path: str, prompt: list[int], new_tokens: int, repeats: int,
                   threads: int) -> tuple[float, float, list[int]]:
    """Median prefill and decode tokens/s of llama.cpp at batch 1 (greedy, F16 KV cache as it ships) and its
    tokens."""
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


def decode_row(engine: str, dtype: str, batch: int, prefill: float, decode: float, bound: float, weight_bytes: int,
               tokens: list, **extra) -> dict:
    """One results row (``extra`` keys appended), printed as one line: tokens/s and the fraction of the bound."""
    row = dict(engine=engine, dtype=dtype, batch=batch, prefill_tokens_per_s=prefill, decode_tokens_per_s=decode,
               bandwidth_bound_tokens_per_s=bound, fraction_of_bound=decode / bound, weight_bytes=weight_bytes,
               greedy_tokens=tokens, **extra)
    print(f"{engine} {dtype:8s} b{batch}: prefill {prefill:8,.0f} tok/s  decode {decode:7,.1f} tok/s "
          f"({decode / bound:.0%} of the {bound:,.1f} tok/s bandwidth bound), {weight_bytes / 2**20:.1f} MiB")
    return row
