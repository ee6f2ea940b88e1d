"""SmolLM2-135M against stored llama.cpp outputs (``scripts/make_reference_fixtures.py``, llama-cpp-python 0.3).

Two llama.cpp runs are stored. (1) The shipped Q4_1 GGUF: llama.cpp rounds every activation entering a
Q4_1/Q8_0 matmul to 8 bits per block of 32 (Q8_1/Q8_0, step = block max / 127) and keeps the KV cache in
float16, while we dequantize the weights and compute in float32; logits therefore differ by up to ~1 (of
~35), so logits are compared with a tolerance and greedy texts may part ways where two tokens are close.
(2) The same weights written by us as an F32 GGUF and run with an F32 KV cache: plain float32 on both sides,
so logits must agree to 1e-3 and greedy continuations token for token.
"""

import hashlib
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from llmopt_jax.data.text import default_text
from llmopt_jax.eval.perplexity import evaluate_perplexity
from llmopt_jax.infer.generate import Generator

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "llamacpp_smollm2.json")


@pytest.fixture(scope="module")
def ref():
    with open(FIXTURE) as f:
        return json.load(f)


def our_logits(model, ids, positions):
    logits, _ = nnx.merge(model.graphdef, model.params)(jnp.asarray([ids]))
    return np.asarray(logits[0, :positions], np.float64)


def test_tokenization_is_identical(smollm2, ref):
    tok = smollm2.tokenizer
    for name, case in ref["tokenization"].items():
        assert tok.encode(case["text"]) == case["ids"], name
        assert tok.decode(case["ids"]) == case["text"], name
    whole = tok.encode(default_text())  # ~113k tokens of Python's documentation
    summary = ref["tokenization_pydoc_topics"]
    assert len(whole) == summary["num_tokens"]
    assert hashlib.sha256(",".join(map(str, whole)).encode()).hexdigest() == summary["sha256_of_ids"]


def test_chat_template_renders_the_prompt_llama_cpp_was_given(smollm2, ref):
    tok = smollm2.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert tok.encode(text) == ref["greedy"][0]["prompt_ids"]
    assert tok.stop_ids == (2,)  # <|im_end|> is also the EOS id of this vocabulary


def test_perplexity_within_one_percent_of_llama_cpp(smollm2, ref):
    for name, case in ref["perplexity"].items():
        ours = evaluate_perplexity(smollm2.graphdef, smollm2.params, np.asarray(case["ids"]), ref["seq_len"], 4,
                                   progress=False)
        assert ours.num_eval_tokens == len(case["window_nll_sums"]) * (ref["seq_len"] - 1)
        # Measured: 0.1-0.3 % apart (ours lower: no 8-bit activation rounding).
        assert abs(ours.perplexity / case["perplexity"] - 1) < 0.01, (name, ours.perplexity, case["perplexity"])
        np.testing.assert_allclose(ours.window_nll_sums, case["window_nll_sums"], rtol=0.01)


def test_q4_1_logits_agree_within_activation_rounding(smollm2, ref):
    lg = ref["logits"]
    logits = our_logits(smollm2, lg["prompt_ids"], lg["positions"])
    top = np.asarray(lg["top_ids"])
    assert (logits.argmax(-1) == top[:, 0]).all()
    # Log-probabilities of llama.cpp's 20 most likely tokens: measured max |diff| 0.34 nats; the 8-bit rounding
    # of each matmul input (relative error ~1/254 per element) compounds over 30 layers, so allow 0.5.
    ours_lp = np.take_along_axis(logits, top, -1) - jax.nn.logsumexp(logits, -1)[:, None]
    ref_lp = np.asarray(lg["top_logits"]) - np.asarray(lg["logsumexp"])[:, None]
    assert np.abs(ours_lp - ref_lp).max() < 0.5
    sampled = np.asarray(lg["sampled_logits"])
    for i in range(lg["positions"]):  # the shape of the whole distribution: measured correlation >= 0.9986
        assert np.corrcoef(logits[i, lg["sampled_ids"]], sampled[i])[0, 1] > 0.995


def test_f32_logits_match_llama_cpp_float32(smollm2, ref):
    lg = ref["f32"]["logits"]
    logits = our_logits(smollm2, lg["prompt_ids"], lg["positions"])
    # Same float32 weights, different summation order: measured max |diff| 4e-5 on logits of magnitude ~35.
    np.testing.assert_allclose(np.take_along_axis(logits, np.asarray(lg["top_ids"]), -1), lg["top_logits"], atol=1e-3)
    np.testing.assert_allclose(logits[:, lg["sampled_ids"]], lg["sampled_logits"], atol=1e-3)


def test_greedy_continuations_match_llama_cpp(smollm2, ref):
    gen = Generator(smollm2.graphdef, smollm2.params)
    cases = ref["f32"]["greedy"]
    out = gen.generate([c["prompt_ids"] for c in cases], len(cases[0]["continuation"]))
    for got, case in zip(out.tokens, cases):
        assert got == case["continuation"]  # all 48 tokens (the issue asks for at least 32)
    assert gen.num_compiled == {"prefill": 1, "decode": 1}
    # Against the Q4_1 run only the text prompt keeps all 48 tokens (chat prompts part at near-ties: see above).
    q4 = gen.generate([ref["greedy"][-1]["prompt_ids"]], 48).tokens[0]
    assert q4 == ref["greedy"][-1]["continuation"]


def test_chat_answer_stops_at_end_of_turn(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    out = Generator(smollm2.graphdef, smollm2.params).generate([prompt], 32, stop_ids=tok.stop_ids)
    assert tok.decode(out.tokens[0]) == "The capital of France is Paris." and out.stopped == [True]
