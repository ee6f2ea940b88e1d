"""The public API: ``import llmopt_jax as lj``, ``lj.compress`` with recipes, ``CompressedModel`` used wherever a
loaded model is, and ``lj.save_model`` (round trips, re-rounding report)."""

import importlib
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import llmopt_jax as lj
from llmopt_jax.compress.api import METHODS, method_recipe, plan_recipe
from llmopt_jax.compress.calibrate import KERNEL_INPUT_DIMS, compress_sequentially
from llmopt_jax.compress.packed import PackedTensor, pack_params, packed_model
from llmopt_jax.compress.recipe import from_recipe
from llmopt_jax.errors import ConfigError, DataError
from llmopt_jax.io.load import PretrainedModel
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.parallel.sharded_init import init_model

CFG = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_seq_len=64)


@pytest.fixture(scope="module")
def tiny():
    graphdef, params = init_model(CFG, seed=1)
    return PretrainedModel(cfg=CFG, graphdef=graphdef, params=params, tokenizer=None, path="tiny")


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 32))


def test_every_public_name_resolves_to_its_module_object():
    for name in lj.__all__:
        assert getattr(lj, name) is getattr(importlib.import_module(lj._EXPORTS[name]), name), name
    for name in ("load_pretrained", "evaluate_perplexity", "Generator", "compress", "save_model", "train",
                 "create_mesh", "sparsegpt", "gptq", "rtn", "wanda", "magnitude"):
        assert name in dir(lj)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lj.nope  # noqa: B018


@pytest.mark.parametrize("recipe, fragment", [
    ([{"method": "prune"}], "unknown compression method 'prune'"),
    ([{"sparsity": 0.5}], "not a mapping with a 'method'"),
    ({"method": "gptq"}, "a recipe is a list of steps"),
    ([{"method": "gptq", "bits": 4, "colour": 1}], "unexpected keyword argument 'colour'"),
    ([{"method": "embedding", "bitz": 4}], "has no option(s) ['bitz']"),
    ([{"method": "smoothquant"}, {"method": "rtn"}], "must be the recipe's only step"),
    ([{"method": "smoothquant", "alpha": 2.0}], "alpha must be in [0, 1]"),
    ([{"method": "embedding"}, {"method": "embedding"}], "two 'embedding' steps"),
    ([{"method": "cast"}, {"method": "rtn"}], "put 'embedding' and 'cast' last"),
    ([{"method": "cast", "dtype": "int3"}], "'cast' takes one dtype"),
    ([{"method": "rtn", "bits": 4}, {"method": "sparsegpt"}], "quantizing step must be the last"),
    ([{"method": "embedding", "bits": 9}], "bits must be an integer in 2..8"),
])
def test_bad_recipes_are_refused_before_any_model_is_touched(recipe, fragment):
    with pytest.raises(ConfigError) as e:
        plan_recipe(recipe)
    assert fragment in str(e.value)


def test_method_recipe_covers_every_method_and_checks_bits():
    for method in METHODS:
        bits = 8 if method in ("smoothquant", "w8a8") else 4 if method in ("rtn", "gptq", "sparsegpt_gptq") else 32
        plan_recipe(method_recipe(method, bits=bits))
    assert method_recipe("dense") == []
    assert method_recipe("sparsegpt_gptq", bits=4, group_size=64)[0]["bits"] == 4
    assert method_recipe("gptq", bits=3, embedding_bits=8)[-1] == {"method": "embedding", "bits": 8}
    assert method_recipe("w8a8", bits=8)[0]["smooth"] is False
    for kwargs, fragment in [({"method": "gptq"}, "set bits to 2..8"), ({"method": "wanda", "bits": 4},
                             "needs a quantizing method"), ({"method": "smoothquant", "bits": 4}, "bits must be 8"),
                             ({"method": "sparsegpt_gptq", "bits": 4, "zero_point": "float"}, "zero_point='int'"),
                             ({"method": "pruning"}, "unknown method 'pruning'")]:
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
            method_recipe(**kwargs)


def test_compress_equals_the_engine_plus_packing_and_runs_packed(tiny, windows):
    recipe = [{"method": "sparsegpt", "sparsity": 0.5}, {"method": "gptq", "bits": 4, "group_size": 16}]
    model = lj.compress(tiny, recipe, windows, batch_size=2, progress=False)
    pure, report = compress_sequentially(CFG, tiny.params, windows, from_recipe(recipe), batch_size=2,
                                         progress=False)
    jax.tree.map(np.testing.assert_array_equal, model.float_params, pure)
    graphdef, params = packed_model(CFG, pack_params(pure, report["quantized"], KERNEL_INPUT_DIMS))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 200)
    ours = lj.evaluate_perplexity(model, tokens, 32, 2, progress=False)
    direct = lj.evaluate_perplexity(graphdef, params, tokens, 32, 2, progress=False)
    assert ours.perplexity == direct.perplexity
    kernels = [x for x in jax.tree.leaves(nnx.to_pure_dict(model.params), is_leaf=lambda x: isinstance(
        x, PackedTensor)) if isinstance(x, PackedTensor)]
    assert len(kernels) == 7  # every block linear is packed (layers stacked)
    summary = model.summary()
    assert 0.5 <= summary["sparsity"] < 0.55  # pruned weights, plus kept ones that round to the zero-point
    assert summary["bits_per_weight"] == pytest.approx(4 + 24 / 16)  # codes + f16 scale + u8 zero-point per 16
    assert summary["model_bytes"] == model.bytes_held < tiny.bytes_held
    assert model.recipe == recipe and model.path == "tiny" and model.cfg == CFG


def test_model_objects_are_accepted_where_graphdef_and_params_are(tiny):
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, 130)
    a = lj.evaluate_perplexity(tiny, tokens, 64, 2, progress=False)
    b = lj.evaluate_perplexity(tiny.graphdef, tiny.params, tokens, 64, 2, progress=False)
    assert a.perplexity == b.perplexity and a.num_eval_tokens == 2 * 63
    prompt = [[1, 2, 3]]
    out_a = lj.Generator(tiny).generate(prompt, 5).tokens
    out_b = lj.Generator(tiny.graphdef, tiny.params).generate(prompt, 5).tokens
    assert out_a == out_b
    with pytest.raises(DataError, match="30 tokens, fewer than one window of eval.seq_len=64"):
        lj.evaluate_perplexity(tiny, tokens[:30], 64, progress=False)
    with pytest.raises(ConfigError, match="eval.max_windows must be positive"):
        lj.evaluate_perplexity(tiny, tokens, 64, max_windows=-2, progress=False)


def test_data_free_recipes_need_no_calibration_and_others_say_so(tiny, windows):
    assert lj.compress(tiny, [], progress=False).params is tiny.params
    rtn = lj.compress(tiny, [{"method": "rtn", "bits": 8}], progress=False)
    # per channel: 24 bits of scale and zero-point per row; 512 rows hold 36,864 weights (down_proj's rows are 128)
    assert rtn.bits_per_weight == pytest.approx(8 + 24 * 512 / 36864)
    with pytest.raises(ConfigError, match="needs calibration windows"):
        lj.compress(tiny, [{"method": "wanda"}])
    with pytest.raises(ConfigError, match="already holds quantized"):
        lj.compress(rtn, [{"method": "rtn", "bits": 4}], progress=False)
    pruned = lj.compress(tiny, [{"method": "magnitude", "sparsity": 0.25}], progress=False)
    again = lj.compress(pruned, [{"method": "wanda", "sparsity": 0.5}], windows, progress=False)  # float: allowed
    assert again.sparsity == pytest.approx(0.5, abs=0.01)


def test_cast_and_embedding_steps(tiny):
    half = lj.compress(tiny, [{"method": "cast", "dtype": "bfloat16"}], progress=False)
    assert half.bytes_held == pytest.approx(tiny.bytes_held / 2, rel=0.01)
    emb = lj.compress(tiny, [{"method": "embedding", "bits": 8}], progress=False)
    table = nnx.to_pure_dict(emb.params)["embed"]["embedding"]
    assert isinstance(table, PackedTensor) and table.bits == 8
    np.testing.assert_array_equal(np.asarray(table.dequantize().T), emb.float_params["embed"]["embedding"])
    assert emb.report["quantized"]["embed"]["embedding"].grid.group_size == 32


def test_save_model_gguf_keeps_codes_exactly_and_reports_rerounding(tiny, windows, tmp_path):
    from llmopt_jax.io.gguf import config_from_gguf, params_from_gguf, read_gguf

    recipe = [{"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True},
              {"method": "embedding", "bits": 4}]
    model = lj.compress(tiny, recipe, windows, batch_size=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file holds exactly the model's weights: no warning
        saved = lj.save_model(model, str(tmp_path / "q4_0.gguf"), tensor_type="Q4_0")
    assert saved["rerounded"] == {} and saved["format"] == "gguf"
    f = read_gguf(str(tmp_path / "q4_0.gguf"))
    back = params_from_gguf(f, config_from_gguf(f, scan_layers=True))
    for path in (("embed", "embedding"), ("layers", "up_proj", "kernel"), ("layers", "down_proj", "kernel")):
        a, b = back, model.float_params
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)

    with pytest.warns(UserWarning, match=r"re-rounded to Q8_0.*measure the file") as caught:
        dense = lj.save_model(tiny, str(tmp_path / "q8.gguf"), tensor_type="Q8_0")
    assert len(caught) == 1  # one warning for the whole export
    assert "token_embd.weight" in dense["rerounded"] and all(0 < v < 0.05 for v in dense["rerounded"].values())


def test_save_model_safetensors_round_trip_and_unwritable_path(tiny, tmp_path):
    from llmopt_jax.io.safetensors import read_hf_checkpoint

    pruned = lj.compress(tiny, [{"method": "magnitude", "sparsity": 0.5}], progress=False)
    saved = lj.save_model(pruned, str(tmp_path / "hf"))
    assert saved["format"] == "safetensors"
    _, back = read_hf_checkpoint(str(tmp_path / "hf"))
    np.testing.assert_array_equal(back["layers"]["q_proj"]["kernel"], pruned.float_params["layers"]["q_proj"]["kernel"])
    with pytest.raises(ConfigError, match="does not exist"):
        lj.save_model(pruned, str(tmp_path / "missing" / "m.gguf"))
    with pytest.raises(ConfigError, match="save format 'onnx'"):
        lj.save_model(pruned, str(tmp_path / "m"), format="onnx")


def test_load_config_applies_overrides_and_names_unknown_keys():
    config = lj.load_config("configs/train.py:smoke", {"train.steps": 7, "optim.learning_rate": 1e-3})
    assert config.train.steps == 7 and config.optim.learning_rate == 1e-3
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        lj.load_config("configs/train.py:smoke", {"train.stepz": 7})
    with pytest.raises(ConfigError, match="not found"):
        lj.load_config("configs/nope.py:x")
