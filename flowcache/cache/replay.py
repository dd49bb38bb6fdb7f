"""Same decisions in two runs: record a policy's decisions in one run, answer them from the record in another.

For comparisons where only one thing may differ, e.g. K/V stored in bf16 against fp8: with the decisions of the
first run replayed, the second computes and reuses exactly the same units, so the difference between the two
videos is the storage's alone (a reuse decision that flipped would otherwise dominate it).
"""
from __future__ import annotations

from typing import Any

from .base import CachePolicy, UnitKey


class RecordedPolicy:
    """``policy`` as it is, with every decision appended to ``log`` as (key, compute) in the order asked."""

    def __init__(self, policy: CachePolicy):
        self.policy = policy
        self.log: list[tuple[UnitKey, bool]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def should_compute(self, key: UnitKey, signal: Any, force: bool = False) -> bool:
        compute = self.policy.should_compute(key, signal, force)
        self.log.append((key, compute))
        return compute


class ReplayedPolicy:
    """``policy`` answering every decision from ``log`` (a ``RecordedPolicy``'s) in order; the policy still sees
    each decision, so its clocks and payloads (what a reuse applies) follow the replayed run."""

    def __init__(self, policy: CachePolicy, log: list[tuple[UnitKey, bool]]):
        self.policy, self.log, self.next = policy, list(log), 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def should_compute(self, key: UnitKey, signal: Any, force: bool = False) -> bool:
        if self.next >= len(self.log):
            raise RuntimeError(f"replay: no recorded decision left for {key!r}")
        recorded, compute = self.log[self.next]
        if recorded != key:
            raise RuntimeError(f"replay: decision {self.next} was for {recorded!r}, asked for {key!r}")
        self.next += 1
        self.policy.should_compute(key, signal, force)
        return compute


__all__ = ["RecordedPolicy", "ReplayedPolicy"]
