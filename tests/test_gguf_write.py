"""GGUF export: written files read back exactly, quantize as gguf does, and run in llama.cpp."""

import dataclasses
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmopt_jax.io.gguf import GGUFError, config_from_gguf, params_from_gguf, read_gguf
from llmopt_jax.io.gguf_write import write_gguf
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.mesh import create_mesh
from llmopt_jax.parallel.sharded_init import init_model, load_params

SMALL = ModelConfig(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, init_std=0.2)
TOKENS = jnp.array([[3, 17, 42, 5, 88, 0, 61, 29, 7, 50]])
PROMPT = "The capital of France is"


def read_back(path, **overrides):
    f = read_gguf(str(path))
    cfg = config_from_gguf(f, **overrides)
    return f, cfg, params_from_gguf(f, cfg)


def f32_eps(cfg):
    return float(np.float32(cfg.rms_eps))  # the file stores eps as FLOAT32, as llama.cpp requires


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "interleaved,scan,tied,sharded",
    [(False, True, True, True), (False, False, False, False), (True, True, False, False), (True, False, True, True)],
)
def test_small_model_f32_round_trip(tmp_path, interleaved, scan, tied, sharded):
    cfg = dataclasses.replace(SMALL, rope_interleaved=interleaved, scan_layers=scan, tie_embeddings=tied)
    mesh = create_mesh(dict(data=2, fsdp=2, tensor=2)) if sharded else None
    _, params = init_model(cfg, mesh, seed=1)
    write_gguf(str(tmp_path / "m.gguf"), cfg, params)
    assert os.listdir(tmp_path) == ["m.gguf"]
    f, cfg2, pure = read_back(tmp_path / "m.gguf", scan_layers=scan)
    assert cfg2 == dataclasses.replace(cfg, rope_interleaved=True, rms_eps=f32_eps(cfg), init_std=cfg2.init_std)
    assert f.metadata["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert ("output.weight" in f.tensors) == (not tied)
    if interleaved:
        assert_trees_equal(pure, nnx.to_pure_dict(params))
    else:  # q/k were permuted into llama.cpp's rotary layout: same function, different weights
        logits = [nnx.merge(*load_params(c, p))(TOKENS)[0] for c, p in ((cfg, nnx.to_pure_dict(params)), (cfg2, pure))]
        np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)  # unsharded: batch 1 won't split


@pytest.mark.parametrize("tensor_type,dtype", [("F16", jnp.float16), ("BF16", jnp.bfloat16)])
def test_half_precision_reads_back_as_the_cast_params(tmp_path, tensor_type, dtype):
    cfg = dataclasses.replace(SMALL, rope_interleaved=True, tie_embeddings=False)
    _, params = init_model(cfg, seed=2)
    write_gguf(str(tmp_path / "m.gguf"), cfg, params, tensor_type=tensor_type)
    f, _, pure = read_back(tmp_path / "m.gguf")
    assert f.metadata["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{tensor_type}"]
    for name, t in f.tensors.items():
        assert t.tensor_type.name == ("F32" if name.endswith("norm.weight") else tensor_type), name
    original = nnx.to_pure_dict(params)
    expected = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)), original)
    for norm in ("attn_norm", "mlp_norm"):  # norms stay F32
        expected["layers"][norm]["scale"] = original["layers"][norm]["scale"]
    expected["final_norm"]["scale"] = original["final_norm"]["scale"]
    assert_trees_equal(pure, expected)


def test_q8_0_matches_gguf_quantization_and_its_error_bound(tmp_path):
    cfg = dataclasses.replace(SMALL, tie_embeddings=False)
    _, params = init_model(cfg, seed=3)
    write_gguf(str(tmp_path / "f32.gguf"), cfg, params)
    write_gguf(str(tmp_path / "q8.gguf"), cfg, params, tensor_type="Q8_0")
    f32, q8 = read_gguf(str(tmp_path / "f32.gguf")), read_gguf(str(tmp_path / "q8.gguf"))
    assert q8.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for name, t in q8.tensors.items():
        w, got = f32.tensor(name), q8.tensor(name)
        if w.ndim == 1:
            assert t.tensor_type.name == "F32"
            np.testing.assert_array_equal(got, w)
            continue
        assert t.tensor_type.name == "Q8_0", name
        Q = gguf.GGMLQuantizationType.Q8_0
        np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(w, Q), Q))
        blocks, err = w.reshape(-1, 32), (got - w).reshape(-1, 32)
        assert np.all(np.abs(err) <= np.abs(blocks).max(1, keepdims=True) / 127 + 1e-7), name


@pytest.mark.parametrize("tensor_type,bits,zero_point", [("Q4_0", 4, None), ("Q8_0", 8, None),
                                                         ("Q4_1", 4, "float"), ("Q4_1", 4, "int")])
@pytest.mark.parametrize("scan,interleaved", [(True, False), (False, True)])
def test_gptq_codes_are_written_exactly_into_q4_0_q8_0_and_q4_1_blocks(tmp_path, tensor_type, bits, zero_point, scan,
                                                                        interleaved):
    from llmopt_jax.compress.calibrate import compress_sequentially
    from llmopt_jax.compress.recipe import gptq

    cfg = dataclasses.replace(SMALL, scan_layers=scan, rope_interleaved=interleaved)
    _, params = init_model(cfg, seed=5)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16))
    transform = gptq(bits=bits, group_size=32, symmetric=zero_point is None, act_order=True,
                     zero_point=zero_point or "int")
    pure, report = compress_sequentially(cfg, params, windows, transform, batch_size=2, progress=False)
    if zero_point == "int":  # Q4_1 stores m = -z·d in float16: the codes stay, the offsets are rounded
        with pytest.warns(UserWarning, match="offsets are rounded"):
            write_gguf(str(tmp_path / "q.gguf"), cfg, pure, tensor_type=tensor_type, quantized=report["quantized"])
    else:
        write_gguf(str(tmp_path / "q.gguf"), cfg, pure, tensor_type=tensor_type, quantized=report["quantized"])
    write_gguf(str(tmp_path / "f32.gguf"), cfg, pure)  # the same weights in llama.cpp's layout, unrounded
    f, _, back = read_back(tmp_path / "q.gguf", scan_layers=scan)
    _, _, want = read_back(tmp_path / "f32.gguf", scan_layers=scan)
    assert f.metadata["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{tensor_type}"]
    assert f.tensors["blk.0.attn_q.weight"].tensor_type.name == tensor_type
    # What llama.cpp reads is exactly GPTQ's weights (re-rounding them would move some); the embedding, which
    # GPTQ did not quantize, is rounded by gguf-py. With integer zero-points in Q4_1 only the float16 rounding of
    # m = -z·d moves a weight: by at most half a float16 step of m.
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        layers = [(back["layers"][name], want["layers"][name])] if scan else \
            [(back["layers"][i][name], want["layers"][i][name]) for i in range(cfg.num_layers)]
        for got, expected in layers:
            got, expected = np.asarray(got["kernel"]), np.asarray(expected["kernel"])
            if zero_point == "int":
                np.testing.assert_allclose(got, expected, rtol=0, atol=np.abs(expected).max() * 2.0**-10, err_msg=name)
                assert np.mean(got == expected) > 0.3, name
            else:
                np.testing.assert_array_equal(got, expected, err_msg=name)


def test_weights_on_another_grid_are_re_rounded_with_a_warning(tmp_path):
    from llmopt_jax.compress.calibrate import compress_sequentially
    from llmopt_jax.compress.recipe import rtn

    _, params = init_model(SMALL, seed=6)
    pure, report = compress_sequentially(SMALL, params, np.zeros((1, 4), np.int32), rtn(bits=4, group_size=64),
                                         progress=False)
    with pytest.warns(UserWarning, match="4-bit asym g64 are not on Q4_0's grid"):
        write_gguf(str(tmp_path / "q.gguf"), SMALL, pure, tensor_type="Q4_0", quantized=report["quantized"])


def test_q8_0_rows_not_multiple_of_32_fall_back_to_f16(tmp_path):
    cfg = dataclasses.replace(SMALL, mlp_dim=48)  # ffn_down rows hold 48 values
    _, params = init_model(cfg, seed=4)
    match = r"rows of blk.0.ffn_down.weight, blk.1.ffn_down.weight are not a multiple of 32 values; written as F16"
    with pytest.warns(UserWarning, match=match):
        write_gguf(str(tmp_path / "q8.gguf"), cfg, params, tensor_type="Q8_0")
    f = read_gguf(str(tmp_path / "q8.gguf"))
    assert f.tensors["blk.1.ffn_down.weight"].tensor_type.name == "F16"
    assert f.tensors["blk.1.ffn_up.weight"].tensor_type.name == "Q8_0"
    down = nnx.to_pure_dict(params)["layers"]["down_proj"]["kernel"][1].T
    np.testing.assert_array_equal(f.tensor("blk.1.ffn_down.weight"), down.astype(np.float16).astype(np.float32))


def test_write_errors_leave_no_partial_file(tmp_path):
    cfg = dataclasses.replace(SMALL, tie_embeddings=False)
    _, params = init_model(cfg, seed=5)
    with pytest.raises(GGUFError, match="unknown GGUF tensor_type 'Q4_K'"):
        write_gguf(str(tmp_path / "m.gguf"), cfg, params, tensor_type="Q4_K")
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(GGUFError, match="afile/m.gguf: cannot write into"):
        write_gguf(str(tmp_path / "afile" / "m.gguf"), cfg, params)
    with pytest.raises(GGUFError, match="nodir/m.gguf: cannot write into"):
        write_gguf(str(tmp_path / "nodir" / "m.gguf"), cfg, params)
    # A failure after the temporary file exists: the old file at `path` survives untouched, no debris.
    (tmp_path / "m.gguf").write_bytes(b"old")
    pure = nnx.to_pure_dict(params)
    del pure["lm_head"]
    with pytest.raises(GGUFError, match="parameter lm_head/kernel is missing"):
        write_gguf(str(tmp_path / "m.gguf"), cfg, pure)
    pure = nnx.to_pure_dict(params)
    pure["layers"]["q_proj"]["kernel"] = pure["layers"]["q_proj"]["kernel"][:, :, :2]
    with pytest.raises(GGUFError, match=r"parameter layers/0/q_proj/kernel has shape \(64, 2, 16\), expected"):
        write_gguf(str(tmp_path / "m.gguf"), cfg, pure)
    assert sorted(os.listdir(tmp_path)) == ["afile", "m.gguf"]
    assert (tmp_path / "m.gguf").read_bytes() == b"old"


def test_reading_a_tensor_type_gguf_cannot_dequantize_names_it(tmp_path):
    # gguf 0.19 has no dequantizer for Q8_1 (an activation-only type in llama.cpp): write raw Q8_1 blocks.
    Q8_1 = gguf.GGMLQuantizationType.Q8_1
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 40), np.uint8), raw_dtype=Q8_1)  # 4 rows of one 40-byte block
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(str(tmp_path / "q81.gguf"))
    with pytest.raises(GGUFError, match=r"q81.gguf: tensor 'blk.0.attn_q.weight' has unsupported type Q8_1"):
        f.tensor("blk.0.attn_q.weight")


@pytest.fixture(scope="module")
def smollm2_written(tmp_path_factory, smollm2_gguf):
    """SmolLM2-135M (Q4_1, dequantized on read) written back as F32 with its tokenizer, and read again."""
    f, cfg, params = smollm2_gguf  # read_gguf, config_from_gguf and params_from_gguf, once per session (conftest)
    path = str(tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf")
    write_gguf(path, cfg, params, metadata_from=f)
    return f, cfg, params, path


def test_real_model_f32_round_trip_keeps_params_and_tokenizer(smollm2_written):
    f, cfg, params, path = smollm2_written
    f2, cfg2, params2 = read_back(path)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    tokenizer_keys = {k for k in f.metadata if k.startswith("tokenizer.")}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
            "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"} <= tokenizer_keys
    assert {k for k in f2.metadata if k.startswith("tokenizer.")} == tokenizer_keys
    for key in tokenizer_keys:
        assert f2.metadata[key] == f.metadata[key], key
    # The value types llama.cpp checks (what SmolLM2's own file uses):
    fields = gguf.GGUFReader(path).fields
    T = gguf.GGUFValueType
    expected_types = {"tokenizer.ggml.tokens": [T.ARRAY, T.STRING], "tokenizer.ggml.merges": [T.ARRAY, T.STRING],
                      "tokenizer.ggml.token_type": [T.ARRAY, T.INT32], "tokenizer.ggml.pre": [T.STRING],
                      "tokenizer.ggml.bos_token_id": [T.UINT32], "tokenizer.ggml.add_bos_token": [T.BOOL],
                      "tokenizer.chat_template": [T.STRING], "llama.attention.layer_norm_rms_epsilon": [T.FLOAT32]}
    for key, types in expected_types.items():
        assert fields[key].types == types, key


def test_llama_cpp_runs_the_written_model_like_ours(smollm2_written):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # llama.cpp's OpenMP threads otherwise spin while idle
    llama_cpp = pytest.importorskip("llama_cpp")
    f, cfg, params, path = smollm2_written
    # F32 KV cache (type_k/type_v = GGML_TYPE_F32): llama.cpp's default F16 cache alone costs ~1e-3 relative.
    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=64, verbose=False, n_threads=2, type_k=0, type_v=0)
    original = llama_cpp.Llama(model_path=f.path, vocab_only=True, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    assert ids == original.tokenize(PROMPT.encode(), add_bos=False)
    assert llm.detokenize(ids).decode() == PROMPT
    llm.eval(ids)
    theirs = np.asarray(llm.scores[len(ids) - 1])
    graphdef, state = load_params(cfg, params)
    ours = np.asarray(nnx.merge(graphdef, state)(jnp.array([ids]))[0][0, -1])
    assert theirs.argmax() == ours.argmax()
    # Both run fp32 on CPU; only summation order differs (observed ~5e-5 on logits of magnitude ~27).
    np.testing.assert_allclose(theirs, ours, atol=1e-3)
