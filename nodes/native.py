"""ComfyUI's own MODEL on FlowCache Sampler's ``model`` input: Load Diffusion Model, any LoRA loader, ComfyUI-GGUF.

The sampler runs the MODEL's own layers (``model.model.diffusion_model``, after ComfyUI loads it) under its
chunked forward through ``flowcache.models.wan.WanTreeModel``, so their casting, quantization, LoRA patches
and partial loading apply. Nothing of the MODEL is changed: the wrapper, its RoPE tables and the restored fps
layers belong to one run.

SkyReels-V2-DF-1.3B's fps embedding is not part of ComfyUI's Wan model: ComfyUI drops the ``fps_*`` keys
when it loads the file. They are read back from the file the MODEL was loaded from, found by following the
prompt graph from the sampler's ``model`` input up through MODEL-in/MODEL-out nodes (LoRA loaders, model
patches) to the loader's file widget, resolved inside ComfyUI's model folders only.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..flowcache.checkpoint import DTYPE_NAMES, Checkpoint, read_named_tensors
from ..flowcache.errors import CheckpointError, InputError
from ..flowcache.models import CAUSAL_LOOPS, WAN_GEOMETRY, LoadedModel, header_facts, wan_loop
from ..flowcache.models.wan import (FPS_SHAPES, WAN_ANCHORS, WAN_SIZES, WanTreeModel, fps_layers_from_tensors,
                                    wan_config_from_tree)
from ..flowcache.presets import model_presets
from . import comfy_bridge

log = logging.getLogger("FlowCache")

# A loader node's file widget -> the model folders it lists (ComfyUI-GGUF registers "unet_gguf").
LOADER_FILE_WIDGETS = {"unet_name": ("diffusion_models", "unet_gguf"), "ckpt_name": ("checkpoints",)}
MAX_HOPS = 64
FPS_LOSS = ("SkyReels-V2-DF-1.3B's fps conditioning (its frame-rate embedding) is left out, so its videos differ "
            "from the released model's; Wan2.1 T2V and SkyReels-V2-DF-14B have no fps embedding and lose nothing")


def is_comfy_model(obj: Any) -> bool:
    """A ComfyUI MODEL: a ModelPatcher whose ``model`` holds a ``diffusion_model``."""
    return hasattr(obj, "load_device") and hasattr(getattr(obj, "model", None), "diffusion_model")


def _is_link(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int)


def source_file(prompt: Any, node_id: Any, input_name: str = "model") -> tuple[str | None, str]:
    """(path, how it was found) of the file behind a node's MODEL input, or (None, why not).

    Follows ``input_name``'s link up through nodes that take a ``model`` input (LoRA loaders, model patches) to a
    loader with a file widget (``unet_name``, ``ckpt_name``); the file must lie in one of ComfyUI's model
    folders for that widget."""
    if not isinstance(prompt, dict) or node_id is None:
        return None, "the prompt graph is not available"
    path_nodes: list[str] = []
    nid, name = str(node_id), input_name
    for _ in range(MAX_HOPS):
        node = prompt.get(nid)
        link = node.get("inputs", {}).get(name) if isinstance(node, dict) else None
        if not _is_link(link):
            return None, f"node {nid}'s {name} input is not a link"
        nid = str(link[0])
        src = prompt.get(nid)
        if not isinstance(src, dict) or nid in path_nodes:
            return None, "the MODEL's source is not in the prompt"
        path_nodes.append(nid)
        inputs = src.get("inputs", {}) or {}
        kind = src.get("class_type", "?")
        for widget, folders in LOADER_FILE_WIDGETS.items():
            if isinstance(inputs.get(widget), str):
                path = comfy_bridge.model_file(folders, inputs[widget])
                if path is None:
                    return None, f"{kind}'s {widget} {inputs[widget]!r} is not a file in {' or '.join(folders)}"
                return path, f"{kind} (node {nid}) {widget} {inputs[widget]!r}"
        if _is_link(inputs.get("model")):
            name = "model"
            continue
        return None, f"the MODEL comes from {kind} (node {nid}), which names no model file"
    return None, "the MODEL passes through too many nodes"


def _fps_from_file(path: str | None, how: str, dim: int, dtype: torch.dtype, device: torch.device):
    """SkyReels' fps layers read from the MODEL's file, or None with a warning saying what is lost."""
    if path is None:
        log.warning("FlowCache: could not find the file this MODEL was loaded from (%s), so no fps embedding: %s.",
                    how, FPS_LOSS)
        return None
    try:
        tensors = read_named_tensors(path, FPS_SHAPES, WAN_ANCHORS)
        layers = fps_layers_from_tensors(tensors, dim, dtype, device, Path(path).name)
    except CheckpointError as e:
        log.warning("FlowCache: %s; running without the fps embedding: %s.", e, FPS_LOSS)
        return None
    if layers is not None:
        log.info("FlowCache: restored SkyReels' fps embedding from %s (%s).", Path(path).name, how)
    elif Path(path).suffix == ".gguf":  # a conversion may have dropped keys the original had
        log.warning("FlowCache: %s has no fps embedding: %s.", Path(path).name, FPS_LOSS)
    else:
        log.info("FlowCache: %s has no fps embedding (not a SkyReels-V2-DF-1.3B file).", Path(path).name)
    return layers


def _file_facts(path: str | None) -> tuple[dict, dict, str | None]:
    """(metadata, extra presets, preset key) of the MODEL's file when it is safetensors, else empties."""
    if path is None or Path(path).suffix not in (".safetensors", ".sft"):
        extra, _ = model_presets([Path(path)], {}) if path else ({}, None)
        return {}, extra, None
    try:
        facts = header_facts(path)
    except CheckpointError as e:
        log.warning("FlowCache: %s; using the model's built-in presets.", e)
        return {}, {}, None
    return facts.metadata, facts.extra_presets, facts.preset_key if facts.family == "wan" else None


def compute_dtype_of(model: Any) -> torch.dtype:
    """The dtype ComfyUI runs this MODEL in (``BaseModel._apply_model``'s rule)."""
    base = model.model
    return getattr(base, "manual_cast_dtype", None) or base.get_dtype()


def native_wan_model(model: Any, prompt: Any = None, unique_id: Any = None) -> tuple[LoadedModel, str]:
    """The sampler's model for a ComfyUI MODEL: (LoadedModel whose ``model`` runs the MODEL's layers, a name).

    Raises InputError naming the sampler's ``model`` input when the MODEL is not Wan-architecture."""
    base = model.model
    tree = base.diffusion_model
    kind = type(base).__name__
    try:
        cfg = wan_config_from_tree(tree, "model")
    except InputError as e:  # its message leads with "model: " and what was wrong; how to fix it follows
        raise InputError(f"{e} This MODEL is {kind} ({type(tree).__name__}). FlowCache Sampler takes a Wan "
                         "text-to-video model from Load Diffusion Model, a LoRA loader or a GGUF loader, or FlowCache "
                         "Load Model's output (which also loads MAGI-1).") from None
    path, how = source_file(prompt, unique_id)
    meta, extra, key = _file_facts(path)
    geometry = dict(WAN_GEOMETRY)
    if cfg.in_dim != geometry["channels"] or cfg.out_dim != geometry["channels"]:
        raise InputError(f"model: this Wan MODEL takes {cfg.in_dim} latent channels and predicts {cfg.out_dim}; "
                         f"FlowCache Sampler runs Wan2.1-VAE models (16 channels), e.g. SkyReels-V2 DF or Wan2.1 T2V.")
    dtype, device = compute_dtype_of(model), torch.device(model.load_device)
    fps = _fps_from_file(path, how, cfg.dim, dtype, device)
    runner = WanTreeModel(tree, cfg, dtype, device, fps, "model")
    name = Path(path).name if path else f"{kind} MODEL"
    preset_key = key or f"wan-{WAN_SIZES.get(cfg.dim, f'dim{cfg.dim}')}"
    text_len = int(meta.get("flowcache.text_len", 512)) if str(meta.get("flowcache.text_len", "512")).isdigit() else 512
    stored = DTYPE_NAMES.get(base.get_dtype(), str(base.get_dtype()).replace("torch.", ""))
    # the loop, as FlowCache Load Model decides it: metadata, SkyReels' fps layers, the file's name; a causal
    # loop (causal, longlive, krea_realtime) takes the causal presets row, as the loader's models do
    loop, why = ("diffusion_forcing", "no file to read it from") if path is None else wan_loop(
        Checkpoint({}, [Path(path)], metadata=dict(meta)), {"fps_embedding.weight"} if fps is not None else set())
    if loop in CAUSAL_LOOPS and not preset_key.endswith("-causal") and "flowcache.model_key" not in meta:
        preset_key += "-causal"
    lm = LoadedModel("wan", runner, runner.cfg, name, "", stored, preset_key, text_len=text_len, geometry=geometry,
                     extra_presets=extra, metadata=meta, loop=loop)
    lm.notes.append(f"{loop.replace('_', ' ')} loop ({why})")
    lm.notes.append(f"ComfyUI MODEL ({kind}): its own layers, compute {DTYPE_NAMES.get(dtype, dtype)}"
                    f"{', fps embedding from ' + name if fps is not None else ''}")
    return lm, name


# What a MODEL may carry besides its weights, and what FlowCache Sampler does with it. FlowCache runs its own
# chunked forward over the MODEL's layers, not ComfyUI's sampler and Wan forward: LoRA and other weight patches
# apply (ComfyUI patches the layers at load), and so does an optimized_attention_override (every attention goes
# through ComfyUI's optimized_attention with the MODEL's transformer_options: nodes.comfy_bridge.HostAttention).
# Everything else is named on the node as not applied, never dropped silently.
APPLIED_TRANSFORMER_OPTIONS = {"optimized_attention_override"}
WHY_NOT = {
    "patches_replace": "FlowCache's chunked forward calls the blocks' layers, not ComfyUI's blocks",
    "patches": "FlowCache's chunked forward has no ComfyUI patch points",
    "wrappers": "FlowCache runs its own loop and forward, not ComfyUI's sampler or model forward",
    "callbacks": "FlowCache runs its own loop, not ComfyUI's sampler",
    "model_sampling": "FlowCache Sampler's shift and steps widgets set the schedule",
    "sampler": "FlowCache computes guidance itself, from the cfg widget",
}
SAMPLER_FUNCTIONS = ("sampler_cfg_function", "sampler_post_cfg_function", "sampler_pre_cfg_function",
                     "sampler_calc_cond_batch_function", "model_function_wrapper", "denoise_mask_function")
IGNORED_OPTIONS = {"transformer_options", "disable_cfg1_optimization"}  # a flag of the cfg functions above


def _keys(value: Any) -> list[str]:
    """Readable names of a patch dict's entries: ('double_block', 3) -> 'double_block 3'."""
    if not isinstance(value, dict):
        return []
    return [" ".join(str(p) for p in k) if isinstance(k, tuple) else str(k) for k, v in value.items() if v]


def _nested(value: Any) -> list[str]:
    """{'dit': {('double_block', 0): fn}} -> ['dit double_block 0']; {'outer_sample': {'easycache': [fn]}} ->
    ['outer_sample (easycache)']."""
    out = []
    for name, inner in (value or {}).items() if isinstance(value, dict) else ():
        if isinstance(inner, dict):
            keys = _keys(inner)
            if keys and all(isinstance(k, tuple) for k in inner):
                out += [f"{name} {k}" for k in keys]
            elif keys:
                out.append(f"{name} ({', '.join(k if k != 'None' else 'unnamed' for k in keys)})")
        elif inner:
            out.append(str(name))
    return out


def unapplied_patches(model: Any) -> list[str]:
    """What of a ComfyUI MODEL's patches, wrappers and options FlowCache Sampler does not apply, one phrase each
    ("wrappers outer_sample (easycache): not applied (...)"); [] for a plain MODEL (weights and LoRAs only)."""
    notes: list[str] = []
    options = getattr(model, "model_options", None) or {}
    to = options.get("transformer_options", None) or {}
    for key in ("patches_replace", "patches", "wrappers", "callbacks"):
        names = _nested(to.get(key))
        if names:
            notes.append(f"{key} {', '.join(names)}: not applied ({WHY_NOT[key]})")
    other = [k for k in to if k not in APPLIED_TRANSFORMER_OPTIONS and k not in WHY_NOT and to[k] is not None]
    if other:
        notes.append(f"transformer_options {', '.join(map(str, other))}: not read by FlowCache")
    funcs = [k for k in options if k in SAMPLER_FUNCTIONS and options[k]]
    if funcs:
        notes.append(f"{', '.join(funcs)}: not applied ({WHY_NOT['sampler']})")
    rest = [k for k in options if k not in SAMPLER_FUNCTIONS and k not in IGNORED_OPTIONS and options[k]]
    if rest:
        notes.append(f"model_options {', '.join(map(str, rest))}: not read by FlowCache")
    for attr, key in (("wrappers", "wrappers"), ("callbacks", "callbacks")):
        names = _nested(getattr(model, attr, None))
        if names:
            notes.append(f"{key} {', '.join(names)}: not applied ({WHY_NOT[key]})")
    objects = list(getattr(model, "object_patches", None) or {})
    if "model_sampling" in objects:
        notes.append(f"model_sampling patch: not applied ({WHY_NOT['model_sampling']})")
    objects = [o for o in objects if o != "model_sampling"]
    if objects:
        notes.append(f"object patches {', '.join(objects)}: not applied (FlowCache calls the MODEL's layers, "
                     f"not its patched methods)")
    hooks = getattr(model, "hook_patches", None) or {}
    if hooks:
        notes.append(f"{len(hooks)} hook patch{'es' if len(hooks) > 1 else ''}: not applied (FlowCache runs its "
                     f"own loop, not ComfyUI's sampler)")
    for attr, what in (("injections", "injections"), ("additional_models", "additional models")):
        names = _keys(getattr(model, attr, None))
        if names:
            notes.append(f"{what} {', '.join(names)}: not applied (FlowCache runs its own loop, not ComfyUI's "
                         f"sampler)")
    return notes


__all__ = ["is_comfy_model", "native_wan_model", "source_file", "compute_dtype_of", "unapplied_patches",
           "LOADER_FILE_WIDGETS"]
