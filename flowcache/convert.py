"""``python -m flowcache convert``: released LongLive v1.0 files as safetensors that ComfyUI's own loaders read.

ComfyUI cannot read LongLive's release files as they are: ``longlive_base.pt`` is ``{'generator': {'model.' +
Wan2.1 keys}}`` and ``lora.pt`` is ``{'generator_lora': {peft keys}}``. The conversions:

* ``longlive-lora``: each peft pair ``base_model.model.<module>.lora_A.weight`` [r, in] / ``lora_B.weight``
  [out, r] becomes ComfyUI's LoRA layout for the Wan2.1 diffusion model, ``diffusion_model.<module>.lora_down.weight``
  (A), ``.lora_up.weight`` (B) and ``.alpha`` = scale·rank, so that ComfyUI's LoRA loaders (LoraLoaderModelOnly)
  add strength·(alpha/rank)·B·A, the pack's merge at strength 1 (``flowcache.models.lora``; LongLive's rank 256,
  alpha 256: scale 1). Every module must be one of Wan2.1's Linear layers (ComfyUI maps
  ``diffusion_model.<module>`` onto the model's ``<module>.weight``, ``comfy.lora.model_lora_keys_unet``).
* ``longlive-base``: the generator's weights with bare Wan2.1 keys (the layout of ComfyUI's repackaged Wan files,
  which Load Diffusion Model reads), metadata ``flowcache.loop = longlive`` so that FlowCache Sampler and FlowCache
  Load Model run LongLive's loop whatever the file is called.

Inputs are read safely (safetensors, or ``torch.load(weights_only=True)``: a pickle that would run code is refused).
The output is written only where asked, complete or not at all (a temporary file beside it, renamed when done), and
an existing file is kept unless ``force``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import DTYPE_NAMES, save_safetensors
from .errors import CheckpointError, InputError

KINDS = ("longlive-lora", "longlive-base")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Wan2.1's Linear layers (a LoRA targets these): attention q/k/v/o (k_img/v_img: image-to-video), the FFN, the
# text and time embeddings, the output head
WAN_LINEAR = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)|blocks\.\d+\.ffn\.[02]|"
                        r"text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|head\.head)$")


@dataclass
class Converted:
    """What a conversion wrote: the file, its tensors and bytes, and a line for the user."""

    path: Path
    tensors: int
    bytes: int
    summary: str


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    if not src.is_file():
        raise InputError(f"{src}: no such file.")
    if dst.suffix != ".safetensors":
        raise InputError(f"{dst.name}: the output must be a .safetensors file (what ComfyUI's loaders list).")
    if not dst.parent.is_dir():
        raise InputError(f"{dst.parent}: no such folder for the output.")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"{dst.name}: the output would replace the input; name another file.")
    if dst.exists() and not force:
        raise InputError(f"{dst}: exists; pass --force to replace it.")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.detach().contiguous().clone()  # safetensors refuses tensors sharing storage


def _write(tensors: dict[str, torch.Tensor], dst: Path, metadata: dict[str, str]) -> int:
    """Write ``tensors`` to ``dst`` complete or not at all; its size in bytes."""
    return save_safetensors(tensors, dst, metadata).stat().st_size


def convert_longlive_lora(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
                          force: bool = False) -> Converted:
    """LongLive's ``lora.pt`` (or any peft LoRA of a Wan2.1 DiT) -> ComfyUI's LoRA layout; see the module docstring."""
    from .models.lora import read_lora

    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, force)
    lora = read_lora(src)
    bad = sorted(m for m in lora.pairs if not WAN_LINEAR.match(m))
    if bad:
        raise CheckpointError(f"{src.name}: LoRA module {bad[0]!r} is not a Linear layer of the Wan2.1 diffusion model "
                              f"({len(bad)} of {len(lora.pairs)} modules are not); this converter writes Wan2.1 LoRAs "
                              "only.")
    cast = DTYPES[dtype] if dtype else None
    out: dict[str, torch.Tensor] = {}
    for m in sorted(lora.pairs):
        a, b, scale = lora.pairs[m]
        key = f"diffusion_model.{m}"
        out[f"{key}.lora_down.weight"] = _cast(a, cast)
        out[f"{key}.lora_up.weight"] = _cast(b, cast)
        out[f"{key}.alpha"] = torch.tensor(float(scale * a.shape[0]), dtype=torch.float32)
    ranks = sorted({a.shape[0] for a, _, _ in lora.pairs.values()})
    scales = sorted({s for _, _, s in lora.pairs.values()})
    size = _write(out, dst, {"flowcache.converted_from": src.name, "flowcache.lora_layout": lora.layout})
    return Converted(dst, len(out), size, f"{dst.name}: {len(lora.pairs)} LoRA modules (rank "
                                          f"{'/'.join(map(str, ranks))}, scale {'/'.join(f'{s:g}' for s in scales)}) "
                                          f"from {src.name}'s '{lora.layout}' entry, in ComfyUI's diffusion_model. "
                                          "layout (LoraLoaderModelOnly at strength 1 = the pack's merge)")


def convert_longlive_base(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
                          force: bool = False) -> Converted:
    """LongLive's ``longlive_base.pt`` (its generator's weights) -> bare Wan2.1 keys, metadata flowcache.loop =
    longlive; see the module docstring."""
    from .models import read_checkpoint

    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, force)
    ck, family = read_checkpoint(src)
    if family != "wan":
        raise CheckpointError(f"{src.name}: a {family} checkpoint; longlive-base converts a Wan2.1 (LongLive) DiT.")
    cast = DTYPES[dtype] if dtype else None
    out = {k: _cast(v, cast) for k, v in ck.tensors.items()}
    held = sorted({DTYPE_NAMES.get(v.dtype, str(v.dtype)) for v in out.values()})
    size = _write(out, dst, {"flowcache.loop": "longlive", "flowcache.converted_from": src.name})
    return Converted(dst, len(out), size, f"{dst.name}: {len(out)} tensors ({', '.join(held)}) from {src.name} "
                                          f"({ck.layout} weights, key prefix {ck.prefix or '(none)'} removed), "
                                          "metadata flowcache.loop = longlive")


def convert(kind: str, src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None,
            force: bool = False) -> Converted:
    if kind not in KINDS:
        raise InputError(f"kind={kind!r}: one of {', '.join(KINDS)}.")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)} (default: as stored).")
    fn = convert_longlive_lora if kind == "longlive-lora" else convert_longlive_base
    return fn(src, dst, dtype, force)


__all__ = ["Converted", "KINDS", "WAN_LINEAR", "convert", "convert_longlive_base", "convert_longlive_lora"]
