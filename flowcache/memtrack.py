"""Measured memory: the peak of live tensor bytes per device while a run executes.

On a CPU (and on meta tensors) ``LiveTensorBytes`` counts every tensor storage an operator creates while it is
active, and forgets it when the storage is freed: a deterministic count of what the code keeps alive, without the
allocator's caches that make RSS noisy. Views share their storage and are counted once; storages made before the
counter started (weights, inputs) are not counted, also when an in-place operator returns them.
On CUDA ``track`` reads ``torch.cuda.max_memory_allocated`` instead (what torch's allocator handed out, weights
already on the device excluded by subtracting the figure at the start).

Usage::

    with track(device) as mem:
        run()
    mem.peak   # bytes above the start, at the highest point
    mem.live   # bytes still alive at the end (0 after a run that freed everything it made)
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(values) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active, per device type, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._sizes: dict[int, tuple[str, int]] = {}  # storage key -> (device type, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(s) for s in _storages((args, kwargs))}  # in-place and view outputs reuse these
        for st in _storages(out):
            key = id(st)  # storages keep one Python object while alive, so the id is stable
            if key in inputs or key in self._sizes:
                continue
            dev, n = st.device.type, st.nbytes()
            self._sizes[key] = (dev, n)
            self.live[dev] = self.live.get(dev, 0) + n
            self.peak[dev] = max(self.peak.get(dev, 0), self.live[dev])
            weakref.finalize(st, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        dev, n = self._sizes.pop(key)
        self.live[dev] -= n


@dataclass
class Measured:
    """Peak bytes above the start and bytes still alive at the end, for one device."""

    device: str
    peak: int = 0
    live: int = 0
    how: str = ""
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def track(device: torch.device | str = "cpu", collect: bool = True) -> Iterator[Measured]:
    """Measure a block's peak memory on ``device``: live tensor bytes on a CPU or meta, the CUDA allocator's
    peak on a GPU. The figures are filled in when the block ends, also when it raises. ``collect``: run the
    garbage collector first, so ``live`` does not count tensors only a reference cycle still holds (slow in a
    big process; a dry run on meta tensors makes no cycles)."""
    device = torch.device(device)
    result = Measured(device.type)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.how = "torch.cuda.max_memory_allocated"
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            gc.collect()
            result.peak = torch.cuda.max_memory_allocated(device) - start
            result.live = torch.cuda.memory_allocated(device) - start
        return
    counter = LiveTensorBytes()
    result.how = "live tensor bytes (TorchDispatchMode)"
    try:
        with counter:
            yield result
    finally:
        if collect:
            gc.collect()
        result.peak = counter.peak.get(device.type, 0)
        result.live = counter.live.get(device.type, 0)
        result.extra = {"peak_by_device": dict(counter.peak), "live_by_device": dict(counter.live)}


__all__ = ["LiveTensorBytes", "Measured", "track"]
