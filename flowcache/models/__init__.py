"""Model families and loading: one table of families, each entry holding all of that family's facts.

``load_model`` reads any supported checkpoint, recognises its family from the key names (so a MAGI-1 file
given where a Wan model is expected is explained, not fed to a matmul), infers the config from shapes, and
returns a ``LoadedModel`` with its presets (``flowcache.presets``: the built-in table, embedded metadata, a
calibrated sidecar). ``header_facts`` answers the same questions from the file headers alone, for the
frontend's preset display. Small models (the shipped demo) carry extra facts in safetensors metadata under
``flowcache.*``: head count, text length, latent geometry, presets.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..checkpoint import Checkpoint, checkpoint_files, compute_dtype, load_checkpoint, read_headers, split_prefix
from ..errors import CheckpointError
from ..presets import model_presets
from .common import TORCH_OPERATIONS, Operations
from .wan import WAN_ANCHORS, WAN_SIZES, WanDiT, build_wan, wan_config_from_state_dict

MAGI_ANCHORS = ("x_embedder.weight", "y_embedder.null_caption_embedding", "rope.bands")
WAN_GEOMETRY = {"temporal_stride": 4, "spatial_stride": 8, "channels": 16}


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
    geometry: dict = field(default_factory=lambda: dict(WAN_GEOMETRY))
    extra_presets: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    latent_format: str = "wan21"  # "wan21": ComfyUI LATENTs are raw Wan VAE latents; "demo": the demo codec's space
    notes: list[str] = field(default_factory=list)  # decisions the loader took, shown on the node
    loop: str = "diffusion_forcing"  # the sampling loop: "diffusion_forcing" | "causal" | "magi"

    def describe(self) -> dict:
        cfg = self.config.to_dict() if hasattr(self.config, "to_dict") else dict(self.config.__dict__)
        return {"family": self.family, "loop": self.loop, "checkpoint": self.checkpoint,
                "key_prefix": self.prefix or "(none)", "stored_dtype": self.stored_dtype, "preset": self.preset_key,
                "text_len": self.text_len, "geometry": self.geometry, "config": cfg, "notes": self.notes}


def _meta_int(meta: Mapping[str, str], key: str, source: str) -> int | None:
    """An integer ``flowcache.*`` metadata field, or a CheckpointError naming the file and the field."""
    if key not in meta:
        return None
    try:
        value = int(meta[key])
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: metadata {key!r} = {meta[key]!r} is not a whole number.") from None
    if value < 1:
        raise CheckpointError(f"{source}: metadata {key!r} = {value} must be at least 1.")
    return value


def _meta_geometry(meta: Mapping[str, str], source: str) -> dict | None:
    if "flowcache.geometry" not in meta:
        return None
    try:
        geo = json.loads(meta["flowcache.geometry"])
    except (TypeError, json.JSONDecodeError):
        geo = None
    keys = {"temporal_stride", "spatial_stride", "channels", "position_channels"}
    if (not isinstance(geo, dict) or not set(geo) <= keys or not {"temporal_stride", "spatial_stride", "channels"} <= set(geo)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in geo.values())):
        raise CheckpointError(f"{source}: metadata 'flowcache.geometry' must be a JSON object of whole numbers "
                              f"with temporal_stride, spatial_stride and channels.")
    return geo


# ----------------------------------------------------------------------------------------------- Wan
def _wan_keys(keys) -> bool:
    return "head.modulation" in keys and "patch_embedding.weight" in keys


def _wan_preset_key(meta: Mapping[str, str], shapes: Mapping[str, tuple]) -> str:
    """A Wan model's presets row: its metadata's ``flowcache.model_key`` or its released size."""
    dim = shapes["head.modulation"][-1]
    return meta.get("flowcache.model_key") or f"wan-{WAN_SIZES.get(dim, f'dim{dim}')}"


# causal: Self-Forcing, CausVid, Causal Forcing; longlive: LongLive v1.0 (the causal loop with its 12-frame window,
# 3-frame sink and re-cache on a prompt change); krea_realtime: Krea Realtime 14B (its context is rebuilt per block)
LOOPS = ("auto", "diffusion_forcing", "causal", "longlive", "krea_realtime")
_CAUSAL_NAMES = re.compile(r"self[_-]?forcing|causvid|causal", re.IGNORECASE)
# The releases' own file names (longlive_base.pt, krea-realtime-video-14b.safetensors)
_RELEASE_NAMES = (("longlive", re.compile(r"longlive", re.IGNORECASE)),
                  ("krea_realtime", re.compile(r"krea|realtime", re.IGNORECASE)))
KREA_DIM = 5120  # Krea Realtime 14B is a Wan2.1-T2V-14B


def wan_loop(ck: Checkpoint, keys, choice: str = "auto", lora_layout: str | None = None,
             dim: int | None = None) -> tuple[str, str]:
    """(loop, why) for a Wan-architecture checkpoint. The causal releases have exactly Wan2.1's keys, so ``auto``
    decides from, in order: metadata ``flowcache.loop``; a LongLive LoRA (its 'generator_lora' entry); the file's
    own name (LongLive's, Krea Realtime's); a .pt's generator dict (Self-Forcing / CausVid); SkyReels DF's fps
    layers; a 'model.'-prefixed Wan2.1-14B (Krea Realtime's release layout: the training wrapper's state dict);
    a causal file name. ``dim``: the model width (from 'head.modulation'), when known."""
    if choice not in LOOPS:
        raise CheckpointError(f"loop={choice!r}: must be one of {', '.join(LOOPS)}.")
    if choice != "auto":
        return choice, "chosen on the loader"
    meta = ck.metadata.get("flowcache.loop")
    if meta in LOOPS[1:]:
        return meta, f"metadata flowcache.loop = {meta}"
    if lora_layout == "generator_lora":
        return "longlive", "a LongLive LoRA (its 'generator_lora' entry)"
    name = ck.files[0].name
    for loop, pattern in _RELEASE_NAMES:
        if pattern.search(name):
            return loop, f"the file name {name!r}"
    if ck.layout != "flat":
        return "causal", f"a Self-Forcing / CausVid .pt (read its '{ck.layout}' weights)"
    if "fps_embedding.weight" in keys:
        return "diffusion_forcing", "SkyReels-V2 DF's fps layers"
    if ck.prefix == "model." and dim == KREA_DIM:
        return "krea_realtime", "a 'model.'-prefixed Wan2.1-14B, the layout of Krea Realtime 14B's release"
    if _CAUSAL_NAMES.search(name):
        return "causal", f"the file name {name!r}"
    return "diffusion_forcing", "a Wan2.1 / SkyReels-V2 DiT with nothing marking it causal"


CAUSAL_LOOPS = ("causal", "longlive", "krea_realtime")  # block by block: presets rows of their own


def _wan_dim(tensors: Mapping) -> int | None:
    t = tensors.get("head.modulation")
    return int(t.shape[-1]) if t is not None else None


def _build_wan(ck: Checkpoint, dtype: torch.dtype, options: Mapping[str, str],
               operations: Operations = TORCH_OPERATIONS) -> LoadedModel:
    meta, loop = ck.metadata, options.get("loop", "auto")
    lora_note = None
    lora_layout = None
    if options.get("lora"):
        from .lora import merge_lora, read_lora  # only when a LoRA is given
        lora = read_lora(options["lora"])
        merged = merge_lora(ck.tensors, lora, ck.name, dtype)
        lora_layout = lora.layout
        lora_note = f"LoRA {lora.name} merged into {merged} of its {len(lora.pairs)} modules' weights"
    model = build_wan(ck.tensors, dtype, ck.name, _meta_int(meta, "flowcache.num_heads", ck.name), operations)
    chosen, why = wan_loop(ck, ck.tensors.keys(), loop, lora_layout, _wan_dim(ck.tensors))
    key = _wan_preset_key(meta, {k: tuple(v.shape) for k, v in ck.tensors.items() if k == "head.modulation"})
    if chosen in CAUSAL_LOOPS and "flowcache.model_key" not in meta:
        key += "-causal"  # few-step block-by-block sampling has presets of its own
    lm = LoadedModel("wan", model, model.cfg, ck.name, ck.prefix, ck.main_dtype, key,
                     text_len=_meta_int(meta, "flowcache.text_len", ck.name) or 512, metadata=meta,
                     geometry=_meta_geometry(meta, ck.name) or dict(WAN_GEOMETRY), loop=chosen)
    lm.latent_format = meta.get("flowcache.latent_format", "demo" if key == "demo" else "wan21")
    lm.notes.append(f"{chosen.replace('_', ' ')} loop ({why})")
    if lora_note:
        lm.notes.append(lora_note)
    elif chosen == "longlive":
        lm.notes.append("no LoRA merged: LongLive samples with its lora.pt on the base; pick it on the lora widget")
    if chosen == "krea_realtime":
        lm.notes.append("Krea Realtime was trained at 832x480; other sizes run with their true tokens per frame")
    return lm


def _wan_config(ck: Checkpoint) -> dict:
    return wan_config_from_state_dict(ck.tensors, ck.name, _meta_int(ck.metadata, "flowcache.num_heads",
                                                                      ck.name)).to_dict()


# ---------------------------------------------------------------------------------------------- MAGI-1
def _magi_keys(keys) -> bool:
    return "x_embedder.weight" in keys and any(k.startswith("videodit_blocks.") for k in keys)


MAGI_VARIANTS = ("auto", "distill", "base")


def magi_distill_decision(files: list[Path], meta: Mapping[str, str], choice: str = "auto") -> tuple[bool, str]:
    """(distilled?, why). The released weights tell distill from base only by the name of the folder holding
    them (``inference_weight.distill``), so that folder decides, unless metadata ``flowcache.distill`` says it or
    the loader's ``magi_variant`` is set; never a folder further up the path (``/x/distill_lab/base_model/``
    holds a base model)."""
    if choice not in MAGI_VARIANTS:
        raise CheckpointError(f"magi_variant={choice!r}: must be one of {', '.join(MAGI_VARIANTS)}.")
    if choice != "auto":
        return choice == "distill", "chosen on the loader"
    flag = meta.get("flowcache.distill")
    if flag is not None:
        return flag == "1", f"metadata flowcache.distill = {flag}"
    folder = files[0].parent.name
    if "distill" in folder.lower():
        return True, f"its folder {folder!r} names a distilled model"
    return False, f"its folder {folder!r} does not say 'distill' (set magi_variant to override)"


def _build_magi(ck: Checkpoint, dtype: torch.dtype, options: Mapping[str, str],
                operations: Operations = TORCH_OPERATIONS) -> LoadedModel:
    from . import magi  # imported only when such a file is loaded

    loop = options.get("loop", "auto")
    if loop not in ("auto", "magi"):
        raise CheckpointError(f"loop={loop!r}: {ck.name} is a MAGI-1 DiT, which runs its own chunk-wise loop; "
                              "pick loop = auto for it.")
    model = magi.build_magi(ck, dtype, operations=operations)
    distill, why = magi_distill_decision(ck.files, ck.metadata, options.get("magi_variant", "auto"))
    model.distill = distill
    lm = LoadedModel("magi", model, model.cfg, ck.name, ck.prefix, ck.main_dtype, "magi-4.5B", text_len=800,
                     geometry={**WAN_GEOMETRY, "channels": model.cfg.latent_channels}, metadata=ck.metadata,
                     loop="magi")
    lm.notes.append(f"{'distilled' if distill else 'base'} MAGI-1 ({why})")
    return lm


def _magi_stored_dtype(ck: Checkpoint) -> str:
    from . import magi

    return magi.magi_stored_dtype(ck)


def _magi_config(ck: Checkpoint) -> dict:
    from . import magi

    return dict(magi.magi_config_from_state_dict(ck.tensors, ck.name).__dict__)


@dataclass
class Family:
    """Everything the pack knows about a model family, in one place.

    anchors: bare keys every checkpoint of the family has (they locate a key prefix); detect: whether a set of
    bare keys is this family; preset_key: the presets row from metadata and tensor shapes; build: the model
    from a read checkpoint, its compute dtype and the layer operations to build it from; config: the inferred
    config as a dict (``inspect``); stored_dtype: the dtype that ``dtype=auto`` follows."""

    name: str
    title: str
    anchors: tuple[str, ...]
    detect: Callable[[set], bool]
    preset_key: Callable[[Mapping[str, str], Mapping[str, tuple]], str]
    build: Callable[[Checkpoint, torch.dtype, Mapping[str, str], Operations], LoadedModel]
    config: Callable[[Checkpoint], dict]
    stored_dtype: Callable[[Checkpoint], str] = lambda ck: ck.main_dtype


FAMILIES: dict[str, Family] = {
    "wan": Family("wan", "Wan2.1 / SkyReels-V2 DiT", WAN_ANCHORS, _wan_keys, _wan_preset_key, _build_wan, _wan_config),
    "magi": Family("magi", "MAGI-1 DiT", MAGI_ANCHORS, _magi_keys, lambda meta, shapes: "magi-4.5B", _build_magi,
                   _magi_config, _magi_stored_dtype),
}
ALL_ANCHORS = tuple(a for fam in FAMILIES.values() for a in fam.anchors)


def detect_family(keys) -> str | None:
    keys = set(keys)
    for fam in FAMILIES.values():
        if fam.detect(keys):
            return fam.name
    return None


def _not_a_model(name: str, keys) -> CheckpointError:
    sample = ", ".join(sorted(keys)[:4])
    return CheckpointError(
        f"{name}: not a supported video model. Expected a Wan2.1/SkyReels-V2 DiT (keys like 'head.modulation', "
        f"'blocks.0.self_attn.q.weight') or a MAGI-1 DiT (keys like 'x_embedder.weight'); found keys like {sample}. "
        "A VAE or text encoder goes in its own loader.")


def read_checkpoint(path: str | os.PathLike, weights: str | None = None) -> tuple[Checkpoint, str]:
    """Read a checkpoint and find its family; raise CheckpointError saying what the file is not."""
    ck = load_checkpoint(path, ALL_ANCHORS, weights)
    family = detect_family(ck.tensors.keys())
    if family is None:
        raise _not_a_model(ck.name, ck.tensors)
    return ck, family


def load_model(path: str | os.PathLike, dtype: str = "auto", expect: str | None = None, loop: str = "auto",
               weights: str | None = None, magi_variant: str = "auto",
               operations: Operations = TORCH_OPERATIONS, lora: str | os.PathLike | None = None) -> LoadedModel:
    """Load a checkpoint of any supported family on the CPU.

    dtype: the compute dtype: auto (fp32/bf16/fp16 as stored, bf16 for fp8), fp32, bf16 or fp16.
    expect: a family name; a file of another family raises an error that says so.
    loop: auto, diffusion_forcing or causal (Wan-architecture files; see ``wan_loop``).
    weights: a Self-Forcing / CausVid .pt's generator entry (default generator_ema when present).
    magi_variant: auto, distill or base (MAGI-1 files; see ``magi_distill_decision``).
    operations: the layers to build the model from (torch's; inside ComfyUI its casting layers, with which fp8
        weights stay fp8 in memory and the host may load the model partially).
    lora: a LoRA file merged into the weights before the model is built (``flowcache.models.lora``; LongLive's
        lora.pt). Wan-architecture files only.
    """
    ck, family = read_checkpoint(path, weights)
    if lora and family != "wan":
        raise CheckpointError(f"lora: {ck.name} is a {FAMILIES[family].title}; LoRAs are merged into Wan-architecture "
                              "models only.")
    if expect and family != expect:
        raise CheckpointError(f"{ck.name}: this is a {FAMILIES[family].title} checkpoint, but this loader expects a "
                              f"{FAMILIES[expect].title}. Use the matching loader node.")
    fam = FAMILIES[family]
    lm = fam.build(ck, compute_dtype(dtype, fam.stored_dtype(ck)),
                   {"loop": loop, "magi_variant": magi_variant, "lora": str(lora) if lora else ""}, operations)
    if operations is not TORCH_OPERATIONS:
        lm.notes.append(f"layers: {operations.name}")
    lm.extra_presets, sidecar = model_presets(ck.files, ck.metadata)
    if sidecar is not None:  # `python -m flowcache calibrate` output beside the file
        lm.metadata = {**lm.metadata, "flowcache.preset_file": str(sidecar)}
    return lm


@dataclass
class HeaderFacts:
    """What a checkpoint's headers say without loading a weight: family, presets row and extra presets."""

    files: list[Path]
    family: str
    preset_key: str
    extra_presets: dict
    metadata: dict
    loop: str = "diffusion_forcing"  # the loop ``auto`` picks (MAGI-1: "magi")


def header_facts(path: str | os.PathLike, loop: str = "auto") -> HeaderFacts:
    """``load_model``'s family and presets for a checkpoint, from its headers only (a 28 GB model is not read);
    ``loop``: the loader's choice for Wan files (a causal model has presets rows of its own)."""
    files = checkpoint_files(path)
    shapes, meta = read_headers(files)
    prefix = split_prefix(shapes.keys(), ALL_ANCHORS)
    bare = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    family = detect_family(bare.keys())
    if family is None:
        raise _not_a_model(files[0].name, bare)
    key = FAMILIES[family].preset_key(meta, bare)
    chosen = "magi"
    if family == "wan":
        dim = bare["head.modulation"][-1] if "head.modulation" in bare else None
        chosen = wan_loop(Checkpoint({}, files, prefix, metadata=dict(meta)), bare.keys(), loop, None, dim)[0]
        if "flowcache.model_key" not in meta and chosen in CAUSAL_LOOPS:  # as _build_wan: a causal model's own rows
            key += "-causal"
    extra, _ = model_presets(files, meta)
    return HeaderFacts(files, family, key, extra, meta, chosen)


def inspect_checkpoint(path: str | os.PathLike, weights: str | None = None,
                       lora: str | os.PathLike | None = None) -> dict:
    """What ``python -m flowcache inspect`` prints: family, the loop ``auto`` picks and why, config, dtype and key
    layout. ``lora``: a LoRA to be merged (its layout takes part in the loop's choice; it is not merged here)."""
    ck, family = read_checkpoint(path, weights)
    layout = None
    if lora:
        from .lora import read_lora
        layout = read_lora(lora).layout
    loop, why = (wan_loop(ck, ck.tensors.keys(), "auto", layout, _wan_dim(ck.tensors)) if family == "wan"
                 else ("magi", "a MAGI-1 DiT"))
    return {"file": ck.name, "family": FAMILIES[family].title, "loop": loop, "loop_reason": why,
            "torch_layout": ck.layout, "key_prefix": ck.prefix or "(none)", "tensors": len(ck.tensors),
            "dtypes": ck.dtypes, "parameters": sum(t.numel() for t in ck.tensors.values()),
            "config": FAMILIES[family].config(ck)}


__all__ = ["MAGI_ANCHORS", "MAGI_VARIANTS", "LOOPS", "CAUSAL_LOOPS", "wan_loop", "LoadedModel", "load_model", "header_facts", "HeaderFacts", "inspect_checkpoint", "detect_family",
           "FAMILIES", "Family", "WanDiT", "magi_distill_decision"]
