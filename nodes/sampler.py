"""FlowCache Sampler: SkyReels-V2 diffusion forcing with FlowCache / TeaCache caching."""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..flowcache.cache.presets import CACHE_MODES, PRESET_NAMES, resolve_settings
from ..flowcache.errors import InputError
from ..flowcache.latent_format import wan_to_raw
from ..flowcache.pipelines.diffusion_forcing import (DFSettings, DiffusionForcingPipeline, LatentGeometry, StepInfo,
                                                     check_conditioning, plan_windows)
from ..flowcache.schedulers import SOLVERS
from . import comfy_bridge
from .demo import DEMO_CODEC
from .loader import FlowCacheModel
from .vae_codec import ComfyVAECodec

log = logging.getLogger("FlowCache")

MAX_SEED = 0xFFFFFFFFFFFFFFFF
SOLVER_NAMES = list(SOLVERS)  # unipc first: the default


def _int(default: int, lo: int, hi: int, tooltip: str, step: int = 1) -> tuple:
    # Frame counts keep step 1: the frontend snaps INT widgets to min + k·step, and the demo model (temporal
    # stride 1) needs counts such as 36 that a Wan-style step of 4 would not allow.
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def _float(default: float, lo: float, hi: float, step: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": step / 10, "tooltip": tooltip})


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


class FlowCacheSampler:
    """Generate a video with a diffusion-forcing model, reusing per-chunk computation (FlowCache)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("FLOWCACHE_MODEL", {"tooltip": "Model from FlowCache Load Model."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt: umT5-XXL text states (CLIP Text Encode with "
                                                         "a Wan text encoder), or FlowCache Demo Text Encode."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt (used when cfg > 1)."}),
                "width": _int(960, 16, 4096, "Video width in pixels; a multiple of 16.", 16),
                "height": _int(544, 16, 4096, "Video height in pixels; a multiple of 16.", 16),
                "num_frames": _int(97, 1, 10001, "Frames to generate: 4·k+1 for Wan. Longer than base_num_frames "
                                                 "runs several overlapping windows."),
                "steps": _int(50, 1, 1000, "Denoising steps per chunk."),
                "cfg": _float(6.0, 0.0, 30.0, 0.1, "Classifier-free guidance scale; ≤ 1 skips the negative "
                                                   "pass (twice as fast)."),
                "shift": _float(8.0, 0.0, 100.0, 0.1, "Flow-matching sigma shift (SkyReels uses 8 for "
                                                      "text-to-video)."),
                "seed": _int(1024, 0, MAX_SEED, "Noise seed; the same seed and settings give the same video."),
                "ar_step": _int(5, 0, 100, "Steps by which each chunk lags the previous one (0 = all chunks "
                                           "denoise together; 5 = SkyReels' asynchronous mode)."),
                "causal_block_size": _int(5, 1, 100, "Latent frames per chunk (the unit FlowCache caches)."),
                "base_num_frames": _int(97, 1, 10001, "Frames per window (the model's native length); 4·k+1 "
                                                      "for Wan."),
                "overlap_history": _int(17, 1, 10001, "Frames each new window re-uses from the previous one; "
                                                      "4·k+1 for Wan."),
                "addnoise_condition": _int(20, 0, 1000, "Noise added to the re-used frames of a new window "
                                                        "(SkyReels suggests 20; ≤ 50)."),
                "solver": (SOLVER_NAMES, {"default": "unipc",
                                          "tooltip": "Sampler: unipc (SkyReels' default) or euler."}),
                "cache": (list(CACHE_MODES), {"default": "flowcache",
                                              "tooltip": "off: compute every step; teacache: skip whole "
                                                         "steps; flowcache: decide per chunk."}),
                "preset": (list(PRESET_NAMES), {"default": "slow",
                                                "tooltip": "slow: best quality; fast: more reuse. custom uses "
                                                           "the threshold, warmup_steps, kv_budget and "
                                                           "mix_lambda widgets below."}),
                "threshold": _float(0.1, 0.0, 10.0, 0.005, "custom preset: accumulated change below which a "
                                                           "chunk reuses its cache (higher = faster)."),
                "warmup_steps": _int(5, 0, 1000, "custom preset: first steps of each chunk that are always "
                                                 "computed."),
                "kv_budget": _int(0, 0, 1000, "custom preset: chunks of clean history kept in the KV cache "
                                              "(0 = keep all, no compression)."),
                "mix_lambda": _float(0.07, 0.0, 1.0, 0.01, "custom preset: weight of attention importance "
                                                           "against redundancy when compressing the KV cache."),
                "keep_model_loaded": ("BOOLEAN", {"default": False,
                                                  "tooltip": "Keep the model on the GPU after sampling (faster "
                                                             "next run, less memory for other nodes)."}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "Wan2.1 VAE: re-encodes the overlap between windows as SkyReels does. "
                                           "Without it the overlap is carried over in latent space."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("Video latents; decode with FlowCache Decode (or VAE Decode for Wan models).",)
    FUNCTION = "sample"
    CATEGORY = "FlowCache"
    DESCRIPTION = ("SkyReels-V2 diffusion forcing with FlowCache: each chunk of frames decides per step whether "
                   "to recompute or reuse its cached result.")

    def sample(self, model: FlowCacheModel, positive: Any, negative: Any, width: int, height: int, num_frames: int,
               steps: int, cfg: float, shift: float, seed: int, ar_step: int, causal_block_size: int,
               base_num_frames: int, overlap_history: int, addnoise_condition: int, solver: str, cache: str,
               preset: str, threshold: float, warmup_steps: int, kv_budget: int, mix_lambda: float,
               keep_model_loaded: bool = False, vae: Any = None, unique_id: Any = None) -> dict:
        lm = model.loaded
        settings = DFSettings(width=width, height=height, num_frames=num_frames, steps=steps, cfg=cfg, shift=shift,
                              seed=seed, ar_step=ar_step, causal_block_size=causal_block_size,
                              base_num_frames=base_num_frames, overlap_history=overlap_history,
                              addnoise_condition=addnoise_condition, solver=solver)
        # Everything that can be wrong is checked here, before the model is moved or any step runs.
        cache_settings = resolve_settings(lm.preset_key, cache, preset, threshold, warmup_steps, kv_budget,
                                          mix_lambda, lm.extra_presets)
        geometry = LatentGeometry(**lm.geometry)
        windows = plan_windows(settings, geometry, lm.config.patch_size)
        cond = check_conditioning(conditioning_tensor(positive, "positive"), lm.config.text_dim, lm.text_len,
                                  "positive")
        uncond = None
        if cfg > 1.0:
            uncond = check_conditioning(conditioning_tensor(negative, "negative"), lm.config.text_dim,
                                        lm.text_len, "negative")
        codec = self._codec(lm.latent_format, vae, model)
        if len(windows) > 1 and codec is None and lm.latent_format == "wan21":
            log.info("FlowCache: no vae connected; the %d-window video carries its overlap over in latent space "
                     "(SkyReels re-encodes it with the VAE).", len(windows))

        log.info("FlowCache: sampling %dx%d, %d frames, %d steps, cache=%s (%s)", width, height, num_frames, steps,
                 cache, preset)
        comfy_bridge.load_to_device(model.patcher)
        try:
            pipe = DiffusionForcingPipeline(lm.model, geometry, lm.text_len, codec)
            latents, stats = pipe(cond, uncond, settings, cache_settings, self._on_step(unique_id))
        finally:
            if not keep_model_loaded:
                comfy_bridge.offload(model.patcher)

        summary = stats.summary()
        log.info("FlowCache: %s", summary)
        stats_dict = stats.to_dict()
        comfy_bridge.send_event("flowcache.stats", {"node": unique_id, "stats": stats_dict, "summary": summary})
        if lm.latent_format == "wan21":
            out = {"samples": wan_to_raw(latents)}
        else:
            out = {"samples": latents, "flowcache_codec": lm.latent_format}
        return {"ui": {"flowcache_stats": [stats_dict]}, "result": (out,)}

    @staticmethod
    def _codec(latent_format: str, vae: Any, model: FlowCacheModel) -> Any:
        if latent_format == DEMO_CODEC:
            # The demo carries the overlap over in latent space, as the CLI's demo job does (same videos).
            if vae is not None:
                log.warning("FlowCache: the demo model has its own codec; the connected vae is not used.")
            return None
        if latent_format != "wan21":
            raise InputError(f"model: latent format {latent_format!r} is not supported by this sampler.")
        if vae is None:
            return None
        return ComfyVAECodec(vae, after_call=lambda: comfy_bridge.load_to_device(model.patcher))

    @staticmethod
    def _on_step(unique_id: Any):
        state: dict[str, Any] = {"pbar": None}

        def on_step(info: StepInfo) -> None:
            comfy_bridge.check_interrupted()
            if state["pbar"] is None:
                state["pbar"] = comfy_bridge.progress_bar(info.total, unique_id)
            state["pbar"].update_absolute(info.done, info.total)  # inside ComfyUI also a cancel point
            comfy_bridge.send_event("flowcache.progress", {"node": unique_id, "text": info.text(),
                                                           "value": info.done, "max": info.total})

        return on_step

