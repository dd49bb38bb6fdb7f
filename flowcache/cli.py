"""``python -m flowcache``: inspect, generate, demo (the main job), bench, calibrate, convert."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from .cache import METHODS
from .errors import FlowCacheError, InputError
from .presets import NAMED_PRESETS


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: …`` and exit 2, no usage block (``--help`` still has it)."""

    def error(self, message: str) -> NoReturn:
        _one_line_usage_error(self, message)


def _one_line_usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    print(f"error: {message} (see {parser.prog} --help)", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def _one_line_argparse_errors() -> Iterator[None]:
    """The same for parsers built elsewhere (calibrate's own), while they parse."""
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _one_line_usage_error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _flags_named(flags: dict[str, str]) -> Iterator[None]:
    """Errors about a setting the user gave by a flag name that flag: "--frames 7 gives ...; try --frames 4",
    not the internal "num_frames=7". ``flags``: setting name -> flag."""
    try:
        yield
    except InputError as e:
        message = str(e)
        for setting, flag in flags.items():
            message = re.sub(rf"(?<![\w-]){re.escape(setting)}=", f"{flag} ", message)
        if message == str(e):
            raise
        raise InputError(message) from None


def _say(text: str) -> None:
    print(text, flush=True)


def _say_err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


RELEASED_NAMES = ("skyreels-v2-df-1.3b", "skyreels-v2-df-14b", "magi-1-4.5b-distill", "causal-wan-1.3b",
                  "causal-wan-14b", "krea-realtime-14b", "longlive-1.3b")  # memory.RELEASED, without torch for --help


def _inspect(a) -> int:
    from .memory import RELEASED, estimate
    if a.memory:
        with _flags_named({"frames": "--frames", "num_frames": "--frames", "width": "--memory width", "height": "--memory height"}):
            est = estimate(a.checkpoint, a.memory, frames=a.frames, budget=a.kv_budget, compute=a.dtype,
                           weights=a.weight_dtype, method=a.method, preset=a.preset)
        print(json.dumps(est.to_dict(), indent=2) if a.json else est.table())
        return 0
    if a.checkpoint in RELEASED:
        raise InputError(f"{a.checkpoint}: a released architecture, not a file; add --memory WIDTHxHEIGHT.")
    from .models import inspect_checkpoint
    facts = inspect_checkpoint(a.checkpoint, a.weights)
    print(json.dumps(facts, indent=2) if a.json else _inspect_text(facts))
    return 0


def _inspect_text(facts: dict) -> str:
    """``inspect``'s default output: what ``inspect_checkpoint`` found, one fact a line."""
    def value(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (list, tuple)):
            shown = ", ".join(map(str, v[:8])) + (f", ... ({len(v)} in all)" if len(v) > 8 else "")
            return f"[{shown}]"
        return str(v)

    n = facts["parameters"]
    size = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"
    dtypes = ", ".join(f"{k} {v}" for k, v in sorted(facts["dtypes"].items(), key=lambda kv: -kv[1]))
    lines = [f"{facts['file']}: {facts['family']}",
             f"  loop           {facts['loop']} ({facts['loop_reason']})",
             f"  parameters     {size} in {facts['tensors']} tensors ({dtypes})",
             f"  key prefix     {facts['key_prefix']}"]
    if facts.get("torch_layout", "flat") != "flat":
        lines.append(f"  weights from   {facts['torch_layout']} (--weights picks the other generator)")
    lines.append("  config")
    lines += [f"    {k:<17s}{value(v)}" for k, v in facts["config"].items()]
    return "\n".join(lines)


DEMO_FLAGS = {"num_frames": "--frames", "steps": "--steps", "seed": "--seed"}


def _demo_epilog() -> str:
    """``demo --help``'s list of the words the demo's text encoder knows."""
    try:
        from .demo import DEMO_PROMPTS
        from .demo.data import BACKGROUNDS, COLOURS, MOTIONS, SHAPES
        from .demo.text import ALIASES
    except ImportError:
        return "The demo model is not installed with this copy of the pack (flowcache/demo is missing)."
    return (textwrap.fill("prompts: the demo model was trained on one coloured shape moving on a plain background, "
                          "and its text encoder knows only these words, as in 'a <colour> <shape> <motion> on a "
                          "<background> background':", 79) + "\n"
            + "".join(textwrap.fill(", ".join(words), 79, initial_indent=f"  {name + ':':13s}",
                                    subsequent_indent=" " * 15) + "\n"
                      for name, words in (("colours", COLOURS), ("shapes", SHAPES), ("motions", MOTIONS),
                                          ("backgrounds", BACKGROUNDS)))
            + f"  (also read: {', '.join(f'{k} as {v}' for k, v in ALIASES.items())})\n"
            f"e.g. --prompt {DEMO_PROMPTS[1]!r}")


def _demo(a) -> int:
    from .jobs import run_demo
    from .progress import Progress, bars_wanted
    compare = not a.no_compare
    then = "; then again uncached, for comparison" if compare else " (no uncached comparison run: --no-compare)"
    print(f"FlowCache demo ({a.preset} preset): loading the demo model{then} ...", flush=True)
    with _flags_named(DEMO_FLAGS):
        r = run_demo(prompt=a.prompt, preset=a.preset, out=a.out, seed=a.seed, num_frames=a.frames, steps=a.steps,
                     compare=compare, progress=Progress(bars_wanted()))
    # the FLOP ratio first: it is counted, so it does not move with the machine's load; then the wall figures
    print(f"FLOPs: {r['flops_speedup']}x fewer than the uncached loop spends on this video (counted, not timed: "
          "the same on any machine)")
    print(f"  FlowCache: {r['forwards']} chunk forwards in {r['model_calls']} batched calls, "
          f"{r['flowcache_seconds']} s wall")
    if "wall_speedup" in r:
        print(f"  uncached:  {r['off_forwards']} window forwards in {r['off_model_calls']} batched calls, "
              f"{r['off_seconds']} s wall")
        print(f"wall: {r['wall_speedup']}x speedup against the uncached run just made ({r['off_seconds']} s / "
              f"{r['flowcache_seconds']} s; wall times on a shared or busy machine are noisy, the FLOPs are not)")
        print(f"PSNR vs uncached {r['psnr_db']} dB (the same seed without the cache; higher is closer)")
    return 0


def _settings(text: str | None) -> dict:
    """--settings as DFSettings fields, checked before anything is loaded."""
    from dataclasses import fields

    from .pipelines.diffusion_forcing import DFSettings
    if not text:
        return {}
    example = """e.g. '{"num_frames": 97, "steps": 30}'"""
    try:
        extra = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"--settings: not valid JSON ({str(e)[:100]}); {example}.") from None
    if not isinstance(extra, dict):
        raise InputError(f"--settings: expected a JSON object of setting names to values, {example}.")
    known = sorted(f.name for f in fields(DFSettings))
    unknown = sorted(set(extra) - set(known))
    if unknown:
        raise InputError(f"--settings: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}.")
    return extra


def _generate(a) -> int:
    from .jobs import generate
    extra = _settings(a.settings)
    for flag, path in (("CHECKPOINT", a.checkpoint), ("--cond", a.cond), ("--uncond", a.uncond), ("--vae", a.vae)):
        if path is not None and not os.path.exists(path):
            raise InputError(f"{flag}: {path}: no such file.")
    from .checkpoint import read_safetensors_header
    for path in (a.cond, a.uncond):  # read by safetensors directly later: its header gets the loader's checks now
        if path is not None:
            read_safetensors_header(path)
    from .progress import Progress, bars_wanted
    # phase lines on stderr: stdout is the one JSON line
    r = generate(a.checkpoint, a.cond, a.out, a.uncond, a.vae, a.cache, a.preset, a.dtype, a.device,
                 progress=Progress(bars_wanted(), say=_say_err), **extra)
    print(json.dumps({"out": r["out"], "forwards": r["stats"]["forwards"], "reused": r["stats"]["reused"]}))
    return 0


BENCH_FLAGS = {"num_frames": "--frames", "steps": "--steps", "width": "--width", "height": "--height"}


@_flags_named(BENCH_FLAGS)
def _bench(a) -> int:
    import torch

    from . import bench
    from .progress import Progress, bars_wanted
    log = (lambda *_: None) if a.quiet else _say  # flushed: a log file follows the run
    progress = Progress(bars_wanted(a.quiet), say=None if a.quiet else _say, leave=False)
    if a.long_child:
        n, budget = a.long_child
        print(json.dumps(bench.long_child(int(n), int(budget), a.steps)))
        return 0
    if a.causal_child:
        model, n, mode = a.causal_child
        print(json.dumps(bench.causal_child(model, int(n), mode, a.device)))
        return 0
    if a.memory:
        model = "random-wan-1.3B" if a.model == "demo" else a.model
        rows = bench.run_memory(model, a.device, a.width or 160, a.height or 96, a.frames or 17, a.steps or 3,
                                log=log, progress=progress)
        print(bench.format_memory(rows))
        _write_json(a.json, {"memory": rows})
        return 0
    if a.loop == "causal":
        rows = bench.run_causal(a.model, tuple(a.windows), a.device, log=log, progress=progress)
        print(bench.format_causal(rows))
        _write_json(a.json, {"causal": rows})
        return 0
    from . import demo
    from .jobs import RANDOM_WAN, load_checkpoint_kit, load_demo_kit
    from .checkpoint import TORCH_SUFFIXES
    from .models import header_facts
    over = {k: v for k, v in (("steps", a.steps), ("num_frames", a.frames), ("width", a.width),
                              ("height", a.height)) if v}
    if a.long and a.model != "demo":
        raise FlowCacheError("bench --long runs on the shipped demo model only (it decodes and writes every window); "
                             f"drop --long for {a.model}.")
    demo_prompts = demo.CALIBRATION_PROMPTS if a.calibration_prompts else demo.BENCH_PROMPTS
    progress.say(f"bench: loading {'the demo model' if a.model == 'demo' else a.model} ...")
    if a.model == "demo":
        kit, prompts = load_demo_kit(), list(demo_prompts[:a.prompts])
    elif (a.model not in RANDOM_WAN and Path(a.model).suffix not in TORCH_SUFFIXES  # demo files are safetensors
          and header_facts(a.model).preset_key == "demo"):
        kit, prompts = load_demo_kit(a.model), list(demo_prompts[:a.prompts])  # a retrained demo model
    else:
        if a.frames:  # one window of that length, as the paper's 97-frame runs
            over["base_num_frames"] = a.frames
        kit = load_checkpoint_kit(a.model, a.device, a.dtype, a.vae, **over)
        prompts = [f"benchmark prompt {i}" for i in range(a.prompts)]  # seeds of the stand-in text states
    seeds = list(range(a.seeds))
    out: dict = {"tables": []}
    threads_before = torch.get_num_threads()
    try:
        for threads in (a.threads or [threads_before]):
            torch.set_num_threads(threads)
            if a.sweep:
                points = bench.block_points(kit, bench.SWEEP_TURBO) if a.grid == "turbo" else None
                rows = bench.run_sweep(prompts, seeds, max(1, a.repeats), over, log=log, kit=kit, progress=progress,
                                       points=points)
                print(f"torch threads: {threads}\n" + bench.format_sweep(rows))
                out.setdefault("sweeps", []).append({"threads": threads, "rows": rows})
            if (not a.long or a.table) and not a.sweep:
                res = bench.run_table(prompts, seeds, a.repeats, over, log=log, kit=kit, progress=progress)
                print(bench.format_table(res))
                out["tables"].append(res)
    finally:
        torch.set_num_threads(threads_before)
    if out["tables"]:
        out["table"] = out["tables"][-1]
    if a.long:
        rows = bench.run_long(steps=a.steps, window_counts=tuple(a.windows), log=log, progress=progress)
        print(bench.format_long(rows))
        out["long"] = rows
        causal = bench.run_causal("demo", (4, 16, 64, 250), log=log, progress=progress)  # 16 to 1,000 frames
        print(bench.format_causal(causal))
        out["causal"] = causal
    _write_json(a.json, out)
    return 0


def _write_json(path: str | None, data: dict) -> None:
    """Complete or not at all: a temporary file beside it, renamed."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _calibrate(a, rest) -> int:
    from .calibrate import main_calibrate
    return main_calibrate(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] == ["calibrate"]:
        with _one_line_argparse_errors():
            return _run(_calibrate, None, argv[1:])
    p = _Parser(prog="python -m flowcache", description="FlowCache from the command line. New here? Run "
                                                        "`python -m flowcache demo` (a minute or two on a CPU, no "
                                                        "downloads); each command has its own --help.")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="print a checkpoint's family, the loop it runs, config, dtype and key layout, "
                                       "or with --memory the memory of every plan (device and host)")
    i.add_argument("checkpoint", help="a checkpoint, or (with --memory) a released architecture: "
                                      + ", ".join(RELEASED_NAMES))
    i.add_argument("--weights", choices=["generator_ema", "generator"],
                   help="a Self-Forcing / CausVid .pt: which generator to read (default generator_ema)")
    i.add_argument("--memory", metavar="WIDTHxHEIGHT", help="estimate memory at this resolution for every plan "
                                                            "(K/V resident or offloaded, bf16 or fp8, CFG branches "
                                                            "batched or one after the other): device and host GiB, "
                                                            "with the weights resident or streamed")
    i.add_argument("--frames", type=int, help="video frames for --memory (default: the model's own: the demo model "
                                              "36, a Wan/SkyReels window 97, MAGI-1 96)")
    i.add_argument("--kv-budget", type=int, help="for --memory: chunks of compressed KV history (default: the "
                                                 "preset's)")
    i.add_argument("--method", default="flowcache", choices=list(METHODS),
                   help="for --memory: the cache method whose preset is planned (default flowcache)")
    i.add_argument("--preset", default="fast", choices=list(NAMED_PRESETS),
                   help="for --memory: the preset planned (default fast)")
    i.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="for --memory: the compute dtype (default bf16)")
    i.add_argument("--weight-dtype", default="bf16", help="for --memory, released architectures only: bf16, fp16, "
                                                          "fp32 or fp8_e4m3fn (fp8 linear weights); default bf16")
    i.add_argument("--json", action="store_true", help="print JSON instead of text (the checkpoint's facts, or the "
                                                       "estimate with --memory)")
    d = sub.add_parser("demo", help="generate a video with the shipped demo model and FlowCache",
                       description=textwrap.fill(
                           "Generate a 64x64 video with the shipped demo model and FlowCache, write it, then (unless "
                           "--no-compare) sample it again without the cache and report the speedup and PSNR. Runs on "
                           "a CPU, a minute or two at the defaults.", 79),
                       epilog=_demo_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--prompt", help="what to draw, in the demo's words (listed below); default "
                                    "'a red circle bouncing on a blue background'")
    d.add_argument("--preset", choices=list(NAMED_PRESETS), default="fast",
                   help="FlowCache preset: slow reuses less (closer to uncached), fast reuses more (default fast), "
                        "turbo the most (at least 6x fewer FLOPs on the demo's calibration prompts; further from "
                        "uncached)")
    d.add_argument("--out", default="out/demo.mp4", help="video file to write: .mp4, .webm, .gif or .webp "
                                                         "(default out/demo.mp4)")
    d.add_argument("--seed", type=int, default=0, help="noise seed (default 0): the same seed gives the same video")
    d.add_argument("--frames", type=int, help="video frames, a multiple of 4 (the demo's chunk); up to 20 is one "
                                              "window (default 36: two windows of 20 overlapping by 4)")
    d.add_argument("--steps", type=int, help="denoising steps per chunk (default 50); fewer is faster and rougher")
    d.add_argument("--no-compare", action="store_true",
                   help="skip the uncached comparison run (about half the time): no wall speedup or PSNR")
    g = sub.add_parser("generate", help="run the DF pipeline from a checkpoint and saved text states")
    g.add_argument("checkpoint", help="a Wan2.1 / SkyReels-V2 diffusion-forcing DiT: .safetensors, a shard index, "
                                      "a folder of shards, or a weights-only .pt")
    g.add_argument("--cond", required=True, help="safetensors with a 'context' tensor [1, tokens, text_dim]")
    g.add_argument("--uncond", help="the negative prompt's text states, the same format as --cond (default: zeros)")
    g.add_argument("--vae", help="Wan2.1 VAE file; without it latents are written")
    g.add_argument("--out", default="out/video.mp4", help="video to write (default out/video.mp4); without a VAE "
                                                          "the latents go to the same name with .safetensors")
    g.add_argument("--cache", choices=list(METHODS), default="flowcache", help="cache method (default flowcache; "
                                                                              "off: every step computed)")
    g.add_argument("--preset", choices=list(NAMED_PRESETS), default="slow",
                   help="the method's preset for this model: slow (closer to uncached), fast or turbo (the most "
                        "reuse; only a model calibrated for it has it) (default slow)")
    g.add_argument("--dtype", default="auto", help="compute dtype: auto (default: the file's own, fp8 files in "
                                                   "bf16), fp32, bf16 or fp16")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    g.add_argument("--settings", help='JSON of DFSettings fields, e.g. \'{"num_frames": 97, "steps": 30}\'')
    b = sub.add_parser("bench", help="the paper's table, measured side by side (demo model by default)")
    b.add_argument("--model", default="demo", help="demo, a Wan/SkyReels checkpoint, or random-wan-1.3B / "
                                                   "random-wan-14B (the released architecture, random weights)")
    b.add_argument("--vae", help="Wan2.1 VAE file: PSNR/SSIM on decoded frames (else on latents)")
    b.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    b.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype (default auto: a file's own, fp8 files in bf16; random-wan: bf16 on a GPU, "
                        "fp32 on the CPU; the demo always fp32)")
    b.add_argument("--width", type=int, help="video width in pixels (default: the model's, the demo 64, SkyReels 960)")
    b.add_argument("--height", type=int, help="video height in pixels (default: the model's, the demo 64, "
                                              "SkyReels 544)")
    b.add_argument("--json", metavar="FILE", help="also write every table's rows and settings to this JSON file")
    b.add_argument("--prompts", type=int, default=3, help="how many of the benchmark prompts to run (default 3)")
    b.add_argument("--seeds", type=int, default=2, help="seeds per prompt, 0..N-1 (default 2)")
    b.add_argument("--repeats", type=int, default=3, help="runs per mode, prompt and seed; wall time is their "
                                                          "median (default 3)")
    b.add_argument("--steps", type=int, help="denoising steps per chunk (default: the model's, 50)")
    b.add_argument("--frames", type=int, help="video frames (default: the demo's 36, a checkpoint's SkyReels 177 "
                                              "over two windows); for a checkpoint, one window of this length")
    b.add_argument("--long", action="store_true", help="1, 2, 4, 8 windows with and without KV compression")
    b.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="window counts for --long, block counts for --loop causal (default 1 2 4 8)")
    b.add_argument("--table", action="store_true", help="with --long, also print the main table")
    b.add_argument("--quiet", action="store_true", help="print only the tables: no progress lines or bars")
    b.add_argument("--threads", type=int, nargs="+", help="torch threads per run, e.g. 1 2 (a table for each)")
    b.add_argument("--sweep", action="store_true", help="the speed-quality frontier: every method over a range of "
                                                        "thresholds (FLOPs x and wall x against PSNR)")
    b.add_argument("--grid", choices=["default", "turbo"], default="default",
                   help="with --sweep: default (the thresholds the slow and fast presets were picked from, every "
                        "attention, hold and extrapolate) or turbo (past 6x fewer FLOPs: higher thresholds and "
                        "skips, every reuse, CFG-aware reuse; window_refresh attention, EasyCache also window)")
    b.add_argument("--calibration-prompts", action="store_true",
                   help="the demo's calibration prompts instead of the benchmark's (to pick presets from data)")
    b.add_argument("--long-child", nargs=2, help=argparse.SUPPRESS)
    b.add_argument("--causal-child", nargs=3, help=argparse.SUPPRESS)
    b.add_argument("--memory", action="store_true",
                   help="each memory plan's estimate beside the peak measured while it runs: --model (default "
                        "random-wan-1.3B, the released 1.3B with random weights) at a reduced size (default 160x96, "
                        "17 frames, 3 steps; --width/--height/--frames/--steps), off and FlowCache fast")
    b.add_argument("--loop", choices=["diffusion_forcing", "causal"], default="diffusion_forcing",
                   help="causal: per-block time, KV bytes and peak RSS of the causal loop for global, rolling and "
                        "compressed eviction, LongLive's setting (12-frame window, 3-frame sink, a prompt switch "
                        "re-cached) and Krea Realtime's loop (its context rebuilt each block) (--windows gives the "
                        "block counts)")
    sub.add_parser("calibrate", help="fit a model's rescale polynomial and write a preset file (see --help)")
    cv = sub.add_parser("convert", help="LongLive v1.0's release files as safetensors for ComfyUI's own loaders "
                                        "(Load Diffusion Model, LoraLoaderModelOnly)",
                        description=textwrap.fill(
                            "ComfyUI cannot read LongLive's release files as they are ({'generator': ...}, "
                            "{'generator_lora': ...}). longlive-lora writes lora.pt in ComfyUI's LoRA layout for the "
                            "Wan2.1 diffusion model (LoraLoaderModelOnly at strength 1 applies what FlowCache Load "
                            "Model's merge does); longlive-base writes longlive_base.pt's weights with bare Wan2.1 "
                            "keys (Load Diffusion Model), marked so that FlowCache runs LongLive's loop whatever the "
                            "file is called. Inputs are read as data only (weights_only: a pickle that would run code "
                            "is refused); the output is written complete or not at all.", 79))
    cv.add_argument("kind", choices=["longlive-lora", "longlive-base"], help="what SRC is")
    cv.add_argument("src", help="the release file: lora.pt (longlive-lora) or longlive_base.pt (longlive-base)")
    cv.add_argument("dst", help="the .safetensors file to write (e.g. into ComfyUI/models/loras or "
                                "models/diffusion_models)")
    cv.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="store the weights in this dtype (default: "
                                                                     "as stored in SRC)")
    cv.add_argument("--force", action="store_true", help="replace DST if it exists")
    gc = sub.add_parser("gpucheck", help="the device check: random-wan-1.3B at 960x544 for a few steps on a GPU, one "
                                         "table (per-step time off vs FlowCache, peak memory measured vs estimated "
                                         "for each plan, the offload overhead, masked vs per-chunk attention)")
    gc.add_argument("--device", default="cuda", help="torch device (default cuda; cpu with --small only)")
    gc.add_argument("--small", action="store_true", help="a tiny model at 64x64 instead: checks the script itself "
                                                        "in seconds, on any device")
    gc.add_argument("--steps", type=int, default=4, help="denoising steps per chunk (default 4)")
    gc.add_argument("--json", metavar="FILE", help="also write the table's rows to this JSON file")
    gc.add_argument("--quiet", action="store_true", help="print only the table")
    a = p.parse_args(argv)
    return _run({"inspect": _inspect, "demo": _demo, "generate": _generate, "bench": _bench,
                 "gpucheck": _gpucheck, "convert": _convert}[a.cmd], a)


def _convert(a) -> int:
    from .convert import convert

    done = convert(a.kind, a.src, a.dst, a.dtype, a.force)
    print(f"wrote {done.summary}; {done.bytes / 2**20:.1f} MiB")
    return 0


def _gpucheck(a) -> int:
    from .gpucheck import format_check, run_check

    rows = run_check(a.device, small=a.small, steps=a.steps, log=(lambda *_: None) if a.quiet else _say)
    print(format_check(rows))
    _write_json(a.json, {"gpucheck": rows})
    return 0


def _run(command: Callable[..., int], *args: object) -> int:
    """Run a command; every failure is one line on stderr: exit 2 for bad input, 1 for an unforeseen error."""
    try:
        return command(*args)
    except (FlowCacheError, OSError) as e:  # OSError: a file or folder named on the command line
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still no traceback for the user, but say it is one
        print(f"error: internal error ({type(e).__name__}: {_one_line(e)}); please report it.", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
