"""MAGI-1's transformer VAE ("ViTVAE"): released key names, config from shapes, tiled encode/decode.

Facts (MAGI-1 ``inference/model/vae/vae_module.py``, ``vae_model.py``, ``inference/pipeline/video_process.py``,
``inference/infra/parallelism/tile_parallel.py``; see the project reference, section 3):

* 8x spatial, 4x temporal compression, 16 latent channels (the encoder emits 32 = mean | logvar; the pipeline
  takes the posterior *mode*, i.e. the mean, so encoding is deterministic).
* Encoder: Conv3d patch embed (k = s = (4, 8, 8)), CLS token, learned positional table for a 4x32x32 grid that is
  trilinearly resized for other grids, 24 blocks, LayerNorm, Linear to 32. Decoder: Linear 16 -> 1024, CLS,
  positional table, 24 blocks, LayerNorm, unpatchify to 4 channels per pixel, Conv3d(4 -> 3, k = 3, pad = 1).
* Block (``ln_in_attn=True``): no LayerNorm before attention; q, k and v are each normalised per head over the
  head dim without affine, ``(x - mean) / (std + 1e-5)`` with the biased std; full bidirectional attention with
  the usual 1/sqrt(head_dim) scale; then ``x + mlp(norm2(x))`` with a GELU MLP.
* Video length: T frames give T // 4 latent frames; a single frame (T = 1) is repeated to 4 frames and the
  first latent frame kept. Decoding one latent frame keeps the first of the 4 decoded frames.
* Pixels: the pipeline maps uint8 with ``x / 127.5 - 1`` and back with ``x * 127.5 + 127.5``; here pixels are
  floats 0..1 (``2x - 1`` and ``(x + 1) / 2``, the same map).
* DiT latent space: ``latent = mode * 0.18215`` (``runtime_config.scale_factor`` in every released config) and
  ``decode(latent / 0.18215)``. ``MagiVAECodec`` applies this; ``MagiVAE`` works on raw VAE latents.
* Tiling as the pipeline calls it: spatial tiles of 256x256 px (32x32 latents) with 25 % overlap, so tiles start
  every 192 px (24 latents), neighbours blended linearly over 64 px (8 latents when encoding); temporal tiles of
  ``fps // 2`` = 12 frames (3 latent frames) at 24 fps, no temporal overlap and no temporal blending. Each tile
  is run on its own (its positional table is resized to the tile's grid), then cropped to its 192 px step.
  Because MAGI's chunks are 6 latent frames, decoding a whole latent video with 3-frame temporal tiles gives the
  same frames as the pipeline's decode of each chunk on its own.

The tiler reproduces the reference's arithmetic, including its encoder blending with already-blended
neighbours and its decoder blending with the neighbours as decoded; a short last tile is blended over its own
length (as the reference's ``min(..)`` does). The reference runs the VAE in bf16 on the GPU; here the dtype is
the caller's (fp32 on CPU by default).

Never imports ComfyUI.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError, InputError

MAGI_VAE_SCALE_FACTOR = 0.18215
ANCHOR = "encoder.patch_embed.proj.weight"

# Tiling as MAGI's pipeline calls it (VaeHelper.encode / decode via encode_prefix_video / decode_chunk).
TILE_PX = 256
TILE_OVERLAP = 0.25
DEFAULT_FPS = 24


@dataclass
class MagiVAEConfig:
    embed_dim: int = 1024
    enc_depth: int = 24
    dec_depth: int = 24
    num_heads: int = 16
    mlp_hidden: int = 4096
    patch_size: int = 8          # spatial compression
    patch_length: int = 4        # temporal compression
    in_chans: int = 3
    z_chans: int = 16
    double_z: bool = True
    ref_latent_length: int = 4   # positional-table grid: video_length 16 / patch_length 4
    ref_latent_size: int = 32    # video_size 256 / patch_size 8
    with_cls_token: bool = True
    ln_in_attn: bool = True      # per-head q/k/v normalisation, no pre-attention LayerNorm
    qkv_bias: bool = True
    use_final_proj: bool = False
    unpatch_channels: int = 4
    eps: float = 1e-5

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- modules
def _qkv_normalise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MAGI's ManualLayerNorm: (x - mean) / (biased std + eps) over the last dim, no affine."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


class _Attention(nn.Module):
    def __init__(self, cfg: MagiVAEConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.ln_in_attn = cfg.ln_in_attn
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads)
        if self.ln_in_attn:
            qkv = _qkv_normalise(qkv)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        # the VAE's own attention stays on SDPA: attention_backend routes the DiT's attention only
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: MagiVAEConfig):
        super().__init__()
        if not cfg.ln_in_attn:
            self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.eps)
        self.attn = _Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.eps)
        self.mlp = _Mlp(cfg.embed_dim, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x if not hasattr(self, "norm1") else self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: MagiVAEConfig):
        super().__init__()
        k = (cfg.patch_length, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=k, stride=k)


def _positions(table: torch.Tensor, ref: tuple[int, int, int], grid: tuple[int, int, int], cls: bool) -> torch.Tensor:
    """The learned table for ``grid`` (lT, lH, lW): as stored on the reference grid, else trilinearly resized."""
    if tuple(grid) == tuple(ref):
        return table
    n0 = 1 if cls else 0
    body = table[:, n0:].reshape(1, *ref, -1).permute(0, 4, 1, 2, 3)
    body = F.interpolate(body.float(), size=tuple(grid), mode="trilinear", align_corners=False).to(table.dtype)
    body = body.permute(0, 2, 3, 4, 1).reshape(1, grid[0] * grid[1] * grid[2], -1)
    return torch.cat([table[:, :n0], body], dim=1)


class _ViTStack(nn.Module):
    """What encoder and decoder share: CLS, positional table, blocks, final norm."""

    def __init__(self, cfg: MagiVAEConfig, depth: int):
        super().__init__()
        self.cfg = cfg
        n = cfg.ref_latent_length * cfg.ref_latent_size ** 2 + (1 if cfg.with_cls_token else 0)
        if cfg.with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.embed_dim))
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.eps)

    def _run(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        cfg = self.cfg
        if cfg.with_cls_token:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        ref = (cfg.ref_latent_length, cfg.ref_latent_size, cfg.ref_latent_size)
        x = tokens + _positions(self.pos_embed, ref, grid, cfg.with_cls_token)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 1:] if cfg.with_cls_token else x


class MagiVAEEncoder(_ViTStack):
    def __init__(self, cfg: MagiVAEConfig):
        super().__init__(cfg, cfg.enc_depth)
        self.patch_embed = _PatchEmbed(cfg)
        self.last_layer = nn.Linear(cfg.embed_dim, 2 * cfg.z_chans if cfg.double_z else cfg.z_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in -1..1 -> moments [B, 2z, T/4, H/8, W/8]."""
        x = self.patch_embed.proj(x)
        B, _, lt, lh, lw = x.shape
        x = self._run(x.flatten(2).transpose(1, 2), (lt, lh, lw))
        x = self.last_layer(x)
        return x.reshape(B, lt, lh, lw, -1).permute(0, 4, 1, 2, 3)


class MagiVAEDecoder(_ViTStack):
    def __init__(self, cfg: MagiVAEConfig):
        super().__init__(cfg, cfg.dec_depth)
        self.proj_in = nn.Linear(cfg.z_chans, cfg.embed_dim)
        px = cfg.patch_length * cfg.patch_size ** 2
        if cfg.use_final_proj:
            self.final_proj = nn.Linear(cfg.embed_dim, cfg.unpatch_channels * px)
            self.final_norm = nn.LayerNorm(cfg.unpatch_channels * px, eps=cfg.eps)
        self.last_layer = nn.Conv3d(cfg.unpatch_channels, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """raw latents [B, z, lT, lH, lW] -> pixels [B, 3, 4 lT, 8 lH, 8 lW] in about -1..1."""
        cfg = self.cfg
        B, C, lt, lh, lw = z.shape
        x = self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(B, -1, C))
        x = self._run(x, (lt, lh, lw))
        if cfg.use_final_proj:
            x = self.final_norm(self.final_proj(x))
        pt, p, c = cfg.patch_length, cfg.patch_size, cfg.unpatch_channels
        x = x.reshape(B, lt, lh, lw, pt, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(B, c, lt * pt, lh * p, lw * p)
        return self.last_layer(x)


class MagiVAE(nn.Module):
    """The released ``ViTVAE`` with its parameter names (``encoder.*``, ``decoder.*``); raw latent space."""

    def __init__(self, cfg: MagiVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = MagiVAEEncoder(cfg)
        self.decoder = MagiVAEDecoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.proj_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.proj_in.weight.device

    # -- untiled ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in -1..1 -> posterior mode [B, z, T', H/8, W/8]; one frame is repeated to 4 first."""
        single = x.shape[2] == 1 and self.cfg.patch_length > 1
        if single:
            x = x.expand(-1, -1, self.cfg.patch_length, -1, -1)
        moments = self.encoder(x.to(self.dtype))
        z = moments[:, : self.cfg.z_chans]  # mode of the diagonal Gaussian = its mean
        return z[:, :, :1] if single else z

    @torch.no_grad()
    def decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        """raw latents [B, z, lT, h, w] -> [B, 3, 4 lT, 8h, 8w] in about -1..1 (lT = 1 -> one frame)."""
        out = self.decoder(z.to(self.dtype))
        return out[:, :, :1] if z.shape[2] == 1 else out

    # -- tiled, as the pipeline runs it -----------------------------------------------------------------
    def tile_geometry(self, fps: int = DEFAULT_FPS, tile_px: int = TILE_PX, overlap: float = TILE_OVERLAP) -> dict:
        p, pt = self.cfg.patch_size, self.cfg.patch_length
        frames = max(fps // 2, 1)
        return {"tile_px": tile_px, "tile_latent": tile_px // p, "overlap": overlap,
                "tile_frames": frames, "tile_latent_frames": max(frames // pt, 1)}

    @torch.no_grad()
    def encode(self, x: torch.Tensor, fps: int = DEFAULT_FPS, tile_px: int = TILE_PX,
               overlap: float = TILE_OVERLAP, tiled: bool = True) -> torch.Tensor:
        """[B, 3, T, H, W] in -1..1 -> raw latents (posterior mode), tiled as MAGI's pipeline does."""
        if not tiled:
            return self.encode_tile(x)
        g = self.tile_geometry(fps, tile_px, overlap)
        p = self.cfg.patch_size
        return tiled_apply(x, self.encode_tile, tile=(g["tile_frames"], tile_px, tile_px),
                           step=(g["tile_frames"], int(tile_px * (1 - overlap)), int(tile_px * (1 - overlap))),
                           blend=(0, int(g["tile_latent"] * overlap), int(g["tile_latent"] * overlap)),
                           scale=(None, 1 / p, 1 / p), blend_from_blended=True)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, fps: int = DEFAULT_FPS, tile_px: int = TILE_PX,
               overlap: float = TILE_OVERLAP, tiled: bool = True) -> torch.Tensor:
        """raw latents [B, z, lT, h, w] -> [B, 3, T, 8h, 8w] in about -1..1, tiled as MAGI's pipeline does."""
        if not tiled:
            return self.decode_tile(z)
        g = self.tile_geometry(fps, tile_px, overlap)
        p = self.cfg.patch_size
        tl, lt = g["tile_latent"], g["tile_latent_frames"]
        step = int(tl * (1 - overlap))
        return tiled_apply(z, self.decode_tile, tile=(lt, tl, tl), step=(lt, step, step),
                           blend=(0, int(tl * p * overlap), int(tl * p * overlap)),
                           scale=(None, p, p), blend_from_blended=False)


# --------------------------------------------------------------------------------------------- tiling
def _ramp_blend(prev: torch.Tensor, cur: torch.Tensor, dim: int, offset: int, extent: int) -> torch.Tensor:
    """Blend the first ``extent`` rows of ``cur`` (along ``dim``) with the rows of ``prev`` that cover the same
    output positions (``prev`` rows ``offset .. offset + extent``): weight of ``cur`` rises as r / extent.
    With MAGI's geometry (blend width = tile - step) these are the reference's ``prev[-extent:]`` rows."""
    extent = min(extent, cur.shape[dim], prev.shape[dim] - offset)
    if extent <= 0:
        return cur
    w = torch.arange(extent, dtype=torch.float32, device=cur.device) / extent
    shape = [1] * cur.dim()
    shape[dim] = extent
    w = w.view(shape).to(cur.dtype)
    a = prev.narrow(dim, offset, extent)
    b = cur.narrow(dim, 0, extent)
    out = cur.clone()
    out.narrow(dim, 0, extent).copy_(a * (1 - w) + b * w)
    return out


def tiled_apply(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: tuple[int, int, int],
                step: tuple[int, int, int], blend: tuple[int, int, int], scale: tuple[float | None, float, float],
                blend_from_blended: bool) -> torch.Tensor:
    """MAGI's TileProcessor on one device: cut ``x`` [B, C, T, H, W] into tiles of ``tile`` starting every
    ``step``, run ``fn`` on each, blend each tile's first ``blend`` output rows with its previous neighbour along
    T, H and W (in that order), crop each tile to its step and concatenate.

    ``scale`` maps input sizes to output sizes along H and W (8 for decode, 1/8 for encode); along T the output
    size of a tile is whatever ``fn`` returned (a 1-frame tile may map to 1 frame). ``blend_from_blended``: the
    reference's encoder blends with neighbours that were already blended (it blends in place), its decoder with
    the neighbours as decoded; both are reproduced.
    """
    B, C, T, H, W = x.shape
    nt, nh, nw = (max(1, -(-n // s)) for n, s in zip((T, H, W), step))
    outs: dict[tuple[int, int, int], torch.Tensor] = {}
    raw: dict[tuple[int, int, int], torch.Tensor] = {}
    for f in range(nt):
        for i in range(nh):
            for j in range(nw):
                t0, h0, w0 = f * step[0], i * step[1], j * step[2]
                piece = x[:, :, t0:t0 + tile[0], h0:h0 + tile[1], w0:w0 + tile[2]]
                raw[(f, i, j)] = fn(piece)
    out_step_h = int(round(step[1] * scale[1]))
    out_step_w = int(round(step[2] * scale[2]))
    rows_t = []
    for f in range(nt):
        rows_h = []
        for i in range(nh):
            cols = []
            for j in range(nw):
                cur = raw[(f, i, j)]
                src = outs if blend_from_blended else raw
                if f > 0 and blend[0] > 0:
                    prev = src[(f - 1, i, j)]
                    cur = _ramp_blend(prev, cur, 2, prev.shape[2] - blend[0], blend[0])
                if i > 0 and blend[1] > 0:
                    cur = _ramp_blend(src[(f, i - 1, j)], cur, 3, out_step_h, blend[1])
                if j > 0 and blend[2] > 0:
                    cur = _ramp_blend(src[(f, i, j - 1)], cur, 4, out_step_w, blend[2])
                outs[(f, i, j)] = cur
                # Along T there is no overlap in MAGI's use: keep every frame of the tile.
                t_keep = cur.shape[2] if blend[0] == 0 else cur.shape[2] - blend[0]
                cols.append(cur[:, :, :t_keep, :out_step_h, :out_step_w])
            rows_h.append(torch.cat(cols, dim=4))
        rows_t.append(torch.cat(rows_h, dim=3))
    return torch.cat(rows_t, dim=2)


# --------------------------------------------------------------------------------------------- config and loading
def _depth(sd: dict, side: str) -> int:
    idx = {int(k.split(".")[2]) for k in sd if k.startswith(f"{side}.blocks.") and k.split(".")[2].isdigit()}
    return max(idx) + 1 if idx else 0


def _what_is_it(keys) -> str:
    keys = set(keys)
    if any(k.startswith("videodit_blocks.") for k in keys) or "x_embedder.weight" in keys:
        return "a MAGI-1 DiT checkpoint (load it with the model loader)"
    if any("SelfAttention" in k for k in keys):
        return "a T5 text encoder"
    if "head.modulation" in keys or any(k.startswith("blocks.0.self_attn") for k in keys):
        return "a Wan2.1 DiT"
    if any(k.startswith(("encoder.conv1", "decoder.conv1", "encoder.downsamples", "conv1.weight")) for k in keys):
        return "a Wan2.1 (causal-conv) VAE, not MAGI-1's transformer VAE"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "a convolutional (SD/Flux-style) VAE, not MAGI-1's transformer VAE"
    return "not MAGI-1's VAE"


def strip_vae_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Drop any prefix in front of ``encoder.patch_embed.proj.weight`` (``vae.``, ``first_stage_model.``, ...)."""
    for k in sd:
        if k.endswith(ANCHOR):
            pre = k[: -len(ANCHOR)]
            if pre:
                return {kk[len(pre):]: v for kk, v in sd.items() if kk.startswith(pre)}, pre
            return sd, ""
    return sd, ""


def magi_vae_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint",
                                    ddconfig: dict | None = None, num_heads: int | None = None) -> MagiVAEConfig:
    """Infer the architecture from tensor shapes; ``ddconfig`` (the folder's config.json) fills what shapes
    cannot tell: head count and the positional table's reference grid."""
    need = [ANCHOR, "encoder.pos_embed", "encoder.last_layer.weight", "encoder.norm.weight",
            "decoder.proj_in.weight", "decoder.pos_embed", "decoder.last_layer.weight", "decoder.norm.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(
            f"{source}: not a MAGI-1 VAE ({_what_is_it(sd.keys())}): missing {', '.join(missing[:4])}. "
            "Expected the released MAGI-1 'vae' weights (ckpt/vae/diffusion_pytorch_model.safetensors) with keys "
            "like 'encoder.patch_embed.proj.weight', 'encoder.blocks.0.attn.qkv.weight', 'decoder.proj_in.weight'.")
    dd = dict(ddconfig or {})
    pe = sd[ANCHOR]
    if pe.dim() != 5:
        raise CheckpointError(f"{source}: {ANCHOR} has shape {tuple(pe.shape)}; expected a Conv3d weight "
                              "[dim, 3, 4, 8, 8].")
    D, cin, pt, p, p2 = pe.shape
    if p != p2:
        raise CheckpointError(f"{source}: non-square patch {p}x{p2} in {ANCHOR}.")
    z2 = sd["encoder.last_layer.weight"].shape[0]
    z = sd["decoder.proj_in.weight"].shape[1]
    cls = "encoder.cls_token" in sd
    n_pos = sd["encoder.pos_embed"].shape[1] - (1 if cls else 0)
    if "video_length" in dd and "video_size" in dd:
        lt = int(dd["video_length"]) // int(dd.get("patch_length", pt))
        ls = int(dd["video_size"]) // int(dd.get("patch_size", p))
    else:
        lt = 16 // pt if pt <= 16 else 1  # MAGI's video_length 16
        ls = int(round(math.sqrt(n_pos / max(lt, 1))))
    if lt * ls * ls != n_pos:
        raise CheckpointError(
            f"{source}: the positional table has {n_pos} positions, which is not a {lt}x{ls}x{ls} grid; pass the "
            "folder with its config.json (ddconfig video_size / video_length) or the reference grid explicitly.")
    heads = num_heads or dd.get("num_heads") or max(D // 64, 1)
    if D % heads:
        raise CheckpointError(f"{source}: embed dim {D} does not split into {heads} heads.")
    blk = "encoder.blocks.0."
    ln_in_attn = f"{blk}norm1.weight" not in sd
    dec_w = sd["decoder.last_layer.weight"]
    if dec_w.dim() != 5 or dec_w.shape[0] != 3:
        raise CheckpointError(f"{source}: decoder.last_layer.weight has shape {tuple(dec_w.shape)}; expected the "
                              "Conv3d [3, 4, 3, 3, 3] of MAGI-1's VAE (conv_last_layer=True).")
    use_final_proj = "decoder.final_proj.weight" in sd
    cfg = MagiVAEConfig(
        embed_dim=D, enc_depth=_depth(sd, "encoder"), dec_depth=_depth(sd, "decoder"), num_heads=int(heads),
        mlp_hidden=sd[f"{blk}mlp.fc1.weight"].shape[0] if f"{blk}mlp.fc1.weight" in sd else 4 * D,
        patch_size=p, patch_length=pt, in_chans=cin, z_chans=z, double_z=z2 == 2 * z,
        ref_latent_length=lt, ref_latent_size=ls, with_cls_token=cls, ln_in_attn=ln_in_attn,
        qkv_bias=f"{blk}attn.qkv.bias" in sd, use_final_proj=use_final_proj, unpatch_channels=dec_w.shape[1])
    if not use_final_proj and D != cfg.unpatch_channels * pt * p * p:
        raise CheckpointError(f"{source}: decoder tokens of width {D} cannot unpatchify to {cfg.unpatch_channels} "
                              f"channels of {pt}x{p}x{p} pixels.")
    if cfg.enc_depth == 0 or cfg.dec_depth == 0:
        raise CheckpointError(f"{source}: no encoder/decoder blocks found ('encoder.blocks.N...').")
    if dd.get("use_rope") or dd.get("norm_code"):
        raise CheckpointError(f"{source}: config.json asks for use_rope/norm_code, which MAGI-1's released VAE "
                              "does not use and this loader does not implement.")
    return cfg


def _read_ddconfig(path: Path) -> dict:
    folder = path if path.is_dir() else path.parent
    cj = folder / "config.json"
    if not cj.is_file():
        return {}
    try:
        data = json.loads(cj.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if data.get("_class_name") not in (None, "ViTVAE"):
        return {}
    dd = data.get("ddconfig")
    return dd if isinstance(dd, dict) else {}


def build_magi_vae(sd: dict[str, torch.Tensor], source: str = "checkpoint", dtype: torch.dtype = torch.float32,
                   ddconfig: dict | None = None, num_heads: int | None = None) -> MagiVAE:
    """A ``MagiVAE`` from a state dict in the released key layout; bad keys raise CheckpointError naming
    ``source``."""
    sd, _ = strip_vae_prefix(sd)
    if ANCHOR not in sd:
        magi_vae_config_from_state_dict(sd, source, ddconfig, num_heads)  # raises, saying what the file is
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder."))}
    cfg = magi_vae_config_from_state_dict(sd, source, ddconfig, num_heads)
    with torch.device("meta"):
        model = MagiVAE(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:4])})")
        if wrong:
            parts.append("wrong shape: " + ", ".join(f"{k} {tuple(sd[k].shape)} != {tuple(expected[k])}"
                                                      for k in wrong[:3]))
        raise CheckpointError(f"{source}: does not match MAGI-1's VAE layout ({_what_is_it(sd.keys())}): "
                              + "; ".join(parts) + ". Use the released MAGI-1 'vae' weights unchanged.")
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    return model.to(dtype).eval().requires_grad_(False)


def load_magi_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  num_heads: int | None = None) -> MagiVAE:
    """Load MAGI-1's VAE from ``diffusion_pytorch_model.safetensors`` (or the folder holding it with its
    config.json, as released under ``ckpt/vae``). fp16/bf16/fp8 storage is upcast to ``dtype``."""
    p = Path(path)
    ck = load_checkpoint(p)
    return build_magi_vae(ck.tensors, ck.name, dtype, _read_ddconfig(p), num_heads)


# --------------------------------------------------------------------------------------------- codec
class MagiVAECodec:
    """Pixels <-> the MAGI-1 DiT's latent space (raw VAE latents x 0.18215).

    ``encode(pixels [T, H, W, 3] 0..1)`` -> ``[1, 16, T // 4, H / 8, W / 8]`` (T = 1 -> one latent frame; T must
    be 1 or a multiple of 4, H and W multiples of 8). ``decode(latents [1, 16, lT, h, w])`` ->
    ``[4 lT, 8h, 8w, 3]`` clamped to 0..1 (a 1-frame temporal tile gives one frame, as in MAGI).
    Both tile as MAGI's pipeline does at ``fps`` (24: 12-frame temporal tiles); ``tiled=False`` runs whole.
    """

    scale_factor = MAGI_VAE_SCALE_FACTOR
    temporal_stride = 4
    spatial_stride = 8
    channels = 16

    def __init__(self, vae: MagiVAE, fps: int = DEFAULT_FPS, tiled: bool = True,
                 device: str | torch.device | None = None):
        self.vae = vae
        self.fps = fps
        self.tiled = tiled
        self.device = torch.device(device) if device is not None else vae.device
        self.temporal_stride = vae.cfg.patch_length
        self.spatial_stride = vae.cfg.patch_size
        self.channels = vae.cfg.z_chans

    @classmethod
    def from_file(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kw) -> "MagiVAECodec":
        return cls(load_magi_vae(path, dtype), **kw)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        lt = 1 if frames == 1 else frames // self.temporal_stride
        return (1, self.channels, lt, height // self.spatial_stride, width // self.spatial_stride)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = torch.as_tensor(pixels)
        if pixels.dtype == torch.uint8:
            pixels = pixels.float() / 255.0
        if pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise InputError(f"MAGI-1 VAE encode: expected pixels [T, H, W, 3], got {list(pixels.shape)}.")
        T, H, W, _ = pixels.shape
        ts, ss = self.temporal_stride, self.spatial_stride
        if T != 1 and T % ts:
            raise InputError(f"MAGI-1 VAE encode: {T} frames; MAGI-1's VAE codes {ts} frames per latent frame, so "
                             f"give 1 frame or a multiple of {ts} (e.g. {T - T % ts or ts}).")
        if H % ss or W % ss:
            raise InputError(f"MAGI-1 VAE encode: {W}x{H} is not a multiple of {ss} pixels on each side.")
        x = pixels.permute(3, 0, 1, 2)[None].to(self.device, torch.float32) * 2.0 - 1.0
        z = self.vae.encode(x, fps=self.fps, tiled=self.tiled)
        return z.float() * self.scale_factor

    def stream_decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Decoding a video chunk by chunk: MAGI-1 itself decodes every chunk on its own as soon as it is clean
        (``post_chunk_process``), so feeding chunk_width-latent pieces reproduces its output in flat memory."""
        return self.decode

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() == 4:
            latents = latents[None]
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != self.channels:
            raise InputError(f"MAGI-1 VAE decode: expected latents [1, {self.channels}, T, h, w], got "
                             f"{list(latents.shape)}.")
        z = latents.to(self.device, torch.float32) / self.scale_factor
        x = self.vae.decode(z, fps=self.fps, tiled=self.tiled)
        return ((x.float()[0] + 1.0) * 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()


__all__ = ["MagiVAE", "MagiVAEConfig", "MagiVAECodec", "load_magi_vae", "build_magi_vae",
           "magi_vae_config_from_state_dict", "tiled_apply", "MAGI_VAE_SCALE_FACTOR"]
