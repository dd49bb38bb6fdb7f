"""The built-in CPU demo: found when installed (it is optional), and its text encoder as a node."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

from ..flowcache.errors import FlowCacheError, InputError, led_by
from .comfy_v3 import io

log = logging.getLogger("FlowCache")

DEMO_ENTRY = "flowcache-demo (built-in, runs on CPU)"


def demo_module() -> ModuleType | None:
    """``flowcache.demo`` when it is installed and complete, else None (imported lazily: it is optional)."""
    try:
        mod = importlib.import_module("..flowcache.demo", __package__)
    except ImportError:
        return None
    except Exception as e:  # a broken demo must not take the other nodes down with it
        log.warning("FlowCache: the built-in demo failed to import: %s: %s", type(e).__name__, e)
        return None
    needed = ("demo_model_path", "load_demo_text", "load_demo_codec")
    return mod if all(hasattr(mod, n) for n in needed) else None


def require_demo(widget: str) -> ModuleType:
    demo = demo_module()
    if demo is None:
        raise InputError(f"{widget}: the built-in demo (flowcache/demo) is not installed with this copy of the pack.")
    return demo


def default_prompt() -> str:
    demo = demo_module()
    prompts: Any = getattr(demo, "DEMO_PROMPTS", None) if demo is not None else None
    if isinstance(prompts, dict):
        prompts = list(prompts.values())
    if isinstance(prompts, str):
        return prompts
    if isinstance(prompts, (list, tuple)) and prompts:
        return str(prompts[0])
    return ""


class FlowCacheDemoTextEncode(io.ComfyNode):
    """Encode a prompt with the demo's tiny text encoder (only for the built-in demo model)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCacheDemoTextEncode", display_name="FlowCache Demo Text Encode", category="FlowCache",
            description="Text encoder of the built-in CPU demo model.",
            inputs=[io.String.Input(
                "prompt", multiline=True, default=default_prompt(),
                tooltip="Text for the built-in demo model. It knows only the few scenes it was trained on; real Wan "
                        "models need CLIP Text Encode with a umT5-XXL text encoder.")],
            outputs=[io.Conditioning.Output(
                tooltip="Demo text conditioning, for FlowCache Sampler with the demo model.")])

    @classmethod
    def execute(cls, prompt: str) -> io.NodeOutput:
        encoder = require_demo("prompt").load_demo_text()
        try:
            states = encoder.encode(prompt)
        except FlowCacheError as e:
            raise led_by("prompt", e) from e
        return io.NodeOutput([[states, {"pooled_output": None}]])
