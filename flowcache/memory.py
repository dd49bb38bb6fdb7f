"""How much device memory a FlowCache run needs: weights, one batched chunk forward, and the KV stores.

``python -m flowcache inspect CHECKPOINT --memory WIDTHxHEIGHT`` prints it for a checkpoint (read from its
headers: a 28 GB model is not loaded) or for a released architecture built in memory on meta tensors
(``RELEASED``), and the ComfyUI nodes pass the activation figure to ComfyUI's memory manager, so that it
leaves room for the forward when it decides how much of a model to load.

The figures are estimates of what the pack's code keeps alive, not measurements:

* **weights** as the pack holds them inside ComfyUI: fp8 weights stay fp8 (upcast layer by layer), everything
  else in the compute dtype. Outside ComfyUI the CLI upcasts fp8 to the compute dtype at load.
* **activations**: the peak working set of the largest forward of a run. Wan (FlowCache's chunk path): the
  step that forwards the most chunks at once, every CFG branch in one batch; per block, the residual stream,
  the fp32 modulation, q/k/v with RoPE's fp32 temporaries, or the FFN's hidden layer, whichever is larger;
  plus the step's token buffers and the embedded text. Attention is counted as a memory-efficient kernel
  (no tokens x keys score matrix), as PyTorch's SDPA runs on a GPU. MAGI-1: one chunk per forward.
* **KV stores**: one per CFG branch (Wan) or stored guidance pass (MAGI-1), every layer's keys and values for
  the store's capacity: a whole window without a budget; ``budget`` chunks of compressed history plus the
  chunks that can be unclean at once with one (Wan's capacity rule in ``flowcache.pipelines``). MAGI-1
  without a budget keeps every chunk of the video.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import DTYPE_NAMES
from .df_schedule import timestep_matrix
from .errors import InputError
from .schedulers import flow_sigmas

GiB = 1024 ** 3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8_e4m3fn": 1, "fp8_e5m2": 1}
FP8_NAMES = ("fp8_e4m3fn", "fp8_e5m2")


@dataclass
class MemoryEstimate:
    """Bytes, each figure for the whole run's peak (see the module docstring)."""

    model: str
    resolution: str
    weights: dict[str, int]            # held bytes per dtype name
    activations: int                   # the largest forward's working set
    kv: int                            # KV stores without a budget
    kv_budget: int                     # KV stores with ``budget_chunks`` of compressed history
    budget_chunks: int
    facts: dict = field(default_factory=dict)  # tokens, batch, chunks: what the figures were computed from

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    def total(self, budget: bool) -> int:
        return self.weights_total + self.activations + (self.kv_budget if budget else self.kv)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights_total"] = self.weights_total
        d["total"] = self.total(False)
        d["total_with_budget"] = self.total(True)
        return d

    def table(self) -> str:
        """A small text table in GiB."""
        def g(n: int) -> str:
            return f"{n / GiB:.2f}"
        rows = [("weights " + ", ".join(f"{k} {g(v)}" for k, v in sorted(self.weights.items())), self.weights_total),
                (f"activations (one forward: {self.facts.get('forward', '')})", self.activations),
                (f"KV stores, no budget ({self.facts.get('kv', '')})", self.kv),
                (f"KV stores, kv_budget {self.budget_chunks} ({self.facts.get('kv_budget', '')})", self.kv_budget),
                ("total, no budget", self.total(False)),
                (f"total, kv_budget {self.budget_chunks}", self.total(True))]
        width = max(len(r[0]) for r in rows)
        head = f"{self.model} at {self.resolution} (GiB)"
        return "\n".join([head] + [f"  {name:<{width}}  {g(n):>8}" for name, n in rows])


def held_weight_bytes(family: str, cfg, shapes: dict[str, tuple[tuple[int, ...], str]], compute: str
                      ) -> dict[str, int]:
    """Bytes per dtype of a model given as key -> (shape, stored dtype name), as the pack holds it inside ComfyUI.

    Wan: fp8 weights stay fp8, the rest is held in ``compute``. MAGI-1: as ``MagiDiT`` holds it (the modules
    the official code promotes in fp32, the fp8 release's linears in fp8 with their scales, the rest in
    ``compute``)."""
    out: dict[str, int] = {}
    if family == "magi":
        from .models.magi import MagiDiT
        with torch.device("meta"):
            model = MagiDiT(cfg, dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute])
        for t in model.state_dict().values():
            name = DTYPE_NAMES.get(t.dtype, "fp32")
            out[name] = out.get(name, 0) + t.numel() * t.element_size()
        return out
    for shape, dtype in shapes.values():
        name = dtype if dtype in FP8_NAMES else compute
        out[name] = out.get(name, 0) + math.prod(shape) * BYTES[name]
    return out


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--memory {text!r}: expected WIDTHxHEIGHT, e.g. 960x544.") from None
    if w <= 0 or h <= 0:
        raise InputError(f"--memory {text!r}: width and height must be positive.")
    return w, h


def _wan_forward_bytes(cfg, rows: int, branches: int, text_len: int, c: int) -> int:
    """Working set of one Wan forward of ``rows`` tokens (all branches together), compute dtype of ``c`` bytes."""
    d, f, ps = cfg.dim, cfg.ffn_dim, cfg.patch_size
    block = max(rows * d * (5 * c + 8),            # q, k, v, attention output, o; RoPE's fp32 q/k temporaries
                rows * (d * c + 2 * f * c),        # modulated input, FFN hidden and its GELU
                rows * d * (8 + c))                # fp32 LayerNorm and modulation of the residual
    step = rows * d * c * 3 + rows * (cfg.out_dim * math.prod(ps)) * 4  # token buffers, head output
    text = branches * text_len * d * c * 3          # embedded text and one block's cross-attention keys/values
    return rows * d * c + block + step + text


def estimate_wan(cfg, weights: dict[str, int], width: int, height: int, *, frames: int = 97,
                 base_frames: int = 97, overlap: int = 17, chunk: int = 5, steps: int = 50, ar_step: int = 5,
                 branches: int = 2, budget: int = 1, compute: str = "bf16", text_len: int = 512,
                 temporal_stride: int = 4, spatial_stride: int = 8, name: str = "wan",
                 whole_window: bool = False, residuals: int = 0) -> MemoryEstimate:
    """A SkyReels-V2 diffusion-forcing run with FlowCache's chunk path (defaults: SkyReels' 540P settings, CFG
    on, one window of 97 frames; ``frames`` > ``base_frames`` adds windows that start from an overlap).
    ``whole_window``: the window path's forward (every chunk of the window at once) instead. ``residuals``: the
    cache's backbone residuals kept per chunk and branch (``residuals_kept``), a window's worth each."""
    c = BYTES[compute]
    d, layers = cfg.dim, cfg.num_layers
    ps = cfg.patch_size
    tok_frame = (height // spatial_stride // ps[1]) * (width // spatial_stride // ps[2])
    chunk_tokens = chunk * tok_frame // ps[0]
    total_lat = (frames - 1) // temporal_stride + 1
    base_lat = min(total_lat, (base_frames - 1) // temporal_stride + 1)
    overlap_lat = (overlap - 1) // temporal_stride + 1 if total_lat > base_lat else 0
    nb = base_lat // chunk
    if nb < 1:
        raise InputError(f"frames={frames}: less than one chunk of {chunk} latent frames.")
    _, timesteps = flow_sigmas(steps, 8.0)
    most, kv_rows, kv_rows_budget = 0, 0, 0
    for pb in ((0, overlap_lat // chunk) if overlap_lat else (0,)):
        sched = timestep_matrix(nb, timesteps, ar_step, pb)
        per_step = [int(sched.update_mask[i].sum()) + (pb if i == 0 else 0) for i in range(sched.iterations)]
        most = max(most, max(per_step))
        window_rows = nb * chunk_tokens
        kv_rows = max(kv_rows, window_rows)
        kv_rows_budget = max(kv_rows_budget, min(window_rows, (budget + sched.max_active() + 1 + pb) * chunk_tokens))
    if whole_window:  # the window path (off, TeaCache): every chunk of the window, prefix included, each step
        most = nb
    tokens = most * chunk_tokens  # per branch, in the largest batched forward
    cached = residuals * branches * kv_rows * d * c  # kv_rows: the largest window's tokens
    activations = _wan_forward_bytes(cfg, branches * tokens, branches, text_len, c) + cached
    per_row = layers * 2 * d * c  # keys and values of one token, every layer
    return MemoryEstimate(
        name, f"{width}x{height}, {frames} frames", weights, activations, branches * kv_rows * per_row,
        branches * kv_rows_budget * per_row, budget,
        {"forward": f"{branches} branches x {most} chunks x {chunk_tokens} tokens",
         "kv": f"{branches} x {kv_rows} tokens", "kv_budget": f"{branches} x {kv_rows_budget} tokens",
         "tokens_per_chunk": chunk_tokens, "chunks_per_window": nb, "compute": compute,
         "cached_residuals": f"{residuals} x {branches} x {kv_rows} tokens"})


def estimate_causal(cfg, weights: dict[str, int], width: int, height: int, *, frames: int = 81,
                    block_frames: int = 3, kv_blocks: int | None = None, compute: str = "bf16",
                    text_len: int = 512, temporal_stride: int = 4, spatial_stride: int = 8,
                    name: str = "wan-causal") -> MemoryEstimate:
    """A causal Wan run (Self-Forcing, CausVid, Causal Forcing): one block per forward, no guidance branch; the
    KV store holds ``kv_blocks`` blocks (None: every block of the video, kv_mode global)."""
    c = BYTES[compute]
    ps = cfg.patch_size
    tok_frame = (height // spatial_stride // ps[1]) * (width // spatial_stride // ps[2])
    latent = (frames - 1) // temporal_stride + 1
    blocks = max(1, latent // block_frames)
    block_tokens = block_frames * tok_frame // ps[0]
    kept = blocks if kv_blocks is None else min(blocks, kv_blocks)
    per_row = cfg.num_layers * 2 * cfg.dim * c
    kv = kept * block_tokens * per_row
    text_kv = cfg.num_layers * 2 * text_len * cfg.dim * c  # the text's cross-attention K/V, kept for the run
    return MemoryEstimate(
        name, f"{width}x{height}, {frames} frames", weights,
        _wan_forward_bytes(cfg, block_tokens, 1, text_len, c) + text_kv,
        kv, kv, kept, {"forward": f"1 block x {block_tokens} tokens", "kv": f"{kept} of {blocks} blocks",
                       "kv_budget": f"{kept} of {blocks} blocks", "tokens_per_chunk": block_tokens, "compute": compute})


def estimate_magi(cfg, weights: dict[str, int], width: int, height: int, *, frames: int = 96, chunk: int = 6,
                  window: int = 4, passes: int = 1, budget: int = 1, compute: str = "bf16",
                  text_len: int = 800, temporal_stride: int = 4, spatial_stride: int = 8,
                  name: str = "magi") -> MemoryEstimate:
    """A MAGI-1 run (defaults: the distilled model, one stored pass, 96 frames: 4 chunks of 6; the base model's
    guidance keeps two stores, ``passes=2``)."""
    c = BYTES[compute]
    d, f, layers = cfg.hidden_size, cfg.ffn_hidden_size * (2 if cfg.gated_linear_unit else 1), cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    tok_frame = (height // spatial_stride // cfg.patch_size) * (width // spatial_stride // cfg.patch_size)
    tokens = chunk * tok_frame
    chunks = max(1, math.ceil(frames // temporal_stride / chunk))
    block = max(tokens * (d * c + 2 * q * c + 2 * kv * c + 2 * (q + kv) * 4 + 2 * q * c + 2 * q * 4 + d * 4),
                tokens * (d * c + 2 * f * c))
    activations = tokens * d * (c + 4) + block + text_len * cfg.xattn_dim * 4 * 2
    per_row = layers * 2 * kv * c
    cap = chunks
    cap_budget = min(chunks, max(1, budget + window))
    return MemoryEstimate(
        name, f"{width}x{height}, {frames} frames", weights, activations, passes * cap * tokens * per_row,
        passes * cap_budget * tokens * per_row, budget,
        {"forward": f"1 chunk x {tokens} tokens", "kv": f"{passes} x {cap} chunks",
         "kv_budget": f"{passes} x {cap_budget} chunks", "tokens_per_chunk": tokens, "chunks": chunks,
         "compute": compute})


# ------------------------------------------------------------------------------ what to estimate for

def _released_wan(dim: int, ffn: int, heads: int, layers: int, fps: bool) -> dict:
    return {"family": "wan", "config": dict(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, has_fps=fps)}


RELEASED = {
    "skyreels-v2-df-1.3b": _released_wan(1536, 8960, 12, 30, True),   # inject_sample_info: the fps embedding
    "skyreels-v2-df-14b": _released_wan(5120, 13824, 40, 40, False),
    # causal releases: block by block, a bounded store (in 3-frame blocks), any length in flat memory.
    # Krea Realtime 14B (Wan2.1-T2V-14B): its store holds the 3-frame context and the block.
    "krea-realtime-14b": {**_released_wan(5120, 13824, 40, 40, False),
                          "causal": {"block_frames": 3, "kv_blocks": 2, "frames": 105}},
    # LongLive v1.0 (Wan2.1-T2V-1.3B, its LoRA merged): a 12-frame window (sink included)
    "longlive-1.3b": {**_released_wan(1536, 8960, 12, 30, False),
                      "causal": {"block_frames": 3, "kv_blocks": 4, "frames": 237}},
    "magi-1-4.5b-distill": {"family": "magi", "config": {}},           # MagiConfig's defaults are the 4.5B
}
MAGI_FP8_LAYERS = lambda layers: tuple(range(1, layers - 1))  # noqa: E731  the fp8 release: all but first/last


def released_shapes(name: str, weights: str = "bf16") -> tuple[str, object, dict[str, tuple[tuple[int, ...], str]]]:
    """(family, config, key -> (shape, dtype)) of a released architecture, built on meta tensors.

    weights: bf16, fp16, fp32, or fp8_e4m3fn: the linear layers' weights in fp8 (as fp8 checkpoints store them;
    MAGI-1: its fp8 release's layout, the big linears of every layer but the first and last), the rest bf16."""
    if name not in RELEASED:
        raise InputError(f"{name}: not a released architecture this knows ({', '.join(RELEASED)}).")
    spec = RELEASED[name]
    fp8 = weights in FP8_NAMES
    with torch.device("meta"):
        if spec["family"] == "wan":
            from .models.wan import WanConfig, WanDiT
            cfg = WanConfig(**spec["config"])
            model = WanDiT(cfg)
        else:
            from .models.magi import MagiConfig, MagiDiT
            cfg = MagiConfig(**spec["config"])
            if fp8:
                cfg = MagiConfig(**{**spec["config"], "fp8_layers": MAGI_FP8_LAYERS(cfg.num_layers)})
            model = MagiDiT(cfg, dtype=torch.bfloat16)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    base = "bf16" if fp8 else weights
    shapes = {k: (tuple(v.shape), weights if (fp8 and k in linears) else base) for k, v in model.state_dict().items()}
    return spec["family"], cfg, shapes


def checkpoint_shapes(path: str) -> tuple[str, object, dict[str, tuple[tuple[int, ...], str]]]:
    """(family, config, key -> (shape, dtype name)) of a checkpoint, from its headers when it is safetensors."""
    from .checkpoint import checkpoint_files, split_prefix
    from .checkpoint import _check_safetensors_header as header  # validated: the file may be hostile
    from .models import ALL_ANCHORS, FAMILIES, detect_family, read_checkpoint

    files = checkpoint_files(path)
    st_names = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
    if all(f.suffix == ".safetensors" or f.name.endswith(".sft") for f in files):
        raw: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in files:
            for k, v in header(f).items():
                if k != "__metadata__":
                    raw[k] = (tuple(v["shape"]), st_names.get(v["dtype"], "fp32"))
        prefix = split_prefix(raw.keys(), ALL_ANCHORS)
        shapes = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        family = detect_family(shapes.keys())
        if family is None:
            read_checkpoint(path)  # raises the loader's own "not a supported video model" error
        sd = {k: torch.empty(s, dtype=torch.float32, device="meta") for k, (s, _) in shapes.items()}
    else:
        ck, family = read_checkpoint(path)
        shapes = {k: (tuple(v.shape), DTYPE_NAMES.get(v.dtype, "fp32")) for k, v in ck.tensors.items()}
        sd = {k: v.to("meta") for k, v in ck.tensors.items()}
    from .checkpoint import Checkpoint
    ck = Checkpoint(tensors=sd, files=files)
    cfg_dict = FAMILIES[family].config(ck)
    if family == "wan":
        from .models.wan import WanConfig
        cfg = WanConfig(**{**cfg_dict, "patch_size": tuple(cfg_dict["patch_size"])})
    else:
        from .models.magi import MagiConfig
        cfg = MagiConfig(**{**cfg_dict, "fp8_layers": tuple(cfg_dict["fp8_layers"])})
    return family, cfg, shapes


def _check_model_named(model: str) -> None:
    """A name that is neither a released architecture nor an existing path: say which names are released (a
    mistyped one is the likely cause), and the closest."""
    from .checkpoint import _is

    if _is(lambda p: p.exists(), Path(model)):
        return
    near = difflib.get_close_matches(model.lower(), RELEASED, n=1, cutoff=0.5)
    raise InputError(f"{model}: no such file or folder, nor a released architecture (those are "
                     f"{', '.join(RELEASED)}){f'; did you mean {near[0]}?' if near else '.'}")


def _own_settings(model: str) -> dict:
    """``estimate_wan`` keywords a Wan checkpoint fixes itself, from its headers (safetensors only): its latent
    geometry and text length (``flowcache.*`` metadata), and for the demo model its own default run
    (``DEMO_SETTINGS``: 36 frames in two windows of 20, chunks of 4, ...) instead of SkyReels' 97 frames."""
    from .checkpoint import checkpoint_files, read_headers
    from .models import _meta_geometry, _meta_int

    files = checkpoint_files(model)
    if not all(f.suffix == ".safetensors" or f.name.endswith(".sft") for f in files):
        return {}
    _, meta = read_headers(files)
    own: dict = {}
    geometry = _meta_geometry(meta, files[0].name) or {}
    own.update({k: geometry[k] for k in ("temporal_stride", "spatial_stride") if geometry.get(k, 0) >= 1})
    text_len = _meta_int(meta, "flowcache.text_len", files[0].name)
    if text_len:
        own["text_len"] = text_len
    if meta.get("flowcache.model_key") == "demo":
        try:
            from .demo import DEMO_SETTINGS as d
        except ImportError:  # the core without its demo assets
            return own
        own.update(frames=d["num_frames"], base_frames=d["base_num_frames"], overlap=d["overlap_history"],
                   chunk=d["causal_block_size"], steps=d["steps"], ar_step=d["ar_step"],
                   branches=2 if d["cfg"] > 1.0 else 1)
    return own


def estimate(model: str, resolution: str, *, frames: int | None = None, budget: int = 1, compute: str = "bf16",
             weights: str = "bf16") -> MemoryEstimate:
    """The estimate for a checkpoint path or a ``RELEASED`` name at ``WIDTHxHEIGHT``."""
    if compute not in ("bf16", "fp16", "fp32"):
        raise InputError(f"--dtype {compute!r}: the compute dtype is bf16, fp16 or fp32.")
    if weights not in BYTES:
        raise InputError(f"--weight-dtype {weights!r}: one of {', '.join(BYTES)}.")
    if budget < 0:
        raise InputError(f"--kv-budget {budget}: must be ≥ 0 chunks.")
    w, h = _parse_resolution(resolution)
    own: dict = {}
    if model in RELEASED:
        family, cfg, shapes = released_shapes(model, weights)
    else:
        _check_model_named(model)
        family, cfg, shapes = checkpoint_shapes(model)
        own = _own_settings(model) if family == "wan" else {}
    held = held_weight_bytes(family, cfg, shapes, compute)
    label = model if model in RELEASED else str(model)
    causal = RELEASED.get(model, {}).get("causal") if model in RELEASED else None
    if family == "wan" and causal:
        if w % 16 or h % 16:
            raise InputError(f"--memory {resolution}: Wan needs multiples of 16.")
        return estimate_causal(cfg, held, w, h, frames=frames or causal["frames"], block_frames=causal["block_frames"],
                               kv_blocks=causal["kv_blocks"], compute=compute, name=label)
    if family == "wan":
        if w % 16 or h % 16:
            raise InputError(f"--memory {resolution}: Wan needs multiples of 16.")
        default_frames = own.pop("frames", 97)  # one SkyReels window, unless the model says otherwise
        return estimate_wan(cfg, held, w, h, frames=frames or default_frames, budget=budget, compute=compute,
                            name=label, **own)
    if w % 16 or h % 16:
        raise InputError(f"--memory {resolution}: MAGI-1 needs multiples of 16.")
    return estimate_magi(cfg, held, w, h, frames=frames or 96, budget=budget, compute=compute, name=label)


# ------------------------------------------------------------------------------ refusing what cannot fit

def available_bytes(device: torch.device) -> int | None:
    """Memory a run could use on ``device`` outside ComfyUI (the nodes ask ComfyUI's memory manager instead):
    CUDA's free memory plus what PyTorch holds unused; on the CPU, Linux's MemAvailable. None when unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def working_bytes(estimate: Callable[[], MemoryEstimate], kv: str | None) -> int:
    """Bytes a run needs beside the weights (one forward, plus the KV stores ``kv`` names: "kv" or "kv_budget");
    0 when the estimate does not apply (the run's own checks then report the bad settings)."""
    try:
        est = estimate()
    except (InputError, ValueError, ZeroDivisionError):
        return 0
    return est.activations + (getattr(est, kv) if kv else 0)


def df_need(cfg, s, *, window_path: bool, kv_budget: int, compute: str, text_len: int, temporal_stride: int,
            spatial_stride: int, residuals: int = 0) -> Callable[[int, int], int]:
    """Working bytes of a diffusion-forcing run at a (width, height), the other settings taken from ``s`` (a
    ``DFSettings``): the window path's whole-window forward, or the chunk path's forward and its KV stores;
    plus the cache's residuals (``residuals_kept``)."""
    def need(width: int, height: int) -> int:
        return working_bytes(lambda: estimate_wan(
            cfg, {}, width, height, frames=s.num_frames, base_frames=s.base_num_frames, overlap=s.overlap_history,
            chunk=s.causal_block_size, steps=s.steps, ar_step=s.ar_step, branches=2 if s.cfg > 1.0 else 1,
            budget=kv_budget, compute=compute, text_len=text_len, temporal_stride=temporal_stride,
            spatial_stride=spatial_stride, whole_window=window_path, residuals=residuals),
            None if window_path else ("kv_budget" if kv_budget else "kv"))
    return need


def largest_fitting_size(need: Callable[[int, int], int], width: int, height: int, available: int,
                         unit: int) -> tuple[int, int] | None:
    """The largest (width, height) at about the same aspect ratio, both multiples of ``unit`` and no larger than
    asked, whose ``need(width, height)`` fits in ``available`` bytes; None when not even one unit does."""
    n_max = max(width, height) // unit
    lo, hi, best = 1, n_max, None
    while lo <= hi:  # the need grows with the size: bisect on the longer side's units
        n = (lo + hi) // 2
        scale = n * unit / max(width, height)
        w = max(unit, min(width, int(width * scale) // unit * unit))
        h = max(unit, min(height, int(height * scale) // unit * unit))
        if need(w, h) <= available:
            best, lo = (w, h), n + 1
        else:
            hi = n - 1
    return best


def check_fits(need: Callable[[int, int], int], width: int, height: int, frames: int, available: int | None,
               device: str, unit: int, where: str = "FlowCache Sampler") -> int:
    """Refuse a run whose working memory (one forward and the KV stores, beside the weights, which ComfyUI can
    stream layer by layer) exceeds what ``device`` has available, naming the largest size that fits. Returns
    the need in bytes. ``available`` None: unknown, nothing is refused."""
    needed = need(width, height)
    if available is None or needed <= available:
        return needed
    fit = largest_fitting_size(need, width, height, available, unit)
    hint = (f"expected at most {fit[0]}x{fit[1]} (the largest size that fits at this aspect ratio and frame count)"
            if fit else "no size fits at this frame count: expected fewer frames")
    raise InputError(f"{where}: width={width}, height={height}, num_frames={frames} need about "
                     f"{needed / GiB:.1f} GiB, the {device} has about {available / GiB:.1f} GiB; {hint}. The estimate "
                     "is the working memory beside the weights (one forward and the KV cache); fewer frames or a "
                     "kv_budget also lower it.")


__all__ = ["MemoryEstimate", "RELEASED", "estimate", "estimate_wan", "estimate_magi", "estimate_causal",
           "held_weight_bytes", "released_shapes", "checkpoint_shapes", "available_bytes", "working_bytes", "df_need",
           "largest_fitting_size", "check_fits"]
