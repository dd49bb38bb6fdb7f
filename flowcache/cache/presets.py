"""Presets are data (``flowcache/presets.json`` or a calibrated preset file); this module only reads them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .base import AccumulatedL1Policy, CachePolicy
from .chunkwise import FlowCacheConfig, FlowCachePolicy
from .teacache import TeaCacheConfig, TeaCachePolicy

CACHE_MODES = ("off", "teacache", "flowcache")
PRESET_NAMES = ("slow", "fast", "custom")
BUILTIN_PRESETS = Path(__file__).resolve().parent.parent / "presets.json"


@dataclass
class CacheSettings:
    """Everything a run needs to build its policy and KV store; plain data, shown in the UI and stats."""

    mode: str = "flowcache"
    preset: str = "slow"
    threshold: float = 0.1
    warmup: int = 5
    coefficients: list[float] = field(default_factory=lambda: [1.0, 0.0])
    kv_budget: int = 0        # chunks of clean history kept per head; 0 = no compression
    mix_lambda: float = 0.07  # importance weight of the KV score
    model_key: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load_presets(extra: dict | None = None) -> dict:
    """The built-in table, updated with ``extra`` (a calibrated model's entries)."""
    table = json.loads(BUILTIN_PRESETS.read_text())
    table.pop("_doc", None)
    if extra:
        table.update(extra)
    return table


def resolve_settings(model_key: str, mode: str, preset: str, threshold: float | None = None,
                     warmup: int | None = None, kv_budget: int | None = None, mix_lambda: float | None = None,
                     extra_presets: dict | None = None) -> CacheSettings:
    """Turn widget values into settings. Named presets win over the numeric widgets; ``custom`` uses them."""
    if mode not in CACHE_MODES:
        raise InputError(f"cache={mode!r}: must be one of {', '.join(CACHE_MODES)}.")
    if preset not in PRESET_NAMES:
        raise InputError(f"preset={preset!r}: must be one of {', '.join(PRESET_NAMES)}.")
    table = load_presets(extra_presets)
    entry = table.get(model_key)
    if entry is None:
        raise InputError(f"no cache presets for model {model_key!r}; known: {', '.join(sorted(table))}. "
                         "Run `python -m flowcache calibrate CHECKPOINT` to make a preset file for it.")
    s = CacheSettings(mode=mode, preset=preset, coefficients=list(entry["coefficients"]), model_key=model_key)
    if mode != "off":
        named = entry[mode].get(preset if preset != "custom" else "slow", {})
        s.threshold, s.warmup, s.kv_budget = named["threshold"], named["warmup"], named.get("kv_budget", 0)
    if preset == "custom" or mode == "off":
        s.threshold = s.threshold if threshold is None else float(threshold)
        s.warmup = s.warmup if warmup is None else int(warmup)
        s.kv_budget = s.kv_budget if kv_budget is None else int(kv_budget)
    if mix_lambda is not None and preset == "custom":
        s.mix_lambda = float(mix_lambda)
    if s.threshold < 0:
        raise InputError(f"threshold={s.threshold}: must be ≥ 0 (0 never reuses).")
    if s.warmup < 0:
        raise InputError(f"warmup_steps={s.warmup}: must be ≥ 0.")
    if s.kv_budget < 0:
        raise InputError(f"kv_budget={s.kv_budget}: must be ≥ 0 chunks (0 = no compression).")
    if not 0.0 <= s.mix_lambda <= 1.0:
        raise InputError(f"mix_lambda={s.mix_lambda}: must lie in [0, 1].")
    return s


# mode -> policy factory: the only place that knows the policy classes
POLICY_FACTORIES: dict[str, Callable[[CacheSettings], CachePolicy]] = {
    "off": lambda s: CachePolicy("window"),
    "off-chunked": lambda s: CachePolicy("chunk"),
    "teacache": lambda s: TeaCachePolicy(TeaCacheConfig(s.threshold, s.warmup, s.coefficients)),
    "flowcache": lambda s: FlowCachePolicy(FlowCacheConfig(s.threshold, s.warmup, s.coefficients)),
}


def make_policy(settings: CacheSettings) -> CachePolicy:
    return POLICY_FACTORIES[settings.mode](settings)


__all__ = ["CACHE_MODES", "PRESET_NAMES", "CacheSettings", "resolve_settings", "make_policy", "load_presets",
           "AccumulatedL1Policy", "CachePolicy"]
