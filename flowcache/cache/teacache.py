"""TeaCache baseline: one reuse decision per step for the whole window (the paper's TeaCache rows)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import AccumulatedL1Policy, check_coefficients, check_knobs, knob


@dataclass
class TeaCacheConfig:
    """threshold: reuse while the accumulated rescaled change of the signal stays below it (0 = never reuse).
    warmup: steps of the window always computed at the start (SkyReels' ret-steps: 5).
    coefficients: poly1d rescale of the signal's relative L1 (highest power first); from the model's presets."""

    threshold: float = knob(0.1, "threshold", lo=0.0, hi=10.0)
    warmup: int = knob(5, "warmup_steps", lo=0, hi=1000, integer=True)
    coefficients: list[float] = field(default_factory=lambda: [1.0, 0.0])

    def __post_init__(self) -> None:
        check_knobs(self)
        self.coefficients = check_coefficients(self.coefficients, "teacache")


class TeaCachePolicy(AccumulatedL1Policy):
    """Decides per CFG branch and unit (on the window path: the whole window) from the unit's signal."""

    def __init__(self, config: TeaCacheConfig):
        super().__init__(config.threshold, config.warmup, config.coefficients)
        self.config = config
