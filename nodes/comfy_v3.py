"""The V3 node API the nodes are written against: ``io`` and ``ComfyExtension``.

Inside ComfyUI they are ComfyUI's own, from the pinned API version ``comfy_api.v0_0_2`` (ComfyUI 0.3.64's
versioned module; ``comfy_api.latest`` is declared unstable). Without ComfyUI (the tests, the CLI importing the
pack) a small stand-in with the same names and behaviour takes their place: enough of ``io`` for these nodes,
including what ComfyUI itself derives from a schema (the V1 view ``INPUT_TYPES()``, ``RETURN_TYPES``,
``FUNCTION`` = ``EXECUTE_NORMALIZED``, hidden inputs on ``cls.hidden`` through ``PREPARE_CLASS_CLONE``), so a node
runs the same way in both. The stand-in is never used when ComfyUI's API can be imported.
"""
from __future__ import annotations

import importlib.util
import inspect
from enum import Enum
from typing import Any

if importlib.util.find_spec("comfy_api") is not None:  # inside ComfyUI (or its Python with ComfyUI on the path)
    from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401
    HOST_API = True
else:
    HOST_API = False


# ------------------------------------------------------------------------------------------- the stand-in

def _prune(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class _classproperty:
    def __init__(self, fget):
        self.fget = fget

    def __get__(self, obj, owner):
        return self.fget(owner)


class _Input:
    io_type = "*"

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, extra_dict: dict | None = None):
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy
        self.extra_dict = extra_dict or {}

    def as_dict(self) -> dict:
        return _prune({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip,
                       "lazy": self.lazy}) | _prune(self.extra_dict)

    def get_io_type(self) -> str:
        return self.io_type


class _WidgetInput(_Input):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: Any = None, socketless: bool | None = None,
                 force_input: bool | None = None, extra_dict: dict | None = None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default, self.socketless, self.force_input = default, socketless, force_input

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"default": self.default, "socketless": self.socketless,
                                           "forceInput": self.force_input})


class _Output:
    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def _type(io_type: str, input_cls: type = _Input) -> type:
    """A ComfyType: ``X.io_type``, ``X.Input(...)`` and ``X.Output(...)``."""
    return type(io_type, (), {"io_type": io_type,
                              "Input": type("Input", (input_cls,), {"io_type": io_type}),
                              "Output": type("Output", (_Output,), {"io_type": io_type})})


class _IntInput(_WidgetInput):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: int | None = None, min: int | None = None,
                 max: int | None = None, step: int | None = None, control_after_generate: bool | None = None,
                 display_mode: Any = None, socketless: bool | None = None, force_input: bool | None = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input)
        self.min, self.max, self.step = min, max, step
        self.control_after_generate, self.display_mode = control_after_generate, display_mode

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"min": self.min, "max": self.max, "step": self.step,
                                           "control_after_generate": self.control_after_generate,
                                           "display": getattr(self.display_mode, "value", None)})


class _FloatInput(_WidgetInput):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: float | None = None, min: float | None = None,
                 max: float | None = None, step: float | None = None, round: float | None = None,
                 display_mode: Any = None, socketless: bool | None = None, force_input: bool | None = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input)
        self.min, self.max, self.step, self.round, self.display_mode = min, max, step, round, display_mode

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"min": self.min, "max": self.max, "step": self.step,
                                           "round": self.round, "display": self.display_mode})


class _StringInput(_WidgetInput):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, multiline: bool = False, placeholder: str | None = None,
                 default: str | None = None, dynamic_prompts: bool | None = None, socketless: bool | None = None,
                 force_input: bool | None = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input)
        self.multiline, self.placeholder, self.dynamic_prompts = multiline, placeholder, dynamic_prompts

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"multiline": self.multiline, "placeholder": self.placeholder,
                                           "dynamicPrompts": self.dynamic_prompts})


class _BooleanInput(_WidgetInput):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: bool | None = None, label_on: str | None = None,
                 label_off: str | None = None, socketless: bool | None = None, force_input: bool | None = None):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, force_input)
        self.label_on, self.label_off = label_on, label_off

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"label_on": self.label_on, "label_off": self.label_off})


class _ComboInput(_WidgetInput):
    def __init__(self, id: str, options: list | None = None, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None, default: Any = None,
                 control_after_generate: bool | None = None, socketless: bool | None = None, **_: Any):
        super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
        self.multiselect, self.options, self.control_after_generate = False, options, control_after_generate

    def as_dict(self) -> dict:
        return super().as_dict() | _prune({"multiselect": self.multiselect, "options": self.options,
                                           "control_after_generate": self.control_after_generate})


class _MultiTypeInput(_Input):
    def __init__(self, id: str, types: list, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None, extra_dict: dict | None = None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.types = types

    def get_io_type(self) -> str:
        return ",".join(dict.fromkeys(t.io_type for t in self.types))


class _Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class _HiddenHolder:
    def __init__(self, values: dict | None = None):
        for h in _Hidden:
            setattr(self, h.name, (values or {}).get(h.value))

    def __getattr__(self, key: str):
        return None


class _Schema:
    def __init__(self, node_id: str, display_name: str | None = None, category: str = "sd",
                 inputs: list | None = None, outputs: list | None = None, hidden: list | None = None,
                 description: str = "", is_output_node: bool = False, **flags: Any):
        self.node_id, self.display_name, self.category, self.description = node_id, display_name, category, description
        self.inputs, self.outputs, self.hidden = list(inputs or []), list(outputs or []), list(hidden or [])
        self.is_output_node = is_output_node
        self.flags = flags

    def finalize(self) -> "_Schema":
        if self.is_output_node:  # as ComfyUI: an output node is given the prompt and the workflow
            for h in (_Hidden.prompt, _Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        for i, out in enumerate(self.outputs):
            if out.id is None:
                out.id = f"_{i}_{out.io_type}_"
        ids = [i.id for i in self.inputs] + [o.id for o in self.outputs]
        if len(ids) != len(set(ids)):
            raise ValueError(f"{self.node_id}: input and output ids must be unique.")
        return self

    def v1_inputs(self) -> dict:
        spec: dict = {"required": {}}
        for i in self.inputs:
            opts = i.as_dict()
            opts.pop("optional", None)
            spec.setdefault("optional" if i.optional else "required", {})[i.id] = (i.get_io_type(), opts)
        for h in self.hidden:
            spec.setdefault("hidden", {})[h.name] = (h.value,)
        return spec


class _NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: dict | None = None, block_execution: str | None = None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class _ComfyNode:
    """ComfyUI's ComfyNode as far as these nodes use it (see the module docstring)."""

    hidden: _HiddenHolder | None = None
    SCHEMA = None

    def __init__(self):
        self.VALIDATE_CLASS()

    @classmethod
    def define_schema(cls) -> _Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> _NodeOutput:
        raise NotImplementedError

    @classmethod
    def VALIDATE_CLASS(cls) -> None:
        for name in ("define_schema", "execute"):
            if getattr(cls, name).__func__ is getattr(_ComfyNode, name).__func__:
                raise Exception(f"No {name} function was defined for node class {cls.__name__}.")

    @classmethod
    def FINALIZE_SCHEMA(cls) -> _Schema:
        return cls.define_schema().finalize()

    @classmethod
    def GET_SCHEMA(cls) -> _Schema:
        cls.VALIDATE_CLASS()
        cls.SCHEMA = cls.FINALIZE_SCHEMA()
        return cls.SCHEMA

    @classmethod
    def INPUT_TYPES(cls, include_hidden: bool = True, return_schema: bool = False):
        schema = cls.FINALIZE_SCHEMA()
        spec = schema.v1_inputs()
        if not include_hidden:
            spec.pop("hidden", None)
        return (spec, schema) if return_schema else spec

    @_classproperty
    def FUNCTION(cls) -> str:
        return "EXECUTE_NORMALIZED_ASYNC" if inspect.iscoroutinefunction(cls.execute) else "EXECUTE_NORMALIZED"

    @_classproperty
    def RETURN_TYPES(cls) -> list:
        return [o.io_type for o in cls.GET_SCHEMA().outputs]

    @_classproperty
    def RETURN_NAMES(cls) -> list:
        return [o.display_name or o.io_type for o in cls.GET_SCHEMA().outputs]

    @_classproperty
    def OUTPUT_TOOLTIPS(cls) -> list:
        return [o.tooltip or None for o in cls.GET_SCHEMA().outputs]

    @_classproperty
    def OUTPUT_IS_LIST(cls) -> list:
        return [o.is_output_list for o in cls.GET_SCHEMA().outputs]

    @_classproperty
    def CATEGORY(cls) -> str:
        return cls.GET_SCHEMA().category

    @_classproperty
    def DESCRIPTION(cls) -> str:
        return cls.GET_SCHEMA().description

    @_classproperty
    def OUTPUT_NODE(cls) -> bool:
        return cls.GET_SCHEMA().is_output_node

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args: Any, **kwargs: Any) -> _NodeOutput:
        out = cls.execute(*args, **kwargs)
        if out is None:
            return _NodeOutput()
        if isinstance(out, _NodeOutput):
            return out
        if isinstance(out, tuple):
            return _NodeOutput(*out)
        if isinstance(out, dict):
            return _NodeOutput(*out.get("result", ()), ui=out.get("ui"))
        raise Exception(f"Invalid return type from node: {type(out)}")

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs: dict) -> type:
        clone = type(cls.__name__, (cls,), {"__module__": cls.__module__})
        clone.hidden = _HiddenHolder({getattr(k, "value", k): v for k, v in (hidden_inputs or {}).items()})
        return clone


class _ComfyExtension:
    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list[type[_ComfyNode]]:
        raise NotImplementedError


class _IO:
    """The stand-in's ``io`` namespace."""

    ComfyNode = _ComfyNode
    Schema = _Schema
    NodeOutput = _NodeOutput
    Hidden = _Hidden
    Input = _Input
    WidgetInput = _WidgetInput
    Output = _Output
    Int = _type("INT", _IntInput)
    Float = _type("FLOAT", _FloatInput)
    String = _type("STRING", _StringInput)
    Boolean = _type("BOOLEAN", _BooleanInput)
    Combo = _type("COMBO", _ComboInput)
    Image = _type("IMAGE")
    Latent = _type("LATENT")
    Conditioning = _type("CONDITIONING")
    Vae = _type("VAE")
    Model = _type("MODEL")
    MultiType = type("MultiType", (), {"io_type": "COMFY_MULTITYPED_V3", "Input": _MultiTypeInput})

    @staticmethod
    def Custom(io_type: str) -> type:
        return _type(io_type)


if not HOST_API:
    io = _IO  # type: ignore[assignment]  # noqa: F811
    ComfyExtension = _ComfyExtension  # type: ignore[assignment,misc]  # noqa: F811


def check_choices(cls: type, **values: Any) -> bool | str:
    """True when every given combo value is one of its input's options, else the reason (for ``validate_inputs``).

    ComfyUI 0.3.64 checks a V1 combo (a list type) against its list when a prompt is queued, but not a V3 combo
    (type "COMBO", execution.py ``validate_inputs``), so a V3 node that wants the same refusal at queue time (an
    HTTP 400 naming the widget, before anything runs) names its combos in ``validate_inputs`` and calls this.
    None (an optional combo a prompt saved before it existed does not have) passes."""
    spec = cls.INPUT_TYPES(include_hidden=False)
    bad = []
    for name, value in values.items():
        entry = spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)
        options = entry[1].get("options") if entry is not None and len(entry) > 1 else None
        if value is None or options is None or value in options:
            continue
        shown = f"(a list of {len(options)})" if len(options) > 20 else ", ".join(map(str, options)) or "(empty list)"
        bad.append(f"{name}: {value!r} is not one of {shown}")
    return True if not bad else "; ".join(bad)


def hidden_value(cls: type, name: str) -> Any:
    """A hidden input of the running node (``cls.hidden.<name>``), or None when the node is called directly."""
    return getattr(getattr(cls, "hidden", None), name, None)




# The pack's own link types (one ComfyType each, shared by the nodes that make and take them).
FLOWCACHE_MODEL = io.Custom("FLOWCACHE_MODEL")
FLOWCACHE_CACHE = io.Custom("FLOWCACHE_CACHE")
FLOWCACHE_CAUSAL = io.Custom("FLOWCACHE_CAUSAL")
FLOWCACHE_MAGI_VAE = io.Custom("FLOWCACHE_MAGI_VAE")
FLOWCACHE_PROMPTS = io.Custom("FLOWCACHE_PROMPTS")

__all__ = ["io", "ComfyExtension", "HOST_API", "check_choices", "hidden_value", "FLOWCACHE_MODEL", "FLOWCACHE_CACHE",
           "FLOWCACHE_CAUSAL", "FLOWCACHE_MAGI_VAE", "FLOWCACHE_PROMPTS"]
