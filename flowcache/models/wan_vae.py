"""The Wan2.1 video VAE (causal 3-D conv, 8x spatial / 4x temporal, 16 latent channels), ComfyUI-free.

Key names are the released ones (``Wan2.1_VAE.pth``; ComfyUI's ``wan_2.1_vae.safetensors``): ``encoder.*``,
``conv1``, ``conv2``, ``decoder.*``. Config: dim=96, z_dim=16, dim_mult [1,2,4,4], 2 res blocks, temporal
downsample [False, True, True]; ``dim`` may be smaller for tests (same structure).

Causality and streaming. Every layer with temporal context keeps its state in a ``cache`` dict keyed by the
layer itself, so the state follows the layer no matter how a video is cut into chunks:
- ``CausalConv3d`` (temporal kernel 3): zero-pads 2 frames on the left; with a cache, the last <= 2 input
  frames of earlier calls replace that padding.
- ``upsample3d``: the stream's first frame skips ``time_conv`` (Wan's 'Rep'); later frames go through
  ``time_conv`` (C -> 2C, causal, zero history) and each becomes two frames. Latent 0 -> 1 frame, later -> 4.
- ``downsample3d``: the first frame passes; later frames go through ``time_conv`` (kernel 3, stride 2, no
  padding) over the whole sequence, the last consumed frame carried to the next call. Pixel frame 0 -> latent
  0, then every 4 pixel frames -> 1 latent.
An empty dict (or ``None``) is a fresh stream, so one call over all frames is the plain (non-chunked) causal
model, and pieces of any size fed through one dict give the same result (checked in tests).
Pixels are 0..1 outside, -1..1 inside (Wan / ComfyUI convention); decoded pixels are clamped.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import DTYPE_NAMES, compute_dtype, load_checkpoint
from ..errors import CheckpointError, InputError
from ..latent_format import wan_to_model_space, wan_to_raw

Cache = dict  # {layer module: its causal state}; one per stream


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only on the left in time (2·p_t frames): x [B,Ci,t,H,W] -> [B,Co,t',H,W]."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, p[1], p[2]))
        self.ctx = 2 * p[0]  # frames of history the kernel reads

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if self.ctx == 0:
            return super().forward(x)
        prev = cache.get(self) if cache is not None else None
        if prev is not None:
            x = torch.cat([prev, x], 2)
        if cache is not None:
            cache[self] = x[:, :, -self.ctx:].clone()  # clone: keep only these frames alive
        return super().forward(F.pad(x, (0, 0, 0, 0, self.ctx - (0 if prev is None else prev.shape[2]), 0)))


class RMS_norm(nn.Module):
    """F.normalize over channels · sqrt(C) · gamma; gamma [C,1,1,1] for 5-D input, [C,1,1] for images."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma.to(x.dtype)


def _run(seq: nn.Module, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Run a Sequential, passing the stream cache to the layers that take one."""
    for m in seq:
        x = m(x, cache) if isinstance(m, (CausalConv3d, RMS_norm, ResidualBlock, AttentionBlock, Resample)) else m(x)
    return x


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D op to every frame: [B,C,t,H,W] -> [B,C',t,H',W']."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """[RMS, SiLU, CausalConv 3³, RMS, SiLU, Dropout, CausalConv 3³] + 1x1x1 shortcut if channels change."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(RMS_norm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
                                      RMS_norm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return _run(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame (no temporal mixing, so no state)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _frame(self, x: torch.Tensor) -> torch.Tensor:  # [N,C,H,W]
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(2, 3).unsqueeze(2).unbind(1)
        # the VAE's own attention stays on SDPA: attention_backend routes the DiT's attention only
        y = F.scaled_dot_product_attention(q, k, v)  # [N,1,HW,C]
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return x + _per_frame(self._frame, x)


class _Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """upsample2d/3d: [B,C,t,H,W] -> [B,C/2,t',2H,2W]; downsample2d/3d: -> [B,C,t',H/2,W/2].

    t' = t for the 2d modes; see the module docstring for the 3d modes' frame counts.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(_Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            parts = []
            if self not in cache:  # the stream's first frame: 'Rep', no time_conv
                cache[self] = True
                parts, x = [x[:, :, :1]], x[:, :, 1:]
            if x.shape[2]:
                y = self.time_conv(x, cache)  # [B,2C,t,H,W] -> interleave to [B,C,2t,H,W]
                b, c2, t, h, w = y.shape
                parts.append(y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w))
            x = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            tail = cache.get(self)
            parts = [] if tail is not None else [x[:, :, :1]]  # first frame passes through
            buf = x if tail is None else torch.cat([tail, x], 2)
            n = (buf.shape[2] - 1) // 2  # outputs: frames (0,1,2), (2,3,4), ... of buf
            if n:
                parts.append(self.time_conv(buf[:, :, :1 + 2 * n]))
            cache[self] = buf[:, :, 2 * n:].clone()
            x = torch.cat(parts, 2) if len(parts) > 1 else (parts[0] if parts else x[:, :, :0])
        return x


class Encoder3d(nn.Module):
    """pixels [B,3,T,H,W] in -1..1 -> [B,2z,T',H/8,W/8] (mu | log_var before ``conv1``)."""

    def __init__(self, dim: int, z2: int, dim_mult, num_res_blocks: int, temporal_downsample):
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                layers.append(Resample(cout, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(cout, cout), AttentionBlock(cout), ResidualBlock(cout, cout))
        self.head = nn.Sequential(RMS_norm(cout), nn.SiLU(), CausalConv3d(cout, z2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        cache = {} if cache is None else cache
        x = self.conv1(x, cache)
        return _run(self.head, _run(self.middle, _run(self.downsamples, x, cache), cache), cache)


class Decoder3d(nn.Module):
    """[B,z,F,h,w] (after ``conv2``) -> pixels [B,3,T,8h,8w] in about -1..1 (T = 1 + 4(F-1) from a fresh cache)."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal_upsample):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin // 2 if i > 0 else cin  # every Resample before this stage halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                layers.append(Resample(cout, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(cout), nn.SiLU(), CausalConv3d(cout, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        cache = {} if cache is None else cache
        x = self.conv1(x, cache)
        return _run(self.head, _run(self.upsamples, _run(self.middle, x, cache), cache), cache)


def _to_frames(x: torch.Tensor) -> torch.Tensor:
    """[1,3,n,H,W] in -1..1 -> [n,H,W,3] float32 CPU in 0..1."""
    return x[0].float().clamp(-1, 1).add(1).mul(0.5).permute(1, 2, 3, 0).cpu()


class WanVAE(nn.Module):
    """The Wan2.1 VAE. ``encode``/``decode`` take and give pixels [T,H,W,3] in 0..1 and RAW latents.

    ``decode`` / ``stream`` work one latent frame at a time (as Wan does), so activations stay one latent's
    worth; ``encode`` works on frame 0 and then 4 frames at a time.
    """

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 temporal_downsample=(False, True, True)):
        super().__init__()
        self.z_dim = z_dim
        self.spatial_stride = 2 ** (len(dim_mult) - 1)
        self.temporal_stride = 2 ** sum(bool(t) for t in temporal_downsample)
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, tuple(temporal_downsample)[::-1])

    @property
    def _where(self) -> tuple[torch.device, torch.dtype]:
        p = self.conv2.weight
        return p.device, p.dtype

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T,H,W,3] (float 0..1 or uint8) -> raw mu [1,z,(T-1)//4+1,H/8,W/8] float32 CPU.

        Frames after the last full group of 4 are dropped (as in Wan and ComfyUI).
        """
        pixels = torch.as_tensor(pixels)
        s, st = self.spatial_stride, self.temporal_stride
        if pixels.dim() != 4 or pixels.shape[-1] != 3 or pixels.shape[0] < 1:
            raise InputError(f"WanVAE.encode: pixels must be [T, H, W, 3], got {list(pixels.shape)}")
        if pixels.shape[1] % s or pixels.shape[2] % s:
            raise InputError(f"WanVAE.encode: height and width must be multiples of {s}, got "
                             f"{pixels.shape[1]}x{pixels.shape[2]}; resize or crop the frames.")
        device, dtype = self._where
        n_lat = (pixels.shape[0] - 1) // st + 1
        cache: Cache = {}
        out = []
        for a, b in [(0, 1)] + [(1 + st * i, 1 + st * (i + 1)) for i in range(n_lat - 1)]:
            x = pixels[a:b].to(device)
            x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()) * 2 - 1
            h = self.encoder(x.permute(3, 0, 1, 2)[None].to(dtype), cache)
            out.append(self.conv1(h)[:, :self.z_dim].float().cpu())
        return torch.cat(out, 2)

    def stream(self, latent_space: str = "raw", latents_per_step: int = 1) -> "StreamingDecoder":
        """A fresh streaming decoder over this VAE (see ``StreamingDecoder``)."""
        return StreamingDecoder(self, latent_space, latents_per_step)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """raw latents [1,z,F,h,w] -> pixels [1+4(F-1), 8h, 8w, 3] float32 CPU in 0..1."""
        return self.stream().decode(z)


class StreamingDecoder:
    """Decodes a video's latents in pieces, keeping the causal cache between calls.

    ``decode(z_chunk [1,16,k,h,w]) -> pixels [n,8h,8w,3]`` (0..1, float32 CPU): the stream's first latent gives
    1 frame, every later one 4, and the frames of all calls together equal one whole decode. ``latent_space``
    "raw" takes raw VAE latents (ComfyUI LATENT); "model" takes the DiT's normalised latents. Callable, so it
    is a ``flowcache.decode_save.StreamDecoder``. One object per video; ``reset()`` starts a new one.
    """

    def __init__(self, vae: WanVAE, latent_space: str = "raw", latents_per_step: int = 1):
        if latent_space not in ("raw", "model"):
            raise InputError(f"latent_space must be 'raw' or 'model', got {latent_space!r}")
        self.vae, self.latent_space, self.step = vae, latent_space, max(1, int(latents_per_step))
        self.reset()

    def reset(self) -> None:
        self.cache: Cache = {}
        self.latents_seen = 0

    def _steps(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        if z.dim() == 4:
            z = z[None]
        if z.dim() != 5 or z.shape[0] != 1 or z.shape[1] != self.vae.z_dim:
            raise InputError(f"Wan VAE decode: latents must be [1, {self.vae.z_dim}, F, h, w], got {list(z.shape)}")
        if self.latent_space == "model":
            z = wan_to_raw(z)
        for a in range(0, z.shape[2], self.step):
            yield z[:, :, a:a + self.step]

    @torch.inference_mode()
    def decode(self, z_chunk: torch.Tensor) -> torch.Tensor:
        device, dtype = self.vae._where
        frames = []
        for z in self._steps(z_chunk):
            x = self.vae.conv2(z.to(device, dtype))
            frames.append(_to_frames(self.vae.decoder(x, self.cache)))
            self.latents_seen += z.shape[2]
        if not frames:
            raise InputError("Wan VAE decode: got 0 latent frames")
        return torch.cat(frames) if len(frames) > 1 else frames[0]

    __call__ = decode


class WanVAECodec:
    """The pipeline's ``LatentCodec`` in MODEL space (normalised latents) over a ``WanVAE``."""

    spatial_stride, temporal_stride, channels = 8, 4, 16

    def __init__(self, vae: WanVAE):
        self.vae = vae

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [T,H,W,3] in 0..1 -> model-space latents [1,16,(T-1)//4+1,H/8,W/8]."""
        return wan_to_model_space(self.vae.encode(pixels))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """model-space latents [1,16,F,h,w] -> pixels [1+4(F-1),8h,8w,3] in 0..1."""
        return self.vae.decode(wan_to_raw(latents))

    def stream_decoder(self) -> StreamingDecoder:
        """A fresh streaming decoder taking model-space latent chunks."""
        return self.vae.stream("model")


VAE_PREFIXES = ("vae.", "first_stage_model.")  # ComfyUI all-in-one files; SD-style packaging
_WAN22_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"


def load_wan_vae(path: str | os.PathLike, dtype: str = "auto", device: str | torch.device = "cpu") -> WanVAE:
    """Read a Wan2.1 VAE (.safetensors or .pth, bare keys or under ``vae.`` / ``model.``) -> eval ``WanVAE``.

    ``dtype``: auto (as stored; fp8 -> bf16), fp32, bf16, fp16. ``dim``/``z_dim`` come from the shapes.
    Raises CheckpointError naming the file when the keys or shapes are not the Wan2.1 VAE's.
    """
    ck = load_checkpoint(path, anchors=("decoder.conv1.weight", "encoder.conv1.weight"))
    return build_wan_vae(ck.tensors, ck.name, dtype, device)


def build_wan_vae(sd: dict[str, torch.Tensor], name: str = "Wan VAE", dtype: str = "auto",
                  device: str | torch.device = "cpu") -> WanVAE:
    """A ``WanVAE`` from a state dict in the released layout (e.g. ComfyUI's ``vae.first_stage_model.state_dict()``,
    whose module names are the original Wan ones); ``name`` is used in error messages."""
    for pre in VAE_PREFIXES:
        if pre + "decoder.conv1.weight" in sd:
            sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            break
    if _WAN22_KEY in sd:
        raise CheckpointError(f"{name}: this is the Wan2.2 VAE (48 latent channels); FlowCache needs the Wan2.1 "
                              "VAE (wan_2.1_vae.safetensors / Wan2.1_VAE.pth).")
    if "encoder.conv1.weight" not in sd or "conv2.weight" not in sd:
        raise CheckpointError(f"{name}: not a Wan2.1 VAE: it has no 'encoder.conv1.weight' / 'conv2.weight' "
                              f"(first keys: {', '.join(list(sd)[:4])}).")
    dim, z_dim = sd["encoder.conv1.weight"].shape[0], sd["conv2.weight"].shape[0]
    with torch.device("meta"):
        model = WanVAE(dim=dim, z_dim=z_dim)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {want[k]})" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                 f"wrong shapes: {'; '.join(shapes[:3])}" if shapes else ""]
        raise CheckpointError(f"{name}: does not match the Wan2.1 VAE layout (dim={dim}, z_dim={z_dim}): "
                              + ", ".join(p for p in parts if p) + ".")
    stored = Counter(DTYPE_NAMES.get(v.dtype, str(v.dtype)) for v in sd.values()).most_common(1)[0][0]
    dt = compute_dtype(dtype, stored)
    model.load_state_dict({k: sd[k].to(dt) for k in want}, assign=True)
    return model.to(device).eval().requires_grad_(False)
