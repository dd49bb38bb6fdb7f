"""The KV store of a chunkwise forward: per layer, one preallocated buffer shared by the run's CFG branches.

Layout of every layer's buffer ``[branches, heads, rows, D]`` (rows are tokens; all branches register chunks in
the same order, so the layout is shared):

    [ compressed clean history (≤ budget) | chunk a | chunk a+1 | ... ]   (chunk ids ascending)

A chunk writes its K/V into its slot (registering it at the end the first time). Block-causal attention reads
the rows up to the end of the chunk's slot (the compressed history plus every registered chunk ``≤ c``);
window attention reads every row (the chunks after it too). When clean chunks (finished, or the clean prefix)
hold more tokens than the budget, the clean rows are compressed per branch and head to ``budget`` tokens with
the importance-minus-redundancy score, so the buffer never grows past ``budget + active window``.

How the rows are held (``KVStore(fp8=..., offload=...)``; the run plan chooses):

* **dtype**: the compute dtype, or fp8 e4m3 with one fp32 scale per branch, head and written chunk (amax / 448,
  kept beside each row so that rows keep their scale when compression or eviction moves them), dequantized to
  the compute dtype when attention reads them. Half the bytes of bf16.
* **placement**: on the compute device, or offloaded to host memory (pinned on CUDA). Offloaded, a forward
  works on two device staging slots: layer i's rows are brought in one layer ahead, on a side stream, while
  layer i-1 computes, and the rows a layer changed go back asynchronously when the next layer opens. Every
  operation runs on the staging slot exactly as it would on a resident buffer, so on a CPU (host = device)
  offloaded and resident K/V give bit-identical results.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..models.common import attention
from .scoring import CompressionConfig, compress, select_queries

# Largest block-causal mask (query tokens × key rows) built for one call; past it each chunk attends on its own
# (a dense mask of a 540P window would be gigabytes, while there the per-chunk calls are large anyway).
MAX_MASK_ELEMENTS = 1 << 24
# Devices where one block-masked call per layer is used: there kernel launches dominate. On a CPU the chunk-by-chunk
# calls were faster (demo, threshold 0, 1 thread: 10.0-10.6 s against 11.5-12.9 s), since the mask makes SDPA
# compute every masked-out score.
MASK_DEVICES = {"cuda", "xpu", "mps"}
FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_DTYPE = torch.float32
STAGING_SLOTS = 2  # an offloaded store's layers on the device at once: the one computing and the next one
FIELDS = ("k", "v", "ks", "vs")  # keys, values, and (fp8) their per-row scales


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, H, n, D] (one chunk) -> fp8 e4m3 values and their scale [R, H, 1, 1] (fp32): one scale per branch
    and head, amax / 448 (1 for an all-zero head)."""
    amax = x.abs().amax(dim=(2, 3), keepdim=True).to(SCALE_DTYPE)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.to(SCALE_DTYPE) / scale).to(FP8), scale


def dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 values [R, H, n, D] and their per-row scales [R, H, n, 1] -> ``dtype``."""
    return x8.to(dtype).mul_(scale.to(dtype))  # in place: one buffer of the read rows, not two at once


def fp8_supported(device: torch.device | str) -> str | None:
    """None when fp8 K/V can be stored and read back on ``device`` with this torch; else the reason."""
    if FP8 is None:
        return f"torch {torch.__version__} has no float8_e4m3fn"
    try:
        torch.ones(2, device=device).to(FP8).to(torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return f"{torch.device(device).type} cannot cast to float8_e4m3fn here ({str(e).splitlines()[0][:80]})"
    return None


@dataclass
class LayerKV:
    """One layer's rows and their layout. k, v [B, H, capacity, D] in the storage dtype (ks, vs [B, H, capacity,
    1] fp32 scales with fp8), on the device when resident, in host memory when offloaded."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    ks: torch.Tensor | None = None
    vs: torch.Tensor | None = None
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk id -> rows, ascending
    compressed_at: int = 0  # first row of the compressed history (after any pinned sink chunks)
    compressed: int = 0  # rows of compressed history
    kept: int = 0  # tokens kept by compressions (summed over events)
    dropped: int = 0

    @property
    def used(self) -> int:
        return max([e for _, e in self.ranges.values()] + [self.compressed_at + self.compressed])


@dataclass
class _Buffers:
    """A staging slot's device tensors (the fields of ``LayerKV``) and which layer they hold."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    ks: torch.Tensor | None = None
    vs: torch.Tensor | None = None
    layer: int | None = None
    ready: object = None       # CUDA event: the prefetch into this slot is done
    released: object = None    # CUDA event: compute is done with the layer it held


class KVStore:
    """K/V of the chunks of one segment for every branch of a run.

    capacity_tokens: rows per layer, branch and head, allocated on first write.
    budget_tokens:   0 keeps every chunk; otherwise clean chunks are compressed to this many rows per head.
    branches:        batch rows of the buffers (one per CFG branch that attends through this store).
    fp8:             hold the rows in fp8 e4m3 with per-chunk scales (see the module docstring).
    offload:         hold the rows in host memory and stage two layers at a time on the compute device.
    """

    def __init__(self, num_layers: int, capacity_tokens: int, budget_tokens: int = 0,
                 compression: CompressionConfig | None = None, tokens_per_frame: int | None = None,
                 branches: int = 1, pinned_chunks: int = 0, *, fp8: bool = False, offload: bool = False):
        if fp8 and FP8 is None:
            raise RuntimeError(f"KV store: torch {torch.__version__} has no float8_e4m3fn.")
        self.num_layers = num_layers
        self.capacity = capacity_tokens
        self.budget = budget_tokens
        self.compression = compression or CompressionConfig()
        self.tokens_per_frame = tokens_per_frame
        self.branches = branches
        self.pinned = pinned_chunks  # chunk ids below this (an attention sink) are never compressed or dropped
        self.fp8, self.offload = fp8, offload
        self.clean: set[int] = set()
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.peak_rows = 0
        self.compress_seconds = 0.0
        self.moved = {"to_device": 0, "to_host": 0}  # bytes an offloaded store copied each way
        self._slots = [_Buffers() for _ in range(min(STAGING_SLOTS, num_layers))] if offload else []
        self._open: int | None = None      # the offloaded layer being worked on
        self._dirty: tuple[int, int] | None = None  # its rows changed since it was opened
        self._stream = None                # CUDA copy stream
        self.dtype: torch.dtype | None = None  # the compute dtype, from the first write

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

    def context_rows(self, chunk_id: int, tokens: int, first: int | None = None) -> int:
        """Key rows a block-causal forward of chunk ``chunk_id`` reads, counted before it writes (FLOP
        accounting): up to the end of its slot, or, not stored yet, the rows in use plus its ``tokens``; from
        chunk ``first`` on when given (``view``'s key range)."""
        lay = self.layers[0]
        end = lay.ranges[chunk_id][1] if chunk_id in lay.ranges else lay.used + tokens
        return end - (self.first_row(0, first) if first is not None else 0)

    # -- bytes -------------------------------------------------------------------------------------
    @staticmethod
    def _bytes(buf) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(buf, f) for f in FIELDS) if t is not None)

    @property
    def host_bytes(self) -> int:
        """Bytes of the rows held in host memory (offloaded stores)."""
        return sum(self._bytes(lay) for lay in self.layers) if self.offload else 0

    @property
    def device_bytes(self) -> int:
        """Bytes held on the compute device: every layer when resident, the staging slots when offloaded."""
        if self.offload:
            return sum(self._bytes(s) for s in self._slots)
        return sum(self._bytes(lay) for lay in self.layers)

    @property
    def allocated_bytes(self) -> int:
        return self.host_bytes + self.device_bytes

    # -- storage: where a layer's rows are worked on ------------------------------------------------
    def _alloc(self, like: torch.Tensor, h: int, d: int, dv: int, device, pin: bool = False) -> _Buffers:
        dtype = FP8 if self.fp8 else like.dtype
        shape = (self.branches, h, self.capacity)
        kw = {"device": device, "pin_memory": pin}
        b = _Buffers(torch.zeros(*shape, d, dtype=dtype, **kw), torch.zeros(*shape, dv, dtype=dtype, **kw))
        if self.fp8:
            b.ks, b.vs = (torch.ones(*shape, 1, dtype=SCALE_DTYPE, **kw) for _ in range(2))
        return b

    def _allocate(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Buffers of ``layer`` on the first write (and the staging slots, offloaded)."""
        lay = self.layers[layer]
        self.dtype = k.dtype
        _, h, _, d = k.shape
        if not self.offload:
            b = self._alloc(k, h, d, v.shape[-1], k.device)
        else:
            pin = k.device.type == "cuda"
            b = self._alloc(k, h, d, v.shape[-1], "cpu", pin)
            for s in self._slots:
                if s.k is None:
                    fresh = self._alloc(k, h, d, v.shape[-1], k.device)
                    s.k, s.v, s.ks, s.vs = fresh.k, fresh.v, fresh.ks, fresh.vs
            if k.device.type == "cuda" and self._stream is None:
                self._stream = torch.cuda.Stream(k.device)
        lay.k, lay.v, lay.ks, lay.vs = b.k, b.v, b.ks, b.vs

    def _buffers(self, layer: int):
        """The tensors ``layer``'s rows are read and written in: the layer itself when resident; offloaded, the
        staging slot holding it (opened now: the previous layer is written back, the next one prefetched)."""
        if not self.offload:
            return self.layers[layer]
        if self._open != layer:
            if self._open is not None:
                self._close()
            slot = self._load(layer)
            self._open, self._dirty = layer, None
            if layer + 1 < self.num_layers:
                self._prefetch(layer + 1)
            return slot
        return self._slots[layer % len(self._slots)]

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> int:
        dst.copy_(src, non_blocking=self._stream is not None)
        return src.numel() * src.element_size()

    def _prefetch(self, layer: int) -> None:
        """Bring ``layer``'s used rows into its staging slot (on the copy stream on CUDA). The slot's ready event
        is recorded even when nothing is copied: it also orders the layer's writes after the write-back of the
        layer that held the slot before."""
        lay, slot = self.layers[layer], self._slots[layer % len(self._slots)]
        slot.layer = layer
        if slot.k is None:
            return
        n = lay.used if lay.k is not None else 0
        with torch.cuda.stream(self._stream) if self._stream is not None else _nothing():
            if self._stream is not None and slot.released is not None:
                self._stream.wait_event(slot.released)  # compute is done with the layer that was here
            for f in FIELDS:
                src = getattr(lay, f)
                if src is not None and n:
                    self.moved["to_device"] += self._copy(getattr(slot, f)[:, :, :n], src[:, :, :n])
            if self._stream is not None:
                slot.ready = torch.cuda.Event()
                slot.ready.record(self._stream)

    def _load(self, layer: int) -> _Buffers:
        slot = self._slots[layer % len(self._slots)]
        if slot.layer != layer:  # not prefetched (the first layer of a forward)
            self._prefetch(layer)
        if self._stream is not None and slot.ready is not None:
            torch.cuda.current_stream(slot.k.device).wait_event(slot.ready)
        return slot

    def _mark(self, lo: int, hi: int) -> None:
        """Rows [lo, hi) of the open offloaded layer changed."""
        if self.offload and hi > lo:
            self._dirty = (lo, hi) if self._dirty is None else (min(lo, self._dirty[0]), max(hi, self._dirty[1]))

    def _close(self) -> None:
        """Write the open layer's changed rows back to host memory (asynchronously on CUDA)."""
        layer, self._open = self._open, None
        slot, lay = self._slots[layer % len(self._slots)], self.layers[layer]
        if self._stream is not None:
            slot.released = torch.cuda.Event()
            slot.released.record(torch.cuda.current_stream(slot.k.device))
        if self._dirty is None or lay.k is None:
            return
        lo, hi = self._dirty
        self._dirty = None
        with torch.cuda.stream(self._stream) if self._stream is not None else _nothing():
            if self._stream is not None:
                self._stream.wait_event(slot.released)
            for f in FIELDS:
                dst = getattr(lay, f)
                if dst is not None:
                    self.moved["to_host"] += self._copy(dst[:, :, lo:hi], getattr(slot, f)[:, :, lo:hi])

    def flush(self) -> None:
        """Offloaded: write back the open layer and wait for every copy (before whole-store operations)."""
        if not self.offload:
            return
        if self._open is not None:
            self._close()
        if self._stream is not None:
            self._stream.synchronize()
        for s in self._slots:
            s.layer = None  # host rows are current; slots are refilled on next use

    # -- reading and writing rows -------------------------------------------------------------------
    def _put(self, buf, rows, s: int, e: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.fp8:
            (k8, ks), (v8, vs) = quantize(k), quantize(v)
            buf.k[rows, :, s:e], buf.v[rows, :, s:e] = k8, v8
            buf.ks[rows, :, s:e], buf.vs[rows, :, s:e] = ks.expand(-1, -1, e - s, 1), vs.expand(-1, -1, e - s, 1)
        else:
            buf.k[rows, :, s:e] = k
            buf.v[rows, :, s:e] = v
        self._mark(s, e)

    def _read(self, buf, rows, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows [start, end) in the compute dtype (views unless fp8)."""
        k, v = buf.k[rows, :, start:end], buf.v[rows, :, start:end]
        if not self.fp8:
            return k, v
        return (dequantize(k, buf.ks[rows, :, start:end], self.dtype),
                dequantize(v, buf.vs[rows, :, start:end], self.dtype))

    # -- layout ---------------------------------------------------------------------------------------
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

    def _shift(self, lay: LayerKV, buf, start: int, end: int, head: dict | None) -> None:
        """Replace rows [start, end) with ``head`` (field -> rows; or nothing) and move the rows after them up."""
        n = 0 if head is None else head["k"].shape[2]
        used = lay.used
        for f in FIELDS:
            t = getattr(buf, f)
            if t is None:
                continue
            rest = t[:, :, end:used].clone()
            if head is not None:
                t[:, :, start:start + n] = head[f]
            t[:, :, start + n:start + n + rest.shape[2]] = rest
        self._mark(start, start + n + used - end)  # rows past the new end are stale
        shift = start + n - end
        lay.ranges = {c: ((s + shift, e + shift) if s >= end else (s, e)) for c, (s, e) in lay.ranges.items()
                      if s >= end or e <= start}

    def _compress(self, lay: LayerKV, buf, q: torch.Tensor, clean_end: int) -> None:
        """Keep ``budget`` rows of the clean history (after the pinned chunks) per branch and head; q
        [B, Hq, Lq, D] scores them."""
        t0 = time.perf_counter()
        start = self._pinned_end(lay)
        k, v = self._read(buf, slice(None), start, clean_end)
        index = compress(q, k, v, self.budget, self.compression, self.tokens_per_frame)[2]
        head = {}
        for f in FIELDS:  # the kept rows as stored (fp8 rows keep their own scale)
            t = getattr(buf, f)
            if t is not None:
                part = t[:, :, start:clean_end]
                raw = part.view(torch.uint8) if part.dtype == FP8 else part  # CPU gather has no fp8 kernel
                kept = raw.gather(2, index.unsqueeze(-1).expand(*index.shape, part.shape[-1]))
                head[f] = kept.view(FP8) if part.dtype == FP8 else kept
        n = head["k"].shape[2]
        self._shift(lay, buf, start, clean_end, head)
        lay.dropped += clean_end - start - n
        lay.kept += n
        lay.compressed_at, lay.compressed = start, n
        self.compress_seconds += time.perf_counter() - t0

    def drop_oldest(self, keep_chunks: int) -> None:
        """Rolling window: drop the oldest unpinned chunks until at most ``keep_chunks`` of them are left."""
        for layer, lay in enumerate(self.layers):
            while lay.k is not None:
                loose = [c for c in lay.ranges if c >= self.pinned]
                if len(loose) <= keep_chunks:
                    break
                s, e = lay.ranges[min(loose)]
                self._shift(lay, self._buffers(layer), s, e, None)
                lay.dropped += e - s
        self.flush()

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

    def _prepare(self, layer: int, k: torch.Tensor, v: torch.Tensor, first_chunk: int, q: torch.Tensor,
                 rows: slice | list[int]):
        """Allocate on the first write; compress the clean prefix when it outgrew the budget, scoring with the
        writer's queries (rows that are not writing now score with the first writing row's queries). Returns
        the layer's working buffers."""
        lay = self.layers[layer]
        if lay.k is None:
            self._allocate(layer, k, v)
        buf = self._buffers(layer)
        if self.budget > 0:
            clean_end = self._clean_end(lay, first_chunk)
            if clean_end - self._pinned_end(lay) > self.budget:
                if isinstance(rows, list) and len(rows) != self.branches:
                    full = q[:1].expand(self.branches, -1, -1, -1).clone()
                    full[rows] = q
                    q = full
                self._compress(lay, buf, q, clean_end)
        return buf

    def extend(self, chunk_id: int, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of every branch: store its K/V and return the block-causal context (rows up to its slot)."""
        lay = self.layers[layer]
        buf = self._prepare(layer, k, v, chunk_id, q, slice(None))
        s, e = self._slot(lay, chunk_id, k.shape[2])
        self._put(buf, slice(None), s, e, k, v)
        self.peak_rows = max(self.peak_rows, lay.used)
        return self._read(buf, slice(None), 0, e)

    def write(self, layer: int, chunk_ids: list[int], tokens: list[int], q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, rows: slice | list[int]) -> list[int]:
        """Store several chunks laid end to end (k, v [R, H, sum(tokens), D] for the branches ``rows``); returns
        each chunk's slot end."""
        lay = self.layers[layer]
        buf = self._prepare(layer, k, v, chunk_ids[0], q[:, :, :tokens[0]], rows)
        ends, start = [], 0
        for cid, n in zip(chunk_ids, tokens):
            s, e = self._slot(lay, cid, n)
            self._put(buf, rows, s, e, k[:, :, start:start + n], v[:, :, start:start + n])
            ends.append(e)
            start += n
        self.peak_rows = max(self.peak_rows, lay.used)
        return ends

    def rows(self, layer: int, rows: slice | list[int], end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [R, H, end, D] of the branches ``rows`` in the compute dtype (a view when ``rows`` is
        every branch and the store holds the compute dtype)."""
        lay = self.layers[layer]
        return self._read(self._buffers(layer), rows, 0, lay.used if end is None else end)

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
                self._compress(lay, self._buffers(layer), queries[layer], clean_end)
                done = True
        self.flush()
        return done

    def stats(self) -> dict:
        self.flush()
        return {
            "kept_per_layer": [lay.compressed * self.branches for lay in self.layers],
            "dropped_per_layer": [lay.dropped * self.branches for lay in self.layers],
            "peak_rows": self.peak_rows,
            "capacity_rows": self.capacity,
            "allocated_bytes": self.allocated_bytes,
            "device_bytes": self.device_bytes,
            "host_bytes": self.host_bytes,
            "moved_bytes": dict(self.moved),
        }


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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


class QueryTap:
    """The scoring queries (``select_queries``) of the last forward that ran through a ``TappedContext``, per layer:
    for a loop that compresses its clean history at a moment of its own choosing with queries it picks (MAGI-1:
    once per stage, the last computed chunk's), rather than with the next writer's queries as a write does."""

    def __init__(self, cfg: CompressionConfig, tokens_per_frame: int | None):
        self.cfg, self.tpf = cfg, tokens_per_frame
        self.q: dict[int, torch.Tensor] = {}

    def record(self, layer: int, q: torch.Tensor) -> None:
        """Layer ``layer``'s queries q [B, Hq, L, D], the selected ones copied (the forward reuses its buffers)."""
        self.q[layer] = select_queries(q, self.cfg, self.tpf).clone()

    def compress(self, store: KVStore) -> bool:
        """``store.compress_clean`` with the recorded queries, once every layer has recorded some (else no-op)."""
        if len(self.q) != store.num_layers:
            return False
        return store.compress_clean([self.q[i] for i in range(store.num_layers)])


class TappedContext:
    """A ``KVContext`` of one chunk forward: the store's ``view`` (None: the chunk sees only itself), with every
    layer's queries recorded into ``tap`` on the way (None: not recorded)."""

    def __init__(self, store: KVStore | None, chunk_id: int, tap: QueryTap | None, first: int | None = None):
        self.view = store.view(chunk_id, first) if store is not None else None
        self.tap = tap

    def extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, rows, D] the chunk's queries attend to: the view's rows, or its own k, v."""
        if self.tap is not None:
            self.tap.record(layer, q)
        if self.view is None:
            return k, v
        return self.view.extend(layer, q, k, v)


class StepAttention:
    """``ChunkAttention`` of one batched forward: chunks laid end to end along the tokens, CFG branches along the
    batch (``rows`` of the store). Every chunk's K/V is written first; then, in one attention call per layer,
    each chunk's queries read the store: every row (its later chunks too, as a whole-window forward does), or
    with ``causal`` the rows up to its own slot (FlowCache's per-chunk arithmetic, under a block mask on a GPU;
    chunk by chunk on a CPU or when the mask would be large).

    chunk_ids: ascending, laid end to end with ``tokens`` rows each. ``context_rows[chunk]``: keys it attended
    (layer 0), for the FLOP count; ``causal_rows[chunk]``: the rows up to its slot (the paper's accounting)."""

    def __init__(self, store: KVStore, chunk_ids: list[int], tokens: list[int], rows: slice | list[int],
                 causal: bool):
        if len(chunk_ids) != len(tokens) or list(chunk_ids) != sorted(chunk_ids):
            raise ValueError(f"chunk ids {chunk_ids} must ascend, one token count each ({tokens}).")
        self.store, self.chunk_ids, self.tokens, self.rows, self.causal = store, list(chunk_ids), list(tokens), rows, causal
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
            self.context_rows = {c: (e if self.causal else used) for c, e in zip(self.chunk_ids, ends)}
        if not self.causal:
            return attention(q, *self.store.rows(layer, self.rows))
        if q.device.type in MASK_DEVICES and q.shape[2] * ends[-1] <= MAX_MASK_ELEMENTS:
            if layer == 0 or self._mask is None:  # the layout is the same in every layer
                self._mask = self._block_mask(ends, q.device)
            return attention(q, *self.store.rows(layer, self.rows, ends[-1]), self._mask)
        out, start = torch.empty_like(q), 0
        keys, vals = self.store.rows(layer, self.rows, ends[-1])  # one read (one dequantization) per layer
        for n, e in zip(self.tokens, ends):
            out[:, :, start:start + n] = attention(q[:, :, start:start + n], keys[:, :, :e], vals[:, :, :e])
            start += n
        return out

    def _block_mask(self, ends: list[int], device: torch.device) -> torch.Tensor:
        """Boolean [Lq, ends[-1]]: a chunk's queries see the rows up to the end of its slot."""
        limit = torch.tensor(ends, device=device).repeat_interleave(torch.tensor(self.tokens, device=device))
        return torch.arange(ends[-1], device=device)[None, :] < limit[:, None]


class RewriteAttention:
    """``ChunkAttention`` of a pass that rewrites rows already stored (a causal loop re-caching its window with a
    new prompt): the forward's tokens are laid end to end; ``targets`` maps stored chunk ids to the token range
    of the forward whose K/V replace theirs (chunks not named keep their rows; tokens not named write nothing);
    then every query attends to every stored row, as the re-cache of LongLive does (its queries see the whole
    cache, the rows they just wrote included).

    unit: the id the FLOP count is kept under (``context_rows`` / ``causal_rows``, rows read at layer 0)."""

    def __init__(self, store: KVStore, targets: dict[int, slice], unit: object):
        self.store, self.targets, self.unit = store, dict(targets), unit
        self.context_rows: dict[object, int] = {}
        self.causal_rows: dict[object, int] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for cid, tok in sorted(self.targets.items()):
            n = tok.stop - tok.start
            self.store.write(layer, [cid], [n], q[:, :, tok], k[:, :, tok], v[:, :, tok], slice(None))
        if layer == 0:
            used = self.store.layers[0].used
            self.context_rows = {self.unit: used}
            self.causal_rows = {self.unit: used}
        return attention(q, *self.store.rows(layer, slice(None)))
