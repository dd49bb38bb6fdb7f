"""The shipped example workflows (``workflows/*.json``, UI format) and the web extension's preset table.

No ComfyUI needed: every workflow is checked against the pack's own node definitions (the pack imported by file
path with stubbed ComfyUI modules, ``pack``/``comfy`` fixtures in conftest.py) and a small table of the core nodes
it uses (from ComfyUI 0.3.64): node types exist, widget counts and values are valid, links connect matching
types, each workflow has a Note and a ``.jpg`` thumbnail, and the sampler settings are valid for the model.
``web/flowcache_presets.json`` must match ``flowcache/presets.json`` (and the demo model's embedded presets).

Regenerate the web preset table after changing presets:  python tests/test_workflows.py --write-presets
"""
from __future__ import annotations

import ast
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WEB = ROOT / "web"
WEB_PRESETS = WEB / "flowcache_presets.json"
PRESETS = ROOT / "flowcache" / "presets.json"
DEMO_DIT = ROOT / "flowcache" / "demo" / "assets" / "demo_dit.safetensors"
DEMO_ENTRY = "flowcache-demo (built-in, runs on CPU)"
EXPECTED = {"flowcache_demo_cpu", "skyreels_v2_df_1.3b_t2v_fast", "skyreels_v2_df_1.3b_t2v_slow",
            "skyreels_v2_df_1.3b_long_kv", "magi1_4.5b_distill_t2v_fast"}

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
    "VAEDecode": {"input": {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, "output": ("IMAGE",)},
    # Frontend-only node (no Python class): one multiline text widget, no slots.
    "Note": {"input": {"required": {"text": ("STRING", {"multiline": True})}}, "output": ()},
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ["fixed", "increment", "decrement", "randomize"]
MODEL_FILE_WIDGETS = ("model_name", "t5_name", "vae_name")  # the pack's own combos listing a model folder
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
# JS regexes (case-insensitive) the extension uses to map a model file name to a presets row.
ALIASES = [["1[._-]?3b", "wan-1.3B"], ["14b", "wan-14B"], ["magi", "magi-4.5B"]]


# ---------------------------------------------------------------------------------------- preset table

def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def demo_embedded_presets() -> dict | None:
    """The demo model's ``flowcache.presets`` metadata (None if the asset or the metadata is not there)."""
    if not DEMO_DIT.exists():
        return None
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    with safe_open(str(DEMO_DIT), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    raw = meta.get("flowcache.presets")
    return json.loads(raw) if raw else None


def _named(entry: dict) -> dict:
    """Only what the UI shows: {mode: {slow|fast: {threshold, warmup, kv_budget}}}."""
    return {mode: {p: {k: entry[mode][p][k] for k in ("threshold", "warmup", "kv_budget") if k in entry[mode][p]}
                   for p in ("slow", "fast") if p in entry[mode]}
            for mode in ("flowcache", "teacache") if mode in entry}


def _default_mix_lambda() -> float:
    text = (ROOT / "flowcache" / "cache" / "presets.py").read_text(encoding="utf-8")
    m = re.search(r"mix_lambda:\s*float\s*=\s*([0-9.eE+-]+)", text)
    assert m, "CacheSettings.mix_lambda default not found in flowcache/cache/presets.py"
    return float(m.group(1))


def _paper_thresholds() -> dict:
    """What ``flowcache calibrate`` writes for a calibrated model (the demo, before its presets are embedded)."""
    text = (ROOT / "flowcache" / "calibrate.py").read_text(encoding="utf-8")
    m = re.search(r"PAPER_THRESHOLDS\s*=\s*(\{.*?\n\})", text, re.S)
    assert m, "PAPER_THRESHOLDS not found in flowcache/calibrate.py"
    return ast.literal_eval(m.group(1))


def expected_web_presets() -> dict:
    models = {k: _named(v) for k, v in _read_json(PRESETS).items() if not k.startswith("_")}
    demo = demo_embedded_presets()
    if demo and "demo" in demo:
        models["demo"] = _named(demo["demo"])
    else:
        models["demo"] = _named(_paper_thresholds())
    return {
        "_doc": "Generated by `python tests/test_workflows.py --write-presets` from flowcache/presets.json and the "
                "demo model's embedded presets; tests/test_workflows.py keeps it in sync. Used by flowcache.js to "
                "show the slow/fast values on FlowCache Sampler (display only: the node resolves presets itself).",
        "mix_lambda": _default_mix_lambda(),
        "aliases": ALIASES,
        "models": models,
    }


def write_web_presets() -> None:
    WEB_PRESETS.write_text(json.dumps(expected_web_presets(), indent=1) + "\n", encoding="utf-8")


def test_web_presets_match_flowcache_presets():
    web = _read_json(WEB_PRESETS)
    exp = expected_web_presets()
    assert web["models"] == exp["models"], "web/flowcache_presets.json is stale: run python tests/test_workflows.py --write-presets"
    assert web["mix_lambda"] == exp["mix_lambda"]
    assert web["aliases"] == exp["aliases"]


def test_demo_presets_row_matches_the_asset_when_calibrated():
    demo = demo_embedded_presets()
    if not demo or "demo" not in demo:
        pytest.skip("the demo model has no embedded presets (yet); its row equals calibrate's PAPER_THRESHOLDS")
    assert _read_json(WEB_PRESETS)["models"]["demo"] == _named(demo["demo"])


def alias_key(name: str) -> str | None:
    if name.startswith("flowcache-demo"):
        return "demo"
    for pattern, key in ALIASES:
        if re.search(pattern, name, re.I):
            return key
    return None


@pytest.mark.parametrize("name,key", [
    ("SkyReels-V2-DF-1.3B-540P.safetensors", "wan-1.3B"), ("skyreels_v2_df_1_3b_540p_fp8.safetensors", "wan-1.3B"),
    ("SkyReels-V2-DF-14B-720P.safetensors", "wan-14B"), (DEMO_ENTRY, "demo"), ("something_else.safetensors", None)])
def test_model_name_aliases(name, key):
    assert alias_key(name) == key


# ------------------------------------------------------------------------------------ node definitions

@pytest.fixture(scope="module")
def node_defs(pack):
    """{class name: {"input": INPUT_TYPES(), "output": RETURN_TYPES}} for the pack's nodes and the core table."""
    defs = {}
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        defs[name] = {"input": cls.INPUT_TYPES(), "output": tuple(cls.RETURN_TYPES),
                      "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    for name, d in CORE_NODES.items():
        assert name not in defs, f"{name} is a core node name; ComfyUI would ignore the pack's copy"
        defs[name] = d
    return defs


def widget_specs(node_def: dict) -> list[tuple[str, object, dict]]:
    """The frontend's widgets of a node in order: (name, type or combo list, options), seed controls included."""
    out = []
    for section in ("required", "optional"):
        for name, spec in node_def["input"].get(section, {}).items():
            kind = spec[0]
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
            kind = spec[0]
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
            elif inp["type"] != declared[0]:
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
        assert out_type == in_type == ltype, f"link {link_id}: {a['type']}[{src_slot}] {out_type} -> " \
                                             f"{b['type']}.{inp['name']} {in_type} (link says {ltype})"
        assert inp["link"] == link_id
        assert link_id in (a["outputs"][src_slot].get("links") or [])
    # and no slot claims a link that does not exist
    known = {link[0] for link in wf["links"]}
    for n in wf["nodes"]:
        for i in n.get("inputs", []):
            assert i.get("link") is None or i["link"] in known, (n["type"], i)
        for o in n.get("outputs", []):
            assert set(o.get("links") or []) <= known, (n["type"], o)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_note_and_thumbnail(path):
    wf = load_workflow(path)
    notes = nodes_of(wf, "Note")
    assert notes and all(len(n["widgets_values"][0]) > 200 for n in notes), "needs a Note explaining the knobs"
    text = notes[0]["widgets_values"][0]
    for knob in ("cache", "preset", "threshold", "kv_budget"):
        assert knob in text
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


def _loader_name(wf: dict, node_defs: dict) -> str:
    (node,) = nodes_of(wf, "FlowCacheModelLoader")
    return widgets_by_name(node, node_defs["FlowCacheModelLoader"])["model_name"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_sampler_settings_are_valid_for_the_model(path, node_defs, pack):
    """Window planning accepts the settings, and named presets show the values the UI will lock them to."""
    from comfy_helpers import pack_submodule

    df = pack_submodule(pack, "flowcache.pipelines.diffusion_forcing")
    wf = load_workflow(path)
    s = _sampler(wf, node_defs)
    name = _loader_name(wf, node_defs)
    if name == DEMO_ENTRY:
        geometry = {"temporal_stride": 1, "spatial_stride": 4, "channels": 16}
        if DEMO_DIT.exists():
            from safetensors import safe_open
            with safe_open(str(DEMO_DIT), framework="pt", device="cpu") as f:
                geometry = json.loads((f.metadata() or {}).get("flowcache.geometry", json.dumps(geometry)))
    else:
        geometry = {"temporal_stride": 4, "spatial_stride": 8, "channels": 16}
    key = alias_key(name)
    if key == "magi-4.5B":  # MAGI-1: whole chunks over a staggered window, steps split evenly over the stages
        magi = pack_submodule(pack, "flowcache.pipelines.magi")
        assert s["width"] % 16 == 0 and s["height"] % 16 == 0 and s["num_frames"] % 4 == 0
        chunk = s["causal_block_size"]
        assert magi.stage_schedule(s["num_frames"] // 4, chunk, 4, s["steps"])
    else:
        fields = set(df.DFSettings.__dataclass_fields__)
        settings = df.DFSettings(**{k: v for k, v in s.items() if k in fields})
        assert df.plan_windows(settings, df.LatentGeometry(**geometry))
    assert key is not None, f"{name}: the web extension cannot tell which presets apply"
    if s["cache"] != "off" and s["preset"] in ("slow", "fast"):
        row = _read_json(WEB_PRESETS)["models"][key][s["cache"]][s["preset"]]
        assert (s["threshold"], s["warmup_steps"], s["kv_budget"]) == (row["threshold"], row["warmup"],
                                                                       row["kv_budget"]), (path.stem, row)


def test_demo_workflow_uses_the_demo_settings(node_defs, pack):
    wf = load_workflow(ROOT / "workflows" / "flowcache_demo_cpu.json")
    assert _loader_name(wf, node_defs) == DEMO_ENTRY
    s = _sampler(wf, node_defs)
    from comfy_helpers import pack_submodule
    demo = pack_submodule(pack, "nodes.demo").demo_module()
    if demo is None:
        pytest.skip("flowcache.demo is not installed")
    DEMO_SETTINGS = demo.DEMO_SETTINGS
    for k, v in DEMO_SETTINGS.items():
        if k in s:
            assert s[k] == v, (k, s[k], v)
    (combine,) = nodes_of(wf, "FlowCacheVideoCombine")
    fps = widgets_by_name(combine, node_defs["FlowCacheVideoCombine"])["frame_rate"]
    assert fps == DEMO_SETTINGS.get("fps", fps)
    types = {n["type"] for n in wf["nodes"]}
    assert {"FlowCacheDemoTextEncode", "FlowCacheDecode", "FlowCacheVideoCombine"} <= types
    assert not types & {"CLIPLoader", "VAELoader"}, "the demo must not need any download"
    prompts = [n["widgets_values"][0] for n in nodes_of(wf, "FlowCacheDemoTextEncode")]
    assert "" in prompts and any(prompts), "positive prompt and an empty negative prompt"


@pytest.mark.parametrize("stem,preset", [("skyreels_v2_df_1.3b_t2v_fast", "fast"),
                                         ("skyreels_v2_df_1.3b_t2v_slow", "slow")])
def test_skyreels_t2v_workflows(stem, preset, node_defs):
    wf = load_workflow(ROOT / "workflows" / f"{stem}.json")
    s = _sampler(wf, node_defs)
    assert (s["width"], s["height"], s["num_frames"], s["steps"], s["cfg"], s["shift"]) == (960, 544, 97, 50, 6.0, 8.0)
    assert (s["ar_step"], s["causal_block_size"], s["cache"], s["preset"]) == (5, 5, "flowcache", preset)
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
    assert s["num_frames"] > s["base_num_frames"] and s["kv_budget"] == 1 and s["preset"] == "custom"
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
    from comfy_helpers import pack_submodule
    df = pack_submodule(pack, "flowcache.pipelines.diffusion_forcing")
    fields = set(df.DFSettings.__dataclass_fields__)
    windows = df.plan_windows(df.DFSettings(**{k: v for k, v in s.items() if k in fields}), df.LatentGeometry(4, 8, 16))
    assert len(windows) >= 3


def test_magi_workflow(node_defs, pack):
    wf = load_workflow(ROOT / "workflows" / "magi1_4.5b_distill_t2v_fast.json")
    s = _sampler(wf, node_defs)
    assert (s["width"], s["height"], s["num_frames"], s["steps"], s["shift"], s["seed"]) == (720, 720, 96, 64, 3.0, 1234)
    assert (s["causal_block_size"], s["cache"], s["preset"]) == (6, "flowcache", "fast")
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


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_to_a_valid_api_prompt(path, node_defs, pack, comfy):
    """Widget values mapped by name onto the node functions' signatures (what the server would call)."""
    import inspect

    wf = load_workflow(path)
    for node in wf["nodes"]:
        cls = pack.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue
        kw = {k: v for k, v in widgets_by_name(node, node_defs[node["type"]]).items() if k != "control_after_generate"}
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        unknown = set(kw) - set(params)
        assert not unknown, f"{node['type']}: widgets {unknown} are not parameters of {cls.FUNCTION}"


# ------------------------------------------------------------------------------------------ web files

def test_web_extension_static_checks():
    js = (WEB / "flowcache.js").read_text(encoding="utf-8")
    # files directly in web/ are served at /extensions/<pack>/x.js: the app module is two levels up
    assert 'from "../../scripts/app.js"' in js
    assert "scripts/api.js" not in js, "use app.api (comfyui-host.md)"
    for m in re.finditer(r"addWidget\(\s*[\"']button[\"'][^;]*;", js):
        assert "serialize: false" in m.group(0) or "serialize:false" in m.group(0), m.group(0)
    assert "window.__flowcache" in js and "flowcache.progress" in js and "flowcache_stats" in js
    assert not [p for p in WEB.rglob("*") if p.is_file() and p.suffix not in (".js", ".json", ".css", ".md")
                and p.name != ".gitkeep"]


def test_web_extension_parses_as_an_es_module(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    src = (WEB / "flowcache.js").read_text(encoding="utf-8")
    # resolve the import against a stub app so the module can be checked (and even evaluated) by node
    stub_dir = tmp_path / "scripts"
    stub_dir.mkdir()
    (stub_dir / "app.js").write_text("export const app = { registered: [], extensions: [],"
                                     " registerExtension(e) { this.registered.push(e); } };\n")
    pack = tmp_path / "extensions" / "pack"  # same depth as /extensions/<pack>/flowcache.js
    pack.mkdir(parents=True)
    (pack / "package.json").write_text('{"type": "module"}')  # node: .js files here are ES modules, as in a browser
    (pack / "flowcache.js").write_text(src, encoding="utf-8")
    for sibling in WEB.glob("*.js"):  # modules flowcache.js imports from its own folder
        if sibling.name != "flowcache.js":
            (pack / sibling.name).write_text(sibling.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "run.mjs").write_text(
        "globalThis.window = globalThis; globalThis.document = { body: { dataset: {} } };\n"
        "const { app } = await import('./scripts/app.js');\n"
        "await import('./extensions/pack/flowcache.js');\n"
        "if (app.registered.length !== 1) throw new Error('expected one registered extension');\n"
        "const e = app.registered[0];\n"
        "for (const k of ['setup', 'beforeRegisterNodeDef', 'nodeCreated', 'loadedGraphNode']) {\n"
        "  if (typeof e[k] !== 'function') throw new Error('missing hook ' + k); }\n"
        "// a hook on a node that is not ours, or a broken node, must not throw\n"
        "e.nodeCreated({ comfyClass: 'FlowCacheSampler', widgets: null });\n"
        "e.loadedGraphNode({ type: 'KSampler' });\n"
        "await e.beforeRegisterNodeDef(function () {}, { name: 'FlowCacheSampler' });\n"
        "// the map module draws a run's stats on any canvas context\n"
        "const m = await import('./extensions/pack/flowcache_map.js');\n"
        "const calls = [];\n"
        "const ctx = new Proxy({}, { get: (t, k) => (k === 'measureText' ? () => ({ width: 10 }) : k in t ? t[k]"
        " : (...a) => calls.push(k)), set: (t, k, v) => ((t[k] = v), true) });\n"
        "const info = { stats: { maps: [['CCR', 'CRR'], ['', 'CC']], flops_speedup: 2, flops: 1, flops_nocache: 2 } };\n"
        "const shown = m.drawMap(ctx, info, 300, 0);\n"
        "if (!shown || shown.windows !== 2 || shown.chunks !== 2 || shown.steps !== 3 || !(m.mapHeight(info, 300) > 0)"
        " || !calls.includes('fillRect')) throw new Error('map ' + JSON.stringify(shown));\n"
        "console.log('ok', e.name);\n", encoding="utf-8")
    r = subprocess.run([node, str(tmp_path / "run.mjs")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok FlowCache.UI" in r.stdout, r.stdout + r.stderr


if __name__ == "__main__":
    if "--write-presets" in sys.argv:
        write_web_presets()
        print(f"wrote {WEB_PRESETS.relative_to(ROOT)}")
    else:
        sys.exit(pytest.main([__file__, "-q"]))
