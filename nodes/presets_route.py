"""``GET /flowcache/model_presets?model_name=…[&loop=…]``: the slow/fast values a model's cache presets hold.

FlowCache Cache locks the threshold / warm-up / KV-budget widgets of a named preset and shows its values. Only
the server can read the chosen file's headers (family, size, embedded presets) and a calibrated
``.presets.json`` beside it, so the frontend asks here. Registered only inside a running ComfyUI server.
"""
from __future__ import annotations

import asyncio
import logging

from ..flowcache.errors import FlowCacheError
from ..flowcache.models import header_facts
from ..flowcache.presets import preset_rows
from . import comfy_bridge
from .loader import model_path

log = logging.getLogger("FlowCache")
ROUTE = "/flowcache/model_presets"
_registered = False


def model_presets(model_name: str, loop: str = "auto") -> dict:
    """The route's answer: ``preset_rows`` of the file, or ``{"known": False, "error": …}``; never raises.

    The frontend asks for whatever file is picked, so a damaged or hostile file must give an answer the
    widgets can show, not an HTTP 500.
    """
    try:
        facts = header_facts(model_path(model_name), loop)
        return {"model_name": model_name, "family": facts.family,
                **preset_rows(facts.preset_key, facts.extra_presets)}
    except (FlowCacheError, OSError) as e:
        error = str(e)
    except Exception as e:  # a bug, or a file no check foresaw: log it for a report, answer all the same
        log.exception("FlowCache: reading presets of %r failed", model_name)
        error = (f"model_name: could not read presets from {model_name} ({type(e).__name__}: {str(e)[:200]}); "
                 "the sampler will report the problem when it loads the model.")
    return {"model_name": model_name, "known": False, "rows": {}, "error": error}


def register_routes() -> bool:
    """Add the route to ComfyUI's server once; False (and nothing done) outside a running server."""
    global _registered
    server = comfy_bridge.server_instance()
    if _registered or getattr(server, "routes", None) is None:
        return _registered
    if any(getattr(r, "path", None) == ROUTE for r in server.routes):
        # a second copy of the pack in custom_nodes: the first one answers; adding it twice stops the server
        log.warning("FlowCache: %s is already registered (is the pack installed twice?); keeping the first.", ROUTE)
        _registered = True
        return True
    from aiohttp import web  # ComfyUI's own web framework: present whenever its server is

    @server.routes.get(ROUTE)
    async def _model_presets(request: web.Request) -> web.Response:
        name, loop = request.query.get("model_name", ""), request.query.get("loop", "auto")
        # file reads off the event loop
        return web.json_response(await asyncio.to_thread(model_presets, name, loop))

    _registered = True
    return True
