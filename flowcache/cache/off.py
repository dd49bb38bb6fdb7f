"""``off``: no caching. Every unit computes every step, so on the window path this is each model's vanilla loop,
the baseline every speedup and PSNR is measured against."""
from __future__ import annotations

from dataclasses import dataclass

from .base import CachePolicy


@dataclass
class OffConfig:
    """No settings: nothing is reused."""


class OffPolicy(CachePolicy):
    """Always compute (the base rule)."""

    def __init__(self, config: OffConfig | None = None):
        super().__init__()
