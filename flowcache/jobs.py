"""Headless jobs behind the CLI: the demo (the pack's main job) and generate."""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .cache import CacheSettings
from .errors import InputError
from .metrics import psnr
from .checkpoint import compute_dtype, save_safetensors
from .memory import auto_plan, available_bytes, host_available_bytes
from .models import LoadedModel, load_model
from .pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry, plan_windows
from .presets import resolve_cache
from .progress import Progress
from .runner import RunHooks
from .stats import RunStats
from .video import write_video


@dataclass
class SamplingKit:
    """A model with what sampling it needs: a text encoder (``encode(prompt) -> [1, S, text_dim]``), a codec
    (``decode(latents) -> frames``) and default settings. The demo's, or a checkpoint's for ``bench``."""

    loaded: LoadedModel
    text: object
    codec: object
    settings: DFSettings

    def pipeline(self) -> DiffusionForcingPipeline:
        return DiffusionForcingPipeline(self.loaded.model, LatentGeometry(**self.loaded.geometry),
                                        self.loaded.text_len, codec=None)

    def cache(self, method: str, preset: str, **custom) -> CacheSettings:
        return resolve_cache(self.loaded.preset_key, method, preset, self.loaded.extra_presets, **custom)

    def sample(self, prompt: str, seed: int, cache: CacheSettings, hooks: RunHooks | None = None,
               policy=None, **overrides) -> tuple[torch.Tensor, RunStats]:
        """Pixels [T, H, W, 3] in 0..1 and the run's stats; ``hooks``: progress (and cancel) of the run;
        ``policy``: instead of the one ``cache`` names (e.g. replaying another run's decisions)."""
        s = DFSettings(**{**self.settings.__dict__, **overrides, "seed": seed})
        cond = self.text.encode(prompt)
        uncond = self.text.encode("")
        z, stats = self.pipeline()(cond, uncond, s, cache, hooks, policy)
        return self.codec.decode(z), stats


def load_demo_kit(model_path: str | Path | None = None) -> SamplingKit:
    """The demo model (default: the shipped one; or a demo-format file, e.g. one just trained elsewhere, with
    its text embedding beside it) at the demo's settings."""
    from . import demo  # shipped assets; imported lazily so the core works without them

    path = Path(model_path) if model_path is not None else demo.demo_model_path()
    loaded = load_model(path, dtype="fp32")
    if loaded.preset_key != "demo":
        raise InputError(f"{path.name}: not a demo model file (its preset key is {loaded.preset_key!r}); "
                         "demo files come from python -m flowcache.demo.train.")
    known = {f.name for f in fields(DFSettings)}
    settings = DFSettings(**{k: v for k, v in demo.DEMO_SETTINGS.items() if k in known})
    return SamplingKit(loaded, demo.load_demo_text(path), demo.load_demo_codec(path), settings)


class SeededTextStates:
    """Stand-in text states for benchmarking a checkpoint without its text encoder: a prompt's states are
    seeded by its text (the same prompt gives the same states), the empty prompt gives zeros like padding.
    The cache schedule depends only on the timestep embedding, so timings stay representative."""

    def __init__(self, text_dim: int, tokens: int = 64):
        self.text_dim, self.tokens = text_dim, tokens

    def encode(self, prompt: str) -> torch.Tensor:
        if not prompt:
            return torch.zeros(1, self.tokens, self.text_dim)
        gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
        return torch.randn(1, self.tokens, self.text_dim, generator=gen)


class LatentPreview:
    """Frames for quality metrics when no VAE is given: the first three latent channels through one fixed
    affine map to 0..1. The same map for every mode, so PSNR/SSIM compare runs in latent space."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, C, F, h, w] -> [F, h, w, 3] in 0..1."""
        return (latents[0, :3].float().permute(1, 2, 3, 0).cpu() * 0.25 + 0.5).clamp(0, 1)


RANDOM_WAN = {"random-wan-1.3B": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, has_fps=True),
              "random-wan-14B": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, has_fps=True)}


def load_checkpoint_kit(model: str, device: str = "cpu", dtype: str = "auto", vae: str | None = None,
                        **settings) -> SamplingKit:
    """A ``SamplingKit`` for a Wan/SkyReels checkpoint, or for ``random-wan-1.3B`` / ``random-wan-14B`` (the
    released architectures with random weights, built on ``device``: no download needed to time them).
    Text states are seeded stand-ins; ``vae`` (a Wan2.1 VAE file) decodes for PSNR/SSIM, else latents are
    compared. ``settings`` override SkyReels' defaults (540P, 177 frames)."""
    from .models.wan import WanConfig, WanDiT

    known = {f.name for f in fields(DFSettings)}
    bad = sorted(set(settings) - known)
    if bad:
        raise InputError(f"unknown setting(s) {bad}; known: {sorted(known)}")
    dev = torch.device(device)
    if model in RANDOM_WAN:
        dt = compute_dtype(dtype, "bf16" if dev.type == "cuda" else "fp32")  # as if stored in the usual dtype
        torch.manual_seed(0)
        with dev:
            net = WanDiT(WanConfig(**RANDOM_WAN[model]))
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.02)
        net = net.to(dt).eval().requires_grad_(False)
        loaded = LoadedModel("wan", net, net.cfg, model, "", "random", f"wan-{net.cfg.size_name}")
    else:
        loaded = load_model(model, dtype=dtype, expect="wan")
        loaded.model.to(dev)
    codec: object = LatentPreview()
    if vae:
        from .models.wan_vae import WanVAECodec, load_wan_vae

        codec = WanVAECodec(load_wan_vae(vae, device=dev))
    text = SeededTextStates(loaded.config.text_dim, min(64, loaded.text_len))
    return SamplingKit(loaded, text, codec, DFSettings(**settings))


def run_demo(prompt: str | None = None, preset: str = "fast", out: str | Path = "out/demo.mp4", seed: int = 0,
             num_frames: int | None = None, steps: int | None = None, compare: bool = True,
             progress: Progress | None = None) -> dict:
    """Generate a demo video with FlowCache and write it; with ``compare``, then also run uncached and report the
    wall speedup and PSNR. ``progress``: phase lines and step bars (the CLI's; default: silent)."""
    from . import demo

    progress = progress or Progress.off()
    out = Path(out)
    fmt = {".mp4": "video/h264-mp4", ".webm": "video/webm", ".gif": "image/gif", ".webp": "image/webp"}.get(out.suffix)
    if fmt is None:  # checked before any sampling
        raise InputError(f"--out {out}: use a .mp4, .webm, .gif or .webp file name.")
    kit = load_demo_kit()
    prompt = prompt or demo.DEMO_PROMPTS[0]
    over = {k: v for k, v in (("num_frames", num_frames), ("steps", steps)) if v is not None}
    cache = kit.cache("flowcache", preset)
    s = DFSettings(**{**kit.settings.__dict__, **over})
    plan_windows(s, LatentGeometry(**kit.loaded.geometry), kit.loaded.config.patch_size)  # bad settings: now
    kit.text.encode(prompt)  # words the demo does not know: now
    progress.say(f"sampling with FlowCache ({preset} preset): {s.num_frames} frames, {s.steps} steps, "
                 f"prompt {prompt!r} ...")
    t0 = time.perf_counter()
    with progress.run(f"flowcache {preset}") as hooks:
        video, stats = kit.sample(prompt, seed, cache, hooks, **over)
    t_fast = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    write_video(video, out, fmt, fps=kit.settings.fps)  # written now: the comparison run is extra
    progress.say(f"wrote {out} ({int(video.shape[0])} frames, prompt {prompt!r})")
    result = {"prompt": prompt, "preset": preset, "seed": seed, "frames": int(video.shape[0]), "out": str(out),
              "flowcache_seconds": round(t_fast, 2), "forwards": stats.forwards, "model_calls": stats.model_calls,
              "flops_speedup": round(stats.flops_speedup, 2)}
    if compare:
        progress.say("sampling again with the cache off, for comparison (every chunk computed every step) ...")
        t0 = time.perf_counter()
        with progress.run("uncached") as hooks:
            ref, ref_stats = kit.sample(prompt, seed, kit.cache("off", "slow"), hooks, **over)
        t_off = time.perf_counter() - t0
        result.update(off_seconds=round(t_off, 2), off_forwards=ref_stats.forwards, off_model_calls=ref_stats.model_calls,
                      wall_speedup=round(t_off / t_fast, 2), psnr_db=round(psnr(video, ref), 2))
    return result


def generate(checkpoint: str, cond_path: str, out: str, uncond_path: str | None = None, vae_path: str | None = None,
             cache_mode: str = "flowcache", preset: str = "slow", dtype: str = "auto", device: str = "cpu",
             progress: Progress | None = None, kv_placement: str = "auto", kv_dtype: str = "auto",
             **settings) -> dict:
    """Run the DF pipeline from a checkpoint and saved text states (safetensors with a 'context' tensor).

    Writes a video when a VAE is given (or the model is the demo), else the latents as safetensors.
    ``progress``: phase lines and a step bar (the CLI's; default: silent). ``kv_placement`` / ``kv_dtype``: as
    FlowCache Cache's widgets (auto: the fastest memory plan that fits the device).
    """
    from safetensors.torch import load_file

    progress = progress or Progress.off()
    lm = load_model(checkpoint, dtype=dtype, expect="wan")
    lm.model.to(device)

    def read_ctx(p: str) -> torch.Tensor:
        d = load_file(p)
        if "context" not in d:
            raise InputError(f"{p}: expected a tensor named 'context' [1, tokens, {lm.config.text_dim}].")
        return d["context"]
    cond = read_ctx(cond_path)
    uncond = read_ctx(uncond_path) if uncond_path else torch.zeros_like(cond)
    known = {f.name for f in fields(DFSettings)}
    bad = sorted(set(settings) - known)
    if bad:
        raise InputError(f"unknown setting(s) {bad}; known: {sorted(known)}")
    s = DFSettings(**settings)
    codec = None
    if vae_path:
        from .models.wan_vae import WanVAECodec, load_wan_vae
        codec = WanVAECodec(load_wan_vae(vae_path).to(device))
    elif lm.latent_format == "demo":
        from . import demo
        codec = demo.load_demo_codec()
    geometry = LatentGeometry(**lm.geometry)
    pipe = DiffusionForcingPipeline(lm.model, geometry, lm.text_len, codec=codec if vae_path else None)
    cache = replace(resolve_cache(lm.preset_key, cache_mode, preset, lm.extra_presets), kv_placement=kv_placement,
                    kv_dtype=kv_dtype)
    dev = torch.device(device)
    plan, note = auto_plan(lambda options, w, h: pipe.plan(replace(s, width=w, height=h), cache, options),
                           cache.kv_placement, cache.kv_dtype, s.width, s.height, s.num_frames, dev,
                           available_bytes(dev), host_available_bytes(), geometry.spatial_stride * lm.config.patch_size[1],
                           where="generate")
    if note:
        progress.say(f"note: {note}")
    # said once the inputs are checked: a refusal stays the one line the CLI prints
    progress.say(f"sampling {lm.checkpoint} ({cache_mode}, {preset}): {s.width}x{s.height}, {s.num_frames} frames, "
                 f"{s.steps} steps on {device} ...")
    with progress.run(cache_mode) as hooks:
        z, stats = pipe(cond.to(device), uncond.to(device), plan.settings, cache, hooks, plan=plan)
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    if codec is None:
        out_p = out_p.with_suffix(".safetensors")
        save_safetensors({"latents": z.contiguous()}, out_p, {"space": "model", "stats": stats.to_json()})
    else:
        progress.say(f"decoding and writing {out_p} ...")
        write_video(codec.decode(z), out_p, "video/h264-mp4", fps=s.fps)
    return {"out": str(out_p), "stats": json.loads(stats.to_json())}
