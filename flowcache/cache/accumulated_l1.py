"""TeaCache's rule, which FlowCache applies per chunk: accumulate the rescaled relative L1 change of a unit's
signal (Wan: its e0, the timestep modulation; MAGI-1: its patch-embedded input) and reuse while the sum stays
under the threshold.

TeaCache (arXiv 2411.19108) and FlowCache share this rule, its settings and its state to the letter; what
differs is the unit one decision covers, which is a line of data each in ``registry.METHODS``: TeaCache's path
is "window" (one decision for the whole window each step), FlowCache's "chunk" (every chunk decides from its own
signal trajectory, at its own step counter).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np
import torch

from .base import CachePolicy, UnitState, check_coefficients, check_knobs, knob, relative_l1


@dataclass
class AccumulatedL1Config:
    """threshold: reuse while the accumulated rescaled change stays below it (0 = never reuse).
        FlowCache's SkyReels-V2-1.3B presets: slow 0.1, fast 0.15; MAGI-1: slow 0.01, fast 0.015.
    warmup: the unit's own first steps that always compute (SkyReels' ret-steps and both official FlowCache
        codebases: 5).
    coefficients: poly1d rescale of the relative L1, highest power first (Wan: the e0 polynomial of the model's
        presets; MAGI-1: the identity [1, 0])."""

    threshold: float = knob(0.1, "threshold", lo=0.0, hi=10.0)
    warmup: int = knob(5, "warmup_steps", lo=0, hi=1000, integer=True)
    coefficients: list[float] = field(default_factory=lambda: [1.0, 0.0])

    def __post_init__(self) -> None:
        check_knobs(self)
        self.coefficients = check_coefficients(self.coefficients)


class AccumulatedL1Policy(CachePolicy):
    """State per (branch, unit): its own step counter, accumulator, last signal and cached payload. The first
    ``warmup`` decisions of a unit and forced ones (the pipeline forces a chunk's last step, MAGI-1's global
    first and last steps) compute; a threshold of 0 never reuses."""

    def __init__(self, config: AccumulatedL1Config):
        super().__init__()
        self.config = config
        self.rescale = np.poly1d(list(config.coefficients))

    @property
    def keeps_payload(self) -> bool:
        return self.config.threshold > 0

    def decide(self, key: Hashable, st: UnitState, signal: torch.Tensor, force: bool) -> bool:
        c = self.config
        if force or st.steps < c.warmup or st.prev_signal is None or c.threshold <= 0:
            st.acc = 0.0
            return True
        st.acc += float(self.rescale(relative_l1(signal, st.prev_signal)))
        if st.acc < c.threshold:
            return False
        st.acc = 0.0
        return True


__all__ = ["AccumulatedL1Config", "AccumulatedL1Policy"]
