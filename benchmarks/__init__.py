"""Benchmarks: baselines to compare against and the harness that times them, kept apart from the library.

``baselines/`` holds straightforward PyTorch implementations of the algorithms the library implements in JAX
(SparseGPT's solver and its end-to-end sequential procedure, GPTQ), each tested to agree with ours; the other
modules time, compare and plot; ``experiments/bench_*.py`` are the thin scripts that drive them from a config.
Nothing here is imported by ``llmopt_jax``; torch and llama-cpp-python (the ``reference`` extra) are optional.
"""
