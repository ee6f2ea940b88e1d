"""MoEfication (Zhang et al., 2022): turn a dense SwiGLU decoder into a mixture-of-experts model.

Each layer's MLP ``down(silu(gate(h)) * up(h))`` is a sum over its ``f`` hidden units, so splitting the units
into ``E`` disjoint groups of ``f/E`` writes it exactly as the sum of ``E`` smaller SwiGLU MLPs (the experts).
Computing only the ``k`` experts a router picks approximates the dense MLP; with ``k = E`` the MoE model *is* the
dense model (up to float summation order), since experts are combined with unit weights (``moe_gating="unit"``).

1. **Clustering** (per layer, on calibration tokens): each hidden unit is described by its activation
   magnitudes ``|a_j|`` over the tokens (centred, unit norm: a correlation profile). Balanced spherical k-means
   groups units that activate together into ``E`` clusters of exactly ``f/E`` units: each iteration assigns
   (unit, cluster) pairs greedily in order of similarity while a cluster has room, then recomputes centroids.
2. **Routers** (per layer): the target of token ``t`` for expert ``e`` is the share of the MLP's output norm that
   expert produces, ``||a_t[S_e] W_down[S_e]|| / sum_e'(...)``; a linear router ``d -> E`` (no bias, as in the
   model) is fitted to it by ridge regression on the MLP inputs ``h`` (closed form, deterministic), so its top
   k are the experts with the largest expected outputs (MoEfication's router objective).

Statistics come from the *dense* model (each layer sees the dense model's inputs), as in the paper.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llmopt_jax.errors import ConfigError
from llmopt_jax.models.config import ModelConfig
from llmopt_jax.models.decoder import Block
from llmopt_jax.models.layout import layer_params, stack_layers


@dataclasses.dataclass
class MoefyReport:
    """What the conversion measured: per-layer router accuracy (its top-1 is the expert with the largest
    output norm), the mean within-cluster co-activation similarity, and seconds spent."""

    router_top1_accuracy: list[float]
    router_topk_recall: list[float]  # fraction of the k largest-output experts among the router's top k
    cluster_similarity: list[float]
    num_calibration_tokens: int
    seconds: float


class _DenseBlockRunner:
    """One dense block, jitted: ``(block params, x [B, L, D]) -> (next x, MLP input h [B, L, D], a [B, L, f])``."""

    def __init__(self, cfg: ModelConfig):
        dense = dataclasses.replace(cfg, num_experts=0, scan_layers=False)
        if dense.attention == "xla":
            dense = dataclasses.replace(dense, attention="xla_causal")  # whole windows from position 0
        self.graphdef, self.abstract = nnx.split(nnx.eval_shape(lambda: Block(dense, rngs=nnx.Rngs(0))))
        self.run = jax.jit(self._run)

    def _run(self, block_params: dict, x: jax.Array):
        state = jax.tree.map(lambda a: a, self.abstract)
        nnx.replace_by_pure_dict(state, block_params)
        block = nnx.merge(self.graphdef, state)
        captured = {}
        base = block.down_proj.dot_general

        def record(lhs, rhs, dims, precision=None, preferred_element_type=None):
            captured["a"] = lhs
            return base(lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type)

        block.down_proj.dot_general = record
        gate_base = block.gate_proj.dot_general

        def record_h(lhs, rhs, dims, precision=None, preferred_element_type=None):
            captured["h"] = lhs
            return gate_base(lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type)

        block.gate_proj.dot_general = record_h
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        y, _ = block(x, positions)
        return y, captured["h"].astype(jnp.float32), captured["a"].astype(jnp.float32)


def balanced_clusters(features: np.ndarray, num_clusters: int, iterations: int = 20, seed: int = 0,
                      restarts: int = 3) -> np.ndarray:
    """Balanced spherical k-means: ``features`` float ``[n, m]`` (rows unit-norm) -> cluster id int ``[n]``, each
    cluster holding exactly ``n / num_clusters`` rows. The best of ``restarts`` k-means++ seedings (total cosine
    similarity to the own cluster's centre); deterministic for a given ``seed``."""
    n = features.shape[0]
    if n % num_clusters:
        raise ConfigError(f"{n} hidden units do not split into {num_clusters} equal experts")
    features = np.ascontiguousarray(features)
    best, best_score = None, -np.inf
    for r in range(max(restarts, 1)):
        assign = _balanced_kmeans(features, num_clusters, iterations, np.random.default_rng([seed, r]))
        centers = _centers(features, assign, num_clusters)
        score = float(np.sum(features * centers[assign]))
        if score > best_score:
            best, best_score = assign, score
    return best


def _balanced_kmeans(features: np.ndarray, num_clusters: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    n = features.shape[0]
    size = n // num_clusters
    # k-means++ seeding on cosine distance.
    centers = [features[rng.integers(n)]]
    for _ in range(1, num_clusters):
        d = 1.0 - np.max(features @ np.stack(centers).T, axis=1)
        d = np.maximum(d, 0.0) ** 2
        centers.append(features[rng.choice(n, p=d / d.sum()) if d.sum() > 0 else rng.integers(n)])
    centers = np.stack(centers)
    assign = np.full(n, -1)
    for _ in range(iterations):
        new = _balanced_assignment(features @ centers.T, size)
        if np.array_equal(new, assign):
            break
        assign = new
        centers = _centers(features, assign, num_clusters)
    return assign


def _centers(features: np.ndarray, assign: np.ndarray, num_clusters: int) -> np.ndarray:
    """Unit-norm mean direction of each cluster's rows, ``[num_clusters, m]``: one matmul with the one-hot
    assignment (gathering each cluster's rows of a large ``features`` costs ~50x more)."""
    onehot = (assign[None, :] == np.arange(num_clusters)[:, None]).astype(features.dtype)
    sums = onehot @ features
    return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


def _balanced_assignment(sim: np.ndarray, size: int) -> np.ndarray:
    """Greedy capacity-constrained assignment of ``sim`` ``[n, E]``'s rows to columns, ``size`` rows each: in
    rounds, every unassigned row proposes to its most similar column with room, and each column accepts its
    most similar proposals while it has room (at most ``E`` rounds)."""
    n, e = sim.shape
    assign = np.full(n, -1)
    room = np.full(e, size)
    while (assign < 0).any():
        pending = np.flatnonzero(assign < 0)
        s = np.where(room[None, :] > 0, sim[pending], -np.inf)
        best = np.argmax(s, axis=1)
        score = s[np.arange(len(pending)), best]
        for c in np.unique(best):
            mine = np.flatnonzero(best == c)
            take = pending[mine[np.argsort(-score[mine], kind="stable")][: room[c]]]
            assign[take] = c
            room[c] -= len(take)
    return assign


def coactivation_features(a: np.ndarray, max_tokens: int = 8192, seed: int = 0) -> np.ndarray:
    """``a`` ``[N, f]`` hidden activations -> ``[f, n]`` unit-norm, centred magnitude profiles over ``n`` tokens."""
    if a.shape[0] > max_tokens:
        a = a[np.random.default_rng(seed).choice(a.shape[0], max_tokens, replace=False)]
    x = np.abs(a).T.astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float32)


@jax.jit
def _expert_output_norms(a: jax.Array, down: jax.Array) -> jax.Array:
    """``a`` ``[N, E, fe]`` grouped activations, ``down`` ``[E, fe, D]`` -> per-expert output norms ``[N, E]``."""
    out = jnp.einsum("nef,efd->ned", a, down, precision=jax.lax.Precision.HIGHEST)
    return jnp.linalg.norm(out, axis=-1)


def fit_router(h: np.ndarray, norms: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """Least-squares router ``[D, E]``: ``h`` ``[N, D]`` -> each expert's share of the output norm ``[N, E]``.

    ``ridge`` scales the Tikhonov term by the mean diagonal of ``hᵀh`` (scale-free)."""
    target = norms / np.maximum(norms.sum(axis=1, keepdims=True), 1e-12)
    h64 = h.astype(np.float64)
    gram = h64.T @ h64
    gram += ridge * np.mean(np.diag(gram)) * np.eye(gram.shape[0])
    return np.linalg.solve(gram, h64.T @ target.astype(np.float64)).astype(np.float32)


def split_mlp(mlp: dict, assign: np.ndarray, num_experts: int) -> dict:
    """Dense ``{gate_proj, up_proj, down_proj}`` kernels (``[D, f]``, ``[D, f]``, ``[f, D]``) -> the MoE
    layer's expert kernels ``[E, D, fe]``, ``[E, D, fe]``, ``[E, fe, D]`` (units of expert ``e``: ``assign == e``,
    in their original order)."""
    order = np.concatenate([np.flatnonzero(assign == e) for e in range(num_experts)])
    gate, up, down = (np.asarray(mlp[n]["kernel"], np.float32) for n in ("gate_proj", "up_proj", "down_proj"))
    d, f = gate.shape
    fe = f // num_experts
    return {
        "gate_proj": {"kernel": gate[:, order].reshape(d, num_experts, fe).transpose(1, 0, 2).copy()},
        "up_proj": {"kernel": up[:, order].reshape(d, num_experts, fe).transpose(1, 0, 2).copy()},
        "down_proj": {"kernel": down[order].reshape(num_experts, fe, d).copy()},
    }


def moe_config(cfg: ModelConfig, num_experts: int, top_k: int) -> ModelConfig:
    """The MoEfied model's config: every layer routed over ``num_experts`` experts of ``mlp_dim / E`` units, unit
    gates, and the capacity dispatch with ``C = S`` (``capacity_factor = E / k``: nothing is ever dropped, and
    on CPUs the batched einsum is far cheaper than ``ragged_dot``, which XLA:CPU lowers to a masked dense matmul
    over all experts)."""
    if num_experts < 1 or cfg.mlp_dim % num_experts:
        raise ConfigError(f"num_experts={num_experts} must divide the MLP width {cfg.mlp_dim}")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
    return dataclasses.replace(
        cfg, num_experts=num_experts, moe_top_k=top_k, moe_layers="all", moe_expert_dim=cfg.mlp_dim // num_experts,
        moe_gating="unit", moe_dispatch="capacity", moe_capacity_factor=float(num_experts) / top_k,
    )


def moefy(cfg: ModelConfig, pure: dict, windows: np.ndarray, num_experts: int, top_k: int, *,
          batch_size: int = 8, ridge: float = 1e-2, iterations: int = 20, seed: int = 0,
          progress: bool = True) -> tuple[ModelConfig, dict, MoefyReport]:
    """Dense ``(cfg, pure params)`` + calibration ``windows`` int ``[N, L]`` -> ``(moe cfg, moe pure params, report)``.

    ``pure`` is a float pure-dict (stacked or unrolled layers); the result keeps its layer layout. Memory: one
    layer's MLP inputs and hidden activations over the calibration tokens (``N·L·(D + f)`` float32).
    """
    if cfg.num_experts:
        raise ConfigError("the model already has routed experts; MoEfication starts from a dense model")
    new_cfg = moe_config(cfg, num_experts, top_k)
    t0 = time.perf_counter()
    runner = _DenseBlockRunner(cfg)
    stacked = cfg.scan_layers
    table = jnp.asarray(pure["embed"]["embedding"], jnp.float32)
    xs = [jnp.take(table, jnp.asarray(windows[i:i + batch_size]), axis=0) for i in range(0, len(windows), batch_size)]
    new_layers, acc1, recall, sims = [], [], [], []
    fe = cfg.mlp_dim // num_experts
    for i in tqdm(range(cfg.num_layers), desc="moefy", disable=not progress, leave=False):
        block = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), layer_params(pure["layers"], i, stacked))
        hs, acts, nxt = [], [], []
        for x in xs:
            y, h, a = runner.run(block, x)
            nxt.append(y)
            hs.append(np.asarray(h).reshape(-1, cfg.d_model))
            acts.append(np.asarray(a).reshape(-1, cfg.mlp_dim))
        xs = nxt
        h, a = np.concatenate(hs), np.concatenate(acts)
        feats = coactivation_features(a, seed=seed + i)
        assign = balanced_clusters(feats, num_experts, iterations=iterations, seed=seed + i)
        centers = np.stack([feats[assign == e].mean(0) for e in range(num_experts)])
        centers /= np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
        sims.append(float(np.mean(np.sum(feats * centers[assign], axis=1))))  # cosine to own cluster's centre
        experts = split_mlp(block, assign, num_experts)
        order = np.concatenate([np.flatnonzero(assign == e) for e in range(num_experts)])
        grouped = a[:, order].reshape(-1, num_experts, fe)
        norms = np.concatenate([
            np.asarray(_expert_output_norms(jnp.asarray(grouped[j:j + 4096]), jnp.asarray(experts["down_proj"]["kernel"])))
            for j in range(0, len(grouped), 4096)])
        router = fit_router(h, norms, ridge)
        logits = h @ router
        acc1.append(float(np.mean(np.argmax(logits, 1) == np.argmax(norms, 1))))
        k = top_k
        top_true = np.argsort(-norms, axis=1)[:, :k]
        top_pred = np.argsort(-logits, axis=1)[:, :k]
        recall.append(float(np.mean([len(set(p) & set(t)) / k for p, t in zip(top_pred[:4096], top_true[:4096])])))
        layer = {key: block[key] for key in block if key not in ("gate_proj", "up_proj", "down_proj")}
        layer = jax.tree.map(np.asarray, layer)
        layer["moe"] = {"router": router, **experts}
        new_layers.append(layer)
    new_pure = {key: value for key, value in pure.items() if key != "layers"}
    new_pure["layers"] = stack_layers(new_layers, stacked)
    report = MoefyReport(acc1, recall, sims, int(windows.size), time.perf_counter() - t0)
    return new_cfg, new_pure, report


def mlp_flops_fraction(cfg: ModelConfig) -> float:
    """MLP matmul FLOPs per token of a MoE config relative to its dense counterpart (``E`` experts of ``fe``):
    ``(k·3·D·fe + D·E) / (3·D·E·fe)``; the router's ``D·E`` included."""
    d, e, fe, k = cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.moe_top_k
    return (k * 3 * d * fe + d * e) / (3 * d * e * fe)


def with_top_k(cfg: ModelConfig, top_k: int) -> ModelConfig:
    """The same MoEfied model run with another number of active experts (capacity kept at ``C = S``)."""
    if not 1 <= top_k <= cfg.num_experts:
        raise ConfigError(f"top_k={top_k} must be in 1..num_experts={cfg.num_experts}")
    return dataclasses.replace(cfg, moe_top_k=top_k, moe_capacity_factor=float(cfg.num_experts) / top_k)
