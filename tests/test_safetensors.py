"""Hugging Face safetensors checkpoints: exact round trips, HF's layout and sharding, rotary layout, clear errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from llmopt_jax.io.safetensors import SafetensorsError, read_hf_checkpoint, write_hf_checkpoint
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.mesh import create_mesh
from llmopt_jax.parallel.sharded_init import abstract_model, load_params

# head_dim 12 != d_model / num_heads, so config.json's head_dim is exercised; GQA with 2 query heads per kv head.
CFG = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, head_dim=12,
                  rope_base=5000.0, rms_eps=1e-6, max_seq_len=128)


def random_model(cfg: ModelConfig, seed: int = 0, mesh=None) -> nnx.State:
    """Random parameters (norms not all ones, so a misplaced norm would show) as an ``nnx.State`` of jax arrays.

    Drawn with NumPy from the model's abstract shapes: ``init_model`` would compile an initialiser per config.
    """
    rng = np.random.default_rng(seed)
    pure = nnx.to_pure_dict(abstract_model(cfg)[1])
    pure = jax.tree.map(lambda x: (cfg.init_std * rng.standard_normal(x.shape)).astype(np.float32), pure)
    for layer in [pure["layers"]] if cfg.scan_layers else pure["layers"].values():
        for norm in ("attn_norm", "mlp_norm"):
            layer[norm]["scale"] += 1
    pure["final_norm"]["scale"] += 1
    return load_params(cfg, pure, mesh)[1]


def as_numpy(tree) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree)


def assert_trees_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype == np.float32
        np.testing.assert_array_equal(x, y)


def logits(cfg: ModelConfig, pure: dict, tokens) -> np.ndarray:
    graphdef, params = load_params(cfg, pure)
    return np.asarray(nnx.merge(graphdef, params)(tokens)[0])


TOKENS = jnp.array([[3, 17, 42, 5, 88, 0, 61, 9], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("scan,tie,sharded", [(True, True, False), (False, True, True), (True, False, True),
                                              (False, False, False)])
def test_round_trip_is_exact(tmp_path, scan, tie, sharded):
    cfg = dataclasses.replace(CFG, scan_layers=scan, tie_embeddings=tie)
    params = random_model(cfg, mesh=create_mesh(dict(data=2, fsdp=2, tensor=2)) if sharded else None)
    if sharded:
        assert len(jax.tree.leaves(params)[-1].sharding.device_set) == 8
    files = write_hf_checkpoint(str(tmp_path / "ckpt"), cfg, params)
    assert sorted(os.path.basename(f) for f in files) == ["config.json", "model.safetensors"]
    config = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["torch_dtype"], config["head_dim"], config["tie_word_embeddings"]) == ("float32", 12, tie)
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) == (not tie)
        assert f.get_slice("model.layers.1.self_attn.o_proj.weight").get_shape() == [32, 48]  # [out, in]
    read_cfg, pure = read_hf_checkpoint(str(tmp_path / "ckpt"), scan_layers=scan)
    assert read_cfg == cfg
    assert_trees_equal(pure, as_numpy(params))


def test_sharded_checkpoint_has_hf_index_and_reads_back(tmp_path):
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    params = random_model(cfg)
    files = write_hf_checkpoint(str(tmp_path / "ckpt"), cfg, params, max_shard_bytes=20_000)
    names = sorted(os.listdir(tmp_path / "ckpt"))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors" not in names
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    assert sorted(map(os.path.basename, files)) == sorted(names)
    index = json.load(open(tmp_path / "ckpt" / "model.safetensors.index.json"))
    total, seen = 0, {}
    for shard in shards:
        with safe_open(str(tmp_path / "ckpt" / shard), framework="numpy") as f:
            for name in f.keys():
                seen[name] = shard
                total += f.get_tensor(name).nbytes
    assert index["weight_map"] == seen and len(seen) == 3 + 9 * cfg.num_layers
    assert index["metadata"]["total_size"] == total
    _, pure = read_hf_checkpoint(str(tmp_path / "ckpt"))
    assert_trees_equal(pure, as_numpy(params))


@pytest.mark.parametrize("dtype,np_dtype,code", [("bfloat16", ml_dtypes.bfloat16, "BF16"), ("float16", np.float16, "F16")])
def test_half_precision_export_reads_back_rounded(tmp_path, dtype, np_dtype, code):
    params = random_model(CFG)
    write_hf_checkpoint(str(tmp_path / "ckpt"), CFG, params, dtype=dtype)
    assert json.load(open(tmp_path / "ckpt" / "config.json"))["torch_dtype"] == dtype
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {code}
    _, pure = read_hf_checkpoint(str(tmp_path / "ckpt"))
    assert_trees_equal(pure, jax.tree.map(lambda x: x.astype(np_dtype).astype(np.float32), as_numpy(params)))


def test_interleaved_rope_model_exports_to_an_equivalent_hf_checkpoint(tmp_path):
    """A GGUF-layout (interleaved) model exported and re-imported (rotate-half layout) computes the same logits."""
    cfg = dataclasses.replace(CFG, rope_interleaved=True, init_std=0.3)  # large enough for attention to matter
    params = random_model(cfg)
    original = as_numpy(params)
    write_hf_checkpoint(str(tmp_path / "ckpt"), cfg, params)
    hf_cfg, pure = read_hf_checkpoint(str(tmp_path / "ckpt"))
    assert not hf_cfg.rope_interleaved and hf_cfg == dataclasses.replace(cfg, rope_interleaved=False)
    assert not np.array_equal(pure["layers"]["q_proj"]["kernel"], original["layers"]["q_proj"]["kernel"])
    np.testing.assert_allclose(logits(hf_cfg, pure, TOKENS), logits(cfg, original, TOKENS), rtol=1e-5, atol=1e-5)
    # The same weights read in the wrong layout do not match: the check above has teeth.
    assert not np.allclose(logits(cfg, pure, TOKENS), logits(cfg, original, TOKENS), atol=1e-2)
    # Reading back into the interleaved layout inverts the export permutation exactly.
    _, again = read_hf_checkpoint(str(tmp_path / "ckpt"), rope_interleaved=True)
    assert_trees_equal(again, original)


def numpy_hf_llama(w: dict, config: dict, tokens: np.ndarray) -> np.ndarray:
    """LlamaForCausalLM's forward pass written from the HF modeling code, on HF-named [out, in] weights."""
    h, k, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    hd = config["hidden_size"] // h
    seq = tokens.shape[0]

    def norm(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale

    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    angles = np.concatenate([np.outer(np.arange(seq), inv_freq)] * 2, -1)[:, None, :]  # [L, 1, hd]

    def rope(x):  # x [L, H, hd]; HF's rotate_half
        rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
        return x * np.cos(angles) + rotated * np.sin(angles)

    x = w["model.embed_tokens.weight"][tokens].astype(np.float64)
    for i in range(config["num_hidden_layers"]):
        p = lambda n: w[f"model.layers.{i}.{n}.weight"].astype(np.float64)  # noqa: E731
        y = norm(x, p("input_layernorm"))
        q = rope((y @ p("self_attn.q_proj").T).reshape(seq, h, hd))
        kk = np.repeat(rope((y @ p("self_attn.k_proj").T).reshape(seq, k, hd)), h // k, axis=1)
        v = np.repeat((y @ p("self_attn.v_proj").T).reshape(seq, k, hd), h // k, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, kk) / np.sqrt(hd) + np.triu(np.full((seq, seq), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", probs, v).reshape(seq, h * hd) @ p("self_attn.o_proj").T
        y = norm(x, p("post_attention_layernorm"))
        gate = y @ p("mlp.gate_proj").T
        x = x + (gate / (1 + np.exp(-gate)) * (y @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    return norm(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].astype(np.float64).T


def write_hand_made_checkpoint(directory, drop=None, config_changes=None, shapes_changes=None):
    """A tied 2-layer LLaMA checkpoint in HF's own names and [out, in] layout, some tensors stored as bf16."""
    d, h, k, hd, f, vocab = 16, 4, 2, 4, 24, 40
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "intermediate_size": f, "num_attention_heads": h, "num_key_value_heads": k, "num_hidden_layers": 2,
              "rms_norm_eps": 1e-5, "rope_theta": 500.0, "tie_word_embeddings": True, "vocab_size": vocab,
              "max_position_embeddings": 64, "torch_dtype": "bfloat16", "bos_token_id": 0, "rope_scaling": None,
              "hidden_act": "silu", "use_cache": True}
    config.update(config_changes or {})
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (k * hd, d),
                       p + "self_attn.v_proj.weight": (k * hd, d), p + "self_attn.o_proj.weight": (d, h * hd),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    shapes.update(shapes_changes or {})
    rng = np.random.default_rng(1)
    weights = {}
    for name, shape in shapes.items():
        scale = 0.3 if len(shape) == 2 else 0.1
        value = (float(len(shape) == 1) + scale * rng.standard_normal(shape)).astype(np.float32)
        weights[name] = value.astype(ml_dtypes.bfloat16) if "mlp" in name else value
    weights["lm_head.weight"] = rng.standard_normal(shapes["lm_head.weight"]).astype(np.float32)  # tied: ignored
    os.makedirs(directory, exist_ok=True)
    json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    save_file({n: v for n, v in weights.items() if n != drop}, os.path.join(directory, "model.safetensors"))
    return config, {n: v.astype(np.float32) for n, v in weights.items()}


def test_hand_made_hf_checkpoint_lands_in_the_right_places_and_matches_hf_forward(tmp_path):
    config, w = write_hand_made_checkpoint(str(tmp_path / "hf"))
    cfg, pure = read_hf_checkpoint(str(tmp_path / "hf"), scan_layers=False)
    assert (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (16, 4, 2, 4, 24)
    assert (cfg.rope_base, cfg.rms_eps, cfg.max_seq_len, cfg.tie_embeddings, cfg.rope_interleaved) == (
        500.0, 1e-5, 64, True, False)
    assert "lm_head" not in pure
    layer = pure["layers"][1]
    wq, wk, wo = (w[f"model.layers.1.self_attn.{n}_proj.weight"] for n in ("q", "k", "o"))
    for head in range(4):
        np.testing.assert_array_equal(layer["q_proj"]["kernel"][:, head, :], wq[head * 4:(head + 1) * 4, :].T)
        np.testing.assert_array_equal(layer["o_proj"]["kernel"][head], wo[:, head * 4:(head + 1) * 4].T)
    np.testing.assert_array_equal(layer["k_proj"]["kernel"][:, 1, :], wk[4:8, :].T)
    np.testing.assert_array_equal(layer["down_proj"]["kernel"], w["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(layer["mlp_norm"]["scale"], w["model.layers.1.post_attention_layernorm.weight"])
    np.testing.assert_array_equal(pure["embed"]["embedding"], w["model.embed_tokens.weight"])
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(pure))  # bf16 tensors converted
    tokens = np.array([5, 0, 39, 12, 12, 7, 30])
    np.testing.assert_allclose(logits(cfg, pure, jnp.array([tokens]))[0], numpy_hf_llama(w, config, tokens),
                               rtol=1e-4, atol=1e-4)


def test_real_smollm2_from_gguf_exports_with_tokenizer(tmp_path, smollm2_gguf):
    """SmolLM2-135M from llama.cpp's GGUF (interleaved q/k) -> bf16 HF checkpoint -> same logits and tokens."""
    from llmopt_jax.io.tokenizer import tokenizer_from_gguf, tokenizer_from_json

    f, cfg, pure = smollm2_gguf  # read_gguf, config_from_gguf and params_from_gguf, once per session (conftest)
    # Pre-rounded to bf16 so the bf16 export is lossless and only the layout change is tested.
    pure = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), pure)
    tok = tokenizer_from_gguf(f)
    write_hf_checkpoint(str(tmp_path / "smol"), cfg, pure, dtype="bfloat16", tokenizer=tok)
    hf_cfg, hf_pure = read_hf_checkpoint(str(tmp_path / "smol"))
    assert hf_cfg == dataclasses.replace(cfg, rope_interleaved=False)
    hf_tok = tokenizer_from_json(str(tmp_path / "smol" / "tokenizer.json"))
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert hf_tok.encode(text) == ids and (hf_tok.bos_id, hf_tok.eos_id) == (tok.bos_id, tok.eos_id)
    assert hf_tok.chat_template == tok.chat_template
    tokens = jnp.array([ids])
    np.testing.assert_allclose(logits(hf_cfg, hf_pure, tokens), logits(cfg, pure, tokens), rtol=1e-5, atol=2e-4)


def test_read_errors_name_the_file_and_tensor(tmp_path):
    with pytest.raises(SafetensorsError, match="not found: .*nowhere"):
        read_hf_checkpoint(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SafetensorsError, match="empty/config.json not found"):
        read_hf_checkpoint(str(tmp_path / "empty"))
    write_hand_made_checkpoint(str(tmp_path / "gpt"), config_changes={"model_type": "gpt2"})
    with pytest.raises(SafetensorsError, match="gpt/config.json: unsupported model_type 'gpt2'"):
        read_hf_checkpoint(str(tmp_path / "gpt"))
    write_hand_made_checkpoint(str(tmp_path / "scaled"), config_changes={"rope_scaling": {"rope_type": "llama3"}})
    with pytest.raises(SafetensorsError, match="scaled/config.json: RoPE scaling"):
        read_hf_checkpoint(str(tmp_path / "scaled"))
    write_hand_made_checkpoint(str(tmp_path / "nokey"), config_changes={"hidden_size": None})
    with pytest.raises(SafetensorsError, match="nokey/config.json: key 'hidden_size' is missing"):
        read_hf_checkpoint(str(tmp_path / "nokey"))
    write_hand_made_checkpoint(str(tmp_path / "noweights"))
    os.remove(tmp_path / "noweights" / "model.safetensors")
    with pytest.raises(SafetensorsError, match="noweights: neither model.safetensors nor"):
        read_hf_checkpoint(str(tmp_path / "noweights"))

    write_hand_made_checkpoint(str(tmp_path / "missing"), drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(SafetensorsError, match=r"missing/model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' "
                                               "is missing"):
        read_hf_checkpoint(str(tmp_path / "missing"))
    write_hand_made_checkpoint(str(tmp_path / "shape"), shapes_changes={"model.layers.0.self_attn.k_proj.weight": (4, 16)})
    with pytest.raises(SafetensorsError, match=r"shape/model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                                               r"has shape \(4, 16\), expected \(8, 16\)"):
        read_hf_checkpoint(str(tmp_path / "shape"))
    write_hand_made_checkpoint(str(tmp_path / "untied"), config_changes={"tie_word_embeddings": False},
                               drop="lm_head.weight")
    with pytest.raises(SafetensorsError, match="untied/model.safetensors: tensor 'lm_head.weight' is missing"):
        read_hf_checkpoint(str(tmp_path / "untied"))

    write_hand_made_checkpoint(str(tmp_path / "cut"))
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match="cut/model.safetensors: truncated or corrupted"):
        read_hf_checkpoint(str(tmp_path / "cut"))
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SafetensorsError, match="cut/model.safetensors: truncated or corrupted"):
        read_hf_checkpoint(str(tmp_path / "cut"))


def test_sharded_read_errors_name_the_index_or_shard(tmp_path):
    params = random_model(CFG)
    ckpt = tmp_path / "ckpt"
    write_hf_checkpoint(str(ckpt), CFG, params, max_shard_bytes=20_000)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.load(open(index_path))
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]

    broken = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != "model.norm.weight"})
    json.dump(broken, open(index_path, "w"))
    with pytest.raises(SafetensorsError, match="model.safetensors.index.json: tensor 'model.norm.weight' is missing"):
        read_hf_checkpoint(str(ckpt))

    other = next(s for s in set(index["weight_map"].values()) if s != shard)
    moved = dict(index, weight_map={**index["weight_map"], "model.layers.1.mlp.up_proj.weight": other})
    json.dump(moved, open(index_path, "w"))
    with pytest.raises(SafetensorsError, match=f"{other}: tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        read_hf_checkpoint(str(ckpt))

    json.dump(index, open(index_path, "w"))
    os.remove(ckpt / shard)
    with pytest.raises(SafetensorsError, match=f"model.safetensors.index.json: names shard '{shard}', which is missing"):
        read_hf_checkpoint(str(ckpt))
    index_path.write_text("{not json")
    with pytest.raises(SafetensorsError, match="model.safetensors.index.json: not a safetensors index"):
        read_hf_checkpoint(str(ckpt))


def test_write_is_atomic_and_refuses_foreign_directories(tmp_path, monkeypatch):
    params = random_model(CFG)
    other = random_model(CFG, seed=1)
    ckpt = str(tmp_path / "ckpt")
    write_hf_checkpoint(ckpt, CFG, params, max_shard_bytes=20_000)
    write_hf_checkpoint(ckpt, CFG, other)  # replaces the sharded checkpoint by a single file, no stale shards
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors"]
    assert_trees_equal(read_hf_checkpoint(ckpt)[1], as_numpy(other))

    import safetensors.numpy

    calls = []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", crash_on_second_shard)
    for target in (ckpt, str(tmp_path / "fresh")):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            write_hf_checkpoint(target, CFG, params, max_shard_bytes=20_000)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no half-written "fresh", no temporary directories left
    assert_trees_equal(read_hf_checkpoint(ckpt)[1], as_numpy(other))  # the old checkpoint is untouched

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "results.json").write_text("{}")
    with pytest.raises(SafetensorsError, match="work: refusing to replace a directory that holds 'results.json'"):
        write_hf_checkpoint(str(tmp_path / "work"), CFG, params)
    with pytest.raises(SafetensorsError, match="export dtype 'int8'"):
        write_hf_checkpoint(ckpt, CFG, params, dtype="int8")
    with pytest.raises(SafetensorsError, match=r"parameter layers/0/q_proj/kernel has shape \(32, 4, 12\), config"):
        write_hf_checkpoint(str(tmp_path / "bad"), dataclasses.replace(CFG, head_dim=8), params)
    assert not os.path.exists(tmp_path / "bad")
