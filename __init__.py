"""FlowCache for ComfyUI: SkyReels-V2 diffusion-forcing video models with FlowCache per-chunk caching.

ComfyUI imports this file as a package; everything inside the pack is imported relatively. The nodes use
ComfyUI's V3 node API and are registered through ``comfy_entrypoint``; there is no ``NODE_CLASS_MAPPINGS`` here
on purpose (ComfyUI reads V1 mappings first and would then ignore the entrypoint).
"""
from .nodes import DISPLAY_NAMES, NODE_CLASSES, comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY", "NODE_CLASSES", "DISPLAY_NAMES"]
