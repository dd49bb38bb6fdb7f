"""FlowCache core: autoregressive video diffusion with chunkwise adaptive caching and KV compression.

Host-independent: torch, safetensors, einops, numpy (+ av/Pillow for video). Never imports ComfyUI.
"""
__version__ = "0.1.0"
