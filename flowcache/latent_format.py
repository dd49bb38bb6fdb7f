"""Latent spaces: ComfyUI LATENTs hold raw VAE latents; the DiT works on normalised ones.

Wan2.1 VAE channel statistics (Wan2.1 ``WanVAE``; ComfyUI ``latent_formats.Wan21``):
model-space latent = (raw − mean) / std.
"""
from __future__ import annotations

import torch

WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(WAN21_MEAN)) + (1,) * (x.dim() - 2)
    mean = torch.tensor(WAN21_MEAN, dtype=torch.float32, device=x.device).view(shape)
    std = torch.tensor(WAN21_STD, dtype=torch.float32, device=x.device).view(shape)
    return mean, std


def wan_to_model_space(raw: torch.Tensor) -> torch.Tensor:
    """Raw Wan VAE latents [B, 16, F, h, w] -> the DiT's normalised space."""
    mean, std = _stats(raw)
    return (raw.float() - mean) / std


def wan_to_raw(z: torch.Tensor) -> torch.Tensor:
    """The DiT's normalised latents -> raw Wan VAE latents (what ComfyUI's VAEDecode takes)."""
    mean, std = _stats(z)
    return z.float() * std + mean
