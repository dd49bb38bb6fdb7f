"""MagCache, chunkwise: each (branch, chunk) reuses its cached residual while the error predicted from calibrated
residual-magnitude ratios stays small (MagCache, arXiv 2506.09045, applied to every chunk's own step counter).

At a chunk's step k the ratio γ_k = mean|r_k| / mean|r_{k−1}| of its residuals (calibrated per step and branch,
``python -m flowcache calibrate``) says how much the residual changes. While reusing, the rule multiplies the
ratios since the last compute, Γ = Π γ, and accumulates the error Σ |1 − Γ|; it reuses while that error stays
≤ threshold and no more than ``max_skips`` steps in a row were reused. Warm-up and forced steps compute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .base import CachePolicy, UnitKey, UnitState, check_knobs, knob


def resample(ratios: list[float], steps: int) -> list[float]:
    """Nearest-neighbour resampling of a per-step ratio curve to ``steps`` entries (as MagCache does)."""
    if len(ratios) == steps:
        return list(ratios)
    if steps == 1:
        return [ratios[-1]]
    index = np.round(np.arange(steps) * (len(ratios) - 1) / (steps - 1)).astype(int)
    return [float(ratios[i]) for i in index]


def ratios_are_valid(mag_ratios: object) -> bool:
    """Whether ``mag_ratios`` maps branch names to non-empty lists of positive finite numbers (the check of a
    config's and of a presets table's ratios)."""
    def positive(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
    return isinstance(mag_ratios, dict) and all(isinstance(v, list) and v and all(positive(x) for x in v)
                                                for v in mag_ratios.values())


@dataclass
class MagCacheConfig:
    """threshold: largest accumulated error Σ|1 − Γ| a reuse may reach (0 = never reuse).
    max_skips: most reuses in a row per chunk (MagCache's K).
    warmup: the chunk's own first steps that always compute.
    mag_ratios: per branch ("cond", "uncond"), the calibrated ratio γ_k for each of a chunk's steps (γ_0 = 1);
        from the model's presets. Resampled to the run's step count."""

    threshold: float = knob(0.06, "threshold", lo=0.0, hi=10.0)
    max_skips: int = knob(3, "max_skips", lo=0, hi=1000, integer=True)
    warmup: int = knob(2, "warmup_steps", lo=0, hi=1000, integer=True)
    mag_ratios: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_knobs(self)
        if not self.mag_ratios or not ratios_are_valid(self.mag_ratios):
            raise InputError("method='magcache': this model has no calibrated magnitude ratios (mag_ratios); "
                             "expected a calibrated model: `python -m flowcache calibrate CHECKPOINT` records them. "
                             "easycache needs no calibration.")


class MagCachePolicy(CachePolicy):
    """State per (branch, chunk): the product of ratios and the accumulated error since its last compute. The
    rule reads the calibrated ratios of the unit's own step, no signal."""

    reads = None

    def __init__(self, config: MagCacheConfig):
        super().__init__()
        self.config = config
        self._curves: dict[tuple[str, int], list[float]] = {}
        self.steps_per_chunk: int | None = None

    def prepare(self, chunk_steps: int) -> None:
        self.steps_per_chunk = chunk_steps

    @property
    def keeps_payload(self) -> bool:
        return self.config.threshold > 0

    def ratio(self, branch: str, step: int) -> float:
        curve = self.config.mag_ratios.get(branch) or next(iter(self.config.mag_ratios.values()))
        n = self.steps_per_chunk or len(curve)
        key = (branch, n)
        if key not in self._curves:
            self._curves[key] = resample(curve, n)
        return self._curves[key][min(step, n - 1)]

    def decide(self, key: UnitKey, st: UnitState, signal: None, force: bool) -> bool:
        c = self.config
        if force or st.steps < c.warmup or c.threshold <= 0:
            self.on_forced(st)
            return True
        branch = key[0] if isinstance(key, tuple) else "cond"
        ratio = st.ratio * self.ratio(branch, st.steps)
        err = st.acc + abs(1.0 - ratio)
        if err <= c.threshold and st.skips < c.max_skips:
            st.ratio, st.acc = ratio, err
            return False
        self.on_forced(st)
        return True

    def on_forced(self, st: UnitState) -> None:
        """A compute starts a new product of ratios and a new error sum."""
        st.acc, st.ratio = 0.0, 1.0


__all__ = ["MagCacheConfig", "MagCachePolicy", "ratios_are_valid", "resample"]
