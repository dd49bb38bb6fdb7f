"""SkyReels-V2 diffusion forcing with per-chunk caching and a KV store.

One pipeline, two forward granularities chosen by the cache policy's ``granularity`` (data, not type):

* ``window`` — SkyReels vanilla: the whole window (every latent frame, started or not) every step, full
  attention (or block-causal with ``attention="block_causal"``). TeaCache decides once per window.
* ``chunk``  — FlowCache's path: only the active chunks (started, not finished) are forwarded, each
  attending to the stored K/V of earlier chunks plus its own (block-causal, as the reference's per-chunk
  loop). Each chunk decides for itself whether to recompute or reuse its cached backbone residual (the
  head still runs with the current timestep). A reused chunk keeps its old K/V.

Per iteration the units are embedded once (latents and timesteps are the same for cond and uncond), and
every computed unit of every branch runs in one batched forward: chunks end to end along the tokens, CFG
branches along the batch, attention chunk by chunk against each branch's store (``ChunkBatchKV``). That is
the reference's one-forward-per-chunk-and-branch arithmetic with a few large matmuls instead of many small
ones, which is what small chunks (the demo, or small causal models) need to turn saved FLOPs into time.

All cache and KV state is created inside ``__call__`` and dropped with it, so nothing leaks between runs,
between two sampler nodes, or out of a cancelled run.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..cache import CacheSettings, make_policy
from ..df_schedule import timestep_matrix
from ..errors import InputError
from ..flops import forward_flops, paper_window_flops
from ..kv.scoring import CompressionConfig
from ..kv.store import ChunkBatchKV, KVStore
from ..models.wan import WanDiT, block_causal_mask
from ..schedulers import SOLVERS, flow_sigmas, make_solver
from ..stats import RunStats


@dataclass
class LatentGeometry:
    """How pixels map to latents for a model family (Wan VAE: 4x time, 8x space, 16 channels).

    position_channels: 2 for a model that takes each latent pixel's (y, x) position in -1..1 as extra input
    channels (Wan's image-to-video conditioning input, used by the shipped demo: RoPE alone tells a token
    where it is only relative to others, which a tiny model cannot turn into "the shape starts centred").
    """

    temporal_stride: int = 4
    spatial_stride: int = 8
    channels: int = 16
    position_channels: int = 0

    def positions(self, frames: int, height: int, width: int, device: torch.device | str = "cpu"
                  ) -> torch.Tensor | None:
        """The position channels [1, 2, frames, height, width] (None for models without them)."""
        if not self.position_channels:
            return None
        ys = torch.linspace(-1, 1, height, device=device)[:, None].expand(height, width)
        xs = torch.linspace(-1, 1, width, device=device)[None, :].expand(height, width)
        return torch.stack([ys, xs])[None, :, None].expand(1, 2, frames, height, width)

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_stride + 1

    def pixel_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.temporal_stride + 1


class LatentCodec(Protocol):
    """A VAE as the pipeline sees it, in model space (normalised latents)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T, H, W, 3] in 0..1 -> latents [1, C, F, h, w]."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [1, C, F, h, w] -> pixels [T, H, W, 3] in 0..1."""
        ...


@dataclass
class DFSettings:
    """Sampler settings; defaults are SkyReels-V2-DF-1.3B-540P's FlowCache runs (177 frames over 2 windows)."""

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
    attention: str = "full"  # window path only: "full" (SkyReels default) or "block_causal"


@dataclass
class Window:
    length: int   # latent frames in the window, prefix included
    prefix: int   # leading clean latent frames carried over from the previous window
    index: int = 0


@dataclass
class StepInfo:
    """What a progress callback sees after each iteration."""

    window: int
    windows: int
    iteration: int
    iterations: int
    done: int          # iterations finished over the whole run
    total: int         # iterations in the whole run
    active_chunks: list[int] = field(default_factory=list)
    computed: int = 0  # unit decisions so far in the run
    reused: int = 0
    chunk_step: int = 0    # steps taken by the newest active chunk
    chunk_steps: int = 0   # steps every chunk takes

    def text(self) -> str:
        if self.active_chunks:
            where = f"chunk {self.active_chunks[-1]}: step {self.chunk_step}/{self.chunk_steps}"
        else:
            where = f"step {self.iteration + 1}/{self.iterations}"
        return f"window {self.window + 1}/{self.windows}, {where}, reused {self.reused}"


def plan_windows(s: DFSettings, geo: LatentGeometry, patch: tuple[int, int, int] = (1, 2, 2)) -> list[Window]:
    """Validate the geometry and split the video into SkyReels windows; raises InputError before sampling."""
    unit = geo.spatial_stride * patch[1]
    for name, val in (("width", s.width), ("height", s.height)):
        if val <= 0 or val % unit:
            raise InputError(f"{name}={val}: must be a positive multiple of {unit} for this model "
                             f"(nearest: {max(unit, round(val / unit) * unit)}).")
    ts = geo.temporal_stride
    for name, val in (("num_frames", s.num_frames), ("base_num_frames", s.base_num_frames)):
        if val < 1 or (val - 1) % ts:
            raise InputError(f"{name}={val}: must be {ts}·k+1 for a model with {ts}x temporal compression "
                             f"(nearest: {max(1, round((val - 1) / ts)) * ts + 1}).")
    if s.steps < 1:
        raise InputError(f"steps={s.steps}: must be at least 1.")
    if s.ar_step < 0:
        raise InputError(f"ar_step={s.ar_step}: must be ≥ 0 (0 = synchronous).")
    if s.solver not in SOLVERS:
        raise InputError(f"solver={s.solver!r}: must be one of {', '.join(SOLVERS)}.")
    if s.attention not in ("full", "block_causal"):
        raise InputError(f"attention={s.attention!r}: must be 'full' or 'block_causal'.")
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


def check_conditioning(ctx: torch.Tensor, text_dim: int, text_len: int, name: str) -> torch.Tensor:
    """[1, S, text_dim] text states, zero-padded to ``text_len`` rows."""
    if ctx.dim() == 2:
        ctx = ctx[None]
    if ctx.dim() != 3 or ctx.shape[0] != 1:
        raise InputError(f"{name}: conditioning must be [1, tokens, {text_dim}], got {list(ctx.shape)}.")
    if ctx.shape[2] != text_dim:
        raise InputError(f"{name}: conditioning width is {ctx.shape[2]} but the model takes {text_dim} "
                         f"(Wan needs umT5-XXL states: CLIPLoader type 'wan').")
    if ctx.shape[1] == 0 or ctx.shape[1] > text_len:
        raise InputError(f"{name}: conditioning has {ctx.shape[1]} tokens; this model takes 1..{text_len}. "
                         "Shorten the prompt.")
    if ctx.shape[1] < text_len:
        ctx = torch.cat([ctx, ctx.new_zeros(1, text_len - ctx.shape[1], text_dim)], dim=1)
    return ctx


@dataclass
class _Unit:
    id: int | str
    frames: slice
    frame_offset: int
    cacheable: bool
    force: bool


class DiffusionForcingPipeline:
    """Run a Wan diffusion-forcing model over a whole video; see the module docstring."""

    def __init__(self, model: WanDiT, geometry: LatentGeometry | None = None, text_len: int = 512,
                 codec: LatentCodec | None = None):
        if not isinstance(model, WanDiT):
            hint = (" This is a MAGI-1 DiT: sample it with flowcache.pipelines.magi.MagiPipeline (the MAGI-1 sampler)."
                    if type(model).__name__ == "MagiDiT" else "")
            raise InputError(f"DiffusionForcingPipeline runs Wan2.1 / SkyReels-V2 DiTs (WanDiT, from the Wan loader); "
                             f"got {type(model).__name__}.{hint}")
        self.model = model
        self.geometry = geometry or LatentGeometry()
        self.text_len = text_len
        self.codec = codec

    @torch.inference_mode()
    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor | None, settings: DFSettings,
                 cache: CacheSettings | None = None, on_step: Callable[[StepInfo], None] | None = None
                 ) -> tuple[torch.Tensor, RunStats]:
        """Returns model-space latents [1, C, F, h, w] (fp32, CPU) and the run's statistics."""
        cache = cache or CacheSettings(mode="off")
        s = self._settings = settings
        model, cfgm = self.model, self.model.cfg
        windows = plan_windows(s, self.geometry, cfgm.patch_size)
        device = model.device
        ctxs = [("cond", check_conditioning(cond, cfgm.text_dim, self.text_len, "positive"))]
        if s.cfg > 1.0:
            if uncond is None:
                raise InputError("negative: conditioning is required when cfg > 1.")
            ctxs.append(("uncond", check_conditioning(uncond, cfgm.text_dim, self.text_len, "negative")))
        ctxs = [(b, model.text_embed(c.to(device))) for b, c in ctxs]
        policy = make_policy(cache)
        stats = RunStats(mode=cache.mode, settings=cache.to_dict(), windows=len(windows))
        gen = torch.Generator(device="cpu").manual_seed(int(s.seed))
        sigmas, timesteps = flow_sigmas(s.steps, s.shift)
        schedules = [timestep_matrix(w.length // s.causal_block_size, timesteps, s.ar_step,
                                     w.prefix // s.causal_block_size) for w in windows]
        total_iters = sum(sc.iterations for sc in schedules)
        h_lat, w_lat = s.height // self.geometry.spatial_stride, s.width // self.geometry.spatial_stride
        progress = {"done": 0, "total": total_iters}
        pieces: list[torch.Tensor] = []
        prefix: torch.Tensor | None = None
        t0 = time.perf_counter()
        for win, sched in zip(windows, schedules):
            noise = torch.randn(1, self.geometry.channels, win.length, h_lat, w_lat, generator=gen)
            x = noise.to(device)
            if win.prefix:
                x[:, :, :win.prefix] = prefix.to(device)
            policy.reset()
            x = self._run_window(x, win, sched, sigmas, ctxs, policy, cache, stats, gen, len(windows),
                                 progress, on_step)
            pieces.append((x if win.prefix == 0 else x[:, :, win.prefix:]).float().cpu())
            if win.index + 1 < len(windows):
                prefix = self._next_prefix(x, windows[win.index + 1].prefix, s)
        stats.wall_seconds = time.perf_counter() - t0
        return torch.cat(pieces, dim=2), stats

    def _next_prefix(self, x: torch.Tensor, n_latents: int, s: DFSettings) -> torch.Tensor:
        """The next window's clean prefix: VAE re-encode of the last overlap_history decoded frames
        (SkyReels), or, without a VAE, the last latent frames directly (a latent-space overlap)."""
        if self.codec is None:
            return x[:, :, -n_latents:].clone()
        pixels = self.codec.decode(x.float())
        z = self.codec.encode(pixels[-s.overlap_history:])
        return z[:, :, :n_latents].to(x.dtype)

    def _units(self, granularity: str, mask: torch.Tensor, iteration: int, iterations: int, prefix_blocks: int,
               chunk_steps: list[int], steps: int, cbs: int, length: int) -> list[_Unit]:
        if granularity == "window":
            return [_Unit("window", slice(0, length), 0, True, iteration == iterations - 1)]
        units = []
        for b in range(len(chunk_steps)):
            frames = slice(b * cbs, (b + 1) * cbs)
            if bool(mask[b]):
                units.append(_Unit(b, frames, b * cbs, True, chunk_steps[b] == steps - 1))
            elif b < prefix_blocks and iteration == 0:
                units.append(_Unit(b, frames, b * cbs, False, True))  # clean prefix: fill its K/V once
        return units

    def _run_window(self, x: torch.Tensor, win: Window, sched, sigmas: list[float], ctxs, policy,
                    cache: CacheSettings, stats: RunStats, gen: torch.Generator, n_windows: int,
                    progress: dict, on_step) -> torch.Tensor:
        s, model = self._settings, self.model
        cfgm = model.cfg
        cbs = s.causal_block_size
        nb, pb = win.length // cbs, win.prefix // cbs
        _, _, f, hl, wl = x.shape
        grid_hw = (hl // cfgm.patch_size[1], wl // cfgm.patch_size[2])
        tok_frame = grid_hw[0] * grid_hw[1]
        chunked = policy.granularity == "chunk"
        stores = {}
        if chunked:
            budget = cache.kv_budget * cbs * tok_frame
            active = sched.max_active()
            # budget + the chunks that can be unclean at once (+1: the chunk finishing this step), never more
            # than the whole window
            cap = nb * cbs * tok_frame if budget == 0 else min(nb * cbs * tok_frame,
                                                                budget + (active + 1 + pb) * cbs * tok_frame)
            comp = CompressionConfig(mix_lambda=cache.mix_lambda)
            stores = {b: KVStore(cfgm.num_layers, cap, budget, comp, tok_frame) for b, _ in ctxs}
            for st in stores.values():
                for b in range(pb):
                    st.mark_clean(b)
        mask_full = (block_causal_mask((f,) + grid_hw, cbs, x.device)
                     if (not chunked and s.attention == "block_causal") else None)
        solvers = [make_solver(s.solver, sigmas) for _ in range(nb)]
        chunk_steps = [0] * nb
        maps = {b: [[] for _ in range(nb)] for b, _ in ctxs}
        pos = self.geometry.positions(f, hl, wl, x.device)  # None unless the model takes position channels
        # one whole-window forward per branch: what the vanilla loop (cache off) spends every iteration
        window_flops = {b: self._window_flops(nb, cbs * tok_frame, ctx.shape[1]) for b, ctx in ctxs}
        for it in range(sched.iterations):
            upd = sched.update_mask[it]
            t_frames = sched.timesteps[it].repeat_interleave(cbs)[None].to(x.device)
            x_in = x
            if s.addnoise_condition > 0 and win.prefix:
                x_in = x.clone()
                a = 0.001 * s.addnoise_condition
                n = torch.randn(x[:, :, :win.prefix].shape, generator=gen).to(x.device)
                x_in[:, :, :win.prefix] = x[:, :, :win.prefix] * (1 - a) + n * a
                t_frames[:, :win.prefix] = float(s.addnoise_condition)
            units = self._units(policy.granularity, upd, it, sched.iterations, pb, chunk_steps, s.steps, cbs,
                                win.length)
            stats.flops_nocache += sum(window_flops.values())
            preds = self._step(x_in, t_frames, pos, units, ctxs, policy, stores, mask_full, grid_hw, stats, maps,
                               window_flops)
            v = preds["cond"] if len(ctxs) == 1 else preds["uncond"] + s.cfg * (preds["cond"] - preds["uncond"])
            for b in range(nb):
                if bool(upd[b]):
                    fr = slice(b * cbs, (b + 1) * cbs)
                    x[:, :, fr] = solvers[b].step(v[:, :, fr], x[:, :, fr])
                    chunk_steps[b] += 1
                    if chunk_steps[b] == s.steps:
                        for st in stores.values():
                            st.mark_clean(b)
            progress["done"] += 1
            if on_step is not None:
                active = [b for b in range(nb) if bool(upd[b])]
                on_step(StepInfo(win.index, n_windows, it, sched.iterations, progress["done"], progress["total"],
                                 active, stats.computed, stats.reused,
                                 chunk_steps[active[-1]] if active else 0, s.steps))
        stats.iterations.append(sched.iterations)
        stats.maps.append(["".join(c) for c in maps["cond"]])
        if "uncond" in maps:
            stats.maps_uncond.append(["".join(c) for c in maps["uncond"]])
        for st in stores.values():
            stats.kv_peak_bytes = max(stats.kv_peak_bytes, sum(x.allocated_bytes for x in stores.values()))
            stats.kv_allocated_bytes = max(stats.kv_allocated_bytes, st.allocated_bytes)
            kv = st.stats()
            if not stats.kv_kept_per_layer:
                stats.kv_kept_per_layer = [0] * len(kv["kept_per_layer"])
                stats.kv_dropped_per_layer = [0] * len(kv["dropped_per_layer"])
            stats.kv_kept_per_layer = [a + b for a, b in zip(stats.kv_kept_per_layer, kv["kept_per_layer"])]
            stats.kv_dropped_per_layer = [a + b for a, b in zip(stats.kv_dropped_per_layer, kv["dropped_per_layer"])]
            stats.compress_seconds += st.compress_seconds
        return x

    def _window_flops(self, chunks: int, tokens_per_chunk: int, text_len: int) -> float:
        """One whole-window forward in the paper's accounting (chunk j attends to j chunks; 420.8 TFLOPs for
        SkyReels-V2-1.3B at 540P). Both the vanilla reference and the window path are counted this way, so
        ``off`` spends exactly its ``flops_nocache``."""
        c = self.model.cfg
        return paper_window_flops(tokens_per_chunk, chunks, c.dim, c.ffn_dim, c.num_layers, text_len)

    def _step(self, x_in: torch.Tensor, t_frames: torch.Tensor, pos: torch.Tensor | None, units: list[_Unit],
              ctxs: list, policy, stores: dict, mask: torch.Tensor | None, grid_hw: tuple[int, int],
              stats: RunStats, maps: dict, window_flops: dict) -> dict[str, torch.Tensor]:
        """One iteration: every unit's prediction [1, C, F, h, w] per branch (zeros outside the units).

        Latents and timesteps do not depend on the text, so the units are embedded once for all branches.
        Each branch decides per unit; branches that computed the same units (always, when they see the same
        e0) run as one batch, and all computed units of a step run as one forward (``ChunkBatchKV``).
        """
        model, cfgm = self.model, self.model.cfg
        pt, tok_frame = cfgm.patch_size[0], grid_hw[0] * grid_hw[1]
        idx = torch.cat([torch.arange(u.frames.start, u.frames.stop) for u in units]).to(x_in.device)
        e, e0 = model.time_embed(t_frames.index_select(1, idx), self._settings.fps)
        h0 = model.embed(x_in.index_select(2, idx), None if pos is None else pos.index_select(2, idx))
        spans, f0 = [], 0  # per unit: (frames, tokens) slices of the concatenation
        for u in units:
            nf = u.frames.stop - u.frames.start
            spans.append((slice(f0, f0 + nf), slice(f0 // pt * tok_frame, (f0 + nf) // pt * tok_frame)))
            f0 += nf
        names = [b for b, _ in ctxs]
        compute = {b: [policy.should_compute((b, u.id), e0[:, fr], u.force) if u.cacheable else True
                       for u, (fr, _) in zip(units, spans)] for b in names}
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, b in enumerate(names):
            groups.setdefault(tuple(i for i, c in enumerate(compute[b]) if c), []).append(row)
        h = h0.expand(len(names), -1, -1).clone()
        for which, rows in groups.items():
            if which:
                self._forward_units([units[i] for i in which], [spans[i] for i in which], rows, h0, e0, ctxs,
                                    policy, stores, mask, grid_hw, stats, window_flops, h)
        for row, b in enumerate(names):
            for i, (u, (_, tok)) in enumerate(zip(units, spans)):
                if not compute[b][i]:
                    h[row:row + 1, tok] = h0[:, tok] + policy.recall((b, u.id))
                if u.cacheable:
                    stats.computed += int(compute[b][i])
                    stats.reused += int(not compute[b][i])
                    cells = maps[b][0] if u.id == "window" else maps[b][u.id]
                    cells.append("C" if compute[b][i] else "R")
        pred = model.head_out(h, e.expand(len(names), -1, -1), (f0 // pt,) + tuple(grid_hw))
        preds = {}
        for row, b in enumerate(names):
            out = torch.zeros(x_in.shape, dtype=torch.float32, device=x_in.device)
            preds[b] = out.index_copy_(2, idx, pred[row:row + 1])
        return preds

    def _forward_units(self, units: list[_Unit], spans: list, rows: list[int], h0: torch.Tensor, e0: torch.Tensor,
                       ctxs: list, policy, stores: dict, mask: torch.Tensor | None, grid_hw: tuple[int, int],
                       stats: RunStats, window_flops: dict, h: torch.Tensor) -> None:
        """One batched forward of ``units`` for the branches at ``rows``; writes their tokens into ``h``
        [branches, L, D] and remembers each cacheable unit's backbone residual per branch."""
        model, cfgm = self.model, self.model.cfg
        tokens = torch.cat([h0[:, tok] for _, tok in spans], dim=1).expand(len(rows), -1, -1)
        mod = torch.cat([e0[:, fr] for fr, _ in spans], dim=1).expand(len(rows), -1, -1, -1)
        ctx = torch.cat([ctxs[r][1] for r in rows], dim=0)
        branches = [ctxs[r][0] for r in rows]
        sizes = [tok.stop - tok.start for _, tok in spans]
        grid = (sum(fr.stop - fr.start for fr, _ in spans) // cfgm.patch_size[0],) + tuple(grid_hw)
        chunked = units[0].id != "window"
        kv = ChunkBatchKV([stores[b] for b in branches], [u.id for u in units], sizes) if chunked else None
        out = model.run_blocks(tokens, mod, ctx, grid, tuple(u.frame_offset for u in units), kv, mask)
        stats.model_calls += 1
        start = 0
        for u, (_, tok), n in zip(units, spans, sizes):
            for i, (r, b) in enumerate(zip(rows, branches)):
                res = out[i:i + 1, start:start + n]
                h[r:r + 1, tok] = res
                if u.cacheable:
                    policy.remember((b, u.id), res - h0[:, tok])
                stats.forwards += 1
                if chunked:
                    ctx_rows = kv.context_rows[(i, u.id)]
                    stats.flops += forward_flops(n, ctx_rows, cfgm.dim, cfgm.ffn_dim, cfgm.num_layers, ctx.shape[1])
                else:
                    stats.flops += window_flops[b]
            start += n
