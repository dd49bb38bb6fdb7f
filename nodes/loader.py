"""FlowCache Load Model: a Wan2.1 / SkyReels-V2 diffusion-forcing DiT or a MAGI-1 DiT as a FLOWCACHE_MODEL."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..flowcache.errors import CheckpointError, FlowCacheError, led_by
from ..flowcache.models import LOOPS, MAGI_VARIANTS, LoadedModel, load_model
from . import comfy_bridge
from .comfy_v3 import FLOWCACHE_MODEL, check_choices, io
from .demo import DEMO_ENTRY, demo_module

log = logging.getLogger("FlowCache")

DTYPES = ["auto", "fp32", "bf16", "fp16"]
NO_LORA = "none"


@dataclass
class FlowCacheModel:
    """What travels on a FLOWCACHE_MODEL link: the core's LoadedModel and ComfyUI's ModelPatcher around it."""

    loaded: LoadedModel
    patcher: Any
    name: str
    dtype: str

    def __repr__(self) -> str:
        return f"FlowCacheModel({self.name!r}, {self.loaded.family}, {self.dtype})"


def resolve_dtype(choice: str, device_type: str) -> str:
    """auto: the stored dtype on a GPU, fp32 on the CPU (half precision is slow there)."""
    if choice not in DTYPES:
        raise CheckpointError(f"dtype={choice!r}: must be one of {', '.join(DTYPES)}.")
    if choice == "auto" and device_type == "cpu":
        return "fp32"
    return choice


def model_path(model_name: str) -> str:
    """The file behind a ``model_name`` choice (the demo entry or a file in models/diffusion_models)."""
    if model_name == DEMO_ENTRY:
        demo = demo_module()
        if demo is None:
            raise CheckpointError("model_name: the built-in demo model is not installed with this copy of the "
                                  "pack (flowcache/demo is missing); pick a file from models/diffusion_models.")
        return str(demo.demo_model_path())
    path = comfy_bridge.full_path("diffusion_models", model_name)
    if path is None:
        raise CheckpointError(f"model_name: {model_name} was not found in models/diffusion_models.")
    return path


class FlowCacheModelLoader(io.ComfyNode):
    """Load a SkyReels-V2 / Wan2.1 diffusion-forcing model, a MAGI-1 model (or the built-in CPU demo) for the
    FlowCache sampler; the family is recognised from the file's keys."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCacheModelLoader", display_name="FlowCache Load Model", category="FlowCache",
            description="Loads a SkyReels-V2 / Wan2.1 or MAGI-1 video model for FlowCache Sampler.",
            inputs=[
                # the file and its precision
                io.Combo.Input(
                    "model_name", options=[DEMO_ENTRY] + comfy_bridge.filename_list("diffusion_models"),
                    tooltip="Video DiT from models/diffusion_models: SkyReels-V2-DF (1.3B, 14B), Wan2.1 T2V or "
                            "MAGI-1 (any shard of a sharded model loads all of it; a MAGI-1 folder named "
                            "'…distill…' is the distilled model), or the small built-in demo model that runs on a "
                            "CPU."),
                io.Combo.Input(
                    "dtype", options=DTYPES, default="auto",
                    tooltip="Compute precision. auto: the file's own precision on a GPU (bf16 for fp8 files, whose "
                            "weights stay fp8 in memory and are upcast layer by layer), fp32 on the CPU where half "
                            "precision is slow."),
                # what the file is, when its keys do not say (optional: API prompts saved before these widgets
                # existed still run, as "auto")
                io.Combo.Input(
                    "loop", options=list(LOOPS), default="auto", optional=True,
                    tooltip="Wan-architecture files: diffusion_forcing (SkyReels-V2 DF, Wan2.1), causal "
                            "(Self-Forcing, CausVid, Causal Forcing: block by block with a KV cache), longlive "
                            "(LongLive v1.0: a 12-frame window, 3-frame sink, re-cache on a prompt change) or "
                            "krea_realtime (Krea Realtime 14B: its context rebuilt each block, needs the VAE). They "
                            "have the same keys, so auto decides from the file's metadata, a LongLive LoRA, the "
                            "releases' file names, a Self-Forcing/CausVid .pt, SkyReels' fps layers or Krea's "
                            "'model.'-prefixed 14B layout, and says which on the node."),
                io.Combo.Input(
                    "weights", options=["auto", "generator_ema", "generator"], default="auto", optional=True,
                    tooltip="Self-Forcing / CausVid .pt files only: which generator to load (auto: generator_ema "
                            "when the file has it, the EMA weights the authors sample with)."),
                io.Combo.Input(
                    "magi_variant", options=list(MAGI_VARIANTS), default="auto", optional=True,
                    tooltip="MAGI-1 files only: distill (one pass, guidance distilled in) or base (3-pass "
                            "guidance). auto: the folder holding the weights says 'distill' for the distilled "
                            "release (inference_weight.distill)."),
                # merged at load
                io.Combo.Input(
                    "lora", options=[NO_LORA] + comfy_bridge.filename_list("loras"), default=NO_LORA, optional=True,
                    tooltip="A LoRA from models/loras merged into the weights at load: LongLive's lora.pt on "
                            "longlive_base.pt (a LoRA whose keys match nothing in the model is refused). For a "
                            "ComfyUI MODEL use ComfyUI's own LoRA loader instead."),
            ],
            outputs=[FLOWCACHE_MODEL.Output(display_name="model", tooltip="The loaded model, for FlowCache Sampler.")])

    @classmethod
    def validate_inputs(cls, model_name: str, dtype: str = "auto", loop: str | None = None,
                        weights: str | None = None, magi_variant: str | None = None,
                        lora: str | None = None) -> bool | str:
        return check_choices(cls, model_name=model_name, dtype=dtype, loop=loop, weights=weights,
                             magi_variant=magi_variant, lora=lora)

    @classmethod
    def execute(cls, model_name: str, dtype: str = "auto", loop: str = "auto", weights: str = "auto",
                magi_variant: str = "auto", lora: str = NO_LORA) -> io.NodeOutput:
        path = model_path(model_name)
        lora_path = None
        if lora and lora != NO_LORA:
            lora_path = comfy_bridge.full_path("loras", lora)
            if lora_path is None:
                raise CheckpointError(f"lora: {lora} was not found in models/loras.")
        device = comfy_bridge.torch_device()
        chosen = resolve_dtype(dtype, device.type)
        # The core's messages name the file; the user is told which widget chose it first (unless the message is
        # about another widget: loop=, weights=, magi_variant=). Inside ComfyUI the model is built from ComfyUI's
        # layers: fp8 weights stay fp8, and ComfyUI's memory manager may load it partially and stream the rest, so
        # the forward runs on ComfyUI's device, not where the first weight happens to be.
        try:
            loaded = load_model(path, chosen, loop=loop, weights=None if weights == "auto" else weights,
                                magi_variant=magi_variant, operations=comfy_bridge.operations(), lora=lora_path)
        except FlowCacheError as e:
            raise led_by("model_name", e, "dtype", "loop", "weights", "magi_variant", "lora") from e
        loaded.model.compute_device = device
        log.info("FlowCache: loaded %s (%s, %s, presets %s, layers %s)", loaded.checkpoint, loaded.family, chosen,
                 loaded.preset_key, comfy_bridge.operations().name)
        for note in loaded.notes:
            log.info("FlowCache: %s: %s", loaded.checkpoint, note)
        model = FlowCacheModel(loaded, comfy_bridge.make_patcher(loaded.model), model_name, chosen)
        # the loader's decisions (loop, distilled or not, ...) are shown on the node
        return io.NodeOutput(model, ui={"flowcache_notes": list(loaded.notes)})
