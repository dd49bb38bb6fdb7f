"""TeaCache baseline: one reuse decision for the whole window (the paper's TeaCache rows)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import AccumulatedL1Policy


@dataclass
class TeaCacheConfig:
    """threshold: reuse while the accumulated rescaled change stays below it (0 = never reuse).
    warmup: window steps always computed at the start (SkyReels' ret-steps: 5).
    coefficients: poly1d rescale of the relative L1 of e0 (highest power first); model-specific."""

    threshold: float = 0.1
    warmup: int = 5
    coefficients: list[float] = field(default_factory=lambda: [1.0, 0.0])


class TeaCachePolicy(AccumulatedL1Policy):
    """Decides per CFG branch for the whole window from the window's e0; the last window step is forced."""

    granularity = "window"

    def __init__(self, config: TeaCacheConfig):
        super().__init__(config.threshold, config.warmup, config.coefficients)
        self.config = config
