"""Fit a Wan-architecture model's cache rescale polynomial and write a preset file (``python -m flowcache calibrate``).

TeaCache-style calibration: run the model with the diffusion-forcing pipeline chunk by chunk with no cache
(every chunk computes every step) and record, for every (CFG branch, chunk) and every pair of consecutive
steps of that chunk,

* x — the relative L1 change of the chunk's e0 signal (what FlowCache/TeaCache look at), and
* y — the relative L1 change of the chunk's backbone residual ``h − h0`` (what a reuse replaces),

then fit ``y ≈ poly(x)`` with ``numpy.polyfit`` (degree 4, highest power first, like TeaCache4Wan2.1's
coefficients). The accumulated ``poly(x)`` is then in units of accumulated relative output change, the same
units as the published Wan fits, so the paper's thresholds (FlowCache slow 0.1 / fast 0.15; TeaCache
0.1 / 0.2) are written unchanged and are not tuned to hit a speed.

Recording uses an observer cache policy (``ChunkSignalRecorder``: always computes) that ``calibrate`` hands to
the pipeline explicitly (``policy=``) on the chunk path; the e0 signal reaches it through ``should_compute`` and
the residual through ``remember``. The fitted polynomial goes into the model's presets row, which starts from
its family's released row (the paper's thresholds).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .cache.base import CachePolicy, UnitKey, relative_l1, signal_of
from .checkpoint import checkpoint_files
from .errors import CheckpointError, InputError
from .presets import calibrated_entry, embed_presets, preset_sidecar, write_preset_file

DEFAULT_DEGREE = 4
BASE_ROWS = {"wan": "wan-1.3B"}  # the released row a calibrated model's entry starts from


# -- recording ---------------------------------------------------------------------------------------

@dataclass
class CalibrationPoint:
    x: float          # relative L1 change of the e0 signal between consecutive steps of a chunk
    y: float          # relative L1 change of the chunk's backbone residual over the same steps
    branch: str
    chunk: int | str
    step: int         # the chunk's own step index of the later of the two steps
    run: int = 0
    magnitude: float = 1.0  # mean|residual| at this step over mean|residual| at the previous one (MagCache's γ)


class ChunkSignalRecorder(CachePolicy):
    """An observer policy: always computes, records (x, y) pairs per (branch, chunk) on the chunk path.

    ``should_compute`` sees the chunk's e0 and remembers its change since the previous step; ``remember``
    sees the backbone residual just computed and pairs its change with that e0 change. State is reset per
    window (the pipeline calls ``reset``), the recorded points are kept across windows and runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.points: list[CalibrationPoint] = []
        self.run = 0
        self._prev_signal: dict[UnitKey, torch.Tensor] = {}
        self._prev_payload: dict[UnitKey, torch.Tensor] = {}
        self._pending: dict[UnitKey, float | None] = {}
        self._steps: dict[UnitKey, int] = {}

    def reset(self) -> None:
        super().reset()
        self._prev_signal.clear()
        self._prev_payload.clear()
        self._pending.clear()
        self._steps.clear()

    def should_compute(self, key: UnitKey, signal, force: bool = False) -> bool:
        signal = signal_of(signal)
        prev = self._prev_signal.get(key)
        self._pending[key] = relative_l1(signal.float(), prev) if prev is not None else None
        self._prev_signal[key] = signal.detach().float().clone()
        self._steps[key] = self._steps.get(key, -1) + 1
        return True

    @property
    def keeps_payload(self) -> bool:
        return False

    @property
    def reads_payloads(self) -> bool:
        return True  # every computed residual is a calibration point

    def remember(self, key: UnitKey, payload: torch.Tensor) -> None:
        payload = payload.detach().float()
        prev = self._prev_payload.get(key)
        x = self._pending.pop(key, None)
        if prev is not None and x is not None:
            y = relative_l1(payload, prev)
            branch, chunk = key if isinstance(key, tuple) and len(key) == 2 else ("cond", key)
            mag = float(payload.abs().mean() / prev.abs().mean())
            if math.isfinite(x) and math.isfinite(y) and math.isfinite(mag):
                self.points.append(CalibrationPoint(x, y, str(branch), chunk, self._steps.get(key, 0), self.run,
                                                    mag))
        self._prev_payload[key] = payload.clone()


# -- fitting -----------------------------------------------------------------------------------------

def fit_rescale(x: Sequence[float], y: Sequence[float], degree: int = DEFAULT_DEGREE) -> tuple[list[float], dict]:
    """``numpy.polyfit(x, y, degree)``: coefficients (highest power first, for ``np.poly1d``) and fit facts
    (points, RMS residual, R², x range)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise InputError("calibration: x and y must be 1-D sequences of the same length.")
    if len(xa) < degree + 1:
        raise InputError(f"calibration: {len(xa)} points cannot fit a degree-{degree} polynomial; "
                         "use more prompts, seeds or steps.")
    if np.ptp(xa) == 0:
        raise InputError("calibration: the e0 signal never changed, nothing to fit.")
    coef = np.polyfit(xa, ya, degree)
    pred = np.polyval(coef, xa)
    res = ya - pred
    ss_tot = float(((ya - ya.mean()) ** 2).sum())
    facts = {"points": int(len(xa)), "degree": degree, "rms_residual": float(np.sqrt((res ** 2).mean())),
             "r2": float(1 - (res ** 2).sum() / ss_tot) if ss_tot > 0 else 1.0,
             "x_range": [float(xa.min()), float(xa.max())], "y_mean": float(ya.mean())}
    return [float(c) for c in coef], facts


# -- running -----------------------------------------------------------------------------------------

def _default_settings(model_key: str):
    from .pipelines.diffusion_forcing import DFSettings

    if model_key == "demo":
        from .demo import DEMO_SETTINGS

        d = dict(DEMO_SETTINGS)
        d["num_frames"] = d["base_num_frames"]  # one window is enough: every chunk walks every step
        return DFSettings(**{k: v for k, v in d.items() if k in DFSettings.__dataclass_fields__})
    return DFSettings(width=480, height=272, num_frames=97, base_num_frames=97, overlap_history=17,
                      causal_block_size=5)


def _encoder_for(lm, model_path, prompts: Sequence[str], conditioning: str | None,
                 random_conditioning: bool) -> tuple[Callable[[str], torch.Tensor], str]:
    """How prompts become text states: the demo's own encoder, a file of saved states, or seeded noise."""
    text_dim = lm.config.text_dim
    if conditioning:
        from safetensors.torch import load_file

        states = load_file(conditioning)
        missing = [p for p in prompts if p not in states]
        if missing:
            raise InputError(f"{conditioning}: no saved conditioning named {missing[0]!r}; it has "
                             f"{', '.join(sorted(states)[:8])}. Name each tensor by its prompt ('' for the negative).")
        return (lambda p: states[p].float().reshape(1, -1, text_dim)), f"file:{Path(conditioning).name}"
    if lm.preset_key == "demo":
        from .demo import load_demo_text

        enc = load_demo_text(checkpoint_files(model_path)[0])
        return enc.encode, "demo_text"
    if random_conditioning:
        def rand(p: str) -> torch.Tensor:
            if p == "":
                return torch.zeros(1, min(lm.text_len, 16), text_dim)
            g = torch.Generator().manual_seed(abs(hash(p)) % (2**31))
            return torch.randn(1, min(lm.text_len, 16), text_dim, generator=g) * 0.2
        return rand, "random"
    raise InputError(f"calibration of {lm.checkpoint}: give text states with --conditioning FILE.safetensors "
                     "(one [1, tokens, text_dim] tensor per prompt, named by the prompt, '' for the negative), "
                     "or --random-conditioning for a prompt-free fit.")


def magnitude_ratios(points: Sequence[CalibrationPoint], steps: int) -> dict[str, list[float]]:
    """MagCache's per-step ratio curve per branch: γ_0 = 1, γ_k = mean over chunks, windows and runs of
    mean|r_k| / mean|r_{k−1}| (r: a chunk's backbone residual at its own step k)."""
    sums: dict[str, list[list[float]]] = {}
    for p in points:
        sums.setdefault(p.branch, [[] for _ in range(steps)])[min(p.step, steps - 1)].append(p.magnitude)
    return {b: [1.0] + [round(float(np.mean(v)), 5) if v else 1.0 for v in rows[1:]] for b, rows in sums.items()}


@dataclass
class CalibrationRun:
    """What to sample while recording. prompts: for the demo model defaults to ``DEMO_PROMPTS[:3]``; other
    models need ``conditioning`` (a safetensors file of saved text states, one tensor per prompt named by it,
    '' for the negative) or ``random_conditioning``. settings: a ``DFSettings`` (defaults: the demo's single
    window, or a small SkyReels window); steps overrides its steps; degree: of the fitted polynomial."""

    prompts: Sequence[str] | None = None
    seeds: Sequence[int] = (0, 1)
    steps: int | None = None
    degree: int = DEFAULT_DEGREE
    settings: object = None
    negative: str = ""
    conditioning: str | None = None
    random_conditioning: bool = False
    dtype: str = "fp32"


def calibrate(model_path: str | os.PathLike, run: CalibrationRun | None = None,
              out_path: str | os.PathLike | None = None, codec=None,
              log: Callable[[str], None] | None = print, progress=None) -> dict:
    """Calibrate the checkpoint at ``model_path``; returns ``{model_key: entry}`` and writes it to ``out_path``.
    ``log``: a line per phase and per run; ``progress``: a ``flowcache.progress.Progress`` for a bar per run."""
    from .models import load_model
    from .pipelines.diffusion_forcing import DiffusionForcingPipeline, LatentGeometry
    from .progress import Progress

    progress = progress or Progress.off()
    run = run or CalibrationRun()
    lm = load_model(model_path, dtype=run.dtype, expect="wan")
    key = lm.preset_key
    prompts = list(run.prompts or [])
    if not prompts:
        if key != "demo":
            raise InputError("calibration: give --prompts for a model other than the demo.")
        from .demo import CALIBRATION_PROMPTS

        prompts = list(CALIBRATION_PROMPTS)
    encode, text_source = _encoder_for(lm, model_path, prompts + [run.negative], run.conditioning,
                                       run.random_conditioning)
    s = run.settings or _default_settings(key)
    s.path = "chunk"  # every chunk's own signal and residual, every step
    if run.steps is not None:
        s.steps = int(run.steps)
    if codec is None and key == "demo":
        from .demo import load_demo_codec

        codec = load_demo_codec(model_path)
    pipe = DiffusionForcingPipeline(lm.model, LatentGeometry(**lm.geometry), text_len=lm.text_len, codec=codec)
    recorder = ChunkSignalRecorder()
    uncond = encode(run.negative) if s.cfg > 1.0 else None
    t0 = time.perf_counter()
    if log:
        log(f"calibrate: {len(prompts) * len(run.seeds)} runs ({len(prompts)} prompts x {len(run.seeds)} seeds), "
            f"{s.num_frames} frames, {s.steps} steps, every chunk computed at every step ...")
    for i, (p, seed) in enumerate((p, seed) for p in prompts for seed in run.seeds):
        s.seed = int(seed)
        recorder.run = i
        before = len(recorder.points)
        with progress.run(f"{p[:30]!r} seed {seed}") as hooks:
            pipe(encode(p), uncond, s, hooks=hooks, policy=recorder)
        if log:
            log(f"calibrate: {p!r} seed {seed}: {len(recorder.points) - before} points "
                f"({time.perf_counter() - t0:.1f} s)")
    pts = recorder.points
    coef, facts = fit_rescale([q.x for q in pts], [q.y for q in pts], run.degree)
    calib = {"prompts": prompts, "seeds": [int(x) for x in run.seeds], "negative": run.negative,
             "text": text_source, "steps": s.steps, "shift": s.shift, "cfg": s.cfg, "ar_step": s.ar_step,
             "causal_block_size": s.causal_block_size, "frames": s.num_frames, "size": [s.width, s.height],
             "solver": s.solver, "signal": "e0 relative L1 (per chunk)",
             "output": "relative L1 of the chunk's backbone residual h - h0",
             "seconds": round(time.perf_counter() - t0, 1), **facts}
    fitted = {"coefficients": coef, "mag_ratios": magnitude_ratios(pts, s.steps)}
    result = {key: calibrated_entry(BASE_ROWS[lm.family], fitted, calib)}
    if out_path is not None:
        write_preset_file(out_path, result)
        if log:
            log(f"calibrate: wrote {out_path}")
    if log:
        log(f"calibrate: {key}: coefficients {coef}; {facts['points']} points, RMS residual "
            f"{facts['rms_residual']:.4g}, R² {facts['r2']:.3f}")
    return result


# -- CLI ---------------------------------------------------------------------------------------------

def calibrate_parser() -> argparse.ArgumentParser:
    """``python -m flowcache calibrate``'s options."""
    ap = argparse.ArgumentParser(prog="python -m flowcache calibrate",
                                 description="Fit a Wan-architecture model's cache rescale polynomial (TeaCache-style: "
                                             "e0 change vs. the chunk's output change) and write a preset file.")
    ap.add_argument("checkpoint", metavar="CHECKPOINT", help="a Wan2.1 / SkyReels-V2 DiT file (.safetensors)")
    ap.add_argument("--prompts", nargs="+", default=None,
                    help="prompts to sample while recording (default for the demo model: its 3 calibration prompts; "
                         "other models need them, with --conditioning or --random-conditioning)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                    help="seeds per prompt (default 0 1): each prompt x seed is one recorded run")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's default, 50)")
    ap.add_argument("--degree", type=int, default=DEFAULT_DEGREE,
                    help=f"degree of the fitted polynomial (default {DEFAULT_DEGREE}, as TeaCache's Wan fits)")
    ap.add_argument("--out", default=None, help="preset file to write (default: <checkpoint name>.presets.json beside "
                                                "it, which the loader then reads by itself)")
    ap.add_argument("--embed", action="store_true", help="also store the presets in the checkpoint's metadata")
    ap.add_argument("--conditioning", default=None,
                    help="safetensors of saved text states, one per prompt ('' = negative); needed for non-demo models")
    ap.add_argument("--random-conditioning", action="store_true", help="use seeded random text states (prompt-free fit)")
    ap.add_argument("--width", type=int, default=None,
                    help="video width in pixels (default: the demo's 64, or 480 for other models)")
    ap.add_argument("--height", type=int, default=None,
                    help="video height in pixels (default: the demo's 64, or 272 for other models)")
    ap.add_argument("--frames", type=int, default=None,
                    help="video frames, all in one window (default: the demo's 20, or 97 for other models)")
    ap.add_argument("--shift", type=float, default=None,
                    help="the flow-matching timestep shift (default: the model's, the demo 5, SkyReels 8)")
    ap.add_argument("--cfg", type=float, default=None,
                    help="classifier-free guidance scale (default: the model's, the demo 5, SkyReels 6)")
    return ap


def main_calibrate(args: list[str]) -> int:
    """``python -m flowcache calibrate CHECKPOINT [--prompts ...] [--seeds ...] [--steps N] [--out F] [--embed]``."""
    ap = calibrate_parser()
    a = ap.parse_args(args)
    try:
        from .models import load_model

        key = load_model(a.checkpoint, dtype="fp32", expect="wan").preset_key
        s = _default_settings(key)
        for name, val in (("width", a.width), ("height", a.height), ("shift", a.shift), ("cfg", a.cfg)):
            if val is not None:
                setattr(s, name, val)
        if a.frames is not None:
            s.num_frames = s.base_num_frames = a.frames
        out = a.out or str(preset_sidecar(checkpoint_files(a.checkpoint)[0]))
        from .progress import Progress, bars_wanted
        result = calibrate(a.checkpoint, CalibrationRun(a.prompts, a.seeds, a.steps, a.degree, s,
                                                        conditioning=a.conditioning,
                                                        random_conditioning=a.random_conditioning), out,
                           progress=Progress(bars_wanted(), say=None))
        if a.embed:
            embed_presets(a.checkpoint, {k: v for k, v in result.items()})
            print(f"calibrate: embedded presets in {a.checkpoint}")
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ChunkSignalRecorder", "CalibrationPoint", "CalibrationRun", "fit_rescale", "magnitude_ratios", "calibrate",
           "calibrate_parser", "main_calibrate"]
