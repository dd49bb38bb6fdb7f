"""Where a run's random draws come from: one object per run that a caller can replace, so a run can be replayed
exactly from recorded draws (or fed the draws of another implementation to compare against it)."""
from __future__ import annotations

from typing import Protocol

import torch


class NoiseSource(Protocol):
    def draw(self, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """A standard normal tensor of ``shape`` (fp32, CPU); ``what`` names the draw (e.g. "block 3 init")."""


class SeededNoise:
    """Draws from one seeded CPU generator, in call order; with ``record``, keeps every draw for a replay."""

    def __init__(self, seed: int, record: bool = False):
        self.gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.draws: list[tuple[str, torch.Tensor]] | None = [] if record else None

    def draw(self, shape: tuple[int, ...], what: str) -> torch.Tensor:
        out = torch.randn(shape, generator=self.gen)
        if self.draws is not None:
            self.draws.append((what, out.clone()))
        return out


class ReplayNoise:
    """Gives back recorded draws in order, checking that each is asked for under the same name and shape."""

    def __init__(self, draws: list[tuple[str, torch.Tensor]]):
        self.draws, self.next = list(draws), 0

    def draw(self, shape: tuple[int, ...], what: str) -> torch.Tensor:
        if self.next >= len(self.draws):
            raise RuntimeError(f"replay: no recorded draw left for {what!r}")
        name, tensor = self.draws[self.next]
        if name != what or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"replay: draw {self.next} was {name!r} {tuple(tensor.shape)}, asked {what!r} {shape}")
        self.next += 1
        return tensor.clone()
