"""Speculative decoding against plain decoding of the same target, measured in the same run.

    python -m experiments.bench_speculative --config=configs/bench_speculative.py:default --workdir=runs/spec

The target (SmolLM2 by default) generates ``max_new_tokens`` greedy tokens from one chat prompt, with no stop ids,
alone (``Generator``, one jitted decode step per token) and with each draft in ``drafts`` (``SpeculativeGenerator``,
``num_draft`` tokens proposed per verify pass, all rounds in one on-device loop): ``self`` = the target's first
``self_draft_layers`` layers (shared weights), ``compressed`` = ``lj.compress`` with Wanda at ``draft_sparsity``
(0 = no pruning) then ``draft_bits``-bit RTN (packed; 32 = no quantization). Every engine compiles in an untimed
run, then the engines take turns for ``repeats`` timed runs (interleaved, so load from other processes spreads over
all of them); medians are reported.

results.json (flat; seconds, tokens/s): ``plain_seconds`` / ``plain_decode_tokens_per_s`` and per draft ``D``:
``D_seconds`` (median wall time of one generate call, prefill included, compile excluded),
``D_decode_tokens_per_s``, ``D_speedup`` (plain_seconds / D_seconds), ``D_decode_speedup`` (ratio of decode
tokens/s), ``D_acceptance_rate`` (kept / proposed draft tokens), ``D_tokens_per_target_forward`` (tokens committed
per verify pass of the decode phase, 1 .. num_draft + 1), ``D_greedy_identical`` (token-for-token equal to plain),
``D_draft_layers``, ``D_draft_bytes``, ``D_seconds_compile``; ``compressed_seconds_compress``,
``compressed_sparsity``, ``compressed_bits_per_weight``; and ``text`` (the plain output).
"""

from llmopt_jax import cli

DRAFTS = ("self", "compressed")


def main(config, workdir):
    from llmopt_jax.config_checks import parse_list
    from llmopt_jax.errors import ConfigError

    drafts = parse_list(config.drafts, "drafts", str, example="self,compressed", choices=DRAFTS)
    if config.num_draft < 1 or config.repeats < 1 or config.max_new_tokens < 2 or config.batch < 1:
        raise ConfigError("bench_speculative needs num_draft >= 1, repeats >= 1, max_new_tokens >= 2, batch >= 1")

    import statistics
    import time

    import jax

    import llmopt_jax as lj
    from llmopt_jax.infer.generate import Generator, chat_prompt
    from llmopt_jax.infer.roofline import tree_bytes
    from llmopt_jax.infer.speculative import SpeculativeGenerator, self_draft
    from llmopt_jax.jsonio import write_json

    workdir = cli.prepare_workdir(config, workdir)
    model = lj.load_pretrained(config.model, dtype=config.dtype, param_dtype=config.dtype,
                               scan_layers=config.scan_layers)
    if "self" in drafts and not 1 <= config.self_draft_layers < model.cfg.num_layers:
        raise ConfigError(f"self_draft_layers must be in 1..{model.cfg.num_layers - 1}, got {config.self_draft_layers}")
    tok = model.require_tokenizer()
    if config.chat:
        prompt, _ = chat_prompt(tok, config.prompt)
    else:
        prompt = ([tok.bos_id] if tok.add_bos else []) + tok.encode(config.prompt)
    prompts = [prompt] * config.batch
    k = config.num_draft

    engines = {"plain": Generator(model)}
    results = {}
    if "self" in drafts:
        engines["self"] = SpeculativeGenerator(model, config.self_draft_layers, num_draft=k)
        results["self_draft_layers"] = config.self_draft_layers
        results["self_draft_bytes"] = 0  # the target's own arrays
    if "compressed" in drafts:
        # Packed weights decode faster from scanned layers on CPU (bench_decode's note), whatever the target uses.
        source = model if config.scan_layers else lj.load_pretrained(config.model, scan_layers=True)
        recipe = [{"method": "wanda", "sparsity": config.draft_sparsity}] if config.draft_sparsity else []
        if config.draft_bits < 32:
            recipe.append({"method": "rtn", "bits": config.draft_bits, "group_size": config.draft_group_size})
        if not recipe:
            raise ConfigError("the compressed draft needs draft_sparsity > 0 or draft_bits < 32")
        calib = None if not config.draft_sparsity else lj.calibration_windows(
            tok, config.calib.text_file, config.calib.sources, config.calib.num_samples, config.calib.seq_len,
            config.calib.seed)
        small = lj.compress(source, recipe, calib, batch_size=config.calib.batch_size,
                            compute_dtype=config.calib.compute_dtype, progress=False)
        results.update(compressed_seconds_compress=small.seconds, compressed_sparsity=small.sparsity,
                       compressed_bits_per_weight=small.bits_per_weight)
        pair = (small.graphdef, small.params)
        layers = small.cfg.num_layers
        if config.draft_layers:
            pair, layers = self_draft(*pair, config.draft_layers), config.draft_layers
        engines["compressed"] = SpeculativeGenerator(model, pair, num_draft=k)
        results["compressed_draft_layers"] = layers
        results["compressed_draft_bytes"] = tree_bytes(pair[1])
        del source

    runs: dict[str, list] = {name: [] for name in engines}
    walls: dict[str, list[float]] = {name: [] for name in engines}
    for name, gen in engines.items():  # compiles
        out = gen.generate(prompts, config.max_new_tokens)
        results[f"{name}_seconds_compile"] = out.seconds_compile
        print(f"{name}: compiled in {out.seconds_compile:.1f} s", flush=True)
    for r in range(config.repeats):
        for name, gen in engines.items():
            t0 = time.perf_counter()
            out = gen.generate(prompts, config.max_new_tokens)
            walls[name].append(time.perf_counter() - t0)
            runs[name].append(out)
    plain = runs["plain"][0]
    results.update(
        plain_seconds=statistics.median(walls["plain"]),
        plain_decode_tokens_per_s=statistics.median(o.decode_tokens_per_s for o in runs["plain"]),
    )
    for name in drafts:
        outs = runs[name]
        seconds = statistics.median(walls[name])
        decode = statistics.median(o.decode_tokens_per_s for o in outs)
        results.update({
            f"{name}_seconds": seconds,
            f"{name}_decode_tokens_per_s": decode,
            f"{name}_speedup": results["plain_seconds"] / seconds,
            f"{name}_decode_speedup": decode / results["plain_decode_tokens_per_s"],
            f"{name}_acceptance_rate": statistics.median(o.acceptance_rate for o in outs),
            f"{name}_tokens_per_target_forward": statistics.median(o.tokens_per_round for o in outs),
            f"{name}_greedy_identical": all(o.tokens == plain.tokens for o in outs),
        })
        print(f"{name}: acceptance {results[f'{name}_acceptance_rate']:.3f}, "
              f"{results[f'{name}_tokens_per_target_forward']:.2f} tokens per target forward, "
              f"speed-up {results[f'{name}_speedup']:.2f}x (decode {results[f'{name}_decode_speedup']:.2f}x), "
              f"identical to plain: {results[f'{name}_greedy_identical']}", flush=True)
    results.update(
        text=tok.decode(plain.tokens[0]), prompt_tokens=len(prompt), max_new_tokens=config.max_new_tokens,
        batch=config.batch, num_draft=k, repeats=config.repeats, model=model.path, dtype=config.dtype,
        device=str(jax.devices()[0]),
    )
    print(f"plain: {results['plain_seconds']:.2f} s per call, {results['plain_decode_tokens_per_s']:.1f} decode tok/s")
    write_json(f"{workdir}/results.json", results)


if __name__ == "__main__":
    cli.run(main)
