"""FlowCache Cache: the cache method and its preset as a node of its own, plugged into FlowCache Sampler's
``cache`` input (as ComfyUI's EasyCache and the TeaCache/MagCache packs do)."""
from __future__ import annotations

from typing import Any

from ..flowcache.cache import KV_DTYPES, KV_PLACEMENTS, METHODS
from ..flowcache.presets import PRESET_NAMES, CacheRequest
from ..flowcache.errors import InputError
from ..flowcache.validate import finite

# Widgets of the custom preset: widget name -> (config field it sets, widget spec). Order is the saved
# workflows' widgets_values order: new knobs go at the end.
CUSTOM_WIDGETS: dict[str, tuple[str, tuple]] = {
    "threshold": ("threshold", ("FLOAT", {
        "default": 0.1, "min": 0.0, "max": 10.0, "step": 0.005, "round": 0.0005,
        "tooltip": "custom preset: accumulated change below which a chunk (or, for teacache, the window) reuses "
                   "its cached result; higher = faster. Locked to the preset's value for slow/fast."})),
    "warmup_steps": ("warmup", ("INT", {
        "default": 5, "min": 0, "max": 1000, "step": 1,
        "tooltip": "custom preset: first steps of each chunk that are always computed. Locked for slow/fast."})),
    "kv_budget": ("kv_budget", ("INT", {
        "default": 0, "min": 0, "max": 1000, "step": 1,
        "tooltip": "custom preset: chunks of clean history kept in the KV cache on the chunk path (0 = keep "
                   "all, no compression; 1-2 bound memory for long videos). Locked for slow/fast."})),
    "mix_lambda": ("mix_lambda", ("FLOAT", {
        "default": 0.07, "min": 0.0, "max": 1.0, "step": 0.01, "round": 0.001,
        "tooltip": "custom preset: weight of attention importance against redundancy when the KV cache is "
                   "compressed. Locked for slow/fast."})),
    "max_skips": ("max_skips", ("INT", {
        "default": 3, "min": 0, "max": 1000, "step": 1,
        "tooltip": "custom preset, magcache only: most steps in a row a chunk may reuse. Locked for slow/fast."})),
}
ATTENTION_CHOICES = ["auto", "window", "window_refresh", "block_causal"]
REUSE_CHOICES = ["auto", "hold", "extrapolate"]
KV_PLACEMENT_CHOICES = list(KV_PLACEMENTS)
KV_DTYPE_CHOICES = list(KV_DTYPES)


class FlowCacheCache:
    """Choose how FlowCache Sampler reuses work: off, TeaCache (whole steps) or FlowCache (per chunk)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        methods = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
        required: dict[str, Any] = {
            "method": (list(METHODS), {"default": "flowcache", "tooltip": methods + "."}),
            "preset": (list(PRESET_NAMES), {
                "default": "slow",
                "tooltip": "slow: best quality; fast: more reuse (values from the model's presets, shown locked "
                           "below). custom: use the widgets below."}),
        }
        required.update({name: spec for name, (_, spec) in CUSTOM_WIDGETS.items()})
        required["attention"] = (ATTENTION_CHOICES, {
            "default": "auto",
            "tooltip": "How a computed chunk attends on the chunk path (FlowCache, MagCache, EasyCache): window = to "
                       "every chunk of its window, later ones too, as the uncached window does (closer to off); "
                       "window_refresh = window, plus the not-started chunks' keys once and each finished chunk's "
                       "refreshed once (closest to off, a forward per chunk more); block_causal = only to chunks "
                       "up to itself (the FlowCache code). auto: the model's presets."})
        # optional: API prompts saved before this widget existed still validate
        optional = {"reuse": (REUSE_CHOICES, {
            "default": "auto",
            "tooltip": "What a chunk that skips its step applies: hold = its last computed result as it is (the "
                       "reference codes); extrapolate = the line through its last two computed results, continued "
                       "to this step (no extra compute, one more cached result per chunk; on the demo closer to off "
                       "with window_refresh attention, not always with window). auto: the model's presets."}),
            "kv_placement": (KV_PLACEMENT_CHOICES, {
                "default": "auto",
                "tooltip": "Where the stored keys/values of finished and earlier chunks live. auto: on the GPU when "
                           "they fit, else in system RAM (the sampler picks the fastest plan that fits and says which "
                           "after the run); device: always on the GPU; offload: always in system RAM (pinned), "
                           "two layers at a time on the GPU, copied while the layer before computes. Only the chunk "
                           "path and the causal and MAGI-1 loops store keys/values."}),
            "kv_dtype": (KV_DTYPE_CHOICES, {
                "default": "auto",
                "tooltip": "How stored keys/values are held. auto: the model's precision when it fits, else fp8; "
                           "bf16: the model's own precision (bf16, or fp16/fp32 if it computes in that); fp8: half "
                           "the memory (e4m3 with a scale per chunk and head, a small quality cost). Where the GPU "
                           "cannot hold fp8, bf16 is used and the node says so."})}
        return {"required": required, "optional": optional}

    RETURN_TYPES = ("FLOWCACHE_CACHE",)
    RETURN_NAMES = ("cache",)
    OUTPUT_TOOLTIPS = ("The cache settings, for FlowCache Sampler's cache input.",)
    FUNCTION = "build"
    CATEGORY = "FlowCache"
    DESCRIPTION = ("How FlowCache Sampler reuses work between steps. Without this node the sampler runs FlowCache "
                   "with the model's slow preset, or easycache (no calibration needed) for a model without presets.")

    def build(self, method: str, preset: str, attention: str = "auto", reuse: str = "auto",
              kv_placement: str = "auto", kv_dtype: str = "auto", **custom: Any) -> tuple[CacheRequest]:
        # every number is checked, used or not: NaN passes ComfyUI's own min/max checks
        values = tuple((CUSTOM_WIDGETS[k][0], finite(v, k)) for k, v in custom.items() if k in CUSTOM_WIDGETS)
        for name, value, allowed in (("attention", attention, ATTENTION_CHOICES), ("reuse", reuse, REUSE_CHOICES)):
            if value not in allowed:
                raise InputError(f"FlowCache Cache: {name}={value!r}: must be one of {', '.join(allowed)}.")
        return (CacheRequest(method, preset, values, None if attention == "auto" else attention,
                             None if reuse == "auto" else reuse, kv_placement, kv_dtype),)
