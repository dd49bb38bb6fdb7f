"""``cache = off`` is SkyReels-V2's diffusion-forcing loop, to float32 rounding, on tiny random weights.

Reference data (``tests/data/df_official_*.safetensors``) was produced outside this repository by running the
official code of SkyworkAI/SkyReels-V2 at commit abed76fec91103e4543c747eee45334137b3a558:
``skyreels_v2_infer/pipelines/diffusion_forcing_pipeline.py`` (``DiffusionForcingPipeline.__call__``), its
``modules/transformer.py`` ``WanModel`` and ``scheduler/fm_solvers_unipc.py``, with diffusers 0.31.0 and torch on
CPU in float32, one thread. The script, in prose:

* A tiny Wan2.1 DiT (``WanModel(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_dim=32, freq_dim=64,
  text_len=8, inject_sample_info=True, cross_attn_norm=True, qk_norm=True)``, the config is in the weight file's
  metadata) got random N(0, 0.08) weights rounded to float16 (so the file is small; both sides load them as
  float32), saved under the official parameter names, which are the released checkpoints' and the pack's. Two
  random prompt embeddings [1, 8, 32] are stored with them (``_prompt.cond``, ``_prompt.uncond``).
* The official pipeline object was built without its loaders (no checkpoint directory): the text encoder was a
  stub returning those embeddings, and the VAE a stub with Wan's time layout (latent 0 -> pixel 0, latent k ->
  pixels 4k-3..4k): decode = latents / 64, encode = 64 · (pixel 0 and every 4th pixel). That is an exact round
  trip (a power of two, and |latents| < 64 passes the pipeline's clamp to [-1, 1]), so the official long-video
  path (decode, keep ``overlap_history`` pixel frames, re-encode) hands the next window exactly the previous
  window's last latent frames: the pack's latent-space overlap (``codec=None``). The script asserts it.
* The model ran without CUDA: ``torch.compile`` off at import (it wraps plain elementwise functions), the
  CUDA/bf16-only ``flash_attention`` replaced by float32 ``scaled_dot_product_attention`` (no masks are used: full
  attention, as ``generate_video_df.py`` runs by default), and the ``return x.to(torch.bfloat16)`` that ends
  ``WanAttentionBlock.forward`` (a no-op for the released bf16 weights) dropped for this float32 run.
* ``pipe(prompt, negative_prompt, height=32, width=32, num_inference_steps=10, shift=8.0, guidance_scale=5.0,
  fps=24, generator=torch.Generator().manual_seed(seed), ...)`` was called for three cases, each case's settings
  in the runs file's metadata: ``sync`` (17 frames = 5 latent frames, ar_step 0, causal_block_size 1),
  ``async`` (21 frames = 6 latents, ar_step 2, causal_block_size 2) and ``two_windows`` (37 frames = 10 latents,
  base_num_frames 21, overlap_history 5 = 2 latents, ar_step 1, causal_block_size 2, addnoise_condition 20: the
  second window re-noises its 2-frame prefix at every iteration).
* Recorded: every random draw (``randn_tensor`` for each window's initial noise, from the seeded generator;
  ``torch.randn_like`` for the prefix re-noise, from torch's global generator seeded before the call), named as
  ``DiffusionForcingPipeline(noise=...)`` asks for them; the window's latents after every iteration (read from
  the loop's ``latents`` at each turn of its ``tqdm`` loop); and the latents each window hands the VAE decode,
  concatenated without the later windows' prefixes (the output latents).

Here our pipeline runs with ``CacheSettings()`` (off), the same weights and embeddings, and the official draws
replayed; every iteration's window latents (``StepInfo.preview``) and the output must match to 1e-5 of the peak.
Measured: at most 8e-7. With the UniPC corrector's order-2 coefficients swapped (the pack before issue 21) all
three cases fail at window 0 iteration 2 (0-based: the third step, the first corrected at order 2), by about
1e-3 of the peak.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flowcache.cache import CacheSettings
from flowcache.models.wan import WanDiT, wan_config_from_state_dict
from flowcache.noise import ReplayNoise
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.runner import RunHooks

DATA = Path(__file__).resolve().parent / "data"
RUNS = load_file(str(DATA / "df_official_runs.safetensors"))
with safe_open(str(DATA / "df_official_runs.safetensors"), "pt") as f:
    CASES, COMMON = json.loads(f.metadata()["cases"]), json.loads(f.metadata()["common"])
TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    sd = {k: v.float() for k, v in load_file(str(DATA / "df_official_tiny_wan.safetensors")).items()}
    prompts = {k.removeprefix("_prompt."): sd.pop(k) for k in list(sd) if k.startswith("_prompt.")}
    cfg = wan_config_from_state_dict(sd, num_heads=2)
    assert (cfg.dim, cfg.num_layers, cfg.freq_dim, cfg.has_fps) == (64, 2, 64, True)
    model = WanDiT(cfg)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False), prompts


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CASES))
def test_off_equals_official_diffusion_forcing(tiny, name):
    model, prompts = tiny
    case = CASES[name]
    s = DFSettings(width=COMMON["width"], height=COMMON["height"], steps=COMMON["steps"], shift=COMMON["shift"],
                   cfg=COMMON["cfg"], fps=COMMON["fps"], seed=case["seed"], **case["settings"])
    draws = [(what, RUNS[f"{name}.draw{j:03d}"]) for j, what in enumerate(case["draws"])]
    seen = []
    hooks = RunHooks(on_step=lambda info: seen.append((info.window, info.iteration, info.preview())))
    noise = ReplayNoise(draws)
    out, stats = DiffusionForcingPipeline(model, LatentGeometry(), text_len=8)(
        prompts["cond"], prompts["uncond"], s, CacheSettings(), hooks, noise=noise)
    assert noise.next == len(draws), "not every official draw was asked for"
    assert stats.iterations == case["iterations"]
    want = {(w, i): RUNS[f"{name}.window{w}.iterations"][i]
            for w, n in enumerate(case["iterations"]) for i in range(n)}
    assert [(w, i) for w, i, _ in seen] == list(want)
    for w, i, x in seen:  # the first iteration that parts from the official, if any
        err = rel(x, want[(w, i)])
        assert err <= TOL, f"{name}: window {w} iteration {i} differs from the official by {err:.3g} of the peak"
    assert out.shape == RUNS[f"{name}.out"].shape
    assert rel(out, RUNS[f"{name}.out"]) <= TOL
