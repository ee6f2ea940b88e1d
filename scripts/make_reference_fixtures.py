"""Writes llama.cpp reference outputs for SmolLM2-135M to ``tests/fixtures/llamacpp_smollm2.json``.

Needs the optional extra: ``pip install -e '.[reference]'`` (llama-cpp-python, builds llama.cpp from source).
The tests compare our tokenizer, logits, greedy continuations and perplexity against this file; CI never
runs llama.cpp itself. Re-run after changing the texts below:

    OMP_WAIT_POLICY=PASSIVE python scripts/make_reference_fixtures.py

``--perplexity-file PATH`` instead prints llama.cpp's perplexity of any text file under our protocol
(design.md: no BOS, non-overlapping windows, positions 1..L-1 scored), to check ``experiments.perplexity``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads make llama.cpp ~100x slower here

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from llmopt_jax.data.text import default_text  # noqa: E402
from llmopt_jax.io.gguf import config_from_gguf, params_from_gguf, read_gguf, resolve_model_path  # noqa: E402
from llmopt_jax.io.gguf_write import write_gguf  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llamacpp_smollm2.json")
MODEL = "smollm2-135m"
SEQ_LEN = 512
PPL_WINDOWS = 4
LOGIT_POSITIONS = 8
LOGIT_TOP_K = 20
LOGIT_SAMPLED_IDS = 256
GREEDY_TOKENS = 48


def stdlib_docstrings() -> str:
    """English prose that ships with Python: the docstrings of a few standard modules."""
    import argparse as m1, collections as m2, functools as m3, json as m4, subprocess as m5, unittest as m6

    return "\n\n".join(inspect.getdoc(m) or "" for m in (m1, m2, m3, m4, m5, m6))


def tokenization_texts() -> dict[str, str]:
    topics = default_text()
    return {
        "english": topics[20_000:23_000],
        "code": inspect.getsource(json.dumps),
        "numbers": "In 1984, 3.14159 costs $12,345.67 -- x**2 + 0x1F; 2024-11-25T10:00Z, ½ ² ٣ 𝟘, v1.2.3",
        "whitespace": "a  b\n\n\n  c\t\td   \n    indented\r\nline  ",
        "unicode": "Ünïcödé naïve café — 日本語のテキスト 😀👍 Привет мир ﬁ ǅ",
        "chat": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    }


def perplexity_texts() -> dict[str, str]:
    topics = default_text()
    return {"pydoc_topics_head": topics, "pydoc_topics_middle": topics[len(topics) // 2 :], "stdlib_docstrings": stdlib_docstrings()}


CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a Python list is."]
TEXT_PROMPTS = ["The Python programming language was created by"]


def chat_prompt(question: str) -> str:
    # The same text our tokenizer's template renders (checked in the tests).
    return (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def window_nlls(llm, tokens: list[int], seq_len: int, max_windows: int | None) -> list[float]:
    """Sum of NLL over positions 1..L-1 of each non-overlapping window (float64)."""
    n = len(tokens) // seq_len
    n = n if max_windows is None else min(n, max_windows)
    out = []
    for w in range(n):
        window = tokens[w * seq_len : (w + 1) * seq_len]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: seq_len - 1], np.float64)
        m = logits.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        out.append(float(np.sum(logz - logits[np.arange(seq_len - 1), window[1:]])))
    return out


def greedy(llm, prompt_ids: list[int], steps: int) -> list[int]:
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def logits_fixture(llm, prompt_ids: list[int]) -> dict:
    """Logits of the first positions of a prompt: top ids/logits, a fixed random subset, and logsumexp."""
    llm.reset()
    llm.eval(prompt_ids)
    scores = np.asarray(llm.scores[:LOGIT_POSITIONS], np.float64)
    sampled = np.sort(np.random.default_rng(0).choice(scores.shape[1], LOGIT_SAMPLED_IDS, replace=False))
    top = np.argsort(-scores, axis=-1)[:, :LOGIT_TOP_K]
    m = scores.max(-1, keepdims=True)
    return {
        "prompt_ids": prompt_ids,
        "positions": LOGIT_POSITIONS,
        "top_ids": top.tolist(),
        "top_logits": np.round(np.take_along_axis(scores, top, -1), 5).tolist(),
        "sampled_ids": sampled.tolist(),
        "sampled_logits": np.round(scores[:, sampled], 5).tolist(),
        "logsumexp": np.round((m + np.log(np.exp(scores - m).sum(-1, keepdims=True)))[:, 0], 5).tolist(),
    }


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="model name or GGUF path")
    parser.add_argument("--perplexity-file", help="print llama.cpp's perplexity of this text file and exit")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llama_cpp

    path = resolve_model_path(args.model)
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=args.seq_len, n_batch=args.seq_len, logits_all=True, n_threads=args.threads, verbose=False
    )
    tokenize = lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # noqa: E731

    if args.perplexity_file:
        tokens = tokenize(open(args.perplexity_file, encoding="utf-8").read())
        nll = window_nlls(llm, tokens, args.seq_len, None)
        scored = len(nll) * (args.seq_len - 1)
        print(json.dumps({"perplexity": float(np.exp(sum(nll) / scored)), "num_eval_tokens": scored}))
        return

    fixture: dict = {"model": os.path.basename(path), "llama_cpp_python": llama_cpp.__version__, "seq_len": args.seq_len}
    fixture["tokenization"] = {name: {"text": t, "ids": tokenize(t)} for name, t in tokenization_texts().items()}
    whole = tokenize(default_text())
    fixture["tokenization_pydoc_topics"] = {"num_tokens": len(whole), "sha256_of_ids": ids_digest(whole)}

    fixture["perplexity"] = {}
    for name, text in perplexity_texts().items():
        ids = tokenize(text)[: PPL_WINDOWS * args.seq_len]
        nll = window_nlls(llm, ids, args.seq_len, PPL_WINDOWS)
        fixture["perplexity"][name] = {
            "ids": ids, "window_nll_sums": nll, "perplexity": float(np.exp(sum(nll) / (len(nll) * (args.seq_len - 1))))
        }

    prompt_ids = tokenize(chat_prompt(CHAT_PROMPTS[0]))
    prompts = [tokenize(chat_prompt(q)) for q in CHAT_PROMPTS] + [tokenize(t) for t in TEXT_PROMPTS]
    fixture["logits"] = logits_fixture(llm, prompt_ids)
    fixture["greedy"] = [{"prompt_ids": ids, "continuation": greedy(llm, ids, GREEDY_TOKENS)} for ids in prompts]

    # The same weights dequantized and written by us as an F32 GGUF, with an F32 KV cache: llama.cpp then
    # runs plain float32 matmuls (no 8-bit activation rounding), the like-for-like check of our float32 model.
    with tempfile.TemporaryDirectory() as tmp:
        f32_path = os.path.join(tmp, "smollm2-f32.gguf")
        source = read_gguf(path)
        cfg = config_from_gguf(source)
        write_gguf(f32_path, cfg, params_from_gguf(source, cfg), tensor_type="F32", metadata_from=source)
        f32 = llama_cpp.Llama(
            model_path=f32_path, n_ctx=args.seq_len, n_batch=args.seq_len, logits_all=True, n_threads=args.threads,
            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False,
        )
        fixture["f32"] = {
            "logits": logits_fixture(f32, prompt_ids),
            "greedy": [{"prompt_ids": ids, "continuation": greedy(f32, ids, GREEDY_TOKENS)} for ids in prompts],
        }

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print(f"wrote {os.path.relpath(OUT)} ({os.path.getsize(OUT) / 1024:.0f} KiB)")
    for name, p in fixture["perplexity"].items():
        print(f"llama.cpp perplexity {name}: {p['perplexity']:.4f}")
    for key, runs in (("Q4_1", fixture["greedy"]), ("F32", fixture["f32"]["greedy"])):
        for g in runs:
            print(key, repr(llm.detokenize(g["continuation"]).decode("utf-8", "replace")))


if __name__ == "__main__":
    main()
