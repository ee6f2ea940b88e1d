"""Paged KV cache (the PagedAttention idea of vLLM): a pool of fixed-size pages, a page table per sequence.

Device side, every layer's keys and values live in one pool ``[layers, num_pages, page_size, kv_heads, head_dim]``.
A sequence owns an ordered list of pages (its page table, int32 ``[max_pages]``): token position ``p`` sits in page
``table[p // page_size]`` at offset ``p % page_size``. Reading is a gather of the table's pages into a contiguous
``[layers, B, pages * page_size, K, hd]`` view (the XLA reference path: the model then attends over it exactly as
over a contiguous cache), writing is a scatter of the new tokens' keys/values to their (page, offset) slots.

Page 0 is never handed out: padded table entries and writes of inactive rows point at it, so a padded batch row
or a finished sequence inside a multi-step decode loop can write without a branch and without touching live pages.

Host side, :class:`PagePool` hands out pages, counts references, and keeps a prefix cache: a full page is named by
the hash of its tokens chained with its predecessor's hash, so two prompts that share a prefix (a chat template's
system prompt) share those pages. A cached page whose last user finished stays cached (evictable, least recently
used first) until the pool needs the space.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmopt_jax.errors import ConfigError
from llmopt_jax.models.attention import causal_mask, xla_attention

NULL_PAGE = 0


@struct.dataclass
class PagedKV:
    """Key and value pools of every layer: ``[layers, num_pages, page_size, kv_heads, head_dim]`` each."""

    keys: jax.Array
    values: jax.Array

    @classmethod
    def create(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype):
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def page_size(self) -> int:
        return self.keys.shape[2]

    @property
    def num_pages(self) -> int:
        return self.keys.shape[1]


def gather_pages(pool: jax.Array, page_table: jax.Array) -> jax.Array:
    """Contiguous view ``[layers, B, P * page_size, K, hd]`` of ``pool`` ``[layers, N, page_size, K, hd]`` through
    ``page_table`` int32 ``[B, P]``: slot ``j`` of row ``b`` holds position ``j`` of sequence ``b``."""
    layers, _, ps, k, hd = pool.shape
    b, p = page_table.shape
    return pool[:, page_table].reshape(layers, b, p * ps, k, hd)


def scatter_tokens(pool: jax.Array, page_table: jax.Array, starts: jax.Array, new: jax.Array, num_valid: jax.Array,
                   layer: int | None = None) -> jax.Array:
    """Writes ``new`` ``[layers, B, L, K, hd]`` (positions ``starts[b] + j``) into ``pool`` through ``page_table``
    ``[B, P]``; tokens ``j >= num_valid[b]`` go to the null page (padding, finished rows). With ``layer``, ``new``
    is ``[1, B, L, K, hd]`` and only that layer of the pool is written."""
    _, _, ps, k, hd = pool.shape
    b, l = new.shape[1], new.shape[2]
    pos = starts[:, None] + jnp.arange(l, dtype=jnp.int32)[None, :]  # [B, L]
    slot = jnp.minimum(pos // ps, page_table.shape[1] - 1)
    page = jnp.take_along_axis(page_table, slot, axis=1)
    valid = jnp.arange(l, dtype=jnp.int32)[None, :] < num_valid[:, None]
    page = jnp.where(valid, page, NULL_PAGE).reshape(-1)
    offset = (pos % ps).reshape(-1)
    if layer is not None:
        return pool.at[layer, page, offset].set(new.reshape(b * l, k, hd).astype(pool.dtype))
    return pool.at[:, page, offset].set(new.reshape(new.shape[0], b * l, k, hd).astype(pool.dtype))


def paged_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, page_table: jax.Array,
                    q_positions: jax.Array) -> jax.Array:
    """Reference paged attention for one layer: ``q`` ``[B, L, H, hd]`` at ``q_positions`` int32 ``[B, L]`` over the
    keys/values ``[N, page_size, K, hd]`` that ``page_table`` ``[B, P]`` names; causal (slot ``j`` = position ``j``,
    keys at positions ``<=`` the query's). Returns ``[B, L, H, hd]``."""
    k = gather_pages(k_pool[None], page_table)[0]
    v = gather_pages(v_pool[None], page_table)[0]
    b, s = page_table.shape[0], k.shape[1]
    k_positions = jnp.broadcast_to(jnp.arange(s, dtype=q_positions.dtype), (b, s))
    return xla_attention(q, k.astype(q.dtype), v.astype(q.dtype), causal_mask(q_positions, k_positions))


def page_hashes(tokens: Sequence[int], page_size: int, parent: bytes = b"") -> list[bytes]:
    """Chained hashes of the full pages of ``tokens``: page ``i``'s hash covers tokens ``[0, (i + 1) * page_size)``,
    so equal hashes mean equal prefixes (not just equal pages)."""
    out = []
    h = parent
    for i in range(len(tokens) // page_size):
        chunk = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
        h = hashlib.blake2b(h + chunk, digest_size=16).digest()
        out.append(h)
    return out


class PagePool:
    """Host-side bookkeeping of the device pool: free pages, reference counts and the prefix cache.

    A page is in one of three states: free (in ``free``), used (``refcount > 0``), or cached-idle (``refcount ==
    0`` but named by a prefix hash, reusable by a later prompt with the same prefix, evicted LRU when needed).
    """

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        if num_pages < 2:
            raise ConfigError(f"the KV pool needs at least 2 pages (one is the null page), got {num_pages}")
        if page_size < 1:
            raise ConfigError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self.refcount = np.zeros(num_pages, np.int32)
        self.free: collections.deque[int] = collections.deque(range(1, num_pages))
        self.hash_to_page: dict[bytes, int] = {}
        self.page_to_hash: dict[int, bytes] = {}
        self.idle_cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU order
        self.prefix_queries = 0  # full prompt pages looked up
        self.prefix_hits = 0  # of which found cached

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_available(self) -> int:
        """Pages an allocation can get now (free plus evictable cached ones)."""
        return len(self.free) + len(self.idle_cached)

    @property
    def num_used(self) -> int:
        return int((self.refcount > 0).sum())

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh pages (refcount 1), evicting idle cached pages LRU-first; None (and nothing taken) if short."""
        if n > self.num_available:
            return None
        pages = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:
                page, _ = self.idle_cached.popitem(last=False)
                del self.hash_to_page[self.page_to_hash.pop(page)]
            self.refcount[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drops one reference to each page; unreferenced pages become free, or idle-cached if they hold a prefix."""
        for page in pages:
            self.refcount[page] -= 1
            assert self.refcount[page] >= 0, f"page {page} released twice"
            if self.refcount[page] == 0:
                if page in self.page_to_hash:
                    self.idle_cached[page] = None
                else:
                    self.free.append(page)

    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Pages holding the longest cached run of ``hashes`` (from the start), each with one more reference."""
        if not self.prefix_caching:
            return []
        self.prefix_queries += len(hashes)
        pages = []
        for h in hashes:
            page = self.hash_to_page.get(h)
            if page is None:
                break
            if self.refcount[page] == 0:
                del self.idle_cached[page]
            self.refcount[page] += 1
            pages.append(page)
        self.prefix_hits += len(pages)
        return pages

    def register(self, page: int, h: bytes) -> None:
        """Names a used, now full page by its prefix hash (first writer wins when two sequences computed it)."""
        if self.prefix_caching and h not in self.hash_to_page and page not in self.page_to_hash:
            self.hash_to_page[h] = page
            self.page_to_hash[page] = h
