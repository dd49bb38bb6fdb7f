"""ComfyUI nodes of the FlowCache pack, on ComfyUI's V3 node API (``comfy_api.v0_0_2``; see ``comfy_v3``).
Thin glue over ``flowcache``.

The pack registers them through ``comfy_entrypoint`` (the root ``__init__.py``); ``NODE_CLASSES`` and
``DISPLAY_NAMES`` list them by node id for the pack's own use (tests, the CLI). The pack deliberately exports no
``NODE_CLASS_MAPPINGS``: ComfyUI would then load it as a V1 pack and ignore ``comfy_entrypoint``.
"""
from __future__ import annotations

from .cache import FlowCacheCache
from .causal import FlowCacheCausalOptions
from .comfy_v3 import ComfyExtension, io
from .decode_save import FlowCacheDecodeSave
from .decode import FlowCacheDecode
from .demo import FlowCacheDemoTextEncode
from .loader import FlowCacheModelLoader
from .magi import FlowCacheMagiTextEncode, FlowCacheMagiVAELoader
from .presets_route import register_routes
from .prompts import FlowCachePromptSchedule
from .sampler import FlowCacheSampler
from .video import FlowCacheVideoCombine

NODES: list[type[io.ComfyNode]] = [
    FlowCacheModelLoader, FlowCacheSampler, FlowCacheCache, FlowCacheCausalOptions, FlowCacheDecode,
    FlowCacheVideoCombine, FlowCacheDemoTextEncode, FlowCacheDecodeSave, FlowCacheMagiTextEncode,
    FlowCacheMagiVAELoader, FlowCachePromptSchedule,
]
NODE_CLASSES: dict[str, type[io.ComfyNode]] = {cls.define_schema().node_id: cls for cls in NODES}
DISPLAY_NAMES: dict[str, str] = {node_id: cls.define_schema().display_name for node_id, cls in NODE_CLASSES.items()}


class FlowCacheExtension(ComfyExtension):
    """The pack as a V3 extension: its node list."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FlowCacheExtension:
    """What ComfyUI calls to load the pack (nodes.py ``load_custom_node``, V3 packs)."""
    return FlowCacheExtension()


register_routes()  # GET /flowcache/model_presets, inside a running ComfyUI only

__all__ = ["NODES", "NODE_CLASSES", "DISPLAY_NAMES", "FlowCacheExtension", "comfy_entrypoint"]
