"""Reference implementations our solvers are timed and checked against (PyTorch, CPU, float32; need the
``reference`` extra). Each imports torch at module import, so import them only after checking it is installed."""
