"""Serving: a continuous-batching engine over a paged KV cache (``engine``, ``scheduler``, ``kv_pages``) and an
OpenAI-compatible HTTP server (``http``)."""
