"""Causal Wan in the nodes: FlowCache Causal Options (how the KV cache is bounded, which few-step schedule) and
the sampler's run for models whose loop is causal (Self-Forcing, CausVid, Causal Forcing)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..flowcache.cache import CacheSettings
from ..flowcache.errors import InputError
from ..flowcache.pipelines.causal_wan import (KV_MODES, LOOP_PRESETS, CausalSettings, CausalWanPipeline,
                                               check_prompts, plan_causal)
from ..flowcache.pipelines.common import LatentGeometry
from ..flowcache.pipelines.krea_realtime import KreaRealtimePipeline, KreaSettings, needs_vae, plan_krea
from ..flowcache.prompts import PromptSchedule
from ..flowcache.runner import RunHooks
from .comfy_v3 import FLOWCACHE_CAUSAL, check_choices, io
from .latents import sampler_latent

log = logging.getLogger("FlowCache")


@dataclass(frozen=True)
class CausalOptions:
    """What FlowCache Causal Options sends to the sampler."""

    kv_mode: str = "rolling"
    window_frames: int = 21
    sink_frames: int = 3
    schedule: str = "self_forcing"


class FlowCacheCausalOptions(io.ComfyNode):
    """How a causal Wan model (Self-Forcing, CausVid, Causal Forcing) keeps its KV cache bounded over long videos,
    and which few-step schedule it was distilled for."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCacheCausalOptions", display_name="FlowCache Causal Options", category="FlowCache",
            description="Options of the causal loop (Self-Forcing, CausVid, Causal Forcing): how the KV cache stays "
                        "bounded for any length, and the few-step schedule. Without it: rolling, 21-frame window, "
                        "3-frame sink, Self-Forcing's schedule.",
            inputs=[
                # the KV cache over a long video
                io.Combo.Input(
                    "kv_mode", options=list(KV_MODES), default="rolling",
                    tooltip="rolling: keep the sink and the newest blocks inside the window (the official rolling "
                            "cache); compressed: keep the sink and compress older history per head to the cache "
                            "node's kv_budget blocks (FlowCache); global: keep every block (memory grows with the "
                            "video; the model was trained for 21 latent frames)."),
                io.Int.Input(
                    "window_frames", default=21, min=1, max=10000, step=1,
                    tooltip="rolling: latent frames attended to, the current block included (21 = Self-Forcing's "
                            "trained horizon); whole blocks."),
                io.Int.Input(
                    "sink_frames", default=3, min=0, max=10000, step=1,
                    tooltip="Leading latent frames always kept (an attention sink), whole blocks; 0 = none."),
                # the schedule the model was distilled for
                io.Combo.Input(
                    "schedule", options=list(LOOP_PRESETS), default="self_forcing",
                    tooltip="self_forcing: 4 steps [1000, 750, 500, 250] warped with shift 5 (Self-Forcing, Causal "
                            "Forcing); causvid: 3 steps [1000, 757, 522] unwarped, shift 8."),
            ],
            outputs=[FLOWCACHE_CAUSAL.Output(display_name="causal",
                                             tooltip="Causal-loop options, for FlowCache Sampler's causal input.")])

    @classmethod
    def validate_inputs(cls, kv_mode: str, schedule: str) -> bool | str:
        return check_choices(cls, kv_mode=kv_mode, schedule=schedule)

    @classmethod
    def execute(cls, kv_mode: str, window_frames: int, sink_frames: int, schedule: str) -> io.NodeOutput:
        if kv_mode not in KV_MODES:
            raise InputError(f"kv_mode={kv_mode!r}: must be one of {', '.join(KV_MODES)}.")
        if schedule not in LOOP_PRESETS:
            raise InputError(f"schedule={schedule!r}: must be one of {', '.join(LOOP_PRESETS)}.")
        return io.NodeOutput(CausalOptions(kv_mode, int(window_frames), int(sink_frames), schedule))


# Each causal release's own loop, as data: its options when no FlowCache Causal Options is connected, and how it
# changes prompt. LongLive v1.0: configs/longlive_inference.yaml (local_attn_size 12, sink_size 3, global_sink).
RELEASES: dict[str, dict] = {
    "causal": {"options": CausalOptions(), "prompt_rule": "switch"},
    "longlive": {"options": CausalOptions("rolling", 12, 3, "self_forcing"), "prompt_rule": "recache"},
}


def causal_settings(w: Any, options: CausalOptions | None, loop: str = "causal") -> tuple[CausalSettings, list[str]]:
    """The loop's settings from the sampler's widgets and the options (the release's own without the node); and
    the widgets the causal loop ignores (said once in the log, so nobody tunes a knob that does nothing)."""
    release = RELEASES[loop]
    opt = options or release["options"]
    if not isinstance(opt, CausalOptions):
        raise InputError(f"causal: expected the output of FlowCache Causal Options, got {type(opt).__name__}.")
    s = CausalSettings(width=w.width, height=w.height, num_frames=w.num_frames, num_frame_per_block=w.causal_block_size,
                       seed=w.seed, kv_mode=opt.kv_mode, local_attn_frames=opt.window_frames,
                       sink_frames=opt.sink_frames, prompt_rule=release["prompt_rule"], **LOOP_PRESETS[opt.schedule])
    ignored = ["steps (the schedule's own)", "cfg (no guidance)", "shift (the schedule's own)", "ar_step",
               "base_num_frames", "overlap_history", "addnoise_condition", "solver"]
    return s, ignored


def causal_run(model: Any, w: Any, positive: Any, cache: CacheSettings, options: CausalOptions | None,
               conditioning: Callable[[Any, str], Any]) -> tuple[Callable[..., tuple[dict, Any]], Callable, int]:
    """The causal loop's job (hooks, plan), its planner (memory options, width, height) and the pixel multiple
    sizes keep; every input is checked here, before the model moves."""
    lm = model.loaded
    settings, ignored = causal_settings(w, options, lm.loop)
    geometry = LatentGeometry(**lm.geometry)
    pipe = CausalWanPipeline(lm.model, geometry, lm.text_len)
    plan_causal(settings, geometry, lm.config.patch_size, cache.kv_budget)  # every settings error now
    cond = prompts_or_tensor(positive, conditioning)
    check_prompts(cond, settings.num_frames, geometry.temporal_stride, lm.config.text_dim, lm.text_len)
    log.info("FlowCache: causal loop, %d frames in blocks of %d latent frames, kv %s; ignored here: %s",
             settings.num_frames, settings.num_frame_per_block, settings.kv_mode, ", ".join(ignored))

    def job(hooks: RunHooks, plan):
        latents, stats = pipe(cond, plan.settings, cache, hooks, plan=plan)
        stats.settings["ignored_widgets"] = ignored
        return sampler_latent(latents, lm.latent_format), stats

    def plan(memory: Any, width: int, height: int):
        return pipe.plan(replace(settings, width=width, height=height), cache, memory)
    return job, plan, geometry.spatial_stride * lm.config.patch_size[1]


def prompts_or_tensor(positive: Any, conditioning: Callable[[Any, str], Any]) -> Any:
    """The ``positive`` input as the causal loops take it: FlowCache Prompt Schedule's prompts as they are, a
    CONDITIONING as its checked text states."""
    return positive if isinstance(positive, PromptSchedule) else conditioning(positive, "positive")


def krea_run(model: Any, w: Any, positive: Any, cache: CacheSettings, codec: Any,
             conditioning: Callable[[Any, str], Any]) -> tuple[Callable[..., tuple[dict, Any]], Callable, int]:
    """Krea Realtime 14B's loop: the release's schedule (5 steps, shift 5, a 3-frame context); width, height,
    num_frames, seed and causal_block_size apply. ``codec``: the VAE, needed from block 2 on. Returns the job
    (hooks, plan), the planner (memory options, width, height) and the pixel multiple sizes keep."""
    lm = model.loaded
    geometry = LatentGeometry(**lm.geometry)
    settings = KreaSettings(width=w.width, height=w.height, num_frames=w.num_frames,
                            num_frame_per_block=w.causal_block_size, seed=w.seed)
    pipe = KreaRealtimePipeline(lm.model, geometry, lm.text_len, codec)
    plan = plan_krea(settings, geometry, lm.config.patch_size)
    if codec is None and needs_vae(plan, settings):
        raise InputError("vae: Krea Realtime's loop re-encodes the oldest frame of its context through the VAE from "
                         "block 2 on; connect the Wan2.1 VAE (Load VAE) to FlowCache Sampler's vae input.")
    cond = prompts_or_tensor(positive, conditioning)
    check_prompts(cond, settings.num_frames, geometry.temporal_stride, lm.config.text_dim, lm.text_len)
    if (w.width, w.height) != (832, 480):
        log.warning("FlowCache: Krea Realtime 14B was trained at 832x480; %dx%d runs with its true tokens per frame "
                    "but away from what the model learned.", w.width, w.height)
    ignored = ["steps (the release's 5)", "cfg (no guidance)", "shift (the release's 5)", "ar_step",
               "base_num_frames", "overlap_history", "addnoise_condition", "solver"]
    log.info("FlowCache: Krea Realtime loop, %d blocks; ignored here: %s", plan.blocks, ", ".join(ignored))

    def job(hooks: RunHooks, run_plan):
        latents, stats = pipe(cond, settings, cache, hooks, plan=run_plan)  # the plan is at this size
        stats.settings["ignored_widgets"] = ignored
        return sampler_latent(latents, lm.latent_format), stats

    def planner(memory: Any, width: int, height: int):
        return pipe.plan(replace(settings, width=width, height=height), cache, memory)
    return job, planner, geometry.spatial_stride * lm.config.patch_size[1]
