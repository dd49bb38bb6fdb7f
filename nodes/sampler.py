"""FlowCache Sampler: one node for every loop the loaded model runs (SkyReels-V2 / Wan diffusion forcing, causal
Wan and LongLive, Krea Realtime, MAGI-1), with any cache method, on the memory plan that fits."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..flowcache.cache import CacheSettings
from ..flowcache.errors import InputError
from ..flowcache.memory import auto_plan, host_available_bytes
from ..flowcache.models.common import attention_backend
from ..flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from ..flowcache.pipelines.common import prefix_frames as prefix_latent_frames
from ..flowcache.pipelines.magi import MagiPipeline, MagiSettings
from ..flowcache.plan import MemoryOptions
from ..flowcache.pipelines.wan_step import check_conditioning
from ..flowcache.presets import CacheRequest, default_request
from ..flowcache.prompts import PromptSchedule
from ..flowcache.runner import RunHooks, StepInfo
from ..flowcache.schedulers import SOLVERS
from ..flowcache.stats import RunStats
from . import comfy_bridge
from .causal import causal_run, krea_run
from .comfy_v3 import (FLOWCACHE_CACHE, FLOWCACHE_CAUSAL, FLOWCACHE_MAGI_VAE, FLOWCACHE_MODEL,
                       FLOWCACHE_PROMPTS, check_choices, hidden_value, io)
from .loader import FlowCacheModel
from .latents import DEMO_CODEC, MAGI_CODEC, WAN_FORMAT, sampler_latent
from .magi import magi_caption, magi_scheduled_captions
from .native import is_comfy_model, native_wan_model, unapplied_patches
from .vae_codec import ComfyVAECodec

log = logging.getLogger("FlowCache")

MAX_SEED = 0xFFFFFFFFFFFFFFFF
SOLVER_NAMES = list(SOLVERS)  # unipc first: the default


def _int(name: str, default: int, lo: int, hi: int, tooltip: str, step: int = 1):
    # Frame counts keep step 1: the frontend snaps INT widgets to min + k·step, and the demo model (temporal
    # stride 1) needs counts such as 36 that a Wan-style step of 4 would not allow.
    return io.Int.Input(name, default=default, min=lo, max=hi, step=step, tooltip=tooltip)


def _float(name: str, default: float, lo: float, hi: float, step: float, tooltip: str):
    return io.Float.Input(name, default=default, min=lo, max=hi, step=step, round=step / 10, tooltip=tooltip)


def conditioning_tensor(cond: Any, name: str) -> torch.Tensor:
    """The text states of a CONDITIONING (``cond[0][0]``), with a clear error for anything else."""
    try:
        tensor = cond[0][0]
    except (TypeError, IndexError, KeyError):
        tensor = None
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"{name}: expected CONDITIONING from a text encoder node, got {type(cond).__name__}.")
    if len(cond) > 1:
        log.warning("FlowCache: %s has %d conditioning entries; only the first is used.", name, len(cond))
    return tensor


def _model_inputs() -> list:
    """What is sampled: the model (FlowCache Load Model's or ComfyUI's own MODEL) and the prompts."""
    return [
        io.MultiType.Input(
            "model", types=[FLOWCACHE_MODEL, io.Model],
            tooltip="FlowCache Load Model's model (SkyReels-V2 / Wan2.1, causal Wan or MAGI-1), or ComfyUI's own "
                    "MODEL of a Wan2.1-architecture model (SkyReels-V2 DF 1.3B/14B, Wan2.1 T2V) from Load Diffusion "
                    "Model, any LoRA loader or a GGUF loader: its own layers run, so its fp8/GGUF weights, LoRAs and "
                    "partial loading apply. SkyReels' fps embedding, which ComfyUI drops, is read back from the "
                    "MODEL's file."),
        io.MultiType.Input(
            "positive", types=[io.Conditioning, FLOWCACHE_PROMPTS],
            tooltip="Prompt: umT5-XXL text states (CLIP Text Encode with a Wan text encoder), or FlowCache Demo "
                    "Text Encode; or FlowCache Prompt Schedule's prompts that change over the video (each loop "
                    "changes at its block, window or chunk boundaries)."),
        io.Conditioning.Input("negative", tooltip="Negative prompt (used when cfg > 1). Causal Wan models have no "
                                                  "guidance: unused."),
    ]


def _video_inputs() -> list:
    """The video's size and the sampling schedule (every loop)."""
    return [
        _int("width", 960, 16, 4096, "Video width in pixels; a multiple of 16.", 16),
        _int("height", 544, 16, 4096, "Video height in pixels; a multiple of 16.", 16),
        _int("num_frames", 97, 1, 10001, "Frames to generate: 4·k+1 for Wan. Diffusion forcing: longer than "
                                         "base_num_frames runs several overlapping windows; causal Wan: any length, "
                                         "block by block."),
        _int("steps", 50, 1, 1000, "Denoising steps per chunk. Causal Wan: ignored (the schedule on FlowCache "
                                   "Causal Options sets them: 4 or 3)."),
        _float("cfg", 6.0, 0.0, 30.0, 0.1, "Classifier-free guidance scale; ≤ 1 skips the negative pass (twice as "
                                           "fast). Not used by MAGI-1 (its guidance is built in) nor by causal Wan "
                                           "(no guidance)."),
        _float("shift", 8.0, 0.0, 100.0, 0.1, "Flow-matching sigma shift (SkyReels uses 8 for text-to-video, MAGI-1 "
                                              "3). Causal Wan: ignored (its schedule's own)."),
        _int("seed", 1024, 0, MAX_SEED, "Noise seed; the same seed and settings give the same video."),
    ]


def _chunk_inputs() -> list:
    """Diffusion forcing's chunks and windows (causal_block_size is every loop's chunk)."""
    return [
        _int("ar_step", 5, 0, 100, "Diffusion forcing only: steps by which each chunk lags the previous one (0 = all "
                                   "chunks denoise together; 5 = SkyReels' asynchronous mode)."),
        _int("causal_block_size", 5, 1, 100, "Latent frames per chunk (the unit FlowCache caches); SkyReels uses 5, "
                                             "MAGI-1 6, Self-Forcing/CausVid 3, frame-wise Causal Forcing 1."),
        _int("base_num_frames", 97, 1, 10001, "Diffusion forcing only: frames per window (the model's native "
                                              "length); 4·k+1 for Wan."),
        _int("overlap_history", 17, 1, 10001, "Diffusion forcing only: frames each new window re-uses from the "
                                              "previous one; 4·k+1 for Wan."),
        _int("addnoise_condition", 20, 0, 1000, "Diffusion forcing only: noise added to the re-used frames of a new "
                                                "window (SkyReels suggests 20; ≤ 50)."),
        io.Combo.Input("solver", options=SOLVER_NAMES, default="unipc",
                       tooltip="Diffusion forcing only: unipc (SkyReels' default) or euler. MAGI-1 and causal Wan use "
                               "their own."),
        io.Boolean.Input("keep_model_loaded", default=False,
                         tooltip="Keep the model on the GPU after sampling (faster next run, less memory for other "
                                 "nodes)."),
    ]


def _optional_inputs() -> list:
    """Options and per-family extras, all optional."""
    return [
        FLOWCACHE_CACHE.Input(
            "cache", optional=True,
            tooltip="From FlowCache Cache: the cache method and its preset. Not connected: FlowCache with the "
                    "model's slow preset, or for a model without presets easycache, which needs no calibration (the "
                    "node says which after the run)."),
        io.Vae.Input(
            "vae", optional=True,
            tooltip="Wan2.1 VAE: re-encodes the overlap between windows as SkyReels does (without it the overlap is "
                    "carried over in latent space). Krea Realtime 14B needs it: its loop re-encodes a context frame "
                    "every block from block 2 on."),
        FLOWCACHE_MAGI_VAE.Input("magi_vae", optional=True,
                                 tooltip="MAGI-1 only: its VAE, needed to encode prefix_images."),
        io.Image.Input("prefix_images", optional=True,
                       tooltip="MAGI-1 only: one image (image-to-video) or the frames of a video to continue (a "
                               "multiple of 4 frames)."),
        FLOWCACHE_CAUSAL.Input(
            "causal", optional=True,
            tooltip="Causal Wan models only (Self-Forcing, CausVid, Causal Forcing): FlowCache Causal Options. Not "
                    "connected: a rolling 21-frame window with a 3-frame sink, Self-Forcing's schedule."),
    ]


class FlowCacheSampler(io.ComfyNode):
    """Generate a video with a diffusion-forcing model, reusing per-chunk computation (FlowCache)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        # input order = the saved workflows' order (widgets_values are positional): the required inputs, then the
        # optional ones; the hidden prompt tells where a ComfyUI MODEL came from (nodes.native)
        return io.Schema(
            node_id="FlowCacheSampler", display_name="FlowCache Sampler", category="FlowCache",
            description="SkyReels-V2 diffusion forcing (or MAGI-1 chunk-wise autoregression, chosen from the loaded "
                        "model) with FlowCache: each chunk of frames decides per step whether to recompute or reuse "
                        "its cached result. ar_step, base_num_frames, overlap_history, addnoise_condition, solver and "
                        "cfg apply to diffusion forcing only.",
            inputs=[*_model_inputs(), *_video_inputs(), *_chunk_inputs(), *_optional_inputs()],
            outputs=[io.Latent.Output(display_name="samples", tooltip="Video latents; decode with FlowCache Decode "
                                                                      "(or VAE Decode for Wan models).")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt])

    @classmethod
    def validate_inputs(cls, solver: str) -> bool | str:
        return check_choices(cls, solver=solver)

    @classmethod
    def execute(cls, model: Any, positive: Any, negative: Any, width: int, height: int, num_frames: int,
                steps: int, cfg: float, shift: float, seed: int, ar_step: int, causal_block_size: int,
                base_num_frames: int, overlap_history: int, addnoise_condition: int, solver: str,
                keep_model_loaded: bool = False, cache: CacheRequest | None = None, vae: Any = None,
                magi_vae: Any = None, prefix_images: Any = None, causal: Any = None) -> io.NodeOutput:
        unique_id, prompt = hidden_value(cls, "unique_id"), hidden_value(cls, "prompt")
        native = is_comfy_model(model)
        model = sampler_model(model, prompt, unique_id)
        lm = model.loaded
        run = LOOP_RUNS.get(lm.loop)
        if run is None:
            raise InputError(f"model: the {lm.loop!r} loop cannot be sampled here (supported: "
                             f"{', '.join(LOOP_RUNS)}).")
        w = SamplerWidgets(width, height, num_frames, steps, cfg, shift, seed, ar_step, causal_block_size,
                           base_num_frames, overlap_history, addnoise_condition, solver)
        # no cache node: FlowCache's slow preset, or calibration-free easycache for a model without presets
        request, note = (cache, "") if cache is not None else default_request(lm.preset_key, lm.extra_presets)
        if not isinstance(request, CacheRequest):
            raise InputError(f"cache: expected the output of FlowCache Cache, got {type(request).__name__}.")
        # Everything that can be wrong is checked before the model is moved or any step runs.
        cache_settings = request.resolve(lm.preset_key, lm.extra_presets)
        extras = {"vae": vae, "magi_vae": magi_vae, "prefix_images": prefix_images, "causal": causal}
        spec = run(model, w, positive, negative, cache_settings, extras)
        device = comfy_bridge.torch_device()
        plan, memory_note = memory_plan(spec, cache_settings, w, device)
        # ComfyUI's attention (its kernel, and a MODEL's optimized_attention_override) for every attention of the
        # run; what else a MODEL carries is named on the node when FlowCache does not apply it
        options = (getattr(model.patcher, "model_options", None) or {}).get("transformer_options")
        attention = comfy_bridge.host_attention(options)
        unapplied = unapplied_patches(model.patcher) if native else []
        for line in unapplied:
            log.warning("FlowCache: the MODEL's %s.", line)
        note = "; ".join(n for n in (note, memory_note, *(f"MODEL {u}" for u in unapplied)) if n)
        log.info("FlowCache: sampling %s %dx%d, %d frames, %d steps, cache %s, memory %s%s", lm.family, width, height,
                 num_frames, steps, request.describe(), plan.memory.summary(), f" ({note})" if note else "")
        comfy_bridge.load_to_device(model.patcher, plan.memory.device_bytes)
        try:
            with attention_backend(attention):  # None without ComfyUI: torch's SDPA
                latents, stats = spec.job(RunHooks(cls._on_step(unique_id, lm.latent_format),
                                                   comfy_bridge.check_interrupted), plan)
        finally:
            if not keep_model_loaded:
                comfy_bridge.offload(model.patcher)

        summary = stats.summary()
        log.info("FlowCache: %s", summary)
        notes = list(lm.notes) + ([attention.describe()] if attention is not None else []) + \
            [f"MODEL {u}" for u in unapplied]
        stats_dict = {**stats.to_dict(), "note": note, "memory_plan": plan.memory.to_dict(),
                      "memory": plan.memory.summary(), "notes": notes,
                      "attention": attention.to_dict() if attention is not None else {"kernel": "sdpa"}}
        comfy_bridge.send_event("flowcache.stats", {"node": unique_id, "stats": stats_dict, "summary": summary})
        return io.NodeOutput(latents, ui={"flowcache_stats": [stats_dict]})

    @staticmethod
    def _on_step(unique_id: Any, latent_format: str = ""):
        state: dict[str, Any] = {"pbar": None, "frames": 0, "previewer": None}

        def on_step(info: StepInfo) -> None:
            comfy_bridge.check_interrupted()
            if state["pbar"] is None:
                state["pbar"] = comfy_bridge.progress_bar(info.total, unique_id)
                state["previewer"] = comfy_bridge.latent_previewer(latent_format) if info.preview else None
            image = None
            if state["previewer"] is not None and info.preview is not None:
                finished = info.preview()  # [1, C, F, h, w]: the frames finished so far
                if finished.shape[2] > state["frames"]:  # a block finished: show its last frame
                    state["frames"] = finished.shape[2]
                    image = state["previewer"](finished[:, :, -1:].float())
            state["pbar"].update_absolute(info.done, info.total, image)  # inside ComfyUI also a cancel point
            comfy_bridge.send_event("flowcache.progress", {"node": unique_id, "text": info.text(),
                                                           "value": info.done, "max": info.total})

        return on_step


# -- one run per model family: check the inputs, then return the job the sampler runs on the device --------

@dataclass
class SamplerWidgets:
    width: int
    height: int
    num_frames: int
    steps: int
    cfg: float
    shift: float
    seed: int
    ar_step: int
    causal_block_size: int
    base_num_frames: int
    overlap_history: int
    addnoise_condition: int
    solver: str


@dataclass
class RunSpec:
    """A checked run of one family: ``plan(options, width, height)`` makes its run plan (at another size too, to
    name the largest that fits), ``job(hooks, plan)`` runs it; sizes keep multiples of ``unit`` pixels."""

    job: Callable[[RunHooks, Any], "tuple[dict, RunStats]"]
    plan: Callable[[MemoryOptions, int, int], Any]
    unit: int


def planned_once(make: Callable[[MemoryOptions, int, int], Any]) -> Callable[[MemoryOptions, int, int], Any]:
    """``make`` with each (options, width, height) planned once: a plan's dry run of the largest forward is not
    free at 540P, and the sampler asks for the first one twice (checking the settings, then choosing)."""
    made: dict = {}

    def plan(options: MemoryOptions, width: int, height: int):
        key = (options, width, height)
        if key not in made:
            made[key] = make(options, width, height)
        return made[key]
    return plan


def memory_plan(spec: RunSpec, cache: CacheSettings, w: "SamplerWidgets", device) -> tuple[Any, str]:
    """The fastest plan that fits ComfyUI's device and the host RAM, and a note for the node (``auto_plan``)."""
    plan, note = auto_plan(spec.plan, cache.kv_placement, cache.kv_dtype, w.width, w.height, w.num_frames, device,
                           comfy_bridge.available_memory(device), host_available_bytes(), spec.unit)
    if note:
        log.warning("FlowCache: %s.", note)
    return plan, note


def sampler_model(model: Any, prompt: Any = None, unique_id: Any = None) -> FlowCacheModel:
    """The ``model`` input as the sampler's model: FlowCache Load Model's as it is; a ComfyUI MODEL wrapped for
    one run (its own layers, never changed; see ``nodes.native``)."""
    if isinstance(model, FlowCacheModel):
        return model
    if is_comfy_model(model):
        loaded, name = native_wan_model(model, prompt, unique_id)
        return FlowCacheModel(loaded, model, name, str(loaded.model.dtype).replace("torch.", ""))
    raise InputError(f"model: expected FlowCache Load Model's model or a ComfyUI MODEL, got {type(model).__name__}.")


def _wan_run(model: FlowCacheModel, w: SamplerWidgets, positive: Any, negative: Any, cache: CacheSettings,
             extras: dict) -> RunSpec:
    """SkyReels-V2 diffusion forcing (Wan2.1 DiTs and the built-in demo)."""
    lm = model.loaded
    vae, magi_vae, prefix_images = extras["vae"], extras["magi_vae"], extras["prefix_images"]
    if prefix_images is not None or magi_vae is not None:
        raise InputError("prefix_images / magi_vae: only MAGI-1 models take these; disconnect them for a "
                         f"{lm.family} model.")
    settings = DFSettings(width=w.width, height=w.height, num_frames=w.num_frames, steps=w.steps, cfg=w.cfg,
                          shift=w.shift, seed=w.seed, ar_step=w.ar_step, causal_block_size=w.causal_block_size,
                          base_num_frames=w.base_num_frames, overlap_history=w.overlap_history,
                          addnoise_condition=w.addnoise_condition, solver=w.solver)
    geometry = LatentGeometry(**lm.geometry)
    pipe = DiffusionForcingPipeline(lm.model, geometry, lm.text_len)
    plan = planned_once(lambda options, width, height: pipe.plan(replace(settings, width=width, height=height),
                                                                 cache, options))
    windows = plan(MemoryOptions(), w.width, w.height).windows  # every settings error now
    if isinstance(positive, PromptSchedule):  # each window reads the prompt at its first new frame
        cond = positive.check(settings.num_frames, geometry.temporal_stride)
        for i, e in enumerate(cond.entries, start=1):
            check_conditioning(e.states, lm.config.text_dim, lm.text_len, f"prompts entry {i}")
    else:
        cond = check_conditioning(conditioning_tensor(positive, "positive"), lm.config.text_dim, lm.text_len,
                                  "positive")
    uncond = None
    if w.cfg > 1.0:
        uncond = check_conditioning(conditioning_tensor(negative, "negative"), lm.config.text_dim, lm.text_len,
                                    "negative")
    if lm.latent_format == DEMO_CODEC:
        # The demo carries the overlap over in latent space, as the CLI's demo job does (same videos).
        if vae is not None:
            log.warning("FlowCache: the demo model has its own codec; the connected vae is not used.")
    elif lm.latent_format != WAN_FORMAT:
        raise InputError(f"model: its latent format is {lm.latent_format!r}; FlowCache Sampler expects Wan2.1 VAE "
                         f"latents ('wan21') or the built-in demo's ({DEMO_CODEC!r}).")
    elif vae is not None:
        pipe.codec = ComfyVAECodec(vae, after_call=lambda: comfy_bridge.load_to_device(model.patcher))
    elif len(windows) > 1:
        log.info("FlowCache: no vae connected; the %d-window video carries its overlap over in latent space "
                 "(SkyReels re-encodes it with the VAE).", len(windows))

    def job(hooks: RunHooks, run_plan):
        latents, stats = pipe(cond, uncond, run_plan.settings, cache, hooks, plan=run_plan)
        return sampler_latent(latents, lm.latent_format), stats

    return RunSpec(job, plan, geometry.spatial_stride * lm.config.patch_size[1])


def _magi_run(model: FlowCacheModel, w: SamplerWidgets, positive: Any, negative: Any, cache: CacheSettings,
              extras: dict) -> RunSpec:
    """MAGI-1 chunk-wise autoregression: width, height, num_frames, steps, shift, seed and causal_block_size
    (MAGI's chunk_width) apply; the diffusion-forcing widgets (cfg, ar_step, windows, solver) do not: distilled
    MAGI-1 has guidance built in and the base model uses MAGI's own guidance schedule."""
    vae, magi_vae, prefix_images = extras["vae"], extras["magi_vae"], extras["prefix_images"]
    lm = model.loaded
    if vae is not None:
        log.warning("FlowCache: MAGI-1 has its own VAE; the connected Wan vae is not used (use magi_vae).")
    settings = MagiSettings(num_frames=w.num_frames, width=w.width, height=w.height, num_steps=w.steps,
                            chunk_width=w.causal_block_size, shift=w.shift, seed=w.seed)
    pipe = MagiPipeline(lm.model, LatentGeometry(**lm.geometry), magi_vae)
    prefix = None
    if prefix_images is not None:
        if magi_vae is None:
            raise InputError("prefix_images: encoding the prefix needs the MAGI-1 VAE; connect FlowCache Load "
                             "MAGI-1 VAE to magi_vae.")
        prefix = prefix_images[..., :3].float()
    prefix_frames = prefix_latent_frames(prefix, pipe.geometry, pipe.codec)
    plan = planned_once(lambda options, width, height: pipe.plan(replace(settings, width=width, height=height),
                                                                 prefix_frames, cache, options))
    first = plan(MemoryOptions(), w.width, w.height)  # every settings error now
    switches: list[dict] = []
    if isinstance(positive, PromptSchedule):  # MAGI-1 takes a caption per chunk: each chunk its prompt's
        caption, mask, switches = magi_scheduled_captions(positive, lm.config.caption_channels, first, settings,
                                                          LatentGeometry(**lm.geometry).temporal_stride)
    else:
        caption, mask = magi_caption(positive, "positive", lm.config.caption_channels, first.chunk_num)

    def job(hooks: RunHooks, run_plan):
        latents, stats = pipe(caption, mask, run_plan.settings, cache, prefix, hooks, plan=run_plan)
        stats.switches = switches
        return sampler_latent(latents, MAGI_CODEC, settings.chunk_width), stats

    return RunSpec(job, plan, 16)


def _causal_run(model: FlowCacheModel, w: SamplerWidgets, positive: Any, negative: Any, cache: CacheSettings,
                extras: dict) -> RunSpec:
    """Causal Wan block by block (Self-Forcing, CausVid, Causal Forcing): no guidance, the negative is unused."""
    lm = model.loaded
    if extras["prefix_images"] is not None or extras["magi_vae"] is not None:
        raise InputError("prefix_images / magi_vae: only MAGI-1 models take these; disconnect them.")

    def conditioning(cond: Any, name: str):
        return check_conditioning(conditioning_tensor(cond, name), lm.config.text_dim, lm.text_len, name)

    job, plan, unit = causal_run(model, w, positive, cache, extras["causal"], conditioning)
    return RunSpec(job, planned_once(plan), unit)


def _krea_run(model: FlowCacheModel, w: SamplerWidgets, positive: Any, negative: Any, cache: CacheSettings,
              extras: dict) -> RunSpec:
    """Krea Realtime 14B: its own causal loop (a context rebuilt per block through the VAE); no guidance."""
    lm = model.loaded
    if extras["prefix_images"] is not None or extras["magi_vae"] is not None:
        raise InputError("prefix_images / magi_vae: only MAGI-1 models take these; disconnect them.")
    if extras["causal"] is not None:
        log.warning("FlowCache: Krea Realtime keeps its own context cache; FlowCache Causal Options is not used.")
    vae = extras["vae"]
    codec = None if vae is None else ComfyVAECodec(vae, after_call=lambda: comfy_bridge.load_to_device(model.patcher))

    def conditioning(cond: Any, name: str):
        return check_conditioning(conditioning_tensor(cond, name), lm.config.text_dim, lm.text_len, name)

    job, plan, unit = krea_run(model, w, positive, cache, codec, conditioning)
    return RunSpec(job, planned_once(plan), unit)


# The loaded model's loop picks its run (data, not a type switch); adding a loop adds a row here.
LOOP_RUNS: dict[str, Callable[..., RunSpec]] = {"diffusion_forcing": _wan_run, "causal": _causal_run,
                                                "longlive": _causal_run, "krea_realtime": _krea_run,
                                                "magi": _magi_run}
