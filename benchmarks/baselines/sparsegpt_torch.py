"""A PyTorch (CPU, float32) SparseGPT: the baseline that ``experiments.bench_prune`` times our JAX solver against.

Written from the paper (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", Algorithm 1), in the style of a straightforward PyTorch implementation:

1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights are zeroed;
2. dampening ``λ = percdamp · mean(diag H)`` on the diagonal;
3. ``Hinv = cholesky(cholesky_inverse(cholesky(H)), upper=True)``: the upper Cholesky factor of ``H⁻¹``, whose
   rows hold the OBS update directions of the successive column eliminations;
4. the columns are visited left to right in blocks of ``blocksize``. Unstructured: the block's mask drops the
   smallest ``w² / diag(Hinv_block)²`` over the whole ``[rows, blocksize]`` block. N:M: at every M-th column the
   M-N smallest of the next M columns are dropped, row by row;
5. per column: ``q = w`` with dropped entries zeroed, ``err = (w − q) / d``, ``W1[:, i:] −= err ⊗ Hinv1[i, i:]``;
6. after a block, the lazy batched update ``W[:, i2:] −= Err1 @ Hinv[i1:i2, i2:]``.

Only ``torch`` is needed (an optional dependency: ``pip install -e '.[reference]'``); nothing here imports JAX.
"""

from __future__ import annotations

import torch


def sparsegpt_torch(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on ``W`` ``[rows = outputs, cols = inputs]`` with the input Hessian ``H`` ``[cols, cols]``.

    ``n = m = 0``: unstructured at ``sparsity``; otherwise N:M (keep ``n`` of every ``m`` consecutive inputs of a
    row; ``sparsity`` is then ignored). Returns ``(pruned float32 weights, boolean keep-mask)``; the inputs are
    not modified.
    """
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()
    rows, cols = W.shape
    if m and (cols % m or blocksize % m or not 0 < n < m):
        raise ValueError(f"N:M {n}:{m} needs 0 < n < m and cols ({cols}) and blocksize ({blocksize}) divisible by m")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.arange(cols)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    drop = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        drop1 = torch.zeros(rows, count, dtype=torch.bool)

        if not m:
            # Exactly floor(sparsity * numel) weights per block, ties broken arbitrarily: the canonical code keeps
            # `saliency <= sort(saliency)[int(numel * sparsity)]`, one weight more, while our JAX solver drops
            # exactly floor(sparsity * numel) -- so both are compared on the same count.
            k = int(sparsity * W1.numel())
            if k > 0:
                saliency = (W1**2 / d[None, :] ** 2).reshape(-1)
                drop1.view(-1)[torch.topk(saliency, k, largest=False).indices] = True

        for i in range(count):
            if m and i % m == 0:
                group = W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2
                drop1.scatter_(1, i + torch.topk(group, m - n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.masked_fill(drop1[:, i], 0.0)
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)  # rank-1 OBS update of the rest of the block
            Q1[:, i] = q
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        drop[:, i1:i2] = drop1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)  # lazy batched update of all later columns

    keep = ~drop
    keep[:, dead] = False
    return W, keep
