"""ComfyUI nodes of the FlowCache pack (V1 node API). Thin glue over ``flowcache``."""
from .demo import FlowCacheDecode, FlowCacheDemoTextEncode
from .loader import FlowCacheModelLoader
from .sampler import FlowCacheSampler
from .video import FlowCacheVideoCombine

NODE_CLASS_MAPPINGS = {
    "FlowCacheModelLoader": FlowCacheModelLoader,
    "FlowCacheSampler": FlowCacheSampler,
    "FlowCacheDecode": FlowCacheDecode,
    "FlowCacheVideoCombine": FlowCacheVideoCombine,
    "FlowCacheDemoTextEncode": FlowCacheDemoTextEncode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FlowCacheModelLoader": "FlowCache Load Model",
    "FlowCacheSampler": "FlowCache Sampler (Diffusion Forcing)",
    "FlowCacheDecode": "FlowCache Decode",
    "FlowCacheVideoCombine": "FlowCache Video Combine",
    "FlowCacheDemoTextEncode": "FlowCache Demo Text Encode",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
