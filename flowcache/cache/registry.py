"""The cache methods by name, and the settings a run is given. Adding a method touches its own file, this table
and ``flowcache/presets.json``; nothing registers itself at import time."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError
from ..validate import finite, whole
from .accumulated_l1 import AccumulatedL1Config, AccumulatedL1Policy
from .base import CachePolicy
from .cfg import CFG_REUSE, CfgReuse
from .easycache import EasyCacheConfig, EasyCachePolicy
from .magcache import MagCacheConfig, MagCachePolicy
from .off import OffConfig, OffPolicy


@dataclass(frozen=True)
class CacheMethod:
    """name: the ``method`` widget value. config/policy: the method's dataclass and policy class.
    path: the execution path the method is made for (one of ``PATHS``: "window", the whole window forwarded
    each step under one decision; "chunk", only the active chunks forwarded, each deciding for itself);
    pipelines take it as default.
    summary: one line for tooltips and --help."""

    name: str
    config: type
    policy: type
    path: str
    summary: str


PATHS = ("window", "chunk")  # how a run forwards: the whole window each step, or the active chunks each deciding
ATTENTION = ("window", "window_refresh", "block_causal")
# what a reused unit applies -> the order of its forecast from the unit's last computed payloads (hold: the last
# one; extrapolate: the line through two; forecast2: the parabola through three)
REUSE_ORDER = {"hold": 0, "extrapolate": 1, "forecast2": 2}
REUSE = tuple(REUSE_ORDER)
KV_PLACEMENTS = ("auto", "device", "offload")  # where stored K/V live (``flowcache.plan``)
KV_DTYPES = ("auto", "bf16", "fp8")            # bf16: the model's compute dtype
METHODS: dict[str, CacheMethod] = {m.name: m for m in (
    CacheMethod("off", OffConfig, OffPolicy, "window", "compute every step: the model's vanilla loop"),
    # one rule, two units: TeaCache decides for the whole window, FlowCache for every chunk
    CacheMethod("teacache", AccumulatedL1Config, AccumulatedL1Policy, "window", "skip whole steps of the window"),
    CacheMethod("flowcache", AccumulatedL1Config, AccumulatedL1Policy, "chunk", "each chunk decides for itself"),
    CacheMethod("magcache", MagCacheConfig, MagCachePolicy, "chunk",
                "each chunk decides from calibrated residual-magnitude ratios"),
    CacheMethod("easycache", EasyCacheConfig, EasyCachePolicy, "chunk",
                "each chunk decides from its own output/input change rate, no calibration"),
)}


def method(name: str) -> CacheMethod:
    if name not in METHODS:
        raise InputError(f"method={name!r}: must be one of {', '.join(METHODS)}.")
    return METHODS[name]


def check_path(choice: str) -> str:
    """A settings' ``path``: "auto" (the cache method's own) or one of ``PATHS``."""
    if choice != "auto" and choice not in PATHS:
        raise InputError(f"path={choice!r}: must be one of auto, {', '.join(PATHS)}.")
    return choice


@dataclass
class CacheSettings:
    """Everything a run needs to build its policy and KV store; plain data, shown in the UI and stats.

    method: a ``METHODS`` name; config: that method's dataclass; preset: the preset it came from (slow / fast /
    custom); kv_budget: chunks of clean history kept per head on the chunk path (0 = no compression);
    mix_lambda: importance weight of the KV score; model_key: the presets-table row it was resolved from;
    attention: on the chunk path, "window" (each chunk attends to every stored chunk of its window, the later
    ones too, as the whole-window forward of ``off`` does), "window_refresh" (window, plus the not-started
    chunks' K/V written once as a window starts and each finished chunk's K/V refreshed once at t = 0, as the
    window feeds them: a forward per chunk more) or "block_causal" (the FlowCache code's per-chunk attention: a
    chunk sees only the chunks up to itself).
    reuse: what a reused unit applies, "hold" (its last computed residual, as every reference implementation
    does), "extrapolate" (the line through its last two computed residuals, continued to the current step:
    no extra forwards, one more residual kept per unit and branch) or "forecast2" (the parabola through its last
    three, 2nd-order divided differences over their possibly uneven steps: two more residuals kept); see
    ``CachePolicy``.
    kv_placement / kv_dtype: how stored K/V are held, "auto" (the automatic plan: the fastest that fits) or a
    fixed "device" / "offload" and "bf16" (the model's compute dtype) / "fp8" (``flowcache.plan``).
    cfg_reuse: with CFG, whether the unconditional branch is reused on more steps than the conditional one
    (``cache/cfg.py``): "off" (both branches decide by the method's rule, as every reference implementation),
    "own" (it computes only on every ``cfg_interval``-th step the conditional branch computes, else reuses its
    own payload) or "delta" (same steps; a reuse applies the conditional branch's current output plus the
    cached uncond − cond difference). No extra payloads; a run without two CFG branches ignores it.
    cfg_interval: 1..1000, see cfg_reuse (1: the unconditional branch computes whenever the conditional does)."""

    method: str = "off"
    config: Any = field(default_factory=OffConfig)
    preset: str = "custom"
    kv_budget: int = 0
    mix_lambda: float = 0.07
    model_key: str = ""
    attention: str = "block_causal"
    reuse: str = "hold"
    kv_placement: str = "auto"
    kv_dtype: str = "auto"
    cfg_reuse: str = "off"
    cfg_interval: int = 2

    def __post_init__(self) -> None:
        m = method(self.method)
        if not isinstance(self.config, m.config):
            raise InputError(f"cache settings for {self.method!r} need a {m.config.__name__}, "
                             f"got {type(self.config).__name__}.")
        self.kv_budget = whole(self.kv_budget, "kv_budget", 0, 100000)
        self.mix_lambda = finite(self.mix_lambda, "mix_lambda", 0.0, 1.0)
        if self.attention not in ATTENTION:
            raise InputError(f"attention={self.attention!r}: must be one of {', '.join(ATTENTION)}.")
        if self.reuse not in REUSE:
            raise InputError(f"reuse={self.reuse!r}: must be one of {', '.join(REUSE)}.")
        if self.kv_placement not in KV_PLACEMENTS:
            raise InputError(f"kv_placement={self.kv_placement!r}: must be one of {', '.join(KV_PLACEMENTS)}.")
        if self.kv_dtype not in KV_DTYPES:
            raise InputError(f"kv_dtype={self.kv_dtype!r}: must be one of {', '.join(KV_DTYPES)}.")
        if self.cfg_reuse not in CFG_REUSE:
            raise InputError(f"cfg_reuse={self.cfg_reuse!r}: must be one of {', '.join(CFG_REUSE)}.")
        self.cfg_interval = whole(self.cfg_interval, "cfg_interval", 1, 1000)

    @classmethod
    def of(cls, method_name: str = "off", *, preset: str = "custom", kv_budget: int = 0, mix_lambda: float = 0.07,
           model_key: str = "", attention: str = "block_causal", reuse: str = "hold", cfg_reuse: str = "off",
           cfg_interval: int = 2, **knobs: Any) -> "CacheSettings":
        """Settings from plain values, e.g. ``CacheSettings.of("flowcache", threshold=0.1, warmup=2)``."""
        config = method(method_name).config(**knobs)
        return cls(method_name, config, preset, kv_budget, mix_lambda, model_key, attention, reuse,
                   cfg_reuse=cfg_reuse, cfg_interval=cfg_interval)

    @property
    def path(self) -> str:
        """The execution path the method is made for (its ``CacheMethod.path``)."""
        return METHODS[self.method].path

    def run_path(self, choice: str) -> str:
        """The path a run takes when its settings say ``choice``: "auto" takes this method's own."""
        return self.path if check_path(choice) == "auto" else choice

    def to_dict(self) -> dict:
        return {"method": self.method, "preset": self.preset, **asdict(self.config), "kv_budget": self.kv_budget,
                "mix_lambda": self.mix_lambda, "attention": self.attention, "reuse": self.reuse, "model_key": self.model_key,
                "kv_placement": self.kv_placement, "kv_dtype": self.kv_dtype,
                # only when on: the stats and preset rows of every run without it stay as they were
                **({"cfg_reuse": self.cfg_reuse, "cfg_interval": self.cfg_interval} if self.cfg_reuse != "off"
                   else {})}


def make_policy(settings: CacheSettings) -> CachePolicy:
    """A fresh policy for one run."""
    policy = METHODS[settings.method].policy(settings.config)
    policy.order = REUSE_ORDER[settings.reuse]
    policy.cfg = CfgReuse(settings.cfg_reuse, settings.cfg_interval)
    return policy


def residuals_kept(settings: CacheSettings) -> int:
    """Payloads a run keeps per unit and branch: 0 when it never reuses, else 1 to hold, 2 to extrapolate, 3 for
    forecast2 (``CachePolicy.payload_slots``)."""
    policy = make_policy(settings)
    return policy.payload_slots if policy.keeps_payload else 0
