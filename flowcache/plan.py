"""What a run will hold, decided before it starts: the memory side of every family's run plan.

A family's planner (``plan_df``, ``plan_causal_run``, ``plan_krea_run``, ``plan_magi``) checks the settings once and lays out
its windows or blocks; this module gives it the shared pieces:

* ``MemoryOptions``: how the run holds its memory. K/V resident on the device or offloaded to host memory, in
  the compute dtype or fp8; CFG branches batched, or one after the other with the token-wise stages of every
  block in slices (``lean``). ``candidates`` lists them fastest first, for the automatic plan.
* ``StorePlan``: one KV store's rows, dtype and placement; its bytes are the bytes ``KVStore`` allocates (a
  test checks them equal), and ``build`` makes the store.
* ``MemoryPlan``: the stores, the largest forward's working set and what the run keeps besides (latents, solver
  state, cached residuals, text): bytes on the device and in host memory.
* ``wan_forward_peak`` / ``magi_forward_peak``: a step's working set, measured by running the model's own forward code on
  meta tensors (shapes only, nothing computed) under the live-bytes counter, so it follows the code.
* ``magi_memory``: MAGI-1's whole estimate, built from these pieces alone (one chunk per forward, a store per
  stored guidance pass).
* ``choose``: the first candidate that fits the device and the host (``memory.auto_plan`` adds the refusal
  that names what would fit).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .cache import make_policy
from .cache.registry import KV_DTYPES, KV_PLACEMENTS
from .errors import InputError
from .kv.scoring import CompressionConfig, compress
from .kv.store import FP8, MAX_MASK_ELEMENTS, STAGING_SLOTS, KVStore, fp8_supported
from .memtrack import track
from .models.common import attention_backend
from .validate import one_of

GiB = 1024 ** 3
LEAN_SLICE_TOKENS = 8192  # the most tokens a lean block's token-wise stage handles at once (whole frames)
SCALE_BYTES = 4           # an fp8 row's scale per head, keys and values each
HOST_MARGIN = 0.85        # offloaded K/V is pinned (never swapped): leave the OS the rest of the free RAM


@dataclass(frozen=True)
class MemoryOptions:
    """How one run holds its memory.

    kv_offload: stored K/V in host memory (pinned on CUDA), two layers staged on the device at a time.
    kv_fp8: stored K/V in fp8 e4m3 with a scale per branch, head and chunk (else the compute dtype).
    lean: CFG branches one after the other and every block's token-wise stages (projections, FFN) in slices of
        at most ``LEAN_SLICE_TOKENS`` tokens; equal to the batched forward within float rounding.
    """

    kv_offload: bool = False
    kv_fp8: bool = False
    lean: bool = False

    @property
    def name(self) -> str:
        parts = ["offload" if self.kv_offload else "resident"]
        if self.kv_fp8:
            parts.append("fp8 K/V")
        if self.lean:
            parts.append("sequential branches")
        return " + ".join(parts)

    @property
    def slice_tokens(self) -> int:
        return LEAN_SLICE_TOKENS if self.lean else 0

    @staticmethod
    def of(cache) -> "MemoryOptions":
        """What cache settings fix by themselves: kv_placement "offload" and kv_dtype "fp8"; "auto" is resident
        in the compute dtype here (the automatic choice needs the device's free memory: ``memory.auto_plan``)."""
        return MemoryOptions(kv_offload=cache.kv_placement == "offload", kv_fp8=cache.kv_dtype == "fp8")


def candidates(kv_placement: str = "auto", kv_dtype: str = "auto", stores_kv: bool = True,
               fp8_ok: bool = True) -> list[MemoryOptions]:
    """The plans to try, fastest first: resident → fp8 K/V → offload (fp8) → sequential branches, narrowed by the
    ``kv_placement`` / ``kv_dtype`` widgets. A run without stored K/V (the window path) has batched and lean only."""
    one_of(kv_placement, "kv_placement", KV_PLACEMENTS)
    one_of(kv_dtype, "kv_dtype", KV_DTYPES)
    if not stores_kv:
        return [MemoryOptions(), MemoryOptions(lean=True)]
    dtypes = {"auto": [False, True] if fp8_ok else [False], "bf16": [False], "fp8": [True] if fp8_ok else [False]}
    places = {"auto": [False, True], "device": [False], "offload": [True]}[kv_placement]
    out: list[MemoryOptions] = []
    for offload in places:
        # offloaded rows cross the bus every step: fp8 (half the bytes) first when the dtype is free
        for fp8 in (dtypes[kv_dtype][::-1] if offload and kv_dtype == "auto" else dtypes[kv_dtype]):
            if offload and kv_dtype == "auto" and out and out[-1].kv_offload:
                break  # offloaded bf16 never fits where offloaded fp8 does not
            out.append(MemoryOptions(offload, fp8))
    out.append(replace(out[-1], lean=True))
    return out


@dataclass(frozen=True)
class StorePlan:
    """One KV store: ``layers`` × ``branches`` × ``heads`` × ``capacity`` rows of keys (``head_dim``) and values
    (``value_dim``), in the compute dtype (``compute_bytes`` each) or fp8 with a 4-byte scale per row, head and
    branch for keys and values; resident, or offloaded with two staging layers on the device."""

    name: str
    layers: int
    branches: int
    heads: int
    head_dim: int
    value_dim: int
    capacity: int
    compute_bytes: int
    fp8: bool = False
    offload: bool = False
    budget: int = 0
    pinned_chunks: int = 0
    tokens_per_frame: int | None = None
    mix_lambda: float = 0.07
    causal: bool = False  # read block-causally (``StepAttention(causal=True)``): for the dry run's working set only

    @property
    def layer_bytes(self) -> int:
        rows = self.branches * self.heads * self.capacity
        if self.fp8:
            return rows * (self.head_dim + self.value_dim) + rows * 2 * SCALE_BYTES
        return rows * (self.head_dim + self.value_dim) * self.compute_bytes

    @property
    def bytes(self) -> int:
        return self.layers * self.layer_bytes

    @property
    def device_bytes(self) -> int:
        return min(STAGING_SLOTS, self.layers) * self.layer_bytes if self.offload else self.bytes

    @property
    def host_bytes(self) -> int:
        return self.bytes if self.offload else 0

    def build(self) -> KVStore:
        return KVStore(self.layers, self.capacity, self.budget, CompressionConfig(mix_lambda=self.mix_lambda),
                       self.tokens_per_frame, self.branches, self.pinned_chunks, fp8=self.fp8, offload=self.offload)


@dataclass
class MemoryPlan:
    """What one run holds. ``activations``: the largest step's working set; ``state``: what the run keeps
    besides its K/V (latents, solver state, cached residuals, text); ``stores``: its KV stores (the largest
    set alive at once). ``facts``: what the figures were computed from, for the notes and ``inspect``."""

    options: MemoryOptions
    stores: list[StorePlan]
    activations: int
    state: int
    facts: dict = field(default_factory=dict)
    label: str = ""  # a name for tables, when the options alone do not say which run it is

    @property
    def kv_bytes(self) -> int:
        return sum(s.bytes for s in self.stores)

    @property
    def device_bytes(self) -> int:
        """Working memory on the device beside the weights (which a host may stream layer by layer)."""
        return self.activations + self.state + sum(s.device_bytes for s in self.stores)

    @property
    def host_bytes(self) -> int:
        return sum(s.host_bytes for s in self.stores)

    def summary(self) -> str:
        kv = f"K/V {self.kv_bytes / GiB:.2f} GiB" + (" (host)" if self.host_bytes else "")
        return (f"{self.options.name}: device {self.device_bytes / GiB:.2f} GiB beside the weights "
                f"(activations {self.activations / GiB:.2f}, state {self.state / GiB:.2f}, {kv})"
                + (f", host {self.host_bytes / GiB:.2f} GiB" if self.host_bytes else ""))

    def to_dict(self) -> dict:
        return {"plan": self.options.name, "kv_offload": self.options.kv_offload, "kv_fp8": self.options.kv_fp8,
                "lean": self.options.lean, "device_bytes": self.device_bytes, "host_bytes": self.host_bytes,
                "activations": self.activations, "state": self.state, "kv_bytes": self.kv_bytes,
                "stores": {s.name: s.bytes for s in self.stores}, "facts": dict(self.facts)}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# ------------------------------------------------------------------------------ the largest forward, measured

@functools.lru_cache(maxsize=8)
def _meta_wan(cfg_items: tuple, dtype: torch.dtype):
    """Two blocks of a Wan DiT on meta tensors: every block's working set is the same, and the second one's
    input is a block's output, as in every block of a real run but the first."""
    from .models.wan import WanConfig, WanDiT
    cfg = WanConfig(**{**dict(cfg_items), "num_layers": 2})
    with torch.device("meta"):
        return WanDiT(cfg).to(dtype).eval().requires_grad_(False)


def _meta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Attention as ``models.common.attention`` runs it with a memory-efficient kernel (SDPA on a GPU, the flash
    kernel on a CPU): grouped-query keys and values repeated per query head, the output, and no tokens x keys
    score matrix."""
    if q.shape[1] != k.shape[1]:
        shape = (k.shape[0], q.shape[1]) + tuple(k.shape[2:])
        k, v = k.new_empty(shape), v.new_empty(shape)
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


class _MetaAttention:
    """The chunk path's attention as memory sees it: the store's rows read in place (compute dtype) or dequantized
    to a copy (fp8); with a budget, the compression a write can start first: the clean rows scored (the real
    ``compress`` on meta tensors) and the rows after them moved up (copied)."""

    def __init__(self, store: StorePlan, unit_tokens: int):
        self.store, self.unit_tokens = store, unit_tokens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self.store
        b, h, d = q.shape[0], k.shape[1], k.shape[-1]

        def rows(n: int) -> torch.Tensor:
            return k.new_empty((b, h, n, d)) if st.fp8 else k.new_empty(1).expand(b, h, n, d)
        if st.budget > 0 and self.unit_tokens:  # a finished chunk joins the clean history: compressed to budget
            clean = min(st.capacity, st.budget + self.unit_tokens)
            kept = compress(q[:, :, :self.unit_tokens], rows(clean), rows(clean), st.budget,
                            CompressionConfig(mix_lambda=st.mix_lambda), st.tokens_per_frame)
            del kept
            moved = [k.new_empty((st.branches, h, st.capacity - clean, d), dtype=FP8 if st.fp8 else k.dtype)
                     for _ in range(2)]
            del moved
        keys, vals = rows(st.capacity), rows(st.capacity)
        if not st.causal:
            return _meta_attention(q, keys, vals)
        # block-causal as ``StepAttention`` runs it: under a boolean mask where one fits (a GPU), else chunk by
        # chunk into an output buffer; both are counted (the larger is the peak: the device is not known here)
        if q.shape[2] * st.capacity <= MAX_MASK_ELEMENTS:
            mask = torch.empty((q.shape[2], st.capacity), dtype=torch.bool)
            masked = _meta_attention(q, keys, vals)
            del mask, masked
        out = torch.empty_like(q)
        n = min(self.unit_tokens or q.shape[2], q.shape[2])
        part = _meta_attention(q[:, :, :n], keys, vals)
        del part
        return out


def wan_forward_peak(cfg, dtype: torch.dtype, frames: int, grid_hw: tuple[int, int], branches: int, text_len: int,
                     options: MemoryOptions, store: StorePlan | None = None, out_frames: int | None = None,
                     unit_tokens: int = 0) -> int:
    """Peak bytes of one Wan step: ``branches`` × ``frames`` latent frames of a (h, w) patch grid embedded,
    forwarded (attention through ``store`` on the chunk path, whose units have ``unit_tokens`` tokens; None:
    plain attention over the window's own tokens) and the head run on ``out_frames`` frames; measured on meta
    tensors with this pack's own forward code (once per set of arguments: the figures are pure)."""
    return _wan_forward_peak(tuple(sorted(cfg.to_dict().items())), dtype, frames, tuple(grid_hw), branches, text_len,
                             options, store, frames if out_frames is None else out_frames, unit_tokens)


@functools.lru_cache(maxsize=512)
def _wan_forward_peak(cfg_items: tuple, dtype: torch.dtype, frames: int, grid_hw: tuple[int, int], branches: int,
                      text_len: int, options: MemoryOptions, store: StorePlan | None, out_frames: int,
                      unit_tokens: int) -> int:
    model = _meta_wan(cfg_items, dtype)
    c = model.cfg
    pt, ph, pw = c.patch_size
    tokens = frames // pt * grid_hw[0] * grid_hw[1]
    with torch.inference_mode(), torch.device("meta"), attention_backend(_meta_attention), \
            track("meta", collect=False) as mem:
        x = torch.empty(1, c.in_dim, frames, grid_hw[0] * ph, grid_hw[1] * pw)
        h0 = model.embed(x).contiguous()
        e, e0 = model.time_embed(torch.empty(1, frames), None)
        ctx = torch.empty(branches, text_len, c.dim, dtype=dtype)
        rope = (torch.empty(tokens, c.head_dim // 2), torch.empty(tokens, c.head_dim // 2))
        kv = None if store is None else _MetaAttention(store, unit_tokens)
        out = model.run_blocks(h0.expand(branches, -1, -1), e0.expand(branches, -1, -1, -1), ctx,
                               (frames // pt,) + tuple(grid_hw), 0, kv, rope=rope,
                               slice_tokens=options.slice_tokens)
        del x
        n_out = out_frames // pt * grid_hw[0] * grid_hw[1]
        pred = model.head_out(out[:, :n_out], e[:, :out_frames].expand(branches, -1, -1),
                              (out_frames // pt,) + tuple(grid_hw), options.slice_tokens)
        guided = torch.empty_like(pred[:1])
        del out, pred, guided
    return mem.peak


@functools.lru_cache(maxsize=4)
def _meta_magi(cfg_items: tuple, dtype: torch.dtype):
    """Two layers of a MAGI-1 DiT on meta tensors (as ``_meta_wan``)."""
    from .models.magi import MagiConfig, MagiDiT
    cfg = MagiConfig(**{**dict(cfg_items), "num_layers": 2, "fp8_layers": ()})
    with torch.device("meta"):
        return MagiDiT(cfg, dtype)


class _MetaContext:
    """A MAGI-1 ``KVContext`` as memory sees it: the stored context plus the chunk, read in place from a
    compute-dtype store, dequantized to a copy from an fp8 one."""

    def __init__(self, read_rows: int, fp8: bool):
        self.read_rows, self.fp8 = read_rows, fp8

    def extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        shape = (k.shape[0], k.shape[1], self.read_rows, k.shape[-1])
        if self.fp8:
            return k.new_empty(shape), v.new_empty(shape)
        return k.new_empty(1).expand(shape), v.new_empty(1).expand(shape)


def magi_forward_peak(cfg, dtype: torch.dtype, frames: int, h: int, w: int, caption_tokens: int,
                      options: MemoryOptions, read_rows: int | None) -> int:
    """Peak bytes of one MAGI-1 chunk forward (``frames`` latent frames of an h x w latent, one batch row, the
    caption's ``caption_tokens`` valid tokens) attending to ``read_rows`` stored rows (None: itself only),
    measured on meta tensors with the model's own layer code (once per set of arguments)."""
    return _magi_forward_peak(tuple(sorted(cfg.to_dict().items())), dtype, frames, h, w, caption_tokens, options,
                              read_rows)


@functools.lru_cache(maxsize=128)
def _magi_forward_peak(cfg_items: tuple, dtype: torch.dtype, frames: int, h: int, w: int, caption_tokens: int,
                       options: MemoryOptions, read_rows: int | None) -> int:
    model = _meta_magi(cfg_items, dtype)
    c = model.config
    p, pt = c.patch_size, c.t_patch_size
    tokens = frames // pt * (h // p) * (w // p)
    bands = 3 * c.rope_bands
    with torch.inference_mode(), torch.device("meta"), attention_backend(_meta_attention), \
            track("meta", collect=False) as mem:
        x = torch.empty(1, c.latent_channels, frames, h, w)
        emb = model.embed_input(x).to(dtype)
        cond = model.condition(torch.empty(1, 1))
        rope = (torch.empty(tokens, bands), torch.empty(tokens, bands))
        y = torch.empty(caption_tokens, c.xattn_dim, dtype=dtype)
        kv = _MetaContext(read_rows, options.kv_fp8) if read_rows is not None else None
        out = model.head(model.run_layers(emb, cond, rope, [(0, slice(None), y)], kv), (frames, h, w))
        del x, emb, out
    return mem.peak


def magi_memory(plan, s, cache, cfg, dtype: torch.dtype, options: MemoryOptions) -> None:
    """Fill in a ``MagiPlan``'s stores and memory (``s``: its ``MagiSettings``, ``cfg``: the model's
    ``MagiConfig``): a store per pass that sees earlier chunks (the distilled model 1, the base model 2) holding
    every chunk, or with a budget ``kv_budget`` chunks of compressed history plus the window; one chunk per
    forward (measured on meta tensors); the latents of the whole video, the window's copies, and per window
    chunk the policy's signal (its patch-embedded input, fp32) and cached updates."""
    c = dtype_bytes(dtype)
    cap = (min(plan.chunk_num, max(plan.offset + 1, cache.kv_budget + s.window_size)) if cache.kv_budget > 0
           else plan.chunk_num)
    plan.stores = [StorePlan(name, cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim,
                             cap * plan.tokens, c, options.kv_fp8, options.kv_offload, cache.kv_budget * plan.tokens,
                             0, plan.tokens_per_frame, cache.mix_lambda)
                   for name in (("cond",) if plan.distill else ("cond", "pre"))]
    activations = magi_forward_peak(cfg, dtype, s.chunk_width, plan.h, plan.w, cfg.caption_max_length, options,
                                    plan.stores[0].capacity)
    chunk_latent = cfg.latent_channels * s.chunk_width * plan.h * plan.w * 4
    window = min(s.window_size, plan.chunk_num)
    signal = plan.tokens * cfg.hidden_size * 4  # a chunk's patch-embedded input, fp32
    payload = make_policy(cache).state_bytes(chunk_latent // 4, 1, 4, 1)  # a chunk's latent update(s), fp32
    state = plan.chunk_num * chunk_latent + 3 * window * chunk_latent + window * (signal + payload)
    facts = {"forward": f"1 chunk x {plan.tokens} tokens", "kv_rows": cap * plan.tokens, "chunks": plan.chunk_num,
             "passes": len(plan.stores), "tokens_per_chunk": plan.tokens}
    plan.memory = MemoryPlan(options, plan.stores, activations, state, facts)


# ------------------------------------------------------------------------------ choosing a plan

def choose(build: Callable[[MemoryOptions], object], options: list[MemoryOptions], device_free: int | None,
           host_free: int | None) -> tuple[object, list]:
    """The first of ``options`` whose run plan (``build(options)``: a family plan with a ``memory``) fits
    ``device_free`` bytes beside the weights and, offloaded, ``host_free`` (× ``HOST_MARGIN``) bytes of host
    memory; None figures are unknown and never refuse. Returns the chosen plan and every plan tried; raises
    ``NoPlanFits`` when none fits."""
    tried = []
    for opt in options:
        plan = build(opt)
        tried.append(plan)
        if fits(plan.memory, device_free, host_free):
            return plan, tried
    raise NoPlanFits(tried, device_free, host_free)


def fits(memory: MemoryPlan, device_free: int | None, host_free: int | None) -> bool:
    device_ok = device_free is None or memory.device_bytes <= device_free
    host_ok = host_free is None or memory.host_bytes <= host_free * HOST_MARGIN
    return device_ok and host_ok


class NoPlanFits(InputError):
    """No candidate plan fits: ``tried`` holds each run plan tried (``.memory`` has its figures)."""

    def __init__(self, tried: list, device_free: int | None, host_free: int | None):
        self.tried, self.device_free, self.host_free = tried, device_free, host_free
        last = tried[-1].memory
        dev = f"{device_free / GiB:.1f} GiB" if device_free is not None else "an unknown amount"
        super().__init__(f"memory: the smallest plan ({last.options.name}) needs {last.device_bytes / GiB:.1f} GiB "
                         f"beside the weights and {last.host_bytes / GiB:.1f} GiB of host RAM; the device has {dev}.")


def fp8_reason(device: torch.device | str) -> str | None:
    """Why fp8 K/V cannot be used on ``device`` (None: it can)."""
    return fp8_supported(device) if FP8 is not None else f"torch {torch.__version__} has no float8_e4m3fn"


__all__ = ["GiB", "KV_DTYPES", "KV_PLACEMENTS", "LEAN_SLICE_TOKENS", "MemoryOptions", "MemoryPlan", "NoPlanFits",
           "StorePlan", "candidates", "choose", "dtype_bytes", "fits", "fp8_reason", "magi_forward_peak", "magi_memory",
           "wan_forward_peak"]
