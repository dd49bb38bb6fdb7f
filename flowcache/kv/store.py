"""The KV store of a chunkwise forward: per layer, one preallocated buffer shared by the run's CFG branches.

Layout of every layer's buffer ``[branches, heads, rows, D]`` (rows are tokens; all branches register chunks in
the same order, so the layout is shared):

    [ compressed clean history (≤ budget) | chunk a | chunk a+1 | ... ]   (chunk ids ascending)

A chunk writes its K/V into its slot (registering it at the end the first time). Block-causal attention reads
the rows up to the end of the chunk's slot (the compressed history plus every registered chunk ``≤ c``);
window attention reads every row (the chunks after it too). When clean chunks (finished, or the clean prefix)
hold more tokens than the budget, the clean rows are compressed per branch and head to ``budget`` tokens with
the importance-minus-redundancy score, so the buffer never grows past ``budget + active window``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..models.common import attention
from .scoring import CompressionConfig, compress

# Largest block-causal mask (query tokens × key rows) built for one call; past it each chunk attends on its own
# (a dense mask of a 540P window would be gigabytes, while there the per-chunk calls are large anyway).
MAX_MASK_ELEMENTS = 1 << 24
# Devices where one block-masked call per layer is used: there kernel launches dominate. On a CPU the chunk-by-chunk
# calls were faster (demo, threshold 0, 1 thread: 10.0-10.6 s against 11.5-12.9 s), since the mask makes SDPA
# compute every masked-out score.
MASK_DEVICES = {"cuda", "xpu", "mps"}


@dataclass
class LayerKV:
    k: torch.Tensor | None = None  # [B, H, capacity, D]
    v: torch.Tensor | None = None
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk id -> rows, ascending
    compressed_at: int = 0  # first row of the compressed history (after any pinned sink chunks)
    compressed: int = 0  # rows of compressed history
    kept: int = 0  # tokens kept by compressions (summed over events)
    dropped: int = 0

    @property
    def used(self) -> int:
        return max([e for _, e in self.ranges.values()] + [self.compressed_at + self.compressed])


class KVStore:
    """K/V of the chunks of one segment for every branch of a run.

    capacity_tokens: rows per layer, branch and head, allocated on first write.
    budget_tokens:   0 keeps every chunk; otherwise clean chunks are compressed to this many rows per head.
    branches:        batch rows of the buffers (one per CFG branch that attends through this store).
    """

    def __init__(self, num_layers: int, capacity_tokens: int, budget_tokens: int = 0,
                 compression: CompressionConfig | None = None, tokens_per_frame: int | None = None,
                 branches: int = 1, pinned_chunks: int = 0):
        self.num_layers = num_layers
        self.capacity = capacity_tokens
        self.budget = budget_tokens
        self.compression = compression or CompressionConfig()
        self.tokens_per_frame = tokens_per_frame
        self.branches = branches
        self.pinned = pinned_chunks  # chunk ids below this (an attention sink) are never compressed or dropped
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
    def _pinned_end(self, lay: LayerKV) -> int:
        return max((e for c, (_, e) in lay.ranges.items() if c < self.pinned), default=0)

    def _clean_end(self, lay: LayerKV, current: int | None) -> int:
        """End row of the clean prefix after the pinned chunks (compressed rows + leading clean chunks)."""
        end = self._pinned_end(lay) + lay.compressed
        for cid, (s, e) in lay.ranges.items():
            if cid < self.pinned:
                continue
            if cid in self.clean and cid != current and s == end:
                end = e
            else:
                break
        return end

    def _shift(self, lay: LayerKV, start: int, end: int, head: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Replace rows [start, end) with ``head`` (k, v; or nothing) and move the rows after them up."""
        n = 0 if head is None else head[0].shape[2]
        rest = slice(end, lay.used)
        k_rest, v_rest = lay.k[:, :, rest].clone(), lay.v[:, :, rest].clone()
        if head is not None:
            lay.k[:, :, start:start + n], lay.v[:, :, start:start + n] = head
        lay.k[:, :, start + n:start + n + k_rest.shape[2]] = k_rest
        lay.v[:, :, start + n:start + n + v_rest.shape[2]] = v_rest
        shift = start + n - end
        lay.ranges = {c: ((s + shift, e + shift) if s >= end else (s, e)) for c, (s, e) in lay.ranges.items()
                      if s >= end or e <= start}

    def _compress(self, lay: LayerKV, q: torch.Tensor, clean_end: int) -> None:
        """Keep ``budget`` rows of the clean history (after the pinned chunks) per branch and head; q
        [B, Hq, Lq, D] scores them."""
        t0 = time.perf_counter()
        start = self._pinned_end(lay)
        keep = compress(q, lay.k[:, :, start:clean_end], lay.v[:, :, start:clean_end], self.budget,
                        self.compression, self.tokens_per_frame)[:2]
        n = keep[0].shape[2]
        self._shift(lay, start, clean_end, keep)
        lay.dropped += clean_end - start - n
        lay.kept += n
        lay.compressed_at, lay.compressed = start, n
        self.compress_seconds += time.perf_counter() - t0

    def drop_oldest(self, keep_chunks: int) -> None:
        """Rolling window: drop the oldest unpinned chunks until at most ``keep_chunks`` of them are left."""
        for lay in self.layers:
            while lay.k is not None:
                loose = [c for c in lay.ranges if c >= self.pinned]
                if len(loose) <= keep_chunks:
                    break
                s, e = lay.ranges[min(loose)]
                self._shift(lay, s, e, None)
                lay.dropped += e - s

    def _slot(self, lay: LayerKV, chunk_id: int, n: int) -> tuple[int, int]:
        """The rows of ``chunk_id`` (registered at the end the first time)."""
        if chunk_id in lay.ranges:
            s, e = lay.ranges[chunk_id]
            if e - s != n:
                raise RuntimeError(f"KV store: chunk {chunk_id} changed size from {e - s} to {n} tokens.")
            return s, e
        if lay.ranges and chunk_id < max(lay.ranges):
            raise RuntimeError(f"KV store: chunk {chunk_id} registered after a later chunk.")
        s = lay.used
        if s + n > self.capacity:
            raise RuntimeError(f"KV store overflow: {s + n} rows needed, {self.capacity} allocated "
                               f"(budget {self.budget}); the capacity plan is wrong.")
        lay.ranges[chunk_id] = (s, s + n)
        return s, s + n

    def _prepare(self, lay: LayerKV, k: torch.Tensor, v: torch.Tensor, first_chunk: int, q: torch.Tensor,
                 rows: slice | list[int]) -> None:
        """Allocate on the first write; compress the clean prefix when it outgrew the budget, scoring with the
        writer's queries (rows that are not writing now score with the first writing row's queries)."""
        if lay.k is None:
            b, h, _, d = k.shape
            lay.k = k.new_zeros(self.branches, h, self.capacity, d)
            lay.v = v.new_zeros(self.branches, h, self.capacity, v.shape[-1])
        if self.budget > 0:
            clean_end = self._clean_end(lay, first_chunk)
            if clean_end - self._pinned_end(lay) > self.budget:
                if isinstance(rows, list) and len(rows) != self.branches:
                    full = q[:1].expand(self.branches, -1, -1, -1).clone()
                    full[rows] = q
                    q = full
                self._compress(lay, q, clean_end)

    def extend(self, chunk_id: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of every branch: store its K/V and return the block-causal context (rows up to its slot)."""
        lay = self.layers[layer]
        self._prepare(lay, k, v, chunk_id, q, slice(None))
        s, e = self._slot(lay, chunk_id, k.shape[2])
        lay.k[:, :, s:e] = k
        lay.v[:, :, s:e] = v
        self.peak_rows = max(self.peak_rows, lay.used)
        return lay.k[:, :, :e], lay.v[:, :, :e]

    def write(self, layer: int, chunk_ids: list[int], tokens: list[int], q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, rows: slice | list[int]) -> list[int]:
        """Store several chunks laid end to end (k, v [R, H, sum(tokens), D] for the branches ``rows``); returns
        each chunk's slot end."""
        lay = self.layers[layer]
        self._prepare(lay, k, v, chunk_ids[0], q[:, :, :tokens[0]], rows)
        ends, start = [], 0
        for cid, n in zip(chunk_ids, tokens):
            s, e = self._slot(lay, cid, n)
            lay.k[rows, :, s:e] = k[:, :, start:start + n]
            lay.v[rows, :, s:e] = v[:, :, start:start + n]
            ends.append(e)
            start += n
        self.peak_rows = max(self.peak_rows, lay.used)
        return ends

    def rows(self, layer: int, rows: slice | list[int], end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [R, H, end, D] of the branches ``rows`` (a view when ``rows`` is every branch)."""
        lay = self.layers[layer]
        end = lay.used if end is None else end
        return lay.k[rows, :, :end], lay.v[rows, :, :end]

    def compress_clean(self, queries) -> bool:
        """Compress every layer's clean prefix to ``budget`` rows now, if it holds more, scoring with
        ``queries[layer]`` ([B, Hq, Lq, D]). For loops that choose the moment and the queries themselves
        (MAGI-1: once per stage, with the last computed chunk's queries) rather than letting a write do it
        with the next writer's queries. Returns whether any layer was compressed."""
        done = False
        for layer, lay in enumerate(self.layers):
            if self.budget <= 0 or lay.k is None:
                continue
            clean_end = self._clean_end(lay, None)
            if clean_end - self._pinned_end(lay) > self.budget:
                self._compress(lay, queries[layer], clean_end)
                done = True
        return done

    def stats(self) -> dict:
        return {
            "kept_per_layer": [lay.compressed * self.branches for lay in self.layers],
            "dropped_per_layer": [lay.dropped * self.branches for lay in self.layers],
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


class StepAttention:
    """``ChunkAttention`` of one batched forward: chunks laid end to end along the tokens, CFG branches along the
    batch (``rows`` of the store). Every chunk's K/V is written first; then, in one attention call per layer,
    each chunk's queries read the store: ``window`` attention every row (its later chunks too, as a whole-window
    forward does), block-causal attention the rows up to its own slot (FlowCache's per-chunk arithmetic, under
    a block mask on a GPU; chunk by chunk on a CPU or when the mask would be large).

    chunk_ids: ascending, laid end to end with ``tokens`` rows each. ``context_rows[chunk]``: keys it attended
    (layer 0), for the FLOP count; ``causal_rows[chunk]``: the rows up to its slot (the paper's accounting)."""

    def __init__(self, store: KVStore, chunk_ids: list[int], tokens: list[int], rows: slice | list[int],
                 window: bool):
        if len(chunk_ids) != len(tokens) or list(chunk_ids) != sorted(chunk_ids):
            raise ValueError(f"chunk ids {chunk_ids} must ascend, one token count each ({tokens}).")
        self.store, self.chunk_ids, self.tokens, self.rows, self.window = store, list(chunk_ids), list(tokens), rows, window
        self.context_rows: dict[int, int] = {}
        self.causal_rows: dict[int, int] = {}
        self._mask: torch.Tensor | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[2] != sum(self.tokens):
            raise ValueError(f"batched chunk forward: q {list(q.shape)} does not match {sum(self.tokens)} tokens.")
        ends = self.store.write(layer, self.chunk_ids, self.tokens, q, k, v, self.rows)
        used = self.store.layers[layer].used
        if layer == 0:
            self.causal_rows = dict(zip(self.chunk_ids, ends))
            self.context_rows = {c: (used if self.window else e) for c, e in zip(self.chunk_ids, ends)}
        if self.window:
            return attention(q, *self.store.rows(layer, self.rows))
        if q.device.type in MASK_DEVICES and q.shape[2] * ends[-1] <= MAX_MASK_ELEMENTS:
            if layer == 0 or self._mask is None:  # the layout is the same in every layer
                self._mask = self._block_mask(ends, q.device)
            return attention(q, *self.store.rows(layer, self.rows, ends[-1]), self._mask)
        out, start = torch.empty_like(q), 0
        for n, e in zip(self.tokens, ends):
            out[:, :, start:start + n] = attention(q[:, :, start:start + n], *self.store.rows(layer, self.rows, e))
            start += n
        return out

    def _block_mask(self, ends: list[int], device: torch.device) -> torch.Tensor:
        """Boolean [Lq, ends[-1]]: a chunk's queries see the rows up to the end of its slot."""
        limit = torch.tensor(ends, device=device).repeat_interleave(torch.tensor(self.tokens, device=device))
        return torch.arange(ends[-1], device=device)[None, :] < limit[:, None]
