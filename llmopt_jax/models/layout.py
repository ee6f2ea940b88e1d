"""The per-layer parameter layout of a decoder's pure params (``pure["layers"]``).

With ``cfg.scan_layers`` the blocks are *stacked*: ``layers`` is one block's tree whose every leaf carries a
leading layer axis ``[L, ...]`` (what ``nnx.scan`` over the blocks holds). Otherwise they are *unrolled*:
``layers`` maps the block index to that block's tree, ``{0: block_0, ..., L-1: block_{L-1}}``; after a JSON or
orbax round trip the keys may be the strings ``"0".."L-1"``. Readers, writers and the compression passes go
through these helpers instead of branching on the layout themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from llmopt_jax.errors import ConfigError
from llmopt_jax.models.config import ModelConfig


def layers_are_stacked(layers: Mapping) -> bool:
    """Whether ``layers`` is a stacked block tree (keys are module names) rather than keyed by block index
    (int or digit-string keys); an empty mapping counts as unrolled (it holds no blocks)."""
    return not all(isinstance(key, int) or str(key).isdigit() for key in layers)


def layer_params(layers: Mapping, i: int, stacked: bool) -> Any:
    """Block ``i``'s parameter tree: every stacked leaf ``[L, ...]`` indexed to ``[...]`` (a view for NumPy,
    a device slice for jax arrays), or the unrolled entry under key ``i`` or ``str(i)``. Raises ``KeyError``
    when an unrolled ``layers`` has no block ``i`` and ``IndexError`` when a stacked leaf has no row ``i``."""
    if stacked:

        def take(a: Any) -> Any:
            if not 0 <= i < np.shape(a)[0]:  # jax would clamp the index and return the last block instead
                raise IndexError(f"block {i} of a stacked leaf of shape {np.shape(a)}")
            return a[i]

        return jax.tree.map(take, layers)
    if i in layers:
        return layers[i]
    if str(i) in layers:
        return layers[str(i)]
    raise KeyError(i)


def stack_layers(blocks: Sequence[Any], stacked: bool) -> dict:
    """The ``layers`` entry holding ``blocks`` (``L`` trees of one structure): leaves stacked with
    ``np.stack`` into NumPy ``[L, ...]`` (same dtype) when ``stacked``, else ``{i: blocks[i]}`` with int keys.
    No blocks give ``{}``."""
    if not stacked:
        return dict(enumerate(blocks))
    if not blocks:
        return {}
    return jax.tree.map(lambda *leaves: np.stack(leaves), *blocks)


def truncate_layers(cfg: ModelConfig, pure: dict, k: int) -> tuple[ModelConfig, dict]:
    """``(cfg, pure)`` of the model made of the first ``k`` blocks (``1 <= k <= cfg.num_layers``):
    ``num_layers=k`` and, in ``pure``'s layout, stacked leaves cut to ``[k, ...]`` or blocks ``0..k-1``
    (int keys). Other entries (embedding, final norm, head) are shared, not copied."""
    if not 1 <= k <= cfg.num_layers:
        raise ConfigError(f"cannot keep {k} of the model's {cfg.num_layers} layers (need 1..{cfg.num_layers})")
    if cfg.scan_layers:
        layers = jax.tree.map(lambda a: a[:k], pure["layers"])
    else:
        layers = {i: layer_params(pure["layers"], i, stacked=False) for i in range(k)}
    return dataclasses.replace(cfg, num_layers=k), {**pure, "layers": layers}
