"""Causal Wan in the nodes: FlowCache Causal Options (how the KV cache is bounded, which few-step schedule) and
the sampler's run for models whose loop is causal (Self-Forcing, CausVid, Causal Forcing)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..flowcache.cache import CacheSettings
from ..flowcache.errors import InputError
from ..flowcache.latent_format import wan_to_raw
from ..flowcache.pipelines.causal_wan import KV_MODES, LOOP_PRESETS, CausalSettings, CausalWanPipeline, plan_causal
from ..flowcache.pipelines.common import LatentGeometry
from ..flowcache.runner import RunHooks

log = logging.getLogger("FlowCache")


@dataclass(frozen=True)
class CausalOptions:
    """What FlowCache Causal Options sends to the sampler."""

    kv_mode: str = "rolling"
    window_frames: int = 21
    sink_frames: int = 3
    schedule: str = "self_forcing"


class FlowCacheCausalOptions:
    """How a causal Wan model (Self-Forcing, CausVid, Causal Forcing) keeps its KV cache bounded over long videos,
    and which few-step schedule it was distilled for."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "kv_mode": (list(KV_MODES), {
                "default": "rolling",
                "tooltip": "rolling: keep the sink and the newest blocks inside the window (the official rolling "
                           "cache); compressed: keep the sink and compress older history per head to the cache "
                           "node's kv_budget blocks (FlowCache); global: keep every block (memory grows with the "
                           "video; the model was trained for 21 latent frames)."}),
            "window_frames": ("INT", {
                "default": 21, "min": 1, "max": 10000, "step": 1,
                "tooltip": "rolling: latent frames attended to, the current block included (21 = Self-Forcing's "
                           "trained horizon); whole blocks."}),
            "sink_frames": ("INT", {
                "default": 3, "min": 0, "max": 10000, "step": 1,
                "tooltip": "Leading latent frames always kept (an attention sink), whole blocks; 0 = none."}),
            "schedule": (list(LOOP_PRESETS), {
                "default": "self_forcing",
                "tooltip": "self_forcing: 4 steps [1000, 750, 500, 250] warped with shift 5 (Self-Forcing, Causal "
                           "Forcing); causvid: 3 steps [1000, 757, 522] unwarped, shift 8."}),
        }}

    RETURN_TYPES = ("FLOWCACHE_CAUSAL",)
    RETURN_NAMES = ("causal",)
    OUTPUT_TOOLTIPS = ("Causal-loop options, for FlowCache Sampler's causal input.",)
    FUNCTION = "build"
    CATEGORY = "FlowCache"
    DESCRIPTION = ("Options of the causal loop (Self-Forcing, CausVid, Causal Forcing): how the KV cache stays "
                   "bounded for any length, and the few-step schedule. Without it: rolling, 21-frame window, "
                   "3-frame sink, Self-Forcing's schedule.")

    def build(self, kv_mode: str, window_frames: int, sink_frames: int, schedule: str) -> tuple[CausalOptions]:
        if kv_mode not in KV_MODES:
            raise InputError(f"kv_mode={kv_mode!r}: must be one of {', '.join(KV_MODES)}.")
        if schedule not in LOOP_PRESETS:
            raise InputError(f"schedule={schedule!r}: must be one of {', '.join(LOOP_PRESETS)}.")
        return (CausalOptions(kv_mode, int(window_frames), int(sink_frames), schedule),)


def causal_settings(w: Any, options: CausalOptions | None) -> tuple[CausalSettings, list[str]]:
    """The loop's settings from the sampler's widgets and the options; and the widgets the causal loop ignores
    (said once in the log, so nobody tunes a knob that does nothing)."""
    opt = options or CausalOptions()
    if not isinstance(opt, CausalOptions):
        raise InputError(f"causal: expected the output of FlowCache Causal Options, got {type(opt).__name__}.")
    s = CausalSettings(width=w.width, height=w.height, num_frames=w.num_frames, num_frame_per_block=w.causal_block_size,
                       seed=w.seed, kv_mode=opt.kv_mode, local_attn_frames=opt.window_frames,
                       sink_frames=opt.sink_frames, **LOOP_PRESETS[opt.schedule])
    ignored = ["steps (the schedule's own)", "cfg (no guidance)", "shift (the schedule's own)", "ar_step",
               "base_num_frames", "overlap_history", "addnoise_condition", "solver"]
    return s, ignored


def causal_run(model: Any, w: Any, positive: Any, cache: CacheSettings, options: CausalOptions | None,
               conditioning: Callable[[Any, str], Any]) -> tuple[Callable[..., tuple[dict, Any]], Callable, int]:
    """The causal loop's job (hooks, plan), its planner (memory options, width, height) and the pixel multiple
    sizes keep; every input is checked here, before the model moves."""
    lm = model.loaded
    settings, ignored = causal_settings(w, options)
    geometry = LatentGeometry(**lm.geometry)
    pipe = CausalWanPipeline(lm.model, geometry, lm.text_len)
    plan_causal(settings, geometry, lm.config.patch_size, cache.kv_budget)  # every settings error now
    cond = conditioning(positive, "positive")
    log.info("FlowCache: causal loop, %d frames in blocks of %d latent frames, kv %s; ignored here: %s",
             settings.num_frames, settings.num_frame_per_block, settings.kv_mode, ", ".join(ignored))

    def job(hooks: RunHooks, plan):
        latents, stats = pipe(cond, plan.settings, cache, hooks, plan=plan)
        stats.settings["ignored_widgets"] = ignored
        if lm.latent_format == "wan21":
            return {"samples": wan_to_raw(latents)}, stats
        return {"samples": latents, "flowcache_codec": lm.latent_format}, stats

    def plan(memory: Any, width: int, height: int):
        return pipe.plan(replace(settings, width=width, height=height), cache, memory)
    return job, plan, geometry.spatial_stride * lm.config.patch_size[1]
