"""llmopt_jax: LLM performance techniques (training, inference, compression) in JAX/Flax.

``import llmopt_jax as lj`` gives what a notebook needs::

    model = lj.load_pretrained("smollm2-135m")
    lj.evaluate_perplexity(model, text).perplexity
    lj.chat(model, "What is a Python list?")
    calib = lj.calibration_windows(model.tokenizer, sources="topics", num=32, length=512)
    small = lj.compress(model, [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "gptq", "bits": 4}], calib)
    lj.save_model(small, "small.gguf", tensor_type="Q4_1")
    lj.train(lj.load_config("configs/train.py:smoke"), "runs/smoke")

Names resolve on first use, so ``import llmopt_jax`` stays cheap and the command-line tools can set up JAX first.
Import submodules with ``from llmopt_jax.compress.quantize import QuantGrid`` (not ``import llmopt_jax.compress.X as
m``: ``lj.compress`` is the function).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # models in and out
    "load_pretrained": "llmopt_jax.io.load", "PretrainedModel": "llmopt_jax.io.load",
    "save_model": "llmopt_jax.io.save",
    "ModelConfig": "llmopt_jax.models.config",
    # evaluation and generation
    "evaluate_perplexity": "llmopt_jax.eval.perplexity", "PerplexityResult": "llmopt_jax.eval.perplexity",
    "Generator": "llmopt_jax.infer.generate", "SamplingConfig": "llmopt_jax.infer.generate",
    "chat": "llmopt_jax.infer.generate", "SpeculativeGenerator": "llmopt_jax.infer.speculative",
    # compression: the API and the transform constructors
    "compress": "llmopt_jax.compress.api", "CompressedModel": "llmopt_jax.compress.api",
    "method_recipe": "llmopt_jax.compress.api", "plan_recipe": "llmopt_jax.compress.api",
    "magnitude": "llmopt_jax.compress.recipe", "wanda": "llmopt_jax.compress.recipe",
    "sparsegpt": "llmopt_jax.compress.recipe", "rtn": "llmopt_jax.compress.recipe",
    "gptq": "llmopt_jax.compress.recipe", "chain": "llmopt_jax.compress.recipe",
    "QuantGrid": "llmopt_jax.compress.quantize", "compress_sequentially": "llmopt_jax.compress.calibrate",
    # mixture of experts: MoEfication and QMoE
    "moefy": "llmopt_jax.compress.moefy", "quantize_experts": "llmopt_jax.compress.qmoe",
    "pack_experts": "llmopt_jax.compress.qmoe", "expert_storage": "llmopt_jax.compress.qmoe",
    # data
    "calibration_windows": "llmopt_jax.data.text", "load_texts": "llmopt_jax.data.text",
    "stdlib_docstrings_text": "llmopt_jax.data.text", "python_license_text": "llmopt_jax.data.text",
    "default_text": "llmopt_jax.data.text",
    # serving
    "Engine": "llmopt_jax.serve.engine", "EngineConfig": "llmopt_jax.serve.engine",
    "SamplingParams": "llmopt_jax.serve.scheduler",
    # training, fine-tuning and parallelism
    "train": "llmopt_jax.train.loop", "load_config": "llmopt_jax.config_loader",
    "create_mesh": "llmopt_jax.parallel.mesh",
    "LoraConfig": "llmopt_jax.peft.lora", "init_adapters": "llmopt_jax.peft.lora",
    "apply_adapters": "llmopt_jax.peft.lora", "merge_adapters": "llmopt_jax.peft.lora",
    "save_peft_adapter": "llmopt_jax.peft.lora", "load_peft_adapter": "llmopt_jax.peft.lora",
    # errors
    "LlmoptError": "llmopt_jax.errors", "ConfigError": "llmopt_jax.errors", "DataError": "llmopt_jax.errors",
}

__all__ = sorted(_EXPORTS)

# ``lj.compress`` and ``lj.train`` are functions, but ``llmopt_jax.compress`` / ``llmopt_jax.train`` are also
# subpackages, and Python binds a subpackage to its parent's attribute when it is first imported, which would hide
# the functions. Importing the two (empty) subpackages here, then dropping those bindings, settles it once: later
# ``from llmopt_jax.compress.X import Y`` imports find the subpackages in ``sys.modules`` and bind nothing here.
from llmopt_jax import compress as _compress_package, train as _train_package  # noqa: E402

del compress, train  # noqa: F821 - bound by the import above


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmopt_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
