"""LongLive v1.0 and Krea Realtime 14B: the pack's loops equal the official ones on tiny random weights.

Reference data (``tests/data/longlive_official_runs.safetensors``, ``krea_official_runs.safetensors``) was produced
outside this repository by importing the official code and running it on the CPU, on the tiny weights of
``causal_next_tiny_wan.safetensors`` (a Wan2.1 DiT dim 64, ffn 96, 2 heads, 2 layers, text_dim 32, freq_dim 64,
text_len 8, N(0, 0.08) weights rounded to fp16; three prompt embeddings [1, 8, 32] under ``_prompt.*``; a rank-4
LoRA on every Linear of the attention blocks under ``_lora.*``), latents 4x6 (2x3 tokens a frame), 16 channels.

* **LongLive**: NVlabs/LongLive branch v1.0 at e52d9ef, ``pipeline/interactive_causal_inference.py``
  ``InteractiveCausalInferencePipeline.inference`` with ``configs/longlive_interactive_inference.yaml``'s settings
  (steps [1000, 750, 500, 250] warped, shift 5, 3 frames a block, local_attn_size 12, sink_size 3, context_noise
  0; global_sink as the case says), the base weights in the release's ``model.`` layout and the LoRA applied
  unmerged as peft computes it (y = Wx + b + B(Ax)·alpha/r, alpha = r). Changes to the official path, none to its
  arithmetic: CUDA-only calls stubbed; flash attention replaced by SDPA in the inputs' dtype; the hard-coded 1.3B
  cache shapes (30 layers, [B, S, 12, 128], 1560 tokens a frame) set to the tiny model's.
  Cases: ``one_prompt`` (7 blocks: the 12-frame window slides from block 4 on, the sink stays), ``switch``
  (prompts a, b, c switched at latent frames 6 and 14: the first re-caches the whole cache with its sink, the
  second takes effect at frame 15 > 12 and keeps the sink's old K/V), ``switch_no_global_sink`` (the same with
  global_sink false: the sink's rows take the oldest re-cached frames), ``bf16`` (weights, noise and caches in
  bf16, one switch at frame 15).
* **Krea Realtime**: krea-ai/realtime-video at acf4b7b, ``release_server.GenerationSession.generate_block`` with
  its defaults (kv_cache_num_frames 3, 5 steps, timestep_shift 5, keep_first_frame false), the weights as the
  release's ``model.``-prefixed file loaded strictly and its q/k/v fused as ``load_transformer`` does. Changes:
  CUDA-only calls stubbed; flex_attention replaced by SDPA under the same block mask; ``frame_seqlen = 1560`` in
  ``wan/modules/causal_model.py`` replaced by the line its authors left commented out above it (the true tokens
  per frame), so RoPE offsets are right at the tiny size; ``encode_video_latent`` run at the session's own size
  (the release resizes to 832x480, the identity at its trained size); for the fp32 cases ``release_server``'s
  ``torch.bfloat16`` read as ``torch.float32``. The VAE is a stub, the fixed lossy map ``stub_decode_frame`` /
  ``stub_encode`` below (its matrices stored as ``_stub.*``), 4 pixel frames per latent frame as the release's
  block decoder gives. Prompt changes were sent between blocks as the server does (``interpolate_prompt_embeds``).
  Cases: ``one_prompt`` (5 blocks: blocks 2-4 re-encode their oldest context frame), ``switch`` (8 blocks; to b
  before block 2 over 4 blocks, to c before block 6 over 2), ``bf16`` (5 blocks, bf16, to b before block 3).

Recorded: every random draw (LongLive: the video's noise and ``randn_like`` per re-noise; Krea: the generator's
initial noise and per-step draws), named in the pack's order, and the output latents. Here the pack runs with
``CacheSettings()`` (off) and the official draws replayed. fp32: every block within 1e-5 of the output's peak
(measured: at most 2.1e-7). bf16: within 1e-2 (the two implementations round differently in bf16; measured:
LongLive 4.9e-3, Krea 4.7e-3). Krea without the pixel round trip (the raw latent as the context's oldest frame)
parts by 1.4e-2 in every case, bf16 included.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowcache.cache import CacheSettings
from flowcache.models import load_model
from flowcache.noise import ReplayNoise
from flowcache.pipelines import LatentGeometry
from flowcache.pipelines.causal_wan import CausalSettings, CausalWanPipeline
from flowcache.prompts import PromptEntry, PromptSchedule

DATA = Path(__file__).resolve().parent / "data"
TINY = DATA / "causal_next_tiny_wan.safetensors"
FP32_TOL, BF16_TOL = 1e-5, 1e-2
pytestmark = pytest.mark.usefixtures("one_thread")


def _runs(name: str) -> tuple[dict, dict]:
    path = DATA / name
    with safe_open(str(path), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
    return load_file(str(path)), cases


def tiny_parts() -> tuple[dict, dict, dict]:
    sd = load_file(str(TINY))
    prompts = {k.removeprefix("_prompt."): sd.pop(k).float() for k in list(sd) if k.startswith("_prompt.")}
    lora = {k.removeprefix("_lora."): sd.pop(k) for k in list(sd) if k.startswith("_lora.")}
    return sd, prompts, lora


def release_files(tmp: Path, name: str) -> tuple[Path, Path]:
    """The tiny weights as a (safetensors, so the head count travels in metadata) base named like the release,
    and LongLive's lora.pt: {'generator_lora': peft keys}."""
    sd, _, lora = tiny_parts()
    base = tmp / name
    save_file({"model." + k: v for k, v in sd.items()}, str(base),
              metadata={"flowcache.num_heads": "2", "flowcache.text_len": "8"})
    lora_path = tmp / "lora.pt"
    torch.save({"generator_lora": {f"base_model.model.{k}": v for k, v in lora.items()}}, lora_path)
    return base, lora_path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ------------------------------------------------------------------------------------------------ LongLive
LL_RUNS, LL_CASES = _runs("longlive_official_runs.safetensors")
LL_SWITCH_LATENT = {"one_prompt": [], "switch": [6, 14], "switch_no_global_sink": [6, 14], "bf16": [15]}


@pytest.fixture(scope="module")
def longlive(tmp_path_factory):
    base, lora = release_files(tmp_path_factory.mktemp("ll"), "longlive_base.safetensors")
    return {dtype: load_model(base, dtype, lora=lora) for dtype in ("fp32", "bf16")}


def longlive_settings(blocks: int, seed: int) -> CausalSettings:
    # LongLive's configs: Self-Forcing's warped schedule, window 12 and sink 3, re-cache on a prompt change
    return CausalSettings(width=48, height=32, num_frames=4 * 3 * blocks - 3, num_frame_per_block=3, seed=seed,
                          kv_mode="rolling", local_attn_frames=12, sink_frames=3, prompt_rule="recache")


@pytest.mark.parametrize("name", list(LL_CASES))
def test_longlive_equals_official(longlive, name):
    case = LL_CASES[name]
    lm = longlive[case["dtype"]]
    assert lm.loop == "longlive" and "generator_lora" in lm.notes[0] and "merged into 20 of its 20" in lm.notes[1]
    _, prompts, _ = tiny_parts()
    # latent frame k starts at video frame 4k-3: the official switch indices are latent frames
    starts = [0] + [4 * k - 3 for k in LL_SWITCH_LATENT[name]]
    schedule = PromptSchedule([PromptEntry(f, prompts[p]) for f, p in zip(starts, case["prompts_used"])],
                              keep_sink=case["global_sink"])
    draws = [(what, LL_RUNS[f"{name}.draw{j:03d}"]) for j, what in enumerate(case["draws"])]
    noise = ReplayNoise(draws)
    geo = LatentGeometry(temporal_stride=4, spatial_stride=8, channels=16)
    out, stats = CausalWanPipeline(lm.model, geo, text_len=8)(schedule, longlive_settings(case["blocks"], case["seed"]),
                                                              CacheSettings(), noise=noise)
    assert noise.next == len(draws)
    want = LL_RUNS[f"{name}.out"]
    tol = FP32_TOL if case["dtype"] == "fp32" else BF16_TOL
    for b in range(case["blocks"]):  # the first block that parts from the official, if any
        err = rel(out[:, :, 3 * b:3 * b + 3], want[:, :, 3 * b:3 * b + 3])
        assert err <= tol, f"{name}: block {b} differs from the official by {err:.3g} of the peak"
    assert [s["chunk"] for s in stats.switches] == [-(-k // 3) for k in LL_SWITCH_LATENT[name]]


# ------------------------------------------------------------------------------------------- Krea Realtime
KR_RUNS, KR_CASES = _runs("krea_official_runs.safetensors")
WD, WE = KR_RUNS["_stub.WD"], KR_RUNS["_stub.WE"]


def stub_decode_frame(z: torch.Tensor, r: int) -> torch.Tensor:
    """The official run's VAE stub: latent [16, h, w] -> the r-th (0..3) of its four pixel frames [3, 8h, 8w] in
    -1..1, fp16 values."""
    p = torch.tanh(0.5 * torch.einsum("oc,chw->ohw", WD, z.half().float()) + 0.1 * r).half().float()
    p = torch.where(p.abs() < 2 ** -10, torch.zeros_like(p), p)
    return p.repeat_interleave(8, 1).repeat_interleave(8, 2)


def stub_encode(p: torch.Tensor) -> torch.Tensor:
    """One pixel frame [3, H, W] in -1..1 -> latent [16, h, w] (fp16 values)."""
    return torch.einsum("co,ohw->chw", WE, F.avg_pool2d(p.half().float()[None], 8)[0]).half().float()


class StubCodec:
    """The stub as a ``LatentCodec`` (a clip's first latent frame gives one pixel frame, later ones four, as a Wan
    VAE decode does); pixels in 0..1 as ComfyUI's VAE gives them."""

    def __init__(self):
        self.calls = []

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls.append(("decode", latents.shape[2]))
        frames = [stub_decode_frame(latents[0, :, 0], 3)]
        frames += [stub_decode_frame(latents[0, :, f], r) for f in range(1, latents.shape[2]) for r in range(4)]
        return (torch.stack(frames).permute(0, 2, 3, 1) + 1) / 2

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(("encode", pixels.shape[0]))
        assert pixels.shape[0] == 1
        return stub_encode(pixels[0].permute(2, 0, 1) * 2 - 1)[None, :, None]


@pytest.fixture(scope="module")
def krea(tmp_path_factory):
    base, _ = release_files(tmp_path_factory.mktemp("krea"), "krea-realtime-video-tiny.safetensors")
    return {dtype: load_model(base, dtype) for dtype in ("fp32", "bf16")}


def krea_schedule(case: dict, prompts: dict) -> PromptSchedule | torch.Tensor:
    if not case["changes"]:
        return prompts["a"]
    entries = [PromptEntry(0, prompts["a"])]
    # a change sent before block b takes effect at block b: its first latent frame 3b is video frame 12b - 3
    entries += [PromptEntry(12 * int(b) - 3, prompts[p]) for b, (p, _) in sorted(case["changes"].items(), key=lambda kv: int(kv[0]))]
    blends = {n for _, n in case["changes"].values()}
    if len(blends) == 1:
        return PromptSchedule(entries, blend_blocks=blends.pop())
    return entries


@pytest.mark.parametrize("name", list(KR_CASES))
def test_krea_realtime_equals_official(krea, name, monkeypatch):
    from flowcache.pipelines.krea_realtime import KreaRealtimePipeline, KreaSettings
    import flowcache.pipelines.krea_realtime as kr

    case = KR_CASES[name]
    lm = krea[case["dtype"]]
    assert lm.loop == "krea_realtime" and "the file name" in lm.notes[0] and "832x480" in lm.notes[-1]
    _, prompts, _ = tiny_parts()
    cond = krea_schedule(case, prompts)
    blend_per_change = None
    if isinstance(cond, list):  # changes with different blend lengths: the loop's setting per change
        blend_per_change = {int(b): n for b, (_, n) in case["changes"].items()}
        cond = PromptSchedule(cond, blend_blocks=4)
        real = kr._KreaLoop._next_text

        def next_text(self, b):
            if b in blend_per_change:
                self.s.blend_blocks = blend_per_change[b]
            return real(self, b)
        monkeypatch.setattr(kr._KreaLoop, "_next_text", next_text)
    draws = [(what, KR_RUNS[f"{name}.draw{j:03d}"]) for j, what in enumerate(case["draws"])]
    noise = ReplayNoise(draws)
    codec = StubCodec()
    geo = LatentGeometry(temporal_stride=4, spatial_stride=8, channels=16)
    s = KreaSettings(width=48, height=32, num_frames=12 * case["blocks"] - 3, seed=case["seed"])
    out, stats = KreaRealtimePipeline(lm.model, geo, 8, codec)(cond, s, CacheSettings(), noise=noise)
    assert noise.next == len(draws)
    want = KR_RUNS[f"{name}.out"]
    tol = FP32_TOL if case["dtype"] == "fp32" else BF16_TOL
    for b in range(case["blocks"]):
        err = rel(out[:, :, 3 * b:3 * b + 3], want[:, :, 3 * b:3 * b + 3])
        assert err <= tol, f"{name}: block {b} differs from the official by {err:.3g} of the peak"
    # from block 2 on, each block decodes a clip and re-encodes one frame
    assert codec.calls.count(("encode", 1)) == case["blocks"] - 2
    assert [sw["chunk"] for sw in stats.switches] == sorted(int(b) for b in case["changes"])
