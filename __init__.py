"""FlowCache for ComfyUI: SkyReels-V2 diffusion-forcing video models with FlowCache per-chunk caching.

ComfyUI imports this file as a package; everything inside the pack is imported relatively.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
