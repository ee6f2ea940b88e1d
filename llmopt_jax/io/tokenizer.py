"""Tokenizers built from GGUF metadata (or a ``tokenizer.json``) with the ``tokenizers`` library.

Byte-level BPE vocabularies are rebuilt from ``tokenizer.ggml.tokens``/``merges``. llama.cpp picks its
pre-tokenizer (the regex splits applied before BPE) from ``tokenizer.ggml.pre``; we reproduce the same
splits, so token ids equal llama.cpp's (checked against stored llama.cpp fixtures in the tests). Control
tokens (type 3, e.g. ``<|im_start|>``) are registered as special tokens so they are never split. Chat
prompts are rendered from the model's own ``tokenizer.chat_template`` with ``jinja2``.
"""

from __future__ import annotations

import os
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from llmopt_jax.io.gguf import GGUFError, GGUFFile

CONTROL_TOKEN_TYPE = 3

# GPT-2's split pattern (what tokenizers' ByteLevel(use_regex=True) applies).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regexes llama.cpp applies in order (llama-vocab.cpp); each split isolates matches.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (GPT2_PATTERN,),
    "gpt2": (GPT2_PATTERN,),
    # Digits one by one, then GPT-2's pattern.
    "smollm": (r"\p{N}", GPT2_PATTERN),
    "starcoder": (r"\p{N}", GPT2_PATTERN),
    "refact": (r"\p{N}", GPT2_PATTERN),
    "llama3": (LLAMA3_PATTERN,),
    "llama-bpe": (LLAMA3_PATTERN,),
}

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class GGUFTokenizer:
    """``encode(text) -> ids`` / ``decode(ids) -> text``, the special ids and chat template of a model."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_id: int | None,
        eos_id: int | None,
        vocab_size: int,
        chat_template: str | None = None,
        stop_ids: Sequence[int] = (),
        add_bos: bool = False,
    ):
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.add_bos = add_bos and bos_id is not None  # whether prompts should start with BOS (model metadata)
        # Ids that end a generated answer: EOS plus end-of-turn control tokens.
        self.stop_ids = tuple(sorted(set(stop_ids) | ({eos_id} if eos_id is not None else set())))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS added; control tokens written in the text become their ids)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{"role": ..., "content": ...}]``) rendered by the model's template."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt)


def pre_tokenizer_for(name: str, path: str = "") -> pre_tokenizers.PreTokenizer:
    """The ``tokenizers`` pre-tokenizer equivalent to llama.cpp's for ``tokenizer.ggml.pre == name``."""
    if name not in PRE_TOKENIZER_SPLITS:
        raise GGUFError(
            f"{path}: pre-tokenizer {name!r} is not supported (tokenizer.ggml.pre); known: {sorted(PRE_TOKENIZER_SPLITS)}"
        )
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_SPLITS[name]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf(f: GGUFFile) -> GGUFTokenizer:
    """The BPE tokenizer stored in ``f``'s metadata; raises ``GGUFError`` for other tokenizer models."""
    kind = f.metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{f.path}: tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    if "tokenizer.ggml.tokens" not in f.metadata:
        raise GGUFError(f"{f.path}: metadata key 'tokenizer.ggml.tokens' is missing")
    tokens = list(f.metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in f.metadata.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizer_for(f.metadata.get("tokenizer.ggml.pre", "default"), f.path)
    tok.decoder = decoders.ByteLevel()
    types = f.metadata.get("tokenizer.ggml.token_type", [])
    control = [i for i, ty in enumerate(types) if ty == CONTROL_TOKEN_TYPE]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    end_of_turn = [i for i in control if tokens[i] in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")]
    return GGUFTokenizer(
        tok,
        f.metadata.get("tokenizer.ggml.bos_token_id"),
        f.metadata.get("tokenizer.ggml.eos_token_id"),
        len(tokens),
        chat_template=f.metadata.get("tokenizer.chat_template"),
        stop_ids=end_of_turn,
        add_bos=bool(f.metadata.get("tokenizer.ggml.add_bos_token", False)),
    )


def tokenizer_from_json(path: str, chat_template: str | None = None) -> GGUFTokenizer:
    """A Hugging Face ``tokenizer.json`` (special ids read from a sibling ``tokenizer_config.json`` if present)."""
    import json

    if not os.path.isfile(path):
        raise GGUFError(f"tokenizer file not found: {path}")
    tok = Tokenizer.from_file(path)
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    config = json.load(open(config_path)) if os.path.isfile(config_path) else {}

    def token_id(key):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(value) if value else None

    specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    end_of_turn = [tok.token_to_id(t) for t in specials if t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")]
    return GGUFTokenizer(
        tok, token_id("bos_token"), token_id("eos_token"), tok.get_vocab_size(),
        chat_template=chat_template or config.get("chat_template"), stop_ids=end_of_turn,
        add_bos=bool(config.get("add_bos_token", False)),
    )
