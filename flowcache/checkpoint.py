"""Reading model checkpoints: one safetensors file, shards with an index json, or a torch file.

Only safe formats are read: safetensors, or ``torch.load(weights_only=True)``. The functions here know
nothing about model families; ``flowcache.models.detect_family`` decides what a set of keys is.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from .errors import CheckpointError

# Key prefixes seen in the wild, longest first (ComfyUI packaging, Self-Forcing wrappers, ...).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "model.", "net.")

DTYPE_NAMES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    getattr(torch, "float8_e4m3fn", None): "fp8_e4m3fn", getattr(torch, "float8_e5m2", None): "fp8_e5m2",
}


@dataclass
class Checkpoint:
    """A loaded state dict with what was learned about its layout.

    ``tensors`` has the bare keys (prefix removed). ``files`` are the files read, ``prefix`` the stripped key
    prefix ('' when bare), ``dtypes`` counts tensors per storage dtype name.
    """

    tensors: dict[str, torch.Tensor]
    files: list[Path]
    prefix: str = ""
    dtypes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.files[0].name if len(self.files) == 1 else f"{self.files[0].parent.name} ({len(self.files)} shards)"

    @property
    def main_dtype(self) -> str:
        return max(self.dtypes.items(), key=lambda kv: kv[1])[0] if self.dtypes else "unknown"


def _check_safetensors_header(path: Path) -> None:
    """Fail early, with the file's name, on files that are not safetensors or are cut short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: file is only {size} bytes; it is not a safetensors file (truncated or empty).")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > min(size - 8, 100 * 1024 * 1024):
            raise CheckpointError(
                f"{path.name}: not a safetensors file (bad header length). Use a .safetensors checkpoint, "
                "or a torch file that loads with weights_only=True.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path.name}: safetensors header is not valid JSON ({e}); the file is damaged.") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name}: truncated: the header promises {8 + n + end} bytes but the file has {size}. "
            "Download it again.")


def _read_safetensors(path: Path, out: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta.update(f.metadata() or {})
            for k in f.keys():
                if k in out:
                    raise CheckpointError(f"{path.name}: key {k!r} appears in more than one shard.")
                out[k] = f.get_tensor(k)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path.name}: could not be read as safetensors: {e}") from e


def _read_torch(path: Path, out: dict[str, torch.Tensor]) -> None:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(
            f"{path.name}: not loadable as a weights-only torch file ({type(e).__name__}: {str(e)[:200]}). "
            "Only safetensors and plain tensor dicts are accepted.") from e
    # Self-Forcing / CausVid wrap the weights: prefer the EMA copy when present.
    for wrapper in ("generator_ema", "generator", "state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name}: does not hold a flat dict of tensors.")
    out.update(obj)


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files that make up a checkpoint: a file, a shard index json, or a folder of shards."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder.")
    if p.is_dir():
        idx = sorted(p.glob("*.safetensors.index.json"))
        if idx:
            return checkpoint_files(idx[0])
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{p}: folder holds no .safetensors files.")
        return files
    if p.name.endswith(".index.json"):
        try:
            index = json.loads(p.read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{p.name}: not a shard index (expected a json with a 'weight_map').") from e
        files = [p.parent / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{p.name}: shards missing next to the index: {', '.join(missing[:5])}.")
        return files
    index = shard_index_of(p)
    return checkpoint_files(index) if index is not None else [p]


def shard_index_of(path: Path) -> Path | None:
    """The ``*.index.json`` beside ``path`` whose weight map names it, i.e. ``path`` is one shard of several.

    ComfyUI lists every shard of a sharded model (e.g. ``model-00001-of-00002.safetensors``); picking any of
    them loads the whole model.
    """
    for idx in sorted(path.parent.glob("*.index.json")):
        try:
            names = set(json.loads(idx.read_text()).get("weight_map", {}).values())
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if path.name in names and len(names) > 1:
            return idx
    return None


def split_prefix(keys: Iterable[str], anchors: Iterable[str]) -> str:
    """The prefix in front of the model's own key names; ``anchors`` are bare keys a model always has."""
    keys = list(keys)
    anchors = list(anchors)
    for pre in KNOWN_PREFIXES:
        if any(pre + a in keys for a in anchors):
            return pre
    return ""


def load_checkpoint(path: str | os.PathLike, anchors: Iterable[str] = ()) -> Checkpoint:
    """Read every tensor of a checkpoint on the CPU and strip a known key prefix.

    ``anchors`` are bare key names used to find the prefix; keys outside that prefix (a VAE or text encoder
    packed into the same file) are dropped.
    """
    files = checkpoint_files(path)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for f in files:
        if f.suffix == ".safetensors" or f.name.endswith(".sft"):
            _read_safetensors(f, tensors, meta)
        elif f.suffix in (".pt", ".pth", ".ckpt", ".bin"):
            _read_torch(f, tensors)
        else:
            raise CheckpointError(f"{f.name}: unsupported file type {f.suffix!r}; use .safetensors (or .pt/.pth weights).")
    if not tensors:
        raise CheckpointError(f"{files[0].name}: holds no tensors.")
    prefix = split_prefix(tensors.keys(), anchors)
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    dtypes: dict[str, int] = {}
    for v in tensors.values():
        name = DTYPE_NAMES.get(v.dtype, str(v.dtype).replace("torch.", ""))
        dtypes[name] = dtypes.get(name, 0) + 1
    return Checkpoint(tensors=tensors, files=files, prefix=prefix, dtypes=dtypes, metadata=meta)


def compute_dtype(choice: str, stored: str) -> torch.dtype:
    """The dtype to run in. ``auto`` keeps fp32/bf16/fp16 weights as stored and upcasts fp8 to bf16."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if choice == "auto":
        return table.get(stored, torch.bfloat16)
    if choice not in table:
        raise CheckpointError(f"dtype {choice!r} is not one of auto, fp32, bf16, fp16.")
    return table[choice]


def read_headers(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, merged metadata) of safetensors files, from their headers only (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    meta: dict[str, str] = {}
    for f in files:
        if f.suffix != ".safetensors" and not f.name.endswith(".sft"):
            raise CheckpointError(f"{f.name}: presets can be read ahead only from .safetensors files.")
        _check_safetensors_header(f)
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                meta.update(sf.metadata() or {})
                shapes.update((k, tuple(sf.get_slice(k).get_shape())) for k in sf.keys())
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f.name}: could not be read as safetensors: {e}") from e
    return shapes, meta
