"""FlowCache Decode: LATENT -> IMAGE for any FlowCache latents (the demo's, MAGI-1's, Wan2.1's)."""
from __future__ import annotations

from typing import Any

import torch

from ..flowcache.errors import InputError
from .comfy_v3 import io
from .latents import decoder_inputs, tagged_decoder


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
                *decoder_inputs("The Wan2.1 VAE (wan_2.1_vae). Needed for SkyReels-V2 / Wan models; the built-in "
                                "demo decodes without one."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="Decoded video frames.")])

    @classmethod
    def execute(cls, samples: dict, vae: Any = None, magi_vae: Any = None) -> io.NodeOutput:
        return io.NodeOutput(decode_latents(samples, vae, magi_vae))


def decode_latents(samples: dict, vae: Any = None, magi_vae: Any = None) -> torch.Tensor:
    """FlowCache Decode's frames [N, H, W, 3] for any FlowCache latents."""
    tagged = tagged_decoder(samples, magi_vae)
    latents = samples["samples"]
    if tagged is not None:  # piece by piece, as the codec decodes (MAGI-1: each chunk on its own)
        decode, piece = tagged
        return torch.cat([decode(latents[:, :, a:a + piece]) for a in range(0, latents.shape[2], piece)]).float().cpu()
    if vae is None:
        raise InputError("vae: these latents are Wan VAE latents; connect a Load VAE node with the Wan2.1 VAE "
                         "(wan_2.1_vae) to the vae input.")
    if latents.dim() != 5:
        raise InputError(f"samples: expected video latents [B, 16, F, h, w], got {list(latents.shape)}.")
    images = vae.decode(latents)
    if images.dim() == 5:  # ComfyUI's VAE returns [B, T, H, W, 3] for video; IMAGE is a flat frame batch
        images = images.reshape(-1, *images.shape[-3:])
    return images
