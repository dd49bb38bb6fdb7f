"""MAGI-1 chunk-wise autoregressive sampling with FlowCache (SandAI-org/MAGI-1 @ 6ff822e, mikeallen39/FlowCache).

The video is split into chunks of ``chunk_width`` latent frames. Up to ``window_size`` chunks are denoised at
once, staggered: every stage of ``num_steps / window_size`` steps a new chunk enters at the noisiest end and
the oldest one leaves clean, so each chunk takes exactly ``num_steps`` Euler steps
(``x += v · (t[i+1] − t[i])``, MAGI's time: 0 = noise, 1 = clean; ``t = sd3_shift(linspace², 3)``).

Every step forwards the window one chunk at a time in ascending order (FlowCache's MAGI path): chunk ``c``
runs at absolute RoPE positions and attends, through a ``KVStore``, to the stored K/V of every earlier chunk
(clean history, possibly compressed, and the window's earlier chunks as of their last compute) plus its own.
That is the block-causal window forward of the reference with ``noise2clean_kvrange = []``, without the
vanilla "clean refresh" forward at ``clean_t`` (FlowCache turns it off: a finished chunk keeps the K/V of
its last denoising forward). Clean prefix chunks (V2V) are forwarded once at ``clean_t`` with the null caption,
each seeing only itself (``clean_chunk_kvrange = 1``).

Guidance: distilled checkpoints run one conditional pass (``distill_dt`` step-size embedding, CFG distilled
in), optionally with the nearly-clean extra (``0.7·out + 0.3·out_self_only`` for the oldest chunk once its
t > 0.3; FlowCache discards it by default). Base checkpoints run the reference's three passes per chunk —
text + previous chunks, null text + previous chunks, null text alone (chunk-local RoPE) — combined as
``(1−p)·uncond + (p−s)·cond_pre + s·cond_text`` with (p, s) looked up from the chunk's t. Each pass that
sees previous chunks has its own KV store.

Caching (the policy decides; the loop never looks at its type, only at ``policy.granularity``):

* ``chunk`` (FlowCache): per chunk, the relative L1 between steps of the patch-embedded noisy input
  ``embed_input(x_chunk)`` (no rescale) is accumulated; under the threshold the chunk is *reused*: no model
  call at all, ``x_chunk += Δx`` where Δx is the latent update of its last computed step; its K/V stay as they
  were. The global first and last step are forced; a chunk's warm-up (its own first ``warmup`` decisions,
  counted by the policy) and a newly entered chunk (no previous signal) always compute.
* ``window`` (TeaCache baseline / no cache): one decision for the whole window from the embedded window;
  reuse adds the stored whole-window Δx. A step whose window differs from the previous one (a stage
  boundary) is forced, since the signals are not comparable.

KV compression (``cache.kv_budget`` chunks of compressed clean history; presets: fast 1, slow 2, i.e.
FlowCache's ``total_cache_chunk_nums`` 5 / 6 with window 4): once per stage, right before a new chunk enters,
the finished chunks are marked clean and, if the clean rows exceed the budget, compressed per KV head with
the importance/redundancy score using the queries of the last computed chunk forward. The store therefore
never holds more than ``budget + window`` chunks of rows (``prefix + 1`` at the first stage of V2V).

Statistics: one "window" (the whole video); ``maps[0][c]`` is chunk c's C/R string over the steps it was
active (a window decision is written into every chunk it covers), ``computed``/``reused`` count chunk-steps,
``forwards`` DiT calls (passes, prefix and nearly-clean extras included), FLOPs from ``magi_forward_flops``.

Known differences from the references, by choice: key ranges are full-causal (the released MAGI configs use
``noise2clean_kvrange = [5, 4, 3, 2]``; FlowCache's T2V config uses ``[]``); the TeaCache baseline forces a
compute at stage boundaries where FlowCache's ``TeaCache`` compares position-aligned slices of different
windows and may advance only the new chunk; base-model guidance keeps one store per context pass (the
reference has one cache written by the null-text pass and refreshed at ``clean_t``), and skips the chunk-alone
pass when its weight ``1 − p`` is 0, which leaves the result unchanged.

All state (noise, policy, stores, counters) is created inside ``__call__``: runs never share anything, and
a callback that raises cancels the run without leaving state behind.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import CacheSettings, make_policy
from ..errors import InputError
from ..kv.scoring import CompressionConfig, select_queries
from ..kv.store import KVStore
from ..models.magi import MagiConfig, MagiDiT, distill_dt_for_steps
from ..models.wan import WanDiT
from ..stats import RunStats
from .diffusion_forcing import LatentCodec, LatentGeometry, StepInfo

CFG_T_RANGE = (0.0, 0.0217, 0.1, 0.3, 0.999)
PREV_CHUNK_SCALES = (1.5, 1.5, 1.5, 1.0, 1.0)
TEXT_SCALES = (7.5, 7.5, 7.5, 0.0, 0.0)


@dataclass
class MagiSettings:
    """Sampler settings; defaults are the released 4.5B configs (720×720, 96 frames, 64 steps, seed 1234).

    num_frames: pixel frames to generate (after any prefix); latent frames = num_frames // temporal stride,
        rounded up to whole chunks. distill: None takes ``model.distill`` (or ``model.config.distill``) and
        falls back to a base checkpoint (3-pass guidance). discard_nearly_clean_chunk: FlowCache's default
        (True) drops the distill nearly-clean extra forward; False runs it as the reference does.
    """

    num_frames: int = 96
    width: int = 720
    height: int = 720
    num_steps: int = 64
    window_size: int = 4
    chunk_width: int = 6
    shift: float = 3.0
    seed: int = 1234
    distill: bool | None = None
    fps: float = 24.0
    discard_nearly_clean_chunk: bool = True
    nearly_clean_threshold: float = 0.3   # distill_nearly_clean_chunk_threshold
    nearly_clean_scale: float = 0.7       # env prev_chunks_scale
    clean_t: float = 0.9999
    shortcut_mode: str = "8,16,16"        # 12-step distill schedule only
    cfg_t_range: tuple = CFG_T_RANGE
    prev_chunk_scales: tuple = PREV_CHUNK_SCALES
    text_scales: tuple = TEXT_SCALES


# ------------------------------------------------------------------------------------------------- schedule
def time_schedule(num_steps: int, shift: float = 3.0, shortcut_mode: str = "8,16,16") -> torch.Tensor:
    """MAGI's ``init_t``: t[0..num_steps] (fp32, 0 = noise, 1 = clean) = sd3-shift(s², shift) with
    s = linspace(0, 1) (12 steps: the 8,16,16 shortcut grid), sd3-shift(x) = x/shift / (1 + (1/shift − 1)·x)."""
    if num_steps == 12:
        base = torch.linspace(0, 1, 5) / 4
        base = base[:3] if shortcut_mode == "16,16,8" else torch.cat([base[:1], base[2:4]])
        s = torch.cat([base + a for a in torch.linspace(0, 1, 5)])[:13]
    else:
        s = torch.linspace(0, 1, num_steps + 1)
    s = s ** 2
    inv = 1.0 / shift
    return inv * s / (1 + (inv - 1) * s)


def step_intervals(num_steps: int, shortcut_mode: str = "8,16,16") -> list[int]:
    """MAGI's ``init_intervel``: the distill interval per in-stage step index (only used for 12 steps)."""
    if num_steps % 3 == 0:
        pattern = [1, 1, 2] if shortcut_mode == "16,16,8" else [2, 1, 1]
        return pattern * (num_steps // 3)
    return [1] * num_steps


def _sequences(chunk_num: int, window: int, offset: int) -> list[tuple[int, int, int, int]]:
    """The reference ``generate_sequences``: per stage (clip_start, clip_end, t_start, t_end)."""
    out = []
    for i in range(offset, chunk_num + window - 1):
        out.append((max(offset, i - window + 1), min(chunk_num, i + 1), max(0, i - chunk_num + 1),
                    min(window, i - offset + 1)))
    return out


def stage_schedule(num_frames_latent: int, chunk_width: int, window_size: int, num_steps: int,
                   prefix_chunks: int = 0) -> list[list[tuple[int, int]]]:
    """Per global step, the window as [(chunk id, timestep index), ...] in ascending chunk id.

    ``num_frames_latent`` counts the whole video including the prefix; chunks = ceil(frames / chunk_width),
    the first ``prefix_chunks`` are clean and never denoised. A stage lasts ``num_steps // window_size`` steps;
    the oldest chunk of the window holds the highest timestep index. Chunk c is denoised at global steps
    [(c − prefix)·per_stage, (c − prefix)·per_stage + num_steps) with index = step − (c − prefix)·per_stage.
    """
    if chunk_width < 1 or window_size < 1:
        raise InputError(f"chunk_width={chunk_width}, window_size={window_size}: both must be at least 1.")
    if num_steps < window_size or num_steps % window_size:
        raise InputError(f"num_steps={num_steps}: must be a multiple of window_size={window_size} "
                         f"(nearest: {max(window_size, round(num_steps / window_size) * window_size)}).")
    chunk_num = math.ceil(num_frames_latent / chunk_width)
    if not 0 <= prefix_chunks < chunk_num:
        raise InputError(f"{prefix_chunks} clean prefix chunks leave nothing to generate in {chunk_num} chunks.")
    per = num_steps // window_size
    steps = []
    for cs, ce, ts, te in _sequences(chunk_num, window_size, prefix_chunks):
        for d in range(per):
            idx = [j * per + d for j in range(ts, te)][::-1]
            assert len(idx) == ce - cs
            steps.append(list(zip(range(cs, ce), idx)))
    return steps


def magi_forward_flops(cfg: MagiConfig, tokens: int, context: int, text_tokens: int) -> float:
    """Analytic FLOPs (2 per multiply-add) of one MAGI-1 forward of ``tokens`` queries over ``context`` keys."""
    t, k, s = float(tokens), float(context), float(text_tokens)
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    linear = (2 * t * d * (2 * q + 2 * kv) + 2 * t * 2 * q * d + 2 * t * d * f * (2 if cfg.gated_linear_unit else 1)
              + 2 * t * f * d + 2 * s * cfg.xattn_dim * 2 * kv)
    attn = 4 * t * k * q + 4 * t * s * q
    return cfg.num_layers * (linear + attn)


# ------------------------------------------------------------------------------------------------- helpers
@dataclass
class _Plan:
    chunk_num: int
    offset: int            # clean prefix chunks
    prefix_frames: int     # latent frames of the prefix
    frames: int            # latent frames of the whole latent (chunk_num · chunk_width)
    h: int
    w: int
    tokens: int            # tokens per chunk
    tokens_per_frame: int
    schedule: list = field(default_factory=list)


@dataclass
class _Branch:
    name: str
    caption: str           # "text" or "null"
    uncond: bool           # AdaLN null row −1
    stored: bool           # sees previous chunks through its own KV store
    weight_index: int      # 0 text, 1 cond_pre, 2 uncond (guidance combination)


class _QueryTap:
    """The scoring queries of the last computed chunk forward of one branch, per layer."""

    def __init__(self, cfg: CompressionConfig, tokens_per_frame: int):
        self.cfg, self.tpf = cfg, tokens_per_frame
        self.q: dict[int, torch.Tensor] = {}

    def record(self, layer: int, q: torch.Tensor) -> None:
        self.q[layer] = select_queries(q, self.cfg, self.tpf).clone()


class _ChunkContext:
    """KVContext of one chunk forward: the store's view (optionally self-only) and a query tap."""

    def __init__(self, store: KVStore | None, chunk_id: int, tap: _QueryTap | None, self_only: bool = False):
        self.view = store.view(chunk_id) if store is not None else None
        self.tap, self.self_only = tap, self_only

    def extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.tap is not None:
            self.tap.record(layer, q)
        if self.view is None:
            return k, v
        keys, vals = self.view.extend(layer, q, k, v)
        if self.self_only:
            n = k.shape[2]
            return keys[:, :, -n:], vals[:, :, -n:]
        return keys, vals


class MagiPipeline:
    """Sample a MAGI-1 DiT over a whole video; see the module docstring."""

    def __init__(self, model: MagiDiT, geometry: LatentGeometry | None = None, codec: LatentCodec | None = None):
        if not isinstance(model, MagiDiT):
            hint = (" This is a Wan2.1 / SkyReels-V2 DiT: sample it with DiffusionForcingPipeline "
                    "(flowcache.pipelines.diffusion_forcing, the FlowCache DF sampler)."
                    if isinstance(model, WanDiT) else "")
            raise InputError(f"MagiPipeline runs MAGI-1 DiTs (MagiDiT, from load_magi / the MAGI-1 loader); "
                             f"got {type(model).__name__}.{hint}")
        self.model = model
        self.geometry = geometry or LatentGeometry(temporal_stride=4, spatial_stride=8,
                                                   channels=model.config.latent_channels)
        self.codec = codec
        if model.config.latent_channels != self.geometry.channels:
            raise InputError(f"geometry has {self.geometry.channels} latent channels but the MAGI-1 model takes "
                             f"{model.config.latent_channels}.")

    # -- validation -----------------------------------------------------------------------------------
    def is_distill(self, s: MagiSettings) -> bool:
        if s.distill is not None:
            return bool(s.distill)
        for obj in (self.model, self.model.config):
            flag = getattr(obj, "distill", None)
            if flag is not None:
                return bool(flag)
        return False

    def plan(self, s: MagiSettings, prefix_frames: int = 0) -> _Plan:
        """Check the settings and lay out chunks and schedule; raises InputError before any sampling."""
        cfgm, geo = self.model.config, self.geometry
        unit = geo.spatial_stride * cfgm.patch_size
        for name, val in (("width", s.width), ("height", s.height)):
            if val <= 0 or val % unit:
                raise InputError(f"{name}={val}: must be a positive multiple of {unit} for MAGI-1 "
                                 f"(nearest: {max(unit, round(val / unit) * unit)}).")
        if s.num_frames < geo.temporal_stride:
            raise InputError(f"num_frames={s.num_frames}: must be at least {geo.temporal_stride} "
                             f"(one latent frame); MAGI-1 makes chunks of {s.chunk_width * geo.temporal_stride} "
                             "frames.")
        if s.chunk_width < 1 or s.chunk_width % cfgm.t_patch_size:
            raise InputError(f"chunk_width={s.chunk_width}: must be a positive multiple of {cfgm.t_patch_size}.")
        if s.shift < 1.0:
            raise InputError(f"shift={s.shift}: must be ≥ 1 (the reference uses 3).")
        if s.num_steps == 12 and s.shortcut_mode not in ("8,16,16", "16,16,8"):
            raise InputError(f"shortcut_mode={s.shortcut_mode!r}: must be '8,16,16' or '16,16,8'.")
        if not (len(s.cfg_t_range) == len(s.prev_chunk_scales) == len(s.text_scales)):
            raise InputError("cfg_t_range, prev_chunk_scales and text_scales must have the same length.")
        total = s.num_frames // geo.temporal_stride + prefix_frames
        offset = prefix_frames // s.chunk_width
        schedule = stage_schedule(total, s.chunk_width, s.window_size, s.num_steps, offset)
        chunk_num = math.ceil(total / s.chunk_width)
        h, w = s.height // geo.spatial_stride, s.width // geo.spatial_stride
        tpf = (h // cfgm.patch_size) * (w // cfgm.patch_size)
        return _Plan(chunk_num, offset, prefix_frames, chunk_num * s.chunk_width, h, w,
                     (s.chunk_width // cfgm.t_patch_size) * tpf, tpf, schedule)

    def _captions(self, caption: torch.Tensor, mask: torch.Tensor | None, chunk_num: int, device):
        cfgm = self.model.config
        if caption.dim() == 2:
            caption = caption[None]
        if caption.dim() not in (3, 4) or caption.shape[0] != 1:
            raise InputError(f"caption: must be [1, tokens, {cfgm.caption_channels}] (or [1, chunks, tokens, "
                             f"{cfgm.caption_channels}] per chunk), got {list(caption.shape)}.")
        if caption.shape[-1] != cfgm.caption_channels:
            raise InputError(f"caption width is {caption.shape[-1]} but MAGI-1 takes {cfgm.caption_channels} "
                             f"(T5-v1.1-XXL encoder states).")
        if caption.dim() == 4 and caption.shape[1] != chunk_num:
            raise InputError(f"per-chunk caption has {caption.shape[1]} chunks; this video has {chunk_num}.")
        if caption.shape[-2] == 0:
            raise InputError("caption: has no tokens.")
        if mask is None:
            mask = torch.ones(caption.shape[:-1], dtype=torch.bool)
        if mask.dim() == caption.dim() - 2:
            mask = mask[None]
        if tuple(mask.shape) != tuple(caption.shape[:-1]):
            raise InputError(f"caption_mask {list(mask.shape)} does not match caption {list(caption.shape)}.")
        null, null_mask = self.model.null_caption()
        null, null_mask = null[None].to(device), null_mask[None].to(device)
        if not bool(mask.bool().any()):  # the reference falls back to the null caption
            return None, (null, null_mask)
        return (caption.to(device), mask.bool().to(device)), (null, null_mask)

    def prefix_latent_frames(self, prefix: torch.Tensor | None) -> int:
        """Latent frames a prefix becomes: pixels [T, H, W, 3] give 1 for an image (I2V) and T // temporal
        stride otherwise (V2V); latents [1, C, P, h, w] give P. For planning before the prefix is encoded."""
        if prefix is None:
            return 0
        if prefix.dim() == 4:
            stride = getattr(self.codec, "temporal_stride", self.geometry.temporal_stride)  # what encode() does
            return 1 if prefix.shape[0] == 1 else prefix.shape[0] // stride
        return prefix.shape[2]

    def _prefix_latents(self, prefix: torch.Tensor | None, plan_hw: tuple[int, int]) -> torch.Tensor | None:
        if prefix is None:
            return None
        geo = self.geometry
        if prefix.dim() == 4:  # pixels [T, H, W, 3] in 0..1
            if self.codec is None:
                raise InputError("prefix: pixels need a codec (VAE); pass latents [1, C, F, h, w] otherwise.")
            if prefix.shape[0] == 1:  # I2V: the image repeated to one latent frame's worth, first latent kept
                prefix = self.codec.encode(prefix.repeat(geo.temporal_stride, 1, 1, 1))[:, :, :1]
            else:
                prefix = self.codec.encode(prefix)
        if prefix.dim() != 5 or prefix.shape[0] != 1 or prefix.shape[1] != geo.channels or prefix.shape[2] < 1:
            raise InputError(f"prefix: latents must be [1, {geo.channels}, frames ≥ 1, h, w], "
                             f"got {list(prefix.shape)}.")
        if tuple(prefix.shape[3:]) != plan_hw:
            raise InputError(f"prefix: latent size {tuple(prefix.shape[3:])} does not match width/height "
                             f"(latent {plan_hw}).")
        return prefix.float()

    # -- run ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, caption: torch.Tensor, caption_mask: torch.Tensor | None, settings: MagiSettings,
                 cache: CacheSettings | None = None, prefix: torch.Tensor | None = None,
                 on_step: Callable[[StepInfo], None] | None = None) -> tuple[torch.Tensor, RunStats]:
        """Returns model-space latents [1, C, F, h, w] (fp32, CPU) and the run's statistics.

        caption [1, L, 4096] (or per chunk [1, chunks, L, 4096]) with caption_mask [1, L] (None: all valid);
        prefix: clean latents [1, C, P, h, w] (I2V: P = 1, V2V: P ≥ chunk_width) or pixels with a codec.
        T2V and I2V return every chunk (I2V keeps the image frame); V2V returns the frames after the prefix.
        """
        cache = cache or CacheSettings(mode="off")
        s, model, geo = settings, self.model, self.geometry
        cfgm = model.config
        device = model.x_embedder.weight.device
        h0, w0 = s.height // geo.spatial_stride, s.width // geo.spatial_stride
        pre = self._prefix_latents(prefix, (h0, w0)) if prefix is not None else None
        plan = self.plan(s, 0 if pre is None else pre.shape[2])
        text, null = self._captions(caption, caption_mask, plan.chunk_num, device)
        distill = self.is_distill(s)
        policy = make_policy(cache)
        stats = RunStats(mode=cache.mode, settings=cache.to_dict(), windows=1)
        stats.settings["magi"] = {"distill": distill, "passes": 1 if distill else 3, "chunks": plan.chunk_num,
                                  "prefix_chunks": plan.offset, "forward_steps": len(plan.schedule)}
        ts = time_schedule(s.num_steps, s.shift, s.shortcut_mode)
        intervals = step_intervals(s.num_steps, s.shortcut_mode)
        per = s.num_steps // s.window_size
        sched, cw, tok, P = plan.schedule, s.chunk_width, plan.tokens, plan.prefix_frames
        total = len(sched)

        gen = torch.Generator(device="cpu").manual_seed(int(s.seed))
        x = torch.randn(1, geo.channels, plan.frames, plan.h, plan.w, generator=gen).to(device)
        if pre is not None:
            pre = pre.to(device)
            x[:, :, :P] = pre

        if distill:
            branches = [_Branch("cond", "text", False, True, 0)]
        else:
            branches = [_Branch("cond", "text", False, True, 0), _Branch("pre", "null", True, True, 1),
                        _Branch("uncond", "null", True, False, 2)]
        budget = cache.kv_budget * tok
        if budget > 0:
            cap_chunks = min(plan.chunk_num, max(plan.offset + 1, cache.kv_budget + s.window_size))
        else:
            cap_chunks = plan.chunk_num
        comp = CompressionConfig(mix_lambda=cache.mix_lambda)
        stores = {b.name: KVStore(cfgm.num_layers, cap_chunks * tok, budget, comp, plan.tokens_per_frame)
                  for b in branches if b.stored}
        taps = {name: _QueryTap(comp, plan.tokens_per_frame) for name in stores} if budget > 0 else {}

        def caption_for(branch: _Branch, c: int):
            if branch.caption == "null" or text is None:
                return null
            cap, m = text
            return (cap[:, c], m[:, c]) if cap.dim() == 4 else (cap, m)

        def text_tokens(cap_mask) -> int:
            return int(cap_mask[1].sum())

        def ctx_rows(store: KVStore | None, c: int) -> int:
            if store is None:
                return tok
            lay = store.layers[0]
            return lay.ranges[c][1] if c in lay.ranges else lay.used + tok

        def forward(xc, t_val: float, branch: _Branch, kv, rope_chunk: int, dt, cap_mask) -> torch.Tensor:
            tt = torch.full((1, 1), float(t_val), device=device)
            stats.forwards += 1
            return model(xc, tt, cap_mask[0], cap_mask[1], chunk_start=rope_chunk, kv=kv, distill_dt=dt,
                         uncond=branch.uncond)

        maps = [[] for _ in range(plan.chunk_num)]
        counts = [0] * plan.chunk_num
        finished: list[int] = []
        prev_ids: list[int] | None = None
        t_start = time.perf_counter()
        for k, window in enumerate(sched):
            ids = [c for c, _ in window]
            d = k % per
            dt_embed = distill_dt_for_steps(s.num_steps, intervals[d]) if distill else None
            if k == 0 and plan.offset > 0:  # clean prefix chunks: fill their K/V once, each seeing only itself
                for c in range(plan.offset):
                    xc = pre[:, :, c * cw:(c + 1) * cw]
                    for b in branches:
                        if b.stored:
                            cm = null
                            flops = magi_forward_flops(cfgm, tok, tok, text_tokens(cm))
                            stats.flops += flops
                            stats.flops_nocache += flops
                            forward(xc, s.clean_t, b, _ChunkContext(stores[b.name], c, None, self_only=True),
                                    c, dt_embed, cm)
            cs, ce = ids[0], ids[-1] + 1
            x_win = x[:, :, cs * cw:ce * cw].clone()
            if pre is not None and P > cs * cw:  # re-pad the prefix frames inside the window before every step
                n_pad = min(P - cs * cw, x_win.shape[2])
                x_win[:, :, :n_pad] = pre[:, :, cs * cw:cs * cw + n_pad]
            chunk_x = {c: x_win[:, :, (c - cs) * cw:(c - cs + 1) * cw] for c in ids}
            t_of = {c: float(ts[i]) for c, i in window}
            dt_of = {c: float(ts[i + 1] - ts[i]) for c, i in window}

            # decisions
            force = k == 0 or k == total - 1
            if policy.granularity == "chunk":
                decide = {c: policy.should_compute(c, model.embed_input(chunk_x[c]).to(model.dtype), force)
                          for c in ids}
            else:
                sig = model.embed_input(x_win).to(model.dtype)
                one = policy.should_compute("window", sig, force or ids != prev_ids)
                decide = {c: one for c in ids}
            prev_ids = ids

            # forwards, ascending chunk id (then the nearly-clean extra, as FlowCache's artifact chunk max id + 1)
            v: dict[int, torch.Tensor] = {}
            for c in ids:
                outs: dict[int, torch.Tensor] = {}
                weights = (1.0,) if distill else self._cfg_weights(s, t_of[c])
                for b in branches:
                    if b.weight_index >= len(weights) or (not b.stored and weights[b.weight_index] == 0.0):
                        continue  # the chunk-alone pass has weight 0 for t >= 0.3: skipping it is exact
                    cm, store = caption_for(b, c), stores.get(b.name)
                    f = magi_forward_flops(cfgm, tok, ctx_rows(store, c), text_tokens(cm))
                    stats.flops_nocache += f
                    if decide[c]:
                        kv = _ChunkContext(store, c, taps.get(b.name)) if b.stored else None
                        outs[b.weight_index] = forward(chunk_x[c], t_of[c], b, kv, c if b.stored else 0,
                                                       dt_embed, cm)
                        stats.flops += f
                if decide[c]:
                    # reference order: (1 - p)·uncond + (p - s)·cond_pre + s·cond_text
                    v[c] = sum(weights[i] * outs[i] for i in sorted(outs, reverse=True)) if not distill else outs[0]
            if distill and not s.discard_nearly_clean_chunk and t_of[cs] > s.nearly_clean_threshold:
                cm = caption_for(branches[0], cs)
                f = magi_forward_flops(cfgm, tok, tok, text_tokens(cm))
                stats.flops_nocache += f
                if decide[cs]:  # the oldest chunk again, self-only, RoPE after the window; blended 0.7 / 0.3
                    tap = taps.get("cond")
                    v_self = forward(chunk_x[cs], t_of[cs], branches[0],
                                     _ChunkContext(None, cs, tap) if tap is not None else None, ce, dt_embed, cm)
                    v[cs] = s.nearly_clean_scale * v[cs] + (1 - s.nearly_clean_scale) * v_self
                    stats.flops += f

            # integrate (Euler) or reuse the stored update
            new_win = x_win.clone()
            if policy.granularity == "chunk":
                for c in ids:
                    sl = slice((c - cs) * cw, (c - cs + 1) * cw)
                    if decide[c]:
                        new_win[:, :, sl] = chunk_x[c] + v[c] * dt_of[c]
                        policy.remember(c, new_win[:, :, sl] - chunk_x[c])
                    else:
                        new_win[:, :, sl] = chunk_x[c] + policy.recall(c)
            else:
                if decide[cs]:
                    for c in ids:
                        sl = slice((c - cs) * cw, (c - cs + 1) * cw)
                        new_win[:, :, sl] = chunk_x[c] + v[c] * dt_of[c]
                    policy.remember("window", new_win - x_win)
                else:
                    new_win = x_win + policy.recall("window")
            x[:, :, cs * cw:ce * cw] = new_win
            for c in ids:
                maps[c].append("C" if decide[c] else "R")
                stats.computed += int(decide[c])
                stats.reused += int(not decide[c])
                counts[c] += 1
                if counts[c] == s.num_steps:
                    finished.append(c)

            # once per stage, before a new chunk enters: compress the clean history
            if budget > 0 and k + 1 < total and sched[k + 1][-1][0] > ids[-1]:
                for name, store in stores.items():
                    for c in list(range(plan.offset)) + finished:
                        store.mark_clean(c)
                    q = taps[name].q
                    if len(q) == cfgm.num_layers:
                        store.compress_clean([q[i] for i in range(cfgm.num_layers)])

            if on_step is not None:
                on_step(StepInfo(0, 1, k, total, k + 1, total, ids, stats.computed, stats.reused,
                                 counts[ids[-1]], s.num_steps))

        stats.wall_seconds = time.perf_counter() - t_start
        stats.iterations.append(total)
        stats.maps.append(["".join(m) for m in maps])
        kept = [0] * cfgm.num_layers
        dropped = [0] * cfgm.num_layers
        for store in stores.values():
            kv = store.stats()
            kept = [a + b for a, b in zip(kept, kv["kept_per_layer"])]
            dropped = [a + b for a, b in zip(dropped, kv["dropped_per_layer"])]
            stats.kv_allocated_bytes = max(stats.kv_allocated_bytes, store.allocated_bytes)
            stats.compress_seconds += store.compress_seconds
        stats.kv_peak_bytes = sum(st.allocated_bytes for st in stores.values())
        stats.kv_kept_per_layer, stats.kv_dropped_per_layer = kept, dropped
        out_start = 0 if P <= 1 else P
        return x[:, :, out_start:].float().cpu(), stats

    @staticmethod
    def _cfg_weights(s: MagiSettings, t: float) -> tuple[float, float, float]:
        """Weights of (cond_text, cond_pre, uncond): (s, p − s, 1 − p), with (p, s) = (prev_chunk_scale,
        text_scale) from the reference's ``get_cfg_scale``, i.e. the bucket of t in ``cfg_t_range``."""
        rng = torch.tensor(s.cfg_t_range, dtype=torch.float32) - 1e-7
        i = int(torch.searchsorted(rng, torch.tensor([t], dtype=torch.float32))[0]) - 1
        i = min(max(i, 0), len(s.cfg_t_range) - 1)
        p, sc = float(s.prev_chunk_scales[i]), float(s.text_scales[i])
        return sc, p - sc, 1.0 - p


__all__ = ["MagiPipeline", "MagiSettings", "stage_schedule", "time_schedule", "step_intervals", "magi_forward_flops"]
