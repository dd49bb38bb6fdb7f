"""FlowCache Decode & Save Video: LATENT -> a video file, decoded chunk by chunk in flat memory.

Frames go from the decoder straight into the encoder, so a 1,000-frame video never exists as one float IMAGE
tensor. The file is written under a temporary name and renamed when complete: a cancelled or failed run
leaves nothing behind.
"""
from __future__ import annotations

import logging
from typing import Any

from ..flowcache.decode_save import StreamDecoder, stream_decode_to_video
from ..flowcache.errors import InputError
from ..flowcache.models.wan_vae import build_wan_vae
from . import comfy_bridge
from .comfy_v3 import check_choices, hidden_value, io
from .latents import decoder_inputs, tagged_decoder
from .video import DEFAULT_FORMAT, FILENAME_OUTPUT, check_output, file_inputs, open_output, preview

log = logging.getLogger("FlowCache")


def wan_stream_from_comfy(vae: Any) -> StreamDecoder:
    """A streaming Wan2.1 decoder over the weights of ComfyUI's VAE (its module names are Wan's own), keeping
    the causal cache between chunks, so the frames equal one whole decode."""
    module = getattr(vae, "first_stage_model", None)
    if module is None or not hasattr(module, "state_dict"):
        raise InputError("vae: expected ComfyUI's VAE holding the Wan2.1 VAE (Load VAE with wan_2.1_vae).")
    device = comfy_bridge.vae_device()
    wan = build_wan_vae(module.state_dict(), "vae (Load VAE)", "fp32" if device.type == "cpu" else "auto", device)
    return wan.stream("raw")


def latent_stream(samples: dict, vae: Any, magi_vae: Any) -> tuple[StreamDecoder, int]:
    """The decoder for these latents and how many latent frames to decode per piece."""
    tagged = tagged_decoder(samples, magi_vae)
    if tagged is not None:
        return tagged
    if vae is None:
        raise InputError("vae: these are Wan2.1 latents; connect Load VAE with the Wan2.1 VAE (wan_2.1_vae).")
    return wan_stream_from_comfy(vae), 4


class FlowCacheDecodeSave(io.ComfyNode):
    """Decode latents piece by piece straight into a video file (long videos in flat memory)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCacheDecodeSave", display_name="FlowCache Decode & Save Video", category="FlowCache",
            description="Decodes a video chunk by chunk straight into the encoder: memory stays flat however long "
                        "the video is. Cancel leaves no partial file.",
            inputs=[
                io.Latent.Input("samples", tooltip="Latents from FlowCache Sampler."),
                *file_inputs(),
                *decoder_inputs("The Wan2.1 VAE (wan_2.1_vae), for SkyReels-V2 / Wan latents."),
            ],
            outputs=[io.String.Output(display_name="filename", tooltip=FILENAME_OUTPUT)],
            hidden=[io.Hidden.unique_id], is_output_node=True)

    @classmethod
    def validate_inputs(cls, format: str) -> bool | str:
        return check_choices(cls, format=format)

    @classmethod
    def execute(cls, samples: dict, frame_rate: float = 24.0, loop_count: int = 0, filename_prefix: str = "FlowCache",
                format: str = DEFAULT_FORMAT, crf: int = 19, vae: Any = None,
                magi_vae: Any = None) -> io.NodeOutput:
        unique_id = hidden_value(cls, "unique_id")
        check_output(filename_prefix, format, frame_rate, loop_count, crf)  # before the VAE is even built
        decode, piece = latent_stream(samples, vae, magi_vae)
        latents = samples["samples"]
        if latents.dim() != 5 or latents.shape[0] != 1:
            raise InputError(f"samples: expected one video's latents [1, C, F, h, w], got {list(latents.shape)}.")
        fmt, path, subfolder, filename = open_output(filename_prefix, format, frame_rate, loop_count, crf)
        total = int(latents.shape[2])
        pbar = comfy_bridge.progress_bar(total, unique_id)

        def on_progress(done: int, _total: int | None) -> None:
            comfy_bridge.check_interrupted()  # raising here makes the writer drop its temporary file
            pbar.update_absolute(done, total)

        frames = 0

        def counted(z):
            nonlocal frames
            out = decode(z)
            frames += int(out.shape[0])
            return out

        stream_decode_to_video(latents, counted, path, fmt.name, frame_rate, piece, on_progress, crf, loop_count)
        log.info("FlowCache: decoded %d latent frames into %s (%d frames)", total, path, frames)
        return preview(fmt, subfolder, filename, frame_rate, frames, path)

