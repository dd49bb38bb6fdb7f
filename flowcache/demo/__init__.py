"""The shipped demo: a tiny SkyReels-style diffusion-forcing model in the Wan2.1 architecture.

Trained by ``python -m flowcache.demo.train`` on procedural videos (``data.py``) of one coloured shape
moving, bouncing, pulsing or changing colour, with a word-level text encoder (``text.py``) and a fixed
DCT latent codec (``codec.py``: 64×64 RGB <-> 32 channels of 8×8 latents, temporal stride 1). The weights are in
``assets/`` in the same checkpoint format as the real models (bare Wan keys, facts in ``flowcache.*``
safetensors metadata), so ``flowcache.models.load_model`` and the pipeline run them unchanged.

API used by the nodes and the CLI: ``ASSETS``, ``demo_model_path()``, ``load_demo_text()``,
``load_demo_codec()``, ``DEMO_SETTINGS`` (default sampler settings), ``DEMO_PROMPTS``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .codec import DemoCodec
from .text import DemoTextEncoder

ASSETS = Path(__file__).resolve().parent / "assets"
DIT_FILE = "demo_dit.safetensors"
TEXT_FILE = "demo_text.safetensors"

# SkyReels-like geometry, scaled down: chunks of 4 latent frames, 5 chunks per window, ar_step 5, 50 steps,
# two windows of 20 latent frames with a 4-frame (one-chunk) overlap: 36 frames at 8 fps.
DEMO_SETTINGS: dict = {
    "width": 64, "height": 64, "num_frames": 36, "base_num_frames": 20, "overlap_history": 4,
    "causal_block_size": 4, "ar_step": 5, "steps": 50, "cfg": 5.0, "shift": 5.0, "addnoise_condition": 20,
    "fps": 8.0, "solver": "unipc", "seed": 0,
}

DEMO_PROMPTS: tuple[str, ...] = (
    "a red circle bouncing on a blue background",
    "a yellow square moving right on a black background",
    "a white triangle moving down on a green background",
    "a cyan circle pulsing on a gray background",
    "a green square changing colour on a black background",
    "a purple triangle moving left on a white background",
)


# The benchmark samples the first three prompts; presets are calibrated (and picked) on the other three, so the
# benchmark never measures what it was tuned on.
BENCH_PROMPTS: tuple[str, ...] = DEMO_PROMPTS[:3]
CALIBRATION_PROMPTS: tuple[str, ...] = DEMO_PROMPTS[3:]


def demo_model_path() -> Path:
    p = ASSETS / DIT_FILE
    if not p.exists():
        raise CheckpointError(f"{p}: the demo model file is missing; re-install the node pack or run "
                              "`python -m flowcache.demo.train`.")
    return p


def load_demo_text(model_path: str | os.PathLike | None = None) -> DemoTextEncoder:
    """The demo's text embedding: the ``demo_text.safetensors`` beside ``model_path`` (default: the shipped
    model), since each trained demo model has its own."""
    folder = Path(model_path).parent if model_path is not None else ASSETS
    p = folder / TEXT_FILE
    if not p.exists():
        raise CheckpointError(f"{p}: missing. A demo model file needs the text embedding it was trained with, "
                              f"{TEXT_FILE}, in the same folder (python -m flowcache.demo.train writes both).")
    return DemoTextEncoder.load(p)


def load_demo_codec(model_path: str | os.PathLike | None = None) -> DemoCodec:
    """The codec with the normalisation stats stored in the demo model's metadata."""
    from safetensors import safe_open

    path = Path(model_path) if model_path is not None else demo_model_path()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    if "flowcache.codec" not in meta:
        raise CheckpointError(f"{path.name}: has no 'flowcache.codec' metadata; it is not a demo model file.")
    return DemoCodec.from_stats_json(meta["flowcache.codec"])


__all__ = ["ASSETS", "DEMO_SETTINGS", "DEMO_PROMPTS", "BENCH_PROMPTS", "CALIBRATION_PROMPTS", "DemoCodec", "DemoTextEncoder", "demo_model_path",
           "load_demo_text", "load_demo_codec"]
