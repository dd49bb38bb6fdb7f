"""Procedural training videos for the demo model: one coloured shape moving, bouncing or changing.

Everything is deterministic from a seed. A video is an analytic function of time, so any stretch of
any length can be rendered (``render(spec, start, length)``) and motion is continuous across chunks
and windows. Shapes are anti-aliased from signed distances.

Prompt grammar (``prompt_of``): "a {colour} {shape} {motion} on a {background} background", e.g.
"a red circle bouncing on a blue background".
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 64

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10), "orange": (1.0, 0.55, 0.05), "yellow": (0.95, 0.88, 0.10),
    "green": (0.15, 0.78, 0.20), "cyan": (0.10, 0.85, 0.90), "blue": (0.15, 0.30, 0.95),
    "purple": (0.62, 0.20, 0.82), "white": (0.96, 0.96, 0.96),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.04, 0.04, 0.05), "gray": (0.45, 0.45, 0.47), "white": (0.93, 0.93, 0.93),
    "blue": (0.08, 0.14, 0.45), "green": (0.08, 0.35, 0.12),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "pulsing", "changing colour")
HUE_CYCLE = ("red", "orange", "yellow", "green", "cyan", "blue", "purple")
FILLER = ("a", "on", "background")
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    list(FILLER) + list(COLOURS) + list(BACKGROUNDS) + list(SHAPES)
    + [w for m in MOTIONS for w in m.split()]))


@dataclass(frozen=True)
class VideoSpec:
    colour: str
    shape: str
    motion: str
    background: str
    seed: int | None = None  # None: the prompt's canonical video (what the demo model is trained on)

    @property
    def prompt(self) -> str:
        return prompt_of(self)


def prompt_of(spec: VideoSpec) -> str:
    return f"a {spec.colour} {spec.shape} {spec.motion} on a {spec.background} background"


def sample_spec(rng: np.random.Generator) -> VideoSpec:
    """A random prompt's spec (its canonical video); the shape colour never equals the background."""
    colour = str(rng.choice(list(COLOURS)))
    bgs = [b for b in BACKGROUNDS if b != colour]
    return VideoSpec(colour, str(rng.choice(SHAPES)), str(rng.choice(MOTIONS)), str(rng.choice(bgs)))


def spec_from_prompt(prompt: str, seed: int | None = None) -> VideoSpec:
    """Parse a prompt of the grammar above back into a spec (seed None: the prompt's canonical video)."""
    m = re.fullmatch(r"\s*a (\w+) (\w+) (.+?) on a (\w+) background\s*", prompt.lower())
    if not m or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in MOTIONS \
            or m.group(4) not in BACKGROUNDS:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    return VideoSpec(m.group(1), m.group(2), m.group(3), m.group(4), seed)


# The canonical video of a prompt: centred, one size, one speed. Its content then follows from the words alone
# (colour, shape, motion, background), a mapping a tiny model learns on a CPU in minutes; shapes at random
# places and sizes would have to be conjured out of pure noise by the sampler, which such a model does not do
# (tried: right backgrounds, no shapes). Later windows may start anywhere in the video: the model reads the
# position and phase from the frames carried over.
CANONICAL = {"radius": 10.0, "x0": 32.0, "y0": 32.0, "speed": 1.25, "angle": 0.0, "period": 16.0, "phase": 0.0,
             "hue_frames": 7.0, "vx": 1.7 * math.cos(0.6), "vy": 1.7 * math.sin(0.6)}


def _params(spec: VideoSpec) -> dict:
    """The continuous parameters (start position, speed, size, phase): canonical, or drawn from ``spec.seed``."""
    if spec.seed is None:
        return dict(CANONICAL)
    r = np.random.default_rng(spec.seed)
    p = {"radius": float(r.uniform(8.0, 12.0)), "x0": float(r.uniform(14, SIZE - 14)),
         "y0": float(r.uniform(14, SIZE - 14)), "speed": float(r.uniform(1.0, 1.6)),
         "angle": float(r.uniform(0.0, 2 * math.pi)), "period": float(r.uniform(12.0, 20.0)),
         "phase": float(r.uniform(0.0, 2 * math.pi)), "hue_frames": float(r.uniform(6.0, 9.0))}
    # bouncing: both velocity components clearly non-zero
    a = float(r.uniform(0.35, 1.2)) + (math.pi / 2) * int(r.integers(0, 4))
    p["vx"], p["vy"] = 1.7 * math.cos(a), 1.7 * math.sin(a)
    return p


def _reflect(pos: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Billiard reflection of an unbounded coordinate into [lo, hi] (a triangle wave)."""
    span = hi - lo
    q = np.mod(pos - lo, 2 * span)
    return lo + np.where(q > span, 2 * span - q, q)


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in 0..1 of a shape of radius r centred at the origin; dx, dy pixel offsets."""
    if shape == "circle":
        sd = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        s = r * 0.88
        qx, qy = np.abs(dx) - s, np.abs(dy) - s
        sd = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2) + np.minimum(np.maximum(qx, qy), 0)
    elif shape == "triangle":  # equilateral, point up, centroid at the origin
        sd = _tri_sd(dx, dy, r * 1.35)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - sd, 0.0, 1.0)


def _tri_sd(dx: np.ndarray, dy: np.ndarray, rr: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance (exact on edges) of an upward equilateral triangle with inradius rr/2,
    centroid at the origin, image y pointing down."""
    k = math.sqrt(3.0)
    inr = rr * 0.5
    e1 = dy - inr                    # bottom edge
    e2 = (-k * dx - dy) / 2 - inr    # upper-left edge
    e3 = (k * dx - dy) / 2 - inr     # upper-right edge
    return np.maximum(np.maximum(e1, e2), e3)


def _colour_at(spec: VideoSpec, p: dict, t: np.ndarray) -> np.ndarray:
    """[T, 3] shape colour; only 'changing colour' varies: smooth steps through the hue cycle."""
    base = np.array(COLOURS[spec.colour], dtype=np.float64)
    if spec.motion != "changing colour":
        return np.broadcast_to(base, (len(t), 3))
    start = HUE_CYCLE.index(spec.colour) if spec.colour in HUE_CYCLE else -1
    seq = [base] + [np.array(COLOURS[HUE_CYCLE[(start + 1 + i) % len(HUE_CYCLE)]]) for i in range(len(HUE_CYCLE))]
    # after the first pass the cycle repeats without the (possibly non-hue) start colour
    u = t / p["hue_frames"]
    out = np.empty((len(t), 3))
    for n, ui in enumerate(u):
        i = int(math.floor(ui))
        f = ui - i
        f = f * f * (3 - 2 * f)
        if i == 0:
            a, b = seq[0], seq[1]
        else:
            a = seq[1 + (i - 1) % len(HUE_CYCLE)]
            b = seq[1 + i % len(HUE_CYCLE)]
        out[n] = (1 - f) * a + f * b
    return out


def render(spec: VideoSpec, start: int = 0, length: int = 60, size: int = SIZE) -> torch.Tensor:
    """Frames start .. start+length-1 of the spec's video: float32 [length, size, size, 3] in 0..1."""
    p = _params(spec)
    t = np.arange(start, start + length, dtype=np.float64)
    r = np.full_like(t, p["radius"])
    x = np.full_like(t, p["x0"])
    y = np.full_like(t, p["y0"])
    wrap_x = wrap_y = False
    m = spec.motion
    if m == "moving left":
        x, wrap_x = p["x0"] - p["speed"] * t, True
    elif m == "moving right":
        x, wrap_x = p["x0"] + p["speed"] * t, True
    elif m == "moving up":
        y, wrap_y = p["y0"] - p["speed"] * t, True
    elif m == "moving down":
        y, wrap_y = p["y0"] + p["speed"] * t, True
    elif m == "bouncing":
        lo, hi = p["radius"] + 1, size - p["radius"] - 1
        x = _reflect(p["x0"] + p["vx"] * t, lo, hi)
        y = _reflect(p["y0"] + p["vy"] * t, lo, hi)
    elif m == "pulsing":
        r = p["radius"] * (1.0 + 0.4 * np.sin(2 * math.pi * t / p["period"] + p["phase"]))
    if wrap_x:
        x = np.mod(x, size)
    if wrap_y:
        y = np.mod(y, size)
    grid = np.arange(size, dtype=np.float64) + 0.5
    gy, gx = grid[None, :, None], grid[None, None, :]
    cov = np.zeros((len(t), size, size))
    offs_x = (-size, 0, size) if wrap_x else (0,)
    offs_y = (-size, 0, size) if wrap_y else (0,)
    for ox in offs_x:
        for oy in offs_y:
            dx = gx - (x + ox)[:, None, None]
            dy = gy - (y + oy)[:, None, None]
            cov = np.maximum(cov, _coverage(spec.shape, dx, dy, r[:, None, None]))
    fg = _colour_at(spec, p, t)[:, None, None, :]
    bg = np.array(BACKGROUNDS[spec.background])[None, None, None, :]
    frames = bg * (1 - cov[..., None]) + fg * cov[..., None]
    return torch.from_numpy(frames.astype(np.float32))


__all__ = ["VideoSpec", "render", "sample_spec", "spec_from_prompt", "prompt_of", "CANONICAL", "VOCABULARY",
           "COLOURS", "BACKGROUNDS", "SHAPES", "MOTIONS", "SIZE"]
