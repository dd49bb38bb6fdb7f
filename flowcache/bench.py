"""``python -m flowcache bench``: the paper's table, measured side by side in one run.

Every mode runs on the same prompts and seeds; wall time is the median of ``repeats`` runs; the speedup is
measured against ``off`` in the same process; PSNR (whole video) and SSIM (mean over frames) compare each
mode's decoded video with ``off``'s, as the paper does. Nothing here is tuned to hit a number.

``--long`` runs 1, 2, 4 and 8 windows with and without KV compression, each in a fresh process so that peak
RSS is its own, decoding and streaming frames into an mp4 chunk by chunk.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .metrics import psnr, ssim
from .progress import ENV as PROGRESS_ENV, Progress, bars_wanted


@dataclass
class Mode:
    """One row: a cache method and preset (``custom`` values for custom), optionally another chunk-path
    attention or reuse than the preset's."""

    name: str
    method: str
    preset: str
    custom: dict | None = None
    attention: str | None = None
    reuse: str | None = None
    kv_placement: str = "auto"   # "auto" here: resident, in the compute dtype
    kv_dtype: str = "auto"
    replay: str | None = None    # the mode whose decisions this one replays (same computes, same reuses)


ATTENTION_TAGS = {"window": "win", "window_refresh": "ref", "block_causal": "bc"}
REUSE_TAGS = {"hold": "hold", "extrapolate": "ext"}


def table_modes(kit) -> list[Mode]:
    """off, then every method with settings × each named preset (slow, fast, turbo) the model has a row for;
    FlowCache also with each other chunk attention than its preset's ("/win", "/ref", "/bc"); every chunk-path
    method also with the other reuse than its preset's ("/hold", "/ext"), side by side; and FlowCache fast with a
    one-chunk KV budget."""
    from .cache import METHODS
    from .errors import InputError
    from .presets import NAMED_PRESETS

    modes = [Mode("off", "off", "slow")]
    for name in METHODS:
        if name == "off":
            continue
        for preset in NAMED_PRESETS:
            try:
                s = kit.cache(name, preset)
            except InputError:  # no presets for this method on this model
                continue
            modes.append(Mode(f"{name}-{preset}", name, preset))
            if name == "flowcache":
                modes += [Mode(f"{name}-{preset}/{tag}", name, preset, attention=attention)
                          for attention, tag in ATTENTION_TAGS.items() if attention != s.attention]
            if s.path == "chunk":
                modes += [Mode(f"{name}-{preset}/{tag}", name, preset, reuse=reuse)
                          for reuse, tag in REUSE_TAGS.items() if reuse != s.reuse]
    fast = kit.cache("flowcache", "fast")
    modes.append(Mode("flowcache-fast+kv", "flowcache", "custom", {"threshold": fast.config.threshold,
                                                                   "warmup": fast.config.warmup, "kv_budget": 1},
                      attention=fast.attention, reuse=fast.reuse))
    # how K/V are held, with flowcache-fast's own decisions: fp8's cost is the storage's alone; offloading is
    # exact (on a CPU bit-identical), its cost is the copies
    modes += [Mode("flowcache-fast+fp8kv", "flowcache", "fast", kv_dtype="fp8", replay="flowcache-fast"),
              Mode("flowcache-fast+offload", "flowcache", "fast", kv_placement="offload", replay="flowcache-fast")]
    return modes


def _cache_of(kit, m: Mode):
    cache = kit.cache(m.method, m.preset, **(m.custom or {}))
    return replace(cache, attention=m.attention or cache.attention, reuse=m.reuse or cache.reuse,
                   kv_placement=m.kv_placement, kv_dtype=m.kv_dtype)


def _measure_peak(kit, run) -> int:
    """The peak bytes a run allocates on the kit's device (live tensor bytes on a CPU: one extra, untimed run,
    since counting slows every op; the allocator's peak on a GPU)."""
    from .memtrack import track

    with track(kit.loaded.model.device) as mem:
        run()
    return mem.peak


def _median_run(fn, repeats: int, progress: Progress | None = None, label: str = ""):
    """The median wall time of ``repeats`` calls of ``fn(hooks)`` and the last result; a bar per call."""
    progress = progress or Progress.off()
    times, result = [], None
    for i in range(repeats):
        with progress.run(f"{label} {i + 1}/{repeats}" if repeats > 1 else label) as hooks:
            t0 = time.perf_counter()
            result = fn(hooks)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run_table(prompts: list[str], seeds: list[int], repeats: int = 3, overrides: dict | None = None,
              log=print, kit=None, progress: Progress | None = None) -> dict:
    """The main table, on ``kit`` (a ``flowcache.jobs.SamplingKit``; default: the demo model).
    Returns {"rows": [...], "overhead": {...}, "setting": {...}}. ``log``: a line per mode's result;
    ``progress``: a line before each phase and a bar per run (default: neither)."""
    from .jobs import load_demo_kit

    progress = progress or Progress.off()
    kit = kit or load_demo_kit()
    overrides = overrides or {}
    modes = table_modes(kit)
    from .cache import make_policy
    from .cache.replay import RecordedPolicy, ReplayedPolicy

    keys = ("wall", "psnr", "ssim", "forwards", "calls", "flops", "flops_nocache", "flops_paper",
            "flops_nocache_paper", "kv", "peak", "moved", "psnr_replayed")
    per_mode: dict[str, dict] = {m.name: {k: [] for k in keys} for m in modes}
    t0_rows = {a: {"plain": [], "t0": [], "psnr": []} for a in ATTENTION_TAGS}
    torch.manual_seed(0)
    each = f"the median of {repeats} runs each" if repeats > 1 else "one run each"
    for prompt in prompts:
        for seed in seeds:
            progress.say(f"bench: prompt {prompt[:40]!r} seed {seed}: {len(modes)} modes, {each} ...")
            ref, videos, logs = None, {}, {}
            replayed = {m.replay for m in modes if m.replay}
            for m in modes:
                cache = _cache_of(kit, m)

                def sample(hooks, cache=cache, m=m):
                    policy = make_policy(cache)
                    if m.name in replayed:  # record the decisions another mode replays
                        policy = RecordedPolicy(policy)
                        logs[m.name] = policy.log
                    elif m.replay:
                        policy = ReplayedPolicy(policy, logs[m.replay])
                    return kit.sample(prompt, seed, cache, hooks, policy=policy, **overrides)
                wall, (video, stats) = _median_run(sample, repeats, progress, m.name)
                if m.name == "off":
                    ref = video
                videos[m.name] = video
                r = per_mode[m.name]
                if not r["peak"]:  # the peak does not depend on the prompt: measured once per mode
                    r["peak"].append(_measure_peak(kit, lambda: sample(None)))
                steps = sum(stats.iterations) or 1
                for k, v in (("wall", wall), ("psnr", psnr(video, ref)), ("ssim", ssim(video, ref)),
                             ("forwards", stats.forwards), ("calls", stats.model_calls), ("flops", stats.flops),
                             ("flops_nocache", stats.flops_nocache), ("flops_paper", stats.flops_paper),
                             ("flops_nocache_paper", stats.flops_nocache_paper), ("kv", stats.kv_peak_bytes),
                             ("moved", stats.kv_moved_bytes / steps),
                             ("psnr_replayed", psnr(video, videos[m.replay]) if m.replay else float("inf"))):
                    r[k].append(v)
                log(f"  {prompt[:40]!r} seed {seed} {m.name:22s} {wall:7.2f} s  forwards {stats.forwards:5d}")
            # the chunk path with no reuse, per attention: its distance to off, and the policy's bookkeeping
            progress.say(f"bench: prompt {prompt[:40]!r} seed {seed}: the cache policy's bookkeeping, for "
                         f"{', '.join(t0_rows)} attention: the chunk path without a policy and with FlowCache at "
                         f"threshold 0 (computes everything), {each} ...")
            for attention, rows in t0_rows.items():
                chunk_path = {**overrides, "path": "chunk"}
                plain = kit.cache("off", "slow")
                plain.attention = attention
                t0 = kit.cache("flowcache", "custom", threshold=0.0)
                t0.attention = attention
                wall, _ = _median_run(lambda h: kit.sample(prompt, seed, plain, h, **chunk_path), repeats, progress,
                                      f"{attention} no policy")
                rows["plain"].append(wall)
                wall_t0, (video, _) = _median_run(lambda h: kit.sample(prompt, seed, t0, h, **chunk_path), repeats,
                                                  progress, f"{attention} threshold 0")
                rows["t0"].append(wall_t0)
                rows["psnr"].append(psnr(video, ref))
                log(f"  {prompt[:40]!r} seed {seed} {attention} attention: no policy {wall:.2f} s, "
                    f"threshold-0 FlowCache {wall_t0:.2f} s")
    off_wall = sum(per_mode["off"]["wall"])
    rows = []
    for m in modes:
        r = per_mode[m.name]
        mean = {k: statistics.mean(v) for k, v in r.items() if k not in ("wall", "kv", "peak")}
        cache = _cache_of(kit, m)
        rows.append({
            "mode": m.name, "method": m.method, "preset": m.preset,
            "attention": cache.attention,
            "reuse": cache.reuse,
            "forwards": mean["forwards"],
            "model_calls": mean["calls"],  # batched calls those forwards ran in
            "tflops": mean["flops"] / 1e12,
            "wall_s": statistics.median(r["wall"]),
            "speedup": off_wall / sum(r["wall"]),
            # against the real vanilla loop, and in the paper's accounting
            "flops_speedup": mean["flops_nocache"] / mean["flops"],
            "flops_speedup_paper": mean["flops_nocache_paper"] / mean["flops_paper"],
            "psnr_db": mean["psnr"] if m.name != "off" else float("inf"),
            "ssim": mean["ssim"],
            "peak_kv_bytes": max(r["kv"]),
            "peak_bytes": max(r["peak"]),           # measured: everything the run allocated at its highest point
            "moved_bytes_per_step": mean["moved"],  # offloaded K/V copied host <-> device per step, both ways
            "replays": m.replay, "psnr_vs_replayed_db": mean["psnr_replayed"],
        })
    setting = {**kit.settings.__dict__, **overrides, "prompts": prompts, "seeds": seeds, "repeats": repeats,
               "model": kit.loaded.checkpoint, "torch_threads": torch.get_num_threads(),
               "device": str(kit.loaded.model.device), "dtype": str(kit.loaded.model.dtype).replace("torch.", ""),
               "quality_on": type(kit.codec).__name__}
    overhead = {}
    for attention, r in t0_rows.items():
        plain, t0 = sum(r["plain"]), sum(r["t0"])
        overhead[attention] = {"chunked_s": plain, "flowcache_threshold0_s": t0,
                               "fraction": (t0 - plain) / plain if plain else 0.0,
                               "threshold0_psnr_db": statistics.mean(r["psnr"])}
    return {"rows": rows, "setting": setting, "overhead": overhead}


def format_table(result: dict) -> str:
    from .cache import METHODS

    head = (f"{'mode':22s} {'attention':>14s} {'forwards':>8s} {'calls':>6s} {'TFLOPs':>8s} {'wall s':>7s} "
            f"{'speedup':>8s} {'FLOPs x':>8s} {'paper x':>8s} {'PSNR dB':>8s} {'SSIM':>6s} {'peak KV':>9s} "
            f"{'peak':>9s} {'moved/step':>10s}")
    lines = [f"torch threads: {result['setting'].get('torch_threads')}", head, "-" * len(head)]
    for r in result["rows"]:
        p = "inf" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.2f}"
        on_chunks = METHODS[r["method"]].path == "chunk" if r.get("method") in METHODS else False
        att = r.get("attention", "") if on_chunks else "-"  # the window path attends as the model does
        if on_chunks and r.get("reuse") == "extrapolate":
            att += "+ext"
        lines.append(f"{r['mode']:22s} {att:>14s} {r['forwards']:8.0f} {r.get('model_calls', 0):6.0f} "
                     f"{r['tflops']:8.4f} {r['wall_s']:7.2f} {r['speedup']:7.2f}x {r['flops_speedup']:7.2f}x "
                     f"{r.get('flops_speedup_paper', r['flops_speedup']):7.2f}x {p:>8s} {r['ssim']:6.3f} "
                     f"{r['peak_kv_bytes'] / 2**20:7.2f}Mi {r.get('peak_bytes', 0) / 2**20:7.1f}Mi "
                     f"{r.get('moved_bytes_per_step', 0) / 2**20:8.2f}Mi")
    lines += ["FLOPs x, paper x: off's counted FLOPs / this mode's (as computed; in the paper's accounting): counted, "
              "not timed, so they do not move with the machine's load.",
              "wall s: median wall seconds per run; speedup: off's wall time / this mode's, both timed in this process. "
              "Wall times on a shared or busy machine are noisy.",
              "PSNR dB, SSIM: this mode's video against off's (same prompt and seed, no cache); inf = identical.",
              "peak KV: the K/V stores' bytes (host and device); peak: every byte the run allocated at its highest "
              "point, measured (live tensor bytes on a CPU, the allocator's peak on a GPU); moved/step: offloaded K/V "
              "copied between host and device per step (÷ the bus bandwidth = its time on a GPU)."]
    by_mode = {r["mode"]: r for r in result["rows"]}
    for r in result["rows"]:
        if r.get("replays") in by_mode:
            base, p = by_mode[r["replays"]], r["psnr_vs_replayed_db"]
            cost = base["psnr_db"] - r["psnr_db"] if r["psnr_db"] != float("inf") else 0.0
            lines.append(f"{r['mode']}: {r['replays']}'s own decisions replayed, so only how K/V are held differs: "
                         + ("bit-identical to it" if p == float("inf") else
                            f"PSNR {p:.2f} dB against it; against off {r['psnr_db']:.2f} dB vs {base['psnr_db']:.2f} "
                            f"dB, a cost of {cost:.2f} dB (negative: closer to off; target for fp8 K/V: at most 0.5)"))
    for attention, o in result["overhead"].items():
        lines.append(f"{attention} attention, chunk path with no reuse (FlowCache at threshold 0) vs off: PSNR "
                     f"{o['threshold0_psnr_db']:.2f} dB; policy bookkeeping, wall: {o['flowcache_threshold0_s']:.2f} s "
                     f"with the policy vs {o['chunked_s']:.2f} s without -> {100 * o['fraction']:+.1f}% (target < 3% "
                     "on an idle machine; a difference of two wall timings, mostly noise on a shared one)")
    return "\n".join(lines)


# -- the speed-quality frontier -------------------------------------------------------------------------
def _grid(thresholds, **fixed) -> list[dict]:
    return [{"threshold": t, **fixed} for t in thresholds]


# Custom values per method (the rest from its slow preset). The demo's presets were picked from this grid on its
# calibration prompts x seeds 0 and 1 (window and window_refresh attention), never on the benchmark's.
SWEEP = {"teacache": _grid((0.1, 0.2)),
         "flowcache": _grid((0.12, 0.15, 0.17, 0.2, 0.25, 0.3), warmup=5) + _grid((0.12, 0.15, 0.17, 0.2), warmup=3),
         "magcache": _grid((0.1, 0.2, 0.3), max_skips=2, warmup=2) + _grid((0.2,), max_skips=3, warmup=2),
         "easycache": _grid((0.03, 0.035, 0.04, 0.045, 0.05), warmup=3)}


SWEEP_REUSES = ("hold", "extrapolate")  # the default grid's; pass reuses=REUSE for forecast2 too
SWEEP_CFGS: tuple[tuple[str, int], ...] = (("off", 2),)  # (cfg_reuse, cfg_interval); e.g. + (("own", 2), ("delta", 2))


@dataclass(frozen=True)
class SweepBlock:
    """Part of a sweep grid: ``grid``'s custom values per method, each with every attention, reuse and (cfg_reuse,
    cfg_interval) pair given here (a method on the window path takes its preset's attention and reuse)."""

    grid: dict
    attentions: tuple[str, ...]
    reuses: tuple[str, ...]
    cfgs: tuple[tuple[str, int], ...] = (("off", 2),)


ALL_REUSES = ("hold", "extrapolate", "forecast2")
CFG_REUSES = (("off", 2), ("own", 2), ("own", 3), ("delta", 2), ("delta", 3))
# Where the demo's turbo rows were picked (``bench --sweep --grid turbo --calibration-prompts``): past the fast
# presets, up to and beyond 6x fewer FLOPs. The first block crosses a few thresholds per method (the fast presets'
# among them: FlowCache 0.25 / warm-up 5, MagCache 0.2 / 3 skips, EasyCache 0.05) with every reuse and every
# CFG-aware reuse; the others are denser in the thresholds, with CFG-aware reuse off (on, it costs far more PSNR
# than the FLOPs it saves are worth: see docs/benchmarks.md). window_refresh attention (the fast presets'),
# EasyCache also window (its fast preset's).
SWEEP_TURBO: tuple[SweepBlock, ...] = (
    SweepBlock({"flowcache": [{"threshold": 0.25, "warmup": 5}, {"threshold": 0.3, "warmup": 3},
                              {"threshold": 0.4, "warmup": 2}],
                "magcache": [{"threshold": 0.2, "max_skips": 3, "warmup": 2},
                             {"threshold": 0.3, "max_skips": 5, "warmup": 2},
                             {"threshold": 0.4, "max_skips": 8, "warmup": 2}],
                "easycache": _grid((0.05, 0.07, 0.1), warmup=3)},
               ("window_refresh",), ALL_REUSES, CFG_REUSES),
    SweepBlock({"flowcache": _grid((0.3, 0.35, 0.45, 0.5, 0.6), warmup=2) + _grid((0.4, 0.5, 0.6), warmup=3),
                "magcache": [{"threshold": t, "max_skips": k, "warmup": 2}
                             for k in (4, 5, 6, 8) for t in (0.2, 0.3, 0.4, 0.5)
                             if (t, k) not in ((0.3, 5), (0.4, 8))]  # in the first block
                + [{"threshold": t, "max_skips": k, "warmup": 1} for k in (6, 8) for t in (0.3, 0.4)],
                "easycache": _grid((0.06, 0.08, 0.12, 0.15), warmup=3)},
               ("window_refresh",), ALL_REUSES),
    SweepBlock({"easycache": _grid((0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.15), warmup=3)}, ("window",), ALL_REUSES),
)


def sweep_points(kit, grid: dict, attentions: tuple[str, ...] | None = None, reuses: tuple[str, ...] | None = None,
                 cfgs: tuple[tuple[str, int], ...] | None = None) -> list[tuple]:
    """The settings a sweep runs, as (method, attention, reuse, custom, (cfg_reuse, cfg_interval)): each method of
    ``grid`` the kit's model has presets for, each chunk-path method with every attention (default: all), reuse
    (default ``SWEEP_REUSES``) and CFG-aware reuse (default ``SWEEP_CFGS``)."""
    from .cache import ATTENTION, METHODS
    from .errors import InputError

    points = []
    for method, values in grid.items():
        try:
            base = kit.cache(method, "slow")
        except InputError:
            continue
        on_chunks = METHODS[method].path == "chunk"
        for attention in (attentions or ATTENTION) if on_chunks else (base.attention,):
            for reuse in (reuses or SWEEP_REUSES) if on_chunks else (base.reuse,):
                for cfg in (cfgs or SWEEP_CFGS):
                    for custom in values:
                        points.append((method, attention, reuse, custom, cfg))
    return points


def block_points(kit, blocks: tuple[SweepBlock, ...]) -> list[tuple]:
    """Every block's points, each setting once (in the first block that has it)."""
    points, seen = [], set()
    for b in blocks:
        for p in sweep_points(kit, b.grid, b.attentions, b.reuses, b.cfgs):
            key = (p[0], p[1], p[2], tuple(sorted(p[3].items())), p[4])
            if key not in seen:
                seen.add(key)
                points.append(p)
    return points


def run_sweep(prompts: list[str], seeds: list[int], repeats: int = 1, overrides: dict | None = None, log=print,
              kit=None, grid: dict | None = None, attentions: tuple[str, ...] | None = None,
              reuses: tuple[str, ...] | None = None, progress: Progress | None = None,
              cfgs: tuple[tuple[str, int], ...] | None = None, points: list[tuple] | None = None) -> list[dict]:
    """Each method over a grid of custom values (``SWEEP``; the rest from its slow preset), each chunk-path method
    with every attention (window, window_refresh, block_causal), every reuse of ``reuses`` (``SWEEP_REUSES``: hold,
    extrapolate) and every CFG-aware reuse of ``cfgs`` ((cfg_reuse, cfg_interval) pairs, ``SWEEP_CFGS``: off):
    FLOPs and wall speedups against off and PSNR, averaged over prompts and seeds; ``frontier`` marks the rows no
    other row beats in FLOPs speedup and PSNR at once. A row with cfg_reuse on says so (cfg_reuse, cfg_interval).
    ``points`` (``sweep_points``, ``block_points``): the settings to run instead of the grid's."""
    from .jobs import load_demo_kit

    progress = progress or Progress.off()
    kit = kit or load_demo_kit()
    overrides = overrides or {}
    if points is None:
        points = sweep_points(kit, grid or SWEEP, attentions, reuses, cfgs)
    refs = {}
    acc: dict[int, dict] = {i: {"wall": [], "flops": [], "flops_off": [], "psnr": [], "off_wall": []}
                            for i in range(len(points))}
    for prompt in prompts:
        for seed in seeds:
            progress.say(f"sweep: prompt {prompt[:40]!r} seed {seed}: off, then {len(points)} settings ...")
            off_wall, (ref, _) = _median_run(lambda h: kit.sample(prompt, seed, kit.cache("off", "slow"), h,
                                                                  **overrides), repeats, progress, "off")
            refs[(prompt, seed)] = ref
            for i, (method, attention, reuse, custom, cfg) in enumerate(points):
                cache = replace(kit.cache(method, "custom", **custom), attention=attention, reuse=reuse,
                                cfg_reuse=cfg[0], cfg_interval=cfg[1])
                label = f"{i + 1}/{len(points)} {method} {attention} {reuse}" + (
                    f" cfg {cfg[0]}/{cfg[1]}" if cfg[0] != "off" else "")
                wall, (video, stats) = _median_run(lambda h: kit.sample(prompt, seed, cache, h, **overrides), repeats,
                                                   progress, label)
                a = acc[i]
                a["wall"].append(wall), a["off_wall"].append(off_wall), a["psnr"].append(psnr(video, ref))
                a["flops"].append(stats.flops), a["flops_off"].append(stats.flops_nocache)
            log(f"  sweep {prompt[:40]!r} seed {seed}: {len(points)} settings")
    rows = []
    for i, (method, attention, reuse, custom, cfg) in enumerate(points):
        a = acc[i]
        rows.append({"method": method, "attention": attention, "reuse": reuse, "threshold": custom["threshold"],
                     "custom": custom,
                     **({"cfg_reuse": cfg[0], "cfg_interval": cfg[1]} if cfg[0] != "off" else {}),
                     "flops_speedup": sum(a["flops_off"]) / sum(a["flops"]),
                     "wall_speedup": sum(a["off_wall"]) / sum(a["wall"]), "psnr_db": statistics.mean(a["psnr"])})
    mark_frontier(rows)
    return rows


def mark_frontier(rows: list[dict]) -> list[dict]:
    """Set each row's ``frontier``: no other row is as good in FLOPs speedup and PSNR and better in one."""
    for r in rows:
        r["frontier"] = not any(o["flops_speedup"] >= r["flops_speedup"] and o["psnr_db"] >= r["psnr_db"]
                                and (o["flops_speedup"], o["psnr_db"]) != (r["flops_speedup"], r["psnr_db"])
                                for o in rows)
    return rows


def pick_presets(rows: list[dict], targets: dict[str, float] | None = None) -> dict[str, dict[str, dict]]:
    """The sweep row each named preset's rule picks, per method: {method: {preset: row}}. The rule
    (``presets.PRESET_FLOPS_TARGETS``): the highest PSNR among the method's rows at >= the preset's FLOPs
    speedup; where none reaches it, the fastest row (the highest FLOPs speedup, then PSNR)."""
    from .presets import PRESET_FLOPS_TARGETS

    picks: dict[str, dict[str, dict]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for preset, target in (targets or PRESET_FLOPS_TARGETS).items():
            reach = [r for r in mine if r["flops_speedup"] >= target]
            picks.setdefault(method, {})[preset] = (max(reach, key=lambda r: r["psnr_db"]) if reach else
                                                    max(mine, key=lambda r: (r["flops_speedup"], r["psnr_db"])))
    return picks


def preset_row(r: dict) -> dict:
    """A sweep row as a preset row (a ``presets.json`` / embedded-presets row): its custom values, no KV budget,
    its attention and reuse, and its CFG-aware reuse when on; ``resolve_cache`` turns it back into the settings the
    sweep ran."""
    row = {**r["custom"], "kv_budget": 0, "attention": r["attention"], "reuse": r["reuse"]}
    if r.get("cfg_reuse", "off") != "off":
        row.update(cfg_reuse=r["cfg_reuse"], cfg_interval=r["cfg_interval"])
    return row


def describe_setting(r: dict) -> str:
    """A sweep row's setting in one phrase: its custom values, attention, reuse and CFG-aware reuse."""
    custom = " ".join(f"{k}={v:g}" for k, v in r["custom"].items())
    cfg = f" cfg={r['cfg_reuse']}/{r['cfg_interval']}" if r.get("cfg_reuse", "off") != "off" else ""
    return f"{custom} {r['attention']} {r.get('reuse', 'hold')}{cfg}"


def format_sweep(rows: list[dict]) -> str:
    from .presets import PRESET_FLOPS_TARGETS

    head = (f"{'method':10s} {'attention':>14s} {'reuse':>11s} {'settings':36s} {'FLOPs x':>8s} {'wall x':>7s} "
            f"{'PSNR dB':>8s}  frontier")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["method"], r["attention"], r.get("reuse", "hold"),
                                         r.get("cfg_reuse", "off"), r.get("cfg_interval", 0),
                                         sorted(r["custom"].items()))):
        custom = " ".join(f"{k}={v:g}" for k, v in r["custom"].items())
        if r.get("cfg_reuse", "off") != "off":
            custom += f" cfg={r['cfg_reuse']}/{r['cfg_interval']}"
        lines.append(f"{r['method']:10s} {r['attention']:>14s} {r.get('reuse', 'hold'):>11s} {custom:36s} "
                     f"{r['flops_speedup']:7.2f}x "
                     f"{r['wall_speedup']:6.2f}x {r['psnr_db']:8.2f}  {'*' if r['frontier'] else ''}")
    lines.append("FLOPs x: off's counted FLOPs / the setting's (machine-independent); wall x: off's wall time / the "
                 "setting's, timed in this process (noisy on a shared or busy machine); PSNR: against off's video; "
                 "frontier (*): no other row is as good in both FLOPs x and PSNR and better in one.")
    rule = ", ".join(f"{p} >= {t:g}x" for p, t in PRESET_FLOPS_TARGETS.items())
    lines.append(f"What the presets' rule picks from these rows (the highest PSNR at {rule} FLOPs; the fastest row "
                 "where none reaches it):")
    for method, picks in pick_presets(rows).items():
        for preset, r in picks.items():
            lines.append(f"  {method} {preset}: {describe_setting(r)}: {r['flops_speedup']:.2f}x FLOPs, "
                         f"{r['psnr_db']:.2f} dB" + ("" if r["flops_speedup"] >= PRESET_FLOPS_TARGETS[preset]
                                                     else " (none reaches the target: the fastest)"))
    return "\n".join(lines)


# -- long videos -------------------------------------------------------------------------------------
def long_child(windows: int, budget: int, steps: int | None) -> dict:
    """One long-video run (called in a fresh process): sample, then decode and stream to an mp4."""
    from .jobs import load_demo_kit
    from .video import VideoWriter

    kit = load_demo_kit()
    s = kit.settings
    base = s.base_num_frames
    new = base - s.overlap_history
    frames = base + (windows - 1) * new
    fast = kit.cache("flowcache", "fast")
    cache = kit.cache("flowcache", "custom", threshold=fast.config.threshold, warmup=fast.config.warmup,
                      kv_budget=budget)
    over = {"num_frames": frames, **({"steps": steps} if steps else {})}
    t0 = time.perf_counter()
    from . import demo
    cond, uncond = kit.text.encode(demo.DEMO_PROMPTS[0]), kit.text.encode("")
    from .pipelines import DFSettings
    with Progress(bars_wanted(), say=None).run(f"{windows} windows, kv_budget {budget}") as hooks:
        z, stats = kit.pipeline()(cond, uncond, DFSettings(**{**s.__dict__, **over}), cache, hooks)
    sample_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        with VideoWriter(Path(d) / "long.mp4", "video/h264-mp4", fps=s.fps) as w:
            step = s.causal_block_size
            for i in range(0, z.shape[2], step):  # chunk by chunk: never all frames as one float tensor
                w.write(kit.codec.decode(z[:, :, i:i + step]))
    return {"windows": windows, "kv_budget": budget, "frames": frames, "wall_s": time.perf_counter() - t0,
            "sample_s": sample_s, "peak_kv_bytes": stats.kv_peak_bytes,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "compress_fraction": stats.compress_seconds / sample_s if sample_s else 0.0,
            "kv_dropped": sum(stats.kv_dropped_per_layer)}


def _child_env(progress: Progress) -> dict:
    """A child process draws its bar (on the stderr it shares with this one) when this one would."""
    return {**os.environ, PROGRESS_ENV: "1" if progress.bars else "0"}


def run_long(window_counts=(1, 2, 4, 8), steps: int | None = None, log=print,
             progress: Progress | None = None) -> list[dict]:
    progress = progress or Progress.off()
    rows = []
    for n in window_counts:
        for budget in (0, 1):
            progress.say(f"bench --long: {n} window(s), kv_budget {budget}, in a fresh process ...")
            cmd = [sys.executable, "-m", "flowcache", "bench", "--long-child", str(n), str(budget)]
            if steps:
                cmd += ["--steps", str(steps)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=_child_env(progress))
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            log(f"  windows {n} budget {budget}: {row['wall_s']:.1f} s, peak KV {row['peak_kv_bytes'] / 2**20:.2f} MiB, "
                f"RSS {row['peak_rss_mib']:.0f} MiB")
    return rows


def format_long(rows: list[dict]) -> str:
    head = (f"{'windows':>7s} {'frames':>6s} {'kv_budget':>9s} {'peak KV MiB':>11s} {'peak RSS MiB':>12s} "
            f"{'wall s':>7s} {'compress %':>10s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['windows']:7d} {r['frames']:6d} {r['kv_budget']:9d} {r['peak_kv_bytes'] / 2**20:11.3f} "
                     f"{r['peak_rss_mib']:12.0f} {r['wall_s']:7.1f} {100 * r['compress_fraction']:9.2f}%")
    return "\n".join(lines)


# -- the causal loop: per-block time and memory by eviction mode -------------------------------------------------
# global / rolling / compressed: the causal loop's KV modes (Self-Forcing's geometry); longlive: LongLive v1.0's
# setting (rolling, a 12-frame window, a 3-frame sink, blocks of 3) with a prompt switch half-way, re-cached;
# krea: Krea Realtime's loop (its cache rebuilt from a 3-frame context every block, the oldest context frame
# through the codec and back) with a prompt change half-way, blended
CAUSAL_MODES = ("global", "rolling", "compressed", "longlive", "krea")


class RoundTripCodec:
    """A stand-in VAE that round-trips exactly, for timing Krea's loop on a model without its VAE: each latent
    frame's channels packed into ``spatial``×``spatial`` pixel patches (zero padded), repeated ``temporal`` times
    (the first latent frame once, as a Wan VAE decodes), and unpacked again by ``encode``. Not pixels anyone
    should look at: the bench's video is written through the kit's own codec."""

    def __init__(self, channels: int, spatial: int, temporal: int):
        if channels > 3 * spatial * spatial:
            raise ValueError(f"{channels} channels do not fit {spatial}x{spatial} patches of 3 colours")
        self.c, self.s, self.t = channels, spatial, temporal

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, C, F, h, w] -> [T, h·s, w·s, 3], T = 1 + temporal·(F − 1)."""
        _, c, f, h, w = latents.shape
        x = torch.zeros(f, 3 * self.s * self.s, h, w, dtype=torch.float32)
        x[:, :c] = latents[0].permute(1, 0, 2, 3).float().cpu()
        frames = torch.nn.functional.pixel_shuffle(x, self.s).permute(0, 2, 3, 1)  # [F, h·s, w·s, 3]
        return torch.cat([frames[:1], frames[1:].repeat_interleave(self.t, dim=0)])

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[T, H, W, 3] -> [1, C, F, H/s, W/s]: the first frame, then every ``temporal``-th (the last of each
        group), as the decoded frames were laid out."""
        keep = pixels[:1] if pixels.shape[0] == 1 else torch.cat([pixels[:1], pixels[self.t::self.t]])
        x = torch.nn.functional.pixel_unshuffle(keep.permute(0, 3, 1, 2).float(), self.s)[:, :self.c]
        return x.permute(1, 0, 2, 3)[None]


def _prompt_change(kit, geo, blocks: int, fpb: int):
    """Two prompts, the second from the first frame of block ``blocks // 2`` (one prompt for a single block)."""
    from .prompts import PromptEntry, PromptSchedule

    first = kit.text.encode("a red circle bouncing on a blue background")
    if blocks < 2:
        return PromptSchedule([PromptEntry(0, first)])
    second = kit.text.encode("a green square moving left on a yellow background")
    return PromptSchedule([PromptEntry(0, first), PromptEntry(geo.pixel_frames((blocks // 2) * fpb), second)])


def causal_child(model: str, blocks: int, kv_mode: str, device: str = "cpu", budget: int = 1) -> dict:
    """One causal run (in a fresh process, so peak RSS is its own): ``blocks`` blocks of the causal loop, decoded
    block by block into an mp4 as they are written (frames never all in memory). ``model``: "demo" (the demo
    model's weights in the causal loop: memory and time only, it was not trained causal) or a Wan kit name.
    ``kv_mode``: one of ``CAUSAL_MODES`` (longlive and krea: those releases' loops, see above)."""
    from .cache import CacheSettings
    from .pipelines.causal_wan import CausalSettings, CausalWanPipeline
    from .pipelines.common import LatentGeometry
    from .video import VideoWriter

    if kv_mode not in CAUSAL_MODES:
        raise ValueError(f"kv_mode {kv_mode!r}: one of {', '.join(CAUSAL_MODES)}")
    if model == "demo":
        from .jobs import load_demo_kit

        kit = load_demo_kit()
        w, h, fpb, window, sink = 64, 64, 4, 20, 4  # the demo's chunks of 4 latent frames, a 5-block window
    else:
        from .jobs import load_checkpoint_kit

        kit = load_checkpoint_kit(model, device)
        w, h, fpb, window, sink = 832, 480, 3, 21, 3  # Self-Forcing's geometry and trained horizon
    if kv_mode in ("longlive", "krea"):
        fpb = 3  # both releases' blocks
    geo = LatentGeometry(**kit.loaded.geometry)
    frames = geo.pixel_frames(blocks * fpb)
    t0 = time.perf_counter()
    with Progress(bars_wanted(), say=None).run(f"causal {blocks} blocks, {kv_mode}") as hooks:
        if kv_mode == "krea":
            from .pipelines.krea_realtime import KreaRealtimePipeline, KreaSettings

            codec = kit.codec if model == "demo" else RoundTripCodec(geo.channels, geo.spatial_stride,
                                                                    geo.temporal_stride)
            s = KreaSettings(width=w, height=h, num_frames=frames, num_frame_per_block=fpb)
            pipe = KreaRealtimePipeline(kit.loaded.model, geo, kit.loaded.text_len, codec)
            z, stats = pipe(_prompt_change(kit, geo, blocks, fpb), s, CacheSettings(), hooks)
        else:
            if kv_mode == "longlive":  # LongLive v1.0's configs: window 12, sink 3, re-cache on a switch
                s = CausalSettings(width=w, height=h, num_frames=frames, num_frame_per_block=fpb, kv_mode="rolling",
                                   local_attn_frames=12, sink_frames=3, prompt_rule="recache")
                cond = _prompt_change(kit, geo, blocks, fpb)
            else:
                s = CausalSettings(width=w, height=h, num_frames=frames, num_frame_per_block=fpb, kv_mode=kv_mode,
                                   local_attn_frames=window, sink_frames=sink)
                cond = kit.text.encode("a red circle bouncing on a blue background")
            pipe = CausalWanPipeline(kit.loaded.model, geo, kit.loaded.text_len)
            z, stats = pipe(cond, s, CacheSettings(kv_budget=budget if kv_mode == "compressed" else 0), hooks)
    sample_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        with VideoWriter(Path(d) / "causal.mp4", "video/h264-mp4", fps=s.fps) as writer:
            for i in range(0, z.shape[2], fpb):  # block by block
                writer.write(kit.codec.decode(z[:, :, i:i + fpb]))
    return {"blocks": blocks, "kv_mode": kv_mode, "frames": int(z.shape[2]), "sample_s": sample_s,
            "block_s": sample_s / blocks, "peak_kv_bytes": stats.kv_peak_bytes,
            "switches": len(stats.switches),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_causal(model: str = "demo", block_counts=(1, 2, 4, 8), device: str = "cpu", log=print,
               progress: Progress | None = None, modes: tuple[str, ...] = CAUSAL_MODES) -> list[dict]:
    progress = progress or Progress.off()
    rows = []
    for n in block_counts:
        for mode in modes:
            progress.say(f"bench --loop causal: {model}, {n} block(s), {mode} KV, in a fresh process ...")
            cmd = [sys.executable, "-m", "flowcache", "bench", "--causal-child", model, str(n), mode, "--device", device]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=_child_env(progress))
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            log(f"  causal {model} blocks {n} {mode}: {row['block_s']:.2f} s a block, peak KV "
                f"{row['peak_kv_bytes'] / 2**20:.2f} MiB, RSS {row['peak_rss_mib']:.0f} MiB")
    return rows


def format_causal(rows: list[dict]) -> str:
    head = (f"{'blocks':>6s} {'frames':>6s} {'kv_mode':>10s} {'s/block':>8s} {'peak KV MiB':>11s} "
            f"{'peak RSS MiB':>12s} {'switches':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['blocks']:6d} {r['frames']:6d} {r['kv_mode']:>10s} {r['block_s']:8.3f} "
                     f"{r['peak_kv_bytes'] / 2**20:11.3f} {r['peak_rss_mib']:12.0f} {r.get('switches', 0):8d}")
    lines.append("frames: latent frames. global/rolling/compressed: the causal loop's KV modes; longlive: LongLive "
                 "v1.0 (rolling, 12-frame window, 3-frame sink, blocks of 3, a prompt switch half-way re-cached); "
                 "krea: Krea Realtime's loop (its cache rebuilt from a 3-frame context each block, a prompt change "
                 "half-way blended). Bounded modes keep peak KV flat as the blocks grow.")
    return "\n".join(lines)


# -- memory: the plans' estimates against what runs allocate ------------------------------------------------------
def run_memory(model: str = "random-wan-1.3B", device: str = "cpu", width: int = 160, height: int = 96,
               frames: int = 17, steps: int = 3, log=print, progress: Progress | None = None) -> list[dict]:
    """Each memory plan of ``model`` at a reduced size (one window of ``frames`` frames in chunks of one latent
    frame, ``steps`` steps, ar_step 1), for the window path (off) and FlowCache's fast preset: the plan's estimate
    beside the peak measured while it runs (live tensor bytes on a CPU, where host and device are one memory:
    the offloaded rows count too; the allocator's peak on a GPU, the device's share only)."""
    from .jobs import load_checkpoint_kit
    from .memory import REPORT_OPTIONS
    from .memtrack import track
    from .pipelines import DFSettings

    progress = progress or Progress.off()
    progress.say(f"bench --memory: building {model} on {device} ...")
    kit = load_checkpoint_kit(model, device)
    s = DFSettings(width=width, height=height, num_frames=frames, base_num_frames=frames, steps=steps, ar_step=1,
                   causal_block_size=1, seed=0)
    pipe = kit.pipeline()
    cond, uncond = kit.text.encode("benchmark prompt 0"), kit.text.encode("")
    dev = kit.loaded.model.device
    rows = []
    for method, preset in (("off", "slow"), ("flowcache", "fast")):
        cache = kit.cache(method, preset)
        for options in REPORT_OPTIONS:
            if method == "off" and (options.kv_fp8 or options.kv_offload):
                continue  # no K/V stored: the same run
            plan = pipe.plan(s, cache, options)
            with progress.run(f"{method} {options.name}") as hooks, track(dev) as mem:
                pipe(cond, uncond, s, cache, hooks, plan=plan)
            estimate = plan.memory.device_bytes + (plan.memory.host_bytes if dev.type == "cpu" else 0)
            row = {"method": method, "plan": options.name, "estimated": estimate, "measured": mem.peak,
                   "ratio": mem.peak / estimate, "activations": plan.memory.activations, "state": plan.memory.state,
                   "kv": plan.memory.kv_bytes, "how": mem.how}
            rows.append(row)
            log(f"  {method:9s} {options.name:42s} estimated {estimate / 2**20:9.1f} MiB, measured "
                f"{mem.peak / 2**20:9.1f} MiB ({row['ratio']:.3f})")
    for r in rows:
        r.update(model=model, device=str(dev), size=f"{width}x{height}, {frames} frames, {steps} steps")
    return rows


def format_memory(rows: list[dict]) -> str:
    head = f"{'method':10s} {'plan':42s} {'estimated MiB':>13s} {'measured MiB':>13s} {'ratio':>6s}"
    first = rows[0] if rows else {}
    lines = [f"{first.get('model')} on {first.get('device')}, {first.get('size')}; measured: {first.get('how')}",
             head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:10s} {r['plan']:42s} {r['estimated'] / 2**20:13.1f} {r['measured'] / 2**20:13.1f} "
                     f"{r['ratio']:6.3f}")
    lines.append("estimated: the run plan's working memory beside the weights (on a CPU also the offloaded rows: "
                 "host and device are one memory there); measured: the peak of what the run allocated.")
    return "\n".join(lines)
