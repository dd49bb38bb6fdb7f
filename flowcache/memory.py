"""How much memory a run needs, for every way of holding it: ``python -m flowcache inspect MODEL --memory WxH``.

The figures come from the run plans the loops themselves read (``flowcache.plan`` and each family's planner), at
the model's default setting, for a checkpoint (read from its headers: a 28 GB model is not loaded) or a
released architecture built on meta tensors (``RELEASED``):

* **weights** as the pack holds them inside ComfyUI: fp8 weights stay fp8 (upcast layer by layer), the rest in
  the compute dtype. Streamed (ComfyUI's lowvram), they stay in host RAM and about two blocks are on the device.
* **working memory** beside the weights, per plan: the largest step's working set (measured on meta tensors
  with the model's own code), what the run keeps (latents, solver state, cached residuals, text) and the KV
  stores on the device (all of them resident, two staging layers offloaded); the offloaded K/V in host RAM.

The sampler node and ``generate`` choose among the same plans (``choose_plan``): the fastest that fits.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import DTYPE_NAMES
from .errors import InputError
from .plan import GiB, HOST_MARGIN, MemoryOptions, MemoryPlan, NoPlanFits, choose

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8_e4m3fn": 1, "fp8_e5m2": 1}
FP8_NAMES = ("fp8_e4m3fn", "fp8_e5m2")
COMPUTE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The plans ``inspect --memory`` prints, in the automatic order's spirit: fastest first.
REPORT_OPTIONS = (MemoryOptions(), MemoryOptions(kv_fp8=True), MemoryOptions(kv_offload=True),
                  MemoryOptions(kv_offload=True, kv_fp8=True), MemoryOptions(lean=True),
                  MemoryOptions(kv_fp8=True, lean=True), MemoryOptions(kv_offload=True, kv_fp8=True, lean=True))
STREAMED_BLOCKS = 2  # blocks of weights on the device at once when a host streams them (one computing, one next)


@dataclass
class MemoryReport:
    """A model's weights and every plan's memory at one setting (``setting`` says which)."""

    model: str
    setting: str
    weights: dict[str, int]          # bytes per dtype name, as held
    block_weights: int               # one transformer block's weights, as held
    plans: list[MemoryPlan]
    facts: dict = field(default_factory=dict)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    def rows(self) -> list[dict]:
        """Per plan: device bytes with the weights resident and streamed, host bytes (offloaded K/V, and with
        streamed weights)."""
        streamed = STREAMED_BLOCKS * self.block_weights
        return [{"plan": p.label or p.options.name, "working": p.device_bytes,
                 "device": self.weights_total + p.device_bytes, "device_streamed": streamed + p.device_bytes,
                 "host": p.host_bytes, "host_streamed": p.host_bytes + self.weights_total,
                 "activations": p.activations, "state": p.state, "kv": p.kv_bytes} for p in self.plans]

    def to_dict(self) -> dict:
        return {"model": self.model, "setting": self.setting, "weights": self.weights,
                "weights_total": self.weights_total, "block_weights": self.block_weights, "plans": self.rows(),
                "facts": self.facts}

    def table(self) -> str:
        def g(n: int) -> str:
            return f"{n / GiB:7.2f}"
        w = ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(self.weights.items()))
        lines = [f"{self.model}: {self.setting}",
                 f"  weights {self.weights_total / GiB:.2f} GiB ({w}); streamed by ComfyUI, {STREAMED_BLOCKS} blocks "
                 f"({STREAMED_BLOCKS * self.block_weights / GiB:.2f} GiB) on the device and the rest in host RAM",
                 f"  {'plan':44s} {'device GiB':>10s} {'streamed':>9s} {'host GiB':>9s} {'+weights':>9s}   "
                 f"(working = activations + state + K/V on the device)",
                 "  " + "-" * 88]
        for r in self.rows():
            lines.append(f"  {r['plan']:44s} {g(r['device']):>10s} {g(r['device_streamed']):>9s} "
                         f"{g(r['host']):>9s} {g(r['host_streamed']):>9s}   working {r['working'] / GiB:.2f} = "
                         f"{r['activations'] / GiB:.2f} + {r['state'] / GiB:.2f} + "
                         f"{(r['working'] - r['activations'] - r['state']) / GiB:.2f}")
        lines.append("  device: weights resident + working; streamed: two blocks of weights + working; host: the "
                     "offloaded K/V (pinned), +weights: with the weights streamed from host RAM.")
        if self.facts:
            lines.append("  " + "; ".join(f"{k} {v}" for k, v in self.facts.items()))
        return "\n".join(lines)


def held_weight_bytes(family: str, cfg, shapes: dict[str, tuple[tuple[int, ...], str]], compute: str
                      ) -> dict[str, int]:
    """Bytes per dtype of a model given as key -> (shape, stored dtype name), as the pack holds it inside ComfyUI.

    Wan: fp8 weights stay fp8, the rest is held in ``compute``. MAGI-1: as ``MagiDiT`` holds it (the modules
    the official code promotes in fp32, the fp8 release's linears in fp8 with their scales, the rest in
    ``compute``)."""
    out: dict[str, int] = {}
    if family == "magi":
        from .models.magi import MagiDiT
        with torch.device("meta"):
            model = MagiDiT(cfg, dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute])
        for t in model.state_dict().values():
            name = DTYPE_NAMES.get(t.dtype, "fp32")
            out[name] = out.get(name, 0) + t.numel() * t.element_size()
        return out
    for shape, dtype in shapes.values():
        name = dtype if dtype in FP8_NAMES else compute
        out[name] = out.get(name, 0) + math.prod(shape) * BYTES[name]
    return out


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--memory {text!r}: expected WIDTHxHEIGHT, e.g. 960x544.") from None
    if w <= 0 or h <= 0:
        raise InputError(f"--memory {text!r}: width and height must be positive.")
    return w, h


def _released_wan(dim: int, ffn: int, heads: int, layers: int, fps: bool) -> dict:
    return {"family": "wan", "config": dict(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, has_fps=fps)}


RELEASED = {
    "skyreels-v2-df-1.3b": _released_wan(1536, 8960, 12, 30, True),   # inject_sample_info: the fps embedding
    "skyreels-v2-df-14b": _released_wan(5120, 13824, 40, 40, False),
    "magi-1-4.5b-distill": {"family": "magi", "config": {}},           # MagiConfig's defaults are the 4.5B
    "causal-wan-1.3b": {**_released_wan(1536, 8960, 12, 30, False), "loop": "causal"},  # Self-Forcing, CausVid
    "causal-wan-14b": {**_released_wan(5120, 13824, 40, 40, False), "loop": "causal"},  # a 14B causal Wan
    # Krea Realtime 14B (Wan2.1-T2V-14B): its store holds the 3-frame context and the block
    "krea-realtime-14b": {**_released_wan(5120, 13824, 40, 40, False), "loop": "krea_realtime"},
    # LongLive v1.0 (Wan2.1-T2V-1.3B, its LoRA merged): a 12-frame window with a 3-frame sink
    "longlive-1.3b": {**_released_wan(1536, 8960, 12, 30, False), "loop": "causal",
                      "settings": {"local_attn_frames": 12, "sink_frames": 3}},
}
PRESET_ROWS = {"skyreels-v2-df-1.3b": "wan-1.3B", "skyreels-v2-df-14b": "wan-14B", "magi-1-4.5b-distill": "magi-4.5B",
               "causal-wan-1.3b": "wan-1.3B-causal", "causal-wan-14b": "wan-14B-causal",
               "krea-realtime-14b": "wan-14B-causal", "longlive-1.3b": "wan-1.3B-causal"}
MAGI_FP8_LAYERS = lambda layers: tuple(range(1, layers - 1))  # noqa: E731  the fp8 release: all but first/last


def released_shapes(name: str, weights: str = "bf16") -> tuple[str, object, dict[str, tuple[tuple[int, ...], str]]]:
    """(family, config, key -> (shape, dtype)) of a released architecture, built on meta tensors.

    weights: bf16, fp16, fp32, or fp8_e4m3fn: the linear layers' weights in fp8 (as fp8 checkpoints store them;
    MAGI-1: its fp8 release's layout, the big linears of every layer but the first and last), the rest bf16."""
    if name not in RELEASED:
        raise InputError(f"{name}: not a released architecture this knows ({', '.join(RELEASED)}).")
    spec = RELEASED[name]
    fp8 = weights in FP8_NAMES
    with torch.device("meta"):
        if spec["family"] == "wan":
            from .models.wan import WanConfig, WanDiT
            cfg = WanConfig(**spec["config"])
            model = WanDiT(cfg)
        else:
            from .models.magi import MagiConfig, MagiDiT
            cfg = MagiConfig(**spec["config"])
            if fp8:
                cfg = MagiConfig(**{**spec["config"], "fp8_layers": MAGI_FP8_LAYERS(cfg.num_layers)})
            model = MagiDiT(cfg, dtype=torch.bfloat16)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    base = "bf16" if fp8 else weights
    shapes = {k: (tuple(v.shape), weights if (fp8 and k in linears) else base) for k, v in model.state_dict().items()}
    return spec["family"], cfg, shapes


def checkpoint_shapes(path: str) -> tuple[str, object, dict[str, tuple[tuple[int, ...], str]]]:
    """(family, config, key -> (shape, dtype name)) of a checkpoint, from its headers when it is safetensors."""
    from .checkpoint import checkpoint_files, split_prefix
    from .checkpoint import _check_safetensors_header as header  # validated: the file may be hostile
    from .models import ALL_ANCHORS, FAMILIES, detect_family, read_checkpoint

    files = checkpoint_files(path)
    st_names = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
    if all(f.suffix == ".safetensors" or f.name.endswith(".sft") for f in files):
        raw: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in files:
            for k, v in header(f).items():
                if k != "__metadata__":
                    raw[k] = (tuple(v["shape"]), st_names.get(v["dtype"], "fp32"))
        prefix = split_prefix(raw.keys(), ALL_ANCHORS)
        shapes = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        family = detect_family(shapes.keys())
        if family is None:
            read_checkpoint(path)  # raises the loader's own "not a supported video model" error
        sd = {k: torch.empty(s, dtype=torch.float32, device="meta") for k, (s, _) in shapes.items()}
    else:
        ck, family = read_checkpoint(path)
        shapes = {k: (tuple(v.shape), DTYPE_NAMES.get(v.dtype, "fp32")) for k, v in ck.tensors.items()}
        sd = {k: v.to("meta") for k, v in ck.tensors.items()}
    from .checkpoint import Checkpoint
    ck = Checkpoint(tensors=sd, files=files)
    cfg_dict = FAMILIES[family].config(ck)
    if family == "wan":
        from .models.wan import WanConfig
        cfg = WanConfig(**{**cfg_dict, "patch_size": tuple(cfg_dict["patch_size"])})
    else:
        from .models.magi import MagiConfig
        cfg = MagiConfig(**{**cfg_dict, "fp8_layers": tuple(cfg_dict["fp8_layers"])})
    return family, cfg, shapes


def _check_model_named(model: str) -> None:
    """A name that is neither a released architecture nor an existing path: say which names are released (a
    mistyped one is the likely cause), and the closest."""
    from .checkpoint import _is

    if _is(lambda p: p.exists(), Path(model)):
        return
    near = difflib.get_close_matches(model.lower(), RELEASED, n=1, cutoff=0.5)
    raise InputError(f"{model}: no such file or folder, nor a released architecture (those are "
                     f"{', '.join(RELEASED)}){f'; did you mean {near[0]}?' if near else '.'}")


def _own_settings(model: str) -> dict:
    """What a Wan checkpoint fixes itself, from its headers (safetensors only): its latent geometry and text length
    (``flowcache.*`` metadata), and for the demo model its own default run (``DEMO_SETTINGS``) instead of
    SkyReels' 97 frames at 540P."""
    from .checkpoint import checkpoint_files, read_headers
    from .models import _meta_geometry, _meta_int

    files = checkpoint_files(model)
    if not all(f.suffix == ".safetensors" or f.name.endswith(".sft") for f in files):
        return {}
    _, meta = read_headers(files)
    own: dict = {}
    geometry = _meta_geometry(meta, files[0].name) or {}
    if geometry:
        own["geometry"] = geometry
    text_len = _meta_int(meta, "flowcache.text_len", files[0].name)
    if text_len:
        own["text_len"] = text_len
    if meta.get("flowcache.model_key") == "demo":
        try:
            from .demo import DEMO_SETTINGS
        except ImportError:  # the core without its demo assets
            return own
        own["settings"] = dict(DEMO_SETTINGS)
    return own


def _block_bytes(weights: dict[str, int], cfg, family: str) -> int:
    """One transformer block's share of the weights (the blocks are nearly all of them)."""
    layers = cfg.num_layers
    return sum(weights.values()) // max(1, layers)


def family_planner(family: str, loop: str, cfg, dtype: torch.dtype, *, frames: int | None, text_len: int,
                   cache, geometry: dict | None = None, settings: dict | None = None, distill: bool = True
                   ) -> tuple[Callable[[MemoryOptions, int, int], Any], str]:
    """A function (options, width, height) -> the family's run plan at the model's default setting (SkyReels'
    540P diffusion forcing with 97 frames; Self-Forcing's 81 frames; MAGI-1's 96), and a line saying which."""
    from .pipelines.common import LatentGeometry

    if family == "magi":
        from .pipelines.magi import MagiSettings, plan_magi
        geo = LatentGeometry(**(geometry or {"temporal_stride": 4, "spatial_stride": 8,
                                             "channels": cfg.latent_channels}))
        n = frames or 96

        def magi(options: MemoryOptions, width: int, height: int):
            s = MagiSettings(num_frames=n, width=width, height=height)
            return plan_magi(s, cfg, geo, dtype, distill, 0, cache, options)
        return magi, f"MAGI-1 {'distilled' if distill else 'base'}, {n} frames, {cache.method} {cache.preset}"
    geo = LatentGeometry(**(geometry or {}))
    if loop == "krea_realtime":
        from .pipelines.krea_realtime import KreaSettings, plan_krea_run
        n = frames or 105

        def krea(options: MemoryOptions, width: int, height: int):
            return plan_krea_run(KreaSettings(width=width, height=height, num_frames=n), cache, cfg, geo, dtype,
                                 text_len, options)
        return krea, f"Krea Realtime loop, {n} frames (a 3-frame context per block), {cache.method} {cache.preset}"
    if loop == "causal":
        from .pipelines.causal_wan import CausalSettings, plan_causal_run
        n = frames or 81
        own = settings or {}

        def causal(options: MemoryOptions, width: int, height: int):
            s = CausalSettings(**{**own, "width": width, "height": height, "num_frames": n})
            return plan_causal_run(s, cache, cfg, geo, dtype, text_len, options)
        window = own.get("local_attn_frames", 21)
        return causal, (f"causal loop, {n} frames, kv_mode rolling ({window}-frame window), {cache.method} "
                        f"{cache.preset}")
    from dataclasses import fields as dc_fields

    from .pipelines.diffusion_forcing import DFSettings, plan_df
    known = {f.name for f in dc_fields(DFSettings)}
    base = {k: v for k, v in (settings or {}).items() if k in known}
    base.setdefault("base_num_frames", 97)
    base["num_frames"] = frames or base.get("num_frames", 97)
    if frames and "settings" not in (settings or {}):
        base["base_num_frames"] = min(base["base_num_frames"], frames) if frames <= 97 else base["base_num_frames"]

    def df(options: MemoryOptions, width: int, height: int):
        s = DFSettings(**{**base, "width": width, "height": height})
        return plan_df(s, cache, cfg, geo, dtype, text_len, options)
    return df, (f"diffusion forcing, {base['num_frames']} frames, {cache.method} {cache.preset} "
                f"({cache.attention} attention, kv_budget {cache.kv_budget})")


def estimate(model: str, resolution: str, *, frames: int | None = None, budget: int | None = None,
             compute: str = "bf16", weights: str = "bf16", method: str = "flowcache", preset: str = "fast",
             options: tuple[MemoryOptions, ...] = REPORT_OPTIONS) -> MemoryReport:
    """Every plan's memory for a checkpoint path or a ``RELEASED`` name at ``WIDTHxHEIGHT``, with the model's
    ``method``/``preset`` cache settings (``budget``: another kv_budget)."""
    from .presets import resolve_cache

    if compute not in COMPUTE:
        raise InputError(f"--dtype {compute!r}: the compute dtype is bf16, fp16 or fp32.")
    if weights not in BYTES:
        raise InputError(f"--weight-dtype {weights!r}: one of {', '.join(BYTES)}.")
    if budget is not None and budget < 0:
        raise InputError(f"--kv-budget {budget}: must be ≥ 0 chunks.")
    w, h = _parse_resolution(resolution)
    own: dict = {}
    if model in RELEASED:
        family, cfg, shapes = released_shapes(model, weights)
        loop = RELEASED[model].get("loop", "magi" if family == "magi" else "diffusion_forcing")
        key, extra = PRESET_ROWS[model], {}
        own = {"settings": RELEASED[model]["settings"]} if "settings" in RELEASED[model] else {}
    else:
        _check_model_named(model)
        from .models import header_facts
        family, cfg, shapes = checkpoint_shapes(model)
        facts = header_facts(model)
        key, extra = facts.preset_key, facts.extra_presets
        loop = facts.loop
        own = _own_settings(model) if family == "wan" else {}
        if loop == "longlive":
            own["settings"] = RELEASED["longlive-1.3b"]["settings"]
            loop = "causal"
    held = held_weight_bytes(family, cfg, shapes, compute)
    unit = 16
    if w % unit or h % unit:
        raise InputError(f"--memory {resolution}: width and height must be multiples of {unit}.")
    try:
        cache = resolve_cache(key, method, preset, extra)
    except InputError:  # no presets for this model: its calibration-free chunk cache
        cache = resolve_cache(key, "easycache", "custom", extra)
    if budget is not None:
        cache.kv_budget = budget
    planner, setting = family_planner(family, loop, cfg, COMPUTE[compute], frames=frames,
                                      text_len=own.get("text_len", 800 if family == "magi" else 512),
                                      cache=cache, geometry=own.get("geometry"), settings=own.get("settings"))
    if family == "magi":  # one chunk, one pass per forward: nothing to run one after the other
        options = tuple(o for o in options if not o.lean)
    plans = [planner(o, w, h).memory for o in options]
    facts = dict(plans[0].facts)
    if family == "wan" and loop == "diffusion_forcing":  # the window path (off, TeaCache) for comparison
        window, _ = family_planner(family, loop, cfg, COMPUTE[compute], frames=frames,
                                   text_len=own.get("text_len", 512), cache=resolve_cache(key, "off", "slow", extra),
                                   geometry=own.get("geometry"), settings=own.get("settings"))
        for o in (MemoryOptions(), MemoryOptions(lean=True)):
            plan = window(o, w, h).memory
            plan.label = f"off / teacache ({'sequential branches' if o.lean else 'whole window'})"
            plans.append(plan)
    label = model if model in RELEASED else Path(model).name
    return MemoryReport(label, f"{w}x{h}, {setting}, {compute} compute", held, _block_bytes(held, cfg, family),
                        plans, facts)


# ------------------------------------------------------------------------------ refusing what cannot fit

def available_bytes(device: torch.device) -> int | None:
    """Memory a run could use on ``device`` outside ComfyUI (the nodes ask ComfyUI's memory manager instead):
    CUDA's free memory plus what PyTorch holds unused; on the CPU, Linux's MemAvailable. None when unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def host_available_bytes() -> int | None:
    """Host RAM a run could pin for offloaded K/V: Linux's MemAvailable (None when unknown)."""
    return available_bytes(torch.device("cpu"))


def largest_fitting_size(need: Callable[[int, int], int], width: int, height: int, available: int,
                         unit: int) -> tuple[int, int] | None:
    """The largest (width, height) at about the same aspect ratio, both multiples of ``unit`` and no larger than
    asked, whose ``need(width, height)`` fits in ``available`` bytes; None when not even one unit does."""
    n_max = max(width, height) // unit
    lo, hi, best = 1, n_max, None
    while lo <= hi:  # the need grows with the size: bisect on the longer side's units
        n = (lo + hi) // 2
        scale = n * unit / max(width, height)
        w = max(unit, min(width, int(width * scale) // unit * unit))
        h = max(unit, min(height, int(height * scale) // unit * unit))
        if need(w, h) <= available:
            best, lo = (w, h), n + 1
        else:
            hi = n - 1
    return best


def choose_plan(planner: Callable[[MemoryOptions, int, int], Any], options: list[MemoryOptions], width: int,
                height: int, frames: int, device_free: int | None, host_free: int | None, device: str, unit: int,
                where: str = "FlowCache Sampler"):
    """The fastest of ``options`` whose plan fits ``device_free`` bytes beside the weights and ``host_free`` bytes
    of host RAM (None: unknown, never refused). When none fits, the refusal names both figures and, when the
    device is short, the largest size at this aspect ratio that the smallest plan fits."""
    try:
        return choose(lambda o: planner(o, width, height), options, device_free, host_free)[0]
    except NoPlanFits as e:
        last = e.tried[-1]
        smallest = options[-1]
        if host_free is not None and last.memory.host_bytes > host_free * HOST_MARGIN and (
                device_free is None or last.memory.device_bytes <= device_free):
            raise InputError(f"{where}: kv_placement offload needs {last.memory.host_bytes / GiB:.1f} GiB of host "
                             f"RAM for the K/V at width={width}, height={height}, num_frames={frames}; "
                             f"{host_free * HOST_MARGIN / GiB:.1f} GiB can be pinned ({host_free / GiB:.1f} GiB free, "
                             "less a margin for the system). Expected a smaller size, fewer frames, kv_dtype fp8 "
                             "or a kv_budget.") from None
        fit = largest_fitting_size(lambda w, h: planner(smallest, w, h).memory.device_bytes, width, height,
                                   device_free, unit)
        hint = (f"expected at most {fit[0]}x{fit[1]} (the largest size the smallest plan fits at this aspect ratio "
                "and frame count)" if fit else "no size fits at this frame count: expected fewer frames")
        raise InputError(f"{where}: width={width}, height={height}, num_frames={frames} need about "
                         f"{last.memory.device_bytes / GiB:.1f} GiB beside the weights even with the smallest plan "
                         f"({smallest.name}); the {device} has about {device_free / GiB:.1f} GiB; {hint}. Fewer "
                         "frames or a kv_budget also lower it.") from None


def auto_plan(planner: Callable[[MemoryOptions, int, int], Any], kv_placement: str, kv_dtype: str, width: int,
              height: int, frames: int, device: torch.device, device_free: int | None, host_free: int | None,
              unit: int, where: str = "FlowCache Sampler") -> tuple[Any, str]:
    """The automatic plan: the fastest of ``candidates`` (narrowed by the ``kv_placement`` / ``kv_dtype`` widgets)
    that fits, and a note when ``kv_dtype = fp8`` was asked for where the device cannot hold fp8 (then the model's
    dtype is used). On a CPU the K/V are already in host RAM: auto never offloads there."""
    from .plan import candidates, fp8_reason

    note = ""
    reason = fp8_reason(device) if kv_dtype != "bf16" else None
    if reason and kv_dtype == "fp8":
        note = f"kv_dtype=fp8 is not available here ({reason}); keys/values were kept in the model's dtype"
    if device.type == "cpu" and kv_placement == "auto":
        kv_placement, host_free = "device", None
    stores_kv = bool(planner(MemoryOptions(), width, height).memory.stores)
    options = candidates(kv_placement, kv_dtype, stores_kv, fp8_ok=reason is None)
    return choose_plan(planner, options, width, height, frames, device_free, host_free, device.type, unit,
                       where), note


__all__ = ["MemoryReport", "RELEASED", "REPORT_OPTIONS", "auto_plan", "available_bytes", "choose_plan", "estimate",
           "family_planner", "held_weight_bytes", "host_available_bytes", "largest_fitting_size", "released_shapes",
           "checkpoint_shapes"]
