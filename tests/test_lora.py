"""LoRA / QLoRA (peft/lora.py, peft/finetune.py): the adapted model equals the merged one, only adapters train,
a packed 4-bit base runs, adapters round-trip through PEFT's layout (and load in ``peft`` when installed), and the
lora / qlora smoke presets run end to end on SmolLM2."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from llmopt_jax.compress.packed import PackedTensor, packed_model
from llmopt_jax.errors import ConfigError, LlmoptError
from llmopt_jax.models.decoder import Decoder
from llmopt_jax.parallel.sharded_init import load_params
from llmopt_jax.peft import lora as L
from llmopt_jax.train.optim import make_optimizer
from llmopt_jax.train.step import jit_train_step
from tests.conftest import load_config, run_cli

LCFG = L.LoraConfig(rank=4, alpha=8.0, dropout=0.1)


def tiny_model(cfg):
    _, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(params=0)))
    return nnx.to_pure_dict(params)


def random_adapters(pure, lcfg=LCFG, seed=1):
    """Adapters with a non-zero B, so the update is visible."""
    adapters = L.init_adapters(pure, lcfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _forward(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)[0]


_jit_forward = jax.jit(_forward, static_argnums=0)


def logits(graphdef, params, tokens):
    """The model's logits, jitted (eager dispatch of every op is far slower on a busy CPU)."""
    return np.asarray(_jit_forward(graphdef, params, tokens))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))


def test_adapted_model_equals_merged_and_unmerge_restores(tiny_cfg):
    cfg = tiny_cfg
    pure = tiny_model(cfg)
    graphdef, frozen = load_params(cfg, pure, dot_general=L.lora_dot_general)
    fresh = L.init_adapters(pure, LCFG, jax.random.PRNGKey(0))
    # B starts at zero: the adapted model is the base model.
    np.testing.assert_allclose(logits(graphdef, L.adapted_state(frozen, fresh, LCFG), TOKENS),
                               logits(graphdef, frozen, TOKENS), atol=1e-6)
    adapters = random_adapters(pure)
    adapted = logits(graphdef, L.adapted_state(frozen, adapters, LCFG), TOKENS)
    merged = L.merge_adapters(pure, adapters, LCFG)
    np.testing.assert_allclose(logits(*load_params(cfg, merged), TOKENS), adapted, atol=2e-5)
    assert not np.allclose(adapted, logits(graphdef, frozen, TOKENS), atol=1e-3)
    for a, b in zip(jax.tree.leaves(L.unmerge_adapters(merged, adapters, LCFG)), jax.tree.leaves(pure)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Dropout draws masks only when given a key (training), differently per key.
    train = jax.jit(lambda key: _forward(graphdef, L.adapted_state(frozen, adapters, LCFG, key), TOKENS))
    assert not np.allclose(train(jax.random.PRNGKey(5)), adapted, atol=1e-4)
    assert not np.allclose(train(jax.random.PRNGKey(5)), train(jax.random.PRNGKey(6)), atol=1e-4)


def test_unrolled_layers(tiny_cfg):
    """Unrolled blocks (``scan_layers=False``): adapters per block index; merge equals each block's own delta and
    unmerge restores the kernels (the model math is the stacked case's)."""
    cfg = dataclasses.replace(tiny_cfg, scan_layers=False)
    pure = tiny_model(cfg)
    adapters = random_adapters(pure)
    assert sorted(adapters["layers"]) == [0, 1] and adapters["layers"][1]["o_proj"]["lora_a"].shape == (4, 8, 4)
    adapted = L.apply_adapters(pure, adapters, LCFG)
    assert isinstance(adapted["layers"][0]["q_proj"]["kernel"], L.LoraKernel)
    merged = L.merge_adapters(pure, adapters, LCFG)
    ad = adapters["layers"][1]["down_proj"]
    np.testing.assert_allclose(merged["layers"][1]["down_proj"]["kernel"],
                               pure["layers"][1]["down_proj"]["kernel"] + 2.0 * ad["lora_a"] @ ad["lora_b"], atol=1e-6)
    for a, b in zip(jax.tree.leaves(L.unmerge_adapters(merged, adapters, LCFG)), jax.tree.leaves(pure)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_config_checks():
    with pytest.raises(ConfigError, match="rank"):
        L.LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="unknown layer"):
        L.LoraConfig(targets=("qkv",))
    assert L.LoraConfig.from_mapping({"rank": 2, "alpha": 4, "targets": "q_proj, v_proj"}).targets == ("q_proj", "v_proj")
    from llmopt_jax.config_checks import check_train_settings

    config = load_config("train", "lora_smoke")
    check_train_settings(config)
    config.train.offload_optimizer = True  # would otherwise be ignored silently: the adapters' state is placed apart
    with pytest.raises(ConfigError, match="offload_optimizer does not apply to LoRA"):
        check_train_settings(config)


def test_only_adapters_train(tiny_cfg):
    """The jitted train step updates the adapters only; the optimizer holds state only for them."""
    pure = tiny_model(tiny_cfg)
    graphdef, frozen = load_params(tiny_cfg, pure, dot_general=L.lora_dot_general)
    adapters = L.init_adapters(pure, LCFG, jax.random.PRNGKey(0))
    optimizer = make_optimizer(dict(learning_rate=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.0))
    from llmopt_jax.parallel.mesh import MESH_AXES

    mesh = Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
    from jax.sharding import NamedSharding, PartitionSpec

    rep = NamedSharding(mesh, PartitionSpec())
    state = {"step": jnp.zeros((), jnp.int32), "params": adapters, "opt_state": optimizer.init(adapters)}
    assert L.count_params(state["opt_state"]) <= 2 * L.count_params(adapters) + 4  # Adam moments (+ counters)
    combine = lambda f, p, i: L.adapted_state(f, p, LCFG, jax.random.fold_in(jax.random.PRNGKey(0), i))  # noqa
    step = jit_train_step(graphdef, optimizer, jax.tree.map(lambda _: rep, state), mesh, combine=combine,
                          frozen_shardings=jax.tree.map(lambda x: rep, frozen))
    before = jax.tree.map(np.asarray, frozen)
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, 4, 17)))
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert float(jnp.abs(state["params"]["layers"]["q_proj"]["lora_b"]).max()) > 0


def test_qlora_packed_base(tiny_cfg):
    pure = tiny_model(tiny_cfg)
    packed = L.quantize_base(pure, bits=4, group_size=16)
    kernel = packed["layers"]["gate_proj"]["kernel"]
    assert isinstance(kernel, PackedTensor) and kernel.bits == 4 and kernel.data.dtype == jnp.uint8
    from llmopt_jax.infer.roofline import tree_bytes

    assert tree_bytes(packed["layers"]) < 0.3 * tree_bytes(pure["layers"])
    graphdef, frozen = packed_model(tiny_cfg, packed, dot_general=L.lora_dot_general)
    adapters = random_adapters(pure)
    out = logits(graphdef, L.adapted_state(frozen, adapters, LCFG), TOKENS)
    # Merging dequantizes the base: the same function as float weights.
    np.testing.assert_allclose(logits(*load_params(tiny_cfg, L.merge_adapters(packed, adapters, LCFG)), TOKENS),
                               out, atol=2e-5)
    grads = jax.jit(jax.grad(lambda a: jnp.mean(_forward(graphdef, L.adapted_state(frozen, a, LCFG), TOKENS) ** 2)))(
        adapters)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("rope_interleaved", [False, True])
def test_peft_layout_round_trip(tiny_cfg, tmp_path, rope_interleaved):
    cfg = dataclasses.replace(tiny_cfg, rope_interleaved=rope_interleaved)
    pure = tiny_model(cfg)
    adapters = random_adapters(pure)
    L.save_peft_adapter(str(tmp_path), adapters, LCFG, cfg, "HuggingFaceTB/SmolLM2-135M-Instruct")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    assert sorted(config["target_modules"]) == sorted(L.LORA_TARGETS)
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    d, f, kv = cfg.d_model, cfg.mlp_dim, cfg.num_kv_heads * cfg.head_dim
    expected = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, kv), "self_attn.v_proj": (d, kv),
                "self_attn.o_proj": (d, d), "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    want = {}
    for i in range(cfg.num_layers):
        for module, (fan_in, fan_out) in expected.items():
            want[f"base_model.model.model.layers.{i}.{module}.lora_A.weight"] = (4, fan_in)
            want[f"base_model.model.model.layers.{i}.{module}.lora_B.weight"] = (fan_out, 4)
    assert {k: v.shape for k, v in tensors.items()} == want
    loaded, lcfg = L.load_peft_adapter(str(tmp_path), cfg)
    assert lcfg == LCFG
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(LlmoptError, match="adapter_model.safetensors is missing"):
        L.load_peft_adapter(str(tmp_path), cfg)


def test_peft_library_loads_our_adapter(tiny_cfg, tmp_path):
    """Hugging Face ``peft`` on ``transformers``' Llama computes what our adapted model does (skipped when the
    packages are absent: they are not dependencies)."""
    pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import peft

    from llmopt_jax.io.safetensors import write_hf_checkpoint

    cfg = dataclasses.replace(tiny_cfg, rope_interleaved=True)  # as loaded from GGUF: q/k permuted on export
    pure = tiny_model(cfg)
    adapters = random_adapters(pure)
    graphdef, frozen = load_params(cfg, pure, dot_general=L.lora_dot_general)
    ours = logits(graphdef, L.adapted_state(frozen, adapters, LCFG), TOKENS)
    write_hf_checkpoint(str(tmp_path / "base"), cfg, pure)
    L.save_peft_adapter(str(tmp_path / "adapter"), adapters, LCFG, cfg, str(tmp_path / "base"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert set(peft.get_peft_model_state_dict(model)) == set(L.peft_state_dict(adapters, LCFG, cfg))


def test_smollm2_preset_trains_under_one_percent():
    """The lora preset's adapters on SmolLM2-135M's shapes (no weights needed): < 1 % of the parameters."""
    from llmopt_jax.models.config import ModelConfig
    from llmopt_jax.parallel.sharded_init import abstract_model
    from llmopt_jax.peft.finetune import lora_enabled

    config = load_config("train", "lora")
    assert lora_enabled(config) and not lora_enabled(load_config("train", "smoke"))
    assert load_config("train", "qlora").lora.base_bits == 4
    cfg = ModelConfig.from_mapping(config.model)
    _, abstract = abstract_model(cfg)
    pure = nnx.to_pure_dict(abstract)
    adapters = jax.eval_shape(lambda: L.init_adapters(pure, L.LoraConfig.from_mapping(config.lora),
                                                      jax.random.PRNGKey(0)))
    fraction = L.count_params(adapters) / L.count_params(pure)
    assert 0.005 < fraction < 0.01, fraction


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["lora_smoke", "qlora_smoke"])
def test_finetune_cli_smoke(tmp_path, preset):
    """The fine-tuning contract: results keys, the adapter in PEFT's layout, QLoRA holding a packed base."""
    workdir = tmp_path / "run"
    train, heldout = tmp_path / "train.txt", tmp_path / "heldout.txt"
    from llmopt_jax.data.text import topics_split

    train.write_text("\n\n".join(topics_split("train")[:6]))
    heldout.write_text("\n\n".join(topics_split("heldout")[:2]))
    proc = run_cli(["experiments.train", f"--config=configs/train.py:{preset}", f"--workdir={workdir}",
                    f"--config.data.text_files={train}", f"--config.eval.text_file={heldout}",
                    "--config.train.steps=2", "--config.train.progress=False"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    for key in ("trainable_params", "eval_perplexity_before", "eval_perplexity_after", "bytes_held",
                "initial_loss", "final_loss", "steps", "tokens_per_s", "mfu", "num_params"):
        assert key in results, key
    assert results["trainable_params"] / results["num_params"] < 0.01
    assert np.isfinite(results["eval_perplexity_after"]) and results["eval_perplexity_before"] > 1
    if preset.startswith("qlora"):
        assert results["bytes_held_base"] < 0.6 * 4 * results["num_params"]  # 4-bit block linears
    config = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    from safetensors.numpy import load_file

    keys = load_file(str(workdir / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.29.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 30 * 7 * 2


@pytest.mark.parametrize("key, value, fragment", [
    ("lora.targets", "q_proj,qkv", "unknown layer 'qkv'"),
    ("lora.targets", "", "lora.targets is empty"),
    ("lora.dropout", 1.0, "lora.dropout=1.0"),
    ("lora.base_bits", 5, "lora.base_bits=5"),
    ("init_from", "", "set init_from"),
    ("eval.text_file", "/no/such/heldout.txt", "text file not found: /no/such/heldout.txt"),
    ("data.documents", "sentences", "data.documents='sentences'"),
])
def test_finetune_settings_checked_before_anything_slow(key, value, fragment):
    from llmopt_jax.config_checks import check_train_settings
    from llmopt_jax.errors import DataError

    config = load_config("train", "qlora_smoke")
    check_train_settings(config)
    section, name = key.split(".") if "." in key else (None, key)
    (config[section] if section else config)[name] = value
    with pytest.raises((ConfigError, DataError), match=fragment.replace("(", r"\(")):
        check_train_settings(config)
