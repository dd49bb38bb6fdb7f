"""Statistics of one sampling run: what was computed and reused, FLOPs, time and KV memory.

Returned by the pipelines, logged at the end, sent to the web extension and kept in the Python API.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class RunStats:
    mode: str = "off"
    settings: dict = field(default_factory=dict)
    windows: int = 0
    iterations: list[int] = field(default_factory=list)   # per window
    # per window, per chunk: iteration -> "C" computed, "R" reused (cond branch; uncond in maps_uncond)
    maps: list[list[str]] = field(default_factory=list)
    maps_uncond: list[list[str]] = field(default_factory=list)
    computed: int = 0        # unit decisions that ran the transformer blocks
    reused: int = 0          # unit decisions that reused a cached payload
    forwards: int = 0        # transformer forwards (one per computed unit and branch)
    model_calls: int = 0     # calls into the transformer blocks (one batched call may cover many forwards)
    flops: float = 0.0       # analytic FLOPs actually spent, each forward counted as what it computes
    flops_nocache: float = 0.0  # the same for the vanilla loop (cache off: the model's own loop) and settings
    # the paper's accounting (SkyReels: a whole-window forward counted block-causal, 420.8 TFLOPs at 540P;
    # a chunk counted with the chunks up to itself), kept so figures compare with the paper's tables
    flops_paper: float = 0.0
    flops_nocache_paper: float = 0.0
    wall_seconds: float = 0.0
    kv_peak_bytes: int = 0       # K/V held at once, device and host
    kv_device_bytes: int = 0     # of which on the compute device (all of it resident; two staging layers offloaded)
    kv_host_bytes: int = 0       # of which offloaded to host memory
    kv_moved_bytes: int = 0      # bytes an offloaded store copied between host and device, both ways
    kv_allocated_bytes: int = 0
    kv_kept_per_layer: list[int] = field(default_factory=list)
    kv_dropped_per_layer: list[int] = field(default_factory=list)
    compress_seconds: float = 0.0
    # prompt changes (``flowcache.prompts.switch_record``): where each took effect, for the node's map
    switches: list[dict] = field(default_factory=list)

    @property
    def flops_speedup(self) -> float:
        """FLOPs of the real vanilla loop over FLOPs spent."""
        return self.flops_nocache / self.flops if self.flops else 1.0

    @property
    def flops_speedup_paper(self) -> float:
        """The same ratio in the paper's accounting."""
        return self.flops_nocache_paper / self.flops_paper if self.flops_paper else 1.0

    def chunk_counts(self) -> list[list[dict]]:
        """Per window and chunk: steps computed and reused (both branches)."""
        out = []
        for w, chunks in enumerate(self.maps):
            row = []
            for c, cells in enumerate(chunks):
                cells_u = self.maps_uncond[w][c] if w < len(self.maps_uncond) and c < len(self.maps_uncond[w]) else ""
                both = cells + cells_u
                row.append({"computed": both.count("C"), "reused": both.count("R")})
            out.append(row)
        return out

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["flops_speedup"] = self.flops_speedup
        d["flops_speedup_paper"] = self.flops_speedup_paper
        d["chunk_counts"] = self.chunk_counts()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def summary(self) -> str:
        return (f"{self.mode}: {self.forwards} forwards, computed {self.computed} / reused {self.reused} unit-steps, "
                f"{self.flops / 1e12:.3f} TFLOPs ({self.flops_speedup:.2f}x fewer than cache off; "
                f"{self.flops_speedup_paper:.2f}x in the paper's accounting), "
                f"{self.wall_seconds:.2f} s, peak KV {self.kv_peak_bytes / 2**20:.1f} MiB")
