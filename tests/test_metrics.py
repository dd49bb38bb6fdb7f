import math
import sys

import numpy as np
import pytest
import torch

from flowcache.metrics import psnr, ssim


def video(n: int = 4, h: int = 32, w: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, h // 4, w // 4, generator=g), size=(h, w),
                                             mode="bilinear", align_corners=False)
    return smooth.permute(0, 2, 3, 1).contiguous()  # [N,H,W,3]


def test_psnr_identical_is_inf():
    v = video()
    assert psnr(v, v.clone()) == math.inf


def test_psnr_known_mse():
    a = torch.zeros(2, 8, 8, 3)
    b = a.clone()
    b[0] = 0.5  # half the video off by 0.5 -> MSE 0.125 over the whole video, not a per-frame mean
    assert psnr(a, b) == pytest.approx(-10 * math.log10(0.125), abs=1e-12)
    assert psnr(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)) == pytest.approx(psnr(a, b), abs=1e-12)
    c = torch.full((3, 5, 5, 3), 0.1, dtype=torch.float64)
    assert psnr(torch.zeros_like(c), c) == pytest.approx(20.0, abs=1e-9)


def test_psnr_uint8_and_numpy():
    v = video()
    q = (v * 255).round().to(torch.uint8)
    assert psnr(q.numpy(), q.double() / 255) == math.inf
    assert psnr(q, v) > 50


def test_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\[2, 8, 8, 3\].*\[2, 8, 9, 3\]"):
        psnr(torch.zeros(2, 8, 8, 3), torch.zeros(2, 8, 9, 3))
    with pytest.raises(ValueError, match=r"\[4, 32, 40, 3\].*\[3, 32, 40, 3\]"):
        ssim(video(), video()[:3])


def test_ssim_identical_is_one():
    v = video()
    assert ssim(v, v.clone()) == pytest.approx(1.0, abs=1e-6)
    assert ssim(v.permute(0, 3, 1, 2), v.permute(0, 3, 1, 2)) == pytest.approx(1.0, abs=1e-6)


def test_ssim_noise_lowers_score_and_matches_per_frame_mean():
    from torchmetrics.functional.image import structural_similarity_index_measure

    v = video(n=10)
    g = torch.Generator().manual_seed(1)
    noisy = (v + 0.1 * torch.randn(v.shape, generator=g)).clamp(0, 1)
    s = ssim(v, noisy)
    assert 0 < s < 0.99
    per_frame = [structural_similarity_index_measure(noisy[i:i + 1].permute(0, 3, 1, 2),
                                                     v[i:i + 1].permute(0, 3, 1, 2), data_range=1.0).item()
                 for i in range(10)]
    assert s == pytest.approx(float(np.mean(per_frame)), abs=1e-5)
    assert ssim(v, noisy.permute(0, 3, 1, 2).permute(0, 2, 3, 1), layout="NHWC") == pytest.approx(s)


def test_ssim_missing_torchmetrics(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.functional", None)
    monkeypatch.setitem(sys.modules, "torchmetrics.functional.image", None)
    with pytest.raises(ImportError, match="pip install torchmetrics"):
        ssim(video(), video())
