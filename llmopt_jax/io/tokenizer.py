"""Tokenizers built from GGUF metadata with the ``tokenizers`` library.

GPT-2-style (byte-level BPE) vocabularies are rebuilt from ``tokenizer.ggml.tokens``/``merges``; control
tokens (type 3, e.g. ``<|im_start|>``) are registered as special tokens so they are never split.
The pre-tokenizer is byte-level with GPT-2's split pattern; llama.cpp's per-model variants
(``tokenizer.ggml.pre``, e.g. ``smollm`` splitting digits one by one) are not reproduced exactly yet.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from llmopt_jax.io.gguf import GGUFError, GGUFFile

CONTROL_TOKEN_TYPE = 3


class GGUFTokenizer:
    """``encode(text) -> ids`` / ``decode(ids) -> text`` plus the special ids named in the metadata."""

    def __init__(self, tokenizer: Tokenizer, bos_id: int | None, eos_id: int | None, vocab_size: int):
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def tokenizer_from_gguf(f: GGUFFile) -> GGUFTokenizer:
    """The BPE tokenizer stored in ``f``'s metadata; raises ``GGUFError`` for other tokenizer models."""
    kind = f.metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{f.path}: tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(f.metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in f.metadata.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = f.metadata.get("tokenizer.ggml.token_type", [])
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL_TOKEN_TYPE]
    tok.add_special_tokens(specials)
    return GGUFTokenizer(
        tok, f.metadata.get("tokenizer.ggml.bos_token_id"), f.metadata.get("tokenizer.ggml.eos_token_id"), len(tokens)
    )
