"""GGUF import: the real SmolLM2-135M answers sensibly; broken files give clear errors."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax.io.gguf import GGUFError, config_from_gguf, params_from_gguf, read_gguf, resolve_model_path
from llmopt_jax.io.tokenizer import tokenizer_from_gguf
from llmopt_jax.models.presets import MODEL_PRESETS
from llmopt_jax.parallel.sharded_init import load_params


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    f, cfg, pure = smollm2_gguf  # read_gguf, config_from_gguf and params_from_gguf, once per session (conftest)
    graphdef, params = load_params(cfg, pure)
    return f, cfg, graphdef, params


def test_config_matches_the_published_shape(smollm2):
    _, cfg, _, params = smollm2
    preset = MODEL_PRESETS["smollm2_135m"]
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "head_dim", "rope_base"):
        assert getattr(cfg, key) == preset[key], key
    assert cfg.tie_embeddings and cfg.rope_interleaved
    assert sum(x.size for x in jax.tree.leaves(params)) == 134_515_008


def test_tokenizer_round_trips_and_keeps_control_tokens(smollm2):
    tok = tokenizer_from_gguf(smollm2[0])
    text = "<|im_start|>user\ndef f(x):\n    return x ** 2  # ünïcode<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2  # <|im_start|>, <|im_end|> as single ids
    assert tok.decode(ids) == text


def test_greedy_chat_answer_is_coherent(smollm2):
    f, _, graphdef, params = smollm2
    tok = tokenizer_from_gguf(f)
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0][0, -1])
    for _ in range(8):
        ids.append(int(jnp.argmax(forward(params, jnp.array([ids])))))
    assert "Paris" in tok.decode(ids[-8:])


def test_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(GGUFError, match="not found: .*nothing.gguf"):
        read_gguf(str(tmp_path / "nothing.gguf"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"NOTAGGUF" * 100)
    with pytest.raises(GGUFError, match="garbage.gguf"):
        read_gguf(str(garbage))
    real = resolve_model_path("smollm2-135m")
    truncated = tmp_path / "truncated.gguf"
    with open(real, "rb") as src:
        truncated.write_bytes(src.read(30_000_000))
    with pytest.raises(GGUFError, match="truncated.gguf: truncated or corrupted"):
        f = read_gguf(str(truncated))
        params_from_gguf(f, config_from_gguf(f))


def _write_small_gguf(path, arch="llama", drop=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(10)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (10, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8), "blk.0.attn_v.weight": (4, 8),
              "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_norm.weight": (8,), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        if name != drop:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_small_written_file_loads_and_errors_name_the_fault(tmp_path):
    _write_small_gguf(tmp_path / "ok.gguf")
    f = read_gguf(str(tmp_path / "ok.gguf"))
    cfg = config_from_gguf(f)
    assert (cfg.num_layers, cfg.d_model, cfg.num_kv_heads, cfg.head_dim) == (1, 8, 1, 4)
    pure = params_from_gguf(f, cfg)
    np.testing.assert_array_equal(pure["layers"]["gate_proj"]["kernel"][0], f.tensor("blk.0.ffn_gate.weight").T)

    _write_small_gguf(tmp_path / "gpt.gguf", arch="gpt2")
    with pytest.raises(GGUFError, match="unknown architecture 'gpt2'"):
        config_from_gguf(read_gguf(str(tmp_path / "gpt.gguf")))

    _write_small_gguf(tmp_path / "missing.gguf", drop="blk.0.attn_v.weight")
    f = read_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(GGUFError, match=r"missing.gguf: tensor 'blk.0.attn_v.weight' is missing"):
        params_from_gguf(f, config_from_gguf(f))

    f = read_gguf(str(tmp_path / "ok.gguf"))
    with pytest.raises(GGUFError, match=r"ok.gguf: tensor 'blk.0.attn_q.weight' has shape \(8, 8\), expected \(16, 8\)"):
        params_from_gguf(f, config_from_gguf(f, head_dim=8))
