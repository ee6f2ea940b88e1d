"""Generate text with a pretrained model: jitted prefill + single-token decode over a preallocated KV cache.

    python -m experiments.generate --config=configs/generate.py:smollm2 \
        --config.prompt="Write a haiku about JAX." --config.greedy=False --config.top_p=0.9 --workdir=runs/gen

Writes WORKDIR/config.json and results.json: text (first sample), texts, prefill_tokens_per_s,
decode_tokens_per_s (summed over the batch, compilation excluded), prompt_tokens, generated_tokens,
stopped, seconds_compile and num_compiled (1 prefill + 1 decode executable: decoding never recompiles). With a draft
(``draft_layers`` or ``draft_model``: speculative decoding) also acceptance_rate and tokens_per_target_forward.
"""

from llmopt_jax import cli


def main(config, workdir):
    import sys

    from llmopt_jax.errors import ConfigError
    from llmopt_jax.infer.generate import Generator, SamplingConfig, chat_prompt
    from llmopt_jax.io.load import load_pretrained
    from llmopt_jax.jsonio import write_json

    if config.num_samples < 1:  # before the workdir is touched
        raise ConfigError(f"num_samples must be positive, got {config.num_samples}")
    if config.draft_layers and config.draft_model:
        raise ConfigError("set draft_layers (self-speculative) or draft_model, not both")
    if config.draft_layers < 0 or config.num_draft < 1:
        raise ConfigError(f"draft_layers must be >= 0 and num_draft >= 1, got {config.draft_layers}, "
                          f"{config.num_draft}")
    workdir = cli.prepare_workdir(config, workdir)
    sampling = SamplingConfig(
        greedy=config.greedy, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p
    )
    model = load_pretrained(
        config.model, dtype=config.dtype, param_dtype=config.dtype, scan_layers=config.scan_layers
    )
    tok = model.require_tokenizer()
    if config.chat:
        prompt, stop_ids = chat_prompt(tok, config.prompt, config.system)
    else:
        prompt = tok.encode(config.prompt)
        prompt = [tok.bos_id] + prompt if tok.add_bos else prompt
        stop_ids = () if tok.eos_id is None else (tok.eos_id,)
    prompt_text = tok.decode(prompt)

    streamed: list[int] = []

    def stream(tokens):
        if config.stream and int(tokens[0]) not in stop_ids:
            previous = tok.decode(streamed)
            streamed.append(int(tokens[0]))
            sys.stdout.write(tok.decode(streamed)[len(previous):])
            sys.stdout.flush()

    speculative = bool(config.draft_layers or config.draft_model)
    if speculative:
        from llmopt_jax.infer.speculative import SpeculativeGenerator

        draft = config.draft_layers or load_pretrained(config.draft_model, dtype=config.dtype,
                                                       param_dtype=config.dtype, scan_layers=config.scan_layers)
        generator = SpeculativeGenerator(model, draft, num_draft=config.num_draft)
    else:
        generator = Generator(model)
    out = generator.generate(
        [prompt] * config.num_samples, config.max_new_tokens, sampling, seed=config.seed, stop_ids=stop_ids,
        on_token=stream,
    )
    if config.stream:
        print()
    texts = [tok.decode(t) for t in out.tokens]
    results = {
        "text": texts[0],
        "texts": texts,
        "prompt": prompt_text,
        "prefill_tokens_per_s": out.prefill_tokens_per_s,
        "decode_tokens_per_s": out.decode_tokens_per_s,
        "prompt_tokens": len(prompt),
        "generated_tokens": [len(t) for t in out.tokens],
        "stopped": out.stopped,
        "seconds_prefill": out.seconds_prefill,
        "seconds_decode": out.seconds_decode,
        "seconds_compile": out.seconds_compile,
        "num_compiled": generator.num_compiled,
        "model": model.path,
        "dtype": config.dtype,
    }
    if speculative:
        results.update(acceptance_rate=out.acceptance_rate, tokens_per_target_forward=out.tokens_per_round,
                       num_draft=config.num_draft, draft=config.draft_model or f"first {config.draft_layers} layers")
    write_json(f"{workdir}/results.json", results)
    if not config.stream:
        print(texts[0])
    print(
        f"[{len(prompt)} prompt tokens at {out.prefill_tokens_per_s:,.0f} tok/s; {sum(map(len, out.tokens))} new "
        f"tokens at {out.decode_tokens_per_s:,.1f} tok/s (batch {config.num_samples}); compile {out.seconds_compile:.1f} s]"
    )


if __name__ == "__main__":
    cli.run(main)
