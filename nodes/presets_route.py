"""``GET /flowcache/model_presets?model_name=…``: the slow/fast values FlowCache Sampler will use for a model.

The frontend locks the threshold / warm-up / KV-budget widgets of a named preset and shows its values. Its
static table knows the released models by file name only; this route reads the chosen file's headers (and a
calibrated ``.presets.json`` beside it) so a calibrated or renamed model shows its own numbers. Registered
only inside a running ComfyUI server.
"""
from __future__ import annotations

import asyncio
import logging

from ..flowcache.errors import CheckpointError, InputError
from ..flowcache.model_presets import preset_rows
from . import comfy_bridge
from .loader import model_path

log = logging.getLogger("FlowCache")
ROUTE = "/flowcache/model_presets"
_registered = False


def model_presets(model_name: str) -> dict:
    """The route's answer: ``preset_rows`` of the file, or ``{"known": False, "error": …}``."""
    try:
        return {"model_name": model_name, **preset_rows(model_path(model_name))}
    except (CheckpointError, InputError, OSError) as e:
        return {"model_name": model_name, "known": False, "rows": {}, "error": str(e)}


def register_routes() -> bool:
    """Add the route to ComfyUI's server once; False (and nothing done) outside a running server."""
    global _registered
    server = comfy_bridge.server_instance()
    if _registered or getattr(server, "routes", None) is None:
        return _registered
    from aiohttp import web  # ComfyUI's own web framework: present whenever its server is

    @server.routes.get(ROUTE)
    async def _model_presets(request: web.Request) -> web.Response:
        name = request.query.get("model_name", "")
        return web.json_response(await asyncio.to_thread(model_presets, name))  # file reads off the event loop

    _registered = True
    return True
