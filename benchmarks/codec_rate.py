"""Ternary codec on real weights: SmolLM2-135M's MLP matrices quantized ternary (RTN, and GPTQ with QMoE's
dampening 0.1 through the sequential calibration engine), encoded with one dictionary fitted to the model, decoded
bit-exactly; bits per parameter from the bytes held, empirical entropy and zero fraction. Also times decoding
against a dense matmul on this machine's backend. Writes JSON (default ``docs/results/codec_rate_smollm2.json``).

    python -m benchmarks.codec_rate [--out PATH] [--calib_windows 16] [--calib_len 256] [--skip_gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

MLP = ("gate_proj", "up_proj", "down_proj")


def codec_rows(quantized: dict, names=MLP) -> dict:
    """Codec measurements of the ternary records of ``names`` in a ``report["quantized"]`` tree (stacked layers):
    statistics of the codes, then each codec (the dictionary scheme with one table fitted to all of them and with
    QMoE's fixed table; per-row rANS; both also with streams of several rows), every matrix decoded and checked
    bit-exact."""
    from llmopt_jax.compress import codec

    records = {n: quantized["layers"][n]["kernel"] for n in names}
    codes = {n: np.asarray(r.codes) for n, r in records.items()}
    out = {**codec.ternary_stats(list(codes.values())),
           "per_matrix_stats": {n: codec.ternary_stats(c) for n, c in codes.items()}}
    decode = jax.jit(lambda t: t.symbols())
    t0 = time.perf_counter()
    fitted = codec.build_dictionary(list(codes.values()))
    t_dict = time.perf_counter() - t0
    variants = {
        "dictionary": dict(codec="dictionary", dictionary=fitted, block_rows=1),
        "dictionary_qmoe_fixed_table": dict(codec="dictionary", dictionary=codec.qmoe_dictionary(), block_rows=1),
        "dictionary_auto_blocks": dict(codec="dictionary", dictionary=fitted, block_rows=0),
        "ans": dict(codec="ans", block_rows=1),
        "ans_auto_blocks": dict(codec="ans", block_rows=0),
    }
    for label, kw in variants.items():
        t0 = time.perf_counter()
        tensors = {n: codec.encode_matrix(r, **kw) for n, r in records.items()}
        t_enc = time.perf_counter() - t0
        exact = all(np.array_equal(np.asarray(decode(tensors[n])), codes[n]) for n in names)
        out[label] = {**codec.bits_per_param(tensors), "decode_bit_exact": bool(exact), "seconds_encode": t_enc,
                      "per_matrix_bits_per_param": {n: codec.bits_per_param(t)["bits_per_param"]
                                                    for n, t in tensors.items()}}
        if label == "dictionary":
            out[label]["seconds_dictionary"] = t_dict
        print(" ", label, round(out[label]["bits_per_param"], 4), "exact", exact, flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/codec_rate_smollm2.json")
    parser.add_argument("--calib_windows", type=int, default=16)
    parser.add_argument("--calib_len", type=int, default=256)
    parser.add_argument("--damp", type=float, default=0.1)
    parser.add_argument("--skip_gptq", action="store_true")
    args = parser.parse_args(argv)

    import llmopt_jax as lj
    from flax import nnx

    from llmopt_jax.compress import codec
    from llmopt_jax.compress.calibrate import compress_sequentially
    from llmopt_jax.compress.recipe import from_recipe

    model = lj.load_pretrained("smollm2-135m")
    results: dict = {"model": "smollm2-135m", "backend": jax.default_backend(), "matrices": list(MLP)}
    pure = nnx.to_pure_dict(model.params)
    t0 = time.perf_counter()
    _, rep = compress_sequentially(model.cfg, pure, None, from_recipe([{"method": "rtn", "ternary": True}]),
                                   progress=False)
    results["rtn_ternary"] = {**codec_rows(rep["quantized"]), "seconds_compress": time.perf_counter() - t0}
    print("rtn zero fraction", results["rtn_ternary"]["zero_fraction"], flush=True)
    if not args.skip_gptq:
        calib = lj.calibration_windows(model.tokenizer, sources="topics", num=args.calib_windows,
                                       length=args.calib_len)
        t0 = time.perf_counter()
        step = {"method": "gptq", "ternary": True, "damp_fraction": args.damp}
        _, rep = compress_sequentially(model.cfg, pure, calib, from_recipe([step]), progress=False)
        results["gptq_ternary"] = {**codec_rows(rep["quantized"]), "seconds_compress": time.perf_counter() - t0,
                                   "calib_windows": args.calib_windows, "calib_len": args.calib_len,
                                   "damp_fraction": args.damp}
        print("gptq zero fraction", results["gptq_ternary"]["zero_fraction"], flush=True)
    results["decode_timing"] = [
        codec.benchmark_decode_matmul(rows, cols, tokens, zero_fraction=0.9, repeats=10, codec=which)
        for which in codec.CODECS for rows, cols in ((1536, 576), (576, 1536)) for tokens in (1, 64)
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
