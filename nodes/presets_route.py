"""``GET /flowcache/model_presets?model_name=…[&loop=…]``: the slow/fast values a model's cache presets hold.

FlowCache Cache locks the threshold / warm-up / KV-budget widgets of a named preset and shows its values. Only
the server can read the chosen file's headers (family, size, embedded presets) and a calibrated
``.presets.json`` beside it, so the frontend asks here. Registered only inside a running ComfyUI server.

Query parameters:

* ``model_name`` (required): the model as FlowCache Load Model's ``model_name`` widget lists it: a file name
  under ``models/diffusion_models`` (``sub/folder/name.safetensors`` for a file in a subfolder, any shard of a
  sharded model), or the built-in demo's entry. Only headers are read.
* ``loop`` (optional, default ``auto``): the loader's ``loop`` widget (``auto``, ``diffusion_forcing`` or
  ``causal``); a causal Wan model has preset rows of its own.

Answer (JSON, status 200): ``{"model_name", "family", "key", "known": true, "rows": {method: {preset: {field:
value}}}}``, or ``{"model_name", "known": false, "rows": {}, "error": "…"}`` (``hint`` instead of ``error`` for a
model with no presets yet) for a file that is missing, damaged or not a supported model. A request without
``model_name`` answers status 400 with the same ``error`` shape saying so.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Mapping

from ..flowcache.errors import FlowCacheError
from ..flowcache.models import header_facts
from ..flowcache.presets import preset_rows
from . import comfy_bridge
from .loader import model_path

log = logging.getLogger("FlowCache")
ROUTE = "/flowcache/model_presets"
_registered = False


MISSING_NAME = ("the query parameter model_name is required: the model file as FlowCache Load Model's model_name "
                "widget lists it, a file name under models/diffusion_models (e.g. "
                "/flowcache/model_presets?model_name=SkyReels-V2-DF-1.3B-540P.safetensors), or the built-in demo "
                "entry; optional: loop=auto|diffusion_forcing|causal.")


def answer(query: Mapping[str, str]) -> tuple[int, dict]:
    """The route's HTTP status and JSON body for a request's query parameters: 400 without ``model_name``."""
    name = query.get("model_name", "")
    if not name.strip():
        return 400, {"model_name": name, "known": False, "rows": {}, "error": MISSING_NAME}
    return 200, model_presets(name, query.get("loop", "auto"))


def model_presets(model_name: str, loop: str = "auto") -> dict:
    """The route's answer: ``preset_rows`` of the file, or ``{"known": False, "error": …}``; never raises.

    The frontend asks for whatever file is picked, so a damaged or hostile file must give an answer the
    widgets can show, not an HTTP 500.
    """
    if not model_name.strip():
        return {"model_name": model_name, "known": False, "rows": {}, "error": MISSING_NAME}
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
        status, body = await asyncio.to_thread(answer, dict(request.query))  # file reads off the event loop
        return web.json_response(body, status=status)

    _registered = True
    return True
