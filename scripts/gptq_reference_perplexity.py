"""Runs the GPTQ reference code (IST-DASLab/gptq) on SmolLM2-135M under the quantization case study's protocol.

The check that issue 13 asks for: our RTN and GPTQ rows against the reference implementation's perplexity on the
same calibration windows and the same held-out texts. The reference's own ``gptq.py`` (``GPTQ``: Hessian
accumulation and ``fasterquant``) and ``quant.py`` (``Quantizer``, ``quantize``) are imported from a checkout
given by ``--gptq-repo`` (never copied here); this script only feeds them, as the reference's
``llama.py:llama_sequential`` does: each block's linears get their Hessians from one forward of the block on the
current inputs (hooks on every linear; the reference's default, not ``--true-sequential``), are quantized, and the
quantized block's outputs feed the next block. RTN is the reference's ``--nearest`` rule (its ``Quantizer`` per
output channel, then ``quantize``). The model is a transformers ``LlamaForCausalLM`` holding exactly our float32
weights (written by ``lj.save_model`` as safetensors), so the dense perplexities must agree to the last digits.

Needs torch and transformers (``pip install torch transformers``; not project dependencies) and a clone::

    git clone https://github.com/IST-DASLab/gptq /tmp/gptq
    python scripts/gptq_reference_perplexity.py --gptq-repo=/tmp/gptq --threads=2

Writes ``docs/results/gptq_reference_smollm2_cpu.json``: per row the reference's close / far perplexity, ours
(from ``docs/results/quantization_case_study_rows.jsonl``, or ``--ours``) and the ratio ours / reference.
``--matrix-check`` also runs both GPTQ solvers on the same weights and Hessians (:func:`matrix_check`),
``--hessian-check`` compares the Hessians both pipelines collect for the first blocks (:func:`hessian_check`); ``--seed``
draws other calibration windows (compare with our case study run at the same ``calib.seed``). After our side
changed, ``--compare-only=0=docs/results/quantization_case_study_rows.jsonl,1=...seed1.jsonl`` refreshes our
numbers and the ratios of the stored reference rows without running the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# row name -> (method, bits, act_order, group size); asymmetric grid, per output channel (-1) unless grouped (the
# reference's groups are fitted as its fasterquant reaches them, like ours without static_groups).
ROWS = {
    "rtn 3-bit per channel": ("rtn", 3, False, -1),
    "rtn 4-bit per channel": ("rtn", 4, False, -1),
    "gptq 3-bit per channel": ("gptq", 3, False, -1),
    "gptq 3-bit per channel act-order": ("gptq", 3, True, -1),
    "gptq 4-bit per channel": ("gptq", 4, False, -1),
    "gptq 4-bit per channel act-order": ("gptq", 4, True, -1),
    "gptq 3-bit g64": ("gptq", 3, False, 64),
}
OURS = os.path.join(ROOT, "docs", "results", "quantization_case_study_rows.jsonl")
OUT = os.path.join(ROOT, "docs", "results", "gptq_reference_smollm2_cpu.json")


def protocol_tokens(tokenizer, num_samples: int, seq_len: int, seed: int = 0,
                    eval_len: int = 512) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Our case study's calibration windows ``[num_samples, seq_len]`` and evaluation windows ``[*, eval_len]``."""
    from llmopt_jax.compress.study import eval_texts
    from llmopt_jax.data.text import calibration_windows, token_windows

    calib = calibration_windows(tokenizer, "", "topics", num_samples, seq_len, seed)
    # The case study's windows: the close text's first 32, every window of the far text.
    texts = eval_texts(tokenizer, "", "", 32, 0, seq_len=eval_len)
    windows = {}
    for name, (tokens, max_windows) in texts.items():
        w = token_windows(np.asarray(tokens, np.int64), eval_len)
        windows[name] = w[:max_windows] if max_windows > 0 else w
    return calib, windows


def load_torch_model(ours, tmp: str):
    """A transformers LlamaForCausalLM (float32) holding the weights of ``ours`` (a loaded model)."""
    import torch
    import transformers

    import llmopt_jax as lj

    lj.save_model(ours, tmp, format="safetensors")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return model


def perplexity(model, windows: np.ndarray, batch: int = 4) -> float:
    """exp(mean NLL) over positions 1..L-1 of every window (our protocol: no BOS, non-overlapping windows)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            ids = torch.as_tensor(windows[s : s + batch])
            logits = model(ids).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
            count += ids[:, 1:].numel()
    return float(np.exp(nll / count))


def block_linears(layer) -> dict:
    import torch.nn as nn

    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def rtn(model, bits: int, ref) -> None:
    """The reference's ``--nearest`` baseline: per output channel, asymmetric, every block linear."""
    for layer in model.model.layers:
        for m in block_linears(layer).values():
            q = ref.Quantizer()
            q.configure(bits, perchannel=True, sym=False, mse=False)
            w = m.weight.data
            q.find_params(w, weight=True)
            m.weight.data = ref.quantize(w, q.scale, q.zero, q.maxq).to(w.dtype)


def gptq_sequential(model, calib: np.ndarray, bits: int, act_order: bool, ref, damp: float = 0.01,
                    hessian_blocks: int = 0, group_size: int = -1) -> dict:
    """The reference's ``llama_sequential`` (default mode) with its ``GPTQ`` and ``Quantizer`` classes.

    ``hessian_blocks`` > 0: quantize nothing; return the Hessians the reference's ``add_batch`` collects for the
    first ``hessian_blocks`` blocks (dense weights), as ``{(block, linear name): float64 array}``."""
    import torch
    import torch.nn as nn
    from transformers.cache_utils import Cache

    layers = model.model.layers
    n, length = calib.shape
    inps = torch.zeros((n, length, model.config.hidden_size))
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):  # records the first block's inputs and keyword arguments, then stops the forward
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp[0]
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    with torch.no_grad():
        for j in range(n):
            try:
                # use_cache=False: with a KV cache every later per-block call would append to it, and each window
                # would attend to the keys of all windows before it (transformers 5 passes it as ``cache``).
                model(torch.as_tensor(calib[j : j + 1]), use_cache=False)
            except ValueError:
                pass
    layers[0] = layers[0].module
    kwargs = {k: v for k, v in cache["kwargs"].items()
              if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
    stray = [k for k, v in kwargs.items() if isinstance(v, Cache)]
    if stray:
        raise RuntimeError(f"the blocks would be called with a KV cache ({stray}): the windows would see each other")
    outs = torch.zeros_like(inps)

    def run(layer, x):
        out = layer(x.unsqueeze(0), **kwargs)
        return (out[0] if isinstance(out, tuple) else out)[0]

    hessians = {}
    with torch.no_grad():
        for i in range(hessian_blocks or len(layers)):
            layer = layers[i]
            subset = block_linears(layer)
            solvers = {}
            for name, m in subset.items():
                solvers[name] = ref.GPTQ(m)
                solvers[name].quantizer = ref.Quantizer()
                solvers[name].quantizer.configure(bits, perchannel=True, sym=False, mse=False)
            handles = [m.register_forward_hook(lambda _, inp, out, name=name: solvers[name].add_batch(inp[0].data, out.data))
                       for name, m in subset.items()]
            for j in range(n):
                outs[j] = run(layer, inps[j])
            for h in handles:
                h.remove()
            for name in subset:
                if hessian_blocks:
                    hessians[(i, name.split(".")[-1])] = solvers[name].H.double().numpy()
                else:
                    solvers[name].fasterquant(percdamp=damp, groupsize=group_size, actorder=act_order)
                solvers[name].free()
            for j in range(n):
                outs[j] = run(layer, inps[j])
            inps, outs = outs, inps
            print(f"  block {i + 1}/{hessian_blocks or len(layers)}", file=sys.stderr, flush=True)
    return hessians


def hessian_check(ours_model, torch_model, calib: np.ndarray, ref, blocks: int = 4) -> dict:
    """The Hessians both pipelines collect for the first ``blocks`` blocks of the dense model, compared.

    The reference's ``add_batch`` sums ``2/n · XᵀX`` over ``n`` *windows*, ours ``2/n · XᵀX`` over ``n`` *tokens*;
    each is divided by its trace before the relative Frobenius difference is taken. This checks the feeding (block
    inputs, attention, keyword arguments) that :func:`gptq_sequential` gives the reference, before any
    quantization; agreement here and in :func:`matrix_check` leaves only rounding to differ between the two."""
    ours = our_dense_hessians(ours_model, calib, lambda block, name: block < blocks)
    theirs = gptq_sequential(torch_model, calib, 3, False, ref, hessian_blocks=blocks)
    unit = lambda h: np.asarray(h, np.float64) / np.trace(h)  # noqa: E731 - the two differ in scale only
    diff = {f"{block} {name}": float(np.linalg.norm(unit(h) - unit(ours[(block, name)][1]))
                                     / np.linalg.norm(unit(ours[(block, name)][1])))
            for (block, name), h in sorted(theirs.items())}
    return {"blocks": blocks, "max_relative_difference": max(diff.values()), "relative_difference": diff}


def our_dense_hessians(ours_model, calib: np.ndarray, wanted) -> dict:
    """``{(block, linear name): (W, H)}`` float32 (``[outputs, inputs]``, ``[inputs, inputs]``) from our sequential
    pass over the dense model (weights unchanged, float32 passes), for the matrices where ``wanted(block, name)``."""
    from llmopt_jax.compress.calibrate import LINEAR_NAMES, compress_sequentially

    found, seen = {}, [0]

    def record(w, stats):
        block, name = divmod(seen[0], len(LINEAR_NAMES))
        seen[0] += 1
        if wanted(block, LINEAR_NAMES[name]):
            found[(block, LINEAR_NAMES[name])] = (np.asarray(w, np.float32), np.asarray(stats.hessian, np.float32))
        return w, {}

    compress_sequentially(ours_model.cfg, ours_model.params, calib, record, progress=False, compute_dtype="float32")
    return found


# Matrices for the per-matrix check: (block, linear name), spread over the depth of the model.
CHECK_MATRICES = ((0, "q_proj"), (0, "down_proj"), (14, "v_proj"), (14, "o_proj"), (29, "up_proj"), (29, "down_proj"))


def matrix_check(ours_model, calib: np.ndarray, ref) -> dict:
    """Our ``gptq_quantize`` and the reference's ``GPTQ.fasterquant`` on the *same* weights and Hessian.

    The Hessians are those our sequential pass collects (unchanged dense weights, float32 passes) for the matrices
    of :data:`CHECK_MATRICES`; the reference gets each as its ``H``. Per matrix and setting: the fraction of integer
    codes that differ, and both results' output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``. This separates
    the algorithm (must agree) from the end-to-end perplexity (30 blocks of float32 rounding in a chaotic regime)."""
    import torch
    import torch.nn as nn

    from llmopt_jax.compress.quantize import QuantGrid, gptq_quantize

    wanted = our_dense_hessians(ours_model, calib, lambda block, name: (block, name) in CHECK_MATRICES)
    out = {}
    for (block, name), (w, h) in sorted(wanted.items()):
        for bits, act_order in ((3, False), (4, True)):
            ours, qm = gptq_quantize(w, h, QuantGrid(bits), act_order=act_order)
            ours, our_codes = np.asarray(ours), np.asarray(qm.codes).reshape(w.shape)
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
            layer.weight.data = torch.from_numpy(w.copy())
            solver = ref.GPTQ(layer)
            solver.H = torch.from_numpy(h.copy())
            solver.quantizer = ref.Quantizer()
            solver.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
            solver.fasterquant(percdamp=0.01, groupsize=-1, actorder=act_order)
            theirs = layer.weight.data.numpy()
            # The reference keeps float32 scales, we store float16 ones: compare the integer codes.
            scale, zero = solver.quantizer.scale.numpy(), solver.quantizer.zero.numpy()
            their_codes = np.round(theirs / scale) + zero

            def output_error(q):
                d = (q - w).astype(np.float64)
                return float(np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", w, h, w))

            key = f"block {block} {name} {bits}-bit{' act-order' if act_order else ''}"
            out[key] = {"differing_codes": float(np.mean(our_codes != their_codes)),
                        "output_error_ours": output_error(ours), "output_error_reference": output_error(theirs)}
            print(key, json.dumps(out[key]), flush=True)
    return out


def our_rows(path: str = OURS) -> dict[str, dict]:
    """Our case study's rows by label (``docs/results/quantization_case_study_rows.jsonl`` or another run's
    ``rows.jsonl``)."""
    from experiments.quantization_case_study import label

    rows = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            rows[label(r)] = r
    return rows


def compare_row(row: dict, ours: dict | None) -> None:
    """Puts our row's perplexities and the ratios ours / reference into ``row`` (a reference row of the JSON), with
    the calibration precision our row ran at; without our row, removes stale ones."""
    for key in ("ours_close", "ours_far", "ratio_close", "ratio_far", "ours_compute_dtype"):
        row.pop(key, None)
    if ours is not None:
        row.update(ours_close=ours["perplexity_close"], ours_far=ours["perplexity_far"],
                   ours_compute_dtype=ours.get("settings", {}).get("compute_dtype"))
        row.update(ratio_close=row["ours_close"] / row["reference_close"],
                   ratio_far=row["ours_far"] / row["reference_far"])


def compare_only(out: str, ours_by_seed: dict[int, str]) -> dict:
    """Refreshes the ours / ratio entries of ``out``'s stored reference rows from our rows files (seed -> path),
    without running the reference (after our side changed)."""
    with open(out) as f:
        result = json.load(f)
    ours = {seed: our_rows(path) for seed, path in ours_by_seed.items()}
    for name, row in result["rows"].items():
        base, _, seed = name.partition(" seed ")
        compare_row(row, ours.get(int(seed or 0), {}).get(base))
        print(name, {k: v for k, v in row.items() if k.startswith(("ours", "ratio"))}, flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gptq-repo", default="", help="a checkout of github.com/IST-DASLab/gptq (required to run it)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="calibration seed (rows get a ' seed N' suffix if not 0)")
    parser.add_argument("--ours", default=OURS, help="our case study's rows.jsonl (run with the same seed)")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--hessian-check", action="store_true",
                        help="also compare the Hessians both pipelines collect for the first blocks (see hessian_check)")
    parser.add_argument("--matrix-check", action="store_true",
                        help="also compare both GPTQ solvers on the same weights and Hessians (see matrix_check)")
    parser.add_argument("--compare-only", default="",
                        help="SEED=ROWS.jsonl,...: only refresh ours and the ratios of the stored reference rows from "
                             "these rows files (no reference run, no torch; --gptq-repo is then ignored)")
    args = parser.parse_args()
    if args.compare_only:
        compare_only(args.out, {int(seed): path for seed, path in
                                (item.split("=", 1) for item in args.compare_only.split(",") if item)})
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():  # fasterquant times itself with torch.cuda.synchronize(), which needs CUDA
        torch.cuda.synchronize = lambda *a, **k: None
    if not args.gptq_repo:
        parser.error("--gptq-repo is required (a checkout of github.com/IST-DASLab/gptq)")
    sys.path.insert(0, os.path.abspath(args.gptq_repo))
    import gptq as ref_gptq  # the reference's modules, from the checkout
    import quant as ref_quant

    class ref:  # the three names the reference's llama.py uses
        GPTQ = ref_gptq.GPTQ
        Quantizer = ref_quant.Quantizer
        quantize = ref_quant.quantize

    import llmopt_jax as lj

    ours_model = lj.load_pretrained("smollm2-135m")
    calib, windows = protocol_tokens(ours_model.tokenizer, args.num_samples, args.seq_len, args.seed)
    ours = our_rows(args.ours)
    result = json.load(open(args.out)) if os.path.exists(args.out) else {"rows": {}}
    result.update(protocol=dict(calibration=f"{args.num_samples} x {args.seq_len} tokens of pydoc_data.topics, seed 0 "
                                            "unless the row name says another",
                                close="stdlib docstrings, first 32 windows of 512", far="LICENSE.txt, every window of 512",
                                reference="IST-DASLab/gptq gptq.py + quant.py (per channel, asymmetric, damp 0.01, "
                                          "blocksize 128), fed as llama.py's llama_sequential",
                                torch=torch.__version__, threads=torch.get_num_threads()))

    def save() -> None:  # after every part: a long run keeps what it finished
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")

    if args.matrix_check:
        result["matrix_check"] = matrix_check(ours_model, calib, ref)
        save()
    with tempfile.TemporaryDirectory() as tmp:
        base = load_torch_model(ours_model, tmp)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        if args.hessian_check:
            result["hessian_check"] = hessian_check(ours_model, base, calib, ref)
            print("hessian check: max relative difference", result["hessian_check"]["max_relative_difference"], flush=True)
            save()
        del ours_model
        dense = {name: perplexity(base, w) for name, w in windows.items()}
        result["dense"] = dense
        print(f"dense: close {dense['close']:.3f} far {dense['far']:.3f} (ours float32: "
              f"{ours['float32']['perplexity_close']:.3f} / {ours['float32']['perplexity_far']:.3f})", flush=True)
        for name in [r for r in args.rows.split(",") if r]:
            method, bits, act_order, group_size = ROWS[name]
            base.load_state_dict(state)
            t0 = time.perf_counter()
            if method == "rtn":
                rtn(base, bits, ref)
            else:
                gptq_sequential(base, calib, bits, act_order, ref, group_size=group_size)
            seconds = time.perf_counter() - t0
            row = {"reference_close": perplexity(base, windows["close"]), "reference_far": perplexity(base, windows["far"]),
                   "reference_seconds": round(seconds, 1)}
            compare_row(row, ours.get(name))
            result["rows"][name + (f" seed {args.seed}" if args.seed else "")] = row
            print(name, json.dumps(row), flush=True)
            save()


if __name__ == "__main__":
    main()
