"""Errors that reach users: each names the file, node or widget and says what would be right."""
from __future__ import annotations


class FlowCacheError(Exception):
    """Base class for every error the pack raises on purpose."""


class CheckpointError(FlowCacheError):
    """A model file is missing, unreadable, truncated, or not the kind of model expected."""


class InputError(FlowCacheError):
    """A widget value or an input tensor cannot work; raised before any sampling starts."""


class OutputPathError(FlowCacheError):
    """An output path would leave the allowed output folder."""


def led_by(name: str, error: FlowCacheError, *also: str) -> FlowCacheError:
    """``error`` (same class) with its message led by ``name: ``, the widget or input whose value it is about,
    unless the message already starts with ``name`` or one of ``also`` (``dtype=…: …``, ``model_name: …``)."""
    message = str(error)
    if any(message.startswith(n) and message[len(n):len(n) + 1] in (":", "=", " ") for n in (name, *also)):
        return error
    return type(error)(f"{name}: {message}")
