"""The KV store of a chunkwise forward: per layer, one preallocated buffer for one CFG branch.

Layout of every layer's buffer (rows are tokens, per head):

    [ compressed clean history (≤ budget) | chunk a | chunk a+1 | ... ]   (chunk ids ascending)

A chunk forward of chunk ``c`` writes its K/V into its slot (registering it at the end the first time) and
attends to the rows up to the end of its slot: the compressed history plus every registered chunk ``≤ c``.
That is block-causal attention without a mask and without copying the context. When clean chunks
(finished, or the clean prefix) hold more tokens than the budget, the clean rows are compressed per head to
``budget`` tokens with the importance-minus-redundancy score, so the buffer never grows past
``budget + active window``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..models.common import attention
from .scoring import CompressionConfig, compress


@dataclass
class LayerKV:
    k: torch.Tensor | None = None  # [B, H, capacity, D]
    v: torch.Tensor | None = None
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk id -> rows, ascending
    compressed: int = 0  # rows of compressed history at the front
    kept: int = 0  # tokens kept by compressions (summed over events)
    dropped: int = 0

    @property
    def used(self) -> int:
        return max((e for _, e in self.ranges.values()), default=self.compressed)


class KVStore:
    """K/V of the chunks of one window for one CFG branch.

    capacity_tokens: rows per layer and head, allocated on first write.
    budget_tokens:   0 keeps every chunk; otherwise clean chunks are compressed to this many rows per head.
    """

    def __init__(self, num_layers: int, capacity_tokens: int, budget_tokens: int = 0,
                 compression: CompressionConfig | None = None, tokens_per_frame: int | None = None):
        self.num_layers = num_layers
        self.capacity = capacity_tokens
        self.budget = budget_tokens
        self.compression = compression or CompressionConfig()
        self.tokens_per_frame = tokens_per_frame
        self.clean: set[int] = set()
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.peak_rows = 0
        self.compress_seconds = 0.0

    def mark_clean(self, chunk_id: int) -> None:
        """The chunk will not change any more: it may be compressed."""
        self.clean.add(chunk_id)

    def view(self, chunk_id: int, first: int | None = None) -> "ChunkKV":
        """What chunk ``chunk_id``'s forward sees: its own rows and everything stored before them, or, with
        ``first``, only the chunks ``first..chunk_id`` (MAGI-1's key ranges)."""
        return ChunkKV(self, chunk_id, first)

    def first_row(self, layer: int, chunk_id: int) -> int:
        """The first row of a registered chunk (0 when it is not registered separately any more)."""
        return self.layers[layer].ranges.get(chunk_id, (0, 0))[0]

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for lay in self.layers for t in (lay.k, lay.v) if t is not None)

    # -- internals ---------------------------------------------------------------------------------
    def _clean_end(self, lay: LayerKV, current: int) -> int:
        """End row of the clean prefix of the layout (compressed rows + leading clean chunks)."""
        end = lay.compressed
        for cid, (s, e) in lay.ranges.items():
            if cid in self.clean and cid != current and s == end:
                end = e
            else:
                break
        return end

    def _compress(self, lay: LayerKV, q: torch.Tensor, clean_end: int) -> None:
        t0 = time.perf_counter()
        k_keep, v_keep, _ = compress(q, lay.k[:, :, :clean_end], lay.v[:, :, :clean_end], self.budget,
                                     self.compression, self.tokens_per_frame)
        n = k_keep.shape[2]
        rest_end = lay.used
        rest = slice(clean_end, rest_end)
        k_rest, v_rest = lay.k[:, :, rest].clone(), lay.v[:, :, rest].clone()
        lay.k[:, :, :n] = k_keep
        lay.v[:, :, :n] = v_keep
        lay.k[:, :, n:n + k_rest.shape[2]] = k_rest
        lay.v[:, :, n:n + v_rest.shape[2]] = v_rest
        shift = n - clean_end
        lay.ranges = {c: (s + shift, e + shift) for c, (s, e) in lay.ranges.items() if s >= clean_end}
        lay.dropped += clean_end - n
        lay.kept += n
        lay.compressed = n
        self.compress_seconds += time.perf_counter() - t0

    def extend(self, chunk_id: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.layers[layer]
        b, h, n, d = k.shape
        if lay.k is None:
            lay.k = k.new_zeros(b, h, self.capacity, d)
            lay.v = v.new_zeros(b, h, self.capacity, v.shape[-1])
        if self.budget > 0:
            clean_end = self._clean_end(lay, chunk_id)
            if clean_end > self.budget:
                self._compress(lay, q, clean_end)
        if chunk_id in lay.ranges:
            s, e = lay.ranges[chunk_id]
            if e - s != n:
                raise RuntimeError(f"KV store: chunk {chunk_id} changed size from {e - s} to {n} tokens.")
        else:
            if lay.ranges and chunk_id < max(lay.ranges):
                raise RuntimeError(f"KV store: chunk {chunk_id} registered after a later chunk.")
            s = lay.used
            e = s + n
            if e > self.capacity:
                raise RuntimeError(f"KV store overflow: {e} rows needed, {self.capacity} allocated "
                                   f"(budget {self.budget}); the capacity plan is wrong.")
            lay.ranges[chunk_id] = (s, e)
        lay.k[:, :, s:e] = k
        lay.v[:, :, s:e] = v
        self.peak_rows = max(self.peak_rows, lay.used)
        return lay.k[:, :, :e], lay.v[:, :, :e]

    def compress_clean(self, queries) -> bool:
        """Compress every layer's clean prefix to ``budget`` rows now, if it holds more, scoring with
        ``queries[layer]`` ([B, Hq, Lq, D]). For loops that choose the moment and the queries themselves
        (MAGI-1: once per stage, with the last computed chunk's queries) rather than letting ``extend`` do it
        with the next writer's queries. Returns whether any layer was compressed."""
        done = False
        for layer, lay in enumerate(self.layers):
            if self.budget <= 0 or lay.k is None:
                continue
            clean_end = self._clean_end(lay, None)
            if clean_end > self.budget:
                self._compress(lay, queries[layer], clean_end)
                done = True
        return done

    def stats(self) -> dict:
        return {
            "kept_per_layer": [lay.compressed for lay in self.layers],
            "dropped_per_layer": [lay.dropped for lay in self.layers],
            "peak_rows": self.peak_rows,
            "capacity_rows": self.capacity,
            "allocated_bytes": self.allocated_bytes,
        }


class ChunkKV:
    """What one chunk forward sees (``KVContext`` and ``ChunkAttention`` of ``flowcache.models.common``)."""

    def __init__(self, store: KVStore, chunk_id: int, first: int | None = None):
        self.store = store
        self.chunk_id = chunk_id
        self.first = first

    def extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, vals = self.store.extend(self.chunk_id, layer, q, k, v)
        if self.first is None:
            return keys, vals
        start = self.store.first_row(layer, self.first)
        return keys[:, :, start:], vals[:, :, start:]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, *self.extend(layer, q, k, v))


class ChunkBatchKV:
    """``ChunkAttention`` of one batched forward: chunks laid end to end along the tokens, CFG branches along
    the batch. Chunk by chunk in ascending order, each branch's K/V go into its own store and the chunk's
    queries attend to that store up to the chunk's slot: exactly what one forward per chunk and branch would
    compute, while the linear layers (most of the work) run once over every token of the step.

    stores: one per batch row (CFG branch); chunk_ids: ascending, laid end to end with ``tokens`` rows each."""

    def __init__(self, stores: list[KVStore], chunk_ids: list[int], tokens: list[int]):
        if len(chunk_ids) != len(tokens) or list(chunk_ids) != sorted(chunk_ids):
            raise ValueError(f"chunk ids {chunk_ids} must ascend, one token count each ({tokens}).")
        self.stores, self.chunk_ids, self.tokens = stores, list(chunk_ids), list(tokens)
        self.context_rows: dict[tuple[int, int], int] = {}  # (batch row, chunk id) -> keys attended, layer 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != len(self.stores) or q.shape[2] != sum(self.tokens):
            raise ValueError(f"batched chunk forward: q {list(q.shape)} does not match {len(self.stores)} branches "
                             f"x {sum(self.tokens)} tokens.")
        out = q.new_empty(q.shape[:3] + (v.shape[-1],))
        start = 0
        for cid, n in zip(self.chunk_ids, self.tokens):
            rows = slice(start, start + n)
            for b, store in enumerate(self.stores):
                qb = q[b:b + 1, :, rows]
                keys, vals = store.extend(cid, layer, qb, k[b:b + 1, :, rows], v[b:b + 1, :, rows])
                out[b:b + 1, :, rows] = attention(qb, keys, vals)
                if layer == 0:
                    self.context_rows[(b, cid)] = keys.shape[2]
            start += n
        return out
