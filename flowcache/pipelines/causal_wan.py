"""Causal Wan (Self-Forcing, CausVid, Causal Forcing) on the shared runner: the video block by block against a KV
cache, any length in bounded memory.

Per block of ``num_frame_per_block`` latent frames (3 chunk-wise, 1 frame-wise), as the official loops run it:

* start from fresh noise; at each of the few denoising timesteps t_i (Self-Forcing: [1000, 750, 500, 250] warped
  through the shift-5 schedule = [1000, 937.5, 833.3, 625]; CausVid: [1000, 757, 522] as they are) the model
  predicts the flow v, x0 = x − σ_i·v (σ = t/1000, in float64), and unless it is the last step the block is
  re-noised to the next level with a fresh draw: x = (1 − σ_{i+1})·x0 + σ_{i+1}·ε. The block's output is the
  last x0;
* then one pass at t = ``context_noise`` (0) on that x0 writes the block's clean K/V (its output is discarded).

Keys are stored after RoPE at absolute frame positions and never re-rotated; a block attends to every stored
block plus itself; there is no CFG. Past the trained horizon the loop keeps going with a bounded store:
``kv_mode`` "rolling" keeps ``sink_frames`` pinned and the newest blocks inside ``local_attn_frames`` (evicting
at the first step of a new block, as the official rolling cache does); "compressed" keeps the sink and compresses
the rest of the clean history per head to ``kv_budget`` blocks (importance minus redundancy); "global" keeps
everything (memory grows with length: the baseline). Each block may reuse its cached residual between its
steps (any cache method on the chunk path), though with 3-4 steps there is little to skip.

Prompts may change over time (``flowcache.prompts.PromptSchedule``): a change takes effect at the first block
that starts at or after its latent frame, by the loop's rule. "switch" (Self-Forcing, CausVid): the block and
everything after it read the new text, the stored K/V stay as they were. "recache" (LongLive's
``_recache_after_switch``): before that block, one forward of the last ``min(window, f)`` generated frames at
t = ``context_noise`` with the new text rewrites their stored K/V, laid onto the store's rows from the newest
back (its output is discarded); with ``keep_sink`` (LongLive's ``global_sink``) the sink keeps its old K/V unless
the re-cache starts at frame 0. LongLive v1.0 is this loop with a 12-frame window, a 3-frame sink and re-cache.

Every random draw comes from one ``NoiseSource`` (default: seeded), so a run replays exactly from its draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import CacheSettings, make_policy
from ..cache.base import CachePolicy
from ..errors import InputError
from ..flops import forward_flops, text_projection_flops
from ..models.wan import WanForward
from ..noise import NoiseSource, SeededNoise
from ..kv.store import RewriteAttention
from ..plan import MemoryOptions, MemoryPlan, StorePlan, dtype_bytes, wan_forward_peak
from ..prompts import PromptSchedule, as_schedule, switch_record
from ..runner import Decisions, Reuse, RunHooks, RunState, Segment, Step, Unit, Work, new_run, run_loop
from ..stats import RunStats
from ..validate import finite, one_of, whole_fields
from .common import LatentGeometry, check_model
from .wan_step import UnitSpan, WanStep, check_conditioning

KV_MODES = ("global", "rolling", "compressed")
# What each release runs; a preset is data: the sampler fills CausalSettings from it.
LOOP_PRESETS: dict[str, dict] = {
    "self_forcing": {"denoising_steps": (1000.0, 750.0, 500.0, 250.0), "warp": True, "shift": 5.0},
    "causvid": {"denoising_steps": (1000.0, 757.0, 522.0), "warp": False, "shift": 8.0},
}
# How each release's own loop changes prompt (``flowcache.prompts``); "auto" on a schedule takes this.
PROMPT_RULES = ("switch", "recache")


@dataclass
class CausalSettings:
    """Sampler settings; defaults are Self-Forcing's (480x832, 81 frames = 21 latent frames in 7 blocks, 16 fps).

    denoising_steps: the timesteps of the few-step list (0..1000); warp: map them through the shifted flow
    schedule (Self-Forcing) or use them as they are (CausVid). kv_mode: "rolling", "compressed" or "global";
    local_attn_frames: the rolling window in latent frames, the current block included (21 = the trained
    horizon); sink_frames: leading latent frames always kept; context_noise: the timestep of the clean pass.
    """

    width: int = 832
    height: int = 480
    num_frames: int = 81
    num_frame_per_block: int = 3
    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    warp: bool = True
    shift: float = 5.0
    seed: int = 0
    fps: float = 16.0
    kv_mode: str = "rolling"
    local_attn_frames: int = 21
    sink_frames: int = 3
    context_noise: float = 0.0
    prompt_rule: str = "switch"  # the model's own rule for a prompt change: "switch" or "recache" (LongLive)


def timesteps(s: CausalSettings) -> list[float]:
    """The model timesteps of a block's steps: warped t' = 1000·shift·u / (1 + (shift − 1)·u) with u = t/1000
    (``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`` indexed at 1000 − t), or as given."""
    if not s.warp:
        return [float(t) for t in s.denoising_steps]
    out = []
    for t in s.denoising_steps:
        u = torch.tensor(float(t) / 1000.0, dtype=torch.float32)
        out.append(float(1000.0 * s.shift * u / (1 + (s.shift - 1) * u)))
    return out


@dataclass
class CausalPlan:
    """A causal run's layout (``plan_causal``) and, for a given model (``plan_causal_run``), its KV store and
    memory: what the sampler, the estimate and the loop read."""

    blocks: int
    block_frames: int
    latent_frames: int
    h: int
    w: int
    tokens_per_frame: int
    window_blocks: int
    sink_blocks: int
    settings: CausalSettings | None = None
    store: StorePlan | None = None
    memory: MemoryPlan | None = None

    @property
    def block_tokens(self) -> int:
        return self.block_frames * self.tokens_per_frame


def plan_causal(s: CausalSettings, geo: LatentGeometry, patch: tuple[int, int, int], kv_budget: int) -> CausalPlan:
    """Validate the settings (errors name the widget) and lay out the blocks; nothing runs before this passes."""
    whole_fields(s, "width", "height", "num_frames", "num_frame_per_block", "seed", "local_attn_frames", "sink_frames")
    s.shift = finite(s.shift, "shift", 0.0)
    s.fps = finite(s.fps, "fps", 0.0)
    s.context_noise = finite(s.context_noise, "context_noise", 0.0, 1000.0)
    if not s.denoising_steps or any(not 0 < finite(t, "denoising_steps", 0.0, 1000.0) for t in s.denoising_steps):
        raise InputError(f"denoising_steps={list(s.denoising_steps)}: must be timesteps in (0, 1000], e.g. "
                         "[1000, 750, 500, 250] (Self-Forcing).")
    geo.check_size(s.width, s.height, patch[1])
    geo.check_frames("num_frames", s.num_frames)
    fb = s.num_frame_per_block
    latent = geo.latent_frames(s.num_frames)
    if fb < 1 or latent % fb:
        ok = max(fb, latent // max(fb, 1) * max(fb, 1))
        raise InputError(f"num_frame_per_block={fb}: must divide the {latent} latent frames of num_frames="
                         f"{s.num_frames}; try num_frames={geo.pixel_frames(ok)}.")
    if s.prompt_rule not in PROMPT_RULES:
        raise InputError(f"transition={s.prompt_rule!r}: this loop changes prompt by {' or '.join(PROMPT_RULES)} "
                         "(blend is Krea Realtime's rule).")
    one_of(s.kv_mode, "kv_mode", KV_MODES)
    if s.local_attn_frames < fb or s.local_attn_frames % fb:
        raise InputError(f"local_attn_frames={s.local_attn_frames}: the window must hold whole blocks of "
                         f"num_frame_per_block={fb} (at least one).")
    if s.sink_frames < 0 or s.sink_frames % fb:
        raise InputError(f"sink_frames={s.sink_frames}: must be whole blocks of num_frame_per_block={fb}.")
    if s.kv_mode == "rolling" and s.sink_frames + fb > s.local_attn_frames:
        raise InputError(f"sink_frames={s.sink_frames}: larger than the window local_attn_frames="
                         f"{s.local_attn_frames} leaves no room for the current block of {fb} frames.")
    if s.kv_mode == "compressed" and kv_budget < 1:
        raise InputError("kv_budget: kv_mode 'compressed' keeps a budget of compressed history; set kv_budget ≥ 1 "
                         "(blocks).")
    h, w = s.height // geo.spatial_stride, s.width // geo.spatial_stride
    return CausalPlan(latent // fb, fb, latent, h, w, (h // patch[1]) * (w // patch[2]), s.local_attn_frames // fb,
                      s.sink_frames // fb, s)


def kv_store_blocks(plan: CausalPlan, kv_mode: str, kv_budget: int) -> int:
    """Blocks the KV store holds at most: every block (global), the rolling window, or the sink plus the
    compressed budget plus the block being written (compressed)."""
    return {"global": plan.blocks, "rolling": min(plan.blocks, plan.window_blocks),
            "compressed": min(plan.blocks, plan.sink_blocks + kv_budget + 1)}[kv_mode]


def plan_causal_run(s: CausalSettings, cache: CacheSettings, cfg, geo: LatentGeometry, dtype: torch.dtype,
                    text_len: int, options: MemoryOptions = MemoryOptions()) -> CausalPlan:
    """``plan_causal`` plus, for a model of config ``cfg`` computing in ``dtype``, its KV store and memory: one
    block per forward (no guidance branch), the store of ``kv_store_blocks`` blocks, the text's keys/values
    kept for the run, the latents of every block (the video's), the policy's residuals of one block."""
    plan = plan_causal(s, geo, cfg.patch_size, cache.kv_budget)
    c, tok = dtype_bytes(dtype), plan.block_tokens
    budget = cache.kv_budget * tok if s.kv_mode == "compressed" else 0
    plan.store = StorePlan("kv", cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, cfg.head_dim,
                           kv_store_blocks(plan, s.kv_mode, cache.kv_budget) * tok, c, options.kv_fp8,
                           options.kv_offload, budget, plan.sink_blocks, plan.tokens_per_frame, cache.mix_lambda)
    grid = (plan.h // cfg.patch_size[1], plan.w // cfg.patch_size[2])
    activations = wan_forward_peak(cfg, dtype, plan.block_frames, grid, 1, text_len, options, plan.store,
                                   unit_tokens=tok)
    latent = geo.channels * plan.h * plan.w * 4  # one latent frame, fp32
    text = text_len * (cfg.text_dim * 4 + cfg.dim * c) + cfg.num_layers * 2 * text_len * cfg.dim * c
    policy = make_policy(cache).state_bytes(tok, cfg.dim, c, 1)
    state = latent * (plan.latent_frames + 3 * plan.block_frames) + text + policy
    facts = {"forward": f"1 block x {tok} tokens", "kv_rows": plan.store.capacity, "blocks": plan.blocks,
             "tokens_per_frame": plan.tokens_per_frame}
    plan.memory = MemoryPlan(options, [plan.store], activations, state, facts)
    return plan


def check_prompts(cond: "torch.Tensor | PromptSchedule", num_frames: int, temporal_stride: int, text_dim: int,
                  text_len: int) -> tuple[PromptSchedule, list[torch.Tensor]]:
    """The schedule checked against the video, and each entry's text states [1, text_len, text_dim] (padded)."""
    prompts = as_schedule(cond).check(num_frames, temporal_stride)
    names = ["positive"] if len(prompts.entries) == 1 else [f"prompts entry {i}" for i in range(1, len(prompts.entries) + 1)]
    texts = [check_conditioning(e.states, text_dim, text_len, n) for e, n in zip(prompts.entries, names)]
    return prompts, texts


class _CausalLoop:
    """The ``ChunkLoop`` of one causal run: one segment, a step per denoising step and one per clean pass."""

    def __init__(self, pipe: "CausalWanPipeline", s: CausalSettings, plan: CausalPlan, call: WanStep,
                 cache: CacheSettings, noise: NoiseSource, prompts: PromptSchedule, texts: list[torch.Tensor]):
        self.pipe, self.s, self.plan, self.call, self.cache, self.noise = pipe, s, plan, call, cache, noise
        self.prompts, self.texts = prompts, texts  # texts: each entry's states, checked and padded
        self.ts = timesteps(s)
        self.x: torch.Tensor | None = None      # the current block's latents
        self.out: torch.Tensor | None = None    # every finished block's x0
        self.done_frames = 0
        self.entry = 0                          # the prompt entry the blocks read now
        fb = plan.block_frames
        # the blocks where the prompt changes, and the entry from there on
        self.changes = {b: prompts.entry_at(b * fb) for b in range(1, plan.blocks)
                        if prompts.entry_at(b * fb) != prompts.entry_at((b - 1) * fb)}
        self.recaches = s.prompt_rule == "recache"

    def segments(self) -> list[Segment]:
        n = self.plan.blocks * (len(self.ts) + 1) + (len(self.changes) if self.recaches else 0)
        return [Segment(0, self.plan.blocks, n)]

    def start(self, seg: Segment, run: RunState) -> None:
        p = self.plan
        self.store = run.stores["kv"] = p.store.build()
        self.out = torch.zeros(1, self.pipe.geometry.channels, p.latent_frames, p.h, p.w)
        run.preview = lambda: self.out[:, :, :self.done_frames]

    def steps(self, seg: Segment):
        """Per block: the re-cache (on a prompt change, under "recache"), the denoising steps, the clean pass. A
        block's new prompt and its fresh noise are taken as its first step is asked for (a generator: after the
        previous step's update), so the draws keep the official loop's order."""
        n, k, p = len(self.ts), 0, self.plan
        for b in range(p.blocks):
            switch = self._change_prompt(b) if b in self.changes else None  # on the block's first step
            if b in self.changes and self.recaches:
                yield Step(k, [Unit(b, (), force=True, cacheable=False, output=False)], [b], 0,
                           data={"block": b, "i": -1, "t": self.s.context_noise, "recache": True}, switch=switch)
                k, switch = k + 1, None
            for i in range(n):
                if i == 0:
                    self.x = self.noise.draw((1, self.pipe.geometry.channels, p.block_frames, p.h, p.w),
                                             f"block {b} init")
                yield Step(k, [Unit(b, (b,), force=i == n - 1)], [b], i, data={"block": b, "i": i, "t": self.ts[i]},
                           switch=switch if i == 0 else None)
                k += 1
            yield Step(k, [Unit(b, (b,), force=True, cacheable=False, output=False)], [b], n,
                       data={"block": b, "i": n, "t": self.s.context_noise, "clean": True})
            k += 1

    def _change_prompt(self, b: int) -> dict:
        """From block ``b`` on the blocks read the entry that holds there (called once, before its first step);
        returns the change's record for the run's statistics."""
        self.entry = self.changes[b]
        self.call.set_contexts({"cond": self.pipe.model.text_embed(self.texts[self.entry].to(self.pipe.model.device))})
        return switch_record(b, b * self.plan.block_frames, self.entry, self.s.prompt_rule,
                             self.pipe.geometry.temporal_stride)

    def _recache_layout(self, b: int, store) -> tuple[int, dict[int, slice]]:
        """(first frame, store chunk -> token range) of block ``b``'s re-cache: the last min(window, f) frames,
        laid onto the stored chunks from the newest back; the sink keeps its rows under ``keep_sink`` unless the
        re-cache starts at frame 0 (LongLive's write start)."""
        p, fb = self.plan, self.plan.block_frames
        blocks = b if self.s.kv_mode == "global" else min(p.window_blocks, b)
        first = (b - blocks) * fb
        stored = sorted(store.layers[0].ranges)
        targets, tok = {}, fb * p.tokens_per_frame
        for j, cid in enumerate(reversed(stored[-blocks:])):
            r = blocks - 1 - j  # the re-cached block laid on this chunk, counted from the first
            if self.prompts.keep_sink and first > 0 and cid < p.sink_blocks:
                continue
            targets[cid] = slice(r * tok, (r + 1) * tok)
        return first, targets

    def signals(self, step: Step) -> dict:
        """The step's input embedded (into ``step.data``) and the block's signal; a re-cache has none."""
        d, p = step.data, self.plan
        b = d["block"]
        if d.get("recache"):
            first, d["targets"] = self._recache_layout(b, self.store)
            n = b * p.block_frames - first
            d["x_in"] = self.out[:, :, first:b * p.block_frames].to(self.pipe.model.device)
            d["spans"] = [UnitSpan(slice(0, n), first)]
            t = torch.full((1, n), float(d["t"]), device=d["x_in"].device)
            pos = self.pipe.geometry.positions(n, p.h, p.w, d["x_in"].device)
            d["emb"] = self.call.embed(d["x_in"], t, pos, d["spans"])
            return {}
        x_in = self.out[:, :, b * p.block_frames:(b + 1) * p.block_frames] if d.get("clean") else self.x
        d["x_in"] = x_in.to(self.pipe.model.device)
        t = torch.full((1, p.block_frames), float(d["t"]), device=d["x_in"].device)
        d["spans"] = [UnitSpan(slice(0, p.block_frames), b * p.block_frames)]
        pos = self.pipe.geometry.positions(p.block_frames, p.h, p.w, d["x_in"].device)  # None unless the model takes them
        d["emb"] = self.call.embed(d["x_in"], t, pos, d["spans"])
        return self.call.signals(d["emb"], step.units)

    def compute(self, step: Step, decisions: Decisions, reuse: Reuse) -> tuple[torch.Tensor, Work]:
        """The block's flow prediction [1, C, F, h, w] (the clean pass's and a re-cache's are not read)."""
        d, p = step.data, self.plan
        store, work = self.store, Work()
        cfgm = self.pipe.model.cfg
        text = self.call.contexts["cond"].shape[1]
        if d.get("recache"):  # the vanilla loop re-caches too: counted as it is
            rows, tok = store.layers[0].used, d["x_in"].shape[2] * p.tokens_per_frame
            flops = forward_flops(tok, rows, cfgm.dim, cfgm.ffn_dim, cfgm.num_layers, text)
            work.reference(flops, flops)
            kv = RewriteAttention(store, d["targets"], d["block"])
            preds, called = self.call.predict(d["emb"], step.units, d["spans"], decisions, reuse, kv=kv)
            return preds["cond"], work.add(called)
        if d["i"] == 0 and self.s.kv_mode == "rolling":  # the official rolling cache evicts as a block starts
            store.drop_oldest(p.window_blocks - p.sink_blocks - 1)
        block_tok = p.block_frames * p.tokens_per_frame
        rows = store.context_rows(d["block"], block_tok)
        # the official loop computes the text's keys/values once per prompt, not in every forward
        proj = text_projection_flops(cfgm.dim, cfgm.num_layers, text)
        fresh_text = step.index == 0 or (d["i"] == 0 and d["block"] in self.changes and not self.recaches)
        work.reference(forward_flops(block_tok, rows, cfgm.dim, cfgm.ffn_dim, cfgm.num_layers, text) - proj
                       + (proj if fresh_text else 0.0),
                       forward_flops(block_tok, rows, cfgm.dim, cfgm.ffn_dim, cfgm.num_layers, text))
        preds, called = self.call.predict(d["emb"], step.units, d["spans"], decisions, reuse, store)
        return preds["cond"], work.add(called)

    def update(self, step: Step, v: torch.Tensor, reuse: Reuse) -> Work:
        """x0 = x − σ·v, then the re-noise to the next level, or the block's output at its last step."""
        d, p = step.data, self.plan
        b, i = d["block"], d["i"]
        step.chunk_step = max(0, min(i + 1, len(self.ts)))
        if d.get("recache"):  # the re-cache only rewrote K/V
            return Work()
        if d.get("clean"):  # the clean pass only wrote K/V
            self.store.mark_clean(b)
            return Work()
        sigma = float(d["t"]) / 1000.0
        x0 = (self.x.double() - sigma * v.double().cpu()).float()
        if i + 1 < len(self.ts):
            nxt = self.ts[i + 1] / 1000.0
            eps = self.noise.draw(tuple(x0.shape), f"block {b} step {i + 1}")
            self.x = (1 - nxt) * x0 + nxt * eps
        else:
            self.out[:, :, b * p.block_frames:(b + 1) * p.block_frames] = x0
            self.done_frames = (b + 1) * p.block_frames
            return Work(finished=[b])
        return Work()

    def finish(self, seg: Segment, run: RunState) -> torch.Tensor:
        return self.out


class CausalWanPipeline:
    """Run a causal Wan model (Self-Forcing, CausVid, Causal Forcing) block by block; see the module docstring."""

    def __init__(self, model: WanForward, geometry: LatentGeometry | None = None, text_len: int = 512):
        check_model(model, WanForward, "loop: the causal loop runs Wan2.1-architecture models (Self-Forcing, "
                    "CausVid, Causal Forcing)", {"": " MAGI-1 has its own chunk-wise loop."})
        self.model = model
        self.geometry = geometry or LatentGeometry()
        self.text_len = text_len

    @torch.inference_mode()
    def plan(self, settings: CausalSettings, cache: CacheSettings | None = None,
             options: MemoryOptions = MemoryOptions()) -> CausalPlan:
        """The run's ``CausalPlan`` for this model (every input error, before any work)."""
        return plan_causal_run(settings, cache or CacheSettings(), self.model.cfg, self.geometry, self.model.dtype,
                               self.text_len, options)

    def __call__(self, cond: "torch.Tensor | PromptSchedule", settings: CausalSettings,
                 cache: CacheSettings | None = None, hooks: RunHooks | None = None, noise: NoiseSource | None = None,
                 policy: CachePolicy | None = None, plan: CausalPlan | None = None) -> tuple[torch.Tensor, RunStats]:
        """Latents [1, C, F, h, w] (fp32, CPU) and the run's statistics. cond: text states [1, S, text_dim], or a
        ``PromptSchedule`` of them (see the module docstring); no negative (these models run without CFG).
        noise: where every draw comes from (default: seeded by ``settings.seed``). plan: made by ``plan``
        (default: planned here, K/V resident)."""
        cache = cache or CacheSettings()
        model = self.model
        plan = plan or self.plan(settings, cache, MemoryOptions.of(cache))  # errors before any work
        settings = plan.settings
        prompts, texts = check_prompts(cond, settings.num_frames, self.geometry.temporal_stride, model.cfg.text_dim,
                                       self.text_len)
        rule = prompts.rule(settings.prompt_rule)
        if rule not in PROMPT_RULES:
            raise InputError(f"transition={rule!r}: this loop changes prompt by {' or '.join(PROMPT_RULES)} "
                             "(blend is Krea Realtime's rule).")
        settings.prompt_rule = rule
        contexts = {"cond": model.text_embed(texts[0].to(model.device))}
        run = new_run(cache, ("cond",), len(settings.denoising_steps), "chunk", plan.memory.options.name, hooks,
                      policy, loop="causal", kv_mode=settings.kv_mode, blocks=plan.blocks)
        # a block attends to the stored blocks and itself: the store is the attention (block-causal by layout)
        call = WanStep(model, contexts, settings.fps, causal=False, text_kv_once=True,
                       slice_tokens=plan.memory.options.slice_tokens, cancel=run.check_cancel)
        loop = _CausalLoop(self, settings, plan, call, cache, noise or SeededNoise(settings.seed), prompts, texts)
        return run_loop(loop, run), run.stats


__all__ = ["CausalPlan", "CausalSettings", "CausalWanPipeline", "KV_MODES", "LOOP_PRESETS", "PROMPT_RULES",
           "check_prompts", "kv_store_blocks", "plan_causal", "plan_causal_run", "timesteps"]
