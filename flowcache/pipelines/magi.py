"""MAGI-1 chunk-wise autoregressive sampling on the shared runner (SandAI-org/MAGI-1 @ 6ff822e, mikeallen39/FlowCache).

The video is split into chunks of ``chunk_width`` latent frames, up to ``window_size`` denoised at once,
staggered: every stage of ``num_steps / window_size`` steps a chunk enters noisy and the oldest leaves clean, so
each chunk takes ``num_steps`` Euler steps ``x += v·(t[i+1] − t[i])`` (t: 0 = noise, 1 = clean). Each step
forwards the window chunk by chunk, ascending: chunk c, at absolute RoPE positions, attends through a
``KVStore`` to the stored K/V of earlier chunks plus its own. ``MagiSettings.path`` ("auto": the cache
method's own) picks the loop; ``noise2clean_kvrange`` / ``clean_refresh`` override its choices:

* ``window``: MAGI-1's own (the ``off`` baseline): the released key ranges [5, 4, 3, 2] (a chunk sees itself
  and 4 earlier chunks in the first quarter of its steps ... 1 in the last) and, at each stage's first step,
  the clean refresh: the chunk that just finished, forwarded again at ``clean_t`` with the null caption seeing
  only itself, writes its permanent K/V. One cache decision per window.
* ``chunk``: FlowCache's: full causal history, no refresh (a finished chunk keeps its last denoising K/V); one
  decision per chunk.

Clean prefix chunks (I2V, V2V) are forwarded once like a refresh. Distilled checkpoints run one pass
(``distill_dt`` embedding), optionally with the nearly-clean extra (``0.7·out + 0.3·out_self_only`` for the
oldest chunk once t > 0.3; FlowCache drops it by default). Base checkpoints run three passes, text + earlier
chunks, null text + earlier chunks (each with its own store), null text alone (chunk-local RoPE):
``(1−p)·uncond + (p−s)·cond_pre + s·cond_text``, (p, s) from the chunk's t. A reused unit adds its last
computed latent update; the signal is its patch-embedded input. Forced: the first and last step, and on the
window path a stage boundary (the signals are not comparable; FlowCache's TeaCache compares misaligned
windows there). KV compression (``cache.kv_budget`` chunks): once per stage, before a chunk enters, with the
last computed chunk forward's queries. Base guidance refreshes each store by its own pass (the reference:
one store, the null-text pass's) and skips the chunk-alone pass when its weight 1 − p is 0 (exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

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
from .common import (LatentCodec, LatentGeometry, check_caption, check_model, encode_prefix, initial_latents,
                     prefix_frames)

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
    m = timestep_matrix(chunk_num, list(range(num_steps)), num_steps // window_size, prefix_chunks)
    return [[(c, n - 1) for c, (n, on) in enumerate(zip(counters, mask)) if on]
            for counters, mask in zip(m.counters.tolist(), m.update_mask.tolist())]


# ------------------------------------------------------------------------------------------------- helpers
@dataclass
class MagiPlan:
    """A MAGI-1 run planned before anything moves: chunks, the stage schedule, the path, the guidance passes'
    KV stores and the memory; what the sampler, the estimate and the loop read."""

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
    stores: list[StorePlan] = field(default_factory=list)  # one per guidance pass that sees earlier chunks
    memory: MemoryPlan | None = None
    settings: "MagiSettings | None" = None  # the checked settings


@dataclass
class _Pass:
    """One guidance pass. caption: "text" or "null"; uncond: AdaLN null row; stored: sees earlier chunks through
    its own KV store (else the chunk alone, chunk-local RoPE); weight_index: 0 text, 1 cond_pre, 2 uncond."""

    name: str
    caption: str
    uncond: bool
    stored: bool
    weight_index: int


def cfg_weights(s: MagiSettings, t: float) -> tuple[float, float, float]:
    """Weights of (cond_text, cond_pre, uncond): (s, p − s, 1 − p), with (p, s) = (prev_chunk_scale,
    text_scale) from the reference's ``get_cfg_scale``, i.e. the bucket of t in ``cfg_t_range``."""
    rng = torch.tensor(s.cfg_t_range, dtype=torch.float32) - 1e-7
    i = int(torch.searchsorted(rng, torch.tensor([t], dtype=torch.float32))[0]) - 1
    i = min(max(i, 0), len(s.cfg_t_range) - 1)
    p, sc = float(s.prev_chunk_scales[i]), float(s.text_scales[i])
    return sc, p - sc, 1.0 - p


# ------------------------------------------------------------------------------------------------- the loop
class _MagiLoop:
    """The ``ChunkLoop`` of one MAGI-1 run: one segment (the whole video), a step per global forward step."""

    def __init__(self, pipe: "MagiPipeline", s: MagiSettings, plan: MagiPlan, inputs: dict, cache: CacheSettings,
                 cancel: Callable[[], None] | None = None):
        path = plan.path
        self.pipe, self.s, self.plan, self.path, self.cancel = pipe, s, plan, path, cancel
        self.model, self.cfgm = pipe.model, pipe.model.config
        self.text, self.null, self.pre = inputs["text"], inputs["null"], inputs["prefix"]
        self.distill = inputs["distill"]
        self.kvrange = tuple(s.noise2clean_kvrange if s.noise2clean_kvrange is not None
                             else (RELEASED_KVRANGE if path == "window" else ()))
        self.refresh = s.clean_refresh if s.clean_refresh is not None else path == "window"
        self.passes = ([_Pass("cond", "text", False, True, 0)] if self.distill else
                       [_Pass("cond", "text", False, True, 0), _Pass("pre", "null", True, True, 1),
                        _Pass("uncond", "null", True, False, 2)])
        self.budget = cache.kv_budget * plan.tokens
        self.comp = CompressionConfig(mix_lambda=cache.mix_lambda)
        self.ts = time_schedule(s.num_steps, s.shift, s.shortcut_mode)
        self.intervals = step_intervals(s.num_steps, s.shortcut_mode)
        self.per = s.num_steps // s.window_size
        self.taps: dict[str, QueryTap] = {}
        self.stores: dict[str, KVStore] = {}
        self.counter = StepCounter(plan.chunk_num, s.num_steps)
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
            f = magi_forward_flops(self.cfgm, plan.tokens, plan.tokens, _tokens(self.null))
            work.reference(len(self.stores) * f)
            self._clean_forward(self.pre[:, :, c * s.chunk_width:(c + 1) * s.chunk_width], c, dt, work)
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
            if self.path == "chunk":
                units = [Unit(c, (c,), force) for c in ids]
            else:
                units = [Unit("window", tuple(ids), force or ids != prev_ids)]
            prev_ids = ids
            frames = [slice((u.chunks[0] - cs) * cw, (u.chunks[-1] + 1 - cs) * cw) for u in units]  # in the window
            yield Step(k, units, ids, data={"chunks": chunks, "x_win": x_win, "cs": cs, "ce": ce, "frames": frames})

    def signals(self, step: Step) -> dict:
        d, cw, model = step.data, self.s.chunk_width, self.model
        x_win, cs = d["x_win"], d["cs"]
        d["chunk_x"] = {c: x_win[:, :, (c - cs) * cw:(c - cs + 1) * cw] for c, _ in d["chunks"]}
        return {u.id: UnitSignal(model.embed_input(x_win[:, :, fr]).to(model.dtype), x_win[:, :, fr])
                for u, fr in zip(step.units, d["frames"])}

    def compute(self, step: Step, decisions: Decisions, reuse: Reuse) -> tuple[dict[int, torch.Tensor], Work]:
        """Velocities of the chunks that compute this step (ascending; the refresh first at a stage start)."""
        s, d, k = self.s, step.data, step.index
        dt, work = self._dt(k), Work()
        decide = {c: decisions[("cond", c if self.path == "chunk" else "window")] for c in step.active}
        cs, ce = d["cs"], d["ce"]
        # the reference of the speedups: MAGI-1's own loop (as computed), and this loop without reuse (paper)
        work.reference(self._vanilla_flops(step, official=True), self._vanilla_flops(step, official=False))
        if self.refresh and cs > self.plan.offset and k % self.per == 0 and decide[cs]:
            # MAGI-1's clean refresh: the chunk that just finished, at clean_t, null caption, seeing itself only
            c = cs - 1
            self._clean_forward(self.x[:, :, c * s.chunk_width:(c + 1) * s.chunk_width], c, dt, work)
        t_of = {c: float(self.ts[i]) for c, i in d["chunks"]}
        idx_of = dict(d["chunks"])
        v: dict[int, torch.Tensor] = {}
        for c in step.active:
            if not decide[c]:
                continue
            outs: dict[int, torch.Tensor] = {}
            weights = self._weights(t_of[c])
            for p in self._passes_for(weights):
                cm, store = self._caption(p, c), self.stores.get(p.name)
                first = self._first_chunk(c, idx_of[c], self.kvrange) if p.stored else None
                kv = TappedContext(store, c, self.taps.get(p.name), first) if p.stored else None
                outs[p.weight_index] = self._forward(d["chunk_x"][c], t_of[c], p, kv, c if p.stored else 0, dt, cm,
                                                     work, self._context_rows(store, c, first))
            # reference order: (1 - p)·uncond + (p - s)·cond_pre + s·cond_text
            v[c] = sum(weights[i] * outs[i] for i in sorted(outs, reverse=True)) if not self.distill else outs[0]
        if self._nearly_clean(t_of[cs]) and decide[cs]:
            # the oldest chunk again, self-only, RoPE after the window; blended 0.7 / 0.3
            tap = self.taps.get("cond")
            v_self = self._forward(d["chunk_x"][cs], t_of[cs], self.passes[0],
                                   TappedContext(None, cs, tap) if tap is not None else None, ce, dt,
                                   self._caption(self.passes[0], cs), work, self.plan.tokens)
            v[cs] = s.nearly_clean_scale * v[cs] + (1 - s.nearly_clean_scale) * v_self
        return v, work

    def update(self, step: Step, v: dict[int, torch.Tensor], reuse: Reuse) -> Work:
        """Euler for the units that computed, each chunk at its own timestep; a unit's latent update x_new − x is
        its payload (``Reuse.output``). Once per stage, before a new chunk enters, the clean history is
        compressed to the budget."""
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
        sched, k = self.plan.schedule, step.index
        if self.budget > 0 and k + 1 < len(sched) and sched[k + 1][-1][0] > step.active[-1]:
            for name, store in self.stores.items():  # a new chunk enters next step: compress the clean history
                for c in list(range(self.plan.offset)) + self.counter.finished:
                    store.mark_clean(c)
                self.taps[name].compress(store)
        return work

    def finish(self, seg: Segment, run: RunState) -> torch.Tensor:
        pf = self.plan.prefix_frames
        return self.x[:, :, 0 if pf <= 1 else pf:].float().cpu()

    # -- passes ---------------------------------------------------------------------------------------
    def _weights(self, t: float) -> tuple[float, ...]:
        return (1.0,) if self.distill else cfg_weights(self.s, t)

    def _passes_for(self, weights: tuple[float, ...]) -> list[_Pass]:
        """The passes a chunk runs; the chunk-alone pass has weight 0 for t >= 0.3, and skipping it is exact."""
        return [p for p in self.passes
                if p.weight_index < len(weights) and (p.stored or weights[p.weight_index] != 0.0)]

    def _nearly_clean(self, t_oldest: float) -> bool:
        s = self.s
        return self.distill and not s.discard_nearly_clean_chunk and t_oldest > s.nearly_clean_threshold

    def _dt(self, k: int) -> float | None:
        return distill_dt_for_steps(self.s.num_steps, self.intervals[k % self.per]) if self.distill else None

    def _caption(self, p: _Pass, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        if p.caption == "null" or self.text is None:
            return self.null
        cap, m = self.text
        return (cap[:, c], m[:, c]) if cap.dim() == 4 else (cap, m)

    def _first_chunk(self, c: int, step_index: int, kvrange: tuple[int, ...]) -> int | None:
        """The first chunk a stored pass of chunk ``c`` at its step ``step_index`` sees under the key ranges
        ``kvrange`` (a chunk sees itself and r − 1 earlier chunks, r by the quarter of its steps; empty: all
        history, None)."""
        if not kvrange:
            return None
        r = kvrange[step_index // (self.s.num_steps // len(kvrange))]
        return max(0, c + 1 - r)

    def _context_rows(self, store: KVStore | None, c: int, first: int | None) -> int:
        return store.context_rows(c, self.plan.tokens, first) if store is not None else self.plan.tokens

    def _clean_forward(self, xc: torch.Tensor, c: int, dt: float | None, work: Work) -> None:
        """A clean chunk's K/V into every stored pass: t = clean_t, null caption, seeing only itself."""
        for p in self.passes:
            if p.stored:
                self._forward(xc, self.s.clean_t, p, TappedContext(self.stores[p.name], c, None, first=c), c, dt,
                              self.null, work, self.plan.tokens)

    def _forward(self, xc: torch.Tensor, t: float, p: _Pass, kv, rope_chunk: int, dt: float | None, cm,
                 work: Work, rows: int) -> torch.Tensor:
        """One MAGI-1 forward of chunk latents ``xc`` [1, C, chunk_width, h, w] at time ``t`` over ``rows`` keys
        (counted before it writes) -> velocity; booked into ``work``."""
        work.calls += 1
        tt = torch.full((1, 1), float(t), device=xc.device)
        out = self.model(xc, tt, cm[0], cm[1], chunk_start=rope_chunk, kv=kv, distill_dt=dt, uncond=p.uncond,
                         between=self.cancel)
        work.forward(magi_forward_flops(self.cfgm, self.plan.tokens, rows, _tokens(cm)))
        return out

    # -- FLOPs of the vanilla loops -------------------------------------------------------------------
    def _vanilla_flops(self, step: Step, official: bool) -> float:
        """FLOPs of the step when nothing is reused, before its writes: of MAGI-1's own loop (``official``: the
        released key ranges over the whole history, the clean refresh) or of this loop (its key ranges over
        what its stores hold, its refresh choice). The clean refresh at a stage start, every chunk's passes, and
        the nearly-clean extra."""
        d, tok, cfgm = step.data, self.plan.tokens, self.cfgm
        total = 0.0
        if (official or self.refresh) and d["cs"] > self.plan.offset and step.index % self.per == 0:
            total += len(self.stores) * magi_forward_flops(cfgm, tok, tok, _tokens(self.null))
        for c, i in d["chunks"]:
            for p in self._passes_for(self._weights(float(self.ts[i]))):
                if not p.stored:
                    rows = tok
                elif official:
                    rows = (c + 1 - self._first_chunk(c, i, RELEASED_KVRANGE)) * tok
                else:
                    rows = self._context_rows(self.stores[p.name], c, self._first_chunk(c, i, self.kvrange))
                total += magi_forward_flops(cfgm, tok, rows, _tokens(self._caption(p, c)))
        if self._nearly_clean(float(self.ts[d["chunks"][0][1]])):
            total += magi_forward_flops(cfgm, tok, tok, _tokens(self._caption(self.passes[0], d["cs"])))
        return total


def _tokens(cap_mask) -> int:
    return int(cap_mask[1].sum())


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
    plan = MagiPlan(chunk_num, offset, prefix_frames, chunk_num * s.chunk_width, h, w,
                    (s.chunk_width // cfgm.t_patch_size) * tpf, tpf, schedule, path, distill, settings=s)
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
        if s.distill is not None:
            return bool(s.distill)
        for obj in (self.model, self.model.config):
            flag = getattr(obj, "distill", None)
            if flag is not None:
                return bool(flag)
        return False

    def plan(self, s: MagiSettings, prefix_frames: int = 0, cache: CacheSettings | None = None,
             options: MemoryOptions = MemoryOptions()) -> MagiPlan:
        """The run's ``MagiPlan`` for this model (``plan_magi``); raises InputError before any sampling."""
        return plan_magi(s, self.model.config, self.geometry, self.model.dtype, self.is_distill(s), prefix_frames,
                         cache, options)

    def prefix_latent_frames(self, prefix: torch.Tensor | None) -> int:
        """Latent frames ``prefix`` becomes (``common.prefix_frames``), for planning before it is encoded."""
        return prefix_frames(prefix, self.geometry, self.codec)

    def _captions(self, caption: torch.Tensor, mask: torch.Tensor | None, chunk_num: int, device):
        """(text, null): the checked caption and mask on ``device`` (None when no token is valid: the reference
        falls back to the null caption), and the model's null caption."""
        cfgm = self.model.config
        caption, mask = check_caption(caption, mask, cfgm.caption_channels, chunk_num, "MAGI-1",
                                      "T5-v1.1-XXL encoder states")
        null, null_mask = self.model.null_caption()
        null = (null[None].to(device), null_mask[None].to(device))
        return ((caption.to(device), mask.to(device)) if bool(mask.any()) else None), null

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
        text, null = self._captions(caption, caption_mask, plan.chunk_num, self.model.device)
        run = new_run(cache, ("cond",), plan.settings.num_steps, plan.path, plan.memory.options.name, hooks, policy)
        run.stats.settings["magi"] = {"distill": plan.distill, "passes": 1 if plan.distill else 3,
                                      "chunks": plan.chunk_num, "prefix_chunks": plan.offset,
                                      "forward_steps": len(plan.schedule)}
        inputs = {"text": text, "null": null, "prefix": pre, "distill": plan.distill}
        loop = _MagiLoop(self, plan.settings, plan, inputs, cache, run.check_cancel)
        return run_loop(loop, run), run.stats


__all__ = ["MagiPipeline", "MagiPlan", "MagiSettings", "cfg_weights", "magi_forward_flops", "magi_memory",
           "plan_magi", "stage_schedule", "step_intervals", "time_schedule"]
