"""What every cache method shares: the decision protocol, per-unit state, and the config helpers.

A *unit* is what one decision covers: a chunk, or the whole window, as the pipeline's execution path says.
Units are keyed by ``(branch, unit_id)`` so the cond and uncond passes never share state. The runner asks
``should_compute(key, signal, force)`` and keeps/hands out the reusable payload (a backbone residual, or a
latent update for MAGI-1) with ``remember`` / ``recall``; it reads only the policy's ``shared_decision`` flag,
never which method it has. A method's rule is its ``decide`` (and ``on_forced``); the bookkeeping around it
(counters, the last signal, a reuse with nothing cached turned into a compute) is ``should_compute``'s, once.
Observers that are no method (calibration's recorder, ``replay``) wrap ``should_compute`` itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Hashable, Mapping, Sequence

import torch

from ..errors import InputError
from ..validate import finite, whole
from .cfg import CfgReuse

UnitKey = Hashable


@dataclass
class UnitSignal:
    """What a unit offers a policy before deciding. primary: the family's FlowCache signal (Wan: the unit's e0,
    the timestep modulation; MAGI-1: the patch-embedded noisy input); input: the unit's transformer input (Wan:
    the embedded tokens h0), for methods that compare input and output changes."""

    primary: torch.Tensor
    input: torch.Tensor


def signal_of(signal: "UnitSignal | torch.Tensor", kind: str = "primary") -> torch.Tensor:
    """The tensor a policy reads; a bare tensor (tests, simple loops) serves as every kind."""
    return getattr(signal, kind) if isinstance(signal, UnitSignal) else signal


@dataclass
class UnitState:
    """Cache state of one unit in one branch."""

    acc: float = 0.0                       # accumulated rescaled change since the last compute
    prev_signal: torch.Tensor | None = None
    payload: torch.Tensor | None = None    # what a reuse applies
    payload_step: int = -1                 # the unit's step that computed ``payload``
    # extrapolate / forecast2: the (step, payload) pairs computed before ``payload``, oldest first; as many as the
    # forecast's order needs (a line one, a quadratic two), so memory stays at ``payload_slots`` per unit
    past: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    steps: int = 0                         # decisions taken for this unit so far
    computed: int = 0
    reused: int = 0
    skips: int = 0                         # reuses since the last compute (MagCache's K)
    ratio: float = 1.0                     # MagCache: product of magnitude ratios since the last compute
    memo: dict = field(default_factory=dict)  # a method's own per-unit facts (EasyCache: its last input/output, k)


def _compact(t: torch.Tensor) -> bool:
    """Whether ``t`` is all of its storage (not a slice keeping a larger tensor alive)."""
    return t.untyped_storage().nbytes() <= t.numel() * t.element_size()


def relative_l1(signal: torch.Tensor, prev: torch.Tensor) -> float:
    """mean|a − b| / mean|b| (no epsilon, as the reference code)."""
    return float((signal - prev).abs().mean() / prev.abs().mean())


class CachePolicy:
    """The ``off`` policy and every policy's base: always compute. A method overrides ``decide`` (its rule) and,
    when its rule keeps state beyond ``UnitState.acc``, ``on_forced``; nothing else of the decision.

    shared_decision: one decision per unit for every branch (key ``("*", unit)``), so cond and uncond stay in
    one batched call; payloads stay per branch. reads: which ``UnitSignal`` tensor the rule looks at (None: the
    rule reads no signal, and none is kept).
    order: what a reuse applies (``CacheSettings.reuse``, set by ``make_policy``): 0 ("hold"), the last computed
    payload as it is (every reference implementation); 1 ("extrapolate"), its first-order extrapolation from the
    unit's last two computed payloads, r_b + (r_b − r_a)·(k − b)/(b − a) for payloads computed at the unit's steps
    a < b and a reuse at step k (a TaylorSeer-style forecast); 2 ("forecast2"), the quadratic through the last
    three, in Newton's divided-difference form (the steps may be unevenly spaced: a compute happens when a
    unit's signal says so). With fewer payloads computed so far, the highest order they allow.
    ``extrapolate`` (order ≥ 1) is kept as the older name of order 1."""

    shared_decision = False
    reads = "primary"
    order = 0

    def __init__(self) -> None:
        self.states: dict[UnitKey, UnitState] = {}
        self.cfg = CfgReuse()  # CFG-aware reuse (``CacheSettings.cfg_reuse``, set by ``make_policy``): off


    @property
    def extrapolate(self) -> bool:
        """Whether a reuse forecasts from older payloads (order ≥ 1) rather than holding the last one."""
        return self.order >= 1

    @extrapolate.setter
    def extrapolate(self, on: bool) -> None:
        self.order = 1 if on else 0

    @property
    def payload_slots(self) -> int:
        """Payloads kept per unit and branch when the policy keeps any: the forecast's order plus one."""
        return self.order + 1

    def reset(self) -> None:
        """Drop all state: called at the start of every run and every long-video window."""
        self.states.clear()
        self.cfg.reset()

    def forget(self, unit: Hashable) -> None:
        """Drop a finished unit's state in every branch: a long video keeps only the units still denoising."""
        for key in [k for k in self.states if isinstance(k, tuple) and len(k) == 2 and k[1] == unit]:
            del self.states[key]
        self.cfg.forget(unit)

    def prepare(self, chunk_steps: int) -> None:
        """Told once per run how many steps every chunk takes (for rules indexed by a chunk's own step)."""

    def state(self, key: UnitKey) -> UnitState:
        return self.states.setdefault(key, UnitState())

    def decide(self, key: UnitKey, st: UnitState, signal: torch.Tensor | None, force: bool) -> bool:
        """The method's rule: compute (True) or reuse, from the unit's state before this step (``st.steps``
        decisions taken, ``st.prev_signal``) and its ``signal`` (None when ``reads`` is None); updates the
        rule's own state. ``force``: the pipeline's own reason to compute (e.g. the unit's last step)."""
        return True

    def should_compute(self, key: UnitKey, signal: "UnitSignal | torch.Tensor", force: bool = False) -> bool:
        """One decision for ``key``; ``force`` is the pipeline's own reason (e.g. the unit's last step)."""
        st = self.state(key)
        signal = signal_of(signal, self.reads) if self.reads is not None else None
        compute = self.decide(key, st, signal, force)
        if not compute and not self.can_reuse(key):  # nothing to reuse yet (e.g. warmup 0)
            compute, st.acc = True, 0.0
            self.on_forced(st)
        if signal is not None:
            # a slice of a step's whole input would keep all of it alive: keep a compact copy of the slice only
            st.prev_signal = signal.detach() if _compact(signal) else signal.detach().clone()
        st.steps += 1
        st.computed += int(compute)
        st.reused += int(not compute)
        st.skips = 0 if compute else st.skips + 1
        return compute

    def release(self, decisions: Mapping[tuple[str, Hashable], bool]) -> None:
        """Free the payloads the step's computes replace (``decisions``: the step's final ones per (branch, unit),
        after the CFG gate) before the step runs, so the old and the new one are never held at once. A forecast
        keeps them: they become its older points."""
        if self.order:
            return
        for key, compute in decisions.items():
            st = self.states.get(key)
            if compute and st is not None:
                st.payload = None

    def can_reuse(self, key: UnitKey) -> bool:
        """Whether a reuse of ``key`` has a payload; a shared decision ``("*", unit)`` needs every branch's."""
        if isinstance(key, tuple) and key[0] == "*":
            payloads = [st.payload for k, st in self.states.items() if k[1] == key[1] and k[0] != "*"]
            return bool(payloads) and all(p is not None for p in payloads)
        return self.state(key).payload is not None

    def on_forced(self, st: UnitState) -> None:
        """A reuse the rule chose was turned into a compute (nothing cached yet): reset the rule's own state
        beyond ``st.acc`` (which ``should_compute`` resets)."""

    @property
    def keeps_payload(self) -> bool:
        return False

    @property
    def reads_payloads(self) -> bool:
        """Whether ``remember`` has any use for a payload: a policy that keeps them, or an observer that reads them
        (calibration's recorder). When False the pipelines do not compute them."""
        return self.keeps_payload

    def state_bytes(self, tokens: int, dim: int, compute_bytes: int, branches: int,
                    steps_taken: int | None = None) -> int:
        """Bytes this policy keeps for a segment's units of ``tokens`` tokens in all (Wan: width ``dim``, compute
        dtype of ``compute_bytes``) over ``branches``: the cached residuals, ``payload_slots`` per unit and
        branch (one to hold, two to extrapolate, three for forecast2; the e0 signals of a few frames each are not
        counted). steps_taken: the units' steps so far, when known: each compute adds one payload, so a unit
        that took n steps holds at most n (a forecast's slots fill over its first steps)."""
        if not self.keeps_payload:
            return 0
        slots = self.payload_slots if steps_taken is None else min(self.payload_slots, steps_taken)
        return slots * branches * tokens * dim * compute_bytes

    def clock(self, key: UnitKey) -> int:
        """The unit's current step: the index of the decision just taken for it (the shared one's, for a policy
        with shared decisions, whose payloads are still kept per branch)."""
        if self.shared_decision and isinstance(key, tuple):
            key = ("*", key[1])
        return self.state(key).steps - 1

    def remember(self, key: UnitKey, payload: torch.Tensor) -> None:
        if not self.keeps_payload:
            return
        st = self.state(key)
        if self.order and st.payload is not None:  # keep the ones before: a line needs two points, a parabola three
            st.past = (st.past + [(st.payload_step, st.payload)])[-self.order:]
        st.payload, st.payload_step = payload, self.clock(key)

    def recall(self, key: UnitKey) -> torch.Tensor:
        st = self.state(key)
        if st.payload is None:
            raise RuntimeError(f"cache policy: reuse of {key!r} with nothing cached")
        points = [(s, p) for s, p in st.past if s < st.payload_step][-self.order:] if self.order else []
        k = self.clock(key)
        if not points:
            return st.payload
        if len(points) == 1:
            # lerp from r_a through r_b, continued to step k: weight (k − a)/(b − a) > 1
            (a, ra), b = points[0], st.payload_step
            return torch.lerp(ra, st.payload, (k - a) / (b - a))
        return newton_quadratic(points[0], points[1], (st.payload_step, st.payload), k)


def newton_quadratic(pa: tuple[int, torch.Tensor], pb: tuple[int, torch.Tensor], pc: tuple[int, torch.Tensor],
                     k: int) -> torch.Tensor:
    """The parabola through (a, r_a), (b, r_b), (c, r_c), a < b < c, at k: Newton's form
    r_c + (k − c)·[b, c] + (k − c)(k − b)·[a, b, c] with the divided differences [b, c] = (r_c − r_b)/(c − b) and
    [a, b, c] = ([b, c] − [a, b])/(c − a), which holds for uneven spacing. In fp32: the weights exceed 1 (a
    forecast several steps ahead), and bf16 differences would lose the small second-order term."""
    (a, ra), (b, rb), (c, rc) = pa, pb, pc
    ra, rb, rc32 = ra.float(), rb.float(), rc.float()
    d_bc = (rc32 - rb) / (c - b)
    d_abc = (d_bc - (rb - ra) / (b - a)) / (c - a)
    return (rc32 + (k - c) * d_bc + ((k - c) * (k - b)) * d_abc).to(rc.dtype)


def knob(default: float | int, widget: str, lo: float | None = None, hi: float | None = None, integer: bool = False,
         doc: str = ""):
    """A config field shown as a widget: ``check_knobs`` validates it and its errors name ``widget``."""
    return field(default=default, metadata={"widget": widget, "lo": lo, "hi": hi, "integer": integer, "doc": doc})


def check_knobs(config: object) -> None:
    """Validate (and coerce) every ``knob`` field of a config dataclass; raises InputError naming the widget."""
    for f in fields(config):
        meta = f.metadata
        if "widget" not in meta:
            continue
        check = whole if meta["integer"] else finite
        setattr(config, f.name, check(getattr(config, f.name), meta["widget"], meta["lo"], meta["hi"]))


def check_coefficients(values: Sequence[float]) -> list[float]:
    """A rescale polynomial (highest power first) as a list of finite floats."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise InputError(f"coefficients must be a non-empty list of numbers, got {values!r}.")
    return [finite(v, "coefficient") for v in values]
