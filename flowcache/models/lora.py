"""LoRA weights merged into a model's weights at load: W' = W + (alpha / rank)·B·A.

Read safely (safetensors, or ``torch.load(weights_only=True)`` through ``flowcache.checkpoint``). Accepted
layouts: peft's (``base_model.model.<module>.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r], optionally
``lora_A.default.weight``), with or without a wrapper entry (LongLive's ``lora.pt`` is
``{'generator_lora': {...}}``), ComfyUI's ``<module>.lora_down.weight`` (A) / ``lora_up.weight`` (B) (what
``python -m flowcache convert longlive-lora`` writes), and the same names behind any known key prefix
(``model.``, ``diffusion_model.``). The scale is alpha / rank: a ``<module>.alpha`` tensor when the file has one, else the
``alpha`` given (None: alpha = rank, scale 1, as LongLive's rank 256 / alpha 256).

A LoRA whose keys match no weight of the base is refused, with the count of matched keys, so a LoRA for another
model is never silently ignored.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import KNOWN_PREFIXES, load_checkpoint
from ..errors import CheckpointError

LORA_WRAPPERS = ("generator_lora",)  # LongLive's lora.pt: the peft state dict under this entry
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB]|up|down)(?:\.default)?\.weight$")
_SIDES = {"A": "A", "B": "B", "down": "A", "up": "B"}  # ComfyUI's / kohya's lora_down = A, lora_up = B


@dataclass
class LoRA:
    """Pairs per module name (bare, as the base model's keys say it without ``.weight``): (A [r, in], B [out, r],
    scale)."""

    name: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    layout: str


def _bare(module: str) -> str:
    for pre in ("base_model.model.",) + KNOWN_PREFIXES:
        if module.startswith(pre):
            module = module[len(pre):]
            break
    return module


def read_lora(path: str | os.PathLike, alpha: float | None = None) -> LoRA:
    """The LoRA pairs of a file; CheckpointError naming the file when it holds none or they are malformed."""
    ck = load_checkpoint(path, (), entries=LORA_WRAPPERS)
    name = Path(path).name
    raw: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, t in ck.tensors.items():
        m = _PAIR.match(key)
        if m:
            raw.setdefault(_bare(m["module"]), {})[_SIDES[m["side"]]] = t
        elif key.endswith(".alpha") and t.numel() == 1:
            alphas[_bare(key[:-len(".alpha")])] = float(t)
    if not raw:
        sample = ", ".join(sorted(ck.tensors)[:3])
        raise CheckpointError(f"{name}: not a LoRA: no '<module>.lora_A.weight' / 'lora_B.weight' (or "
                              f"'lora_down' / 'lora_up') pairs (found keys like {sample}).")
    pairs = {}
    for module, sides in raw.items():
        if set(sides) != {"A", "B"}:
            raise CheckpointError(f"{name}: LoRA module {module!r} has lora_{''.join(sides)} only; both lora_A and "
                                  "lora_B are needed.")
        a, b = sides["A"], sides["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{name}: LoRA module {module!r}: lora_A {tuple(a.shape)} and lora_B "
                                  f"{tuple(b.shape)} are not [rank, in] and [out, rank].")
        rank = a.shape[0]
        pairs[module] = (a, b, alphas.get(module, rank if alpha is None else alpha) / rank)
    return LoRA(name, pairs, ck.layout)


def merge_lora(weights: dict[str, torch.Tensor], lora: LoRA, base_name: str, dtype: torch.dtype | None = None) -> int:
    """Add each pair's B·A·scale to ``weights[<module>.weight]`` in place, computed in fp32 and kept in ``dtype``
    (the compute dtype the model will run in; None: the weight's own). Kept in the compute dtype, not the stored
    one: an fp16/bf16 file's weight rounded back to its own dtype would round much of a small LoRA away, where
    the unmerged LoRA of the official inference adds it in the compute dtype. fp8 weights are refused. Returns the
    number of modules merged; CheckpointError when none matches the base or a shape differs."""
    matched = [m for m in lora.pairs if f"{m}.weight" in weights]
    if not matched:
        example = next(iter(lora.pairs))
        raise CheckpointError(f"lora: {lora.name} matches 0 of its {len(lora.pairs)} modules in {base_name} (e.g. "
                              f"{example!r} has no weight there); it is a LoRA for another model.")
    for m in matched:
        a, b, scale = lora.pairs[m]
        w = weights[f"{m}.weight"]
        if w.dtype.itemsize == 1:
            raise CheckpointError(f"lora: {base_name} holds {m}.weight in {w.dtype}; merge {lora.name} into a bf16 or "
                                  "fp32 base, or apply it through ComfyUI's LoRA loader on the native path.")
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise CheckpointError(f"lora: {lora.name} module {m!r} is [{b.shape[0]}, {a.shape[1]}] but {base_name}'s "
                                  f"weight is {list(w.shape)}.")
        weights[f"{m}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(dtype or w.dtype)
    return len(matched)


__all__ = ["LoRA", "LORA_WRAPPERS", "merge_lora", "read_lora"]
