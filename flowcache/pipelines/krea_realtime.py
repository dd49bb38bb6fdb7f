"""Krea Realtime 14B on the shared runner: block by block, its KV cache rebuilt from a short context each block.

The release's loop (``release_server.GenerationSession.generate_block`` of krea-ai/realtime-video), per block of
``num_frame_per_block`` (3) latent frames:

* **context**: from block 1 on, the store is emptied and ONE forward at t = 0 of ``context_frames`` (K = 3)
  latent frames writes their K/V (output discarded), RoPE positions 0..K-1, block-causal among them. While
  (b − 1)·3 < K the context is frame 0 plus the newest K − 1 frames (block 1: block 0 as it is); after that its
  oldest frame is replaced by a pixel-space round trip: the last pixel frame of latent frame L − K (L = frames
  generated so far), decoded by the VAE and encoded again as a single image. So from block 2 on frame 0 is gone
  (no sink) and the loop needs the VAE.
* **steps**: the block sits at RoPE positions K..K+2 (0..2 for block 0) and attends to the context and itself,
  no mask. 5 steps t = linspace(1000, 0, 5) on the shift-5 flow grid (1000, 937.5, 833.3, 625, 0): the model
  predicts the flow v, x0 = x − σ·v in float64 (σ of the nearest grid timestep: the last step, t = 0, takes the
  grid's last entry, σ ≈ 0.005), and before every step but the last the block is re-noised,
  x = (1 − σ')·x0 + σ'·ε. The block's output is the last x0. No clean pass.
* **prompts**: a change blends the text states over ``blend_blocks`` (4) blocks: the release queues
  lerp(e_old, e_new, w) for w = linspace(0, 1, N) and takes one per block, after that block's context forward
  (which still reads the previous block's text). So the change's first block still reads the old text (w = 0)
  and the new one holds fully N − 1 blocks later. N = 1 switches at once (the release's linspace(0, 1, 1) = [0]
  would never switch).

Latents and the text stay in the model's dtype between steps, as the release keeps them (bf16). Its code is
only right at 832×480 (RoPE offsets and cache rows fixed at 1560 tokens a frame, the re-encoded frame resized
to 832×480); here the true tokens per frame are used, so other sizes run, away from what the model was
trained on.

The VAE (``LatentCodec``) decodes a short clip ending at the frame it needs, starting ``DECODE_WARMUP`` latent
frames earlier: the release decodes the stream as it goes, its causal caches carrying the history over, which
a host's VAE (a whole clip from its first frame) cannot; the warm-up frames give the decoder that history.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..cache import CacheSettings, make_policy
from ..cache.base import CachePolicy
from ..errors import InputError
from ..flops import forward_flops, text_projection_flops
from ..models.wan import WanForward
from ..noise import NoiseSource, SeededNoise
from ..plan import MemoryOptions, MemoryPlan, StorePlan, dtype_bytes, wan_forward_peak
from ..prompts import PromptSchedule, switch_record
from ..runner import Decisions, Reuse, RunHooks, RunState, Segment, Step, Unit, Work, new_run, run_loop
from ..schedulers import flow_shift
from ..stats import RunStats
from ..validate import finite, whole, whole_fields
from .causal_wan import CausalPlan, CausalSettings, check_prompts, plan_causal
from .common import LatentCodec, LatentGeometry, check_model
from .wan_step import UnitSpan, WanStep

DECODE_WARMUP = 2  # latent frames decoded before the one whose pixels are re-encoded (see the module docstring)


@dataclass
class KreaSettings:
    """Sampler settings; defaults are the release's (832x480, 3 frames a block, a 3-frame context, 5 steps,
    shift 5). num_frames: video frames, 4·k+1 with k a multiple of the block (9 blocks = 27 latent frames = 105
    frames); blend_blocks: blocks a prompt change is blended over."""

    width: int = 832
    height: int = 480
    num_frames: int = 105
    num_frame_per_block: int = 3
    context_frames: int = 3
    steps: int = 5
    shift: float = 5.0
    seed: int = 0
    fps: float = 16.0
    blend_blocks: int = 4


def release_schedule(steps: int, shift: float, strength: float = 1.0) -> tuple[list[float], list[float]]:
    """(model timesteps, σ) of a block's steps, as the release computes them in float32: the 1000-point grid of
    ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`` padded with t = 0; the steps
    linspace(1000·strength, 0, steps) taken as whole grid indices; σ of the grid entry nearest each timestep."""
    grid = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = flow_shift(grid, shift)
    padded = torch.cat([sigmas * 1000, torch.zeros(1)])
    picks = torch.linspace(strength * 1000, 0, steps, dtype=torch.float32).to(torch.long)
    ts = padded[1000 - picks]
    nearest = (sigmas[None] * 1000 - ts[:, None]).abs().argmin(dim=1)
    return [float(t) for t in ts], [float(s) for s in sigmas[nearest]]


def plan_krea(s: KreaSettings, geo: LatentGeometry, patch: tuple[int, int, int]) -> CausalPlan:
    """Validate the settings (errors name the widget) and lay out the blocks."""
    whole_fields(s, "context_frames", "steps", "blend_blocks")
    s.shift = finite(s.shift, "shift", 0.0)
    fb = whole(s.num_frame_per_block, "num_frame_per_block")
    if s.steps < 2:
        raise InputError(f"steps={s.steps}: Krea Realtime's schedule needs at least 2 steps (the release runs 5; "
                         "4 for speed).")
    if fb >= 1 and (s.context_frames < fb or s.context_frames % fb):
        raise InputError(f"context_frames={s.context_frames}: must be whole blocks of num_frame_per_block={fb} "
                         "(the release: 3).")
    if s.blend_blocks < 1:
        raise InputError(f"blend_blocks={s.blend_blocks}: must be at least 1 (the release blends over 4).")
    # the geometry is the causal loop's: sizes, frame counts and blocks checked the same way
    base = CausalSettings(width=s.width, height=s.height, num_frames=s.num_frames, num_frame_per_block=fb,
                          seed=s.seed, fps=s.fps, kv_mode="global", local_attn_frames=fb, sink_frames=0)
    plan = plan_causal(base, geo, patch, 0)
    s.width, s.height, s.num_frames, s.seed, s.fps = base.width, base.height, base.num_frames, base.seed, base.fps
    return plan


def needs_vae(plan: CausalPlan, s: KreaSettings) -> bool:
    """Whether some block re-encodes a context frame (the run then needs the VAE)."""
    return any((b - 1) * plan.block_frames >= s.context_frames for b in range(1, plan.blocks))


def plan_krea_run(s: KreaSettings, cache: CacheSettings, cfg, geo: LatentGeometry, dtype: torch.dtype,
                  text_len: int, options: MemoryOptions = MemoryOptions()) -> CausalPlan:
    """``plan_krea`` plus the store (the context and one block: flat in the video's length) and the memory."""
    plan = plan_krea(s, geo, cfg.patch_size)
    c, T = dtype_bytes(dtype), plan.tokens_per_frame
    rows = (s.context_frames + plan.block_frames) * T
    plan.store = StorePlan("kv", cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, cfg.head_dim, rows, c,
                           options.kv_fp8, options.kv_offload, 0, 0, T, cache.mix_lambda, causal=True)
    grid = (plan.h // cfg.patch_size[1], plan.w // cfg.patch_size[2])
    frames = max(s.context_frames, plan.block_frames)
    activations = wan_forward_peak(cfg, dtype, frames, grid, 1, text_len, options, plan.store)
    latent = geo.channels * plan.h * plan.w * 4
    text = text_len * (cfg.text_dim * 4 + cfg.dim * c) + cfg.num_layers * 2 * text_len * cfg.dim * c
    policy = make_policy(cache).state_bytes(plan.block_tokens, cfg.dim, c, 1)
    state = latent * (plan.latent_frames + 3 * plan.block_frames + s.context_frames) + 2 * text + policy
    facts = {"forward": f"1 block x {plan.block_tokens} tokens, context {s.context_frames * T}", "kv_rows": rows,
             "blocks": plan.blocks, "tokens_per_frame": T}
    plan.memory = MemoryPlan(options, [plan.store], activations, state, facts)
    plan.settings = None
    return plan


class _KreaLoop:
    """The ``ChunkLoop`` of one Krea Realtime run: per block a context pass (from block 1 on) and its steps."""

    def __init__(self, pipe: "KreaRealtimePipeline", s: KreaSettings, plan: CausalPlan, call: WanStep,
                 noise: NoiseSource, prompts: PromptSchedule, texts: list[torch.Tensor], codec: LatentCodec | None):
        self.pipe, self.s, self.plan, self.call, self.noise = pipe, s, plan, call, noise
        self.prompts, self.codec = prompts, codec
        self.dtype = pipe.model.dtype
        self.texts = [t.to(self.dtype) for t in texts]
        self.ts, self.sigmas = release_schedule(s.steps, s.shift)
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.done_frames = 0
        fb = plan.block_frames
        self.changes = {b: prompts.entry_at(b * fb) for b in range(1, plan.blocks)
                        if prompts.entry_at(b * fb) != prompts.entry_at((b - 1) * fb)}
        self.text = self.texts[0]          # the text states the blocks read now
        self.queue: list[torch.Tensor] = []  # blended text states still to come, one per block

    def segments(self) -> list[Segment]:
        n = self.plan.blocks * len(self.ts) + (self.plan.blocks - 1)
        return [Segment(0, self.plan.blocks, n)]

    def start(self, seg: Segment, run: RunState) -> None:
        p = self.plan
        self.stores = run.stores  # the store is made anew each block (``steps``)
        self.out = torch.zeros(1, self.pipe.geometry.channels, p.latent_frames, p.h, p.w, dtype=self.dtype)
        run.preview = lambda: self.out[:, :, :self.done_frames].float()

    def steps(self, seg: Segment):
        """Per block: its store made anew; from block 1 on the context pass; then its text (a blend's next state)
        and fresh noise, taken as the block's first step is asked for (a generator: after the previous step's
        update, so the context pass still reads the previous text), and its steps."""
        k, n, p = 0, len(self.ts), self.plan
        for b in range(p.blocks):
            self.store = self.stores["kv"] = p.store.build()  # rebuilt each block: context + block
            if b:
                ids = self._context_ids(b)
                yield Step(k, [Unit(c, (), force=True, cacheable=False, output=False) for c in ids], [b], 0,
                           data={"block": b, "context": True})
                k += 1
            switch = self._next_text(b)
            self.x = self.noise.draw((1, self.pipe.geometry.channels, p.block_frames, p.h, p.w),
                                     f"block {b} init").to(self.dtype)
            for i in range(n):
                yield Step(k, [Unit(b, (b,), force=i == n - 1)], [b], i, data={"block": b, "i": i},
                           switch=switch if i == 0 else None)
                k += 1

    # -- the context --------------------------------------------------------------------------------
    def _context_len(self, b: int) -> int:
        return min(b * self.plan.block_frames, self.s.context_frames)

    def _context_ids(self, b: int) -> list[int]:
        """The store ids of the context's blocks (the store is new each block: ids below the block's own)."""
        n = self._context_len(b) // self.plan.block_frames
        return list(range(b - n, b))

    def _reencoded(self, j: int) -> torch.Tensor:
        """Latent frame ``j`` after its pixel round trip: its last pixel frame decoded (``DECODE_WARMUP`` frames of
        history before it) and encoded as a single image. [1, C, 1, h, w]."""
        lo = max(0, j - DECODE_WARMUP)
        pixels = self.codec.decode(self.out[:, :, lo:j + 1].float())
        z = self.codec.encode(pixels[-1:])
        if tuple(z.shape[2:]) != (1,) + tuple(self.out.shape[3:]) or z.shape[1] != self.out.shape[1]:
            raise InputError(f"vae: encoding one frame gave latents {list(z.shape)}; expected "
                             f"[1, {self.out.shape[1]}, 1, {self.out.shape[3]}, {self.out.shape[4]}] (a Wan2.1 VAE).")
        return z.to(self.dtype)

    def _context(self, b: int) -> torch.Tensor:
        """The context latents of block ``b`` [1, C, n, h, w] (see the module docstring)."""
        L, K, fb = b * self.plan.block_frames, self.s.context_frames, self.plan.block_frames
        if (b - 1) * fb < K:  # frame 0 and the newest K - 1 frames (fewer while the video is short)
            if K == 1:
                return self.out[:, :, :1]
            return torch.cat([self.out[:, :, :1], self.out[:, :, 1:L][:, :, -(K - 1):]], dim=2)
        newest = self.out[:, :, L - K + 1:L]
        return torch.cat([self._reencoded(L - K), newest], dim=2)

    # -- prompts ----------------------------------------------------------------------------------------
    def _next_text(self, b: int) -> dict | None:
        """Before block ``b``'s steps (after its context pass): a change starting here queues the blend (its
        record for the run's statistics is returned); one queued text state is taken per block."""
        switch = None
        if b in self.changes:
            new = self.texts[self.changes[b]]
            n = self.s.blend_blocks
            if n == 1:
                self.queue = [new]
            else:
                w = torch.linspace(0, 1, steps=n)[:, None, None].to(self.text)
                self.queue = list(torch.lerp(self.text, new, w).chunk(n, dim=0))
            switch = switch_record(b, b * self.plan.block_frames, self.changes[b], "blend",
                                   self.pipe.geometry.temporal_stride)
        if self.queue:
            self.text = self.queue.pop(0)
            self.call.set_contexts({"cond": self.pipe.model.text_embed(self.text)})
        return switch

    # -- the runner's hooks -------------------------------------------------------------------------------
    def signals(self, step: Step) -> dict:
        """The step's input (the context, or the block) embedded into ``step.data``, and its units' signals."""
        d, p = step.data, self.plan
        b, dev, fb = d["block"], self.pipe.model.device, p.block_frames
        if d.get("context"):
            ctx = self._context(b)
            n = ctx.shape[2]
            d["x_in"] = ctx.to(dev)
            d["spans"] = [UnitSpan(slice(i * fb, (i + 1) * fb), i * fb) for i in range(n // fb)]
            t = torch.zeros(1, n, device=dev)
        else:
            d["x_in"] = self.x.to(dev)
            d["spans"] = [UnitSpan(slice(0, fb), self._context_len(b))]
            t = torch.full((1, fb), self.ts[d["i"]], device=dev)
        pos = self.pipe.geometry.positions(d["x_in"].shape[2], p.h, p.w, dev)
        d["emb"] = self.call.embed(d["x_in"], t, pos, d["spans"])
        return self.call.signals(d["emb"], step.units)

    def compute(self, step: Step, decisions: Decisions, reuse: Reuse) -> tuple[torch.Tensor, Work]:
        """The block's flow prediction [1, C, F, h, w] (a context pass's is not read)."""
        d, p = step.data, self.plan
        cfgm = self.pipe.model.cfg
        text = self.call.contexts["cond"].shape[1]
        proj = text_projection_flops(cfgm.dim, cfgm.num_layers, text)
        tok = d["x_in"].shape[2] * p.tokens_per_frame
        rows = tok + (self._context_len(d["block"]) * p.tokens_per_frame if not d.get("context") else 0)
        full = forward_flops(tok, rows, cfgm.dim, cfgm.ffn_dim, cfgm.num_layers, text)
        # the release computes the text's keys/values once per text state (each block of a blend, or once)
        fresh = step.index == 0 or (not d.get("context") and d["i"] == 0 and (self.queue or d["block"] in self.changes))
        work = Work()
        work.reference(full - proj + (proj if fresh else 0.0), full)
        preds, called = self.call.predict(d["emb"], step.units, d["spans"], decisions, reuse, self.store)
        return preds["cond"], work.add(called)

    def update(self, step: Step, v: torch.Tensor, reuse: Reuse) -> Work:
        """x0 = x − σ·v in float64, then the re-noise to the next level, or the block's output at its last step."""
        d, p = step.data, self.plan
        if d.get("context"):  # the context pass only wrote K/V
            return Work()
        b, i = d["block"], d["i"]
        step.chunk_step = i + 1
        flow = v.to(self.dtype).cpu()  # the release's flow prediction is in the model's dtype
        x0 = (self.x.double() - self.sigmas[i] * flow.double()).to(self.dtype)
        if i + 1 < len(self.ts):
            nxt = self.sigmas[i + 1]
            eps = self.noise.draw(tuple(x0.shape), f"block {b} step {i + 1}").to(self.dtype)
            self.x = ((1 - nxt) * x0.float() + nxt * eps.float()).to(self.dtype)
        else:
            fb = p.block_frames
            self.out[:, :, b * fb:(b + 1) * fb] = x0
            self.done_frames = (b + 1) * fb
            return Work(finished=[b])
        return Work()

    def finish(self, seg: Segment, run: RunState) -> torch.Tensor:
        return self.out.float()


class KreaRealtimePipeline:
    """Run Krea Realtime 14B block by block; see the module docstring. codec: the VAE in model space (needed when
    a block re-encodes a context frame: from block 2 on with the release's settings)."""

    def __init__(self, model: WanForward, geometry: LatentGeometry | None = None, text_len: int = 512,
                 codec: LatentCodec | None = None):
        check_model(model, WanForward, "loop: Krea Realtime's loop runs a Wan2.1-architecture model")
        self.model, self.geometry, self.text_len, self.codec = model, geometry or LatentGeometry(), text_len, codec

    @torch.inference_mode()
    def plan(self, settings: KreaSettings, cache: CacheSettings | None = None,
             options: MemoryOptions = MemoryOptions()) -> CausalPlan:
        """The run's plan (every input error, the missing VAE included, before any work)."""
        plan = plan_krea_run(settings, cache or CacheSettings(), self.model.cfg, self.geometry, self.model.dtype,
                             self.text_len, options)
        if self.codec is None and needs_vae(plan, settings):
            raise InputError("vae: Krea Realtime's loop re-encodes the oldest frame of its context through the VAE "
                             f"from block {2 if plan.block_frames >= settings.context_frames else 'n'} on; connect "
                             "the Wan2.1 VAE (Load VAE) to the sampler's vae input.")
        return plan

    def __call__(self, cond: "torch.Tensor | PromptSchedule", settings: KreaSettings,
                 cache: CacheSettings | None = None, hooks: RunHooks | None = None, noise: NoiseSource | None = None,
                 policy: CachePolicy | None = None, plan: CausalPlan | None = None) -> tuple[torch.Tensor, RunStats]:
        """Latents [1, C, F, h, w] (fp32, CPU) and the run's statistics. cond: text states [1, S, text_dim] or a
        ``PromptSchedule`` (its changes blended over its ``blend_blocks``, or ``settings.blend_blocks`` when the
        schedule says auto). noise: where every draw comes from (default: seeded by ``settings.seed``)."""
        cache = cache or CacheSettings()
        model = self.model
        settings = replace(settings)
        plan = plan or self.plan(settings, cache, MemoryOptions.of(cache))
        prompts, texts = check_prompts(cond, settings.num_frames, self.geometry.temporal_stride, model.cfg.text_dim,
                                       self.text_len)
        rule = prompts.rule("blend")
        if rule != "blend":
            raise InputError(f"transition={rule!r}: Krea Realtime changes prompt by blending its text over blocks "
                             "(transition auto or blend; blend_blocks 1 switches at once).")
        if isinstance(cond, PromptSchedule):  # the schedule node's blend length
            settings.blend_blocks = prompts.blend_blocks
        run = new_run(cache, ("cond",), settings.steps, "chunk", plan.memory.options.name, hooks, policy,
                      loop="krea_realtime", blocks=plan.blocks, context_frames=settings.context_frames)
        contexts = {"cond": model.text_embed(texts[0].to(device=model.device, dtype=model.dtype))}
        call = WanStep(model, contexts, settings.fps, causal=True, text_kv_once=True,
                       slice_tokens=plan.memory.options.slice_tokens, cancel=run.check_cancel)
        loop = _KreaLoop(self, settings, plan, call, noise or SeededNoise(settings.seed), prompts, texts, self.codec)
        return run_loop(loop, run), run.stats


__all__ = ["DECODE_WARMUP", "KreaRealtimePipeline", "KreaSettings", "needs_vae", "plan_krea", "plan_krea_run",
           "release_schedule"]
