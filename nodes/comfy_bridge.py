"""Lazy, guarded access to the ComfyUI APIs the nodes use.

Every function looks the ComfyUI module up when called (never at import), so the pack imports and its nodes
run without ComfyUI: on the CPU, with no progress bar, no interrupt and no UI events. Inside ComfyUI the
real modules are already in ``sys.modules`` and are used as they are.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Any

import torch

from ..flowcache.models.common import TORCH_OPERATIONS, Operations

log = logging.getLogger("FlowCache")


def _module(name: str) -> ModuleType | None:
    """ComfyUI's module ``name``, or None when it is not there (the pack running on its own: CPU, no cancel). A
    module that is there but fails to import is no reason to run without ComfyUI's device and cancel: its error
    surfaces, naming the module."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            return None  # the module, or a package above it, is absent
        raise ImportError(f"FlowCache: ComfyUI's {name} is installed but cannot be imported: it needs "
                          f"{e.name!r}, which is missing.") from e
    except Exception as e:  # noqa: BLE001 - re-raised with the module's name: a broken install, not "no ComfyUI"
        raise ImportError(f"FlowCache: ComfyUI's {name} is installed but failed to import ({type(e).__name__}: "
                          f"{e}).") from e


# ------------------------------------------------------------------------------------------- devices

def torch_device() -> torch.device:
    """The device ComfyUI runs models on (CPU without ComfyUI)."""
    mm = _module("comfy.model_management")
    return torch.device(mm.get_torch_device()) if mm is not None else torch.device("cpu")


def available_memory(device: torch.device) -> int | None:
    """Bytes a run could use on ``device``: on a GPU, what is free plus what ComfyUI can unload (its loaded
    models on that device), less its reserve; on the CPU, the free RAM. Without ComfyUI, the core's figure."""
    mm = _module("comfy.model_management")
    if mm is None:
        from ..flowcache.memory import available_bytes
        return available_bytes(device)
    free = int(mm.get_free_memory(device))
    if device.type in ("cpu", "mps"):
        return free
    unloadable = 0
    for loaded in list(getattr(mm, "current_loaded_models", [])):
        try:
            if torch.device(loaded.device) == device:
                unloadable += int(loaded.model_loaded_memory())
        except Exception:  # noqa: BLE001 - a model being freed meanwhile counts as nothing
            continue
    reserve = int(mm.extra_reserved_memory()) if hasattr(mm, "extra_reserved_memory") else 0
    return max(0, free + unloadable - reserve)


def offload_device() -> torch.device:
    mm = _module("comfy.model_management")
    return torch.device(mm.unet_offload_device()) if mm is not None else torch.device("cpu")


def text_encoder_device() -> torch.device:
    mm = _module("comfy.model_management")
    return torch.device(mm.text_encoder_device()) if mm is not None else torch.device("cpu")


def vae_device() -> torch.device:
    mm = _module("comfy.model_management")
    return torch.device(mm.vae_device()) if mm is not None else torch.device("cpu")


def soft_empty_cache() -> None:
    mm = _module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()


def comfy_package_dir() -> Path | None:
    """ComfyUI's ``comfy`` package folder (it ships tokenizer files), or None outside ComfyUI."""
    comfy = _module("comfy")
    where = getattr(comfy, "__file__", None) or next(iter(getattr(comfy, "__path__", []) or []), None)
    return Path(where).parent if where and where.endswith(".py") else (Path(where) if where else None)


class _PatchedModule(torch.nn.Module):
    """What ModelPatcher wraps: the DiT plus a writable ``device`` attribute.

    ModelPatcher assigns ``model.device``; WanDiT exposes ``device`` as a read-only property.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.diffusion_model = model
        self.device = device

    def get_dtype(self) -> torch.dtype:  # ModelPatcher.model_dtype() asks for it
        return next(self.diffusion_model.parameters()).dtype


class _PlainPatcher:
    """Stand-in for ModelPatcher without ComfyUI: moves the module between the two devices."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload: torch.device):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload


def make_patcher(module: torch.nn.Module) -> Any:
    """A ComfyUI ModelPatcher around ``module`` (so ComfyUI's memory manager can load/offload it)."""
    load, offload = torch_device(), offload_device()
    holder = _PatchedModule(module, offload)
    mp = _module("comfy.model_patcher")
    if mp is None or not hasattr(mp, "ModelPatcher"):
        return _PlainPatcher(holder, load, offload)
    return mp.ModelPatcher(holder, load_device=load, offload_device=offload)


def operations() -> Operations:
    """ComfyUI's layer operations for the pack's own models (``comfy.ops.pick_operations``): their layers cast
    weights to the input's dtype and device at use, so fp8 weights stay fp8 and ComfyUI may load a model
    partially (lowvram). Torch's own layers without ComfyUI."""
    ops = _module("comfy.ops")
    if ops is None or not hasattr(ops, "pick_operations"):
        return TORCH_OPERATIONS
    device = torch_device()

    def layers(hold: torch.dtype, compute: torch.dtype) -> Any:
        return ops.pick_operations(hold, compute, load_device=device)

    return Operations(layers, casts=True, name="ComfyUI comfy.ops")


def load_to_device(patcher: Any, memory_required: int = 0) -> None:
    """Load the model onto ComfyUI's device, unloading others as needed. ComfyUI loads as much of it as fits
    beside ``memory_required`` bytes of working memory (the run's activations and KV stores) and streams the
    rest layer by layer (its lowvram path); the pack's layers are ComfyUI's, which allows that."""
    mm = _module("comfy.model_management")
    if mm is None or isinstance(patcher, _PlainPatcher):
        patcher.model.to(patcher.load_device)
        return
    need = int(max(0, memory_required))
    mm.load_models_gpu([patcher], memory_required=need, minimum_memory_required=need)


def offload(patcher: Any) -> None:
    """Move this one model back to the offload device (other loaded models stay)."""
    mm = _module("comfy.model_management")
    if mm is None or isinstance(patcher, _PlainPatcher):
        patcher.model.to(patcher.offload_device)
        return
    loaded = getattr(mm, "current_loaded_models", [])
    for i, entry in enumerate(list(loaded)):
        if entry.model is patcher:
            loaded.pop(i)
            entry.model_unload()
            break
    else:
        patcher.detach()
    mm.soft_empty_cache()


# ----------------------------------------------------------------------------------------- attention

class HostAttention:
    """ComfyUI's attention as the core's attention function (``flowcache.models.common.attention_backend``).

    The core calls ``fn(q, k, v, mask)`` with q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] (grouped-query when
    Hq > Hkv) and an optional boolean mask [Lq, Lk] (True: attend). This hands the call to ComfyUI's
    ``optimized_attention`` (the kernel ComfyUI chose at start: --use-sage-attention, --use-flash-attention,
    pytorch, sub-quadratic, ...) with ``skip_reshape`` / ``skip_output_reshape`` for that layout and the MODEL's
    ``transformer_options``, so an ``optimized_attention_override`` set on the MODEL (attention-patch nodes) is
    called the way ComfyUI's own Wan calls it: ``override(kernel, q, k, v, heads=..., mask=..., ...)``.

    * Masks: ComfyUI's kernels take additive float masks (attention_basic reads a boolean one as a per-key
      padding mask, and flash / sage take none: ComfyUI falls back to SDPA for a masked call); the boolean mask
      becomes 0 / -inf in q's dtype, exactly what SDPA makes of a boolean mask itself.
    * Grouped-query attention (MAGI-1: 6 query heads per key/value head in the 4.5B): ComfyUI's kernels take one
      head count for q, k and v (``heads``), so the key/value heads are repeated here first.
    * MAGI-1's calls all come here (self-attention over the stored context, per-chunk block-causal slices, the
      per-caption cross-attention); none of its shapes needs the core's own kernel. Only the VAEs' attention
      (flowcache/models/wan_vae.py, magi_vae.py: one head over a frame's pixels) stays on SDPA: it is not the
      DiT's, and ComfyUI's own VAEs do not go through optimized_attention either.
    """

    def __init__(self, kernel: Callable, transformer_options: dict | None, override: bool):
        self.kernel = kernel
        self.options = transformer_options if transformer_options is not None else {}
        self.override = override
        self.calls = 0

    @property
    def kernel_name(self) -> str:
        return getattr(self.kernel, "__name__", type(self.kernel).__name__)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        b, heads, lq, d = q.shape
        if k.shape[1] != heads:
            group = heads // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out = self.kernel(q, k, v, heads=heads, mask=mask, skip_reshape=True, skip_output_reshape=True,
                          transformer_options=self.options)
        if out.shape == (b, lq, heads * v.shape[-1]):  # a kernel (or override) that ignored skip_output_reshape
            out = out.view(b, lq, heads, v.shape[-1]).transpose(1, 2)
        return out

    def describe(self) -> str:
        how = "the MODEL's optimized_attention_override around " if self.override else ""
        return f"attention: {how}ComfyUI's {self.kernel_name}"

    def to_dict(self) -> dict:
        return {"kernel": self.kernel_name, "override": self.override, "calls": self.calls}


def host_attention(transformer_options: dict | None = None) -> HostAttention | None:
    """The run's attention function from ComfyUI (None without ComfyUI: the core keeps torch's SDPA)."""
    attention = _module("comfy.ldm.modules.attention")
    kernel = getattr(attention, "optimized_attention", None) if attention is not None else None
    if kernel is None:
        return None
    options = dict(transformer_options or {})
    return HostAttention(kernel, options, "optimized_attention_override" in options)


# ---------------------------------------------------------------------------------- progress, cancel

class _NoProgress:
    def __init__(self, total: int, node_id: Any = None):
        self.total, self.current = total, 0

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        self.current = value


def progress_bar(total: int, node_id: Any = None) -> Any:
    """comfy.utils.ProgressBar; inside the server every update is also a cancel point."""
    utils = _module("comfy.utils")
    cls = getattr(utils, "ProgressBar", None) if utils is not None else None
    return cls(total, node_id=node_id) if cls is not None else _NoProgress(total, node_id)


def latent_previewer(latent_format: str) -> Callable[[torch.Tensor], Any] | None:
    """ComfyUI's preview of a latent frame ([1, C, 1, h, w] in the model's space) as the progress bar takes it,
    with the user's preview method (none by default: then None). Wan2.1 latents only."""
    preview = sys.modules.get("latent_preview")  # ComfyUI's own, loaded by its nodes.py; never a stray module
    formats = _module("comfy.latent_formats") if preview is not None else None
    if latent_format != "wan21" or formats is None or not hasattr(formats, "Wan21"):
        return None
    try:
        previewer = preview.get_previewer(torch_device(), formats.Wan21())
    except Exception as e:  # noqa: BLE001 - a preview is a nicety: say why once, never fail the run
        log.info("FlowCache: no latent preview (%s).", e)
        return None
    if previewer is None:
        return None
    return lambda x: previewer.decode_latent_to_preview_image("JPEG", x)


def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel."""
    mm = _module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def server_instance() -> Any:
    """ComfyUI's running PromptServer, or None outside the server."""
    server = sys.modules.get("server")  # only ever ComfyUI's own: never import a stray module of that name
    prompt_server = getattr(server, "PromptServer", None) if server is not None else None
    return getattr(prompt_server, "instance", None)


def send_event(event: str, data: dict) -> None:
    """Broadcast a custom websocket event to the frontend (no-op without a running server)."""
    instance = server_instance()
    if instance is None:
        return
    try:
        instance.send_sync(event, data)
    except Exception as e:  # a UI message must never fail a run
        log.debug("FlowCache: could not send %s: %s", event, e)


# -------------------------------------------------------------------------------------------- paths

def filename_list(folder: str) -> list[str]:
    fp = _module("folder_paths")
    return list(fp.get_filename_list(folder)) if fp is not None else []


def full_path(folder: str, name: str) -> str | None:
    fp = _module("folder_paths")
    if fp is None:
        return name if os.path.exists(name) else None
    return fp.get_full_path(folder, name)


def model_file(folders: tuple[str, ...] | list[str], name: str) -> str | None:
    """The file ``name`` of the first of ComfyUI's model ``folders`` that has it, or None. The name comes from a
    prompt, so the path must stay inside that folder (no ``..``, no absolute path) and be a regular file."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return None
    for folder in folders:
        path = full_path(folder, name)
        if not path or not os.path.isfile(path):
            continue
        real = os.path.abspath(path)
        for root in folder_paths_of(folder):
            try:
                if root and os.path.commonpath([real, os.path.abspath(root)]) == os.path.abspath(root):
                    return path
            except ValueError:  # another drive
                continue
    return None


def folder_paths_of(folder: str) -> list[str]:
    """Every directory ComfyUI searches for a model folder (models/<folder> plus extra_model_paths)."""
    fp = _module("folder_paths")
    return list(fp.get_folder_paths(folder)) if fp is not None else []


def output_directory() -> str:
    fp = _module("folder_paths")
    return fp.get_output_directory() if fp is not None else os.path.abspath("output")
