"""ComfyUI nodes of the FlowCache pack (V1 node API). Thin glue over ``flowcache``."""
from .cache import FlowCacheCache
from .causal import FlowCacheCausalOptions
from .decode_save import FlowCacheDecodeSave
from .demo import FlowCacheDecode, FlowCacheDemoTextEncode
from .loader import FlowCacheModelLoader
from .magi import FlowCacheMagiTextEncode, FlowCacheMagiVAELoader
from .presets_route import register_routes
from .prompts import FlowCachePromptSchedule
from .sampler import FlowCacheSampler
from .video import FlowCacheVideoCombine

NODE_CLASS_MAPPINGS = {
    "FlowCacheModelLoader": FlowCacheModelLoader,
    "FlowCacheSampler": FlowCacheSampler,
    "FlowCacheCache": FlowCacheCache,
    "FlowCacheCausalOptions": FlowCacheCausalOptions,
    "FlowCacheDecode": FlowCacheDecode,
    "FlowCacheVideoCombine": FlowCacheVideoCombine,
    "FlowCacheDemoTextEncode": FlowCacheDemoTextEncode,
    "FlowCacheDecodeSave": FlowCacheDecodeSave,
    "FlowCacheMagiTextEncode": FlowCacheMagiTextEncode,
    "FlowCacheMagiVAELoader": FlowCacheMagiVAELoader,
    "FlowCachePromptSchedule": FlowCachePromptSchedule,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FlowCacheModelLoader": "FlowCache Load Model",
    "FlowCacheSampler": "FlowCache Sampler",
    "FlowCacheCache": "FlowCache Cache",
    "FlowCacheCausalOptions": "FlowCache Causal Options",
    "FlowCacheDecode": "FlowCache Decode",
    "FlowCacheVideoCombine": "FlowCache Video Combine",
    "FlowCacheDemoTextEncode": "FlowCache Demo Text Encode",
    "FlowCacheDecodeSave": "FlowCache Decode & Save Video",
    "FlowCacheMagiTextEncode": "FlowCache MAGI-1 Text Encode",
    "FlowCacheMagiVAELoader": "FlowCache Load MAGI-1 VAE",
    "FlowCachePromptSchedule": "FlowCache Prompt Schedule",
}

register_routes()  # GET /flowcache/model_presets, inside a running ComfyUI only

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
