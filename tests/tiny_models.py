"""Tiny random models in the real checkpoint formats, built inside tests."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from flowcache.models.wan import WanConfig, WanDiT

TINY_WAN = dict(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_dim=32)


def tiny_wan(seed: int = 0, has_fps: bool = True, **kw) -> WanDiT:
    torch.manual_seed(seed)
    cfg = WanConfig(**{**TINY_WAN, "has_fps": has_fps, **kw})
    m = WanDiT(cfg).eval().requires_grad_(False)
    for p in m.parameters():
        p.data.normal_(0, 0.08)
    return m


def save_wan(model: WanDiT, path: Path, prefix: str = "", dtype: torch.dtype = torch.float32,
             heads_meta: bool = True) -> Path:
    sd = {prefix + k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"flowcache.num_heads": str(model.cfg.num_heads), "flowcache.text_len": "8"} if heads_meta else {}
    save_file(sd, str(path), metadata=meta)
    return path
