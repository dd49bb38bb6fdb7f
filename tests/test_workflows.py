"""The shipped example workflows (``workflows/*.json``, UI format).

No ComfyUI needed: every workflow is checked against the pack's own node definitions (the pack imported by file
path with stubbed ComfyUI modules, ``pack``/``comfy`` fixtures in conftest.py) and a small table of the core nodes
it uses (from ComfyUI 0.3.64): node types exist, widget counts and values are valid, links connect matching
types, each sampler takes its cache settings from a FlowCache Cache node, each workflow has a Note and a ``.jpg``
thumbnail, and the settings are valid for the model's loop (diffusion forcing: the window planning; causal Wan: the
causal loop's own settings class and plan; MAGI-1: its stage schedule), and named presets hold the values the
server's preset route shows. The web extension's own modules are tested in test_web.py.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from flowcache.presets import NAMED_PRESETS

from comfy_helpers import combo_options, run_node

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WEB = ROOT / "web"
DEMO_DIT = ROOT / "flowcache" / "demo" / "assets" / "demo_dit.safetensors"
DEMO_ENTRY = "flowcache-demo (built-in, runs on CPU)"
EXPECTED = {"flowcache_demo_cpu", "skyreels_v2_df_1.3b_t2v_fast", "skyreels_v2_df_1.3b_t2v_slow",
            "skyreels_v2_df_1.3b_long_kv", "magi1_4.5b_distill_t2v_fast", "skyreels_v2_df_14b_native_lora_fast",
            "self_forcing_t2v_long_bounded_kv", "causal_forcing_framewise_t2v", "krea_realtime_14b_prompt_changes",
            "longlive_interactive_story_three_prompts"}
# The presets row each shipped workflow's model file has (what GET /flowcache/model_presets answers once the file
# is in models/diffusion_models; the demo's row is read from its asset here).
MODEL_KEYS = {"flowcache_demo_cpu": "demo", "skyreels_v2_df_1.3b_t2v_fast": "wan-1.3B",
              "skyreels_v2_df_1.3b_t2v_slow": "wan-1.3B", "skyreels_v2_df_1.3b_long_kv": "wan-1.3B",
              "magi1_4.5b_distill_t2v_fast": "magi-4.5B", "skyreels_v2_df_14b_native_lora_fast": "wan-14B",
              # causal Wan 1.3B (Self-Forcing, Causal Forcing): few-step block-by-block sampling has its own row
              "self_forcing_t2v_long_bounded_kv": "wan-1.3B-causal", "causal_forcing_framewise_t2v": "wan-1.3B-causal",
              # LongLive v1.0 is a causal 1.3B; Krea Realtime a causal 14B, which has no presets row yet (method off)
              "longlive_interactive_story_three_prompts": "wan-1.3B-causal",
              "krea_realtime_14b_prompt_changes": "wan-14B-causal"}
# Widget orders of the saved workflows (widgets_values is positional).
SAMPLER_WIDGETS = ["width", "height", "num_frames", "steps", "cfg", "shift", "seed", "control_after_generate",
                   "ar_step", "causal_block_size", "base_num_frames", "overlap_history", "addnoise_condition",
                   "solver", "keep_model_loaded"]
CACHE_WIDGETS = ["method", "preset", "threshold", "warmup_steps", "kv_budget", "mix_lambda", "max_skips",
                 "attention"]  # more may follow
CAUSAL_WIDGETS = ["kv_mode", "window_frames", "sink_frames", "schedule"]
LOADER_WIDGETS = ["model_name", "dtype", "loop", "weights", "magi_variant", "lora"]  # lora: new, at the end
WAN_PATCH = (1, 2, 2)  # Wan2.1's patch size (time, height, width)
# preset row field -> cache node widget where the names differ (web/flowcache_presets.js FIELD_WIDGETS)
FIELD_WIDGETS = {"warmup": "warmup_steps"}

# Core nodes used by the workflows, as ComfyUI 0.3.64 declares them (nodes.py). "FILES" marks a combo filled from
# a model folder: any model file name is accepted (the user's folder decides what exists).
FILES = "FILES"
CORE_NODES = {
    "CLIPLoader": {
        "input": {"required": {
            "clip_name": (FILES,),
            "type": (["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart",
                      "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image",
                      "hunyuan_image"],)},
            "optional": {"device": (["default", "cpu"], {"advanced": True})}},
        "output": ("CLIP",)},
    "CLIPTextEncode": {
        "input": {"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                               "clip": ("CLIP",)}},
        "output": ("CONDITIONING",)},
    "VAELoader": {"input": {"required": {"vae_name": (FILES,)}}, "output": ("VAE",)},
    "UNETLoader": {"input": {"required": {"unet_name": (FILES,),
                                          "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],)}},
                   "output": ("MODEL",)},
    "LoraLoaderModelOnly": {"input": {"required": {
        "model": ("MODEL",), "lora_name": (FILES,),
        "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})}},
        "output": ("MODEL",)},
    "VAEDecode": {"input": {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, "output": ("IMAGE",)},
    # Frontend-only node (no Python class): one multiline text widget, no slots.
    "Note": {"input": {"required": {"text": ("STRING", {"multiline": True})}}, "output": ()},
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ["fixed", "increment", "decrement", "randomize"]
MODEL_FILE_WIDGETS = ("model_name", "t5_name", "vae_name", "lora")  # the pack's own combos listing a model folder
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def demo_extra(pack, key: str) -> dict:
    """The demo model's embedded presets (for key "demo"; empty otherwise or without the asset)."""
    if key != "demo" or not DEMO_DIT.exists():
        return {}
    from safetensors import safe_open
    with safe_open(str(DEMO_DIT), framework="pt", device="cpu") as f:
        return pack_submodule(pack, "flowcache.presets").embedded_presets(f.metadata() or {}, DEMO_DIT.name)


def model_rows(pack, key: str) -> dict:
    """``preset_rows`` for a model key, as the server's route answers it (the demo's embedded presets included)."""
    return pack_submodule(pack, "flowcache.presets").preset_rows(key, demo_extra(pack, key))


def pack_submodule(pack, dotted: str):
    from comfy_helpers import pack_submodule as sub
    return sub(pack, dotted)


# ------------------------------------------------------------------------------------ node definitions

@pytest.fixture(scope="module")
def node_defs(pack):
    """{class name: {"input": INPUT_TYPES(), "output": RETURN_TYPES}} for the pack's nodes and the core table."""
    defs = {}
    for name, cls in pack.NODE_CLASSES.items():
        defs[name] = {"input": cls.INPUT_TYPES(), "output": tuple(cls.RETURN_TYPES),
                      "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    for name, d in CORE_NODES.items():
        assert name not in defs, f"{name} is a core node name; ComfyUI would ignore the pack's copy"
        defs[name] = d
    return defs


def spec_kind(spec) -> object:
    """An input's type, or a combo's list of choices (a V3 schema's combos read ``("COMBO", {"options": [...]})``)."""
    options = combo_options(spec)
    return options if options is not None else spec[0]


def widget_specs(node_def: dict) -> list[tuple[str, object, dict]]:
    """The frontend's widgets of a node in order: (name, type or combo list, options), seed controls included."""
    out = []
    for section in ("required", "optional"):
        for name, spec in node_def["input"].get(section, {}).items():
            kind = spec_kind(spec)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("forceInput"):
                continue
            if isinstance(kind, (list, tuple)) or kind == FILES or kind in WIDGET_TYPES:
                out.append((name, kind, opts))
                if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                    out.append(("control_after_generate", CONTROL_VALUES, {}))
    return out


def link_inputs(node_def: dict) -> dict[str, tuple[str, bool]]:
    """Inputs that take a link: name -> (type, required)."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in node_def["input"].get(section, {}).items():
            kind = spec_kind(spec)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, str) and kind != FILES and (kind not in WIDGET_TYPES or opts.get("forceInput")):
                out[name] = (kind, section == "required")
    return out


def check_widget_value(node_type: str, name: str, kind, opts: dict, value) -> list[str]:
    where = f"{node_type}.{name}={value!r}"
    if kind == FILES or (isinstance(kind, (list, tuple)) and name in MODEL_FILE_WIDGETS):
        ok = isinstance(value, str) and (value in (kind if isinstance(kind, (list, tuple)) else ())
                                         or value.endswith(MODEL_SUFFIXES))
        return [] if ok else [f"{where}: not a model file name"]
    if isinstance(kind, (list, tuple)):
        return [] if value in kind else [f"{where}: not one of {list(kind)}"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: not a boolean"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{where}: not a string"]
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return [f"{where}: not a number"]
        if kind == "INT" and int(value) != value:
            return [f"{where}: not an integer"]
        errs = []
        if "min" in opts and value < opts["min"]:
            errs.append(f"{where}: below min {opts['min']}")
        if "max" in opts and value > opts["max"]:
            errs.append(f"{where}: above max {opts['max']}")
        return errs
    return [f"{where}: unknown widget type {kind!r}"]


def load_workflow(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def widgets_by_name(node: dict, node_def: dict) -> dict:
    return {name: value for (name, _, _), value in zip(widget_specs(node_def), node["widgets_values"])}


def nodes_of(wf: dict, node_type: str) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] == node_type]


# ------------------------------------------------------------------------------------------- workflows

def test_the_expected_workflows_are_shipped():
    assert {p.stem for p in WORKFLOWS} == EXPECTED
    # ComfyUI serves only the first example folder a pack has (comfyui-host.md §6): keep to one.
    others = [d for d in ("example_workflows", "example", "examples", "workflow") if (ROOT / d).is_dir()]
    assert not others, f"a second example-workflow folder would hide workflows/: {others}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_structure(path, node_defs):
    wf = load_workflow(path)
    assert wf.get("version") == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in wf, key
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)), "duplicate node ids"
    assert wf["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in wf["links"]]
    assert len(link_ids) == len(set(link_ids)), "duplicate link ids"
    assert not link_ids or wf["last_link_id"] >= max(link_ids)
    errors = []
    for node in wf["nodes"]:
        nd = node_defs.get(node["type"])
        if nd is None:
            errors.append(f"node {node['id']}: unknown type {node['type']}")
            continue
        specs = widget_specs(nd)
        values = node.get("widgets_values", [])
        if len(values) != len(specs):
            errors.append(f"node {node['id']} {node['type']}: {len(values)} widget values for "
                          f"{len(specs)} widgets {[s[0] for s in specs]}")
            continue
        for (name, kind, opts), value in zip(specs, values):
            errors += check_widget_value(node["type"], name, kind, opts, value)
        # slots: the declared outputs, the link inputs by name
        outs = node.get("outputs", [])
        assert [o["type"] for o in outs] == list(nd["output"]), f"{node['type']} outputs {outs}"
        for inp in node.get("inputs", []):
            if inp.get("widget"):
                assert inp["name"] in [s[0] for s in specs], f"{node['type']}: widget input {inp['name']}"
                continue
            declared = link_inputs(nd).get(inp["name"])
            if declared is None:
                errors.append(f"{node['type']}: unknown input {inp['name']}")
            elif inp["type"] != declared[0]:  # the frontend saves the declared type, a union as written
                errors.append(f"{node['type']}.{inp['name']}: slot type {inp['type']} != {declared[0]}")
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, (kind, required) in link_inputs(nd).items():
            if required and name not in linked:
                errors.append(f"node {node['id']} {node['type']}: required input {name} ({kind}) is not connected")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_links_match_types(path, node_defs):
    wf = load_workflow(path)
    by_id = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, ltype in wf["links"]:
        a, b = by_id[src], by_id[dst]
        out_type = node_defs[a["type"]]["output"][src_slot]
        inp = b["inputs"][dst_slot]
        in_type = link_inputs(node_defs[b["type"]])[inp["name"]][0]
        # an input may take a union ("FLOWCACHE_MODEL,MODEL"); the link carries the output's type
        assert out_type == ltype and out_type in in_type.split(","), \
            f"link {link_id}: {a['type']}[{src_slot}] {out_type} -> {b['type']}.{inp['name']} {in_type} (link says {ltype})"
        assert inp["link"] == link_id
        assert link_id in (a["outputs"][src_slot].get("links") or [])
    # and no slot claims a link that does not exist
    known = {link[0] for link in wf["links"]}
    for n in wf["nodes"]:
        for i in n.get("inputs", []):
            assert i.get("link") is None or i["link"] in known, (n["type"], i)
        for o in n.get("outputs", []):
            assert set(o.get("links") or []) <= known, (n["type"], o)


def test_widget_orders_of_the_saved_workflows(node_defs):
    """widgets_values is positional: the shipped workflows (and users' saved ones) depend on these orders."""
    assert [name for name, _, _ in widget_specs(node_defs["FlowCacheSampler"])] == SAMPLER_WIDGETS
    cache = [name for name, _, _ in widget_specs(node_defs["FlowCacheCache"])]
    assert cache[:len(CACHE_WIDGETS)] == CACHE_WIDGETS, "new cache knobs go at the end"
    assert node_defs["FlowCacheCache"]["output"] == ("FLOWCACHE_CACHE",)
    assert link_inputs(node_defs["FlowCacheSampler"])["cache"] == ("FLOWCACHE_CACHE", False)
    assert combo_options(node_defs["FlowCacheCache"]["input"]["required"]["method"]) == [
        "off", "teacache", "flowcache", "magcache", "easycache"]
    assert [name for name, _, _ in widget_specs(node_defs["FlowCacheCausalOptions"])] == CAUSAL_WIDGETS
    assert [name for name, _, _ in widget_specs(node_defs["FlowCacheModelLoader"])] == LOADER_WIDGETS
    assert link_inputs(node_defs["FlowCacheSampler"])["causal"] == ("FLOWCACHE_CAUSAL", False)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_note_and_thumbnail(path):
    wf = load_workflow(path)
    notes = nodes_of(wf, "Note")
    assert notes and all(len(n["widgets_values"][0]) > 200 for n in notes), "needs a Note explaining the knobs"
    text = notes[0]["widgets_values"][0]
    for knob in ("FlowCache Cache", "method", "preset", "threshold", "kv_budget", "slow preset", "from model"):
        assert knob in text, knob
    assert "Sampler knobs\n• cache" not in text, "the cache knobs are on FlowCache Cache now"
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"missing thumbnail {thumb.name}"
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff", "thumbnail is not a JPEG"
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.width >= 256 and im.height >= 160, (im.format, im.size)


def _sampler(wf: dict, node_defs: dict) -> dict:
    (node,) = nodes_of(wf, "FlowCacheSampler")
    return widgets_by_name(node, node_defs["FlowCacheSampler"])


def _cache_node(wf: dict) -> dict:
    """The FlowCache Cache node linked into the sampler's cache input."""
    (sampler,) = nodes_of(wf, "FlowCacheSampler")
    (inp,) = [i for i in sampler["inputs"] if i["name"] == "cache"]
    assert inp["link"] is not None, "the sampler's cache input is not connected"
    (link,) = [ln for ln in wf["links"] if ln[0] == inp["link"]]
    (node,) = [n for n in wf["nodes"] if n["id"] == link[1]]
    assert node["type"] == "FlowCacheCache" and link[5] == "FLOWCACHE_CACHE", (node["type"], link)
    return node


def _cache(wf: dict, node_defs: dict) -> dict:
    return widgets_by_name(_cache_node(wf), node_defs["FlowCacheCache"])


def _loader_name(wf: dict, node_defs: dict) -> str:
    """The model file: FlowCache Load Model's, or ComfyUI's Load Diffusion Model's (a native MODEL)."""
    for node_type, widget in (("FlowCacheModelLoader", "model_name"), ("UNETLoader", "unet_name")):
        found = nodes_of(wf, node_type)
        if found:
            (node,) = found
            return widgets_by_name(node, node_defs[node_type])[widget]
    raise AssertionError("no model loader in the workflow")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_sampler_takes_its_cache_from_a_cache_node(path, node_defs):
    wf = load_workflow(path)
    (sampler,) = nodes_of(wf, "FlowCacheSampler")
    assert len(sampler["widgets_values"]) == len(SAMPLER_WIDGETS)
    node = _cache_node(wf)
    assert len(nodes_of(wf, "FlowCacheCache")) == 1
    names = [i["name"] for i in node.get("inputs", [])]
    assert names[:len(CACHE_WIDGETS)] == CACHE_WIDGETS, "the cache node's widget inputs"  # newer ones may follow
    (out,) = node["outputs"]
    assert (out["name"], out["type"], out["links"]) == ("cache", "FLOWCACHE_CACHE", [_link_into(sampler, "cache")])
    # the sampler's link inputs in the order the node declares them (required, then optional: cache first)
    declared = list(link_inputs(node_defs["FlowCacheSampler"]))
    slots = [i["name"] for i in sampler["inputs"] if not i.get("widget")]
    assert slots == [n for n in declared if n in slots] and slots[:4] == ["model", "positive", "negative", "cache"]
    assert not {i["name"] for i in sampler["inputs"]} & set(CACHE_WIDGETS), "cache widgets left on the sampler"
    # laid out beside the other nodes, not on top of one
    x, y = node["pos"]
    w, h = node["size"]
    for other in wf["nodes"]:
        if other is node:
            continue
        ox, oy = other["pos"]
        ow, oh = other["size"]
        assert x + w <= ox or ox + ow <= x or y + h <= oy - 30 or oy + oh <= y - 30, f"overlaps {other['type']}"


def _link_into(node: dict, name: str) -> int:
    return next(i["link"] for i in node["inputs"] if i["name"] == name)


def _linked_node(wf: dict, node: dict, input_name: str) -> dict | None:
    """The node whose output feeds ``node``'s input ``input_name`` (None: not connected, or no such slot)."""
    link_id = next((i.get("link") for i in node.get("inputs", []) if i["name"] == input_name), None)
    if link_id is None:
        return None
    (link,) = [ln for ln in wf["links"] if ln[0] == link_id]
    return next(n for n in wf["nodes"] if n["id"] == link[1])


def _loop(wf: dict, node_defs: dict, pack, key: str) -> str:
    """The sampling loop the workflow's model runs, decided by the pack's own ``wan_loop``: MAGI-1 its own; FlowCache
    Load Model its loop widget, or for auto the file's name (metadata and a .pt's generator dict are only in the
    file); ComfyUI's own MODEL of a Wan model (Load Diffusion Model) by its file's name, as the sampler decides it
    (nodes/native.py)."""
    if key.startswith("magi"):
        return "magi"
    loaders = nodes_of(wf, "FlowCacheModelLoader")
    if loaders:
        (loader,) = loaders
        w = widgets_by_name(loader, node_defs["FlowCacheModelLoader"])
        name, choice = w["model_name"], w["loop"]
    else:
        name, choice = _loader_name(wf, node_defs), "auto"
    ck = pack_submodule(pack, "flowcache.checkpoint").Checkpoint({}, [Path(name)])  # a .pt's layout: only in the file
    return pack_submodule(pack, "flowcache.models").wan_loop(ck, (), choice)[0]


def causal_plan(wf: dict, node_defs: dict, pack, kv_budget: int, loop: str = "causal"):
    """The causal loop's settings and plan for the workflow, built by the sampler's own code (nodes.causal): the
    sampler's widgets and the FlowCache Causal Options node linked into its ``causal`` input; ``loop``: the
    model's (causal or longlive: the release's rule for a prompt change)."""
    (sampler,) = nodes_of(wf, "FlowCacheSampler")
    opts = _linked_node(wf, sampler, "causal")
    assert opts is not None and opts["type"] == "FlowCacheCausalOptions", \
        "a causal workflow shows its KV and schedule settings: FlowCache Causal Options into the sampler's causal input"
    causal_nodes = pack_submodule(pack, "nodes.causal")
    (options,) = run_node(causal_nodes.FlowCacheCausalOptions,
                          **widgets_by_name(opts, node_defs["FlowCacheCausalOptions"]))
    sampler_mod = pack_submodule(pack, "nodes.sampler")
    s = _sampler(wf, node_defs)
    fields = set(sampler_mod.SamplerWidgets.__dataclass_fields__)
    settings, ignored = causal_nodes.causal_settings(sampler_mod.SamplerWidgets(**{k: v for k, v in s.items()
                                                                                    if k in fields}), options, loop)
    cw = pack_submodule(pack, "flowcache.pipelines.causal_wan")
    geometry = pack_submodule(pack, "flowcache.pipelines.common").LatentGeometry(4, 8, 16)
    return options, settings, cw.plan_causal(settings, geometry, WAN_PATCH, kv_budget), ignored


def krea_plan(wf: dict, node_defs: dict, pack):
    """Krea Realtime's plan for the workflow, as the sampler's ``krea_run`` builds its settings (nodes.causal)."""
    kr = pack_submodule(pack, "flowcache.pipelines.krea_realtime")
    s = _sampler(wf, node_defs)
    settings = kr.KreaSettings(width=s["width"], height=s["height"], num_frames=s["num_frames"],
                               num_frame_per_block=s["causal_block_size"], seed=s["seed"])
    geometry = pack_submodule(pack, "flowcache.pipelines.common").LatentGeometry(4, 8, 16)
    return kr.plan_krea(settings, geometry, WAN_PATCH)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_sampler_settings_are_valid_for_the_model(path, node_defs, pack):
    """The model's loop accepts the settings (diffusion forcing: window planning; causal Wan: its settings class
    and plan, never the DF windows; MAGI-1: its stage schedule), and named presets hold the values the UI will lock
    them to."""
    df = pack_submodule(pack, "flowcache.pipelines.diffusion_forcing")
    wf = load_workflow(path)
    (sampler,) = nodes_of(wf, "FlowCacheSampler")
    s = _sampler(wf, node_defs)
    c = _cache(wf, node_defs)
    name = _loader_name(wf, node_defs)
    if name == DEMO_ENTRY:
        geometry = {"temporal_stride": 1, "spatial_stride": 4, "channels": 16}
        if DEMO_DIT.exists():
            from safetensors import safe_open
            with safe_open(str(DEMO_DIT), framework="pt", device="cpu") as f:
                geometry = json.loads((f.metadata() or {}).get("flowcache.geometry", json.dumps(geometry)))
    else:
        geometry = {"temporal_stride": 4, "spatial_stride": 8, "channels": 16}
    key = MODEL_KEYS[path.stem]
    loop = _loop(wf, node_defs, pack, key)
    # a causal model loads with the presets row of its own (what the loader's preset_key says for it)
    causal_loops = pack_submodule(pack, "flowcache.models").CAUSAL_LOOPS
    assert key.endswith("-causal") == (loop in causal_loops), (path.stem, key, loop)
    # the cache node's settings resolve for this model (what the sampler does at run time)
    presets = pack_submodule(pack, "flowcache.presets")
    to_field = {w: f for f, w in FIELD_WIDGETS.items()}
    custom = {to_field.get(k, k): v for k, v in c.items()
              if k not in ("method", "preset", "attention", "reuse", "cfg_reuse", "cfg_interval")}
    settings = presets.resolve_cache(key, c["method"], c["preset"], demo_extra(pack, key), **custom)
    assert settings.method == c["method"]
    if loop == "magi":  # MAGI-1: whole chunks over a staggered window, steps split evenly over the stages
        magi = pack_submodule(pack, "flowcache.pipelines.magi")
        assert s["width"] % 16 == 0 and s["height"] % 16 == 0 and s["num_frames"] % 4 == 0
        chunk = s["causal_block_size"]
        assert magi.stage_schedule(s["num_frames"] // 4, chunk, 4, s["steps"])
    elif loop in ("causal", "longlive"):  # block by block against a KV cache: no windows, the causal loop's checks
        _, cs, plan, _ = causal_plan(wf, node_defs, pack, settings.kv_budget, loop)
        assert plan.blocks * plan.block_frames == plan.latent_frames == (s["num_frames"] - 1) // 4 + 1
        assert cs.num_frame_per_block == s["causal_block_size"] and cs.seed == s["seed"]
    elif loop == "krea_realtime":  # its own loop: a context rebuilt per block, the release's schedule
        assert _linked_node(wf, sampler, "causal") is None, "Krea Realtime keeps its own cache: Causal Options unused"
        plan = krea_plan(wf, node_defs, pack)
        assert plan.blocks * plan.block_frames == plan.latent_frames == (s["num_frames"] - 1) // 4 + 1
    else:
        assert _linked_node(wf, sampler, "causal") is None, "causal options on a diffusion-forcing model do nothing"
        fields = set(df.DFSettings.__dataclass_fields__)
        dfs = df.DFSettings(**{k: v for k, v in s.items() if k in fields})
        assert df.plan_windows(dfs, df.LatentGeometry(**geometry))
    answer = model_rows(pack, key)
    assert answer["known"] or c["method"] == "off", answer  # a model without presets runs with method off
    if c["method"] != "off" and c["preset"] in NAMED_PRESETS:
        # what the cache node shows locked: each row field that has a widget (a row may carry more, e.g. strings)
        row = answer["rows"][c["method"]][c["preset"]]
        shown = {FIELD_WIDGETS.get(k, k): v for k, v in row.items()
                 if FIELD_WIDGETS.get(k, k) in c and k not in ("attention", "reuse", "cfg_reuse")}  # free: "auto"
        assert {"threshold", "warmup_steps", "kv_budget", "mix_lambda"} <= set(shown), row
        assert {k: c[k] for k in shown} == shown, (path.stem, row)


def test_demo_workflow_uses_the_demo_settings(node_defs, pack):
    wf = load_workflow(ROOT / "workflows" / "flowcache_demo_cpu.json")
    assert _loader_name(wf, node_defs) == DEMO_ENTRY
    s = _sampler(wf, node_defs)
    demo = pack_submodule(pack, "nodes.demo").demo_module()
    if demo is None:
        pytest.skip("flowcache.demo is not installed")
    DEMO_SETTINGS = demo.DEMO_SETTINGS
    for k, v in DEMO_SETTINGS.items():
        if k in s:
            assert s[k] == v, (k, s[k], v)
    c = _cache(wf, node_defs)
    assert (c["method"], c["preset"]) == ("flowcache", "fast")
    (combine,) = nodes_of(wf, "FlowCacheVideoCombine")
    fps = widgets_by_name(combine, node_defs["FlowCacheVideoCombine"])["frame_rate"]
    assert fps == DEMO_SETTINGS.get("fps", fps)
    types = {n["type"] for n in wf["nodes"]}
    assert {"FlowCacheDemoTextEncode", "FlowCacheDecode", "FlowCacheVideoCombine", "FlowCacheCache"} <= types
    assert not types & {"CLIPLoader", "VAELoader"}, "the demo must not need any download"
    prompts = [n["widgets_values"][0] for n in nodes_of(wf, "FlowCacheDemoTextEncode")]
    assert "" in prompts and any(prompts), "positive prompt and an empty negative prompt"


@pytest.mark.parametrize("stem,preset", [("skyreels_v2_df_1.3b_t2v_fast", "fast"),
                                         ("skyreels_v2_df_1.3b_t2v_slow", "slow")])
def test_skyreels_t2v_workflows(stem, preset, node_defs):
    wf = load_workflow(ROOT / "workflows" / f"{stem}.json")
    s = _sampler(wf, node_defs)
    c = _cache(wf, node_defs)
    assert (s["width"], s["height"], s["num_frames"], s["steps"], s["cfg"], s["shift"]) == (960, 544, 97, 50, 6.0, 8.0)
    assert (s["ar_step"], s["causal_block_size"], c["method"], c["preset"]) == (5, 5, "flowcache", preset)
    assert _loader_name(wf, node_defs) == "SkyReels-V2-DF-1.3B-540P.safetensors"
    (clip,) = nodes_of(wf, "CLIPLoader")
    assert clip["widgets_values"][:2] == ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan"]
    (vae,) = nodes_of(wf, "VAELoader")
    assert vae["widgets_values"] == ["wan_2.1_vae.safetensors"]
    assert len(nodes_of(wf, "CLIPTextEncode")) == 2 and nodes_of(wf, "VAEDecode")
    note = nodes_of(wf, "Note")[0]["widgets_values"][0]
    assert "Skywork/SkyReels-V2-DF-1.3B-540P" in note and "models/diffusion_models" in note


def test_long_video_workflow(node_defs, pack):
    wf = load_workflow(ROOT / "workflows" / "skyreels_v2_df_1.3b_long_kv.json")
    s = _sampler(wf, node_defs)
    c = _cache(wf, node_defs)
    assert s["num_frames"] > s["base_num_frames"] and c["kv_budget"] == 1 and c["preset"] == "custom"
    assert c["method"] == "flowcache" and (c["threshold"], c["warmup_steps"]) == (0.15, 5)
    assert s["addnoise_condition"] == 20 and s["overlap_history"] == 17
    (sampler,) = nodes_of(wf, "FlowCacheSampler")
    vae_in = next(i for i in sampler["inputs"] if i["name"] == "vae")
    assert vae_in["link"] is not None, "the sampler's vae input re-encodes the overlap between windows"
    src = next(link[1] for link in wf["links"] if link[0] == vae_in["link"])
    assert next(n for n in wf["nodes"] if n["id"] == src)["type"] == "VAELoader"
    # long videos are decoded piece by piece into the file, never as one IMAGE batch
    (save,) = nodes_of(wf, "FlowCacheDecodeSave")
    assert not nodes_of(wf, "VAEDecode") and not nodes_of(wf, "FlowCacheVideoCombine")
    linked = {i["name"] for i in save["inputs"] if i.get("link") is not None}
    assert linked == {"samples", "vae"}
    df = pack_submodule(pack, "flowcache.pipelines.diffusion_forcing")
    fields = set(df.DFSettings.__dataclass_fields__)
    windows = df.plan_windows(df.DFSettings(**{k: v for k, v in s.items() if k in fields}), df.LatentGeometry(4, 8, 16))
    assert len(windows) >= 3


def test_magi_workflow(node_defs, pack):
    wf = load_workflow(ROOT / "workflows" / "magi1_4.5b_distill_t2v_fast.json")
    s = _sampler(wf, node_defs)
    c = _cache(wf, node_defs)
    assert (s["width"], s["height"], s["num_frames"], s["steps"], s["shift"], s["seed"]) == (720, 720, 96, 64, 3.0, 1234)
    assert (s["causal_block_size"], c["method"], c["preset"]) == (6, "flowcache", "fast")
    name = _loader_name(wf, node_defs)
    assert name == "magi/4.5B_distill/inference_weight.distill/model-00001-of-00002.safetensors"
    assert "distill" in name  # what marks the distilled model for the loader
    types = {n["type"] for n in wf["nodes"]}
    assert {"FlowCacheMagiTextEncode", "FlowCacheMagiVAELoader", "FlowCacheDecodeSave"} <= types
    assert not types & {"CLIPLoader", "VAELoader", "VAEDecode"}, "MAGI-1 uses its own T5 path and VAE"
    (te,) = nodes_of(wf, "FlowCacheMagiTextEncode")
    assert te["widgets_values"][0] == "t5xxl_fp16.safetensors" and te["widgets_values"][1]
    note = nodes_of(wf, "Note")[0]["widgets_values"][0]
    for fact in ("sand-ai/MAGI-1", "special_tokens.npz", "magi1_special_tokens.npz", "models/vae/magi1_vae"):
        assert fact in note


def test_native_14b_lora_workflow(node_defs):
    """ComfyUI's own loaders feed the sampler: Load Diffusion Model (fp8 storage) -> LoRA -> FlowCache Sampler."""
    wf = load_workflow(ROOT / "workflows" / "skyreels_v2_df_14b_native_lora_fast.json")
    assert not nodes_of(wf, "FlowCacheModelLoader")
    (unet,) = nodes_of(wf, "UNETLoader")
    (lora,) = nodes_of(wf, "LoraLoaderModelOnly")
    (sampler,) = nodes_of(wf, "FlowCacheSampler")
    assert unet["widgets_values"][1] == "fp8_e4m3fn" and "14B" in unet["widgets_values"][0]
    by_link = {ln[0]: ln for ln in wf["links"]}
    into_lora = by_link[next(i["link"] for i in lora["inputs"] if i["name"] == "model")]
    into_sampler = by_link[_link_into(sampler, "model")]
    assert (into_lora[1], into_lora[5]) == (unet["id"], "MODEL")
    assert (into_sampler[1], into_sampler[5]) == (lora["id"], "MODEL")
    c = _cache(wf, node_defs)
    assert (c["method"], c["preset"]) == ("flowcache", "fast")
    note = nodes_of(wf, "Note")[0]["widgets_values"][0]
    assert "Load Diffusion Model" in note and "LoRA" in note and "GGUF" in note


def _causal_common(wf: dict, node_defs: dict, pack) -> dict:
    """What both causal Wan workflows share: Wan text and VAE, the loader's causal loop, no CFG, the sampler's
    unused diffusion-forcing widgets showing the schedule's own values, FlowCache Causal Options into ``causal``."""
    (clip,) = nodes_of(wf, "CLIPLoader")
    assert clip["widgets_values"][:2] == ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan"]
    assert len(nodes_of(wf, "CLIPTextEncode")) == 2
    (vae,) = nodes_of(wf, "VAELoader")
    assert vae["widgets_values"] == ["wan_2.1_vae.safetensors"]
    (loader,) = nodes_of(wf, "FlowCacheModelLoader")
    lw = widgets_by_name(loader, node_defs["FlowCacheModelLoader"])
    assert lw["loop"] == "causal" and lw["magi_variant"] == "auto", lw
    (sampler,) = nodes_of(wf, "FlowCacheSampler")
    assert _linked_node(wf, sampler, "model")["id"] == loader["id"]
    assert _linked_node(wf, sampler, "vae") is None, "the causal loop has no windows to re-encode"
    opts = _linked_node(wf, sampler, "causal")
    assert opts["type"] == "FlowCacheCausalOptions"
    assert [ln[5] for ln in wf["links"] if ln[0] == _link_into(sampler, "causal")] == ["FLOWCACHE_CAUSAL"]
    s = _sampler(wf, node_defs)
    c = _cache(wf, node_defs)
    to_field = {w: f for f, w in FIELD_WIDGETS.items()}
    settings = pack_submodule(pack, "flowcache.presets").resolve_cache(
        "wan-1.3B-causal", c["method"], c["preset"], {},
        **{to_field.get(k, k): v for k, v in c.items() if k not in ("method", "preset", "attention")})
    options, cs, plan, ignored = causal_plan(wf, node_defs, pack, settings.kv_budget)
    preset = pack_submodule(pack, "flowcache.pipelines.causal_wan").LOOP_PRESETS[options.schedule]
    # the widgets the causal loop ignores show what runs: the schedule's step count and shift, no guidance
    assert (s["steps"], s["shift"], s["cfg"]) == (len(preset["denoising_steps"]), preset["shift"], 1.0)
    assert tuple(cs.denoising_steps) == tuple(preset["denoising_steps"]) and cs.warp == preset["warp"]
    assert {"steps (the schedule's own)", "cfg (no guidance)"} <= set(ignored)
    assert (s["width"], s["height"]) == (832, 480), "Self-Forcing's 480x832"
    note = nodes_of(wf, "Note")[0]["widgets_values"][0]
    assert "loop = causal" in note and "no classifier-free guidance" in note.lower()
    assert "negative" in note and "not used" in note, "the note says the negative prompt is unused"
    assert "http" not in note, "download facts are repositories and file names from the reference docs, no URLs"
    assert not re.search(r"\d\s*(GB|GiB|MB|MiB)\b", note), "no memory figures: nothing here ran on a GPU"
    return {"loader": lw, "sampler": s, "cache": c, "options": options, "settings": cs, "plan": plan, "note": note,
            "kv_budget": settings.kv_budget}


def test_self_forcing_long_bounded_kv_workflow(node_defs, pack):
    """Self-Forcing's .pt (EMA weights), blocks of 3 latent frames, several hundred frames with a bounded KV cache,
    decoded piece by piece into the file."""
    wf = load_workflow(ROOT / "workflows" / "self_forcing_t2v_long_bounded_kv.json")
    r = _causal_common(wf, node_defs, pack)
    lw, s, options, plan = r["loader"], r["sampler"], r["options"], r["plan"]
    assert (lw["model_name"], lw["weights"]) == ("self_forcing_dmd.pt", "generator_ema")
    assert s["causal_block_size"] == 3 and options.schedule == "self_forcing"
    assert s["num_frames"] >= 300 and plan.blocks >= 30, "a long video"
    # bounded: the KV store holds the sink plus the newest blocks of the window, far fewer than the video's blocks
    assert options.kv_mode in ("rolling", "compressed") and options.sink_frames > 0
    assert options.window_frames == 21 and plan.sink_blocks == 1, "the trained horizon, the first block as the sink"
    held = plan.window_blocks if options.kv_mode == "rolling" else plan.sink_blocks + r["kv_budget"] + 1
    assert held < plan.blocks / 4, (held, plan.blocks)
    # long video: decoded piece by piece straight into the file, never one IMAGE batch
    (save,) = nodes_of(wf, "FlowCacheDecodeSave")
    assert not nodes_of(wf, "VAEDecode") and not nodes_of(wf, "FlowCacheVideoCombine")
    assert {i["name"] for i in save["inputs"] if i.get("link") is not None} == {"samples", "vae"}
    assert _linked_node(wf, save, "samples")["type"] == "FlowCacheSampler"
    assert _linked_node(wf, save, "vae")["type"] == "VAELoader"
    assert widgets_by_name(save, node_defs["FlowCacheDecodeSave"])["frame_rate"] == 16.0, "Self-Forcing's 16 fps"
    note = r["note"]
    for fact in ("gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt", "models/diffusion_models",
                 "generator_ema", "rolling", "compressed", "sink", "window_frames", "FlowCache Decode & Save Video",
                 "not a GPU measurement", f"{s['num_frames']} frames"):
        assert fact in note, fact


def test_causal_forcing_framewise_workflow(node_defs, pack):
    """ComfyUI's frame-wise Causal Forcing release: one latent frame per block, loaded as a causal model whatever
    its file name, decoded with VAE Decode; the note gives only the download facts the reference docs have."""
    wf = load_workflow(ROOT / "workflows" / "causal_forcing_framewise_t2v.json")
    r = _causal_common(wf, node_defs, pack)
    lw, s, options, plan = r["loader"], r["sampler"], r["options"], r["plan"]
    assert lw["model_name"].endswith(".safetensors") and lw["weights"] == "auto"
    (loader,) = nodes_of(wf, "FlowCacheModelLoader")
    assert "models" not in loader["properties"], "no download URL: the reference docs do not give one"
    assert s["causal_block_size"] == 1 and plan.block_frames == 1, "frame-wise: one latent frame per block"
    assert plan.blocks == plan.latent_frames == 21 and s["num_frames"] == 81
    assert options.schedule == "self_forcing" and options.kv_mode in ("rolling", "compressed")
    (decode,) = nodes_of(wf, "VAEDecode")
    assert _linked_node(wf, decode, "samples")["type"] == "FlowCacheSampler"
    assert _linked_node(wf, decode, "vae")["type"] == "VAELoader"
    (combine,) = nodes_of(wf, "FlowCacheVideoCombine")
    assert _linked_node(wf, combine, "images")["id"] == decode["id"]
    note = r["note"]
    for fact in ("frame-wise", "PR #13082", "see the model's page", "causal_block_size 1", "models/diffusion_models"):
        assert fact in note, fact


def _pixel_frames(latent_frames: int) -> int:
    return 4 * (latent_frames - 1) + 1


@pytest.mark.parametrize("stem", ["self_forcing_t2v_long_bounded_kv", "causal_forcing_framewise_t2v"])
def test_causal_workflow_runs_through_the_nodes(stem, node_defs, pack, comfy, monkeypatch):
    """The workflow's own loader, Causal Options, Cache and sampler values through the pack's nodes, on a tiny random
    causal Wan saved under the workflow's file name in its release format (Self-Forcing: a .pt with generator and
    generator_ema) and taken for the 1.3B release by the loader; only the frame size is shrunk to 32x32. Every block
    runs its schedule and the video comes out whole; the KV cache's peak is the same for a shorter video (bounded,
    by construction of the store), while kv_mode global grows with the length."""
    import torch
    from safetensors.torch import save_file
    from tiny_models import tiny_wan

    wf = load_workflow(ROOT / "workflows" / f"{stem}.json")
    n = pack.NODE_CLASSES
    vals = {t: widgets_by_name(nodes_of(wf, t)[0], node_defs[t])
            for t in ("FlowCacheModelLoader", "FlowCacheCausalOptions", "FlowCacheCache", "FlowCacheSampler")}
    monkeypatch.setitem(pack_submodule(pack, "flowcache.models.wan").WAN_SIZES, 64, "1.3B")
    sd = {k: v.detach().clone() for k, v in tiny_wan(seed=4, has_fps=False, dim=64).state_dict().items()}
    name = vals["FlowCacheModelLoader"]["model_name"]
    if name.endswith(".pt"):  # Self-Forcing's layout: generator entries, keys under 'model.'
        ema = {"model." + k: v for k, v in sd.items()}
        torch.save({"generator": {k: torch.zeros_like(v) for k, v in ema.items()}, "generator_ema": ema, "critic": {}},
                   comfy.models_dir / name)
    else:
        save_file(sd, str(comfy.models_dir / name))
    out = run_node(n["FlowCacheModelLoader"], **vals["FlowCacheModelLoader"])
    (model,) = out["result"]
    assert model.loaded.loop == "causal" and model.loaded.preset_key == "wan-1.3B-causal", out["ui"]
    assert any("causal loop" in note for note in out["ui"]["flowcache_notes"]), out["ui"]
    if name.endswith(".pt"):  # generator_ema, not the zeroed generator
        assert float(model.loaded.model.patch_embedding.weight.abs().sum()) > 0
    (cache,) = run_node(n["FlowCacheCache"], **vals["FlowCacheCache"])
    g = torch.Generator().manual_seed(1)
    text = [[torch.randn(1, 5, 32, generator=g), {"pooled_output": None}]]
    s = {k: v for k, v in vals["FlowCacheSampler"].items() if k != "control_after_generate"}

    def run(kv_mode: str, num_frames: int) -> dict:
        opts = {**vals["FlowCacheCausalOptions"], "kv_mode": kv_mode}
        (causal,) = run_node(n["FlowCacheCausalOptions"], **opts)
        res = run_node(n["FlowCacheSampler"], **{**s, "width": 32, "height": 32, "num_frames": num_frames},
                       model=model, positive=text, negative=text, cache=cache, causal=causal, unique_id="8")
        stats = res["ui"]["flowcache_stats"][0]
        latents = res["result"][0]["samples"]
        assert latents.shape == (1, 16, (num_frames - 1) // 4 + 1, 4, 4) and torch.isfinite(latents).all()
        return stats

    opts = vals["FlowCacheCausalOptions"]
    block = s["causal_block_size"]
    stats = run(opts["kv_mode"], s["num_frames"])
    blocks = ((s["num_frames"] - 1) // 4 + 1) // block
    steps = s["steps"]
    assert stats["settings"]["loop"] == "causal" and stats["settings"]["blocks"] == blocks
    assert stats["computed"] + stats["reused"] == blocks * steps, "every block ran the schedule's steps"
    assert stats["forwards"] == stats["computed"] + blocks, "and one clean pass each, writing its K/V"
    # another length past the window (shorter than a long workflow's, longer than a window-long one's)
    other = _pixel_frames(opts["window_frames"] + 2 * block)
    assert other != s["num_frames"] and (s["num_frames"] - 1) // 4 + 1 >= opts["window_frames"]
    assert run(opts["kv_mode"], other)["kv_peak_bytes"] == stats["kv_peak_bytes"] > 0, "bounded: flat in length"
    short, long_ = sorted((other, s["num_frames"]))
    assert run("global", long_)["kv_peak_bytes"] > run("global", short)["kv_peak_bytes"], "global grows"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_to_a_valid_api_prompt(path, node_defs, pack, comfy):
    """Widget values mapped by name onto the node functions' signatures (what the server would call)."""
    import inspect

    wf = load_workflow(path)
    for node in wf["nodes"]:
        cls = pack.NODE_CLASSES.get(node["type"])
        if cls is None:
            continue
        kw = {k: v for k, v in widgets_by_name(node, node_defs[node["type"]]).items() if k != "control_after_generate"}
        params = inspect.signature(cls.execute).parameters  # what EXECUTE_NORMALIZED calls with the inputs
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = set(kw) - set(params)
            assert not unknown, f"{node['type']}: widgets {unknown} are not parameters of execute"
        if node["type"] == "FlowCacheCache":  # cheap and pure: build the request the sampler will get
            (request,) = run_node(cls, **kw)
            assert (request.method, request.preset) == (kw["method"], kw["preset"])


# ------------------------------------------------------------------- Krea Realtime 14B and LongLive v1.0

def _schedule(wf: dict, node_defs: dict, pack, frames: int) -> tuple[dict, list[dict], object]:
    """The Prompt Schedule node feeding the sampler's positive input: (its widgets by name, the CLIP Text Encode
    node of each connected prompt in order, the schedule checked against ``frames`` with its latent starts)."""
    import torch

    (sampler,) = nodes_of(wf, "FlowCacheSampler")
    node = _linked_node(wf, sampler, "positive")
    assert node["type"] == "FlowCachePromptSchedule", "the prompts reach the sampler through FlowCache Prompt Schedule"
    w = widgets_by_name(node, node_defs["FlowCachePromptSchedule"])
    texts = []
    for i in range(1, 7):
        src = _linked_node(wf, node, f"conditioning_{i}")
        if src is not None:
            assert src["type"] == "CLIPTextEncode" and _linked_node(wf, src, "clip")["type"] == "CLIPLoader"
            texts.append(src)
    cond = [[torch.zeros(1, 4, 8), {}]]
    inputs = {k: v for k, v in w.items()}
    inputs.update({f"conditioning_{i}": cond for i in range(1, len(texts) + 1)})
    (schedule,) = run_node(pack.NODE_CLASSES["FlowCachePromptSchedule"], **inputs)
    return w, texts, schedule.check(frames, 4)


def _change_blocks(schedule, block_frames: int) -> list[int]:
    """The blocks where a causal loop changes prompt: the first block starting at or after each entry's latent
    start (what the loops' ``changes`` tables say)."""
    return [-(-start // block_frames) for start in schedule.latent_starts[1:]]


def test_krea_realtime_workflow(node_defs, pack):
    """Krea Realtime 14B through ComfyUI's Load Diffusion Model in fp8 (sized for a 24 GB card at 832x480), a long
    video of four prompts blended at block boundaries by Krea's own rule, the VAE into the sampler (its context
    re-encode) and into Decode & Save; no presets row for the 14B causal model yet, so the cache runs off."""
    wf = load_workflow(ROOT / "workflows" / "krea_realtime_14b_prompt_changes.json")
    assert not nodes_of(wf, "FlowCacheModelLoader") and not nodes_of(wf, "FlowCacheCausalOptions")
    (unet,) = nodes_of(wf, "UNETLoader")
    assert unet["widgets_values"] == ["krea-realtime-video-14b.safetensors", "fp8_e4m3fn"]
    assert _loop(wf, node_defs, pack, "wan-14B-causal") == "krea_realtime", "the sampler knows Krea by the file name"
    (sampler,) = nodes_of(wf, "FlowCacheSampler")
    assert _linked_node(wf, sampler, "model")["id"] == unet["id"]
    (clip,) = nodes_of(wf, "CLIPLoader")
    assert clip["widgets_values"][:2] == ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan"]
    (vae,) = nodes_of(wf, "VAELoader")
    assert vae["widgets_values"] == ["wan_2.1_vae.safetensors"]
    assert _linked_node(wf, sampler, "vae")["id"] == vae["id"], "Krea re-encodes its oldest context frame"
    (save,) = nodes_of(wf, "FlowCacheDecodeSave")
    assert _linked_node(wf, save, "vae")["id"] == vae["id"] and _linked_node(wf, save, "samples")["id"] == sampler["id"]
    assert widgets_by_name(save, node_defs["FlowCacheDecodeSave"])["frame_rate"] == 16.0
    s = _sampler(wf, node_defs)
    assert (s["width"], s["height"], s["steps"], s["cfg"], s["shift"]) == (832, 480, 5, 1.0, 5.0), "the release's"
    plan = krea_plan(wf, node_defs, pack)
    assert plan.block_frames == 3 and plan.blocks == 40 and s["num_frames"] == 477, "a long video: 40 blocks"
    negative = _linked_node(wf, sampler, "negative")
    assert negative["type"] == "CLIPTextEncode" and negative["widgets_values"] == [""]
    w, texts, schedule = _schedule(wf, node_defs, pack, s["num_frames"])
    assert len(texts) == 4 and all(t["widgets_values"][0] for t in texts), "several prompts"
    assert (w["transition"], w["blend_blocks"]) == ("auto", 4), "Krea's own rule: a blend over the release's 4 blocks"
    assert schedule.rule("blend") == "blend"
    assert _change_blocks(schedule, plan.block_frames) == [10, 20, 30]
    c = _cache(wf, node_defs)
    assert c["method"] == "off" and (c["kv_placement"], c["kv_dtype"]) == ("auto", "auto")
    assert not model_rows(pack, "wan-14B-causal")["known"], "if Krea gets presets, reconsider method off here"
    # 24 GB: with fp8 weights some plan fits with room to spare (the sampler picks it), in bf16 none would
    memory = pack_submodule(pack, "flowcache.memory")
    gib = 2 ** 30
    fp8 = {r["plan"]: r["device"] for r in memory.estimate("krea-realtime-14b", "832x480", frames=477,
                                                           weights="fp8_e4m3fn", method="off").rows()}
    bf16 = memory.estimate("krea-realtime-14b", "832x480", frames=477, method="off").rows()
    assert fp8["resident + fp8 K/V"] < 20 * gib and fp8["resident"] < 23 * gib, fp8
    assert min(r["device"] for r in bf16) > 24 * gib
    note = nodes_of(wf, "Note")[0]["widgets_values"][0]
    for fact in ("krea/krea-realtime-video", "models/diffusion_models/krea-realtime-video-14b.safetensors",
                 "fp8_e4m3fn", "krea", "24 GB", "not a GPU measurement", "477 frames", "40 blocks", "blend_blocks",
                 "vae input", "frame 120", "block 10", "easycache", "custom", "not used"):
        assert fact in note, fact
    assert "http" not in note


def test_longlive_workflow(node_defs, pack):
    """LongLive v1.0: the base .pt with its lora.pt merged by FlowCache Load Model, the release's 12-frame window and
    3-frame sink on Causal Options, three prompts changing by re-cache where LongLive's interactive config switches
    (latent frames 40 and 80), decoded piece by piece."""
    wf = load_workflow(ROOT / "workflows" / "longlive_interactive_story_three_prompts.json")
    (loader,) = nodes_of(wf, "FlowCacheModelLoader")
    lw = widgets_by_name(loader, node_defs["FlowCacheModelLoader"])
    assert (lw["model_name"], lw["loop"], lw["lora"]) == ("longlive_base.pt", "longlive", "lora.pt")
    models = pack_submodule(pack, "flowcache.models")
    ck = pack_submodule(pack, "flowcache.checkpoint").Checkpoint({}, [Path(lw["model_name"])])
    assert models.wan_loop(ck, (), "auto")[0] == "longlive", "auto would pick LongLive too (its file name)"
    s = _sampler(wf, node_defs)
    c = _cache(wf, node_defs)
    options, cs, plan, ignored = causal_plan(wf, node_defs, pack, 0, "longlive")
    assert (options.kv_mode, options.window_frames, options.sink_frames, options.schedule) == \
        ("rolling", 12, 3, "self_forcing"), "LongLive's release setting"
    assert options == pack_submodule(pack, "nodes.causal").RELEASES["longlive"]["options"]
    assert cs.prompt_rule == "recache" and (plan.window_blocks, plan.sink_blocks, plan.blocks) == (4, 1, 40)
    assert (s["width"], s["height"], s["num_frames"], s["steps"], s["cfg"]) == (832, 480, 477, 4, 1.0)
    assert {"steps (the schedule's own)", "cfg (no guidance)"} <= set(ignored)
    w, texts, schedule = _schedule(wf, node_defs, pack, s["num_frames"])
    assert len(texts) == 3 and all(t["widgets_values"][0] for t in texts)
    assert (w["transition"], w["keep_sink"]) == ("recache", True), "LongLive's re-cache with its global sink"
    assert schedule.latent_starts == [0, 40, 80], "LongLive's interactive switch_frame_indices"
    assert _change_blocks(schedule, plan.block_frames) == [14, 27]
    assert (c["method"], c["preset"]) == ("flowcache", "slow")
    (save,) = nodes_of(wf, "FlowCacheDecodeSave")
    assert _linked_node(wf, save, "vae")["type"] == "VAELoader"
    assert widgets_by_name(save, node_defs["FlowCacheDecodeSave"])["frame_rate"] == 16.0
    note = nodes_of(wf, "Note")[0]["widgets_values"][0]
    for fact in ("Efficient-Large-Model/LongLive-1.3B", "models/diffusion_models/longlive_base.pt",
                 "models/loras/lora.pt", "generator_lora", "loop = longlive", "recache", "global_sink",
                 "window_frames 12", "sink_frames 3", "block 14", "block 27",
                 "python -m flowcache convert longlive-base", "python -m flowcache convert longlive-lora",
                 "not a GPU measurement", "not used"):
        assert fact in note, fact
    assert "http" not in note and not re.search(r"\d\s*(GB|GiB|MB|MiB)\b", note)


def test_longlive_workflow_runs_through_the_nodes(node_defs, pack, comfy):
    """The LongLive workflow's loader (a tiny base in the release's .pt layout, its LoRA in LongLive's lora.pt
    layout), Prompt Schedule, Causal Options, Cache and sampler values through the pack's nodes; only the frame
    size is shrunk to 32x32 and the video to 24 blocks (its first change at the workflow's block 14, the second
    moved to block 20). Each change re-caches once; the KV cache's peak is the same as a shorter video's."""
    import torch
    from tiny_models import tiny_wan

    wf = load_workflow(ROOT / "workflows" / "longlive_interactive_story_three_prompts.json")
    n = pack.NODE_CLASSES
    vals = {t: widgets_by_name(nodes_of(wf, t)[0], node_defs[t])
            for t in ("FlowCacheModelLoader", "FlowCacheCausalOptions", "FlowCacheCache", "FlowCacheSampler",
                      "FlowCachePromptSchedule")}
    monkey = pack_submodule(pack, "flowcache.models.wan").WAN_SIZES
    monkey[64] = "1.3B"
    try:
        model = tiny_wan(seed=4, has_fps=False, dim=64)
        sd = {"model." + k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"generator": sd}, comfy.models_dir / vals["FlowCacheModelLoader"]["model_name"])
        g = torch.Generator().manual_seed(2)
        lora = {}
        for b in range(2):
            for mod in ("self_attn.q", "cross_attn.o", "ffn.0"):
                w = sd[f"model.blocks.{b}.{mod}.weight"]
                lora[f"base_model.model.blocks.{b}.{mod}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * .05
                lora[f"base_model.model.blocks.{b}.{mod}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * .05
        (comfy.models_dir.parent / "loras").mkdir()
        torch.save({"generator_lora": lora}, comfy.models_dir.parent / "loras" / vals["FlowCacheModelLoader"]["lora"])
        out = run_node(n["FlowCacheModelLoader"], **vals["FlowCacheModelLoader"])
    finally:
        monkey.pop(64)
    (loaded,) = out["result"]
    assert loaded.loaded.loop == "longlive" and loaded.loaded.preset_key == "wan-1.3B-causal"
    assert any("merged into 6 of its 6" in note for note in out["ui"]["flowcache_notes"]), out["ui"]
    (cache,) = run_node(n["FlowCacheCache"], **vals["FlowCacheCache"])
    (causal,) = run_node(n["FlowCacheCausalOptions"], **vals["FlowCacheCausalOptions"])
    texts = [[[torch.randn(1, 5, 32, generator=g), {}]] for _ in range(3)]
    s = {k: v for k, v in vals["FlowCacheSampler"].items() if k != "control_after_generate"}

    def run(blocks: int, starts: tuple[int, ...]) -> dict:
        sw = {**vals["FlowCachePromptSchedule"], **{f"start_frame_{i}": f for i, f in enumerate(starts, start=2)}}
        (prompts,) = run_node(n["FlowCachePromptSchedule"], conditioning_1=texts[0], conditioning_2=texts[1],
                              conditioning_3=texts[2], **sw)
        frames = 4 * 3 * blocks - 3
        res = run_node(n["FlowCacheSampler"], **{**s, "width": 32, "height": 32, "num_frames": frames}, model=loaded,
                       positive=prompts, negative=texts[0], cache=cache, causal=causal, unique_id="11")
        assert torch.isfinite(res["result"][0]["samples"]).all()
        return res["ui"]["flowcache_stats"][0]

    stats = run(24, (160, 4 * 60 - 3))  # the workflow's first change (block 14), the second at block 20
    assert [(x["chunk"], x["rule"], x["entry"]) for x in stats["switches"]] == [(14, "recache", 2), (20, "recache", 3)]
    assert stats["forwards"] == stats["computed"] + 24 + 2, "a clean pass per block and one re-cache per change"
    assert run(8, (4 * 15 - 3, 4 * 21 - 3))["kv_peak_bytes"] == stats["kv_peak_bytes"] > 0, "flat in length"
