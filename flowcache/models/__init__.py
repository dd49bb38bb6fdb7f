"""Model families and loading: a table of families, each with a key-based detector and a builder.

``load_model`` reads any supported checkpoint, recognises its family from the key names (so a MAGI-1 file
given where a Wan model is expected is explained, not fed to a matmul), infers the config from shapes, and
returns a ``LoadedModel``. Small models (the shipped demo) may carry extra facts in safetensors metadata
under ``flowcache.*``: head count, text length, latent geometry, presets.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..checkpoint import Checkpoint, compute_dtype, load_checkpoint
from ..errors import CheckpointError
from .wan import WAN_ANCHORS, WAN_SIZES, WanDiT, build_wan, wan_config_from_state_dict

MAGI_ANCHORS = ("x_embedder.weight", "final_linear.linear.weight", "t_embedder.mlp.0.weight")
MAGI_PRESET_KEY = "magi-4.5B"


def embedded_presets(metadata: dict) -> dict:
    """Preset entries stored in a checkpoint's metadata (``calibrate --embed``), keyed by model key."""
    return json.loads(metadata["flowcache.presets"]) if "flowcache.presets" in metadata else {}


def wan_preset_key(metadata: dict, dim: int) -> str:
    """The presets-table row of a Wan model: its metadata's ``flowcache.model_key`` or its released size."""
    return metadata.get("flowcache.model_key") or f"wan-{WAN_SIZES.get(dim, f'dim{dim}')}"


@dataclass
class LoadedModel:
    family: str                 # "wan" | "magi"
    model: torch.nn.Module
    config: object
    checkpoint: str             # file name(s) shown to users
    prefix: str                 # key prefix that was stripped
    stored_dtype: str
    preset_key: str             # row of the presets table
    text_len: int = 512
    geometry: dict = field(default_factory=lambda: {"temporal_stride": 4, "spatial_stride": 8, "channels": 16})
    extra_presets: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    latent_format: str = "wan21"  # "wan21": ComfyUI LATENTs are raw Wan VAE latents; "demo": the demo codec's space

    def describe(self) -> dict:
        cfg = self.config.to_dict() if hasattr(self.config, "to_dict") else dict(self.config.__dict__)
        return {"family": self.family, "checkpoint": self.checkpoint, "key_prefix": self.prefix or "(none)",
                "stored_dtype": self.stored_dtype, "preset": self.preset_key, "text_len": self.text_len,
                "geometry": self.geometry, "config": cfg}


def _is_wan(keys) -> bool:
    return "head.modulation" in keys and "patch_embedding.weight" in keys


def _is_magi(keys) -> bool:
    return "x_embedder.weight" in keys and any(k.startswith("videodit_blocks.") for k in keys)


def _build_wan(ck: Checkpoint, dtype: torch.dtype) -> LoadedModel:
    meta = ck.metadata
    heads = int(meta["flowcache.num_heads"]) if "flowcache.num_heads" in meta else None
    model = build_wan(ck.tensors, dtype, ck.name, heads)
    cfg = model.cfg
    extra = embedded_presets(meta)
    key = wan_preset_key(meta, cfg.dim)
    geometry = json.loads(meta["flowcache.geometry"]) if "flowcache.geometry" in meta else None
    lm = LoadedModel("wan", model, cfg, ck.name, ck.prefix, ck.main_dtype, key,
                     text_len=int(meta.get("flowcache.text_len", 512)), extra_presets=extra, metadata=meta)
    if geometry:
        lm.geometry = geometry
    lm.latent_format = meta.get("flowcache.latent_format", "demo" if key == "demo" else "wan21")
    return lm


def _build_magi(ck: Checkpoint, dtype: torch.dtype) -> LoadedModel:
    from . import magi  # optional family; imported only when such a file is loaded

    model = magi.build_magi(ck, dtype)
    # The released distilled weights are told apart from the base ones only by their folder name
    # (inference_weight.distill, 4.5B_distill); metadata may say it explicitly.
    flag = ck.metadata.get("flowcache.distill")
    model.distill = flag == "1" if flag is not None else any("distill" in str(f).lower() for f in ck.files)
    geometry = {"temporal_stride": 4, "spatial_stride": 8, "channels": model.cfg.latent_channels}
    return LoadedModel("magi", model, model.cfg, ck.name, ck.prefix, ck.main_dtype, MAGI_PRESET_KEY, text_len=800,
                       geometry=geometry, metadata=ck.metadata)


@dataclass
class Family:
    name: str
    title: str
    anchors: tuple[str, ...]
    detect: Callable[[set], bool]
    build: Callable[[Checkpoint, torch.dtype], LoadedModel]


FAMILIES: dict[str, Family] = {
    "wan": Family("wan", "Wan2.1 / SkyReels-V2 DiT", WAN_ANCHORS, _is_wan, _build_wan),
    "magi": Family("magi", "MAGI-1 DiT", MAGI_ANCHORS, _is_magi, _build_magi),
}


def detect_family(keys) -> str | None:
    keys = set(keys)
    for fam in FAMILIES.values():
        if fam.detect(keys):
            return fam.name
    return None


def read_checkpoint(path: str | os.PathLike) -> tuple[Checkpoint, str]:
    """Read a checkpoint and find its family; raise CheckpointError saying what the file is not."""
    anchors = tuple(a for fam in FAMILIES.values() for a in fam.anchors)
    ck = load_checkpoint(path, anchors)
    family = detect_family(ck.tensors.keys())
    if family is None:
        sample = ", ".join(sorted(ck.tensors)[:4])
        raise CheckpointError(
            f"{ck.name}: not a supported video model. Expected a Wan2.1/SkyReels-V2 DiT (keys like 'head.modulation', "
            f"'blocks.0.self_attn.q.weight') or a MAGI-1 DiT (keys like 'x_embedder.weight'); found keys like {sample}. "
            "A VAE or text encoder goes in its own loader.")
    return ck, family


def load_model(path: str | os.PathLike, dtype: str = "auto", expect: str | None = None) -> LoadedModel:
    """Load a checkpoint of any supported family on the CPU.

    dtype: auto (keep fp32/bf16/fp16 as stored, fp8 upcast to bf16), fp32, bf16 or fp16.
    expect: a family name; a file of another family raises an error that says so.
    """
    ck, family = read_checkpoint(path)
    if expect and family != expect:
        raise CheckpointError(f"{ck.name}: this is a {FAMILIES[family].title} checkpoint, but this loader expects a "
                              f"{FAMILIES[expect].title}. Use the matching loader node.")
    lm = FAMILIES[family].build(ck, compute_dtype(dtype, ck.main_dtype))
    sidecar = preset_sidecar(ck.files[0])
    if sidecar.is_file():  # `python -m flowcache calibrate` output beside the file: it wins over older presets
        lm.extra_presets = with_sidecar_presets(lm.extra_presets, sidecar)
        lm.metadata = {**lm.metadata, "flowcache.preset_file": str(sidecar)}
    return lm


def with_sidecar_presets(extra: dict, sidecar: Path) -> dict:
    from ..calibrate import read_preset_file

    return {**extra, **read_preset_file(sidecar)}


def preset_sidecar(checkpoint_file: str | os.PathLike) -> Path:
    """Where ``python -m flowcache calibrate`` writes a model's presets by default: ``<file stem>.presets.json``
    beside the checkpoint. ``load_model`` reads it, so a calibrated model gets its presets in every node."""
    p = Path(checkpoint_file)
    return p.with_name(p.name.split(".")[0] + ".presets.json")


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """What ``python -m flowcache inspect`` prints: family, config, dtype and key layout."""
    ck, family = read_checkpoint(path)
    info = {"file": ck.name, "family": FAMILIES[family].title, "key_prefix": ck.prefix or "(none)",
            "tensors": len(ck.tensors), "dtypes": ck.dtypes,
            "parameters": sum(t.numel() for t in ck.tensors.values())}
    if family == "wan":
        heads = int(ck.metadata["flowcache.num_heads"]) if "flowcache.num_heads" in ck.metadata else None
        info["config"] = wan_config_from_state_dict(ck.tensors, ck.name, heads).to_dict()
    else:
        from . import magi
        info["config"] = dict(magi.magi_config_from_state_dict(ck.tensors).__dict__)
    return info


__all__ = ["LoadedModel", "load_model", "preset_sidecar", "wan_preset_key", "embedded_presets", "MAGI_PRESET_KEY", "inspect_checkpoint", "detect_family", "FAMILIES", "WanDiT"]
