"""The built-in CPU demo: its text encoder as a node, and a decoder for both demo and Wan latents."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

import torch

from ..flowcache.errors import FlowCacheError, InputError, led_by
from .comfy_v3 import FLOWCACHE_MAGI_VAE, io
from .magi import MAGI_CODEC

log = logging.getLogger("FlowCache")

DEMO_ENTRY = "flowcache-demo (built-in, runs on CPU)"
DEMO_CODEC = "demo"  # value of a LATENT's "flowcache_codec" key for demo-space latents


def demo_module() -> ModuleType | None:
    """``flowcache.demo`` when it is installed and complete, else None (imported lazily: it is optional)."""
    try:
        mod = importlib.import_module("..flowcache.demo", __package__)
    except ImportError:
        return None
    except Exception as e:  # a broken demo must not take the other nodes down with it
        log.warning("FlowCache: the built-in demo failed to import: %s: %s", type(e).__name__, e)
        return None
    needed = ("demo_model_path", "load_demo_text", "load_demo_codec")
    return mod if all(hasattr(mod, n) for n in needed) else None


def _require_demo(widget: str) -> ModuleType:
    demo = demo_module()
    if demo is None:
        raise InputError(f"{widget}: the built-in demo (flowcache/demo) is not installed with this copy of the pack.")
    return demo


def default_prompt() -> str:
    demo = demo_module()
    prompts: Any = getattr(demo, "DEMO_PROMPTS", None) if demo is not None else None
    if isinstance(prompts, dict):
        prompts = list(prompts.values())
    if isinstance(prompts, str):
        return prompts
    if isinstance(prompts, (list, tuple)) and prompts:
        return str(prompts[0])
    return ""


class FlowCacheDemoTextEncode(io.ComfyNode):
    """Encode a prompt with the demo's tiny text encoder (only for the built-in demo model)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCacheDemoTextEncode", display_name="FlowCache Demo Text Encode", category="FlowCache",
            description="Text encoder of the built-in CPU demo model.",
            inputs=[io.String.Input(
                "prompt", multiline=True, default=default_prompt(),
                tooltip="Text for the built-in demo model. It knows only the few scenes it was trained on; real Wan "
                        "models need CLIP Text Encode with a umT5-XXL text encoder.")],
            outputs=[io.Conditioning.Output(
                tooltip="Demo text conditioning, for FlowCache Sampler with the demo model.")])

    @classmethod
    def execute(cls, prompt: str) -> io.NodeOutput:
        encoder = _require_demo("prompt").load_demo_text()
        try:
            states = encoder.encode(prompt)
        except FlowCacheError as e:
            raise led_by("prompt", e) from e
        return io.NodeOutput([[states, {"pooled_output": None}]])


class FlowCacheDecode(io.ComfyNode):
    """LATENT -> IMAGE: demo latents through the demo codec, MAGI-1 latents through MAGI-1's VAE, Wan latents
    through the connected VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCacheDecode", display_name="FlowCache Decode", category="FlowCache",
            description="Decodes FlowCache latents to video frames (demo codec, MAGI-1 VAE or the Wan VAE). For long "
                        "videos prefer FlowCache Decode & Save Video, which never holds all frames at once.",
            inputs=[
                io.Latent.Input("samples", tooltip="Latents from FlowCache Sampler."),
                # the decoder: the one that matches the latents (the demo's needs none)
                io.Vae.Input("vae", optional=True,
                             tooltip="The Wan2.1 VAE (wan_2.1_vae). Needed for SkyReels-V2 / Wan models; the "
                                     "built-in demo decodes without one."),
                FLOWCACHE_MAGI_VAE.Input("magi_vae", optional=True, tooltip="MAGI-1's VAE, for MAGI-1 latents."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="Decoded video frames.")])

    @classmethod
    def execute(cls, samples: dict, vae: Any = None, magi_vae: Any = None) -> io.NodeOutput:
        return io.NodeOutput(decode_latents(samples, vae, magi_vae))


def decode_latents(samples: dict, vae: Any = None, magi_vae: Any = None) -> torch.Tensor:
    """FlowCache Decode's frames [N, H, W, 3] for any FlowCache latents."""
    latents = samples["samples"]
    if samples.get("flowcache_codec") == DEMO_CODEC:
        frames = _require_demo("samples").load_demo_codec().decode(latents)
        return frames.float().cpu()
    if samples.get("flowcache_codec") == MAGI_CODEC:
        if magi_vae is None:
            raise InputError("magi_vae: these are MAGI-1 latents; connect FlowCache Load MAGI-1 VAE to magi_vae.")
        piece = int(samples.get("flowcache_chunk_width", 6))  # MAGI-1 decodes each chunk on its own
        decode = magi_vae.stream_decoder()
        return torch.cat([decode(latents[:, :, a:a + piece]) for a in range(0, latents.shape[2], piece)])
    if vae is None:
        raise InputError("vae: these latents are Wan VAE latents; connect a Load VAE node with the Wan2.1 VAE "
                         "(wan_2.1_vae) to the vae input.")
    if latents.dim() != 5:
        raise InputError(f"samples: expected video latents [B, 16, F, h, w], got {list(latents.shape)}.")
    images = vae.decode(latents)
    if images.dim() == 5:  # ComfyUI's VAE returns [B, T, H, W, 3] for video; IMAGE is a flat frame batch
        images = images.reshape(-1, *images.shape[-3:])
    return images
