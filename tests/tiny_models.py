"""Tiny random models in the real checkpoint formats, built inside tests."""
from __future__ import annotations

import os
import pickle
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


class _Shell:
    """The issue's file: unpickling this would run a shell command (an echo, into the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > '{self.marker}'",))


HOSTILE_FORMATS = ("pickle4", "zip", "legacy")


def write_hostile(path: Path, marker: Path, how: str, state_dict: dict | None = None) -> Path:
    """A .pt whose unpickling would write ``marker``: a bare pickle of protocol 4 (torch warns about the protocol
    before refusing it), or torch.save's zip or legacy format with a payload among real tensors."""
    if how == "pickle4":
        path.write_bytes(pickle.dumps({"blocks.0.w": [1.0, 2.0], "x": _Shell(marker)}, protocol=4))
    else:
        torch.save({**(state_dict or {}), "x": _Shell(marker)}, path, _use_new_zipfile_serialization=how == "zip")
    return path
