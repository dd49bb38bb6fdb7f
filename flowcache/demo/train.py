"""Train the demo diffusion-forcing model (a tiny Wan2.1 DiT) and its text embedding on procedural videos.

    python -m flowcache.demo.train --out flowcache/demo/assets

Diffusion forcing with flow matching: x_t = (1−σ)·x0 + σ·ε, target v = ε − x0, timestep fed σ·1000, one σ
per chunk of 4 latent frames in windows of 5 chunks. The per-chunk σ mostly come from the inference
schedule itself (SkyReels' timestep matrix: shifted 50-step sigmas, chunk k lags chunk k−1 by ``ar_step``
steps, finished chunks clean, unstarted chunks pure noise), sometimes with a clean first chunk fed at
t=20 (the overlap prefix of the next window, addnoise_condition=20), sometimes free sorted σ. Chunks that
inference never updates (clean or unstarted) carry no loss. 10% of prompts are empty (CFG). Half the batches
use full attention over the window (the vanilla path), half the block-causal mask (FlowCache's chunk path):
the model has to serve both. (With a quarter in full attention, a 6,000-step run's chunk path without reuse
matched the full-attention window at 22.8 dB PSNR; with half, 27.0 dB.)

The run is a fixed number of steps (the learning-rate schedule is over steps), so a seed and a step count
give the same model on any machine with the same torch; ``--minutes`` is only a safety cap that stops early
(and says so). It saves the EMA weights every few minutes and at the end. The defaults are the shipped
model's recipe (seed 0, ``DEFAULT_STEPS`` steps of 8 windows; its training facts are in its metadata).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import save_safetensors
from ..models.wan import WanConfig, WanDiT
from ..pipelines.common import LatentGeometry
from ..schedulers import flow_sigmas
from .codec import CHANNELS, PATCH, DemoCodec
from .data import VOCABULARY, prompt_of, render, sample_spec
from .text import DemoTextEncoder, tokenize

CHUNK = 4
CHUNKS = 5
WINDOW = CHUNK * CHUNKS
TEXT_LEN = 16
TEXT_DIM = 64
POSITION_CHANNELS = 2  # each latent pixel's (y, x), an extra input like Wan's image-to-video conditioning
PREFIX_SIGMA = 0.02  # addnoise_condition 20: the overlap prefix of a later window, nearly clean
DIT_FILE = "demo_dit.safetensors"
TEXT_FILE = "demo_text.safetensors"
# the shipped model's recipe (tests/test_demo.py checks the shipped file's training facts against these)
DEFAULT_STEPS = 6400
DEFAULT_FULL_ATTENTION_SHARE = 0.5


def demo_config() -> WanConfig:
    return WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, in_dim=CHANNELS + POSITION_CHANNELS,
                     out_dim=CHANNELS, patch_size=(1, 2, 2), text_dim=TEXT_DIM, freq_dim=256, has_fps=False)


def demo_geometry() -> LatentGeometry:
    return LatentGeometry(temporal_stride=1, spatial_stride=PATCH, channels=CHANNELS,
                          position_channels=POSITION_CHANNELS)


def init_wan_(model: WanDiT, carrier: float = 16.0) -> None:
    """Wan's init (xavier linears, zero biases, normal(0.02) time embedding), then an identity path.

    A flow model's output at high noise is mostly its own input (v = ε − x0 ≈ x_t − x0). A DiT has to learn to
    copy its input through patchify, LayerNorm and the head; until it does, every sample keeps a layer of noise
    (seen here: after 800 steps, x0 predicted from pure noise was still noise). So the patch embedding copies
    each patch into the first dims of its token and puts a constant ``carrier`` in the others, which makes the
    head's LayerNorm nearly linear in the patch; the head maps it back; the blocks' output projections start
    at zero. At init the model outputs v ≈ x_t, i.e. predicts x0 ≈ 0, the data mean; training learns the rest.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.time_embedding.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    # the text projection keeps xavier (Wan draws it from normal(0.02), tuned for 4096-d umT5 states): from
    # 64-d demo embeddings that would make the text a whisper the model takes too long to hear
    cfg = model.cfg
    c, (pt, ph, pw), d = cfg.out_dim, cfg.patch_size, cfg.dim
    n = c * pt * ph * pw
    if 2 * n > d or cfg.in_dim < c:
        raise ValueError(f"identity init needs 2 x patch values ({n}) <= dim ({d}) and in_dim >= out_dim")
    with torch.no_grad():
        # token = [x, carrier - x, 0...]: its mean is the same for every x, so LayerNorm only rescales; extra
        # input channels (positions) come in through small random weights
        w = torch.zeros(d, cfg.in_dim, pt, ph, pw)
        w.view(d, -1)[:n, :n] = torch.eye(n)  # token dim i <- conv input (c, t, y, x) flattened
        w.view(d, -1)[n:2 * n, :n] = -torch.eye(n)
        nn.init.normal_(w[:, c:], std=0.02)
        bias = torch.zeros(d)
        bias[n:2 * n] = carrier
        model.patch_embedding.weight.copy_(w)
        model.patch_embedding.bias.copy_(bias)
        mu = float(bias.mean())
        sd = float(((bias - mu) ** 2).mean().sqrt())
        # LayerNorm(token)_i ~ (x_i - mu) / sd for the copied dims: undo it in the head, whose outputs are
        # ordered (t, y, x, c) while the conv's inputs are (c, t, y, x)
        head = model.head.head
        head.weight.zero_()
        for ci in range(c):
            for ti in range(pt):
                for yi in range(ph):
                    for xi in range(pw):
                        src = ((ci * pt + ti) * ph + yi) * pw + xi
                        dst = ((ti * ph + yi) * pw + xi) * c + ci
                        head.weight[dst, src] = sd
        head.bias.fill_(mu)
        # the blocks start as identities; their gates (driven by the time embedding) are non-zero, so the
        # zeroed output projections still get gradients
        for block in model.blocks:
            for proj in (block.self_attn.o, block.cross_attn.o, block.ffn[2]):
                proj.weight.zero_()


# -- noise levels --------------------------------------------------------------------------------

def chunk_sigmas(rng: np.random.Generator, sched_cache: dict) -> tuple[list[float], list[bool]]:
    """Per-chunk (σ, has_loss) for one training window; σ = 1 means pure noise, 0 clean."""
    prefix = 0
    u = rng.random()
    if u < 0.25:
        prefix = 1
    elif u < 0.30:
        prefix = 2
    sig, loss = [], []
    for _ in range(prefix):  # overlap prefix: clean latents with addnoise_condition = 20
        sig.append(PREFIX_SIGMA)
        loss.append(False)
    n_free = CHUNKS - prefix
    mode = rng.random()
    if prefix == 0 and mode < 0.3:
        # A video's very first steps: chunk 0 alone at high noise, the others not started. Here the shape has to
        # come from the words and positions alone; the inference schedule visits it only a few steps per video,
        # too rarely for a model trained for minutes to learn it.
        return [float(rng.uniform(0.8, 1.0))] + [1.0] * (CHUNKS - 1), [True] + [False] * (CHUNKS - 1)
    if mode < 0.65:  # the inference timestep matrix
        steps = 50 if rng.random() < 0.8 else int(rng.integers(10, 50))
        shift = float(rng.uniform(1.0, 9.0))
        key = (steps, round(shift, 2))
        if key not in sched_cache:
            sched_cache[key] = flow_sigmas(steps, round(shift, 2))[0]
        sigmas = sched_cache[key]
        ar = 5 if rng.random() < 0.6 else int(rng.integers(0, 11))
        c0 = int(rng.integers(1, steps + ar * (n_free - 1) + 1))
        for k in range(n_free):
            c = min(max(c0 - ar * k, 0), steps + 1)
            if c == 0:
                sig.append(1.0)
                loss.append(False)
            elif c == steps + 1:
                sig.append(0.0)
                loss.append(False)
            else:
                sig.append(float(sigmas[c - 1]))
                loss.append(True)
    else:  # free, sorted (non-decreasing along the chunks), shifted uniform
        shift = float(rng.uniform(1.0, 4.0))  # low noise levels too: they shape the final frames
        base = np.sort(rng.random(n_free))
        for b in base:
            sig.append(float(shift * b / (1 + (shift - 1) * b)))
            loss.append(True)
    if not any(loss):  # e.g. every chunk finished: train the last one anyway
        sig[-1] = float(rng.uniform(0.02, 1.0))
        loss[-1] = True
    return sig, loss


# -- batches -------------------------------------------------------------------------------------

def make_batch(rng: np.random.Generator, gen: torch.Generator, codec: DemoCodec, text: DemoTextEncoder, batch: int,
               sched_cache: dict, null_p: float = 0.1):
    specs = [sample_spec(rng) for _ in range(batch)]
    sig = torch.zeros(batch, CHUNKS)
    lmask = torch.zeros(batch, CHUNKS)
    starts = []
    for b in range(batch):
        s, l = chunk_sigmas(rng, sched_cache)
        sig[b], lmask[b] = torch.tensor(s), torch.tensor(l, dtype=torch.float32)
        # A window without a clean prefix is the video's first (inference starts every video at frame 0); one
        # with a prefix continues the video from anywhere, so the model reads the motion from the history.
        starts.append(int(rng.integers(1, 48)) if s[0] == PREFIX_SIGMA and not l[0] else 0)
    pixels = torch.stack([render(sp, st, WINDOW) for sp, st in zip(specs, starts)])
    x0 = codec.normalise(codec.encode_raw(pixels))  # [B, C, F, h, w]
    pos = demo_geometry().positions(*x0.shape[2:]).expand(batch, -1, -1, -1, -1)
    ids = [[] if rng.random() < null_p else text.ids(prompt_of(sp)) for sp in specs]
    sig_f = sig.repeat_interleave(CHUNK, dim=1)  # [B, F]
    eps = torch.randn(x0.shape, generator=gen)
    s5 = sig_f[:, None, :, None, None]
    xt = (1 - s5) * x0 + s5 * eps
    target = eps - x0
    t = sig_f * 1000.0
    t = torch.where(sig_f >= 1.0, torch.full_like(t, 999.0), t)
    return xt, t, ids, target, lmask.repeat_interleave(CHUNK, dim=1), pos


def fg_weight(xt: torch.Tensor, target: torch.Tensor, t: torch.Tensor, weight: float = 4.0) -> torch.Tensor:
    """Per latent pixel loss weight [B, 1, F, h, w]: ``weight`` where the shape is, 1 on the background.

    The shape covers a few percent of a frame, so under a plain MSE the model learns the background long before
    the shape. The clean latent, recovered from the training pair (x0 = x_t - sigma * v), marks the shape as
    what stands out from its frame's median. The targets are deterministic given the prompt and the history,
    so the weighting does not move the optimum, only how soon the model gets there."""
    sigma = (t / 1000.0)[:, None, :, None, None]
    x0 = xt - sigma * target
    med = x0.flatten(3).median(dim=3).values[..., None, None]
    fg = (x0 - med).abs().sum(dim=1, keepdim=True) > 0.5
    return 1.0 + (weight - 1.0) * fg.float()


def save_model(out: Path, model: WanDiT, text: DemoTextEncoder, codec: DemoCodec, facts: dict,
               presets: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * 4 for v in sd.values())
    if nbytes > 8 * 2**20:
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    meta = {
        "flowcache.num_heads": str(model.cfg.num_heads),
        "flowcache.text_len": str(TEXT_LEN),
        "flowcache.geometry": json.dumps(demo_geometry().__dict__),
        "flowcache.model_key": "demo",
        "flowcache.codec": codec.stats_json(),
        "flowcache.training": json.dumps(facts),
    }
    if presets:
        meta["flowcache.presets"] = presets
    path = save_safetensors(sd, out / DIT_FILE, meta)
    text.save(out / TEXT_FILE, {"flowcache.training": json.dumps(facts)})
    return path


def existing_presets(out: Path) -> str | None:
    """The presets stored in the model this run overwrites (a calibration is carried over), or None."""
    from safetensors import SafetensorError, safe_open

    p = out / DIT_FILE
    if not p.exists():
        return None
    try:
        with safe_open(str(p), framework="pt") as f:
            return (f.metadata() or {}).get("flowcache.presets")
    except (OSError, SafetensorError) as e:  # a truncated or foreign file: said, and overwritten without presets
        print(f"warning: {p} could not be read ({type(e).__name__}: {e}); its presets are not carried over",
              flush=True)
        return None


def load_previous(out: Path) -> tuple[dict, dict, dict, dict] | None:
    """(model state, text state, codec stats, training facts) of the model already in ``out``, for --resume."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = out / DIT_FILE
    if not p.exists() or not (out / TEXT_FILE).exists():
        return None
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    text_sd = load_file(str(out / TEXT_FILE))
    return (load_file(str(p)), {"token.weight": text_sd["token.weight"], "position": text_sd["position"]},
            json.loads(meta["flowcache.codec"]), json.loads(meta.get("flowcache.training", "{}")))


def train(steps: int, out: Path, seed: int = 0, batch: int = 8, lr: float = 1e-3, threads: int = 2,
          log_every: int = 20, save_every_min: float = 5.0, minutes: float = 45.0,
          resume: bool = False, amp: bool = True,
          full_attention_share: float = DEFAULT_FULL_ATTENTION_SHARE) -> dict:
    """Train for ``steps`` optimizer steps (stopping early, with a warning, past ``minutes`` of wall time)
    and write the EMA weights to ``out``; returns the training facts stored in the checkpoint.

    ``full_attention_share`` of the batches use full attention over the window (the vanilla path), the rest the
    block-causal mask (FlowCache's chunk path); the model has to serve both, and off is measured against it."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    # codec normalisation measured once on training data
    raw_codec = DemoCodec()
    stats_rng = np.random.default_rng(seed + 1)
    sample = torch.stack([render(s, int(stats_rng.integers(0, 48)), WINDOW)
                          for s in (sample_spec(stats_rng) for _ in range(96))])
    mean, std = DemoCodec.measure(raw_codec.encode_raw(sample))
    prev = load_previous(out) if resume else None
    if resume and prev is None:
        raise SystemExit(f"--resume: no {DIT_FILE} / {TEXT_FILE} in {out}")
    if prev is not None:  # keep the stats the saved model was trained with
        mean, std = prev[2]["mean"], prev[2]["std"]
        rng = np.random.default_rng(seed + 1000 * (1 + int(prev[3].get("runs", 1))))  # fresh data, still seeded
        gen = torch.Generator().manual_seed(seed + 1000 * (1 + int(prev[3].get("runs", 1))))
    codec = DemoCodec(mean, std)
    print(f"codec stats: mean {np.round(mean, 3).tolist()}\n             std {np.round(std, 3).tolist()}", flush=True)

    cfg = demo_config()
    model = WanDiT(cfg)
    init_wan_(model)
    text = DemoTextEncoder(VOCABULARY, TEXT_DIM, TEXT_LEN)
    if prev is not None:
        model.load_state_dict({k: v.float() for k, v in prev[0].items()})
        text.load_state_dict(prev[1])
        print(f"resuming from {out / DIT_FILE}: {json.dumps(prev[3])}", flush=True)
    previous = prev[3] if prev is not None else None
    ema_model = WanDiT(cfg)
    ema_model.load_state_dict(model.state_dict())
    ema_text = DemoTextEncoder(VOCABULARY, TEXT_DIM, TEXT_LEN)
    ema_text.load_state_dict(text.state_dict())
    for m in (ema_model, ema_text):
        m.requires_grad_(False).eval()
    params = list(model.parameters()) + list(text.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"WanDiT {cfg.dim}d x {cfg.num_layers} layers, {cfg.num_heads} heads: {n_params / 1e6:.2f} M params; "
          f"text {sum(p.numel() for p in text.parameters())} params; vocabulary {len(VOCABULARY)} words", flush=True)
    decay, no_decay = [], []
    for n, p in list(model.named_parameters()) + [("text." + n, p) for n, p in text.named_parameters()]:
        (no_decay if p.dim() < 2 or "modulation" in n or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    ema_pairs = list(zip(list(ema_model.parameters()) + list(ema_text.parameters()), params))

    budget = minutes * 60.0
    warm = 100
    sched_cache: dict = {}
    t_start = time.perf_counter()
    last_save = t_start
    step, smooth, hist = 0, None, []
    while True:
        elapsed = time.perf_counter() - t_start
        if step >= steps:
            break
        if elapsed >= budget:
            print(f"stopping at step {step} of {steps}: the {minutes}-minute cap is reached", flush=True)
            break
        frac = step / steps
        cur_lr = lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        xt, t, ids, target, lmask, pos = make_batch(rng, gen, codec, text, batch, sched_cache)
        block = CHUNK if rng.random() < 1.0 - full_attention_share else 0
        ctx = text.encode_ids(ids)
        model.train()
        # bf16 autocast: the matmuls and attention run on AMX/AVX512-bf16 where the CPU has it (~1.7x here);
        # weights, optimizer state and the loss stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            pred = model(xt, t, ctx, block_causal=block, y=pos).float()
        err = ((pred - target).pow(2) * fg_weight(xt, target, t)).mean(dim=(1, 3, 4))  # [B, F]
        loss = (err * lmask).sum() / lmask.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        step += 1
        d = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in ema_pairs:
                pe.lerp_(p.detach(), 1 - d)
        lv = float(loss.detach())
        smooth = lv if smooth is None else 0.97 * smooth + 0.03 * lv
        hist.append(lv)
        if step % log_every == 0 or step == 1:
            print(f"step {step:5d}  {elapsed / 60:6.2f} min  loss {lv:.4f}  smooth {smooth:.4f}  lr {cur_lr:.2e}  "
                  f"gnorm {gnorm:.2f}  mask {'block' if block else 'full'}", flush=True)
        if time.perf_counter() - last_save > save_every_min * 60:
            facts = _facts(seed, minutes, step, smooth, hist, t_start, batch, lr, n_params, False, previous, amp,
                           full_attention_share)
            save_model(out, ema_model, ema_text, codec, facts, existing_presets(out))
            last_save = time.perf_counter()
            print(f"saved checkpoint at step {step}", flush=True)
    facts = _facts(seed, minutes, step, smooth, hist, t_start, batch, lr, n_params, True, previous, amp,
                   full_attention_share)
    path = save_model(out, ema_model, ema_text, codec, facts, existing_presets(out))
    print(f"done: {json.dumps(facts)}\nwrote {path} and {out / TEXT_FILE}", flush=True)
    return facts


def _facts(seed, minutes, step, smooth, hist, t_start, batch, lr, n_params, final, previous=None, amp=True,
           full_attention_share=DEFAULT_FULL_ATTENTION_SHARE) -> dict:
    tail = hist[-200:] if hist else [float("nan")]
    mins = round((time.perf_counter() - t_start) / 60, 2)
    runs = [dict(r) for r in (previous or {}).get("history", [])]
    if previous and not runs:
        runs = [{k: previous.get(k) for k in ("minutes", "steps", "batch", "lr", "final_loss")}]
    runs.append({"minutes": mins, "steps": step, "batch": batch, "lr": lr, "final_loss": round(float(np.mean(tail)), 5)})
    return {"runs": len(runs), "history": runs, "total_minutes": round(sum(r["minutes"] or 0 for r in runs), 2),
            "total_steps": sum(r["steps"] or 0 for r in runs),
            "seed": seed, "minutes_budget": minutes, "minutes": round((time.perf_counter() - t_start) / 60, 2),
            "steps": step, "batch": batch, "window_frames": WINDOW, "chunk_frames": CHUNK, "lr": lr,
            "final_loss": round(float(np.mean(tail)), 5), "smoothed_loss": round(float(smooth or float("nan")), 5),
            "params": n_params, "threads": torch.get_num_threads(), "complete": final, "amp_bf16": amp,
            "full_attention_share": full_attention_share, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowcache.demo.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help=f"optimizer steps (default {DEFAULT_STEPS}, the shipped model)")
    ap.add_argument("--minutes", type=float, default=45.0, help="safety cap on wall time; stops early past it")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "assets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="train in fp32 (default: bf16 autocast)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the model already in --out (new optimizer state, facts accumulate)")
    ap.add_argument("--full-attention-share", type=float, default=DEFAULT_FULL_ATTENTION_SHARE,
                    help="share of batches trained with full attention over the window, the vanilla path (the rest "
                         f"block-causal, FlowCache's chunk path; default {DEFAULT_FULL_ATTENTION_SHARE})")
    a = ap.parse_args(argv)
    train(a.steps, a.out, a.seed, a.batch, a.lr, a.threads, minutes=a.minutes, resume=a.resume, amp=a.amp,
          full_attention_share=a.full_attention_share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
