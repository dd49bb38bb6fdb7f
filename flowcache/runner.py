"""The shared chunk-loop runner: one denoising loop under every model family.

A model family is a ``ChunkLoop``: it says which segments the video has (long-video windows; the whole video
for MAGI-1 and the causal loops), which units are active at each step and at which timesteps, how their inputs
are built, how the model is called for the units that compute, and how the solver moves the latents; its plan
makes its KV stores (``StorePlan.build``), which it hands the runner as a segment starts. The runner does the
rest, written once: the cache policy and its decisions, what a reused unit applies, keeping the payloads of
the units that computed, the statistics and FLOP totals, the compute/reuse maps, progress, and the cancel
point. All of it lives in one ``RunState`` made per call and dropped with it, so nothing leaks between runs,
between two sampler nodes, or out of a cancelled run.

One step, as ``run_loop`` drives it, top to bottom::

    signals = loop.signals(step)                      # the cache signal of each unit (e.g. a chunk's e0)
    decisions = run.decide(step, signals)             # per (branch, unit): compute or reuse
    out, work = loop.compute(step, decisions, reuse)  # model calls for what computes; reuse[(branch, unit)]
    run.book(work)                                    # payloads kept, forwards and FLOPs counted
    run.book(loop.update(step, out, reuse))           # the solver; finished units (MAGI-1: its payloads too)

The loops never call back into the runner: what they did comes back as ``Work``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Protocol

import torch

from .cache import CacheSettings, make_policy
from .cache.base import CachePolicy
from .kv.store import KVStore
from .stats import RunStats

UnitId = Hashable
Decisions = dict[tuple[str, UnitId], bool]


@dataclass
class Unit:
    """What one cache decision covers in one step.

    id: the chunk's index in its segment, or ``"window"``; chunks: the map rows the decision is written to;
    force: compute whatever the policy says (a chunk's last step, a global first/last step, ...);
    cacheable: False for work that is always done and never decided or counted (a clean prefix writing its K/V).
    output: False for a pass whose prediction nobody reads (it only writes K/V): the head skips it.
    """

    id: UnitId
    chunks: tuple[int, ...]
    force: bool = False
    cacheable: bool = True
    output: bool = True


@dataclass
class Step:
    """One iteration of a family's loop. ``data`` holds what the family computed for it (inputs, embeddings)."""

    index: int
    units: list[Unit]
    active: list[int] = field(default_factory=list)  # chunks being denoised, for progress
    chunk_step: int = 0                               # steps taken by the newest active chunk
    data: dict = field(default_factory=dict)
    switch: dict | None = None                        # a prompt change taking effect here (``switch_record``)


@dataclass
class Work:
    """What a step's model calls or solver did, for the runner to book (``RunState.book``): payloads to keep per
    (branch, unit), the FLOPs in the order they were spent (``forward``: one transformer forward as computed and
    in the paper's accounting; ``extra``: work outside a counted forward, real column only), calls into the
    transformer blocks, what the vanilla loop (cache off) spends on the step, and the units that took their last
    step (their state is dropped after their payloads are kept)."""

    payloads: list[tuple[tuple[str, UnitId], torch.Tensor]] = field(default_factory=list)
    flops: list[tuple[float, float | None]] = field(default_factory=list)  # (real, paper); paper None: extra
    calls: int = 0
    vanilla: list[tuple[float, float]] = field(default_factory=list)
    finished: list[UnitId] = field(default_factory=list)

    def keep(self, branch: str, unit: UnitId, payload: torch.Tensor) -> None:
        self.payloads.append(((branch, unit), payload))

    def forward(self, flops: float, paper: float | None = None) -> None:
        self.flops.append((flops, flops if paper is None else paper))

    def extra(self, flops: float) -> None:
        self.flops.append((flops, None))

    def reference(self, flops: float, paper: float | None = None) -> None:
        """What the vanilla loop spends here (the reference of the FLOPs speedups)."""
        self.vanilla.append((flops, flops if paper is None else paper))

    def add(self, other: "Work") -> "Work":
        """``other`` appended after this step's own entries; returns self."""
        self.payloads += other.payloads
        self.flops += other.flops
        self.calls += other.calls
        self.vanilla += other.vanilla
        self.finished += other.finished
        return self


class Reuse:
    """What a reused unit applies, per (branch, unit): the policy's payload, held or extrapolated, read when the
    loop asks for it (``reuse[("cond", 3)]``). ``keeps_payloads``: whether the run keeps the payloads of the
    units that compute (else a loop need not compute them: ``off``)."""

    def __init__(self, policy: CachePolicy):
        self._policy = policy
        self.keeps_payloads = policy.reads_payloads
        self._cfg = policy.cfg

    def base_branch(self, branch: str) -> str | None:
        """The branch whose current output a reused ``branch`` adds its payload to, instead of its own input
        (CFG-aware ``delta`` reuse: the unconditional branch on the conditional one's); None: its own input."""
        return self._cfg.base_branch(branch)

    def __getitem__(self, key: tuple[str, UnitId]) -> torch.Tensor:
        return self._policy.recall(key)

    def output(self, key: tuple[str, UnitId], x: torch.Tensor, out: torch.Tensor | None, work: Work,
               cacheable: bool = True) -> torch.Tensor:
        """A unit's output from its input ``x``, the one rule of reuse for every family: ``out`` when the unit
        computed (its payload ``out − x`` kept in ``work`` when the run keeps payloads and the unit is
        cacheable), else (``out`` None: reused) ``x`` plus the payload it kept last. The payload is whatever a
        family caches: a Wan loop's backbone residual (blocks out − embedded tokens), MAGI-1's latent update
        (x after the solver − x before)."""
        if out is None:
            return x + self[key]
        if cacheable and self.keeps_payloads:
            work.keep(*key, out - x)
        return out


class StepCounter:
    """Steps taken by each chunk of a segment, each chunk finishing at its ``steps``-th: the loops that
    stagger chunks (diffusion forcing, MAGI-1) count with it."""

    def __init__(self, chunks: int, steps: int):
        self.counts = [0] * chunks
        self.steps = steps
        self.finished: list[int] = []  # in the order they finished

    def advance(self, step: Step, work: Work) -> list[int]:
        """One step for each of ``step.active``; the chunks that took their last step (also into ``work`` and
        ``finished``). Sets ``step.chunk_step`` (the newest active chunk's steps) for progress."""
        done = []
        for c in step.active:
            self.counts[c] += 1
            if self.counts[c] == self.steps:
                done.append(c)
        self.finished += done
        work.finished += done
        step.chunk_step = self.counts[step.active[-1]] if step.active else 0
        return done


@dataclass
class Segment:
    """A stretch of the video with its own latents and KV stores (a long-video window)."""

    index: int
    chunks: int
    steps: int


@dataclass
class StepInfo:
    """What a progress callback sees after each step."""

    window: int
    windows: int
    iteration: int
    iterations: int
    done: int          # steps finished over the whole run
    total: int         # steps in the whole run
    active_chunks: list[int] = field(default_factory=list)
    computed: int = 0  # chunk-steps computed so far in the run
    reused: int = 0
    chunk_step: int = 0    # steps taken by the newest active chunk
    chunk_steps: int = 0   # steps every chunk takes
    # latents [1, C, F, h, w] on demand: the causal loop's frames finished so far; diffusion forcing's current
    # window, every frame as the step left it
    preview: Callable[[], torch.Tensor] | None = None

    def text(self) -> str:
        if self.active_chunks:
            where = f"chunk {self.active_chunks[-1]}: step {self.chunk_step}/{self.chunk_steps}"
        else:
            where = f"step {self.iteration + 1}/{self.iterations}"
        return f"window {self.window + 1}/{self.windows}, {where}, reused {self.reused}"


@dataclass
class RunHooks:
    """What the host hands a run: ``on_step`` after every step (progress; it may raise to cancel) and ``cancel``,
    a cheap check called between steps and between transformer blocks that raises to stop the run."""

    on_step: Callable[[StepInfo], None] | None = None
    cancel: Callable[[], None] | None = None


class RunState:
    """Everything one sampling run owns besides its latents: see the module docstring.

    policy: the cache policy (``make_policy``, or an observer such as calibration's recorder).
    branches: the decision branches (``("cond", "uncond")`` with CFG; one name without).
    chunk_steps: steps every chunk takes (for progress). hooks: the host's progress and cancel.
    """

    def __init__(self, policy: CachePolicy, stats: RunStats, branches: tuple[str, ...], chunk_steps: int,
                 hooks: RunHooks | None = None):
        self.policy, self.stats, self.branches = policy, stats, branches
        hooks = hooks or RunHooks()
        self.chunk_steps, self.on_step, self.cancel = chunk_steps, hooks.on_step, hooks.cancel
        policy.prepare(chunk_steps)
        self.stores: dict[str, KVStore] = {}
        self.maps: dict[str, list[list[str]]] = {}
        self.segment: Segment | None = None
        self.segments = 0
        self.done = 0
        self.total = 0
        self.preview: Callable[[], torch.Tensor] | None = None
        self.reuse = Reuse(policy)

    # -- the cancel point --------------------------------------------------------------------------
    def check_cancel(self) -> None:
        if self.cancel is not None:
            self.cancel()

    # -- segments ----------------------------------------------------------------------------------
    def begin_segment(self, seg: Segment) -> None:
        self.segment = seg
        self.policy.reset()
        self.stores = {}
        self.maps = {b: [[] for _ in range(seg.chunks)] for b in self.branches}

    def end_segment(self) -> None:
        """Per-segment statistics: iterations, maps, and the KV stores' sizes and compression."""
        s = self.stats
        s.iterations.append(self.segment.steps)
        for i, b in enumerate(self.branches[:2]):
            (s.maps if i == 0 else s.maps_uncond).append(["".join(c) for c in self.maps[b]])
        stores = list(self.stores.values())
        for st in stores:
            st.flush()
        if stores:
            s.kv_peak_bytes = max(s.kv_peak_bytes, sum(st.allocated_bytes for st in stores))
            s.kv_device_bytes = max(s.kv_device_bytes, sum(st.device_bytes for st in stores))
            s.kv_host_bytes = max(s.kv_host_bytes, sum(st.host_bytes for st in stores))
            s.kv_moved_bytes += sum(sum(st.moved.values()) for st in stores)
        for st in stores:
            s.kv_allocated_bytes = max(s.kv_allocated_bytes, st.allocated_bytes)
            kv = st.stats()
            if not s.kv_kept_per_layer:
                s.kv_kept_per_layer = [0] * len(kv["kept_per_layer"])
                s.kv_dropped_per_layer = [0] * len(kv["dropped_per_layer"])
            s.kv_kept_per_layer = [a + b for a, b in zip(s.kv_kept_per_layer, kv["kept_per_layer"])]
            s.kv_dropped_per_layer = [a + b for a, b in zip(s.kv_dropped_per_layer, kv["dropped_per_layer"])]
            s.compress_seconds += st.compress_seconds
        self.stores = {}

    # -- decisions and payloads --------------------------------------------------------------------
    def decide(self, step: Step, signals: dict[UnitId, Any]) -> Decisions:
        """One decision per (branch, unit) (or one per unit for every branch, for a policy with shared decisions);
        units that are not cacheable always compute."""
        out: Decisions = {}
        shared = getattr(self.policy, "shared_decision", False)
        for u in step.units:
            if not u.cacheable:
                out.update({(b, u.id): True for b in self.branches})
            elif shared:
                c = self.policy.should_compute(("*", u.id), signals[u.id], u.force)
                out.update({(b, u.id): c for b in self.branches})
            else:
                for b in self.branches:
                    out[(b, u.id)] = self.policy.should_compute((b, u.id), signals[u.id], u.force)
        cfg = self.policy.cfg
        if cfg.applies(self.branches):  # the uncond branch reused on more steps
            for u in step.units:
                if u.cacheable:
                    cfg.gate(u.id, u.force, out, self.policy.can_reuse)
        self.policy.release(out)
        return out

    def book(self, work: Work) -> None:
        """A step's work: its payloads kept, its calls, forwards and FLOPs counted (in the order spent), then its
        finished units' cached payloads and signals dropped (memory stays bounded)."""
        for key, payload in self.policy.cfg.payloads(work.payloads):
            self.policy.remember(key, payload)
        s = self.stats
        s.model_calls += work.calls
        for flops, paper in work.flops:
            s.flops += flops
            if paper is not None:  # a forward (an extra is in the real column only)
                s.forwards += 1
                s.flops_paper += paper
        for flops, paper in work.vanilla:
            s.flops_nocache += flops
            s.flops_nocache_paper += paper
        for unit in work.finished:
            self.policy.forget(unit)

    def end_step(self, step: Step, decisions: Decisions) -> None:
        if step.switch is not None:
            self.stats.switches.append(step.switch)
        for u in step.units:
            if not u.cacheable:
                continue
            for b in self.branches:
                c = decisions[(b, u.id)]
                for chunk in u.chunks:
                    self.maps[b][chunk].append("C" if c else "R")
                    self.stats.computed += int(c)
                    self.stats.reused += int(not c)
        self.done += 1
        if self.on_step is not None:
            seg = self.segment
            self.on_step(StepInfo(seg.index, self.segments, step.index, seg.steps, self.done, self.total,
                                  list(step.active), self.stats.computed, self.stats.reused, step.chunk_step,
                                  self.chunk_steps, self.preview))


def new_run(cache: CacheSettings, branches: tuple[str, ...], chunk_steps: int, path: str, memory_plan: str,
            hooks: RunHooks | None = None, policy: CachePolicy | None = None, **facts: Any) -> RunState:
    """A run's ``RunState`` with its statistics (``run.stats``) begun: the policy ``cache`` names, or ``policy``
    (an observer such as calibration's recorder); the settings it ran with, in the order every family reports
    them: the cache's, the ``path``, the family's own ``facts``, the memory plan's name."""
    stats = RunStats(mode=cache.method, settings={**cache.to_dict(), "path": path, **facts,
                                                  "memory_plan": memory_plan})
    return RunState(policy or make_policy(cache), stats, branches, chunk_steps, hooks)


class ChunkLoop(Protocol):
    """What a model family supplies to ``run_loop``; see the module docstring. One object per run."""

    def segments(self) -> list[Segment]:
        """The segments of the video, planned (and validated) before anything runs."""

    def start(self, seg: Segment, run: RunState) -> None:
        """Set up the segment: its noise, prefix, solvers; its KV stores into ``run.stores`` (kept by the loop
        too), its ``run.preview``."""

    def steps(self, seg: Segment) -> Iterable[Step]:
        """The segment's steps, each with its units; a generator, so a step's fresh noise is drawn when the step
        is asked for (after the previous step's update)."""

    def signals(self, step: Step) -> dict[UnitId, torch.Tensor]:
        """Each unit's cache signal (and whatever the step's model call will reuse, into ``step.data``)."""

    def compute(self, step: Step, decisions: Decisions, reuse: Reuse) -> tuple[Any, Work]:
        """The model call(s) for the units that compute (a reused unit of a Wan loop takes ``reuse[key]``):
        the step's output for ``update`` and what was done."""

    def update(self, step: Step, out: Any, reuse: Reuse) -> Work:
        """Move the latents by the solver; the units that finished (MAGI-1: the latent updates to keep, a
        reused unit's taken from ``reuse``)."""

    def finish(self, seg: Segment, run: RunState) -> torch.Tensor:
        """The segment's new latents [1, C, F, h, w] (fp32, CPU)."""


def run_loop(loop: ChunkLoop, run: RunState) -> torch.Tensor:
    """Drive ``loop`` to the end; returns the latents of every segment, concatenated along frames."""
    segments = loop.segments()
    run.segments, run.total = len(segments), sum(s.steps for s in segments)
    run.stats.windows = len(segments)
    t0 = time.perf_counter()
    pieces = []
    for seg in segments:
        run.begin_segment(seg)
        loop.start(seg, run)
        for step in loop.steps(seg):
            run.check_cancel()
            decisions = run.decide(step, loop.signals(step))
            out, work = loop.compute(step, decisions, run.reuse)
            run.book(work)
            run.book(loop.update(step, out, run.reuse))
            run.end_step(step, decisions)
        pieces.append(loop.finish(seg, run))
        run.end_segment()
    run.stats.wall_seconds = time.perf_counter() - t0
    return torch.cat(pieces, dim=2)
