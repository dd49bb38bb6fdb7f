"""EasyCache-style chunkwise caching with no calibration: each chunk estimates at run time how strongly its
output follows its input (EasyCache, arXiv 2507.02860, applied per chunk).

Between a chunk's two most recent computed steps the transformation rate k = rel(Δoutput) / rel(Δinput) is
measured (rel: mean |change| / mean |previous|). On later steps the rule predicts the output's relative change as
k · rel(Δinput) and accumulates it; it reuses the cached residual while the sum stays below the threshold.
One decision per chunk serves every CFG branch (their inputs are the same), so cond and uncond stay in one
batched call; k is learnt from the first branch's output. Warm-up and forced steps compute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CachePolicy, UnitKey, UnitState, check_knobs, knob, relative_l1


@dataclass
class EasyCacheConfig:
    """threshold: largest accumulated predicted relative output change a reuse may reach (0 = never reuse).
    warmup: the chunk's own first steps that always compute (two computes are needed to measure k)."""

    threshold: float = knob(0.05, "threshold", lo=0.0, hi=10.0)
    warmup: int = knob(3, "warmup_steps", lo=0, hi=1000, integer=True)

    def __post_init__(self) -> None:
        check_knobs(self)


class EasyCachePolicy(CachePolicy):
    shared_decision = True
    reads = "input"

    def __init__(self, config: EasyCacheConfig):
        super().__init__()
        self.config = config

    @property
    def keeps_payload(self) -> bool:
        return self.config.threshold > 0

    def state_bytes(self, tokens: int, dim: int, compute_bytes: int, branches: int,
                    steps_taken: int | None = None) -> int:
        """The residuals, plus per unit its last input (compute dtype) and the fp32 input and output k is
        learnt from (one set for every branch: the decision is shared)."""
        own = tokens * dim * (compute_bytes + 2 * 4)
        return super().state_bytes(tokens, dim, compute_bytes, branches, steps_taken) + own

    def decide(self, key: UnitKey, st: UnitState, signal: torch.Tensor, force: bool) -> bool:
        c = self.config
        k = st.memo.get("k")
        if force or st.steps < c.warmup or st.prev_signal is None or c.threshold <= 0 or k is None:
            st.acc = 0.0
            return True
        st.acc += k * relative_l1(signal, st.prev_signal)
        if st.acc < c.threshold:
            return False
        st.acc = 0.0
        return True

    def remember(self, key: UnitKey, payload: torch.Tensor) -> None:
        """Keep the payload; the first branch's payload of a computed step also teaches k (the shared state's
        last signal is that step's input: a payload is only remembered for a unit that computed)."""
        super().remember(key, payload)
        shared = self.state(("*", key[1]) if isinstance(key, tuple) else key)
        memo = shared.memo
        if memo.get("learnt") == shared.steps:  # another branch already taught k this step
            return
        memo["learnt"] = shared.steps
        x = shared.prev_signal
        out = x.float() + payload.float()  # the unit's output: its input plus the residual just computed
        if "x" in memo:
            dx = relative_l1(x.float(), memo["x"])
            memo["k"] = relative_l1(out, memo["out"]) / dx if dx > 0 else None
        memo["x"], memo["out"] = x.float(), out


__all__ = ["EasyCacheConfig", "EasyCachePolicy"]
