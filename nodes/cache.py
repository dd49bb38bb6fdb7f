"""FlowCache Cache: the cache method and its preset as a node of its own, plugged into FlowCache Sampler's
``cache`` input (as ComfyUI's EasyCache and the TeaCache/MagCache packs do)."""
from __future__ import annotations

from typing import Any

from ..flowcache.cache import CFG_REUSE, KV_DTYPES, KV_PLACEMENTS, METHODS, REUSE
from ..flowcache.presets import PRESET_NAMES, CacheRequest
from ..flowcache.errors import InputError
from ..flowcache.validate import finite, whole
from .comfy_v3 import FLOWCACHE_CACHE, check_choices, io

# Widgets of the custom preset: widget name -> (config field it sets, its input). Order is the saved workflows'
# widgets_values order: new knobs go at the end.
CUSTOM_WIDGETS: dict[str, tuple[str, Any]] = {
    "threshold": ("threshold", io.Float.Input(
        "threshold", default=0.1, min=0.0, max=10.0, step=0.005, round=0.0005,
        tooltip="custom preset: accumulated change below which a chunk (or, for teacache, the window) reuses its "
                "cached result; higher = faster. Locked to the preset's value for slow/fast/turbo.")),
    "warmup_steps": ("warmup", io.Int.Input(
        "warmup_steps", default=5, min=0, max=1000, step=1,
        tooltip="custom preset: first steps of each chunk that are always computed. Locked for slow/fast/turbo.")),
    "kv_budget": ("kv_budget", io.Int.Input(
        "kv_budget", default=0, min=0, max=1000, step=1,
        tooltip="custom preset: chunks of clean history kept in the KV cache on the chunk path (0 = keep all, no "
                "compression; 1-2 bound memory for long videos). Locked for slow/fast/turbo.")),
    "mix_lambda": ("mix_lambda", io.Float.Input(
        "mix_lambda", default=0.07, min=0.0, max=1.0, step=0.01, round=0.001,
        tooltip="custom preset: weight of attention importance against redundancy when the KV cache is "
                "compressed. Locked for slow/fast/turbo.")),
    "max_skips": ("max_skips", io.Int.Input(
        "max_skips", default=3, min=0, max=1000, step=1,
        tooltip="custom preset, magcache only: most steps in a row a chunk may reuse. Locked for slow/fast/turbo.")),
}
ATTENTION_CHOICES = ["auto", "window", "window_refresh", "block_causal"]
# forecast2 stays in the core and in the sweep (``bench --sweep --grid turbo`` measures it) but not on the node: on
# the demo's calibration sweep it was below hold or extrapolate at every setting (docs/nodes.md)
NODE_REUSES = ("hold", "extrapolate")
REUSE_CHOICES = ["auto", *NODE_REUSES]
CFG_REUSE_CHOICES = ["auto", *CFG_REUSE]
KV_PLACEMENT_CHOICES = list(KV_PLACEMENTS)
KV_DTYPE_CHOICES = list(KV_DTYPES)


def _method_inputs() -> list:
    methods = "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
    return [
        io.Combo.Input("method", options=list(METHODS), default="flowcache", tooltip=methods + "."),
        io.Combo.Input("preset", options=list(PRESET_NAMES), default="slow",
                       tooltip="slow: best quality; fast: more reuse; turbo: the most reuse (about 6x fewer FLOPs, "
                               "at a visible quality cost; only models calibrated for it have it, such as the demo "
                               "model: others say so when run). Values from the model's presets, shown locked "
                               "below. custom: use the widgets below."),
    ]


def _reuse_inputs() -> list:
    """How a computed chunk attends and what a skipping chunk applies (reuse is optional: API prompts saved
    before it existed still validate)."""
    return [
        io.Combo.Input(
            "attention", options=ATTENTION_CHOICES, default="auto",
            tooltip="How a computed chunk attends on the chunk path (FlowCache, MagCache, EasyCache): window = to "
                    "every chunk of its window, later ones too, as the uncached window does (closer to off); "
                    "window_refresh = window, plus the not-started chunks' keys once and each finished chunk's "
                    "refreshed once (closest to off, a forward per chunk more); block_causal = only to chunks up "
                    "to itself (the FlowCache code). auto: the model's presets."),
        io.Combo.Input(
            "reuse", options=REUSE_CHOICES, default="auto", optional=True,
            tooltip="What a chunk that skips its step applies: hold = its last computed result as it is (the "
                    "reference codes); extrapolate = the line through its last two computed results, continued to "
                    "this step (no extra compute, one more cached result per chunk; on the demo closer to off with "
                    "window_refresh attention at moderate reuse; past 6x fewer FLOPs FlowCache and MagCache were "
                    "closer with hold). auto: the model's presets."),
    ]


def _memory_inputs() -> list:
    """Where and how stored keys/values are held (optional: saved API prompts predate them)."""
    return [
        io.Combo.Input(
            "kv_placement", options=KV_PLACEMENT_CHOICES, default="auto", optional=True,
            tooltip="Where the stored keys/values of finished and earlier chunks live. auto: on the GPU when they "
                    "fit, else in system RAM (the sampler picks the fastest plan that fits and says which after the "
                    "run); device: always on the GPU; offload: always in system RAM (pinned), two layers at a time "
                    "on the GPU, copied while the layer before computes. Only the chunk path and the causal and "
                    "MAGI-1 loops store keys/values."),
        io.Combo.Input(
            "kv_dtype", options=KV_DTYPE_CHOICES, default="auto", optional=True,
            tooltip="How stored keys/values are held. auto: the model's precision when it fits, else fp8; bf16: the "
                    "model's own precision (bf16, or fp16/fp32 if it computes in that); fp8: half the memory (e4m3 "
                    "with a scale per chunk and head, a small quality cost). Where the GPU cannot hold fp8, bf16 is "
                    "used and the node says so."),
    ]


def _cfg_inputs() -> list:
    """CFG-aware reuse (optional, after every older widget: saved workflows and API prompts keep their order)."""
    return [
        io.Combo.Input(
            "cfg_reuse", options=CFG_REUSE_CHOICES, default="auto", optional=True,
            tooltip="With CFG (cfg > 1): the unconditional pass changes slowly, so it may be reused on more steps "
                    "than the conditional one. off = both passes follow the method; own = the unconditional pass "
                    "computes only on every cfg_interval-th step the conditional one computes and otherwise reuses "
                    "its own cached result; delta = the same steps, a reuse taking the conditional result plus the "
                    "cached difference between the two (FasterCache). No extra memory. auto: the model's presets "
                    "(off)."),
        io.Int.Input(
            "cfg_interval", default=0, min=0, max=1000, step=1, optional=True,
            tooltip="cfg_reuse own/delta: the unconditional pass computes on every this-many-th step the "
                    "conditional pass computes (1 = on each; 2 = half as often). 0 = auto: the model's presets "
                    "(2 where they say nothing)."),
    ]


class FlowCacheCache(io.ComfyNode):
    """Choose how FlowCache Sampler reuses work: the method (off, TeaCache's whole steps, or per chunk FlowCache,
    MagCache, EasyCache), its preset, the chunk path's attention and reuse, and where stored K/V live."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        # widget order = saved workflows' widgets_values order: method, preset, the custom knobs, attention
        # (required), then the optional reuse / memory widgets
        return io.Schema(
            node_id="FlowCacheCache", display_name="FlowCache Cache", category="FlowCache",
            description="How FlowCache Sampler reuses work between steps. Without this node the sampler runs "
                        "FlowCache with the model's slow preset, or easycache (no calibration needed) for a model "
                        "without presets.",
            inputs=[*_method_inputs(), *(spec for _, spec in CUSTOM_WIDGETS.values()), *_reuse_inputs(),
                    *_memory_inputs(), *_cfg_inputs()],
            outputs=[FLOWCACHE_CACHE.Output(display_name="cache",
                                            tooltip="The cache settings, for FlowCache Sampler's cache input.")])

    @classmethod
    def validate_inputs(cls, method: str, preset: str, attention: str | None = None, reuse: str | None = None,
                        kv_placement: str | None = None, kv_dtype: str | None = None,
                        cfg_reuse: str | None = None) -> bool | str:
        return check_choices(cls, method=method, preset=preset, attention=attention, reuse=reuse,
                             kv_placement=kv_placement, kv_dtype=kv_dtype, cfg_reuse=cfg_reuse)

    @classmethod
    def execute(cls, method: str, preset: str, attention: str = "auto", reuse: str = "auto",
                kv_placement: str = "auto", kv_dtype: str = "auto", cfg_reuse: str = "auto",
                cfg_interval: int | None = None, **custom: Any) -> io.NodeOutput:
        # every number is checked, used or not: NaN passes ComfyUI's own min/max checks
        values = tuple((CUSTOM_WIDGETS[k][0], finite(v, k)) for k, v in custom.items() if k in CUSTOM_WIDGETS)
        for name, value, allowed in (("attention", attention, ATTENTION_CHOICES), ("reuse", reuse, REUSE_CHOICES),
                                     ("cfg_reuse", cfg_reuse, CFG_REUSE_CHOICES)):
            if value not in allowed:
                raise InputError(f"FlowCache Cache: {name}={value!r}: must be one of {', '.join(allowed)}.")
        interval = None if cfg_interval is None else whole(cfg_interval, "cfg_interval", 0, 1000) or None  # 0: auto
        return io.NodeOutput(CacheRequest(method, preset, values, None if attention == "auto" else attention,
                                          None if reuse == "auto" else reuse, kv_placement, kv_dtype,
                                          None if cfg_reuse == "auto" else cfg_reuse, interval))
