"""FlowCache chunkwise adaptive caching: every chunk decides for itself from its own signal trajectory."""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import AccumulatedL1Policy, check_coefficients, check_knobs, knob


@dataclass
class FlowCacheConfig:
    """threshold: per-chunk reuse threshold on the accumulated rescaled change (0 = never reuse).
        SkyReels-V2-1.3B: slow 0.1, fast 0.15; MAGI-1: slow 0.01, fast 0.015.
    warmup: the chunk's own first steps that always compute (5 in both official codebases).
    coefficients: poly1d rescale of the chunk's relative L1 (Wan: e0 polynomial; MAGI-1: identity [1, 0])."""

    threshold: float = knob(0.1, "threshold", lo=0.0, hi=10.0)
    warmup: int = knob(5, "warmup_steps", lo=0, hi=1000, integer=True)
    coefficients: list[float] = field(default_factory=lambda: [1.0, 0.0])

    def __post_init__(self) -> None:
        check_knobs(self)
        self.coefficients = check_coefficients(self.coefficients, "flowcache")


class FlowCachePolicy(AccumulatedL1Policy):
    """State per (branch, chunk): its own step counter, accumulator, last signal and cached payload.
    The pipeline forces a chunk's last step (and MAGI-1's global first/last steps)."""

    def __init__(self, config: FlowCacheConfig):
        super().__init__(config.threshold, config.warmup, config.coefficients)
        self.config = config
