"""MAGI-1 chunk-wise autoregressive sampling on the shared runner (SandAI-org/MAGI-1 @ 6ff822e, mikeallen39/FlowCache).

The video is split into chunks of ``chunk_width`` latent frames, up to ``window_size`` denoised at once and
staggered (``stage_schedule``), each chunk taking ``num_steps`` Euler steps ``x += v·(t[i+1] − t[i])`` (t: 0 =
noise, 1 = clean). Each step forwards the window chunk by chunk, ascending: chunk c, at absolute RoPE positions,
attends through a ``KVStore`` to the stored K/V of earlier chunks plus its own. ``MagiSettings.path`` ("auto":
the cache method's own) picks the loop; ``noise2clean_kvrange`` / ``clean_refresh`` override its choices:

* ``window``: MAGI-1's own (the ``off`` baseline): the released key ranges [5, 4, 3, 2] and the clean refresh
  (a finished chunk's permanent K/V, see ``_MagiLoop._forwards``); one cache decision per window, forced at a
  stage boundary (the signals are not comparable there; FlowCache's TeaCache compares misaligned windows).
* ``chunk``: FlowCache's: full causal history, no refresh (a finished chunk keeps its last denoising K/V); one
  decision per chunk.

Distilled checkpoints run one pass (``distill_dt`` embedding), base ones three (``cfg_weights``), each stored
pass with its own store (the reference: one store, the null-text pass's). A reused unit adds its last computed
latent update; the signal is its patch-embedded input; the first and last step are forced. KV compression
(``cache.kv_budget`` chunks): once per stage, as a chunk enters, with the last computed chunk forward's queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from ..cache import CacheSettings
from ..cache.base import CachePolicy, UnitSignal
from ..df_schedule import timestep_matrix
from ..errors import InputError
from ..flops import magi_forward_flops
from ..kv.scoring import CompressionConfig
from ..kv.store import KVStore, QueryTap, TappedContext
from ..models.magi import MagiConfig, MagiDiT, distill_dt_for_steps
from ..noise import SeededNoise
from ..plan import MemoryOptions, MemoryPlan, StorePlan, magi_memory
from ..runner import (Decisions, Reuse, RunHooks, RunState, Segment, Step, StepCounter, Unit, Work, new_run,
                      run_loop)
from ..schedulers import flow_shift
from ..stats import RunStats
from ..validate import finite, whole_fields
from .common import LatentCodec, LatentGeometry, check_caption, check_model, encode_prefix, initial_latents

CFG_T_RANGE = (0.0, 0.0217, 0.1, 0.3, 0.999)
PREV_CHUNK_SCALES = (1.5, 1.5, 1.5, 1.0, 1.0)
TEXT_SCALES = (7.5, 7.5, 7.5, 0.0, 0.0)
RELEASED_KVRANGE = (5, 4, 3, 2)  # noise2clean_kvrange of every released MAGI-1 config


@dataclass
class MagiSettings:
    """Sampler settings; defaults are the released 4.5B configs (720×720, 96 frames, 64 steps, seed 1234).

    num_frames: pixel frames to generate (after any prefix); latent frames = num_frames // temporal stride,
        rounded up to whole chunks. distill: None takes ``model.distill`` (or ``model.config.distill``) and
        falls back to a base checkpoint (3-pass guidance). discard_nearly_clean_chunk: FlowCache's default
        (True) drops the distill nearly-clean extra forward; False runs it as the reference does.
    path: "auto" (the cache method's own), "window" (MAGI-1's loop) or "chunk" (FlowCache's), see the module
        docstring. noise2clean_kvrange / clean_refresh: None takes the path's choice.
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
    path: str = "auto"
    noise2clean_kvrange: tuple[int, ...] | None = None
    clean_refresh: bool | None = None


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
    return flow_shift(s ** 2, 1.0 / shift)


def step_intervals(num_steps: int, shortcut_mode: str = "8,16,16") -> list[int]:
    """MAGI's ``init_intervel``: the distill interval per in-stage step index (only used for 12 steps)."""
    if num_steps % 3 == 0:
        pattern = [1, 1, 2] if shortcut_mode == "16,16,8" else [2, 1, 1]
        return pattern * (num_steps // 3)
    return [1] * num_steps


def stage_schedule(num_frames_latent: int, chunk_width: int, window_size: int, num_steps: int,
                   prefix_chunks: int = 0) -> list[list[tuple[int, int]]]:
    """Per global step, the window as [(chunk id, timestep index), ...] in ascending chunk id.

    ``num_frames_latent`` counts the whole video including the prefix; chunks = ceil(frames / chunk_width),
    the first ``prefix_chunks`` are clean and never denoised. A stage lasts ``num_steps // window_size`` steps;
    the oldest chunk of the window holds the highest timestep index. Chunk c is denoised at global steps
    [(c − prefix)·per_stage, (c − prefix)·per_stage + num_steps) with index = step − (c − prefix)·per_stage:
    the reference's ``generate_sequences`` is the diffusion-forcing timestep matrix
    (``df_schedule.timestep_matrix``) with each chunk a stage behind the one before (ar_step = per_stage).
    """
    if chunk_width < 1 or window_size < 1:
        raise InputError(f"chunk_width={chunk_width}, window_size={window_size}: both must be at least 1.")
    if num_steps < window_size or num_steps % window_size:
        raise InputError(f"num_steps={num_steps}: must be a multiple of window_size={window_size} "
                         f"(nearest: {max(window_size, round(num_steps / window_size) * window_size)}).")
    chunk_num = math.ceil(num_frames_latent / chunk_width)
    if not 0 <= prefix_chunks < chunk_num:
        raise InputError(f"{prefix_chunks} clean prefix chunks leave nothing to generate in {chunk_num} chunks.")
    return timestep_matrix(chunk_num, list(range(num_steps)), num_steps // window_size, prefix_chunks).active_steps()


# ------------------------------------------------------------------------------------------------- guidance
class _Pass(NamedTuple):
    """One guidance pass. caption: "text" or "null"; uncond: AdaLN null row; stored: sees earlier chunks through
    its own KV store (else the chunk alone, chunk-local RoPE); weight_index: 0 text, 1 cond_pre, 2 uncond."""

    name: str
    caption: str
    uncond: bool
    stored: bool
    weight_index: int


DISTILL_PASSES = (_Pass("cond", "text", False, True, 0),)
BASE_PASSES = DISTILL_PASSES + (_Pass("pre", "null", True, True, 1), _Pass("uncond", "null", True, False, 2))


def cfg_weights(s: MagiSettings, t: float) -> tuple[float, float, float]:
    """Weights of (cond_text, cond_pre, uncond): (s, p − s, 1 − p), with (p, s) = (prev_chunk_scale,
    text_scale) from the reference's ``get_cfg_scale``, i.e. the bucket of t in ``cfg_t_range``."""
    rng = torch.tensor(s.cfg_t_range, dtype=torch.float32) - 1e-7
    i = int(torch.searchsorted(rng, torch.tensor([t], dtype=torch.float32))[0]) - 1
    i = min(max(i, 0), len(s.cfg_t_range) - 1)
    p, sc = float(s.prev_chunk_scales[i]), float(s.text_scales[i])
    return sc, p - sc, 1.0 - p


@dataclass
class MagiPlan:
    """A MAGI-1 run planned before anything moves: chunks, the stage schedule, the path and its key ranges and
    refresh, the guidance passes' KV stores and the memory; what the sampler, the estimate and the loop read."""

    chunk_num: int
    offset: int            # clean prefix chunks
    prefix_frames: int     # latent frames of the prefix
    frames: int            # latent frames of the whole latent (chunk_num · chunk_width)
    h: int
    w: int
    tokens: int            # tokens per chunk
    tokens_per_frame: int
    schedule: list = field(default_factory=list)
    path: str = "chunk"
    distill: bool = True
    kvrange: tuple[int, ...] = ()  # noise2clean_kvrange as run (empty: the whole history)
    refresh: bool = False          # the clean refresh as run
    stores: list[StorePlan] = field(default_factory=list)  # one per guidance pass that sees earlier chunks
    memory: MemoryPlan | None = None
    settings: "MagiSettings | None" = None  # the checked settings


# ------------------------------------------------------------------------------------------------- the loop
class _Forward(NamedTuple):
    """One transformer forward of a step: chunk ``chunk`` at time ``t`` under pass ``p``, RoPE at chunk ``rope``,
    a stored pass reading keys from chunk ``first`` on (None: all history). kind: "refresh" (a finished or
    prefix chunk's clean K/V: clean_t, null caption, itself only), "pass" or "self" (the nearly-clean extra)."""

    kind: str
    chunk: int
    p: _Pass
    t: float
    first: int | None
    rope: int


class _MagiLoop:
    """The ``ChunkLoop`` of one MAGI-1 run: one segment (the whole video), a step per global forward step."""

    def __init__(self, pipe: "MagiPipeline", plan: MagiPlan, inputs: dict, cache: CacheSettings,
                 cancel: Callable[[], None] | None = None):
        self.pipe, self.s, self.plan, self.cancel = pipe, plan.settings, plan, cancel
        self.model, self.cfgm = pipe.model, pipe.model.config
        self.text, self.null, self.pre = inputs["text"], inputs["null"], inputs["prefix"]
        self.passes = DISTILL_PASSES if plan.distill else BASE_PASSES
        self.budget, self.comp = cache.kv_budget * plan.tokens, CompressionConfig(mix_lambda=cache.mix_lambda)
        self.ts = time_schedule(self.s.num_steps, self.s.shift, self.s.shortcut_mode)
        self.intervals = step_intervals(self.s.num_steps, self.s.shortcut_mode)
        self.per = self.s.num_steps // self.s.window_size
        self.taps: dict[str, QueryTap] = {}
        self.stores: dict[str, KVStore] = {}
        self.counter = StepCounter(plan.chunk_num, self.s.num_steps)
        self.x: torch.Tensor | None = None

    def segments(self) -> list[Segment]:
        return [Segment(0, self.plan.chunk_num, len(self.plan.schedule))]

    def start(self, seg: Segment, run: RunState) -> None:
        s, plan, geo = self.s, self.plan, self.pipe.geometry
        shape = (1, geo.channels, plan.frames, plan.h, plan.w)
        self.x = initial_latents(SeededNoise(s.seed), shape, "init", self.pre, self.model.device)
        self.stores = run.stores
        for store in plan.stores:  # one per pass that sees earlier chunks
            self.stores[store.name] = store.build()
        if self.budget > 0:
            self.taps = {name: QueryTap(self.comp, plan.tokens_per_frame) for name in self.stores}
        dt, work = self._dt(0), Work()
        for c in range(plan.offset):  # clean prefix chunks: fill their K/V once, each seeing only itself
            refresh = [_Forward("refresh", c, p, s.clean_t, c, c) for p in self.passes if p.stored]
            work.reference(sum(self._flops(f, official=True) for f in refresh))
            for f in refresh:
                self._run(f, self.pre[:, :, c * s.chunk_width:(c + 1) * s.chunk_width], dt, work)
        run.book(work)

    def steps(self, seg: Segment):
        plan, cw = self.plan, self.s.chunk_width
        total, prev_ids = len(plan.schedule), None
        for k, chunks in enumerate(plan.schedule):
            ids = [c for c, _ in chunks]
            cs, ce = ids[0], ids[-1] + 1
            x_win = self.x[:, :, cs * cw:ce * cw].clone()
            if self.pre is not None and plan.prefix_frames > cs * cw:  # re-pad the prefix frames inside the window
                n_pad = min(plan.prefix_frames - cs * cw, x_win.shape[2])
                x_win[:, :, :n_pad] = self.pre[:, :, cs * cw:cs * cw + n_pad]
            force = k == 0 or k == total - 1
            if self.plan.path == "chunk":
                units = [Unit(c, (c,), force) for c in ids]
            else:
                units = [Unit("window", tuple(ids), force or ids != prev_ids)]
            prev_ids = ids
            frames = [slice((u.chunks[0] - cs) * cw, (u.chunks[-1] + 1 - cs) * cw) for u in units]  # in the window
            enters = k > 0 and ids[-1] > plan.schedule[k - 1][-1][0]  # a new chunk's first step
            yield Step(k, units, ids, data={"chunks": chunks, "x_win": x_win, "cs": cs, "ce": ce, "frames": frames,
                                            "enters": enters})

    def signals(self, step: Step) -> dict:
        d, model = step.data, self.model
        return {u.id: UnitSignal(model.embed_input(d["x_win"][:, :, fr]).to(model.dtype), d["x_win"][:, :, fr])
                for u, fr in zip(step.units, d["frames"])}

    def compute(self, step: Step, decisions: Decisions, reuse: Reuse) -> tuple[dict[int, torch.Tensor], Work]:
        """Velocities of the chunks that compute this step: a stage start's clean refresh first, then (when a new
        chunk enters) the clean history compressed to the budget, then each chunk's passes, ascending."""
        s, d, cw = self.s, step.data, self.s.chunk_width
        dt, work, cs = self._dt(step.index), Work(), d["cs"]
        decide = {c: decisions[("cond", c if self.plan.path == "chunk" else "window")] for c in step.active}
        forwards = [f for f in self._forwards(step, self.plan.kvrange, self.plan.refresh)
                    if decide[f.chunk if f.kind == "pass" else cs]]
        for f in forwards:
            if f.kind == "refresh":  # the chunk that just left the window, from the latents it finished with
                self._run(f, self.x[:, :, f.chunk * cw:(f.chunk + 1) * cw], dt, work)
        if self.budget > 0 and d["enters"]:
            for name, store in self.stores.items():  # after the refresh: the history is final
                for c in list(range(self.plan.offset)) + self.counter.finished:
                    store.mark_clean(c)
                self.taps[name].compress(store)
        # the reference of the speedups: MAGI-1's own loop, and this loop without reuse (the paper's)
        work.reference(*(sum(self._flops(f, official) for f in self._forwards(step, kvrange, refresh))
                         for official, kvrange, refresh in ((True, RELEASED_KVRANGE, True),
                                                            (False, self.plan.kvrange, self.plan.refresh))))
        outs: dict[int, dict[int, torch.Tensor]] = {}
        x_of = {c: d["x_win"][:, :, (c - cs) * cw:(c - cs + 1) * cw] for c in step.active}
        for f in forwards:
            if f.kind == "pass":
                outs.setdefault(f.chunk, {})[f.p.weight_index] = self._run(f, x_of[f.chunk], dt, work)
        v, t_of = {}, {c: float(self.ts[i]) for c, i in d["chunks"]}
        for c, o in outs.items():  # reference order: (1 - p)·uncond + (p - s)·cond_pre + s·cond_text
            w = self._weights(t_of[c])
            v[c] = sum(w[i] * o[i] for i in sorted(o, reverse=True)) if not self.plan.distill else o[0]
        for f in forwards:
            if f.kind == "self":  # blended 0.7 / 0.3 with the oldest chunk's velocity
                v[cs] = s.nearly_clean_scale * v[cs] + (1 - s.nearly_clean_scale) * self._run(f, x_of[cs], dt, work)
        return v, work

    def update(self, step: Step, v: dict[int, torch.Tensor], reuse: Reuse) -> Work:
        """Euler for the units that computed, each chunk at its own timestep; a unit's latent update x_new − x is
        its payload (``Reuse.output``)."""
        d, cw, work = step.data, self.s.chunk_width, Work()
        x_win, cs = d["x_win"], d["cs"]
        dt = {c: float(self.ts[i + 1] - self.ts[i]) for c, i in d["chunks"]}
        for u, fr in zip(step.units, d["frames"]):
            new = None
            if u.chunks[0] in v:
                new = x_win[:, :, fr] + torch.cat([v[c] * dt[c] for c in u.chunks], dim=2)
            self.x[:, :, cs * cw + fr.start:cs * cw + fr.stop] = reuse.output(("cond", u.id), x_win[:, :, fr], new,
                                                                              work)
        self.counter.advance(step, work)
        return work

    def finish(self, seg: Segment, run: RunState) -> torch.Tensor:
        pf = self.plan.prefix_frames
        return self.x[:, :, 0 if pf <= 1 else pf:].float().cpu()

    # -- forwards -------------------------------------------------------------------------------------
    def _forwards(self, step: Step, kvrange: tuple[int, ...], refresh: bool) -> list[_Forward]:
        """The step's forwards when every chunk computes, in order, under the key ranges ``kvrange`` (a chunk sees
        itself and r − 1 earlier chunks, r by the quarter of its steps; empty: all history) and with or without
        the clean refresh at a stage start; the chunk-alone pass only where its weight 1 − p is not 0 (exact)."""
        d, out = step.data, []
        cs = d["cs"]
        if refresh and cs > self.plan.offset and step.index % self.per == 0:
            out += [_Forward("refresh", cs - 1, p, self.s.clean_t, cs - 1, cs - 1) for p in self.passes if p.stored]
        for c, i in d["chunks"]:
            t = float(self.ts[i])
            first = max(0, c + 1 - kvrange[i // (self.s.num_steps // len(kvrange))]) if kvrange else None
            out += [_Forward("pass", c, p, t, first if p.stored else None, c if p.stored else 0)
                    for p in self._passes_for(self._weights(t))]
        t_oldest = float(self.ts[d["chunks"][0][1]])
        if self.plan.distill and not self.s.discard_nearly_clean_chunk and t_oldest > self.s.nearly_clean_threshold:
            out.append(_Forward("self", cs, self.passes[0], t_oldest, None, d["ce"]))
        return out

    def _weights(self, t: float) -> tuple[float, ...]:
        return (1.0,) if self.plan.distill else cfg_weights(self.s, t)

    def _passes_for(self, weights: tuple[float, ...]) -> list[_Pass]:
        return [p for p in self.passes
                if p.weight_index < len(weights) and (p.stored or weights[p.weight_index] != 0.0)]

    def _dt(self, k: int) -> float | None:
        return distill_dt_for_steps(self.s.num_steps, self.intervals[k % self.per]) if self.plan.distill else None

    def _caption(self, f: _Forward) -> tuple[torch.Tensor, torch.Tensor]:
        if f.kind == "refresh" or f.p.caption == "null" or self.text is None:
            return self.null
        cap, m = self.text
        return (cap[:, f.chunk], m[:, f.chunk]) if cap.dim() == 4 else (cap, m)

    def _rows(self, f: _Forward, official: bool = False) -> int:
        """Keys forward ``f`` reads (counted before it writes): MAGI-1's own loop (``official``) reads the whole
        history within the key range, this one what its store holds there."""
        tok = self.plan.tokens
        if f.kind != "pass" or not f.p.stored:
            return tok
        if official:
            return (f.chunk + 1 - f.first) * tok
        return self.stores[f.p.name].context_rows(f.chunk, tok, f.first)

    def _flops(self, f: _Forward, official: bool) -> float:
        caption_tokens = int(self._caption(f)[1].sum())
        return magi_forward_flops(self.cfgm, self.plan.tokens, self._rows(f, official), caption_tokens)

    def _run(self, f: _Forward, xc: torch.Tensor, dt: float | None, work: Work) -> torch.Tensor:
        """Forward ``f`` of chunk latents ``xc`` [1, C, chunk_width, h, w] -> velocity; booked into ``work``."""
        store = self.stores.get(f.p.name) if f.p.stored and f.kind != "self" else None
        tap = self.taps.get(f.p.name) if f.kind != "refresh" else None
        kv = TappedContext(store, f.chunk, tap, f.first) if store is not None or tap is not None else None
        flops, cm = self._flops(f, official=False), self._caption(f)  # its keys, counted before it writes
        work.calls += 1
        out = self.model(xc, torch.full((1, 1), f.t, device=xc.device), cm[0], cm[1], chunk_start=f.rope, kv=kv,
                         distill_dt=dt, uncond=f.p.uncond, between=self.cancel)
        work.forward(flops)
        return out


def plan_magi(s: MagiSettings, cfgm: MagiConfig, geo: LatentGeometry, dtype: torch.dtype, distill: bool,
              prefix_frames: int = 0, cache: CacheSettings | None = None,
              options: MemoryOptions = MemoryOptions()) -> MagiPlan:
    """Check the settings (errors name the widget) and lay out chunks, schedule, stores and memory for a MAGI-1
    model of config ``cfgm`` computing in ``dtype``. ``prefix_frames``: latent frames of a clean prefix."""
    cache = cache or CacheSettings()
    s.shift = finite(s.shift, "shift", 1.0)  # ≥ 1: the reference uses 3
    whole_fields(s, "width", "height", "num_frames", "num_steps", "window_size", "chunk_width", "seed")
    path = cache.run_path(s.path)
    if s.noise2clean_kvrange is not None and (
            any(int(r) < 1 for r in s.noise2clean_kvrange)
            or (s.noise2clean_kvrange and s.num_steps % len(s.noise2clean_kvrange))):
        raise InputError(f"noise2clean_kvrange={list(s.noise2clean_kvrange)}: ranges must be ≥ 1 and their "
                         f"count must divide num_steps={s.num_steps} (MAGI-1 uses [5, 4, 3, 2]).")
    geo.check_size(s.width, s.height, cfgm.patch_size, "MAGI-1")
    if s.num_frames < geo.temporal_stride:
        raise InputError(f"num_frames={s.num_frames}: must be at least {geo.temporal_stride} "
                         f"(one latent frame); MAGI-1 makes chunks of {s.chunk_width * geo.temporal_stride} "
                         "frames.")
    if s.chunk_width < 1 or s.chunk_width % cfgm.t_patch_size:
        raise InputError(f"chunk_width={s.chunk_width}: must be a positive multiple of {cfgm.t_patch_size}.")
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
    kvrange = s.noise2clean_kvrange if s.noise2clean_kvrange is not None else (
        RELEASED_KVRANGE if path == "window" else ())
    refresh = s.clean_refresh if s.clean_refresh is not None else path == "window"
    plan = MagiPlan(chunk_num, offset, prefix_frames, chunk_num * s.chunk_width, h, w,
                    (s.chunk_width // cfgm.t_patch_size) * tpf, tpf, schedule, path, distill,
                    tuple(int(r) for r in kvrange), bool(refresh), settings=s)
    magi_memory(plan, s, cache, cfgm, dtype, options)
    return plan


class MagiPipeline:
    """Sample a MAGI-1 DiT over a whole video; see the module docstring."""

    def __init__(self, model: MagiDiT, geometry: LatentGeometry | None = None, codec: LatentCodec | None = None):
        check_model(model, MagiDiT, "MagiPipeline runs MAGI-1 DiTs (MagiDiT, from FlowCache Load Model)",
                    {"WanDiT": " This is a Wan2.1 / SkyReels-V2 DiT: sample it with DiffusionForcingPipeline "
                               "(flowcache.pipelines.diffusion_forcing, the FlowCache DF sampler)."})
        self.model = model
        self.geometry = geometry or LatentGeometry(temporal_stride=4, spatial_stride=8,
                                                   channels=model.config.latent_channels)
        self.codec = codec
        if model.config.latent_channels != self.geometry.channels:
            raise InputError(f"geometry has {self.geometry.channels} latent channels but the MAGI-1 model takes "
                             f"{model.config.latent_channels}.")

    def is_distill(self, s: MagiSettings) -> bool:
        """``s.distill``, else the model's (or its config's) ``distill`` flag, else a base checkpoint."""
        flags = (s.distill, getattr(self.model, "distill", None), getattr(self.model.config, "distill", None))
        return bool(next((f for f in flags if f is not None), False))

    def plan(self, s: MagiSettings, prefix_frames: int = 0, cache: CacheSettings | None = None,
             options: MemoryOptions = MemoryOptions()) -> MagiPlan:
        """The run's ``MagiPlan`` for this model (``plan_magi``); raises InputError before any sampling."""
        return plan_magi(s, self.model.config, self.geometry, self.model.dtype, self.is_distill(s), prefix_frames,
                         cache, options)

    @torch.inference_mode()
    def __call__(self, caption: torch.Tensor, caption_mask: torch.Tensor | None, settings: MagiSettings,
                 cache: CacheSettings | None = None, prefix: torch.Tensor | None = None,
                 hooks: RunHooks | None = None, policy: CachePolicy | None = None, plan: MagiPlan | None = None
                 ) -> tuple[torch.Tensor, RunStats]:
        """Returns model-space latents [1, C, F, h, w] (fp32, CPU) and the run's statistics.

        caption [1, L, 4096] (or per chunk [1, chunks, L, 4096]) with caption_mask [1, L] (None: all valid);
        prefix: clean latents [1, C, P, h, w] (I2V: P = 1, V2V: P ≥ chunk_width) or pixels with a codec.
        T2V and I2V return every chunk (I2V keeps the image frame); V2V returns the frames after the prefix.
        hooks: progress and cancel; policy: use this policy instead of the one ``cache`` names; plan: made by
        ``plan`` with this prefix (default: planned here, K/V resident).
        """
        cache = cache or CacheSettings()
        s, geo = settings, self.geometry
        pre = None if prefix is None else encode_prefix(
            prefix, geo, self.codec, (s.height // geo.spatial_stride, s.width // geo.spatial_stride)
        ).to(self.model.device)
        pf = 0 if pre is None else pre.shape[2]
        plan = plan or self.plan(s, pf, cache, MemoryOptions.of(cache))
        if plan.prefix_frames != pf:
            raise InputError(f"prefix: {pf} latent frames, but the plan was made for {plan.prefix_frames}.")
        dev = self.model.device
        caption, mask = check_caption(caption, caption_mask, self.model.config.caption_channels, plan.chunk_num,
                                      "MAGI-1", "T5-v1.1-XXL encoder states")
        null = tuple(t[None].to(dev) for t in self.model.null_caption())
        text = (caption.to(dev), mask.to(dev)) if bool(mask.any()) else None  # none valid: the reference's null
        run = new_run(cache, ("cond",), plan.settings.num_steps, plan.path, plan.memory.options.name, hooks, policy,
                      magi={"distill": plan.distill, "passes": 1 if plan.distill else 3, "chunks": plan.chunk_num,
                            "prefix_chunks": plan.offset, "forward_steps": len(plan.schedule)})
        loop = _MagiLoop(self, plan, {"text": text, "null": null, "prefix": pre}, cache, run.check_cancel)
        return run_loop(loop, run), run.stats


__all__ = ["MagiPipeline", "MagiPlan", "MagiSettings", "cfg_weights", "magi_forward_flops", "magi_memory",
           "plan_magi", "stage_schedule", "step_intervals", "time_schedule"]
