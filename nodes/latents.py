"""The LATENT a FlowCache run returns, and which decoder its latents need: both written once, for the sampler's
loops and for the two decode nodes.

Wan2.1 latents leave in ComfyUI's raw Wan space (``{"samples": raw}``: any VAE Decode takes them). Latents of the
built-in demo and of MAGI-1 carry their codec under ``"flowcache_codec"``; MAGI-1's also the chunk width its VAE
decodes by (``"flowcache_chunk_width"``).
"""
from __future__ import annotations

from typing import Any

import torch

from ..flowcache.decode_save import StreamDecoder, framewise_decoder
from ..flowcache.errors import InputError
from ..flowcache.latent_format import wan_to_raw
from .comfy_v3 import FLOWCACHE_MAGI_VAE, io
from .demo import require_demo

WAN_FORMAT = "wan21"  # a loaded model's latent_format for Wan2.1 VAE latents
DEMO_CODEC = "demo"   # "flowcache_codec" of demo-space latents
MAGI_CODEC = "magi"   # "flowcache_codec" of MAGI-1 latents (raw VAE latents x 0.18215)
DEMO_PIECE = 4        # latent frames the demo codec decodes at a time (framewise: any piece is exact)


def sampler_latent(latents: torch.Tensor, codec: str, chunk_width: int | None = None) -> dict:
    """The LATENT of a run's model-space latents [1, C, F, h, w]: ``codec`` is the model's latent format
    (``WAN_FORMAT``, ``DEMO_CODEC``) or ``MAGI_CODEC`` with MAGI-1's ``chunk_width``."""
    if codec == WAN_FORMAT:
        return {"samples": wan_to_raw(latents)}
    out = {"samples": latents, "flowcache_codec": codec}
    if chunk_width is not None:
        out["flowcache_chunk_width"] = chunk_width
    return out


def decoder_inputs(vae_tooltip: str) -> list:
    """The decode nodes' decoder inputs, both optional: the one that matches the latents (the demo's needs none)."""
    return [io.Vae.Input("vae", optional=True, tooltip=vae_tooltip),
            FLOWCACHE_MAGI_VAE.Input("magi_vae", optional=True, tooltip="MAGI-1's VAE, for MAGI-1 latents.")]


def tagged_decoder(samples: Any, magi_vae: Any) -> tuple[StreamDecoder, int] | None:
    """For latents tagged with a FlowCache codec: a fresh stream decoder and the latent frames per piece it
    decodes; None for Wan2.1 latents (the ``vae`` input decodes them). Raises naming the missing input."""
    if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
        raise InputError("samples: expected a LATENT from FlowCache Sampler.")
    kind = samples.get("flowcache_codec")
    if kind is None:
        return None
    if kind == DEMO_CODEC:
        return framewise_decoder(require_demo("samples").load_demo_codec()), DEMO_PIECE
    if kind == MAGI_CODEC:
        if magi_vae is None:
            raise InputError("magi_vae: these are MAGI-1 latents; connect FlowCache Load MAGI-1 VAE to magi_vae.")
        return magi_vae.stream_decoder(), int(samples.get("flowcache_chunk_width", 6))
    raise InputError(f"samples: latents of an unknown codec {kind!r} (known: {DEMO_CODEC}, {MAGI_CODEC}, or none "
                     "for Wan2.1 latents).")
