"""The slow/fast preset values a checkpoint file gets, read from its headers only (no weights loaded).

The loader resolves presets after loading; the frontend wants the same numbers before anything runs, for
a file that may hold 28 GB. This reads what decides them: the key names (family), one tensor shape (the
Wan size), the safetensors metadata (a model key or embedded presets) and a calibrated ``.presets.json``
beside the file, then asks ``resolve_settings`` exactly as the sampler will.
"""
from __future__ import annotations

import os
from pathlib import Path

from .cache import resolve_settings
from .cache.presets import load_presets
from .checkpoint import checkpoint_files, read_safetensors_header, split_prefix
from .errors import CheckpointError, InputError
from .models import (FAMILIES, MAGI_PRESET_KEY, detect_family, embedded_presets, preset_sidecar, wan_preset_key,
                     with_sidecar_presets)

SHOWN_MODES = ("teacache", "flowcache")
SHOWN_PRESETS = ("slow", "fast")


def _headers(path: str | os.PathLike) -> tuple[list[Path], dict[str, list[int]], dict[str, str]]:
    """(files, key -> shape, merged metadata) of a safetensors checkpoint, each header validated first."""
    files = checkpoint_files(path)
    shapes: dict[str, list[int]] = {}
    meta: dict[str, str] = {}
    for f in files:
        if f.suffix != ".safetensors" and not f.name.endswith(".sft"):
            raise CheckpointError(f"{f.name}: presets can be read ahead only from .safetensors files.")
        file_shapes, file_meta = read_safetensors_header(f)
        meta.update(file_meta)
        shapes.update(file_shapes)
    return files, shapes, meta


def _checked_presets(table: object, where: str) -> dict:
    """A preset table (model key -> entry with 'coefficients'), or CheckpointError naming where it came from."""
    if not isinstance(table, dict) or not all(isinstance(v, dict) and "coefficients" in v for v in table.values()):
        raise CheckpointError(f"{where}: expected a JSON object of model keys to preset entries, each with "
                              "'coefficients' (as `python -m flowcache calibrate` writes).")
    return table


def preset_key_of_file(path: str | os.PathLike) -> tuple[str, dict]:
    """(presets-table key, extra preset entries) that ``load_model`` would give this checkpoint."""
    files, shapes, meta = _headers(path)
    anchors = tuple(a for fam in FAMILIES.values() for a in fam.anchors)
    prefix = split_prefix(shapes.keys(), anchors)
    bare = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    family = detect_family(bare.keys())
    if family is None:
        raise CheckpointError(f"{files[0].name}: not a supported video model (no Wan2.1 or MAGI-1 keys).")
    # as the family builders in flowcache.models do: Wan reads embedded presets and its size, MAGI-1 neither
    extra: dict = {}
    if family == "wan":
        where = f"{files[0].name}: metadata 'flowcache.presets'"
        try:
            extra = _checked_presets(embedded_presets(meta), where)
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{where} is not valid JSON ({str(e)[:120]}).") from e
        modulation = bare.get("head.modulation") or [0]
        key = wan_preset_key(meta, modulation[-1])
    else:
        key = MAGI_PRESET_KEY
    sidecar = preset_sidecar(files[0])
    if sidecar.is_file():
        try:
            extra = with_sidecar_presets(extra, sidecar)
        except (AttributeError, TypeError, ValueError, RecursionError) as e:  # e.g. a JSON list, not an object
            raise CheckpointError(f"{sidecar.name}: not a readable preset file ({type(e).__name__}).") from e
        extra = _checked_presets(extra, sidecar.name)
    return key, extra


def preset_rows(path: str | os.PathLike) -> dict:
    """``{"key", "known", "rows": {mode: {preset: {threshold, warmup, kv_budget, mix_lambda}}}}`` for a
    checkpoint: what FlowCache Sampler will use for each named preset. ``known`` is False (and ``rows``
    empty) for a model with no presets yet; ``hint`` then says how to make them."""
    key, extra = preset_key_of_file(path)
    if key not in load_presets(extra):
        return {"key": key, "known": False, "rows": {},
                "hint": "no presets for this model yet: run `python -m flowcache calibrate CHECKPOINT`."}
    rows: dict = {}
    for mode in SHOWN_MODES:
        for preset in SHOWN_PRESETS:
            try:
                s = resolve_settings(key, mode, preset, extra_presets=extra)
            except (InputError, KeyError):
                continue  # the entry has no such mode or preset
            except (TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(f"presets for {key!r}: the {mode}/{preset} entry is malformed "
                                      f"({type(e).__name__}: {str(e)[:120]}).") from e
            rows.setdefault(mode, {})[preset] = {"threshold": s.threshold, "warmup": s.warmup,
                                                 "kv_budget": s.kv_budget, "mix_lambda": s.mix_lambda}
    return {"key": key, "known": True, "rows": rows}
