"""A PyTorch (CPU, float32) GPTQ: the baseline that ``experiments.bench_quantize`` times our JAX solver against.

Written from the paper (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1), in the style of a straightforward PyTorch implementation, on the grid of
``llmopt_jax.compress.quantize`` (so both solvers solve the same problem):

1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights are zeroed;
2. act-order: columns visited by decreasing ``H_jj`` (the permutation is undone at the end), groups then fitted
   from the original weights up front ("static groups");
3. dampening ``λ = percdamp · mean(diag H)``; ``Hinv = cholesky(cholesky_inverse(cholesky(H)), upper=True)``;
4. columns left to right in blocks of ``blocksize``; per column ``q = round_to_grid(w)``, ``err = (w − q) / d``,
   ``W1[:, i:] −= err ⊗ Hinv1[i, i:]``; after a block the lazy batched update ``W[:, i2:] −= Err1 @ Hinv[i1:i2, i2:]``;
5. without act-order each group's scale/offset is fitted when the solver reaches its first column, from the
   weights as updated so far, in-block updates included (blocks are widened to whole groups for that; the
   authors' reference code fits from the matrix without the current block's updates, which makes its result
   depend on the block size; ours and this one do not).

Grid: ``bits``, symmetric (``d·q``, ``d = signed max / -2^(b-1)``) or asymmetric: with an integer zero-point
(``zero_point="int"``, the reference code's quantizer: range widened to include 0, ``d = (max - min) / (2^b - 1)``,
``z = round(-min / d)``, ``d·(clamp(round(w/d) + z) - z)``) or a float offset (``d·q + min``, llama.cpp's Q4_1);
scales/offsets rounded to float16; ``group_size`` <= 0 = one scale per output channel.

Only ``torch`` is needed (an optional dependency: ``pip install -e '.[reference]'``); nothing here imports JAX.
"""

from __future__ import annotations

import torch


def _fit(groups: torch.Tensor, bits: int, symmetric: bool, zero_point: str = "int"
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset (float16-rounded scale, float32) of each row of ``groups`` ``[rows, width]`` -> ``[rows]``;
    with an integer zero-point the second value is the zero-point ``z`` itself."""
    if symmetric:
        idx = torch.argmax(groups.abs(), dim=1, keepdim=True)
        scale = torch.gather(groups, 1, idx)[:, 0] / -(2 ** (bits - 1))
        return scale.half().float(), torch.zeros_like(scale)
    low, high = groups.min(dim=1).values, groups.max(dim=1).values
    if zero_point == "float":
        return ((high - low) / (2**bits - 1)).half().float(), low.half().float()
    low, high = torch.clamp(low, max=0), torch.clamp(high, min=0)
    empty = (low == 0) & (high == 0)
    low[empty], high[empty] = -1.0, 1.0
    scale = ((high - low) / (2**bits - 1)).half().float()
    return scale, torch.round(-low / scale)


def _round(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, symmetric: bool,
           zero_point: str = "int") -> torch.Tensor:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    if not symmetric and zero_point == "int":  # offset holds the zero-point
        return scale * (torch.clamp(torch.round(w / safe) + offset, lo, hi) - offset)
    q = torch.clamp(torch.round((w - offset) / safe), lo, hi)
    return scale * q + offset


def gptq_torch(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = False,
    act_order: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    zero_point: str = "int",
) -> torch.Tensor:
    """GPTQ on ``W`` ``[rows = outputs, cols = inputs]`` with the input Hessian ``H`` ``[cols, cols]``.

    Returns the quantized (dequantized float32) weights ``[rows, cols]``; the inputs are not modified.
    """
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()
    rows, cols = W.shape
    width = cols if group_size <= 0 else group_size
    if cols % width:
        raise ValueError(f"group_size {group_size} does not divide {cols} inputs")

    dead = torch.diag(H) == 0
    # Act-order by the Hessian's own diagonal (dead inputs last); stable, so ties keep input order, as ours.
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = act_order or group_size <= 0
    if static:  # every group's grid from the original weights
        fitted = [_fit(W[:, g : g + width], bits, symmetric, zero_point) for g in range(0, cols, width)]
        scales, offsets = torch.stack([s for s, _ in fitted], 1), torch.stack([o for _, o in fitted], 1)
    group_of = torch.arange(cols) // width
    W, H, group_of = W[:, perm], H[perm][:, perm], group_of[perm]

    diag = torch.arange(cols)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    if not static:  # whole groups per block, so a group's columns are all up to date when it is fitted
        blocksize = -(-min(blocksize, cols) // width) * width
    scale = offset = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                scale, offset = scales[:, group_of[j]], offsets[:, group_of[j]]
            elif j % width == 0:  # the group's first column: fit it from the weights as updated so far
                scale, offset = _fit(W1[:, i : i + width], bits, symmetric, zero_point)
            w = W1[:, i]
            q = _round(w, scale, offset, bits, symmetric, zero_point)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)  # OBS update of the rest of the block
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)  # lazy batched update of all later columns
    return W[:, torch.argsort(perm)]
