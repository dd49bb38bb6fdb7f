"""FlowCache Video Combine: frames -> an mp4/webm/gif/webp file in the output folder, with a preview.

``file_inputs``, ``open_output`` and ``preview`` are shared with FlowCache Decode & Save Video.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..flowcache.errors import InputError
from ..flowcache.video import (FORMATS, VideoFormat, VideoWriter, check_output_prefix, check_writer_options,
                               resolve_output_path)
from . import comfy_bridge
from .comfy_v3 import check_choices, io

log = logging.getLogger("FlowCache")

DEFAULT_FORMAT = "video/h264-mp4"


def file_inputs() -> list:
    """The output file's widgets (shared with FlowCache Decode & Save Video), in the saved workflows' order."""
    return [
        io.Float.Input("frame_rate", default=24.0, min=0.01, max=240.0, step=1.0,
                       tooltip="Frames per second (SkyReels-V2 and MAGI-1 are trained at 24)."),
        io.Int.Input("loop_count", default=0, min=0, max=100,
                     tooltip="gif/webp only: extra plays after the first (0 = loop forever)."),
        io.String.Input("filename_prefix", default="FlowCache",
                        tooltip="File name, or a relative path such as 'video/flowcache', inside the output "
                                "folder; a counter is appended."),
        io.Combo.Input("format", options=list(FORMATS), default=DEFAULT_FORMAT,
                       tooltip="Container and codec: h264 mp4 plays everywhere; webm is VP9; gif/webp are animated "
                               "images."),
        io.Int.Input("crf", default=19, min=0, max=63,
                     tooltip="mp4/webm quality: lower is better and bigger (mp4 0..51, webm 0..63)."),
    ]


FILENAME_OUTPUT = "Full path of the written file."


def check_output(filename_prefix: str, format: str, frame_rate: float, loop_count: int = 0,
                 crf: int = 19) -> VideoFormat:
    """Check the file widgets, creating nothing, so a bad value fails before any decoding or encoding."""
    if format not in FORMATS:
        raise InputError(f"format={format!r}: must be one of {', '.join(FORMATS)}.")
    if not math.isfinite(frame_rate) or frame_rate <= 0:
        raise InputError(f"frame_rate={frame_rate}: must be a positive number of frames per second.")
    fmt = FORMATS[format]
    check_writer_options(fmt, frame_rate, loop_count, crf)
    # OutputPathError / InputError name filename_prefix when it would leave the output folder, turn an existing
    # file into a folder, or be too long for the file system.
    check_output_prefix(comfy_bridge.output_directory(), filename_prefix, fmt.extension)
    return fmt


def open_output(filename_prefix: str, format: str, frame_rate: float, loop_count: int = 0,
                crf: int = 19) -> tuple[VideoFormat, Path, str, str]:
    """Check the file widgets and pick the output file: (format, full path, subfolder, file name)."""
    fmt = check_output(filename_prefix, format, frame_rate, loop_count, crf)
    path, subfolder, filename = resolve_output_path(comfy_bridge.output_directory(), filename_prefix, fmt.extension)
    return fmt, path, subfolder, filename


def preview(fmt: VideoFormat, subfolder: str, filename: str, frame_rate: float, frames: int,
            path: Path) -> io.NodeOutput:
    """The node's result in ComfyUI's core preview format, plus the file path as its STRING output."""
    entry = {"filename": filename, "subfolder": subfolder, "type": "output", "format": fmt.name,
             "frame_rate": frame_rate, "frames": frames}
    # The stock frontend plays {"images": [...], "animated": [True]} in a <video>, except names containing
    # "webp"/"png" which it shows as an <img>; a gif in a <video> would not play, so it gets a still preview.
    animated = fmt.is_video or fmt.extension == "webp"
    return io.NodeOutput(str(path), ui={"images": [entry], "animated": [animated]})


class FlowCacheVideoCombine(io.ComfyNode):
    """Write frames to a video file under ComfyUI's output folder and show it on the node."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCacheVideoCombine", display_name="FlowCache Video Combine", category="FlowCache",
            description="Saves frames as a video in the output folder and previews it.",
            inputs=[io.Image.Input("images", tooltip="Frames to write, in order."), *file_inputs()],
            outputs=[io.String.Output(display_name="filename", tooltip=FILENAME_OUTPUT)],
            is_output_node=True)

    @classmethod
    def validate_inputs(cls, format: str) -> bool | str:
        return check_choices(cls, format=format)

    @classmethod
    def execute(cls, images: torch.Tensor, frame_rate: float = 24.0, loop_count: int = 0,
                filename_prefix: str = "FlowCache", format: str = DEFAULT_FORMAT, crf: int = 19) -> io.NodeOutput:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"images: expected an IMAGE batch [frames, H, W, C], got {shape}.")
        fmt, path, subfolder, filename = open_output(filename_prefix, format, frame_rate, loop_count, crf)
        with VideoWriter(path, fmt, frame_rate, loop_count=loop_count, crf=crf) as writer:
            for start in range(0, images.shape[0], 16):  # stream: never one uint8 copy of the whole clip
                writer.write(images[start:start + 16, :, :, :3])
        log.info("FlowCache: wrote %s (%d frames)", path, writer.frames_written)
        return preview(fmt, subfolder, filename, frame_rate, writer.frames_written, path)
