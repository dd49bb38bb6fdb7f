"""Video quality metrics used to compare a FlowCache run against the uncached baseline.

Inputs are videos as float tensors in 0..1, ``[N,H,W,3]`` (ComfyUI IMAGE layout) or ``[N,3,H,W]``; numpy
arrays are accepted, and uint8 inputs are divided by 255 first (what ``flowcache.video.read_video`` returns).
Both metrics work through the video a few frames at a time, so long clips need no full-size float64 copy.
"""
from __future__ import annotations

import math
from typing import Literal, Union

import numpy as np
import torch

Video = Union[torch.Tensor, np.ndarray]

_CHUNK = 8  # frames per step: bounds the temporary memory on 480p/720p clips


def _as_tensor(x: Video, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if not (t.is_floating_point() or t.dtype == torch.uint8):
        raise ValueError(f"{name} must be float in 0..1 or uint8, got dtype {t.dtype}")
    return t.detach()


def _scaled(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) / 255.0 if t.dtype == torch.uint8 else t.to(dtype)


def _check_pair(a: Video, b: Video) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _as_tensor(a, "a"), _as_tensor(b, "b")
    if ta.shape != tb.shape:
        raise ValueError(f"videos must have the same shape, got a {list(ta.shape)} and b {list(tb.shape)}")
    if ta.ndim != 4 or ta.numel() == 0:
        raise ValueError(f"videos must be non-empty [N,H,W,3] or [N,3,H,W] tensors, got shape {list(ta.shape)}")
    if ta.device.type == "mps":  # MPS has no float64
        ta = ta.cpu()
    return ta, tb.to(ta.device)


def psnr(a: Video, b: Video) -> float:
    """PSNR in dB of two videos with data range 1.0, as in the FlowCache paper.

    ``-10 * log10(MSE)`` with the MSE taken over every pixel and channel of the whole video (not a mean of
    per-frame PSNRs), so the layout ([N,H,W,3] or [N,3,H,W]) does not matter. ``inf`` when identical.
    """
    ta, tb = _check_pair(a, b)
    total = 0.0
    for s in range(0, ta.shape[0], _CHUNK):
        # float64 so the sum of squared errors stays exact enough for tiny differences.
        d = _scaled(ta[s:s + _CHUNK], torch.float64) - _scaled(tb[s:s + _CHUNK], torch.float64)
        total += float((d * d).sum())
    mse = total / ta.numel()
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)


def ssim(a: Video, b: Video, layout: Literal["auto", "NHWC", "NCHW"] = "auto") -> float:
    """Mean over frames of the per-frame SSIM (data range 1.0, 11x11 Gaussian window, sigma 1.5).

    ``layout="auto"`` takes [N,H,W,3] when the last dimension is 3, else [N,3,H,W] when the second is; pass
    "NHWC" or "NCHW" for an ambiguous shape. Needs torchmetrics.
    """
    try:
        # Recent torchmetrics deprecate the flat torchmetrics.functional name (a FutureWarning on every call).
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        try:
            from torchmetrics.functional import structural_similarity_index_measure
        except ImportError as e:
            raise ImportError("flowcache.metrics.ssim needs the torchmetrics package: pip install torchmetrics") from e

    ta, tb = _check_pair(a, b)
    if layout == "auto":
        layout = "NHWC" if ta.shape[-1] == 3 else "NCHW" if ta.shape[1] == 3 else "?"  # type: ignore[assignment]
    if layout not in ("NHWC", "NCHW") or ta.shape[-1 if layout == "NHWC" else 1] != 3:
        raise ValueError(f"videos must be [N,H,W,3] or [N,3,H,W] (layout={layout!r}), got shape {list(ta.shape)}")
    if layout == "NHWC":
        ta, tb = ta.permute(0, 3, 1, 2), tb.permute(0, 3, 1, 2)
    if min(ta.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs frames of at least 11x11 pixels, got {ta.shape[-2]}x{ta.shape[-1]} (HxW)")
    scores = []
    for s in range(0, ta.shape[0], _CHUNK):
        x = _scaled(ta[s:s + _CHUNK], torch.float32)
        y = _scaled(tb[s:s + _CHUNK], torch.float32)
        scores.append(structural_similarity_index_measure(x, y, data_range=1.0, reduction="none").reshape(-1))
    return float(torch.cat(scores).double().mean())
