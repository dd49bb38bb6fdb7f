"""Decode latents chunk by chunk straight into a video file, in flat memory.

A 1,000-frame video never exists as one float tensor: each chunk of latents is decoded, its frames go into a
``flowcache.video.VideoWriter`` and are dropped before the next chunk. (gif/webp still collect uint8 frames,
because Pillow writes animations at the end.) The writer works on a temporary file, so an exception, e.g. a
cancel raised by ``on_progress``, leaves no file behind.

Decoders follow one tiny protocol, ``StreamDecoder``: called with consecutive latent chunks of ONE video, in
order, it returns each chunk's frames. Stateful decoders (the Wan VAE, whose causal convs look back across
chunks) keep their state between calls, so a fresh one is needed per video:
- ``wan_stream_decoder(vae)``: the Wan2.1 VAE with its causal cache (exact: equals one whole decode);
- ``framewise_decoder(codec)``: any ``codec.decode(z) -> [T,H,W,3]`` without temporal context
  (temporal stride 1, e.g. the demo codec), where decoding chunks separately is exact.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch

from .errors import InputError
from .models.wan_vae import StreamingDecoder, WanVAE
from .video import VideoWriter


@runtime_checkable
class StreamDecoder(Protocol):
    def __call__(self, z_chunk: torch.Tensor) -> torch.Tensor:
        """Latents [1,C,k,h,w] (the next k latent frames of the video) -> frames [n,H,W,3] in 0..1."""
        ...


def wan_stream_decoder(vae: WanVAE, latent_space: str = "model", latents_per_step: int = 1) -> StreamingDecoder:
    """A fresh Wan2.1 VAE stream. ``latent_space``: "model" (the DiT's normalised latents) or "raw" (ComfyUI)."""
    return vae.stream(latent_space, latents_per_step)


def framewise_decoder(codec: Any) -> StreamDecoder:
    """Wrap a stateless ``codec.decode(z [1,C,k,h,w]) -> [T,H,W,3]`` whose frames depend only on their own latent."""
    stride = getattr(codec, "temporal_stride", 1)
    if stride != 1:
        raise InputError(f"{type(codec).__name__} has temporal stride {stride}: its latents share causal context, so "
                         "decoding chunks separately would not match a whole decode. Use its streaming decoder "
                         "(e.g. wan_stream_decoder(vae)).")
    return codec.decode


def as_stream_decoder(obj: Any) -> StreamDecoder:
    """Turn what the caller has into a ``StreamDecoder`` (a fresh stream for codecs that offer one)."""
    if isinstance(obj, WanVAE):
        raise InputError("pass WanVAECodec(vae) or wan_stream_decoder(vae, latent_space='model'|'raw'), so the "
                         "latent space is explicit")
    if hasattr(obj, "stream_decoder"):
        return obj.stream_decoder()
    if callable(obj):
        return obj
    if hasattr(obj, "decode"):
        return framewise_decoder(obj)
    raise InputError(f"{type(obj).__name__} cannot decode latents (no stream_decoder(), __call__ or decode())")


def _chunks(latents: torch.Tensor | Iterable[torch.Tensor], n: int) -> tuple[Iterator[torch.Tensor], int | None]:
    if not isinstance(latents, torch.Tensor):
        return iter(latents), None
    z = latents[None] if latents.dim() == 4 else latents
    if z.dim() != 5 or z.shape[0] != 1:
        raise InputError(f"latents must be [1, C, F, h, w], got {list(latents.shape)}")
    return (z[:, :, a:a + n] for a in range(0, z.shape[2], n)), int(z.shape[2])


def stream_decode_to_video(latents: torch.Tensor | Iterable[torch.Tensor], decoder: Any,
                           path: str | os.PathLike[str], fmt: str = "video/h264-mp4", fps: float = 24.0,
                           chunk_latents: int = 4, on_progress: Callable[[int, int | None], None] | None = None,
                           crf: int = 19, loop_count: int = 0) -> Path:
    """Decode ``latents`` chunk by chunk into the video file ``path``; return ``path``.

    latents: one tensor [1,C,F,h,w] (cut into ``chunk_latents``-frame pieces) or an iterable of such chunks in
    order (e.g. produced while sampling). Model space for ``WanVAECodec``/``wan_stream_decoder(vae)``; whatever
    space the given decoder takes otherwise. decoder: a ``StreamDecoder`` or anything ``as_stream_decoder``
    accepts. on_progress(latents_done, latents_total or None) is called after each chunk is written; raising
    in it (or anywhere) aborts the writer and leaves no file. fmt/fps/crf/loop_count: see ``VideoWriter``.
    """
    if int(chunk_latents) < 1:
        raise InputError(f"chunk_latents must be >= 1, got {chunk_latents}")
    decode = as_stream_decoder(decoder)
    chunks, total = _chunks(latents, int(chunk_latents))
    done = 0
    with VideoWriter(path, fmt, fps, loop_count=loop_count, crf=crf) as writer:
        for z in chunks:
            frames = decode(z)
            writer.write(frames)
            del frames
            done += int(z.shape[2])
            if on_progress is not None:
                on_progress(done, total)
    return Path(path)
