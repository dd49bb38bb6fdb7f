"""DemoCodec: a fixed (not learned) latent map standing in for a VAE in the demo model.

Pixels [T, 64, 64, 3] in 0..1 become latents [1, 32, T, 8, 8]: 8x spatial like the Wan VAE, temporal stride 1.
Per 8×8 patch the RGB values go through an orthonormal colour transform (luma + 2 chroma), then an
orthonormal 2-D DCT-II of each 8×8 plane; the 4×4 lowest luma frequencies and the 8 lowest of each chroma
plane are kept: 32 channels, about a 32-pixel picture's worth of detail. Because the kept rows of an
orthonormal map are orthonormal, the encoder is one [32, 192] matrix ``P`` and the decoder is its transpose
(the discarded coefficients are zero).
Then a normalisation (per-channel mean, one shared scale; measured once on training data by ``train.py`` and
stored in the model file's metadata) makes model space roughly unit variance.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import torch

PATCH = 8
CHANNELS = 32
LUMA_KEEP = 16
CHROMA_KEEP = 8
# the 4x4 lowest frequencies in zig-zag order (luma keeps all 16, chroma the first 8)
ZIGZAG = [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0),
          (3, 1), (2, 2), (1, 3), (2, 3), (3, 2), (3, 3)]


def dct_matrix(n: int = PATCH) -> torch.Tensor:
    """Orthonormal DCT-II matrix [n, n] (row k = frequency k)."""
    m = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        for i in range(n):
            m[k, i] = math.cos(math.pi * (i + 0.5) * k / n) * math.sqrt((1 if k == 0 else 2) / n)
    return m


def colour_matrix() -> torch.Tensor:
    """Orthonormal RGB -> (luma, chroma1, chroma2) [3, 3]."""
    return torch.tensor([[1 / math.sqrt(3)] * 3,
                         [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
                         [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]], dtype=torch.float64)


def projection_matrix() -> torch.Tensor:
    """P [32, 192]: a patch vector ordered (y, x, rgb) -> the 32 kept coefficients; rows orthonormal."""
    d, c = dct_matrix(), colour_matrix()
    rows = []
    for plane, keep in ((0, LUMA_KEEP), (1, CHROMA_KEEP), (2, CHROMA_KEEP)):
        for (u, v) in ZIGZAG[:keep]:
            basis = torch.outer(d[u], d[v])  # [y, x]
            rows.append((basis[:, :, None] * c[plane][None, None, :]).reshape(-1))
    return torch.stack(rows).float()


class DemoCodec:
    """The demo's latent codec (satisfies the pipeline's ``LatentCodec`` protocol)."""

    spatial_stride = PATCH
    temporal_stride = 1
    channels = CHANNELS

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.P = projection_matrix()
        self.mean = torch.tensor(list(mean) if mean is not None else [0.0] * CHANNELS, dtype=torch.float32)
        self.std = torch.tensor(list(std) if std is not None else [1.0] * CHANNELS, dtype=torch.float32)
        if self.mean.shape != (CHANNELS,) or self.std.shape != (CHANNELS,):
            raise ValueError(f"DemoCodec: mean/std must have {CHANNELS} values each")

    # -- stats ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"mean": [round(float(v), 6) for v in self.mean], "std": [round(float(v), 6) for v in self.std]}

    def stats_json(self) -> str:
        return json.dumps(self.stats())

    @classmethod
    def from_stats_json(cls, text: str) -> "DemoCodec":
        d = json.loads(text)
        return cls(d["mean"], d["std"])

    @staticmethod
    def measure(raw: torch.Tensor) -> tuple[list[float], list[float]]:
        """Per-channel mean and ONE shared scale (the RMS over channels) of raw latents [..., 32, F, h, w].

        One scale, like a VAE's scale factor, keeps the channels' natural proportions: the block colours (DC)
        carry the picture and dominate the loss, the sparse edge detail (AC) stays small. Per-channel
        scaling would blow the AC channels, zero almost everywhere, up to unit variance, and make the model
        spend its capacity on them (tried: salt-and-pepper blocks after 650 steps)."""
        z = raw.movedim(-4, 0).reshape(CHANNELS, -1).double()
        mean = z.mean(1)
        rms = float(((z - mean[:, None]) ** 2).mean().sqrt().clamp_min(1e-3))
        return mean.float().tolist(), [rms] * CHANNELS

    # -- raw transforms (batched) -----------------------------------------------------------------
    def encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [..., T, H, W, 3] -> raw coefficients [..., 32, T, H/8, W/8]."""
        *lead, t, h, w, c = pixels.shape
        if h % PATCH or w % PATCH or c != 3:
            raise ValueError(f"DemoCodec: pixels must be [T, H, W, 3] with H, W multiples of {PATCH}, got "
                             f"{list(pixels.shape)}")
        x = pixels.float().reshape(*lead, t, h // PATCH, PATCH, w // PATCH, PATCH, 3)
        x = x.movedim(-4, -3)  # [..., T, hb, wb, 4y, 4x, 3]
        x = x.reshape(*lead, t, h // PATCH, w // PATCH, PATCH * PATCH * 3)
        z = x @ self.P.T  # [..., T, hb, wb, 32]
        return z.movedim(-1, -4)  # [..., 32, T, hb, wb]

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """raw coefficients [..., 32, F, h, w] -> pixels [..., F, 8h, 8w, 3] (unclamped)."""
        z = z.float().movedim(-4, -1)  # [..., F, h, w, 32]
        *lead, f, h, w, _ = z.shape
        x = (z @ self.P).reshape(*lead, f, h, w, PATCH, PATCH, 3)
        return x.movedim(-3, -4).reshape(*lead, f, h * PATCH, w * PATCH, 3)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        shape = (CHANNELS, 1, 1, 1)
        return (raw - self.mean.view(shape)) / self.std.view(shape)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        shape = (CHANNELS, 1, 1, 1)
        return z.float() * self.std.view(shape) + self.mean.view(shape)

    # -- LatentCodec protocol ---------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T, H, W, 3] in 0..1 -> model-space latents [1, 32, T, H/8, W/8]."""
        pixels = torch.as_tensor(pixels)
        if pixels.dtype == torch.uint8:
            pixels = pixels.float() / 255.0
        if pixels.dim() != 4:
            raise ValueError(f"DemoCodec.encode: expected [T, H, W, 3], got {list(pixels.shape)}")
        return self.normalise(self.encode_raw(pixels.cpu()))[None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """model-space latents [1, 32, F, h, w] -> pixels [F, 8h, 8w, 3] clamped to 0..1."""
        if latents.dim() == 5:
            if latents.shape[0] != 1:
                raise ValueError(f"DemoCodec.decode: batch must be 1, got {latents.shape[0]}")
            latents = latents[0]
        return self.decode_raw(self.denormalise(latents.cpu())).clamp(0, 1)
