"""ComfyUI's VAE as the pipeline's LatentCodec (model space), for re-encoding the overlap between windows."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..flowcache.latent_format import wan_to_model_space, wan_to_raw


class ComfyVAECodec:
    """encode/decode in the DiT's normalised space through a ``comfy.sd.VAE`` holding the Wan2.1 VAE.

    ``after_call`` runs after each VAE call: loading the VAE may have pushed the DiT off the GPU, and the
    sampler puts it back before the next window.
    """

    def __init__(self, vae: Any, after_call: Callable[[], None] | None = None):
        self.vae = vae
        self.after_call = after_call

    def _done(self) -> None:
        if self.after_call is not None:
            self.after_call()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T, H, W, 3] in 0..1 -> [1, 16, F, h, w] model-space latents."""
        raw = self.vae.encode(pixels[..., :3])
        self._done()
        return wan_to_model_space(raw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, 16, F, h, w] model-space latents -> pixels [T, H, W, 3] in 0..1."""
        images = self.vae.decode(wan_to_raw(latents))
        self._done()
        return images.reshape(-1, *images.shape[-3:])
