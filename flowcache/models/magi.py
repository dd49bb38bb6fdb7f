"""MAGI-1 DiT ("videodit_ardf", Sand AI) for chunk-wise autoregressive video diffusion.

Parameter names are the released ones (``ckpt/magi/*/inference_weight*``), so a checkpoint loads with
``load_state_dict(strict=True)`` after prefix stripping; the fp8 variant keeps its fp8 weights and scales and
upcasts them per call. Numerics follow the official inference code (SandAI-org/MAGI-1 @ 6ff822e):
embeddings, q/k norms, post-norms, the output projection and the head run in fp32, the rest in the
compute dtype (bf16 by default).

Shapes: B batch, C latent channels, T latent frames, (h, w) = (H/2, W/2) token grid, n chunks in one
forward, Lc = (T/n)·h·w tokens per chunk, L = n·Lc, D hidden size, Hq query heads, G kv heads, Dh head dim,
Ly caption tokens. Time convention is MAGI's: t = 0 pure noise, t = 1 clean; the output is a velocity.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import DTYPE_NAMES, Checkpoint
from ..errors import CheckpointError, InputError
from .common import TORCH_OPERATIONS, KVContext, Operations, TorchLayers, attention

TP_GROUPS = 8  # the output projection's input is interleaved for TP8 training, whatever the head count
_FP8 = getattr(torch, "float8_e4m3fn", None)
_LAYER = "videodit_blocks.layers."
# Modules the official `_high_precision_promoter` keeps in fp32 (the *_xattn norms are deliberately not).
_FP32_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "rope.", "final_linear.",
                  "videodit_blocks.final_layernorm.")
_FP8_LINEARS = {f"self_attention.linear_qkv.{n}" for n in ("q", "qx", "k", "v")} | {
    "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"}  # fp8 in layers 1..L-2 of the fp8 release
_FP32_LAYER_PARTS = ("self_attention.q_layernorm.", "self_attention.k_layernorm.", "self_attn_post_norm.",
                     "mlp_post_norm.")


@dataclass
class MagiConfig:
    num_layers: int = 34
    hidden_size: int = 3072
    num_heads: int = 24
    num_kv_heads: int = 8  # "num_query_groups" (GQA)
    head_dim: int = 128  # "kv_channels"
    ffn_hidden_size: int = 12288
    gated_linear_unit: bool = False  # SwiGLU (24B) instead of GELU (4.5B)
    in_channels: int = 16  # channels the patch embedder sees (32 for 24B: the 16 VAE channels twice)
    out_channels: int = 16
    patch_size: int = 2
    t_patch_size: int = 1
    caption_channels: int = 4096
    caption_max_length: int = 800
    cond_dim: int = 768  # hidden * cond_hidden_ratio
    xattn_dim: int = 3072  # hidden * xattn_cond_hidden_ratio
    freq_dim: int = 256
    rope_bands: int = 16  # head_dim // 8 learned bands per axis
    fp8_layers: tuple[int, ...] = ()  # layers whose big linears are stored as fp8 (1..L-2 in the release)
    half_channel_vae: bool = False
    x_rescale_factor: float = 1.0
    eps: float = 1e-6

    @property
    def fp8(self) -> bool:
        return bool(self.fp8_layers)

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 2 if self.half_channel_vae else self.in_channels

    @property
    def size_name(self) -> str:
        return {3072: "4.5B", 6144: "24B"}.get(self.hidden_size, f"hidden{self.hidden_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def distill_dt_for_steps(num_steps: int, distill_interval: int | None = None) -> float:
    """The distill step-size input: num_steps/4·2 (64 → 32, 16 → 8); the 12-step shortcut uses 4/interval·2."""
    if num_steps == 12:
        if not distill_interval:
            raise InputError("12-step shortcut sampling needs the chunk's distill interval (1 or 2).")
        return 4 / distill_interval * 2
    return num_steps / 4 * 2


# ------------------------------------------------------------------------------------------------- modules
class LayerNorm1p(nn.Module):
    """LayerNorm whose stored gain is weight − 1 (Megatron ``apply_layernorm_1p``): gain = weight + 1."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the parameters are moved to x's device at use: a host's partial loading may leave this layer behind
        w, b = self.weight.to(x.device), self.bias.to(x.device)
        return F.layer_norm(x, self.weight.shape, w + 1, b, self.eps)


class Fp8Linear(nn.Module):
    """The release's fp8 linear, run by upcasting: y = q8(x / s) @ W8ᵀ · (s_in[0] · w_scale).

    ``per_channel=False`` (q, qx, k, v, fc1): s = input_scale [in]. ``per_channel=True`` (proj, fc2):
    s = smooth_scale [1, in], input_scale [1]. The official cuBLASLt kernel reads only the first element of
    the input scale, so that is what multiplies the product; x is quantized to fp8 as the official code does.
    """

    def __init__(self, in_features: int, out_features: int, per_channel: bool):
        super().__init__()
        self.per_channel = per_channel
        self.weight = nn.Parameter(torch.zeros(1, out_features, in_features, dtype=_FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(1))
        self.input_scale = nn.Parameter(torch.ones(1 if per_channel else in_features))
        if per_channel:
            self.smooth_scale = nn.Parameter(torch.ones(1, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt, dev = x.dtype, x.device  # weights and scales are moved to x's device at use (partial loading)
        s = self.smooth_scale if self.per_channel else self.input_scale
        fmax = torch.finfo(_FP8).max
        xq = (x.float() / s.to(dev).float()).clamp(-fmax, fmax).to(torch.bfloat16).to(_FP8)
        y = F.linear(xq.to(dt), self.weight[0].to(device=dev, dtype=dt))
        return y * (self.input_scale[0].to(dev).float() * self.weight_scale[0].to(dev).float()).to(dt)


def _linear(i: int, o: int, fp8: bool, ops: type, per_channel: bool = False) -> nn.Module:
    return Fp8Linear(i, o, per_channel) if fp8 else ops.Linear(i, o, bias=False)


@dataclass(frozen=True)
class _Layers:
    """The layer namespaces one MAGI-1 model is built from: ``fp32`` for the modules the official code keeps
    in fp32, ``compute`` for the rest, ``to_fp32`` for compute-dtype weights multiplied in fp32 (the
    attention output projection). ``casts``: those layers cast their weights to the input's dtype and device
    (a host's), else the fp32 products upcast the weight here."""

    fp32: type
    compute: type
    to_fp32: type
    casts: bool

    @staticmethod
    def of(operations: Operations, dtype: torch.dtype) -> "_Layers":
        f32 = torch.float32
        return _Layers(operations.layers(f32, f32), operations.layers(dtype, dtype), operations.layers(dtype, f32),
                       operations.casts)


class TimestepEmbedder(nn.Module):
    """t [N] in [0, 1] → [N, cond_dim]: 256-d sinusoid (cos first) of t·1000, then Linear–SiLU–Linear."""

    def __init__(self, cfg: MagiConfig, ops: type = TorchLayers):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        d = cfg.cond_dim
        self.mlp = nn.Sequential(ops.Linear(cfg.freq_dim, d), nn.SiLU(), ops.Linear(d, d))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None] * 1000
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        # The official code casts the sinusoid to params_dtype (bf16) before the fp32 MLP; keep that rounding.
        return self.mlp(emb.to(torch.bfloat16).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    def __init__(self, cfg: MagiConfig, ops: type = TorchLayers):
        super().__init__()
        self.y_proj_xattn = nn.Sequential(ops.Linear(cfg.caption_channels, cfg.xattn_dim), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(ops.Linear(cfg.caption_channels, cfg.cond_dim))
        self.null_caption_embedding = nn.Parameter(torch.zeros(cfg.caption_max_length, cfg.caption_channels))


class Rope(nn.Module):
    def __init__(self, cfg: MagiConfig):
        super().__init__()
        self.bands = nn.Parameter(1.0 / 10000 ** (torch.arange(cfg.rope_bands, dtype=torch.float32) / cfg.rope_bands))


class QKVProj(nn.Module):
    """``linear_qkv``: a plain pre-LayerNorm and four bias-free projections from the same normed input."""

    def __init__(self, cfg: MagiConfig, fp8: bool, ops: type = TorchLayers):
        super().__init__()
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.layer_norm = ops.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.q, self.qx = _linear(cfg.hidden_size, q, fp8, ops), _linear(cfg.hidden_size, q, fp8, ops)
        self.k, self.v = _linear(cfg.hidden_size, kv, fp8, ops), _linear(cfg.hidden_size, kv, fp8, ops)


class SelfAndCrossAttention(nn.Module):
    """``self_attention``: block-causal GQA self-attention and per-chunk text cross-attention in parallel."""

    def __init__(self, cfg: MagiConfig, fp8: bool, layers: _Layers | None = None):
        super().__init__()
        layers = layers or _Layers.of(TORCH_OPERATIONS, torch.bfloat16)
        self.cfg, self.fp8, self.casts = cfg, fp8, layers.casts
        q = cfg.num_heads * cfg.head_dim
        self.linear_qkv = QKVProj(cfg, fp8, layers.compute)
        self.linear_kv_xattn = layers.compute.Linear(cfg.xattn_dim, 2 * cfg.num_kv_heads * cfg.head_dim,
                                                     bias=False)  # never fp8
        self.linear_proj = _linear(2 * q, cfg.hidden_size, fp8, layers.to_fp32, per_channel=True)
        self.q_layernorm = LayerNorm1p(cfg.head_dim, cfg.eps)
        self.k_layernorm = LayerNorm1p(cfg.head_dim, cfg.eps)
        self.q_layernorm_xattn = LayerNorm1p(cfg.head_dim, cfg.eps)
        self.k_layernorm_xattn = LayerNorm1p(cfg.head_dim, cfg.eps)

    def _qk(self, proj: nn.Module, norm: LayerNorm1p, h: torch.Tensor, rope: tuple) -> torch.Tensor:
        """[B, L, D] → [B, heads, L, Dh]: projection, fp32 LayerNorm1p per head, RoPE, back to h's dtype."""
        B, L, _ = h.shape
        x = norm(proj(h).view(B, L, -1, self.cfg.head_dim).float())
        return apply_rope(x, *rope).to(h.dtype).transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: tuple, n_chunks: int, captions: list, kv: KVContext | None,
                layer: int) -> torch.Tensor:
        """x [B, L, D] → projected attention output [B, L, D] (fp32 unless the projection is fp8)."""
        cfg, B, L = self.cfg, x.shape[0], x.shape[1]
        Dh, Lc = cfg.head_dim, x.shape[1] // n_chunks
        h = self.linear_qkv.layer_norm(x)
        q = self._qk(self.linear_qkv.q, self.q_layernorm, h, rope)  # [B, Hq, L, Dh]
        k = self._qk(self.linear_qkv.k, self.k_layernorm, h, rope)  # [B, G, L, Dh]
        v = self.linear_qkv.v(h).view(B, L, -1, Dh).transpose(1, 2)
        keys, vals = kv.extend(layer, q, k, v) if kv is not None else (k, v)
        # Every attention below goes through ``attention`` (a host's kernel under ``attention_backend``): grouped
        # query heads as they are (the host repeats key/value heads if its kernel needs equal counts), the
        # block-causal chunks as slices (no mask), each caption's cross-attention on its valid tokens only (the
        # official code's varlen kernel, one call per caption here).
        ctx = keys.shape[2] - L  # tokens of earlier chunks held by the context
        if n_chunks == 1:
            core = attention(q, keys, vals)
        else:  # block-causal: chunk c sees the context and current chunks 0..c (no mask tensor needed)
            core = torch.cat([attention(q[:, :, c * Lc:(c + 1) * Lc], keys[:, :, :ctx + (c + 1) * Lc],
                                        vals[:, :, :ctx + (c + 1) * Lc]) for c in range(n_chunks)], dim=2)
        core = core.transpose(1, 2).reshape(B, L, -1)

        # Cross-attention: each query span sees only its own caption's valid tokens (varlen in the official code).
        qx = self.q_layernorm_xattn(self.linear_qkv.qx(h).view(B, L, -1, Dh)).transpose(1, 2)
        cross = torch.zeros_like(qx)
        for b, sl, y in captions:
            if y.shape[0] == 0:
                continue  # no valid text token: contributes nothing
            # K/V rows are interleaved per kv group: [k_g0, v_g0, k_g1, v_g1, ...], each Dh wide.
            kvx = self.linear_kv_xattn(y).view(1, y.shape[0], cfg.num_kv_heads, 2, Dh)
            kx = self.k_layernorm_xattn(kvx[..., 0, :]).transpose(1, 2)
            vx = kvx[..., 1, :].transpose(1, 2)
            cross[b:b + 1, :, sl] = attention(qx[b:b + 1, :, sl], kx, vx)
        cross = cross.transpose(1, 2).reshape(B, L, -1)

        # TP8 interleave: [core | cross] → 8 groups of [core slice, cross slice] before the projection.
        out = torch.cat([core, cross], dim=-1).view(B, L, 2, TP_GROUPS, -1).transpose(2, 3).reshape(B, L, -1)
        if self.fp8:
            return self.linear_proj(out)
        if self.casts:  # the layer upcasts its compute-dtype weight to the fp32 input itself
            return self.linear_proj(out.float())
        return F.linear(out.float(), self.linear_proj.weight.float())  # fp32 like the official autocast


class MLP(nn.Module):
    def __init__(self, cfg: MagiConfig, fp8: bool, ops: type = TorchLayers):
        super().__init__()
        self.gated = cfg.gated_linear_unit
        self.layer_norm = ops.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.linear_fc1 = _linear(cfg.hidden_size, cfg.ffn_hidden_size * (2 if self.gated else 1), fp8, ops)
        self.linear_fc2 = _linear(cfg.ffn_hidden_size, cfg.hidden_size, fp8, ops, per_channel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(self.layer_norm(x))
        if self.gated:  # silu_and_mul: silu(first half) * second half
            a, g = h.chunk(2, dim=-1)
            h = F.silu(a) * g
        else:
            h = F.gelu(h)  # exact (erf) GELU
        return self.linear_fc2(h)


class MagiLayer(nn.Module):
    """Parallel attention block with softcap (tanh) gates and sandwich post-norms; no shift/scale AdaLN."""

    def __init__(self, cfg: MagiConfig, index: int, layers: _Layers | None = None):
        super().__init__()
        layers = layers or _Layers.of(TORCH_OPERATIONS, torch.bfloat16)
        fp8 = index in cfg.fp8_layers
        self.index = index
        self.ada_modulate_layer = nn.Module()
        self.ada_modulate_layer.proj = nn.Sequential(layers.compute.Linear(cfg.cond_dim, 2 * cfg.hidden_size))
        self.self_attention = SelfAndCrossAttention(cfg, fp8, layers)
        self.self_attn_post_norm = LayerNorm1p(cfg.hidden_size, cfg.eps)
        self.mlp = MLP(cfg, fp8, layers.compute)
        self.mlp_post_norm = LayerNorm1p(cfg.hidden_size, cfg.eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple, captions: list,
                kv: KVContext | None) -> torch.Tensor:
        """x [B, L, D] (compute dtype), cond [B, n, cond_dim] → [B, L, D]."""
        B, L, D = x.shape
        n = cond.shape[1]
        gates = torch.tanh(self.ada_modulate_layer.proj(F.silu(cond)).float()).to(x.dtype)  # softcap, cap = 1
        g_attn, g_mlp = gates.float().chunk(2, dim=-1)  # [B, n, D] each, one row per chunk

        def gate(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return (y.float().view(B, n, L // n, D) * g[:, :, None]).view(B, L, D)

        a = self.self_attention(x, rope, n, captions, kv, self.index)
        x = (self.self_attn_post_norm(gate(a, g_attn)) + x.float()).to(x.dtype)
        m = self.mlp(x)
        return (self.mlp_post_norm(gate(m, g_mlp)) + x.float()).to(x.dtype)


class MagiBlocks(nn.Module):
    def __init__(self, cfg: MagiConfig, layers: _Layers | None = None):
        super().__init__()
        self.layers = nn.ModuleList(MagiLayer(cfg, i, layers) for i in range(cfg.num_layers))
        self.final_layernorm = LayerNorm1p(cfg.hidden_size, cfg.eps)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Non-interleaved (GPT-NeoX) rotation of the first 2·R dims of x [B, L, heads, Dh]; sin/cos [L, R].

    Pairs are (x[:R], x[R:2R]); the remaining Dh − 2R dims pass through (R = 48 of 128 for the release).
    """
    r = sin.shape[-1]
    s, c = sin[None, :, None], cos[None, :, None]
    x1, x2 = x[..., :r], x[..., r:2 * r]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * r:]], dim=-1)


def _param_dtype(cfg: MagiConfig, name: str, dtype: torch.dtype) -> torch.dtype:
    """Dtype a parameter is held in: fp8 weights stay fp8, their scales and the promoted modules fp32."""
    if name.startswith(_FP32_PREFIXES):
        return torch.float32
    m = re.match(r"videodit_blocks\.layers\.(\d+)\.(.*)", name)
    if m:
        part = m.group(2)
        if part.startswith(_FP32_LAYER_PARTS):
            return torch.float32
        if int(m.group(1)) in cfg.fp8_layers and part.rsplit(".", 1)[0] in _FP8_LINEARS:
            return _FP8 if part.endswith(".weight") else torch.float32
    return dtype


# ------------------------------------------------------------------------------------------------- model
class MagiDiT(nn.Module):
    """MAGI-1 VideoDiT with the released key layout; one forward runs one or several consecutive chunks.

    operations: where the layers come from (torch's; inside ComfyUI its casting layers, see
    ``flowcache.models.common.Operations``). ``compute_device`` (None: where the patch embedder is) is where a
    forward runs when a host keeps some weights elsewhere (partial loading); the few parameters no layer owns
    and the custom fp8 / LayerNorm1p layers are moved there at use.
    """

    def __init__(self, cfg: MagiConfig, dtype: torch.dtype = torch.bfloat16,
                 operations: Operations = TORCH_OPERATIONS):
        super().__init__()
        _check_config(cfg)
        self.config, self.dtype = cfg, dtype
        self.cfg = cfg  # alias used by the family loader
        self.compute_device: torch.device | None = None
        layers = _Layers.of(operations, dtype)
        k = (cfg.t_patch_size, cfg.patch_size, cfg.patch_size)
        self.x_embedder = layers.fp32.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)
        self.t_embedder = TimestepEmbedder(cfg, layers.fp32)
        self.y_embedder = CaptionEmbedder(cfg, layers.fp32)
        self.rope = Rope(cfg)
        self.videodit_blocks = MagiBlocks(cfg, layers)
        self.final_linear = nn.Module()
        patch_out = cfg.t_patch_size * cfg.patch_size ** 2 * cfg.out_channels
        self.final_linear.linear = layers.fp32.Linear(cfg.hidden_size, patch_out, bias=False)
        for name, p in self.named_parameters():
            p.data = p.data.to(_param_dtype(cfg, name, dtype))
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.compute_device if self.compute_device is not None else self.x_embedder.weight.device

    # -- inputs ---------------------------------------------------------------------------------------
    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-embedded noisy input, x [B, C, T, H, W] → tokens [B, L, D] in fp32, ordered (T h w).

        Includes x_rescale_factor and the 24B channel doubling. Tokens of chunk c are the contiguous block
        [c·Lc, (c+1)·Lc): FlowCache's MAGI signal is the relative L1 of these per chunk between steps.
        """
        cfg = self.config
        x = x.float() * cfg.x_rescale_factor
        if cfg.half_channel_vae:
            x = torch.cat([x, x], dim=1)
        if x.shape[1] != cfg.in_channels:
            raise InputError(f"MAGI-1 expects {cfg.latent_channels} latent channels, got {x.shape[1]}.")
        return self.x_embedder(x.to(self.x_embedder.weight.dtype)).flatten(2).transpose(1, 2).float()

    def rope_tables(self, T: int, h: int, w: int, frame_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each [T·h·w, 3·bands], for token frames frame_offset..frame_offset+T−1 of the video.

        Temporal positions are absolute frame indices; spatial ones are centred and rescaled to a 16×16
        reference grid (EVA-style ``x/(f−1)·(r−1)``), exactly as the official ``get_embed`` computes them.
        """
        dev = self.device
        total = frame_offset + T
        rescale = math.sqrt(h * w / 256)
        axes = [torch.arange(total, dtype=torch.float32, device=dev),
                torch.arange(h, dtype=torch.float32, device=dev) - (h - 1) / 2,
                torch.arange(w, dtype=torch.float32, device=dev) - (w - 1) / 2]
        refs = (total, h / rescale, w / rescale)
        axes = [a / (f - 1) * (r - 1) if f > 1 else a for a, f, r in zip(axes, (total, h, w), refs)]
        grid = torch.stack(torch.meshgrid(axes[0][frame_offset:], axes[1], axes[2], indexing="ij"), dim=-1)
        pos = (grid[..., None] * self.rope.bands.to(dev).float()).reshape(T * h * w, -1)  # [L, 3·bands]: T, h, w bands
        return pos.sin(), pos.cos()

    def condition(self, t: torch.Tensor, distill_dt: float | None = None,
                  uncond: bool | torch.Tensor = False) -> torch.Tensor:
        """Per-chunk AdaLN condition [B, n, cond_dim] (compute dtype) from t [B, n].

        The text does not enter here: a learned null-caption row does (row −2 for the conditional branch,
        row −1 for the unconditional one). Distilled models add the embedding of the distill step size.
        """
        B, n = t.shape
        te = self.t_embedder(t.reshape(-1).float())
        if distill_dt is not None:
            te = te + self.t_embedder(torch.full((B * n,), float(distill_dt), device=t.device))
        null = self.y_embedder.null_caption_embedding.to(t.device)
        u = torch.as_tensor(uncond, device=t.device).bool().reshape(-1).expand(B)
        ya = self.y_embedder.y_proj_adaln(torch.where(u[:, None], null[-1], null[-2]))  # [B, cond_dim]
        return (te.view(B, n, -1) + ya[:, None]).to(self.dtype)

    def _captions(self, caption: torch.Tensor, mask: torch.Tensor, B: int, n: int, Lc: int) -> list:
        """(batch, token slice, valid projected caption tokens [Ly, xattn_dim]) for each query span."""
        per_chunk = caption.dim() == 4
        if caption.shape[0] != B or (per_chunk and caption.shape[1] != n) or mask.shape != caption.shape[:-1]:
            raise InputError(f"caption {tuple(caption.shape)} / mask {tuple(mask.shape)} do not match batch {B} and "
                             f"{n} chunks: expected [B, L, C] with mask [B, L], or [B, n, L, C] with mask [B, n, L].")
        y = self.y_embedder.y_proj_xattn(caption.float().to(self.y_embedder.null_caption_embedding.dtype))
        out = []
        for b in range(B):
            if per_chunk:
                out += [(b, slice(c * Lc, (c + 1) * Lc), y[b, c][mask[b, c].bool()].to(self.dtype)) for c in range(n)]
            else:
                out.append((b, slice(None), y[b][mask[b].bool()].to(self.dtype)))
        return out

    def null_caption(self, valid: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
        """The null/negative caption: the stored rows [Lmax, Cc] with the first ``valid`` (50) marked valid."""
        emb = self.y_embedder.null_caption_embedding
        return emb, torch.arange(emb.shape[0], device=emb.device) < valid

    # -- forward --------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor,
                chunk_start: int = 0, kv: KVContext | None = None, distill_dt: float | None = None,
                uncond: bool | torch.Tensor = False, between: Callable[[], None] | None = None) -> torch.Tensor:
        """Velocity for n consecutive chunks.

        x [B, C, T, H, W], T = n·frames_per_chunk; t [B, n] per-chunk timesteps (0 noise … 1 clean);
        caption [B, Ly, 4096] (shared by the chunks) or [B, n, Ly, 4096] (per chunk), caption_mask the same
        without the last dim; chunk_start: absolute index of the first chunk (temporal RoPE positions);
        distill_dt: ``distill_dt_for_steps(...)`` for distilled checkpoints, None for base ones; uncond picks
        the null AdaLN row (per batch item or for all); between: called after every layer (a cancel point).
        Returns [B, C, T, H, W] fp32.

        Self-attention: with ``kv`` every layer calls ``kv.extend(layer, q, k, v)`` (q [B, Hq, L, Dh],
        k/v [B, G, L, Dh] after RoPE) and chunk c of this forward attends to all returned context tokens plus
        its own and earlier chunks of this forward. Without ``kv`` the mask is block-causal by chunk: query
        chunk c sees key chunks 0..c, bidirectionally inside each chunk.
        """
        cfg = self.config
        if x.dim() != 5 or t.dim() != 2 or t.shape[0] != x.shape[0]:
            raise InputError(f"expected x [B, C, T, H, W] and t [B, n_chunks], got {tuple(x.shape)} and "
                             f"{tuple(t.shape)}.")
        B, _, T, H, W = x.shape
        n, p, pt = t.shape[1], cfg.patch_size, cfg.t_patch_size
        if T % pt or H % p or W % p or (T // pt) % n:
            raise InputError(f"latent {T}×{H}×{W} does not split into {n} chunks of whole {pt}×{p}×{p} patches.")
        Tt, h, w = T // pt, H // p, W // p
        Lc = (Tt // n) * h * w
        tokens = self.embed_input(x).to(self.dtype)
        rope = self.rope_tables(Tt, h, w, frame_offset=chunk_start * (Tt // n))
        cond = self.condition(t, distill_dt, uncond)
        captions = self._captions(caption, caption_mask, B, n, Lc)
        return self.head(self.run_layers(tokens, cond, rope, captions, kv, between), (T, H, W))

    def run_layers(self, tokens: torch.Tensor, cond: torch.Tensor, rope: tuple, captions: list,
                   kv: KVContext | None = None, between: Callable[[], None] | None = None) -> torch.Tensor:
        """Every layer on tokens [B, L, D] (compute dtype); cond [B, n, cond_dim]; captions from ``_captions``."""
        for layer in self.videodit_blocks.layers:
            tokens = layer(tokens, cond, rope, captions, kv)
            if between is not None:  # a cancel point inside long forwards (it raises to stop)
                between()
        return tokens

    def head(self, tokens: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Tokens [B, L, D] -> velocity [B, C, T, H, W] (fp32) of a latent of ``size`` (T, H, W)."""
        cfg = self.config
        T, H, W = size
        p, pt = cfg.patch_size, cfg.t_patch_size
        B = tokens.shape[0]
        out = self.final_linear.linear(self.videodit_blocks.final_layernorm(tokens.float()))
        # Unpatchify: channels are patch-position-major, channel-minor: (pT pH pW C).
        out = out.view(B, T // pt, H // p, W // p, pt, p, p, cfg.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, cfg.out_channels, T, H, W)
        if cfg.half_channel_vae:
            out = out[:, : cfg.out_channels // 2]
        return out / cfg.x_rescale_factor


# ------------------------------------------------------------------------------------------------- loading
def _check_config(cfg: MagiConfig) -> None:
    if cfg.rope_bands * 8 != cfg.head_dim:
        raise CheckpointError(f"MAGI-1 RoPE needs head_dim // 8 learned bands; got {cfg.rope_bands} bands for "
                              f"head dim {cfg.head_dim}.")
    if cfg.num_heads % cfg.num_kv_heads or (2 * cfg.num_heads * cfg.head_dim) % (2 * TP_GROUPS):
        raise CheckpointError(f"MAGI-1 heads {cfg.num_heads}/{cfg.num_kv_heads} (head dim {cfg.head_dim}) do not fit "
                              f"grouped-query attention and the {TP_GROUPS}-group output interleave.")


def _looks_like(keys: set[str]) -> str:
    """A hint naming what a non-MAGI key set probably is (keys may still carry a prefix)."""
    dotted = ["." + k for k in keys]
    if any(k.endswith(".patch_embedding.weight") or ".blocks.0.self_attn." in k for k in dotted):
        return " It looks like a Wan2.1 / SkyReels-V2 DiT; load it with the Wan loader."
    if any(".encoder.blocks." in k or ".decoder.blocks." in k for k in dotted):
        return " It looks like the MAGI-1 VAE, not the DiT."
    if any(".encoder.block." in k or k.endswith(".shared.weight") for k in dotted):
        return " It looks like a T5 text encoder, not the DiT."
    return ""


def _few(names: Iterable[str], k: int = 6) -> str:
    names = list(names) if isinstance(names, (list, tuple)) else sorted(names)
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def magi_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> MagiConfig:
    """Infer a MagiConfig from tensor shapes of bare keys, and check the key set and shapes are MAGI-1's.

    Head dim comes from the q/k norm width (128 in the release), heads from the projections, fp8 layers
    from their ``weight_scale`` keys. ``half_channel_vae``/``x_rescale_factor`` are not stored: they are set
    for a 32-channel patch embedder (24B) as in the released 24B configs.
    """
    keys = set(sd)
    L0 = _LAYER + "0."
    need = ["x_embedder.weight", "t_embedder.mlp.0.weight", "y_embedder.y_proj_xattn.0.weight",
            "y_embedder.y_proj_adaln.0.weight", "y_embedder.null_caption_embedding", "rope.bands",
            "final_linear.linear.weight", L0 + "self_attention.q_layernorm.weight",
            L0 + "self_attention.linear_qkv.q.weight", L0 + "self_attention.linear_qkv.k.weight",
            L0 + "self_attention.linear_kv_xattn.weight", L0 + "mlp.linear_fc1.weight", L0 + "mlp.linear_fc2.weight"]
    missing = [k for k in need if k not in keys]
    if missing:
        raise CheckpointError(f"{source}: not a MAGI-1 DiT checkpoint: missing {_few(missing)}.{_looks_like(keys)}")
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"videodit_blocks\.layers\.(\d+)\.", k))}
    if idx != set(range(len(idx))):
        raise CheckpointError(f"{source}: MAGI-1 layer numbers are not 0..{max(idx)} (missing "
                              f"{_few([str(i) for i in set(range(max(idx) + 1)) - idx])}); the file is incomplete.")
    xe, q = sd["x_embedder.weight"], sd[L0 + "self_attention.linear_qkv.q.weight"]
    hidden, in_ch, pt, p = xe.shape[0], xe.shape[1], xe.shape[2], xe.shape[3]
    dh = sd[L0 + "self_attention.q_layernorm.weight"].shape[0]
    ffn = sd[L0 + "mlp.linear_fc2.weight"].shape[-1]
    half = in_ch == 32
    cfg = MagiConfig(
        num_layers=len(idx), hidden_size=hidden, num_heads=q.shape[-2] // dh,
        num_kv_heads=sd[L0 + "self_attention.linear_qkv.k.weight"].shape[-2] // dh, head_dim=dh,
        ffn_hidden_size=ffn, gated_linear_unit=sd[L0 + "mlp.linear_fc1.weight"].shape[-2] == 2 * ffn,
        in_channels=in_ch, out_channels=sd["final_linear.linear.weight"].shape[0] // (pt * p * p),
        patch_size=p, t_patch_size=pt, caption_channels=sd["y_embedder.null_caption_embedding"].shape[1],
        caption_max_length=sd["y_embedder.null_caption_embedding"].shape[0],
        cond_dim=sd["t_embedder.mlp.0.weight"].shape[0], xattn_dim=sd["y_embedder.y_proj_xattn.0.weight"].shape[0],
        freq_dim=sd["t_embedder.mlp.0.weight"].shape[1], rope_bands=sd["rope.bands"].numel(),
        fp8_layers=tuple(sorted(i for i in idx if f"{_LAYER}{i}.self_attention.linear_qkv.q.weight_scale" in keys)),
        half_channel_vae=half, x_rescale_factor=0.1 if half else 1.0)
    try:
        _check_config(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MagiDiT(cfg).state_dict().items()}
    missing, extra = expected.keys() - keys, keys - expected.keys()
    if missing or extra:
        raise CheckpointError(
            f"{source}: key set is not MAGI-1's ({cfg.num_layers} layers, hidden {hidden}"
            f"{', fp8 layers ' + str(len(cfg.fp8_layers)) if cfg.fp8 else ''}): "
            + (f"missing {_few(missing)}" if missing else "") + ("; " if missing and extra else "")
            + (f"unexpected {_few(extra)}" if extra else "") + ".")
    bad = [f"{k} {tuple(sd[k].shape)} (expected {s})" for k, s in expected.items() if tuple(sd[k].shape) != s]
    if bad:
        raise CheckpointError(f"{source}: tensor shapes do not fit one MAGI-1 model: {_few(bad, 4)}.")
    return cfg


def magi_stored_dtype(ck: Checkpoint) -> str:
    """The dtype the big linears are stored in (the released files keep embeddings and head in fp32)."""
    q = ck.tensors.get(_LAYER + "0.self_attention.linear_qkv.q.weight")
    return DTYPE_NAMES.get(q.dtype, ck.main_dtype) if q is not None else ck.main_dtype


def build_magi(ck: Checkpoint, dtype: torch.dtype, device: str | torch.device = "cpu",
               operations: Operations = TORCH_OPERATIONS) -> MagiDiT:
    """A MagiDiT from an already read checkpoint (bare keys), computing in ``dtype``, its layers from
    ``operations``. fp8 weights stay fp8 and are upcast per call; the modules the official code promotes
    (embedders, q/k norms, post-norms, head) are held in fp32. ``flowcache.models.load_model`` reads the file."""
    cfg = magi_config_from_state_dict(ck.tensors, ck.name)
    with torch.device("meta"):
        model = MagiDiT(cfg, dtype=dtype, operations=operations)
    params = dict(model.named_parameters())
    sd = {k: v.to(device=device, dtype=params[k].dtype) for k, v in ck.tensors.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.requires_grad_(False).eval()


__all__ = ["MagiConfig", "MagiDiT", "Fp8Linear", "LayerNorm1p", "apply_rope", "build_magi", "distill_dt_for_steps",
           "magi_config_from_state_dict", "magi_stored_dtype"]
