"""Wan2.1 DiT as used by SkyReels-V2 diffusion forcing, Self-Forcing and CausVid.

Parameter names match the released checkpoints exactly (see ``WanDiT``). The forward
(``WanForward``) is split into ``embed`` / ``time_embed`` / ``run_blocks`` / ``head_out`` so that a pipeline
can run a whole window or one chunk at a time against a KV context, and reuse a cached backbone residual
between ``embed`` and ``head_out``. It runs any module tree with Wan's layer names by calling the layers by
name: the pack's own ``WanDiT``, or another program's tree (``WanTreeModel``: a ComfyUI MODEL's diffusion
model, whose layers cast, dequantize or add LoRA weights as they run).

Shapes: B batch, C latent channels, F latent frames, (h, w) patch grid, L = F·h·w tokens, D model dim.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, InputError
from .common import (FP8_DTYPES, TORCH_OPERATIONS, ChunkAttention, Operations, TorchLayers, attention,
                     held)


WAN_SIZES = {1536: "1.3B", 5120: "14B"}  # model dim -> released size name


@dataclass
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    has_fps: bool = False  # SkyReels-V2-DF-1.3B's fps embedding (inject_sample_info)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def size_name(self) -> str:
        """The released size this config matches ('1.3B', '14B'), used to pick presets."""
        return WAN_SIZES.get(self.dim, f"dim{self.dim}")

    def to_dict(self) -> dict:
        return asdict(self)


WAN_ANCHORS = ("head.modulation", "patch_embedding.weight", "blocks.0.self_attn.q.weight")
WAN_T2V_EXPECTED = ("FlowCache runs text-to-video and diffusion-forcing Wan models (SkyReels-V2 DF, Wan2.1 T2V, "
                    "Self-Forcing / CausVid)")


def wan_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint",
                               num_heads: int | None = None) -> WanConfig:
    """Infer a WanConfig from tensor shapes (bare keys). Real Wan models use 128-dim heads."""
    if "head.modulation" not in sd or "patch_embedding.weight" not in sd:
        raise CheckpointError(
            f"{source}: not a Wan2.1 / SkyReels-V2 DiT: keys 'head.modulation' and 'patch_embedding.weight' are missing.")
    if any(k.startswith("img_emb.") for k in sd):
        raise CheckpointError(f"{source}: a Wan image-to-video model (it has img_emb keys); {WAN_T2V_EXPECTED}.")
    dim = sd["head.modulation"].shape[-1]
    pe = sd["patch_embedding.weight"]
    layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if layers == 0:
        raise CheckpointError(f"{source}: Wan checkpoint has no transformer blocks.")
    patch = tuple(int(s) for s in pe.shape[2:])
    heads = num_heads or max(1, dim // 128)
    return WanConfig(
        dim=dim, ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_heads=heads, num_layers=layers,
        in_dim=pe.shape[1], out_dim=sd["head.head.weight"].shape[0] // math.prod(patch), patch_size=patch,
        text_dim=sd["text_embedding.0.weight"].shape[1], freq_dim=sd["time_embedding.0.weight"].shape[1],
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd, cross_attn_norm="blocks.0.norm3.weight" in sd,
        has_fps="fps_embedding.weight" in sd)


def check_wan_keys(sd: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Explain missing or unexpected keys before load_state_dict fails with a wall of names."""
    want = set(model.state_dict().keys())
    have = set(sd.keys())
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})")
        raise CheckpointError(f"{source}: keys do not match a Wan2.1 DiT of the inferred shape: {'; '.join(parts)}. "
                              "The file may be incomplete or from a different model.")
    for k, t in model.state_dict().items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}.")


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[N] timesteps (0..1000) -> [N, dim], cos first, computed in float64 as the reference does."""
    half = dim // 2
    dtype = torch.float64 if t.device.type != "mps" else torch.float32
    freqs = torch.pow(10000, -torch.arange(half, device=t.device, dtype=dtype) / half)
    ang = torch.outer(t.to(dtype), freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def rope_angles(head_dim: int, grid: tuple[int, int, int], frame_offset: int | tuple[int, ...],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim/2] for a (f, h, w) patch grid whose frames start at the absolute ``frame_offset``.

    A tuple of offsets describes several equal chunks laid end to end (f/n frames each, chunk i starting at
    frame offsets[i]): the tokens of a batched forward over chunks that need not be neighbours.
    The head dim is split (d - 4·(d//6), 2·(d//6), 2·(d//6)) over time, height and width, theta 10000.
    """
    d = head_dim
    parts = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    f, h, w = grid
    offsets = (frame_offset,) if isinstance(frame_offset, int) else tuple(frame_offset)
    per_chunk = f // len(offsets)
    frames = torch.cat([torch.arange(o, o + per_chunk) for o in offsets])
    axes = []
    for n, pos in zip(parts, (frames, torch.arange(h), torch.arange(w))):
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, n, 2, dtype=torch.float64) / n)
        axes.append(torch.outer(pos.to(torch.float64), inv))
    ang = torch.cat([
        axes[0][:, None, None, :].expand(f, h, w, -1),
        axes[1][None, :, None, :].expand(f, h, w, -1),
        axes[2][None, None, :, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, d // 2)
    return torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, L, H, D] by the angles [L, D/2] (complex multiply, in fp32)."""
    xp = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the whole dim: normalised in fp32, rounded to x's dtype, then scaled (the reference's
    order). Constructor arguments as torch's ``nn.RMSNorm``, so a layer namespace can hold either."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


TorchLayers.RMSNorm = RMSNorm  # the default layer namespace builds Wan's reference RMSNorm


# -- the module tree: Wan's released layer names, built from a layer namespace ---------------------------------

class WanAttention(nn.Module):
    """Self- or cross-attention layers: q, k, v, o and the q/k RMSNorm over the whole dim (before the head split)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, eps: float, ops: type = TorchLayers):
        super().__init__()
        self.heads = self.num_heads = heads
        self.q, self.k, self.v, self.o = (ops.Linear(dim, dim) for _ in range(4))
        self.norm_q = ops.RMSNorm(dim, eps=eps, elementwise_affine=True) if qk_norm else nn.Identity()
        self.norm_k = ops.RMSNorm(dim, eps=eps, elementwise_affine=True) if qk_norm else nn.Identity()


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig, ops: type = TorchLayers):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps, ops)
        self.norm3 = (ops.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm
                      else nn.Identity())
        self.cross_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps, ops)
        self.ffn = nn.Sequential(ops.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 ops.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig, ops: type = TorchLayers):
        super().__init__()
        self.eps = cfg.eps
        self.head = ops.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))


# Submodules every Wan2.1 text-to-video tree has, by name (a block's own are checked on block 0).
WAN_TREE_NAMES = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head.head")
WAN_BLOCK_NAMES = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "norm3", "cross_attn.q",
                   "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn")


class WanForward:
    """The Wan2.1 forward, in pieces, over any module tree with Wan's layer names.

    It calls the tree's layers by name (``blocks[i].self_attn.q(x)``, ``blocks[i].ffn(x)``, ...), so whatever
    those layers do at call time applies: casting weights held in fp8 or on another device, dequantizing,
    adding a LoRA. Raw parameters no layer owns (``blocks[i].modulation``, ``head.modulation``) are converted
    to fp32 on the compute device at use (``held``). The math is Wan's reference (see ``WanDiT``): per-frame
    timesteps, fp32 modulation and gates, RoPE in fp32, bf16-or-whatever compute dtype elsewhere.

    Subclasses provide ``cfg``, ``tree``, ``fps_layers`` (the module holding ``fps_embedding`` /
    ``fps_projection``, or None), ``dtype`` (the compute dtype) and ``device`` (the compute device). The object
    keeps no run state: ``WanDiT`` is the pack's own tree; ``WanTreeModel`` wraps any other one.
    """

    cfg: WanConfig

    @property
    def tree(self) -> nn.Module:
        raise NotImplementedError

    @property
    def fps_layers(self) -> nn.Module | None:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    # -- pieces ---------------------------------------------------------------------------------
    def grid(self, x_shape: torch.Size) -> tuple[int, int, int]:
        pt, ph, pw = self.cfg.patch_size
        return x_shape[2] // pt, x_shape[3] // ph, x_shape[4] // pw

    def _patch_dtype(self) -> torch.dtype:
        """The patch embedding's input dtype: fp32 when its weight is fp32 (ComfyUI keeps this one layer in
        fp32 whatever the rest is, and feeds it fp32), else the compute dtype (the weight is in it, or the
        layer casts)."""
        w = getattr(self.tree.patch_embedding, "weight", None)
        return torch.float32 if isinstance(w, torch.Tensor) and w.dtype == torch.float32 else self.dtype

    def embed(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [B, C, F, H, W] (plus conditioning channels y [B, in_dim - C, F, H, W], concatenated as
        Wan's image-to-video input is) -> tokens [B, L, D], ordered (f, h, w)."""
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        out = self.tree.patch_embedding(x.to(device=self.device, dtype=self._patch_dtype()))
        return out.flatten(2).transpose(1, 2).to(self.dtype)

    def time_embed(self, t: torch.Tensor, fps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timesteps t [B, F] -> e [B, F, D] (head) and e0 [B, F, 6, D] (blocks), both fp32."""
        b, f = t.shape
        tree = self.tree
        s = sinusoidal_embedding(self.cfg.freq_dim, t.flatten()).to(self.dtype)
        e = tree.time_embedding(s)
        e0 = tree.time_projection(e).float().unflatten(1, (6, self.cfg.dim))
        fl = self.fps_layers
        if fl is not None:
            idx = torch.tensor([0 if fps == 16 else 1], device=t.device)
            emb = fl.fps_embedding(idx).to(self.dtype)
            e0 = e0 + fl.fps_projection(emb).float().unflatten(1, (6, self.cfg.dim))
        return e.float().view(b, f, -1), e0.view(b, f, 6, -1)

    def text_embed(self, context: torch.Tensor) -> torch.Tensor:
        """Text states [B, S, text_dim] (zero padded, no mask) -> [B, S, D]."""
        return self.tree.text_embedding(context.to(device=self.device, dtype=self.dtype))

    def rope(self, grid: tuple[int, int, int], frame_offset: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables cos, sin [L, head_dim/2] of a patch grid (see ``rope_angles``), on the compute device."""
        return rope_angles(self.cfg.head_dim, grid, frame_offset, self.device)

    @staticmethod
    def _project(attn: nn.Module, heads: int, x: torch.Tensor, src: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q from x [B, L, D]; k, v from src [B, S, D]; each [B, len, H, Dh]."""
        q = attn.norm_q(attn.q(x)).unflatten(-1, (heads, -1))
        k = attn.norm_k(attn.k(src)).unflatten(-1, (heads, -1))
        v = attn.v(src).unflatten(-1, (heads, -1))
        return q, k, v

    def _block(self, blk: nn.Module, x: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], layer: int, kv: ChunkAttention | None,
               mask: torch.Tensor | None, text_kv: dict | None = None) -> torch.Tensor:
        """One block: x [B, L, D]; e0 [B, F, 6, D] fp32 per-frame modulation; ctx [B, S, D] embedded text.
        ``text_kv``: layer -> the cross-attention's (k, v) [B, H, S, Dh] of this ``ctx``, filled on first use."""
        b, n, d = x.shape
        f = e0.shape[1]
        heads, eps = self.cfg.num_heads, self.cfg.eps
        m = (held(blk.modulation, e0.device)[:, None] + e0).unbind(2)  # 6 x [B, F, D]

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            h = F.layer_norm(h.float(), (d,), eps=eps).view(b, f, -1, d)
            return (h * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, n, d).to(x.dtype)

        def gate(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return (y.float().view(b, f, -1, d) * g[:, :, None]).view(b, n, d)

        h = modulate(x, m[0], m[1])
        q, k, v = self._project(blk.self_attn, heads, h, h)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = (attention(q, k, v, mask) if kv is None else kv.attend(layer, q, k, v)).transpose(1, 2).flatten(2)
        x = (x.float() + gate(blk.self_attn.o(y), m[2])).to(x.dtype)

        ca = blk.cross_attn
        if text_kv is not None and layer in text_kv:  # the text's keys/values do not change within a run
            q = ca.norm_q(ca.q(blk.norm3(x))).unflatten(-1, (heads, -1)).transpose(1, 2)
            k, v = text_kv[layer]
        else:
            q, k, v = (t.transpose(1, 2) for t in self._project(ca, heads, blk.norm3(x), ctx))
            if text_kv is not None:
                text_kv[layer] = (k, v)
        x = x + ca.o(attention(q, k, v).transpose(1, 2).flatten(2))

        y = blk.ffn(modulate(x, m[3], m[4]))
        return (x.float() + gate(y, m[5])).to(x.dtype)

    def _lean_block(self, blk: nn.Module, x: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor,
                    rope: tuple[torch.Tensor, torch.Tensor], layer: int, kv: ChunkAttention | None,
                    mask: torch.Tensor | None, text_kv: dict | None, slice_tokens: int) -> torch.Tensor:
        """``_block``'s arithmetic with its token-wise stages one batch row and at most ``slice_tokens`` tokens
        (whole frames) at a time; only q, k, v and the attention output exist for every row at once."""
        b, n, d = x.shape
        f = e0.shape[1]
        heads, eps, per = self.cfg.num_heads, self.cfg.eps, n // f
        step = max(1, slice_tokens // per)
        pieces = [(r, slice(a, min(f, a + step))) for r in range(b) for a in range(0, f, step)]
        m = (held(blk.modulation, e0.device)[:, None] + e0).unbind(2)  # 6 x [B, F, D]

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            nf = shift.shape[1]
            h = F.layer_norm(h.float(), (d,), eps=eps).view(1, nf, -1, d)
            return (h * (1 + scale[:, :, None]) + shift[:, :, None]).view(1, -1, d).to(x.dtype)

        def gate(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return (y.float().view(1, g.shape[1], -1, d) * g[:, :, None]).view(1, -1, d)

        q, k, v = (x.new_empty(b, heads, n, d // heads) for _ in range(3))
        for r, fr in pieces:
            tok = slice(fr.start * per, fr.stop * per)
            rows = slice(r, r + 1)
            h = modulate(x[rows, tok], m[0][rows, fr], m[1][rows, fr])
            qp, kp, vp = self._project(blk.self_attn, heads, h, h)
            cos, sin = rope[0][tok], rope[1][tok]
            q[rows, :, tok] = apply_rope(qp, cos, sin).transpose(1, 2)
            k[rows, :, tok] = apply_rope(kp, cos, sin).transpose(1, 2)
            v[rows, :, tok] = vp.transpose(1, 2)
            del h, qp, kp, vp
        y = attention(q, k, v, mask) if kv is None else kv.attend(layer, q, k, v)  # [B, H, L, Dh]
        del q, k, v
        ca = blk.cross_attn
        if text_kv is not None and layer in text_kv:
            tk, tv = text_kv[layer]
        else:
            tk = ca.norm_k(ca.k(ctx)).unflatten(-1, (heads, -1)).transpose(1, 2)
            tv = ca.v(ctx).unflatten(-1, (heads, -1)).transpose(1, 2)
            if text_kv is not None:
                text_kv[layer] = (tk, tv)
        out = torch.empty_like(x)
        for r, fr in pieces:
            tok = slice(fr.start * per, fr.stop * per)
            rows = slice(r, r + 1)
            xp = x[rows, tok]
            yp = y[rows, :, tok].transpose(1, 2).flatten(2)
            xp = (xp.float() + gate(blk.self_attn.o(yp), m[2][rows, fr])).to(x.dtype)
            qx = ca.norm_q(ca.q(blk.norm3(xp))).unflatten(-1, (heads, -1)).transpose(1, 2)
            xp = xp + ca.o(attention(qx, tk[rows], tv[rows]).transpose(1, 2).flatten(2))
            yp = blk.ffn(modulate(xp, m[3][rows, fr], m[4][rows, fr]))
            out[rows, tok] = (xp.float() + gate(yp, m[5][rows, fr])).to(x.dtype)
        return out

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor, grid: tuple[int, int, int],
                   frame_offset: int | tuple[int, ...] = 0, kv: ChunkAttention | None = None,
                   mask: torch.Tensor | None = None, between: Callable[[], None] | None = None,
                   text_kv: dict | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                   slice_tokens: int = 0) -> torch.Tensor:
        """All transformer blocks on tokens x [B, L, D]; RoPE frames start at ``frame_offset`` (a tuple: the
        first frames of equal chunks laid end to end, see ``rope_angles``), or the tables ``rope`` given. With
        ``kv`` the self-attention is the context's (chunk by chunk against stored K/V), otherwise plain
        attention under ``mask``. ``between`` runs after every block: a cancel point inside long forwards (it
        raises to stop). ``text_kv``: a dict kept by the caller for this ``ctx``: the cross-attention
        keys/values are computed on the first call and reused after (as the causal Wan models' own loop does).
        ``slice_tokens`` > 0: every block runs its token-wise stages one batch row (CFG branch) at a time and in
        slices of at most that many tokens (whole frames), which lowers the peak; equal within float rounding."""
        rope = self.rope(grid, frame_offset) if rope is None else rope
        for i, block in enumerate(self.tree.blocks):
            if slice_tokens > 0:
                x = self._lean_block(block, x, e0, ctx, rope, i, kv, mask, text_kv, slice_tokens)
            else:
                x = self._block(block, x, e0, ctx, rope, i, kv, mask, text_kv)
            if between is not None:
                between()
        return x

    def head_out(self, x: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int],
                 slice_tokens: int = 0) -> torch.Tensor:
        """Tokens [B, L, D] and e [B, F, D] -> prediction [B, C, F, H, W] (fp32); the head uses e, not e0,
        as the reference does. ``slice_tokens`` > 0: one batch row and at most that many tokens (whole frames)
        at a time, as ``run_blocks`` does."""
        head = self.tree.head
        b, n, d = x.shape
        shift, scale = (held(head.modulation, e.device)[:, None] + e[:, :, None]).unbind(2)

        def tokens_out(xs: torch.Tensor, sh: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
            h = F.layer_norm(xs.float(), (d,), eps=self.cfg.eps).view(xs.shape[0], sh.shape[1], -1, d)
            h = (h * (1 + sc[:, :, None]) + sh[:, :, None]).view(xs.shape[0], xs.shape[1], d)
            return head.head(h.to(self.dtype)).float()

        if slice_tokens > 0:
            f = e.shape[1]
            per = n // f
            step = max(1, slice_tokens // per)
            out = x.new_empty((b, n, math.prod(self.cfg.patch_size) * self.cfg.out_dim), dtype=torch.float32)
            for r in range(b):
                for a in range(0, f, step):
                    fr, tok = slice(a, min(f, a + step)), slice(a * per, min(f, a + step) * per)
                    out[r:r + 1, tok] = tokens_out(x[r:r + 1, tok], shift[r:r + 1, fr], scale[r:r + 1, fr])
        else:
            out = tokens_out(x, shift, scale)
        f, hh, w = grid
        pt, ph, pw = self.cfg.patch_size
        out = out.view(out.shape[0], f, hh, w, pt, ph, pw, self.cfg.out_dim)
        return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(out.shape[0], self.cfg.out_dim, f * pt, hh * ph, w * pw)

    # -- whole window ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, fps: float | None = None,
                block_causal: int = 0, y: torch.Tensor | None = None) -> torch.Tensor:
        """The plain window forward: x [B, C, F, H, W], t [B, F] or [B], context [B, S, text_dim], optional
        conditioning channels y (see ``embed``).

        ``block_causal`` > 0 lets a frame attend only to frame blocks of that size at or before its own.
        Returns the flow (velocity) prediction [B, C, F, H, W] in fp32.
        """
        if t.dim() == 1:
            t = t[:, None].expand(-1, x.shape[2])
        grid = self.grid(x.shape)
        e, e0 = self.time_embed(t, fps)
        mask = block_causal_mask(grid, block_causal, self.device) if block_causal else None
        h = self.run_blocks(self.embed(x, y), e0, self.text_embed(context), grid, 0, None, mask)
        return self.head_out(h, e, grid)


class WanDiT(WanForward, nn.Module):
    """The Wan2.1 transformer with per-frame timesteps ([B, F]), optional fps embedding and KV contexts: the
    pack's own module tree (parameter names match the released checkpoints), run by ``WanForward``.

    ops: the layer namespace the tree is built from (torch's by default; a host's casting layers inside
    ComfyUI, see ``flowcache.models.common.Operations``). ``compute_device`` (None: where the patch embedding
    is) is where a forward runs when a host keeps some weights elsewhere (partial loading).
    """

    def __init__(self, cfg: WanConfig, ops: type = TorchLayers):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = ops.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(ops.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), ops.Linear(d, d))
        self.time_embedding = nn.Sequential(ops.Linear(cfg.freq_dim, d), nn.SiLU(), ops.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg, ops) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg, ops)
        if cfg.has_fps:
            self.fps_embedding = ops.Embedding(2, d)
            self.fps_projection = nn.Sequential(ops.Linear(d, d), nn.SiLU(), ops.Linear(d, 6 * d))
        self.compute_device: torch.device | None = None

    @property
    def tree(self) -> nn.Module:
        return self

    @property
    def fps_layers(self) -> nn.Module | None:
        return self if self.cfg.has_fps else None

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.compute_device if self.compute_device is not None else self.patch_embedding.weight.device

    forward = WanForward.forward  # nn.Module defines forward too: the window forward is Wan's


class WanTreeModel(WanForward):
    """``WanForward`` over a module tree that is not the pack's: e.g. the diffusion model of a ComfyUI MODEL.

    The tree is only read and called, never changed.
    dtype / device: the compute dtype and device (the host's, which may differ from where weights are held).
    fps_layers: SkyReels' fps embedding when the tree has none (restored from the checkpoint file), or None.
    """

    def __init__(self, tree: nn.Module, cfg: WanConfig, dtype: torch.dtype, device: torch.device | str,
                 fps_layers: nn.Module | None = None, source: str = "model"):
        check_wan_tree(tree, source)
        self._tree, self._fps = tree, fps_layers
        self.cfg = replace(cfg, has_fps=fps_layers is not None)
        self._dtype, self._device = dtype, torch.device(device)

    @property
    def tree(self) -> nn.Module:
        return self._tree

    @property
    def fps_layers(self) -> nn.Module | None:
        return self._fps

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.forward(*args, **kwargs)


def check_wan_tree(tree: nn.Module, source: str = "model") -> None:
    """InputError unless ``tree`` has Wan2.1 text-to-video's layers by name (and nothing of image-to-video)."""
    missing = []
    for name in WAN_TREE_NAMES + ("head.modulation",):
        try:
            _get(tree, name)
        except AttributeError:
            missing.append(name)
    blocks = getattr(tree, "blocks", None)
    if not missing and (not isinstance(blocks, nn.ModuleList) or len(blocks) == 0):
        missing.append("blocks.0")
    if not missing:
        for name in WAN_BLOCK_NAMES + ("modulation",):
            try:
                _get(blocks[0], name)
            except AttributeError:
                missing.append(f"blocks.0.{name}")
    if missing:
        raise InputError(f"{source}: expected a Wan2.1-architecture model (SkyReels-V2 DF, Wan2.1 text-to-video); "
                         f"this {type(tree).__name__} has no {', '.join(missing[:3])}.")
    if getattr(tree, "img_emb", None) is not None:
        raise InputError(f"{source}: a Wan image-to-video model (it has img_emb); {WAN_T2V_EXPECTED}.")


def _get(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)  # a quantized tensor subclass reports its logical shape here


def wan_config_from_tree(tree: nn.Module, source: str = "model", num_heads: int | None = None) -> WanConfig:
    """A WanConfig read off a module tree's weight shapes (as ``wan_config_from_state_dict`` reads a file)."""
    check_wan_tree(tree, source)
    dim = _shape(tree.head.modulation)[-1]
    pe = _shape(tree.patch_embedding.weight)
    patch = pe[2:]
    blk = tree.blocks[0]
    attn = blk.self_attn
    heads = num_heads or getattr(attn, "num_heads", None) or getattr(attn, "heads", None) or max(1, dim // 128)
    return WanConfig(
        dim=dim, ffn_dim=_shape(blk.ffn[0].weight)[0], num_heads=int(heads), num_layers=len(tree.blocks),
        in_dim=pe[1], out_dim=_shape(tree.head.head.weight)[0] // math.prod(patch), patch_size=patch,
        text_dim=_shape(tree.text_embedding[0].weight)[1], freq_dim=_shape(tree.time_embedding[0].weight)[1],
        qk_norm=getattr(attn.norm_q, "weight", None) is not None,
        cross_attn_norm=getattr(blk.norm3, "weight", None) is not None, has_fps=False)


def block_causal_mask(grid: tuple[int, int, int], block: int, device: torch.device) -> torch.Tensor:
    """Boolean [L, L]: a token of frame i may attend frame j when j // block <= i // block."""
    f, h, w = grid
    blk = torch.arange(f, device=device).repeat_interleave(h * w) // block
    return blk[:, None] >= blk[None, :]


def build_wan(sd: dict[str, torch.Tensor], dtype: torch.dtype, source: str = "checkpoint",
              num_heads: int | None = None, operations: Operations = TORCH_OPERATIONS) -> WanDiT:
    """A WanDiT with the given bare-key weights, computing in ``dtype``.

    Its layers come from ``operations``. With torch's (the default) every weight is converted to ``dtype``,
    fp8 storage included. With casting layers (``operations.casts``: ComfyUI's inside ComfyUI) the linear
    layers' fp8 weights stay fp8 and are upcast layer by layer at each call; everything else is ``dtype``.
    """
    cfg = wan_config_from_state_dict(sd, source, num_heads)
    fp8 = next((v.dtype for k, v in sd.items() if v.dtype in FP8_DTYPES and k.endswith(".weight")), None)
    hold = fp8 if (fp8 is not None and operations.casts) else dtype
    with torch.device("meta"):
        model = WanDiT(cfg, operations.layers(hold, dtype))
    check_wan_keys(sd, model, source)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    model.load_state_dict({k: v if (k in linears and v.dtype == hold) else v.to(dtype) for k, v in sd.items()},
                          strict=True, assign=True)
    return model.eval().requires_grad_(False)


# -- SkyReels' fps embedding, for a tree without it ---------------------------------------------------------------

FPS_SHAPES = {"fps_embedding.weight": lambda d: (2, d), "fps_projection.0.weight": lambda d: (d, d),
              "fps_projection.0.bias": lambda d: (d,), "fps_projection.2.weight": lambda d: (6 * d, d),
              "fps_projection.2.bias": lambda d: (6 * d,)}


class FpsLayers(nn.Module):
    """SkyReels-V2-DF's fps embedding on its own: ``fps_embedding`` and ``fps_projection`` (the names and math of
    ``WanDiT``'s), for a tree that has no such layers (ComfyUI's Wan model drops them when it loads the file)."""

    def __init__(self, dim: int, ops: type = TorchLayers):
        super().__init__()
        self.fps_embedding = ops.Embedding(2, dim)
        self.fps_projection = nn.Sequential(ops.Linear(dim, dim), nn.SiLU(), ops.Linear(dim, 6 * dim))


def fps_layers_from_tensors(tensors: dict[str, torch.Tensor], dim: int, dtype: torch.dtype,
                            device: torch.device | str, source: str = "checkpoint") -> FpsLayers | None:
    """The fps layers from a checkpoint's ``fps_*`` tensors (bare names), or None when it has none.

    Raises CheckpointError when they are there but incomplete or of another model's width."""
    found = {k: v for k, v in tensors.items() if k in FPS_SHAPES}
    if not found:
        return None
    bad = [f"{k} {tuple(found[k].shape) if k in found else 'missing'} (expected {shape(dim)})"
           for k, shape in FPS_SHAPES.items() if k not in found or tuple(found[k].shape) != shape(dim)]
    if bad:
        raise CheckpointError(f"{source}: the fps embedding does not fit this model (width {dim}): {', '.join(bad[:3])}.")
    with torch.device("meta"):
        layers = FpsLayers(dim)
    layers.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in found.items()}, strict=True, assign=True)
    return layers.eval().requires_grad_(False)
