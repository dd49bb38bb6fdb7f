"""What every family pipeline shares: how pixels map to latents, the VAE as a pipeline sees it, and a clean
prefix (I2V, V2V) through it."""
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


def check_model(model: object, kind: type, runs: str, hints: dict[str, str] | None = None) -> None:
    """A family pipeline's model check: unless ``model`` is a ``kind``, an InputError "{runs}; got {type}."
    followed by ``hints`` for that type's name (which pipeline samples it), or by ``hints[""]`` for any other."""
    if not isinstance(model, kind):
        name = type(model).__name__
        hint = (hints or {}).get(name, (hints or {}).get("", ""))
        raise InputError(f"{runs}; got {name}.{hint}")


def initial_latents(noise, shape: tuple[int, ...], name: str, prefix: torch.Tensor | None,
                    device: torch.device | str) -> torch.Tensor:
    """A segment's starting latents on ``device``: ``noise``'s draw ``name`` of ``shape``, its first frames
    replaced by the clean ``prefix`` [1, C, P, h, w] (None: none)."""
    x = noise.draw(shape, name).to(device)
    if prefix is not None:
        x[:, :, :prefix.shape[2]] = prefix.to(device)
    return x


class LatentCodec(Protocol):
    """A VAE as the pipeline sees it, in model space (normalised latents)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T, H, W, 3] in 0..1 -> latents [1, C, F, h, w]."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [1, C, F, h, w] -> pixels [T, H, W, 3] in 0..1."""
        ...


def prefix_frames(prefix: torch.Tensor | None, geometry: LatentGeometry, codec: LatentCodec | None) -> int:
    """Latent frames a clean prefix becomes (``encode_prefix``), for planning before it is encoded: pixels
    [T, H, W, 3] give 1 for an image (I2V) and T // temporal stride otherwise (V2V); latents [1, C, P, h, w] P."""
    if prefix is None:
        return 0
    if prefix.dim() == 4:
        stride = getattr(codec, "temporal_stride", geometry.temporal_stride)  # what the codec's encode() does
        return 1 if prefix.shape[0] == 1 else prefix.shape[0] // stride
    return prefix.shape[2]


def encode_prefix(prefix: torch.Tensor, geometry: LatentGeometry, codec: LatentCodec | None,
                  latent_hw: tuple[int, int]) -> torch.Tensor:
    """A clean prefix as fp32 model-space latents [1, C, P, h, w], checked against the run's latent size.

    prefix: latents [1, C, P, h, w], or pixels [T, H, W, 3] in 0..1 encoded by ``codec``; a single image (I2V)
    is repeated to one latent frame's worth of pixels and the first latent frame kept, as a causal VAE needs."""
    if prefix.dim() == 4:
        if codec is None:
            raise InputError("prefix: pixels need a codec (VAE); pass latents [1, C, F, h, w] otherwise.")
        if prefix.shape[0] == 1:
            prefix = codec.encode(prefix.repeat(geometry.temporal_stride, 1, 1, 1))[:, :, :1]
        else:
            prefix = codec.encode(prefix)
    if prefix.dim() != 5 or prefix.shape[0] != 1 or prefix.shape[1] != geometry.channels or prefix.shape[2] < 1:
        raise InputError(f"prefix: latents must be [1, {geometry.channels}, frames ≥ 1, h, w], "
                         f"got {list(prefix.shape)}.")
    if tuple(prefix.shape[3:]) != tuple(latent_hw):
        raise InputError(f"prefix: latent size {tuple(prefix.shape[3:])} does not match width/height "
                         f"(latent {tuple(latent_hw)}).")
    return prefix.float()


def check_caption(caption: torch.Tensor, mask: torch.Tensor | None, width: int, chunks: int, model: str,
                  encoder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states and their mask for a model that takes a validity mask: caption [1, L, width] (or [L, width]),
    or one caption per chunk [1, chunks, L, width]; mask of the same leading shape, bool (None: all valid).
    Returns both with the batch dimension; errors name the input and, for a wrong width, the ``encoder``."""
    if caption.dim() == 2:
        caption = caption[None]
    if caption.dim() not in (3, 4) or caption.shape[0] != 1:
        raise InputError(f"caption: must be [1, tokens, {width}] (or [1, chunks, tokens, {width}] per chunk), "
                         f"got {list(caption.shape)}.")
    if caption.shape[-1] != width:
        raise InputError(f"caption width is {caption.shape[-1]} but {model} takes {width} ({encoder}).")
    if caption.dim() == 4 and caption.shape[1] != chunks:
        raise InputError(f"per-chunk caption has {caption.shape[1]} chunks; this video has {chunks}.")
    if caption.shape[-2] == 0:
        raise InputError("caption: has no tokens.")
    if mask is None:
        mask = torch.ones(caption.shape[:-1], dtype=torch.bool)
    if mask.dim() == caption.dim() - 2:
        mask = mask[None]
    if tuple(mask.shape) != tuple(caption.shape[:-1]):
        raise InputError(f"caption_mask {list(mask.shape)} does not match caption {list(caption.shape)}.")
    return caption, mask.bool()
