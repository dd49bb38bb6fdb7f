"""What every family pipeline shares: how pixels map to latents, and the VAE as a pipeline sees it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import InputError


@dataclass
class LatentGeometry:
    """How pixels map to latents for a model family (Wan VAE: 4x time, 8x space, 16 channels).

    position_channels: 2 for a model that takes each latent pixel's (y, x) position in -1..1 as extra input
    channels (Wan's image-to-video conditioning input, used by the shipped demo: RoPE alone tells a token
    where it is only relative to others, which a tiny model cannot turn into "the shape starts centred").
    """

    temporal_stride: int = 4
    spatial_stride: int = 8
    channels: int = 16
    position_channels: int = 0

    def positions(self, frames: int, height: int, width: int, device: torch.device | str = "cpu"
                  ) -> torch.Tensor | None:
        """The position channels [1, 2, frames, height, width] (None for models without them)."""
        if not self.position_channels:
            return None
        ys = torch.linspace(-1, 1, height, device=device)[:, None].expand(height, width)
        xs = torch.linspace(-1, 1, width, device=device)[None, :].expand(height, width)
        return torch.stack([ys, xs])[None, :, None].expand(1, 2, frames, height, width)

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_stride + 1

    def pixel_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.temporal_stride + 1

    def check_size(self, width: int, height: int, patch: int, model: str = "this model") -> None:
        """Width and height in pixels: positive multiples of the stride times the model's spatial ``patch``, so a
        frame is whole patches of whole latent pixels; raises InputError naming the widget and the nearest."""
        unit = self.spatial_stride * patch
        for name, val in (("width", width), ("height", height)):
            if val <= 0 or val % unit:
                raise InputError(f"{name}={val}: must be a positive multiple of {unit} for {model} "
                                 f"(nearest: {max(unit, round(val / unit) * unit)}).")

    def check_frames(self, name: str, value: int) -> None:
        """A pixel frame count the causal VAE turns into whole latent frames: temporal_stride·k + 1."""
        ts = self.temporal_stride
        if value < 1 or (value - 1) % ts:
            raise InputError(f"{name}={value}: must be {ts}·k+1 for a model with {ts}x temporal compression "
                             f"(nearest: {max(1, round((value - 1) / ts)) * ts + 1}).")


class LatentCodec(Protocol):
    """A VAE as the pipeline sees it, in model space (normalised latents)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T, H, W, 3] in 0..1 -> latents [1, C, F, h, w]."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [1, C, F, h, w] -> pixels [T, H, W, 3] in 0..1."""
        ...
