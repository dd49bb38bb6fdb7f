"""``python -m flowcache gpucheck``: the device check, one prepared script to run as soon as a GPU is lent.

The released SkyReels-V2-1.3B architecture with random weights (``random-wan-1.3B``, bf16) at 960x544, one
97-frame window in SkyReels' five chunks, a few steps staggered by one (ar_step 1), CFG on. One table:

* per-step time of the vanilla window loop (off) against FlowCache's fast preset on the chunk path;
* for FlowCache, each memory plan (resident; fp8 K/V; offloaded fp8 K/V; and with the branches one after the
  other): peak memory measured (the CUDA allocator's peak above the weights) beside the plan's estimate, per-step
  time, and the K/V copied between host and device per step;
* the offload overhead (offloaded against resident, and the bus bandwidth that implies);
* block-causal chunk attention as one masked call per layer against one call per chunk.

Under 8 minutes on one H100; a row that would start after ``TIME_LIMIT_S`` is reported as skipped. ``--small``
runs the same script on a tiny model at 64x64 (any device, seconds): the script's own check.
"""
from __future__ import annotations

import time

import torch

from .errors import InputError

TIME_LIMIT_S = 390.0  # leave the rest of 8 minutes for the rows already started and the report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kit(device: str, small: bool):
    """(model, geometry, text states, the size) for the check."""
    from .jobs import load_checkpoint_kit
    from .models.wan import WanConfig, WanDiT
    from .pipelines import LatentGeometry

    dev = torch.device(device)
    if small:
        torch.manual_seed(0)
        with dev:
            model = WanDiT(WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64, has_fps=True))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        model = model.eval().requires_grad_(False)
        size = dict(width=64, height=64, num_frames=17, causal_block_size=1)
        text_len, text_dim = 16, 64
    else:
        kit = load_checkpoint_kit("random-wan-1.3B", device, "bf16")
        model = kit.loaded.model
        size = dict(width=960, height=544, num_frames=97, causal_block_size=5)
        text_len, text_dim = 512, 4096
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, min(64, text_len), text_dim, generator=g)
    return model, LatentGeometry(), text_len, (cond, torch.zeros_like(cond)), size


def run_check(device: str = "cuda", small: bool = False, steps: int = 4, log=print) -> list[dict]:
    """The check's rows (see the module docstring)."""
    from .cache import CacheSettings
    from .kv import store as store_mod
    from .memtrack import track
    from .pipelines import DFSettings, DiffusionForcingPipeline
    from .plan import MemoryOptions
    from .presets import resolve_cache

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("gpucheck: no CUDA device here (torch.cuda.is_available() is False); expected a GPU "
                         "machine, or --small --device cpu to check the script itself.")
    if not small and dev.type != "cuda":
        raise InputError(f"gpucheck --device {device}: the check runs the 1.3B at 960x544, expected a CUDA device; "
                         "add --small to check the script on this device.")
    t_start = time.perf_counter()
    model, geo, text_len, (cond, uncond), size = _kit(device, small)
    pipe = DiffusionForcingPipeline(model, geo, text_len)
    s = DFSettings(**size, base_num_frames=size["num_frames"], steps=steps, ar_step=1, cfg=6.0, seed=0)
    key = f"wan-{model.cfg.size_name}"
    fast = resolve_cache(key, "flowcache", "fast") if not small else CacheSettings.of(
        "flowcache", threshold=0.2, warmup=1, attention="window_refresh")
    runs = [("off", CacheSettings(), MemoryOptions(), None),
            ("flowcache fast", fast, MemoryOptions(), None),
            ("flowcache fast", fast, MemoryOptions(kv_fp8=True), None),
            ("flowcache fast", fast, MemoryOptions(kv_offload=True, kv_fp8=True), None),
            ("flowcache fast", fast, MemoryOptions(kv_offload=True, kv_fp8=True, lean=True), None),
            ("block_causal, masked", CacheSettings.of("flowcache", threshold=0.0, attention="block_causal"),
             MemoryOptions(), True),
            ("block_causal, per chunk", CacheSettings.of("flowcache", threshold=0.0, attention="block_causal"),
             MemoryOptions(), False)]
    log(f"gpucheck: {'tiny model' if small else 'random-wan-1.3B bf16'} on {dev}, {size['width']}x{size['height']}, "
        f"{size['num_frames']} frames, {steps} steps; warming up ...")
    pipe(cond, uncond, DFSettings(**{**s.__dict__, "steps": 1}), CacheSettings())  # kernels, allocator
    rows = []
    masked_devices = set(store_mod.MASK_DEVICES)
    for name, cache, options, masked in runs:
        if time.perf_counter() - t_start > TIME_LIMIT_S:
            rows.append({"run": name, "plan": options.name, "skipped": True})
            continue
        store_mod.MASK_DEVICES = masked_devices if masked in (None, True) else set()
        try:
            plan = pipe.plan(s, cache, options)
            _sync(dev)
            with track(dev) as mem:
                t0 = time.perf_counter()
                _, stats = pipe(cond, uncond, s, cache, plan=plan)
                _sync(dev)
                wall = time.perf_counter() - t0
        finally:
            store_mod.MASK_DEVICES = masked_devices
        steps_run = sum(stats.iterations) or 1
        estimate = plan.memory.device_bytes + (plan.memory.host_bytes if dev.type != "cuda" else 0)
        row = {"run": name, "plan": options.name, "step_s": wall / steps_run, "wall_s": wall, "steps": steps_run,
               "measured": mem.peak, "estimated": estimate, "ratio": mem.peak / estimate if estimate else 0.0,
               "moved_per_step": stats.kv_moved_bytes / steps_run, "forwards": stats.forwards,
               "flops_speedup": stats.flops_speedup}
        rows.append(row)
        log(f"  {name:24s} {options.name:42s} {row['step_s']:7.3f} s/step, peak {mem.peak / 2**30:6.2f} GiB "
            f"(estimated {estimate / 2**30:6.2f})")
    done = {(r["run"], r["plan"]): r for r in rows if not r.get("skipped")}
    resident = done.get(("flowcache fast", "resident"))
    for r in rows:
        if r.get("skipped") or resident is None or not r["moved_per_step"]:
            continue
        extra = r["step_s"] - done.get(("flowcache fast", "resident + fp8 K/V"), resident)["step_s"]
        r["offload_overhead"] = r["step_s"] / resident["step_s"]
        r["implied_gb_s"] = r["moved_per_step"] / extra / 1e9 if extra > 0 else float("inf")
    return rows


def format_check(rows: list[dict]) -> str:
    head = (f"{'run':24s} {'memory plan':42s} {'s/step':>8s} {'peak GiB':>9s} {'est. GiB':>9s} {'ratio':>6s} "
            f"{'moved/step':>11s} {'vs resident':>11s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['run']:24s} {r['plan']:42s} skipped (time limit)")
            continue
        over = f"{r['offload_overhead']:.2f}x" if "offload_overhead" in r else "-"
        lines.append(f"{r['run']:24s} {r['plan']:42s} {r['step_s']:8.3f} {r['measured'] / 2**30:9.2f} "
                     f"{r['estimated'] / 2**30:9.2f} {r['ratio']:6.3f} {r['moved_per_step'] / 2**20:8.1f}Mi "
                     f"{over:>11s}")
    timed = [r for r in rows if not r.get("skipped")]
    off = next((r for r in timed if r["run"] == "off"), None)
    fast = next((r for r in timed if r["run"] == "flowcache fast" and r["plan"] == "resident"), None)
    if off and fast:
        lines.append(f"flowcache fast vs off: {off['step_s'] / fast['step_s']:.2f}x per step (wall), "
                     f"{fast['flops_speedup']:.2f}x fewer FLOPs")
    masked = {r["run"]: r for r in timed if r["run"].startswith("block_causal")}
    if len(masked) == 2:
        a, b = masked["block_causal, masked"], masked["block_causal, per chunk"]
        lines.append(f"block-causal attention: one masked call per layer {a['step_s']:.3f} s/step, one call per chunk "
                     f"{b['step_s']:.3f} s/step ({b['step_s'] / a['step_s']:.2f}x)")
    for r in timed:
        if "implied_gb_s" in r:
            lines.append(f"offload ({r['plan']}): {r['offload_overhead']:.2f}x the resident step; "
                         f"{r['moved_per_step'] / 2**30:.2f} GiB copied per step, "
                         f"{r['implied_gb_s']:.1f} GB/s if all the extra time were copies")
    lines.append("peak: the allocator's peak above the weights on a GPU (live tensor bytes on a CPU); est.: the run "
                 "plan's working memory (on a CPU also its host share); s/step: wall seconds per denoising iteration.")
    return "\n".join(lines)


__all__ = ["run_check", "format_check", "TIME_LIMIT_S"]
