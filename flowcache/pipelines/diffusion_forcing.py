"""SkyReels-V2 diffusion forcing on the shared runner: the schedule, the inputs, the Wan call and the UniPC update.

The video is split into windows of ``base_num_frames`` (later windows start from a clean prefix of
``overlap_history`` frames); within a window the timestep matrix staggers chunks of ``causal_block_size``
latent frames by ``ar_step`` steps. Two execution paths, chosen by ``DFSettings.path`` ("auto": the cache
method's own):

* ``window`` — SkyReels' vanilla loop: the whole window (every latent frame, started or not) every step, full
  attention (or block-causal with ``window_mask="block_causal"``). One cache decision covers the window.
* ``chunk`` — FlowCache's loop: only the active chunks (started, not finished) are forwarded, each attending to
  the stored K/V of earlier chunks plus its own (block-causal, as the reference's per-chunk loop), and each
  deciding for itself whether to recompute or reuse its cached backbone residual.

The runner (``flowcache.runner``) owns the cache policy, KV stores, statistics, maps, progress and cancel;
this file only supplies what is SkyReels' own. All state is per call.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from ..cache import CacheSettings, make_policy
from ..cache.registry import check_path
from ..cache.base import CachePolicy
from ..df_schedule import DFSchedule, timestep_matrix
from ..errors import InputError
from ..flops import forward_flops, paper_window_flops
from ..models.wan import WanForward, block_causal_mask
from ..noise import NoiseSource, SeededNoise
from ..plan import MemoryOptions, MemoryPlan, StorePlan, dtype_bytes, wan_forward_peak
from ..prompts import PromptSchedule, as_schedule, switch_record
from ..kv.store import KVStore
from ..runner import (Decisions, Reuse, RunHooks, RunState, Segment, Step, StepCounter, StepInfo, Unit, Work,
                      new_run, run_loop)
from ..schedulers import SOLVERS, flow_sigmas, make_solver
from ..stats import RunStats
from ..validate import finite, one_of, whole_fields
from .common import LatentCodec, LatentGeometry, check_model, initial_latents
from .wan_step import UnitSpan, WanStep, WholeWindow, check_conditioning

WINDOW_MASKS = ("full", "block_causal")

@dataclass
class DFSettings:
    """Sampler settings; defaults are SkyReels-V2-DF-1.3B-540P's FlowCache runs (177 frames over 2 windows).

    path: "auto" (the cache method's own), "window" (vanilla) or "chunk" (FlowCache), see the module docstring.
    window_mask: the window path's whole-window forward, "full" (no mask: SkyReels' default) or "block_causal"
        (a frame sees its own chunk and the earlier ones). The chunk path's attention is the cache settings'
        (``CacheSettings.attention``).
    """

    width: int = 960
    height: int = 544
    num_frames: int = 177
    steps: int = 50
    cfg: float = 6.0
    shift: float = 8.0
    seed: int = 1024
    ar_step: int = 5
    causal_block_size: int = 5
    base_num_frames: int = 97
    overlap_history: int = 17
    addnoise_condition: int = 20
    solver: str = "unipc"
    fps: float = 24.0
    window_mask: str = "full"
    path: str = "auto"


@dataclass
class Window:
    length: int   # latent frames in the window, prefix included
    prefix: int   # leading clean latent frames carried over from the previous window
    index: int = 0


def _check_numbers(s: DFSettings) -> None:
    """Finite, in-range numbers, each error naming its widget (NaN passes ComfyUI's own min/max checks)."""
    s.cfg = finite(s.cfg, "cfg", 0.0)
    s.shift = finite(s.shift, "shift", 0.0)
    if s.shift <= 0:
        raise InputError(f"shift={s.shift}: must be > 0 (SkyReels uses 8 for text-to-video).")
    s.fps = finite(s.fps, "fps", 0.0)
    whole_fields(s, "width", "height", "num_frames", "steps", "base_num_frames", "overlap_history", "addnoise_condition",
                 "causal_block_size", "ar_step", "seed")


def plan_windows(s: DFSettings, geo: LatentGeometry, patch: tuple[int, int, int] = (1, 2, 2)) -> list[Window]:
    """Validate the settings and split the video into SkyReels windows; raises InputError before sampling."""
    _check_numbers(s)
    geo.check_size(s.width, s.height, patch[1])
    geo.check_frames("num_frames", s.num_frames)
    geo.check_frames("base_num_frames", s.base_num_frames)
    if s.steps < 1:
        raise InputError(f"steps={s.steps}: must be at least 1.")
    if s.ar_step < 0:
        raise InputError(f"ar_step={s.ar_step}: must be ≥ 0 (0 = synchronous).")
    one_of(s.solver, "solver", SOLVERS)
    one_of(s.window_mask, "window_mask", WINDOW_MASKS)
    check_path(s.path)
    if not 0 <= s.addnoise_condition <= 1000:
        raise InputError(f"addnoise_condition={s.addnoise_condition}: must lie in 0..1000 (SkyReels suggests ≤ 50).")
    cbs = s.causal_block_size
    if cbs < 1:
        raise InputError(f"causal_block_size={cbs}: must be at least 1.")
    total = geo.latent_frames(s.num_frames)
    base = geo.latent_frames(s.base_num_frames)
    hint = f"latent frames per chunk (causal_block_size) is {cbs}; pick num_frames so each window holds whole chunks"
    if total <= base:
        if total % cbs:
            ok = max(cbs, total // cbs * cbs)
            raise InputError(f"num_frames={s.num_frames} gives {total} latent frames, not a multiple of causal_block_size="
                             f"{cbs}; try num_frames={geo.pixel_frames(ok)}.")
        return [Window(length=total, prefix=0, index=0)]
    overlap = geo.latent_frames(s.overlap_history) if s.overlap_history > 0 else 0
    if overlap == 0 or overlap >= base:
        raise InputError(f"overlap_history={s.overlap_history}: a video longer than base_num_frames={s.base_num_frames} "
                         f"needs 0 < overlap_history < base_num_frames (SkyReels uses 17 with 97).")
    if base % cbs or overlap % cbs:
        raise InputError(f"base_num_frames={s.base_num_frames} ({base} latents) and overlap_history={s.overlap_history} "
                         f"({overlap} latents) must both be whole chunks of causal_block_size={cbs}; {hint}.")
    windows = [Window(length=base, prefix=0, index=0)]
    left = total - base
    while left > 0:
        new = min(left, base - overlap)
        if new % cbs:
            ok = total - left + (new // cbs) * cbs
            raise InputError(f"num_frames={s.num_frames}: the last window would have {new} new latent frames, not whole causal_block_size "
                             f"chunks of {cbs}; try num_frames={geo.pixel_frames(ok)} or "
                             f"{geo.pixel_frames(ok + cbs)}.")
        windows.append(Window(length=overlap + new, prefix=overlap, index=len(windows)))
        left -= new
    return windows


@dataclass
class WindowPlan:
    """One window of a run: its schedule, the units forwarded at each iteration, and its KV store (chunk path)."""

    win: Window
    sched: DFSchedule
    steps: list[list[Unit]]          # per iteration: the units forwarded, in chunk order
    store: StorePlan | None          # the chunk path's KV store of this window


@dataclass
class DFPlan:
    """A diffusion-forcing run planned before anything moves: the checked settings, the windows with their
    schedules and per-iteration units, token counts, the KV stores and the memory they all need. The sampler,
    ``generate``, the memory estimate and the loop read this one object."""

    settings: DFSettings
    path: str                      # "window" (the vanilla loop) or "chunk" (FlowCache's)
    chunk_attention: str           # the chunk path's attention (CacheSettings.attention)
    branches: tuple[str, ...]      # ("cond", "uncond") with CFG, ("cond",) without
    windows: list[WindowPlan]
    grid_hw: tuple[int, int]       # patch grid of a latent frame
    tokens_per_frame: int
    sigmas: list[float]
    timesteps: list[float]
    memory: MemoryPlan

    @property
    def chunk_tokens(self) -> int:
        return self.settings.causal_block_size * self.tokens_per_frame


def _window_units(sched: DFSchedule, nb: int, pb: int, steps: int, path: str, refresh: bool) -> list[list[Unit]]:
    """Per iteration, what is forwarded. Window path: the whole window as one unit. Chunk path: every active chunk
    (forced at its last step); at iteration 0 the clean prefix (its K/V, once); with ``refresh``, the
    not-started chunks' K/V once at iteration 0 and each finished chunk once more right after its last step."""
    out, done, finished_at = [], [0] * nb, {}
    for it in range(sched.iterations):
        upd = sched.update_mask[it]
        if path == "window":
            units = [Unit("window", tuple(range(nb)), force=it == sched.iterations - 1)]
        else:
            units = []
            for b in range(nb):
                if bool(upd[b]):
                    units.append(Unit(b, (b,), force=done[b] == steps - 1))
                elif (b < pb and it == 0) or (refresh and it == 0 and done[b] == 0) or (
                        refresh and finished_at.get(b) == it - 1):
                    # K/V-only passes: the clean prefix's; the not-started chunks' (t = 999 on their noise, as the
                    # window feeds them); a chunk that just finished, once more at t = 0 (its clean K/V)
                    units.append(Unit(b, (b,), force=True, cacheable=False, output=False))
        out.append(units)
        for b in range(nb):
            if bool(upd[b]):
                done[b] += 1
                if done[b] == steps:
                    finished_at[b] = it
    return out


def plan_df(s: DFSettings, cache: CacheSettings, cfg, geometry: LatentGeometry, dtype: torch.dtype,
            text_len: int, options: MemoryOptions = MemoryOptions(), branches: tuple[str, ...] | None = None
            ) -> DFPlan:
    """Check ``s`` (errors name the widget) and plan the run: windows, schedules, units, stores and memory.

    cfg: the model's ``WanConfig``; dtype: its compute dtype; branches: the text branches (default: cond, and
    uncond when cfg > 1); options: how the run holds its memory (``flowcache.plan``)."""
    windows = plan_windows(s, geometry, cfg.patch_size)
    path = cache.run_path(s.path)
    branches = branches or (("cond", "uncond") if s.cfg > 1.0 else ("cond",))
    cbs = s.causal_block_size
    sigmas, timesteps = flow_sigmas(s.steps, s.shift)
    h_lat, w_lat = s.height // geometry.spatial_stride, s.width // geometry.spatial_stride
    grid_hw = (h_lat // cfg.patch_size[1], w_lat // cfg.patch_size[2])
    tok_frame = grid_hw[0] * grid_hw[1]
    refresh = cache.attention == "window_refresh"
    c = dtype_bytes(dtype)
    plans = []
    for w in windows:
        nb, pb = w.length // cbs, w.prefix // cbs
        sched = timestep_matrix(nb, timesteps, s.ar_step, pb)
        store = None
        if path == "chunk":
            window_rows = nb * cbs * tok_frame
            budget = cache.kv_budget * cbs * tok_frame
            # budget + the chunks that can be unclean at once (+1: the chunk finishing this step), never more
            # than the window; window_refresh registers every chunk as the window starts: the whole window
            cap = window_rows if budget == 0 or refresh else min(
                window_rows, budget + (sched.max_active() + 1 + pb) * cbs * tok_frame)
            store = StorePlan("kv", cfg.num_layers, len(branches), cfg.num_heads, cfg.head_dim, cfg.head_dim, cap,
                              c, options.kv_fp8, options.kv_offload, budget, 0, tok_frame, cache.mix_lambda,
                              causal=cache.attention == "block_causal")
        plans.append(WindowPlan(w, sched, _window_units(sched, nb, pb, s.steps, path, refresh), store))
    memory = _df_memory(s, cache, cfg, plans, grid_hw, dtype, text_len, options, branches, h_lat * w_lat,
                        geometry)
    return DFPlan(s, path, cache.attention, branches, plans, grid_hw, tok_frame, sigmas, timesteps, memory)


def _df_memory(s: DFSettings, cache: CacheSettings, cfg, plans: list[WindowPlan], grid_hw, dtype, text_len: int,
               options: MemoryOptions, branches, latent_pixels: int, geometry: LatentGeometry) -> MemoryPlan:
    """The run's memory at its highest point, iteration by iteration: the step's forward (its working set measured
    on meta tensors, once per size) on top of what the loop holds by then (the window's latents, the solvers'
    state of the chunks started, the guided-velocity buffer, the policy's payloads of the units still
    denoising, the text, the finished windows' output), beside the largest window's KV store."""
    cbs, c, branch_n = s.causal_block_size, dtype_bytes(dtype), len(branches)
    tokens_per_frame = grid_hw[0] * grid_hw[1] // cfg.patch_size[0]
    frame = geometry.channels * latent_pixels * 4  # one latent frame, fp32
    policy = make_policy(cache)

    def payloads(tokens: int, steps_taken: int) -> int:
        """What the policy holds for a unit of ``tokens`` tokens that took ``steps_taken`` steps."""
        return policy.state_bytes(tokens, cfg.dim, c, branch_n, steps_taken)

    text = branch_n * text_len * (cfg.text_dim * 4 + cfg.dim * c)  # padded conditioning and its embedding
    solver = 3 if s.solver == "unipc" else 0  # UniPC keeps two predictions and the last sample per chunk
    held_at: dict[tuple[int, int, int], int] = {}  # (window, frames forwarded, frames output) -> most held then
    output = 0
    for w, wp in enumerate(plans):
        nb, length = wp.sched.update_mask.shape[1], wp.win.length
        base = text + output + length * frame * (2 if wp.win.prefix and s.addnoise_condition > 0 else 1)
        started, done = [False] * nb, [0] * nb
        for it, units in enumerate(wp.steps):
            n = length if wp.store is None else cbs * len(units)
            out = length if wp.store is None else cbs * sum(u.output for u in units)
            if wp.store is None:
                holding = payloads(length * tokens_per_frame, it) if it > 0 else 0
            else:
                holding = sum(payloads(cbs * tokens_per_frame, done[b]) for b in range(nb)
                              if started[b] and done[b] < s.steps)
            held = (base + holding + solver * sum(started) * cbs * frame
                    + (length * frame if it > 0 else 0))  # the guided velocity, from the first step on
            held_at[(w, n, out)] = max(held_at.get((w, n, out), 0), held)
            for b in range(nb):
                if bool(wp.sched.update_mask[it][b]):
                    started[b], done[b] = True, done[b] + 1
        output += (length - wp.win.prefix) * frame
    # a step's working set grows with the frames it forwards and outputs: measure only steps no other step
    # outdoes in frames, output and what is held at once
    best = (-1, 0, 0, 0)  # (total, activations, state, frames)
    for (w, n, out), held in held_at.items():
        if any(n2 >= n and o2 >= out and h2 >= held and (n2, o2, h2) != (n, out, held)
               for (w2, n2, o2), h2 in held_at.items() if plans[w2].store == plans[w].store):
            continue
        act = wan_forward_peak(cfg, dtype, n, grid_hw, branch_n, text_len, options, plans[w].store, out,
                               cbs * tokens_per_frame)
        if act + held > best[0]:
            best = (act + held, act, held, n)
    stores = [max((wp.store for wp in plans if wp.store is not None), key=lambda st: st.bytes)] \
        if plans[0].store is not None else []
    facts = {"forward": f"{branch_n} branches x {best[3]} latent frames x {grid_hw[0] * grid_hw[1]} tokens",
             "windows": len(plans), "tokens_per_frame": grid_hw[0] * grid_hw[1],
             "kv_rows": stores[0].capacity if stores else 0, "chunk_tokens": cbs * grid_hw[0] * grid_hw[1]}
    return MemoryPlan(options, stores, best[1], best[2], facts)


@dataclass
class _Window:
    """One window's latents and solvers while it runs."""

    plan: WindowPlan
    x: torch.Tensor
    solvers: list
    pos: torch.Tensor | None
    vanilla: dict                       # per branch: (real, paper) FLOPs of one whole-window forward
    whole: WholeWindow | None           # the window path's forward (None on the chunk path)
    store: KVStore | None               # the chunk path's KV store (None on the window path)
    counter: StepCounter | None = None  # steps taken per chunk
    velocity: torch.Tensor | None = None  # the guided velocity of the step's units [1, C, F, h, w], reused


class _DFLoop:
    """The ``ChunkLoop`` of one diffusion-forcing run (see ``flowcache.runner``), reading its ``DFPlan``."""

    def __init__(self, pipe: "DiffusionForcingPipeline", plan: DFPlan, step: WanStep, noise: NoiseSource | None,
                 prompts: PromptSchedule | None = None, texts: list[torch.Tensor] | None = None):
        self.pipe, self.plan, self.s, self.call = pipe, plan, plan.settings, step
        self.noise = noise or SeededNoise(plan.settings.seed)  # in order: a window's init, its prefix re-noise
        self.prefix: torch.Tensor | None = None
        self.cur: _Window | None = None
        self.prompts, self.texts, self.entry = prompts, texts, 0
        # each window's first new latent frame (after its prefix): where its prompt is read
        self.first_new, f = [], 0
        for wp in plan.windows:
            self.first_new.append(f)
            f += wp.win.length - wp.win.prefix

    def segments(self) -> list[Segment]:
        cbs = self.s.causal_block_size
        return [Segment(wp.win.index, wp.win.length // cbs, wp.sched.iterations) for wp in self.plan.windows]

    def start(self, seg: Segment, run: RunState) -> None:
        s, model, geo, plan = self.s, self.pipe.model, self.pipe.geometry, self.plan
        wp = plan.windows[seg.index]
        win, cbs = wp.win, s.causal_block_size
        h_lat, w_lat = s.height // geo.spatial_stride, s.width // geo.spatial_stride
        if self.prompts is not None:  # a window reads the prompt that holds at its first new frame
            entry = self.prompts.entry_at(self.first_new[seg.index])
            if entry != self.entry:
                self.entry = entry
                self.call.set_contexts({**self.call.contexts,
                                        "cond": model.text_embed(self.texts[entry].to(model.device))})
                run.stats.switches.append(switch_record(seg.index, self.first_new[seg.index], entry, "window",
                                                        geo.temporal_stride))
        x = initial_latents(self.noise, (1, geo.channels, win.length, h_lat, w_lat), f"window {win.index} init",
                            self.prefix if win.prefix else None, model.device)
        cfgm = model.cfg
        tok_frame = plan.tokens_per_frame
        nb = seg.chunks
        # one whole-window forward per branch, what the vanilla loop spends every step: as computed (full
        # attention: every chunk sees the whole window) and in the paper's accounting (chunk j sees j chunks)
        dims = (cfgm.dim, cfgm.ffn_dim, cfgm.num_layers)
        window_tokens = nb * cbs * tok_frame
        vanilla = {}
        for b, ctx in self.call.contexts.items():
            paper = paper_window_flops(cbs * tok_frame, nb, *dims, ctx.shape[1])
            real = paper if s.window_mask == "block_causal" else forward_flops(window_tokens, window_tokens, *dims,
                                                                              ctx.shape[1])
            vanilla[b] = (real, paper)
        whole = None
        if wp.store is not None:
            run.stores["kv"] = wp.store.build()
            for c in range(win.prefix // cbs):
                run.stores["kv"].mark_clean(c)
        else:
            mask = (block_causal_mask((win.length,) + plan.grid_hw, cbs, x.device)
                    if s.window_mask == "block_causal" else None)
            whole = WholeWindow(mask, vanilla)
        self.cur = _Window(wp, x, [make_solver(s.solver, plan.sigmas) for _ in range(nb)],
                           geo.positions(win.length, h_lat, w_lat, x.device), vanilla, whole, run.stores.get("kv"),
                           StepCounter(nb, s.steps))
        run.preview = lambda: self.cur.x.clone()  # the whole window after the step, prefix included

    def steps(self, seg: Segment):
        s, w = self.s, self.cur
        cbs, win = s.causal_block_size, w.plan.win
        for it, (units, stepped) in enumerate(zip(w.plan.steps, w.plan.sched.active_steps())):
            t_frames = w.plan.sched.timesteps[it].repeat_interleave(cbs)[None].to(w.x.device)
            x_in = w.x
            if s.addnoise_condition > 0 and win.prefix:  # SkyReels: the carried-over prefix is re-noised a little
                x_in = w.x.clone()
                a = 0.001 * s.addnoise_condition
                n = self.noise.draw(tuple(w.x[:, :, :win.prefix].shape),
                                    f"window {win.index} iteration {it} prefix").to(w.x.device)
                x_in[:, :, :win.prefix] = w.x[:, :, :win.prefix] * (1 - a) + n * a
                t_frames[:, :win.prefix] = float(s.addnoise_condition)
            if units[0].id == "window":
                spans = [UnitSpan(slice(0, win.length), 0)]
            else:
                spans = [UnitSpan(slice(u.id * cbs, (u.id + 1) * cbs), u.id * cbs) for u in units]
            yield Step(it, units, [b for b, _ in stepped], data={"x_in": x_in, "t": t_frames, "spans": spans})

    def signals(self, step: Step) -> dict:
        d = step.data
        d["emb"] = self.call.embed(d["x_in"], d["t"], self.cur.pos, d["spans"])
        return self.call.signals(d["emb"], step.units)

    def compute(self, step: Step, decisions: Decisions, reuse: Reuse) -> tuple[torch.Tensor, Work]:
        """The guided velocity [1, C, F, h, w], valid on the step's units' frames (``update`` reads no other):
        one buffer per window, written in place each step."""
        d, w = step.data, self.cur
        work = Work()
        work.reference(sum(r for r, _ in w.vanilla.values()), sum(p for _, p in w.vanilla.values()))
        preds, called = self.call.predict(d["emb"], step.units, d["spans"], decisions, reuse, w.store, w.whole)
        if len(preds) == 1:
            guided = preds["cond"]
        else:  # uncond + cfg · (cond − uncond), with one temporary
            guided = (preds["cond"] - preds["uncond"]).mul_(self.s.cfg).add_(preds["uncond"])
        if w.velocity is None:
            w.velocity = torch.zeros(d["x_in"].shape, dtype=torch.float32, device=d["x_in"].device)
        return w.velocity.index_copy_(2, self.call.output_frames(d["emb"], step.units), guided), work.add(called)

    def update(self, step: Step, v: torch.Tensor, reuse: Reuse) -> Work:
        """Each active chunk's solver step; a chunk that took its last step is clean in the store."""
        s, w = self.s, self.cur
        cbs = s.causal_block_size
        work = Work()
        for b in step.active:
            fr = slice(b * cbs, (b + 1) * cbs)
            w.x[:, :, fr] = w.solvers[b].step(v[:, :, fr], w.x[:, :, fr])
        for b in w.counter.advance(step, work):
            if w.store is not None:
                w.store.mark_clean(b)
        return work

    def finish(self, seg: Segment, run: RunState) -> torch.Tensor:
        w, windows = self.cur, self.plan.windows
        if seg.index + 1 < len(windows):
            self.prefix = self.pipe.next_prefix(w.x, windows[seg.index + 1].win.prefix, self.s)
        prefix = w.plan.win.prefix
        return (w.x if prefix == 0 else w.x[:, :, prefix:]).float().cpu()


class DiffusionForcingPipeline:
    """Run a Wan diffusion-forcing model over a whole video; see the module docstring."""

    def __init__(self, model: WanForward, geometry: LatentGeometry | None = None, text_len: int = 512,
                 codec: LatentCodec | None = None):
        check_model(model, WanForward,
                    "DiffusionForcingPipeline runs Wan2.1 / SkyReels-V2 DiTs (WanDiT or WanTreeModel)",
                    {"MagiDiT": " This is a MAGI-1 DiT: sample it with flowcache.pipelines.magi.MagiPipeline "
                                "(the MAGI-1 sampler)."})
        self.model = model
        self.geometry = geometry or LatentGeometry()
        self.text_len = text_len
        self.codec = codec

    def plan(self, settings: DFSettings, cache: CacheSettings | None = None,
             options: MemoryOptions = MemoryOptions()) -> DFPlan:
        """The run's ``DFPlan`` for this model (every input error, before any work)."""
        return plan_df(settings, cache or CacheSettings(), self.model.cfg, self.geometry, self.model.dtype,
                       self.text_len, options)

    @torch.inference_mode()
    def __call__(self, cond: "torch.Tensor | PromptSchedule", uncond: torch.Tensor | None, settings: DFSettings,
                 cache: CacheSettings | None = None, hooks: RunHooks | None = None,
                 policy: CachePolicy | None = None, plan: DFPlan | None = None, noise: NoiseSource | None = None
                 ) -> tuple[torch.Tensor, RunStats]:
        """Returns model-space latents [1, C, F, h, w] (fp32, CPU) and the run's statistics.

        cond/uncond: text states [1, S, text_dim] (uncond needed when cfg > 1); cond may be a ``PromptSchedule``:
        each window reads the prompt that holds at its first new (non-prefix) frame; hooks: progress and cancel;
        policy: use this policy instead of the one ``cache`` names (calibration's recorder); plan: the run's
        plan made by ``plan`` (default: planned here, K/V resident in the compute dtype); noise: where every
        draw comes from (default: seeded by ``settings.seed``), named "window {w} init" and
        "window {w} iteration {i} prefix" (the prefix re-noise of ``addnoise_condition``).
        """
        cache = cache or CacheSettings()
        model = self.model
        plan = plan or self.plan(settings, cache, MemoryOptions.of(cache))  # every input error before any work
        s = plan.settings
        prompts = as_schedule(cond).check(s.num_frames, self.geometry.temporal_stride)
        names = ["positive"] if len(prompts.entries) == 1 else [f"prompts entry {i + 1}" for i in range(len(prompts.entries))]
        entries = [check_conditioning(e.states, model.cfg.text_dim, self.text_len, n)
                   for e, n in zip(prompts.entries, names)]
        texts = {"cond": entries[0]}
        if s.cfg > 1.0:
            if uncond is None:
                raise InputError("negative: conditioning is required when cfg > 1.")
            texts["uncond"] = check_conditioning(uncond, model.cfg.text_dim, self.text_len, "negative")
        contexts = {b: model.text_embed(c.to(model.device)) for b, c in texts.items()}
        run = new_run(cache, tuple(contexts), s.steps, plan.path, plan.memory.options.name, hooks, policy)
        step = WanStep(model, contexts, s.fps, causal=cache.attention == "block_causal",
                       slice_tokens=plan.memory.options.slice_tokens, cancel=run.check_cancel)
        return run_loop(_DFLoop(self, plan, step, noise, prompts, entries), run), run.stats

    def next_prefix(self, x: torch.Tensor, n_latents: int, s: DFSettings) -> torch.Tensor:
        """The next window's clean prefix: VAE re-encode of the last overlap_history decoded frames
        (SkyReels), or, without a VAE, the last latent frames directly (a latent-space overlap)."""
        if self.codec is None:
            return x[:, :, -n_latents:].clone()
        pixels = self.codec.decode(x.float())
        z = self.codec.encode(pixels[-s.overlap_history:])
        return z[:, :, :n_latents].to(x.dtype)


__all__ = ["DFPlan", "DFSettings", "DiffusionForcingPipeline", "LatentGeometry", "LatentCodec", "StepInfo", "Window",
           "WindowPlan", "plan_df", "plan_windows", "check_conditioning"]
