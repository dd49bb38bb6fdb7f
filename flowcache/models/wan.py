"""Wan2.1 DiT as used by SkyReels-V2 diffusion forcing, Self-Forcing and CausVid.

Parameter names match the released checkpoints exactly (see ``WanDiT``). The forward is split into
``embed`` / ``time_embed`` / ``run_blocks`` / ``head_out`` so that a pipeline can run a whole window or one
chunk at a time against a KV context, and reuse a cached backbone residual between ``embed`` and ``head_out``.

Shapes: B batch, C latent channels, F latent frames, (h, w) patch grid, L = F·h·w tokens, D model dim.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from .common import ChunkAttention, attention


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


def wan_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint",
                               num_heads: int | None = None) -> WanConfig:
    """Infer a WanConfig from tensor shapes (bare keys). Real Wan models use 128-dim heads."""
    if "head.modulation" not in sd or "patch_embedding.weight" not in sd:
        raise CheckpointError(
            f"{source}: not a Wan2.1 / SkyReels-V2 DiT: keys 'head.modulation' and 'patch_embedding.weight' are missing.")
    if any(k.startswith("img_emb.") for k in sd):
        raise CheckpointError(f"{source}: a Wan image-to-video model (img_emb keys); only text-to-video and "
                              "diffusion-forcing Wan models are supported.")
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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class WanAttention(nn.Module):
    """Self- or cross-attention with q/k RMSNorm over the whole dim (before the head split)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def project(self, x: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q from x [B, L, D]; k, v from src [B, S, D]; each [B, len, H, Dh]."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.heads, -1))
        k = self.norm_k(self.k(src)).unflatten(-1, (self.heads, -1))
        v = self.v(src).unflatten(-1, (self.heads, -1))
        return q, k, v


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                layer: int, kv: ChunkAttention | None, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, D]; e0 [B, F, 6, D] fp32 per-frame modulation; ctx [B, S, D] embedded text."""
        b, n, d = x.shape
        f = e0.shape[1]
        m = (self.modulation.float()[:, None] + e0).unbind(2)  # 6 x [B, F, D]

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            h = F.layer_norm(h.float(), (d,), eps=self.eps).view(b, f, -1, d)
            return (h * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, n, d).to(x.dtype)

        def gate(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return (y.float().view(b, f, -1, d) * g[:, :, None]).view(b, n, d)

        h = modulate(x, m[0], m[1])
        q, k, v = self.self_attn.project(h, h)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = (attention(q, k, v, mask) if kv is None else kv.attend(layer, q, k, v)).transpose(1, 2).flatten(2)
        x = (x.float() + gate(self.self_attn.o(y), m[2])).to(x.dtype)

        q, k, v = (t.transpose(1, 2) for t in self.cross_attn.project(self.norm3(x), ctx))
        x = x + self.cross_attn.o(attention(q, k, v).transpose(1, 2).flatten(2))

        y = self.ffn(modulate(x, m[3], m[4]))
        return (x.float() + gate(y, m[5])).to(x.dtype)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], e [B, F, D] -> [B, L, prod(patch)·C]; uses e, not e0, as the reference does."""
        b, n, d = x.shape
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        h = F.layer_norm(x.float(), (d,), eps=self.eps).view(b, e.shape[1], -1, d)
        h = (h * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, n, d)
        return self.head(h.to(self.head.weight.dtype))


class WanDiT(nn.Module):
    """The Wan2.1 transformer with per-frame timesteps ([B, F]), optional fps embedding and KV contexts."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        if cfg.has_fps:
            self.fps_embedding = nn.Embedding(2, d)
            self.fps_projection = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 6 * d))
        self._rope_cache: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # -- pieces ---------------------------------------------------------------------------------
    def grid(self, x_shape: torch.Size) -> tuple[int, int, int]:
        pt, ph, pw = self.cfg.patch_size
        return x_shape[2] // pt, x_shape[3] // ph, x_shape[4] // pw

    def embed(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [B, C, F, H, W] (plus conditioning channels y [B, in_dim - C, F, H, W], concatenated as
        Wan's image-to-video input is) -> tokens [B, L, D], ordered (f, h, w)."""
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        return self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2)

    def time_embed(self, t: torch.Tensor, fps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timesteps t [B, F] -> e [B, F, D] (head) and e0 [B, F, 6, D] (blocks), both fp32."""
        b, f = t.shape
        s = sinusoidal_embedding(self.cfg.freq_dim, t.flatten()).to(self.dtype)
        e = self.time_embedding(s)
        e0 = self.time_projection(e).float().unflatten(1, (6, self.cfg.dim))
        if self.cfg.has_fps:
            idx = torch.tensor([0 if fps == 16 else 1], device=t.device)
            e0 = e0 + self.fps_projection(self.fps_embedding(idx)).float().unflatten(1, (6, self.cfg.dim))
        return e.float().view(b, f, -1), e0.view(b, f, 6, -1)

    def text_embed(self, context: torch.Tensor) -> torch.Tensor:
        """Text states [B, S, text_dim] (zero padded, no mask) -> [B, S, D]."""
        return self.text_embedding(context.to(self.dtype))

    def rope(self, grid: tuple[int, int, int], frame_offset: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, frame_offset, self.device)
        if key not in self._rope_cache:
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_angles(self.cfg.head_dim, grid, frame_offset, self.device)
        return self._rope_cache[key]

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor, grid: tuple[int, int, int],
                   frame_offset: int | tuple[int, ...] = 0, kv: ChunkAttention | None = None,
                   mask: torch.Tensor | None = None, between: Callable[[], None] | None = None) -> torch.Tensor:
        """All transformer blocks on tokens x [B, L, D]; RoPE frames start at ``frame_offset`` (a tuple: the
        first frames of equal chunks laid end to end, see ``rope_angles``). With ``kv`` the self-attention is
        the context's (chunk by chunk against stored K/V), otherwise plain attention under ``mask``.
        ``between`` runs after every block: a cancel point inside long forwards (it raises to stop)."""
        rope = self.rope(grid, frame_offset)
        for i, block in enumerate(self.blocks):
            x = block(x, e0, ctx, rope, i, kv, mask)
            if between is not None:
                between()
        return x

    def head_out(self, x: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Tokens [B, L, D] -> prediction [B, C, F, H, W] (fp32)."""
        out = self.head(x, e).float()
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        out = out.view(out.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(out.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)

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
        mask = block_causal_mask(grid, block_causal, x.device) if block_causal else None
        h = self.run_blocks(self.embed(x, y), e0, self.text_embed(context), grid, 0, None, mask)
        return self.head_out(h, e, grid)


def block_causal_mask(grid: tuple[int, int, int], block: int, device: torch.device) -> torch.Tensor:
    """Boolean [L, L]: a token of frame i may attend frame j when j // block <= i // block."""
    f, h, w = grid
    blk = torch.arange(f, device=device).repeat_interleave(h * w) // block
    return blk[:, None] >= blk[None, :]


def build_wan(sd: dict[str, torch.Tensor], dtype: torch.dtype, source: str = "checkpoint",
              num_heads: int | None = None) -> WanDiT:
    """A WanDiT with the given bare-key weights, cast to ``dtype`` (fp8 storage is upcast here)."""
    cfg = wan_config_from_state_dict(sd, source, num_heads)
    with torch.device("meta"):
        model = WanDiT(cfg)
    check_wan_keys(sd, model, source)
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    return model.to(dtype).eval().requires_grad_(False)
