"""Cache presets, in one place: the built-in table, a model's embedded metadata, and a calibrated sidecar file.

A preset table maps a model key (``wan-1.3B``, ``magi-4.5B``, ``demo``, or a calibrated model's own key) to
an entry::

    {"coefficients": [...],                       # model-level values any method's config may take
     "flowcache": {"slow": {"threshold": 0.1, "warmup": 5, "kv_budget": 0}, "fast": {...}, "turbo": {...}},
     "teacache":  {"slow": {...}, "fast": {...}}}

Named presets are rows of data, never code branches: ``slow``, ``fast`` and ``turbo`` (``NAMED_PRESETS``); a
method or model may lack a row, and asking for it is an ``InputError`` that says which rows exist. How a row is
picked, where it is picked from data (the demo model's rows; the released models' slow/fast rows are the published
thresholds, see ``presets.json``): ``bench --sweep`` on the model's calibration prompts, never its benchmark
prompts, and per method the setting with the highest PSNR at >= ``PRESET_FLOPS_TARGETS[preset]`` times fewer
FLOPs than the uncached loop (slow 3x, fast 4x, turbo 6x); where no setting of the sweep reaches it, the fastest.
``turbo`` exists only where that sweep was run (``bench --sweep --grid turbo --calibration-prompts``): no
released model has one, since their calibration runs are not part of the pack.

Sources, later ones winning: ``flowcache/presets.json``, the checkpoint's ``flowcache.presets`` metadata
(``calibrate --embed``), and ``<checkpoint>.presets.json`` beside it (``calibrate``'s default output).
``resolve_cache`` turns a method, a preset name and the widget values into ``CacheSettings``; presets are
looked up only when a method needs them, so ``off`` runs any model.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .cache.magcache import ratios_are_valid
from .cache.cfg import CFG_REUSE
from .cache.registry import ATTENTION, KV_DTYPES, KV_PLACEMENTS, METHODS, REUSE, CacheSettings, method
from .errors import CheckpointError, InputError

log = logging.getLogger("FlowCache")

PRESET_NAMES = ("slow", "fast", "turbo", "custom")
NAMED_PRESETS = ("slow", "fast", "turbo")
# The rule a named preset is picked by from ``bench --sweep`` on a model's calibration prompts (never its benchmark
# prompts): per method, the setting with the highest PSNR at >= this many times fewer FLOPs than the uncached loop;
# where no setting of the sweep reaches it, the fastest one. ``bench.pick_presets`` applies it.
PRESET_FLOPS_TARGETS: dict[str, float] = {"slow": 3.0, "fast": 4.0, "turbo": 6.0}
BUILTIN_PRESETS = Path(__file__).resolve().parent / "presets.json"
METADATA_KEY = "flowcache.presets"
# A calibrated model's entry starts from its family's released row: the paper's thresholds, refitted rescale.
SHARED_VALUES = ("coefficients", "mag_ratios")
CHOICES = {"attention": ATTENTION, "reuse": REUSE, "cfg_reuse": CFG_REUSE}  # fields of an entry or row that are words


def _bad(source: str, where: str, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: {where}: {why}")


def check_table(table: object, source: str) -> dict:
    """A preset table with every entry checked: a dict of model key -> dict; method sections hold presets of
    finite numbers. Raises CheckpointError naming ``source`` and the bad field."""
    if not isinstance(table, dict):
        raise _bad(source, "presets", f"must be a JSON object of model entries, got {type(table).__name__}")
    out = {}
    for key, entry in table.items():
        if key == "_doc":
            continue
        if not isinstance(entry, dict):
            raise _bad(source, f"entry {key!r}", f"must be an object, got {type(entry).__name__}")
        coef = entry.get("coefficients")
        if not isinstance(coef, list) or not coef or not all(_number(c) for c in coef):
            raise _bad(source, f"entry {key!r} field 'coefficients'", "must be a non-empty list of numbers")
        if not ratios_are_valid(entry.get("mag_ratios", {})):
            raise _bad(source, f"entry {key!r} field 'mag_ratios'", "must map branches to lists of positive numbers")
        for name, section in entry.items():
            if name not in METHODS:
                continue
            if not isinstance(section, dict):
                raise _bad(source, f"entry {key!r} field {name!r}", "must be an object of presets")
            for preset, values in section.items():
                if not isinstance(values, dict) or not all(_number(v) for k, v in values.items() if k not in CHOICES):
                    raise _bad(source, f"entry {key!r} field {name}.{preset}", "must be an object of numbers")
                for field_name, allowed in CHOICES.items():
                    if field_name in values and values[field_name] not in allowed:
                        raise _bad(source, f"entry {key!r} field {name}.{preset}.{field_name}",
                                   f"must be one of {', '.join(allowed)}")
        for field_name, allowed in CHOICES.items():
            if field_name in entry and entry[field_name] not in allowed:
                raise _bad(source, f"entry {key!r} field {field_name!r}", f"must be one of {', '.join(allowed)}")
        out[key] = entry
    return out


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def builtin_presets() -> dict:
    """The table shipped in ``flowcache/presets.json``."""
    return check_table(json.loads(BUILTIN_PRESETS.read_text()), BUILTIN_PRESETS.name)


def embedded_presets(metadata: Mapping[str, str], source: str) -> dict:
    """Entries stored in a checkpoint's safetensors metadata by ``calibrate --embed`` (empty if none)."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        table = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise _bad(source, f"metadata {METADATA_KEY!r}", f"is not valid JSON ({e})") from None
    return check_table(table, f"{source} metadata {METADATA_KEY!r}")


def preset_sidecar(checkpoint_file: str | os.PathLike) -> Path:
    """Where ``python -m flowcache calibrate`` writes a model's presets by default: ``<file stem>.presets.json``
    beside the checkpoint. The loader reads it, so a calibrated model gets its presets in every node."""
    p = Path(checkpoint_file)
    return p.with_name(p.name.split(".")[0] + ".presets.json")


def read_preset_file(path: str | os.PathLike) -> dict:
    """A preset json (calibrate's output), checked."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name}: not a readable preset file ({e}).") from None
    return check_table(table, path.name)


def model_presets(files: list[Path], metadata: Mapping[str, str]) -> tuple[dict, Path | None]:
    """(extra entries, sidecar file read or None) for a checkpoint made of ``files`` with ``metadata``."""
    extra = embedded_presets(metadata, files[0].name)
    sidecar = preset_sidecar(files[0])
    if not sidecar.is_file():
        return extra, None
    return {**extra, **read_preset_file(sidecar)}, sidecar


def write_preset_file(path: str | os.PathLike, presets: dict) -> Path:
    """Write (atomically) a preset json; entries already in the file for other models are kept."""
    path = Path(path)
    table = {}
    if path.exists():
        try:
            table = check_table(json.loads(path.read_text()), path.name)
        except (json.JSONDecodeError, CheckpointError):
            log.warning("FlowCache: %s was not a valid preset file; it is replaced.", path)
    table.update(check_table(presets, "new presets"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def embed_presets(checkpoint: str | os.PathLike, presets: dict) -> Path:
    """Merge ``presets`` into a safetensors file's ``flowcache.presets`` metadata (other metadata kept).

    The file is rewritten to a temporary file next to it and moved over the original with ``os.replace``,
    so a crash never leaves a half-written checkpoint.
    """
    from safetensors import safe_open

    from .checkpoint import save_safetensors

    path = Path(checkpoint)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path.name}: presets can only be embedded in a .safetensors file.")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    table = embedded_presets(meta, path.name)
    table.update(check_table(presets, "new presets"))
    meta[METADATA_KEY] = json.dumps(table)
    return save_safetensors(tensors, path, meta)


def calibrated_entry(base_key: str, fitted: dict[str, Any], calibration: dict) -> dict:
    """A calibrated model's entry: the released row ``base_key`` (its methods' slow/fast thresholds, as the
    paper publishes them) with the fitted model-level values (e.g. coefficients) and the calibration facts."""
    base = json.loads(json.dumps(builtin_presets()[base_key]))  # a deep copy
    base.update(fitted)
    base["calibration"] = calibration
    return base


CALIBRATE_HINT = "`python -m flowcache calibrate CHECKPOINT`"


def _no_presets(model_key: str, method_name: str, preset: str, entry: dict | None = None) -> InputError:
    """The error for a named preset the model lacks: the rows it has instead, when it has any (else how to get
    presets at all); a missing turbo row says that turbo needs a calibration sweep of its own."""
    have = [p for p in NAMED_PRESETS if isinstance((entry or {}).get(method_name, {}).get(p), dict)]
    if have:
        why = f"its {method_name} presets are {', '.join(have)}"
        if preset == "turbo":
            why += (f"; turbo needs calibration of its own, which this model has not had for {method_name}: a "
                    f"row picked from `python -m flowcache bench --sweep --grid turbo` run on it (the highest PSNR "
                    f"at >= {PRESET_FLOPS_TARGETS['turbo']:g}x fewer FLOPs, on calibration prompts)")
        return InputError(f"preset={preset!r}: model {model_key!r} has no {method_name} {preset} preset; {why}. "
                          f"Pick one of those, or preset = custom with your own values.")
    return InputError(
        f"preset={preset!r}: model {model_key!r} has no {method_name} {preset} preset; expected preset = custom, "
        f"or a model with presets: {CALIBRATE_HINT} makes them (a preset file beside the checkpoint). "
        f"{NO_PRESETS_METHOD} with preset = custom needs no calibration (and is what FlowCache Sampler runs "
        "with no FlowCache Cache node connected).")


def resolve_cache(model_key: str, method_name: str, preset: str, extra: dict | None = None,
                  **custom: Any) -> CacheSettings:
    """Turn widget values into settings. Named presets take the table's values and ignore ``custom``;
    ``custom`` starts from the slow preset (if the model has one) and applies the given values.

    ``custom`` keys are config field names (``threshold``, ``warmup``, ...), ``kv_budget`` and ``mix_lambda``;
    ones the method does not have are ignored, so one set of widgets serves every method.
    """
    m = method(method_name)
    if preset not in PRESET_NAMES:
        raise InputError(f"preset={preset!r}: must be one of {', '.join(PRESET_NAMES)}.")
    custom = {k: v for k, v in custom.items() if v is not None}
    names = [f.name for f in fields(m.config)]
    values: dict[str, Any] = {}
    kv: dict[str, Any] = {"kv_budget": 0, "mix_lambda": 0.07, "attention": "block_causal", "reuse": "hold",
                          "cfg_reuse": "off", "cfg_interval": 2}
    if names:  # methods with settings need the model's presets
        table = {**builtin_presets(), **(extra or {})}
        entry = table.get(model_key)
        if entry is None and preset != "custom":
            raise _no_presets(model_key, method_name, preset)
        if entry is None:
            if set(SHARED_VALUES) & set(names):  # only methods with model-level values lack something
                log.warning("FlowCache: model %r has no presets; custom %s runs without a calibrated rescale "
                            "(identity). %s fits one.", model_key, method_name, CALIBRATE_HINT)
            entry = {}
        section = entry.get(method_name, {})
        named = section.get("slow" if preset == "custom" else preset)
        if named is None and preset != "custom":
            raise _no_presets(model_key, method_name, preset, entry)
        for shared in SHARED_VALUES:
            if shared in names and shared in entry:
                values[shared] = json.loads(json.dumps(entry[shared]))  # a copy
        for choice in CHOICES:  # the model's chunk-path attention and reuse, chosen by the benchmark
            if isinstance(entry.get(choice), str):
                kv[choice] = entry[choice]
        for k, v in (named or {}).items():  # a preset row's own attention / reuse, if any, wins
            if k in names:
                values[k] = v
            elif k in kv:
                kv[k] = v
    if preset == "custom" or not names:
        values.update({k: v for k, v in custom.items() if k in names and k not in SHARED_VALUES})
        kv.update({k: v for k, v in custom.items() if k in kv})
    return CacheSettings(method_name, m.config(**values), preset, kv["kv_budget"], kv["mix_lambda"], model_key,
                         kv["attention"], kv["reuse"], cfg_reuse=kv["cfg_reuse"], cfg_interval=kv["cfg_interval"])


def preset_rows(model_key: str, extra: dict | None = None) -> dict:
    """``{"key", "known", "rows": {method: {preset: {field: value, ..., kv_budget, mix_lambda}}}}``: what the
    sampler uses for each named preset of each method with settings. ``known`` is False (and ``hint`` says
    how to fix it) for a model with no presets yet."""
    table = {**builtin_presets(), **(extra or {})}
    if model_key not in table:
        return {"key": model_key, "known": False, "rows": {},
                "hint": "no presets for this model yet: run `python -m flowcache calibrate CHECKPOINT`."}
    rows: dict = {}
    for name, m in METHODS.items():
        if not fields(m.config):
            continue
        for preset in NAMED_PRESETS:
            try:
                s = resolve_cache(model_key, name, preset, extra)
            except InputError:
                continue
            shown = {k: v for k, v in s.to_dict().items()
                     if k not in ("method", "preset", "model_key", "kv_placement", "kv_dtype")  # not preset values
                     and k not in SHARED_VALUES}
            rows.setdefault(name, {})[preset] = shown
    return {"key": model_key, "known": True, "rows": rows}


__all__ = ["PRESET_NAMES", "NAMED_PRESETS", "PRESET_FLOPS_TARGETS", "CacheRequest", "DEFAULT_REQUEST",
           "NO_PRESETS_METHOD", "default_request", "has_presets",
           "resolve_cache", "preset_rows", "builtin_presets", "embedded_presets", "model_presets",
           "read_preset_file", "write_preset_file", "embed_presets", "preset_sidecar", "calibrated_entry",
           "check_table"]


@dataclass(frozen=True)
class CacheRequest:
    """What a FlowCache Cache node asks for, before a model is known: a method, a preset, and (for ``custom``)
    the widget values by config field name. ``resolve`` applies it to a model's presets."""

    method: str = "flowcache"
    preset: str = "slow"
    values: tuple[tuple[str, Any], ...] = ()
    attention: str | None = None  # None: the model's presets choose
    reuse: str | None = None      # None: the model's presets choose
    kv_placement: str = "auto"    # where stored K/V live (``flowcache.plan``)
    kv_dtype: str = "auto"
    cfg_reuse: str | None = None     # None: the model's presets choose (off unless a row says otherwise)
    cfg_interval: int | None = None

    def __post_init__(self) -> None:
        method(self.method)
        if self.preset not in PRESET_NAMES:
            raise InputError(f"preset={self.preset!r}: must be one of {', '.join(PRESET_NAMES)}.")
        for name, value, allowed in (("kv_placement", self.kv_placement, KV_PLACEMENTS),
                                     ("kv_dtype", self.kv_dtype, KV_DTYPES)):
            if value not in allowed:
                raise InputError(f"FlowCache Cache: {name}={value!r}: must be one of {', '.join(allowed)}.")

    def resolve(self, model_key: str, extra: dict | None = None) -> CacheSettings:
        settings = resolve_cache(model_key, self.method, self.preset, extra, **dict(self.values))
        return replace(settings, attention=self.attention or settings.attention, reuse=self.reuse or settings.reuse,
                       kv_placement=self.kv_placement, kv_dtype=self.kv_dtype,
                       cfg_reuse=self.cfg_reuse or settings.cfg_reuse,
                       cfg_interval=self.cfg_interval or settings.cfg_interval)  # a new object, checked anew

    def describe(self) -> str:
        return f"{self.method} ({self.preset})" if self.method != "off" else "off"


DEFAULT_REQUEST = CacheRequest("flowcache", "slow")  # what the sampler runs without a cache node
NO_PRESETS_METHOD = "easycache"  # ... on a model without FlowCache presets: learns its rate at run time


def has_presets(model_key: str, extra: dict | None = None, method_name: str = "flowcache",
                preset: str = "slow") -> bool:
    """Whether the presets table (built-in, plus the model's ``extra``) has ``method_name``'s ``preset`` row."""
    entry = {**builtin_presets(), **(extra or {})}.get(model_key)
    return isinstance(entry, dict) and isinstance(entry.get(method_name, {}).get(preset), dict)


def default_request(model_key: str, extra: dict | None = None) -> tuple[CacheRequest, str]:
    """What runs when no cache is chosen, and a note that says so: FlowCache's slow preset for a model that has
    one; otherwise EasyCache with its own defaults, which need no calibration (the transformation rate it
    skips by is measured per chunk during the run), so every model gets a cache."""
    if has_presets(model_key, extra, DEFAULT_REQUEST.method, DEFAULT_REQUEST.preset):
        return DEFAULT_REQUEST, "no cache node connected: FlowCache, the model's slow preset"
    m = method(NO_PRESETS_METHOD).config()
    knobs = ", ".join(f"{f.name} {getattr(m, f.name)}" for f in fields(m))
    return CacheRequest(NO_PRESETS_METHOD, "custom"), (
        f"no cache node connected and model {model_key!r} has no presets: {NO_PRESETS_METHOD}, which needs no "
        f"calibration ({knobs}). For FlowCache's tuned slow/fast presets run {CALIBRATE_HINT}.")
