"""The ComfyUI nodes, without ComfyUI: the pack is imported by file path as ComfyUI does, and the few ComfyUI
modules the nodes use are stubbed (``comfy`` fixture in conftest.py)."""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_wan
from comfy_helpers import (NODE_IDS, ROOT, TINY_KEY, TINY_PRESETS, StubInterrupt, combo_options, demo_available,
                           demo_missing, pack_submodule, run_node, widget_defaults, write_tiny_wan)

SAMPLER_ORDER = ["model", "positive", "negative", "width", "height", "num_frames", "steps", "cfg", "shift", "seed",
                 "ar_step", "causal_block_size", "base_num_frames", "overlap_history", "addnoise_condition",
                 "solver", "keep_model_loaded"]
CACHE_ORDER = ["method", "preset", "threshold", "warmup_steps", "kv_budget", "mix_lambda", "max_skips", "attention"]
CACHE_OPTIONAL = ["reuse", "kv_placement", "kv_dtype", "cfg_reuse", "cfg_interval"]  # optional: API prompts saved before them still validate

# Three SkyReels-style windows of 5 latent frames (2 carried over), 1-frame chunks, a few steps: well under 1 s.
TINY = dict(width=32, height=32, num_frames=33, steps=3, cfg=2.0, shift=8.0, seed=7, ar_step=1,
            causal_block_size=1, base_num_frames=17, overlap_history=5, addnoise_condition=20, solver="unipc",
            method="flowcache", preset="slow")


def nodes(pack):
    return pack.NODE_CLASSES


def cond(dim: int = 24, tokens: int = 5, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, dim, generator=g), {"pooled_output": None}]]


def cache_node(pack, **widgets):
    """The FlowCache Cache node's output for these widget values (defaults for the rest)."""
    kw = widget_defaults(nodes(pack)["FlowCacheCache"])
    kw.update(widgets)
    return run_node(nodes(pack)["FlowCacheCache"], **kw)[0]


def sampler_inputs(pack, model, **over) -> dict:
    """Sampler inputs; the cache node's widgets (method, preset, threshold, ...) become its ``cache`` input."""
    kw = widget_defaults(nodes(pack)["FlowCacheSampler"])
    kw.update(TINY, model=model, positive=cond(seed=1), negative=cond(seed=2), unique_id="5")
    kw.update(over)
    widgets = {k: kw.pop(k) for k in CACHE_ORDER + CACHE_OPTIONAL if k in kw}
    if widgets:
        kw["cache"] = cache_node(pack, **widgets)
    return kw


@pytest.fixture
def tiny(pack, comfy):
    """A random tiny Wan model in the stub diffusion_models folder, loaded through the loader node."""
    write_tiny_wan(comfy.models_dir / "tiny_wan.safetensors", pack)
    (model,) = run_node(nodes(pack)["FlowCacheModelLoader"], model_name="tiny_wan.safetensors", dtype="auto")["result"]
    return model


class FakeWanVAE:
    """Shapes of comfy.sd.VAE with the Wan2.1 VAE: IMAGE [N,H,W,3] <-> raw latents [1,16,1+(N-1)//4,H/8,W/8]."""

    def __init__(self):
        self.encoded: list[tuple] = []
        self.decoded: list[tuple] = []

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded.append(tuple(pixels.shape))
        t = 1 + (pixels.shape[0] - 1) // 4
        x = torch.nn.functional.avg_pool2d(pixels[::4][:t].permute(0, 3, 1, 2).float(), 8)  # [t, 3, h, w]
        return x.permute(1, 0, 2, 3)[None].repeat(1, 6, 1, 1, 1)[:, :16]

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        self.decoded.append(tuple(raw.shape))
        f = raw.shape[2]
        x = raw[0, :3].permute(1, 2, 3, 0).repeat_interleave(8, 1).repeat_interleave(8, 2)  # [F, H, W, 3]
        idx = ((torch.arange(4 * f - 3) + 3) // 4).clamp(max=f - 1)
        return torch.sigmoid(x[idx])[None]


# ------------------------------------------------------------------------------------------ contract

def test_pack_imports_like_comfyui_without_comfyui(pack):
    assert set(pack.NODE_CLASSES) == set(NODE_IDS)
    assert set(pack.DISPLAY_NAMES) == set(NODE_IDS)
    assert pack.WEB_DIRECTORY == "./web" and (ROOT / "web").is_dir()
    # The pack's nodes/ is only reachable relatively; it must never become the top-level `nodes` module.
    top = sys.modules.get("nodes")
    assert top is None or Path(getattr(top, "__file__", "") or "").resolve().parent != ROOT / "nodes"
    assert pack.NODE_CLASSES["FlowCacheSampler"].__module__.startswith(pack.__name__ + ".")
    # Without ComfyUI the model list holds only the built-in demo entry.
    demo_entry = pack_submodule(pack, "nodes.demo").DEMO_ENTRY
    if "folder_paths" not in sys.modules:
        assert combo_options(pack.NODE_CLASSES["FlowCacheModelLoader"].INPUT_TYPES()["required"]["model_name"]) == \
            [demo_entry]


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_input_types_contract(pack, comfy, node_id):
    cls = nodes(pack)[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = combo_options(entry) if combo_options(entry) is not None else entry[0]
            opts = entry[1] if len(entry) > 1 else {}
            assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, f"{node_id}.{name}: tooltip"
            if isinstance(kind, list):
                assert all(isinstance(v, str) for v in kind), f"{node_id}.{name}"
                # a model-file list is empty until the user adds files; every other list has its default
                assert kind or "models/" in opts["tooltip"], f"{node_id}.{name}: empty list"
                if kind:
                    assert opts.get("default", kind[0]) in kind, f"{node_id}.{name}: default not in list"
            elif kind in ("INT", "FLOAT"):
                pytype = int if kind == "INT" else float
                assert isinstance(opts["default"], pytype), f"{node_id}.{name}: default type"
                assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name}: default out of range"
                assert opts.get("step", 1) > 0
            elif kind == "BOOLEAN":
                assert isinstance(opts["default"], bool)
            elif kind == "STRING":
                assert isinstance(opts["default"], str)
            else:
                assert kind.isupper(), f"{node_id}.{name}: type {kind!r}"
    assert isinstance(cls.RETURN_TYPES, (tuple, list)) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, attr):
            assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY in ("FlowCache", "FlowCache/MAGI-1")
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION


def test_sampler_and_other_widget_orders(pack):
    spec = nodes(pack)["FlowCacheSampler"].INPUT_TYPES()
    assert list(spec["required"]) == SAMPLER_ORDER  # UI workflows store widget values by position
    assert list(spec["optional"]) == ["cache", "vae", "magi_vae", "prefix_images", "causal"]
    assert spec["optional"]["cache"][0] == "FLOWCACHE_CACHE"
    assert spec["hidden"] == {"unique_id": ("UNIQUE_ID",), "prompt": ("PROMPT",)}  # the prompt: where a MODEL came from
    req = spec["required"]
    assert req["model"][0] == "FLOWCACHE_MODEL,MODEL"  # ComfyUI's union type: FlowCache Load Model's or a MODEL
    assert req["negative"][0] == "CONDITIONING"
    assert req["positive"][0] == "CONDITIONING,FLOWCACHE_PROMPTS"  # a prompt, or FlowCache Prompt Schedule's
    assert combo_options(req["solver"]) == ["unipc", "euler"]
    defaults = widget_defaults(nodes(pack)["FlowCacheSampler"])
    assert {k: defaults[k] for k in ("width", "height", "num_frames", "steps", "cfg", "shift", "seed", "ar_step",
                                     "causal_block_size", "base_num_frames", "overlap_history",
                                     "addnoise_condition", "keep_model_loaded")} == dict(
        width=960, height=544, num_frames=97, steps=50, cfg=6.0, shift=8.0, seed=1024, ar_step=5,
        causal_block_size=5, base_num_frames=97, overlap_history=17, addnoise_condition=20, keep_model_loaded=False)
    assert req["width"][1]["step"] == 16
    cache = nodes(pack)["FlowCacheCache"].INPUT_TYPES()["required"]
    assert list(cache) == CACHE_ORDER and list(nodes(pack)["FlowCacheCache"].RETURN_TYPES) == ["FLOWCACHE_CACHE"]
    assert combo_options(cache["method"]) == ["off", "teacache", "flowcache", "magcache", "easycache"]
    assert cache["method"][1]["default"] == "flowcache"
    assert combo_options(cache["attention"]) == ["auto", "window", "window_refresh", "block_causal"]
    assert combo_options(cache["preset"]) == ["slow", "fast", "turbo", "custom"]
    assert cache["preset"][1]["default"] == "slow" and "turbo" in cache["preset"][1]["tooltip"]
    assert {k: widget_defaults(nodes(pack)["FlowCacheCache"])[k] for k in CACHE_ORDER[2:]} == dict(
        threshold=0.1, warmup_steps=5, kv_budget=0, mix_lambda=0.07, max_skips=3, attention="auto")
    assert cache["threshold"][1]["step"] == 0.005
    optional = nodes(pack)["FlowCacheCache"].INPUT_TYPES()["optional"]
    assert list(optional) == CACHE_OPTIONAL and all(spec[1]["default"] in ("auto", 0)  # 0: cfg_interval's auto
                                                    for spec in optional.values())
    assert combo_options(optional["kv_placement"]) == ["auto", "device", "offload"]
    assert combo_options(optional["kv_dtype"]) == ["auto", "bf16", "fp8"]
    assert all(spec[1].get("tooltip") for spec in optional.values())
    loader = nodes(pack)["FlowCacheModelLoader"].INPUT_TYPES()
    assert list(loader["required"]) == ["model_name", "dtype"]
    # optional widgets (default auto), so API prompts saved before them still validate in the server
    assert list(loader["optional"]) == ["loop", "weights", "magi_variant", "lora"]
    assert all(spec[1]["default"] == "auto" for k, spec in loader["optional"].items() if k != "lora")
    assert loader["optional"]["lora"][1]["default"] == "none"
    vc = nodes(pack)["FlowCacheVideoCombine"].INPUT_TYPES()["required"]
    assert list(vc) == ["images", "frame_rate", "loop_count", "filename_prefix", "format", "crf"]
    assert vc["format"][1]["default"] == "video/h264-mp4"
    assert list(nodes(pack)["FlowCacheDecode"].INPUT_TYPES()["optional"]) == ["vae", "magi_vae"]
    ds = nodes(pack)["FlowCacheDecodeSave"].INPUT_TYPES()
    assert list(ds["required"]) == ["samples", "frame_rate", "loop_count", "filename_prefix", "format", "crf"]
    assert list(ds["optional"]) == ["vae", "magi_vae"] and nodes(pack)["FlowCacheDecodeSave"].OUTPUT_NODE is True
    assert list(nodes(pack)["FlowCacheMagiTextEncode"].INPUT_TYPES()["required"]) == ["t5_name", "prompt"]
    assert list(nodes(pack)["FlowCacheMagiVAELoader"].RETURN_TYPES) == ["FLOWCACHE_MAGI_VAE"]
    assert nodes(pack)["FlowCacheVideoCombine"].OUTPUT_NODE is True
    assert list(nodes(pack)["FlowCacheModelLoader"].RETURN_TYPES) == ["FLOWCACHE_MODEL"]
    assert list(nodes(pack)["FlowCacheSampler"].RETURN_TYPES) == ["LATENT"]
    assert list(nodes(pack)["FlowCacheDecode"].RETURN_TYPES) == ["IMAGE"]
    assert list(nodes(pack)["FlowCacheDemoTextEncode"].RETURN_TYPES) == ["CONDITIONING"]


def test_combo_values_are_checked_as_v1_combos_were(pack):
    """validate_inputs (what ComfyUI calls when a prompt is queued) refuses a combo value that is not one of its
    options, naming the widget; a prompt saved before an optional combo existed passes."""
    cache, loader = nodes(pack)["FlowCacheCache"], nodes(pack)["FlowCacheModelLoader"]
    assert cache.validate_inputs(method="flowcache", preset="slow") is True
    assert cache.validate_inputs(method="flowcache", preset="slow", attention="auto", reuse="hold",
                                 kv_placement="offload", kv_dtype="fp8") is True
    assert cache.validate_inputs(method="sideways", preset="slow", reuse="back") == (
        "method: 'sideways' is not one of off, teacache, flowcache, magcache, easycache; "
        "reuse: 'back' is not one of auto, hold, extrapolate")
    demo = pack_submodule(pack, "nodes.demo").DEMO_ENTRY
    assert loader.validate_inputs(model_name=demo) is True
    assert "model_name: 'missing.safetensors' is not one of" in loader.validate_inputs(model_name="missing.safetensors")
    assert nodes(pack)["FlowCacheSampler"].validate_inputs(solver="heun").startswith("solver: 'heun'")
    for node_id in NODE_IDS:  # every combo of every node is checked
        cls = nodes(pack)[node_id]
        combos = {name for part in ("required", "optional") for name, spec in cls.INPUT_TYPES().get(part, {}).items()
                  if combo_options(spec) is not None}
        checked = set(inspect.signature(cls.validate_inputs).parameters) if combos else set()
        assert combos == checked, node_id


# -------------------------------------------------------------------------------------------- loader

def test_loader_lists_and_loads_the_tiny_model(pack, comfy, tiny):
    spec = nodes(pack)["FlowCacheModelLoader"].INPUT_TYPES()["required"]
    assert combo_options(spec["model_name"]) == [pack_submodule(pack, "nodes.demo").DEMO_ENTRY, "tiny_wan.safetensors"]
    assert tiny.loaded.family == "wan" and tiny.loaded.preset_key == "tiny-test"
    assert tiny.dtype == "fp32"  # auto on a CPU device
    assert next(tiny.loaded.model.parameters()).dtype == torch.float32
    assert tiny.patcher.model.diffusion_model is tiny.loaded.model
    assert tiny.patcher.load_device == torch.device("cpu")


def test_loader_errors_name_the_file(pack, comfy):
    errors = pack_submodule(pack, "flowcache.errors")
    (comfy.models_dir / "broken_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(errors.CheckpointError, match="broken_model.safetensors"):
        run_node(nodes(pack)["FlowCacheModelLoader"], model_name="broken_model.safetensors", dtype="auto")
    with pytest.raises(errors.CheckpointError, match="missing.safetensors"):
        run_node(nodes(pack)["FlowCacheModelLoader"], model_name="missing.safetensors", dtype="auto")


# ------------------------------------------------------------------------------------------- sampler

def test_sampler_returns_latent_stats_progress_and_offloads(pack, comfy, tiny):
    cls = nodes(pack)["FlowCacheSampler"]
    before = dict(vars(cls))
    out = run_node(cls, **sampler_inputs(pack, tiny))
    assert set(out) == {"ui", "result"}
    (latent,) = out["result"]
    assert set(latent) == {"samples"}  # raw Wan latents: no codec tag, ComfyUI's VAE Decode takes them
    assert latent["samples"].shape == (1, 16, 9, 4, 4) and latent["samples"].dtype == torch.float32
    assert torch.isfinite(latent["samples"]).all()
    (stats,) = out["ui"]["flowcache_stats"]
    assert stats["mode"] == "flowcache" and stats["windows"] == 3 and stats["computed"] > 0
    # progress: one ProgressBar for node 5 reaching its total; matching websocket events
    assert comfy.progress and comfy.progress[-1][1] == comfy.progress[-1][2] and comfy.progress[-1][0] == "5"
    names = comfy.event_names()
    assert names.count("flowcache.progress") == len(comfy.progress) and names[-1] == "flowcache.stats"
    first = next(d for e, d in comfy.events if e == "flowcache.progress")
    assert first["node"] == "5" and first["value"] == 1 and "window 1/3" in first["text"]
    assert comfy.events[-1][1]["stats"]["windows"] == 3
    # a cancel check per step and after every transformer block: 3 windows x 2 branches, 3 blocks per forward
    assert comfy.checks > 2 * len(comfy.progress)
    assert comfy.loads == [tiny.patcher] and comfy.unloads == [tiny.patcher]
    assert dict(vars(cls)) == before  # nothing kept on the class between runs

    comfy.loads.clear(), comfy.unloads.clear()
    out2 = run_node(cls, **sampler_inputs(pack, tiny, keep_model_loaded=True))
    assert comfy.loads == [tiny.patcher] and comfy.unloads == []
    assert torch.equal(out2["result"][0]["samples"], latent["samples"])


def test_sampler_cache_modes_and_presets(pack, comfy, tiny):
    cls = nodes(pack)["FlowCacheSampler"]
    off = run_node(cls, **sampler_inputs(pack, tiny, method="off"))["ui"]["flowcache_stats"][0]
    assert off["reused"] == 0 and off["settings"]["path"] == "window" and off["note"] == ""
    fast = run_node(cls, **sampler_inputs(pack, tiny, method="flowcache", preset="custom", threshold=10.0,
                                          warmup_steps=1))["ui"]["flowcache_stats"][0]
    assert fast["reused"] > 0 and fast["settings"]["threshold"] == 10.0 and fast["settings"]["path"] == "chunk"
    tea = run_node(cls, **sampler_inputs(pack, tiny, method="teacache", preset="fast"))["ui"]["flowcache_stats"][0]
    assert tea["mode"] == "teacache" and tea["settings"]["threshold"] == 0.2
    # no cache node: FlowCache with the model's slow preset, and the node says so
    kw = sampler_inputs(pack, tiny)
    del kw["cache"]
    default = run_node(cls, **kw)["ui"]["flowcache_stats"][0]
    assert default["mode"] == "flowcache" and default["settings"]["preset"] == "slow"
    slow = TINY_PRESETS[TINY_KEY]["flowcache"]["slow"]
    assert "no cache node" in default["note"] and default["settings"]["threshold"] == slow["threshold"]


def test_a_model_without_presets_runs_easycache_when_no_cache_node_is_connected(pack, comfy):
    """A model nobody calibrated (a fine-tune of another size, a GGUF) still gets a cache: easycache, whose
    defaults need no calibration; the node says so and names calibrate. slow/fast on it fail before any step."""
    write_tiny_wan(comfy.models_dir / "uncalibrated.safetensors", pack, model_key="tiny-uncalibrated", presets=None)
    (model,) = run_node(nodes(pack)["FlowCacheModelLoader"], model_name="uncalibrated.safetensors",
                        dtype="fp32")["result"]
    cls = nodes(pack)["FlowCacheSampler"]
    kw = sampler_inputs(pack, model, steps=6)
    del kw["cache"]
    out = run_node(cls, **kw)
    stats = out["ui"]["flowcache_stats"][0]
    assert stats["mode"] == "easycache" and stats["settings"]["path"] == "chunk" and stats["computed"] > 0
    assert "no cache node connected" in stats["note"] and "'tiny-uncalibrated' has no presets" in stats["note"]
    assert "easycache" in stats["note"] and "python -m flowcache calibrate" in stats["note"]
    assert comfy.events[-1][1]["stats"]["note"] == stats["note"]
    # the same run as easycache chosen on the cache node with its default numbers
    easy = pack_submodule(pack, "flowcache.cache.easycache").EasyCacheConfig()
    chosen = run_node(cls, **sampler_inputs(pack, model, steps=6, method="easycache", preset="custom",
                                            threshold=easy.threshold, warmup_steps=easy.warmup))
    assert torch.equal(chosen["result"][0]["samples"], out["result"][0]["samples"])
    assert chosen["ui"]["flowcache_stats"][0]["note"] == ""
    # an explicit slow/fast still needs presets: a clear error, before the model moves
    errors = pack_submodule(pack, "flowcache.errors")
    comfy.loads.clear()
    for method, preset in (("flowcache", "slow"), ("flowcache", "fast"), ("easycache", "slow"), ("teacache", "fast")):
        with pytest.raises(errors.InputError) as e:
            run_node(cls, **sampler_inputs(pack, model, method=method, preset=preset))
        msg = str(e.value)
        assert msg.startswith(f"preset='{preset}': model 'tiny-uncalibrated' has no {method} {preset} preset"), msg
        assert "custom" in msg[:120] and "python -m flowcache calibrate" in msg
    assert comfy.loads == []


def test_turbo_runs_its_row_and_a_model_without_one_is_refused_before_it_moves(pack, comfy, tiny):
    """turbo is a named preset like slow and fast: a model whose presets have a turbo row runs it (its values, as
    the row says); the tiny model's presets have slow and fast only, so turbo is refused with an error that names
    the model and the rows it has, before the model is loaded onto the device."""
    cls = nodes(pack)["FlowCacheSampler"]
    errors = pack_submodule(pack, "flowcache.errors")
    comfy.loads.clear()
    with pytest.raises(errors.InputError) as e:
        run_node(cls, **sampler_inputs(pack, tiny, method="flowcache", preset="turbo"))
    msg = str(e.value)
    assert msg.startswith(f"preset='turbo': model '{TINY_KEY}' has no flowcache turbo preset; its flowcache presets "
                          "are slow, fast; turbo needs calibration of its own"), msg
    assert comfy.loads == []
    turbo_row = {"threshold": 0.4, "warmup": 1, "kv_budget": 0, "reuse": "hold"}
    presets = {TINY_KEY: {**TINY_PRESETS[TINY_KEY],
                          "flowcache": {**TINY_PRESETS[TINY_KEY]["flowcache"], "turbo": turbo_row}}}
    write_tiny_wan(comfy.models_dir / "tiny_turbo.safetensors", pack, presets=presets)
    (model,) = run_node(nodes(pack)["FlowCacheModelLoader"], model_name="tiny_turbo.safetensors",
                        dtype="fp32")["result"]
    stats = run_node(cls, **sampler_inputs(pack, model, method="flowcache", preset="turbo"))["ui"]["flowcache_stats"][0]
    assert stats["settings"]["preset"] == "turbo" and stats["settings"]["threshold"] == 0.4
    assert stats["settings"]["warmup"] == 1 and stats["settings"]["reuse"] == "hold"


def test_cancel_stops_and_next_run_equals_fresh_run(pack, comfy, tiny):
    cls = nodes(pack)["FlowCacheSampler"]
    fresh = run_node(cls, **sampler_inputs(pack, tiny))["result"][0]["samples"]
    steps = len(comfy.progress)
    comfy.loads.clear(), comfy.unloads.clear(), comfy.progress.clear()
    comfy.checks, comfy.interrupt_after = 0, 8  # inside the second step's forward, between transformer blocks
    with pytest.raises(StubInterrupt):
        run_node(cls, **sampler_inputs(pack, tiny))
    assert comfy.checks == 8 and 1 <= len(comfy.progress) < steps
    assert comfy.unloads == [tiny.patcher]  # offloaded in the finally block
    again = run_node(cls, **sampler_inputs(pack, tiny))["result"][0]["samples"]
    assert torch.equal(again, fresh)
    # ... and equal to a run on a freshly loaded copy of the model
    (reloaded,) = run_node(nodes(pack)["FlowCacheModelLoader"], model_name="tiny_wan.safetensors", dtype="fp32")["result"]
    assert torch.equal(run_node(cls, **sampler_inputs(pack, reloaded))["result"][0]["samples"], fresh)


def test_two_samplers_in_one_graph_share_no_state(pack, comfy, tiny):
    """Two sampler nodes on one model, one after the other as ComfyUI runs them: the second is what it would be
    alone, whatever the first did (another cache mode, a KV budget, another seed)."""
    cls = nodes(pack)["FlowCacheSampler"]
    second = dict(method="flowcache", preset="fast", seed=11)
    alone = run_node(cls, **sampler_inputs(pack, tiny, **second))["result"][0]["samples"]
    for first in (dict(method="teacache", preset="fast"), dict(method="flowcache", preset="custom", threshold=0.5,
                                                             warmup_steps=0, kv_budget=1, seed=3)):
        run_node(cls, **sampler_inputs(pack, tiny, **first))
        after = run_node(cls, **sampler_inputs(pack, tiny, **second))["result"][0]["samples"]
        assert torch.equal(after, alone), first


@pytest.mark.parametrize("over, widget", [
    (dict(positive=cond(dim=23)), "positive"),
    (dict(negative=cond(dim=23)), "negative"),
    (dict(negative="not conditioning"), "negative"),
    (dict(positive=cond(tokens=17)), "positive"),
    (dict(num_frames=20), "num_frames"),
    (dict(num_frames=17, base_num_frames=17, causal_block_size=2), "causal_block_size"),
    (dict(num_frames=33, base_num_frames=17, overlap_history=17), "overlap_history"),
    (dict(width=40), "width"),
    (dict(height=8), "height"),
    (dict(preset="custom", threshold=-1.0), "threshold"),
    (dict(preset="custom", mix_lambda=2.0), "mix_lambda"),
    (dict(method="nope"), "method"),
    (dict(cfg=float("nan")), "cfg"),
    (dict(shift=float("inf")), "shift"),
    (dict(preset="custom", threshold=float("nan")), "threshold"),
    (dict(preset="slow", mix_lambda=float("nan")), "mix_lambda"),
    (dict(solver="ddim"), "solver"),
])
def test_bad_inputs_fail_before_sampling_naming_the_widget(pack, comfy, tiny, over, widget):
    errors = pack_submodule(pack, "flowcache.errors")
    with pytest.raises(errors.InputError, match=widget):
        run_node(nodes(pack)["FlowCacheSampler"], **sampler_inputs(pack, tiny, **over))
    assert comfy.loads == [] and comfy.progress == [] and comfy.checks == 0


def test_cfg_one_needs_no_negative(pack, comfy, tiny):
    out = run_node(nodes(pack)["FlowCacheSampler"], **sampler_inputs(pack, tiny, cfg=1.0, negative=None))
    assert out["result"][0]["samples"].shape == (1, 16, 9, 4, 4)


def test_sampler_reencodes_the_overlap_with_the_vae(pack, comfy, tiny):
    vae = FakeWanVAE()
    cls = nodes(pack)["FlowCacheSampler"]
    with_vae = run_node(cls, **sampler_inputs(pack, tiny, vae=vae))["result"][0]["samples"]
    # two window hand-overs: decode the 5-latent window, re-encode its last overlap_history=5 frames
    assert vae.decoded == [(1, 16, 5, 4, 4)] * 2 and vae.encoded == [(5, 32, 32, 3)] * 2
    # loading the VAE may push the DiT off the GPU: it is put back after each VAE call
    assert comfy.loads == [tiny.patcher] * 5
    without = run_node(cls, **sampler_inputs(pack, tiny))["result"][0]["samples"]
    assert with_vae.shape == without.shape and not torch.equal(with_vae, without)
    assert torch.equal(with_vae[:, :, :5], without[:, :, :5])  # the first window does not depend on the VAE


def test_sampler_runs_without_comfyui(pack, tmp_path):
    """No ComfyUI modules at all: plain CPU, no progress bar, no events."""
    if "comfy.model_management" in sys.modules:
        pytest.skip("a real ComfyUI is loaded in this process")
    path = write_tiny_wan(tmp_path / "tiny.safetensors", pack)
    bridge = pack_submodule(pack, "nodes.comfy_bridge")
    loaded = pack_submodule(pack, "flowcache.models").load_model(str(path), "fp32")
    model = pack_submodule(pack, "nodes.loader").FlowCacheModel(loaded, bridge.make_patcher(loaded.model),
                                                                 "tiny", "fp32")
    out = run_node(nodes(pack)["FlowCacheSampler"], **sampler_inputs(pack, model))
    assert out["result"][0]["samples"].shape == (1, 16, 9, 4, 4)


# --------------------------------------------------------------------------------------------- decode

def test_decode_wan_latents_needs_the_vae(pack, comfy):
    errors = pack_submodule(pack, "flowcache.errors")
    latent = {"samples": torch.randn(1, 16, 3, 4, 5)}
    with pytest.raises(errors.InputError, match="vae"):
        run_node(nodes(pack)["FlowCacheDecode"], samples=latent)
    (images,) = run_node(nodes(pack)["FlowCacheDecode"], samples=latent, vae=FakeWanVAE())
    assert images.shape == (9, 32, 40, 3)


# ---------------------------------------------------------------------------------------------- video

def test_video_combine_writes_mp4_and_previews_it(pack, comfy):
    video = pack_submodule(pack, "flowcache.video")
    frames = torch.rand(10, 32, 48, 3)
    out = run_node(nodes(pack)["FlowCacheVideoCombine"], images=frames, frame_rate=12.0, loop_count=0,
                   filename_prefix="clips/flow", format="video/h264-mp4", crf=19)
    (path,) = out["result"]
    assert Path(path) == comfy.output_dir / "clips" / "flow_00001.mp4" and Path(path).is_file()
    assert out["ui"]["animated"] == [True]
    (entry,) = out["ui"]["images"]
    assert entry["filename"] == "flow_00001.mp4" and entry["subfolder"] == "clips" and entry["type"] == "output"
    assert entry["format"] == "video/h264-mp4"
    back = video.read_video(path)
    assert back.shape == (10, 32, 48, 3)
    assert abs(back.astype(float) / 255 - frames.numpy()).mean() < 0.2
    again = run_node(nodes(pack)["FlowCacheVideoCombine"], images=frames, frame_rate=12.0, loop_count=0,
                     filename_prefix="clips/flow", format="video/h264-mp4", crf=19)
    assert again["ui"]["images"][0]["filename"] == "flow_00002.mp4"


@pytest.mark.parametrize("fmt, animated", [("image/gif", False), ("image/webp", True), ("video/webm", True)])
def test_video_combine_other_formats(pack, comfy, fmt, animated):
    out = run_node(nodes(pack)["FlowCacheVideoCombine"], images=torch.rand(4, 16, 16, 3), frame_rate=8.0,
                   loop_count=1, filename_prefix="anim", format=fmt, crf=30)
    assert Path(out["result"][0]).is_file() and out["ui"]["animated"] == [animated]


@pytest.mark.parametrize("prefix", ["../x", "/etc/x", "a/../../b"])
def test_video_combine_refuses_prefix_leaving_output(pack, comfy, prefix):
    errors = pack_submodule(pack, "flowcache.errors")
    with pytest.raises(errors.OutputPathError, match="filename_prefix"):
        run_node(nodes(pack)["FlowCacheVideoCombine"], images=torch.rand(2, 16, 16, 3), frame_rate=8.0,
                 loop_count=0, filename_prefix=prefix, format="video/h264-mp4", crf=19)
    assert list(comfy.output_dir.iterdir()) == [] and not (comfy.output_dir.parent / "x").exists()


def test_video_combine_bad_values_name_the_widget(pack, comfy):
    errors = pack_submodule(pack, "flowcache.errors")
    node = nodes(pack)["FlowCacheVideoCombine"]
    base = dict(images=torch.rand(2, 16, 16, 3), frame_rate=8.0, loop_count=0, filename_prefix="v",
                format="video/h264-mp4", crf=19)
    with pytest.raises(errors.InputError, match="crf"):
        run_node(node, **dict(base, crf=60))
    with pytest.raises(errors.InputError, match="frame_rate"):
        run_node(node, **dict(base, frame_rate=0.0))
    with pytest.raises(errors.InputError, match="images"):
        run_node(node, **dict(base, images=torch.rand(16, 16, 3)))
    assert [p for p in comfy.output_dir.rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------------------------------------- demo

@pytest.fixture
def demo(pack):
    if not demo_available(pack):
        pytest.skip("flowcache.demo (with its model file) is not installed yet")
    return pack_submodule(pack, "flowcache.demo")


@pytest.fixture
def demo_model(pack, demo):
    why = demo_missing(pack)
    if why:
        pytest.skip(why)
    return demo


def test_demo_text_encode(pack, comfy, demo):
    spec = nodes(pack)["FlowCacheDemoTextEncode"].INPUT_TYPES()["required"]["prompt"]
    assert spec[1]["default"] in demo.DEMO_PROMPTS and spec[1]["multiline"] is True
    (c,) = run_node(nodes(pack)["FlowCacheDemoTextEncode"], prompt=demo.DEMO_PROMPTS[0])
    assert isinstance(c, list) and len(c) == 1 and c[0][1] == {"pooled_output": None}
    assert c[0][0].shape == (1, 16, 64)


def test_demo_end_to_end(pack, comfy, demo_model):
    demo = demo_model
    n = nodes(pack)
    entry = pack_submodule(pack, "nodes.demo").DEMO_ENTRY
    (model,) = run_node(n["FlowCacheModelLoader"], model_name=entry, dtype="auto")["result"]
    assert model.loaded.latent_format == "demo"
    (pos,) = run_node(n["FlowCacheDemoTextEncode"], prompt=demo.DEMO_PROMPTS[0])
    (neg,) = run_node(n["FlowCacheDemoTextEncode"], prompt="")
    s = {k: v for k, v in demo.DEMO_SETTINGS.items() if k != "fps"}
    s.update(steps=3)
    kw = dict(widget_defaults(n["FlowCacheSampler"]), **s, model=model, positive=pos, negative=neg, unique_id="3")
    out = run_node(n["FlowCacheSampler"], **kw)
    (latent,) = out["result"]
    assert latent["flowcache_codec"] == "demo"
    (images,) = run_node(n["FlowCacheDecode"], samples=latent)
    assert images.shape == (s["num_frames"], s["height"], s["width"], 3)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    res = run_node(n["FlowCacheVideoCombine"], images=images, frame_rate=8.0, loop_count=0,
                   filename_prefix="demo", format="video/h264-mp4", crf=19)
    assert Path(res["result"][0]).is_file()


# ------------------------------------------------------------------------------------------- causal Wan

def test_causal_model_through_the_nodes(pack, comfy):
    """A Self-Forcing-style .pt in the models folder: the loader picks the causal loop (and says why, on the node),
    the sampler runs it block by block with FlowCache Causal Options, and reports the widgets it ignores."""
    model = tiny_wan(seed=4, has_fps=False, dim=64)
    sd = {"model." + k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"generator": sd, "generator_ema": sd, "critic": {}}, comfy.models_dir / "self_forcing_tiny.pt")
    out = run_node(nodes(pack)["FlowCacheModelLoader"], model_name="self_forcing_tiny.pt", dtype="fp32")
    (loaded,) = out["result"]
    assert loaded.loaded.loop == "causal" and any("Self-Forcing" in n for n in out["ui"]["flowcache_notes"])
    (options,) = run_node(nodes(pack)["FlowCacheCausalOptions"], kv_mode="rolling", window_frames=6, sink_frames=3,
                          schedule="self_forcing")
    kw = sampler_inputs(pack, loaded, width=32, height=32, num_frames=33, causal_block_size=3, cfg=1.0,
                        negative=None, causal=options, method="flowcache", preset="custom", threshold=0.0)
    kw["positive"] = cond(dim=32, tokens=5, seed=1)
    res = run_node(nodes(pack)["FlowCacheSampler"], **kw)
    stats = res["ui"]["flowcache_stats"][0]
    assert res["result"][0]["samples"].shape[2] == 9 and stats["settings"]["loop"] == "causal"
    assert stats["settings"]["kv_mode"] == "rolling" and "cfg (no guidance)" in stats["settings"]["ignored_widgets"]
    assert stats["forwards"] == 3 * (4 + 1)  # 3 blocks of 4 steps and a clean pass
    with pytest.raises(pack_submodule(pack, "flowcache.errors").InputError, match="sink_frames"):
        bad = run_node(nodes(pack)["FlowCacheCausalOptions"], kv_mode="rolling", window_frames=6, sink_frames=6,
                       schedule="self_forcing")[0]
        run_node(nodes(pack)["FlowCacheSampler"], **dict(kw, causal=bad))


def test_causal_run_previews_each_finished_block(pack, comfy, monkeypatch):
    """With ComfyUI's latent preview on, the progress bar gets the last frame of each block as it finishes (the
    previewer ComfyUI builds for Wan2.1 latents, given that frame in the model's latent space); off, nothing."""
    import types

    model = tiny_wan(seed=4, has_fps=False, dim=64)
    sd = {"model." + k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"generator_ema": sd}, comfy.models_dir / "self_forcing_tiny.pt")
    (loaded,) = run_node(nodes(pack)["FlowCacheModelLoader"], model_name="self_forcing_tiny.pt",
                         dtype="fp32")["result"]
    seen = []

    class Previewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            seen.append(tuple(x0.shape))
            return (fmt, f"frame-{len(seen)}", 512)

    methods = {"on": Previewer(), "off": None}
    lp = types.ModuleType("latent_preview")
    lp.get_previewer = lambda device, latent_format: methods[state]
    formats = types.ModuleType("comfy.latent_formats")
    formats.Wan21 = lambda: "wan21-format"
    monkeypatch.setitem(sys.modules, "latent_preview", lp)
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    kw = sampler_inputs(pack, loaded, width=32, height=32, num_frames=33, causal_block_size=3, cfg=1.0,
                        negative=None, method="flowcache", preset="custom", threshold=0.0)
    kw["positive"] = cond(dim=32, tokens=5, seed=1)
    state = "on"
    run_node(nodes(pack)["FlowCacheSampler"], **kw)
    # 3 blocks of 3 latent frames: a preview after each block's last step, of one frame [1, 16, 1, 4, 4]
    assert seen == [(1, 16, 1, 4, 4)] * 3
    assert [p for _, p in comfy.previews] == [("JPEG", f"frame-{i}", 512) for i in (1, 2, 3)]
    comfy.previews.clear()
    state = "off"
    run_node(nodes(pack)["FlowCacheSampler"], **kw)
    assert comfy.previews == [] and len(seen) == 3


# ------------------------------------------------------------------------------------ runs that cannot fit

def test_demo_at_4096_is_refused_before_it_starts_with_the_largest_size_that_fits(pack, comfy, demo_model):
    """The reproduction of the report: the demo at 4096x4096 with 36 frames was accepted and ran away. With the
    device's available memory from ComfyUI (here 4 GiB), the sampler refuses it before the model moves or a
    step runs, with the estimate and a size that fits; that size then runs the check clean."""
    demo = demo_model
    n = nodes(pack)
    memory = pack_submodule(pack, "flowcache.memory")
    errors = pack_submodule(pack, "flowcache.errors")
    entry = pack_submodule(pack, "nodes.demo").DEMO_ENTRY
    (model,) = run_node(n["FlowCacheModelLoader"], model_name=entry, dtype="auto")["result"]
    (pos,) = run_node(n["FlowCacheDemoTextEncode"], prompt=demo.DEMO_PROMPTS[0])
    s = {k: v for k, v in demo.DEMO_SETTINGS.items() if k != "fps"}
    comfy.free_memory = 4 * memory.GiB
    kw = dict(widget_defaults(n["FlowCacheSampler"]), **s, model=model, positive=pos, negative=pos, unique_id="3")
    kw.update(width=4096, height=4096, num_frames=36)
    with pytest.raises(errors.InputError) as e:
        run_node(n["FlowCacheSampler"], **kw)
    msg = str(e.value)
    assert "FlowCache Sampler" in msg and "width=4096, height=4096, num_frames=36" in msg and "GiB" in msg
    fit = re.search(r"expected at most (\d+)x(\d+) \(the largest size the smallest plan fits at this aspect ratio "
                    r"and frame count\)", msg)
    assert fit, msg
    w, h = int(fit[1]), int(fit[2])
    assert w == h and 0 < w < 4096  # square in, square out
    assert comfy.loads == [] and comfy.progress == [] and comfy.checks == 0  # nothing moved, nothing ran
    # the named size passes the check: the model is loaded and the run starts (cancelled at its first check,
    # since a run that size is a long CPU job), and one size unit more each way is refused again
    comfy.interrupt_after = 1
    with pytest.raises(StubInterrupt):
        run_node(n["FlowCacheSampler"], **{**kw, "width": w, "height": h})
    assert len(comfy.loads) == 1
    with pytest.raises(errors.InputError, match="need about"):
        run_node(n["FlowCacheSampler"], **{**kw, "width": w + 64, "height": h + 64})


def test_sampler_picks_the_fastest_memory_plan_that_fits_and_shows_it(pack, comfy, tiny, monkeypatch):
    """auto: resident K/V while they fit ComfyUI's free memory, fp8 K/V when only that fits; the widgets fix the
    placement and dtype; the chosen plan is in the node's stats; fp8 where it cannot run keeps the model's dtype
    and says so."""
    cls = nodes(pack)["FlowCacheSampler"]
    chunk = dict(method="flowcache", preset="custom", threshold=10.0, warmup_steps=1)
    first = run_node(cls, **sampler_inputs(pack, tiny, **chunk))["ui"]["flowcache_stats"][0]
    plan = first["memory_plan"]
    assert plan["plan"] == "resident" and first["memory"].startswith("resident: device ")
    assert plan["kv_bytes"] == first["kv_peak_bytes"] > 0  # the estimate is what the stores allocated
    comfy.free_memory = plan["device_bytes"] - 1
    tight = run_node(cls, **sampler_inputs(pack, tiny, **chunk))["ui"]["flowcache_stats"][0]
    assert tight["memory_plan"]["plan"] == "resident + fp8 K/V" and tight["kv_peak_bytes"] < first["kv_peak_bytes"]
    comfy.free_memory = 64 * 1024 ** 3
    fixed = run_node(cls, **sampler_inputs(pack, tiny, **chunk, kv_placement="offload", kv_dtype="bf16"))
    stats = fixed["ui"]["flowcache_stats"][0]
    assert stats["memory_plan"]["plan"] == "offload" and stats["kv_host_bytes"] > 0 and stats["kv_moved_bytes"] > 0
    plan_mod = pack_submodule(pack, "flowcache.plan")
    monkeypatch.setattr(plan_mod, "fp8_supported", lambda device: "no float8 here")
    asked = run_node(cls, **sampler_inputs(pack, tiny, **chunk, kv_dtype="fp8"))["ui"]["flowcache_stats"][0]
    assert asked["memory_plan"]["plan"] == "resident" and "kv_dtype=fp8 is not available here (no float8 here)" in \
        asked["note"]


def test_comfyui_modules_absent_mean_no_comfyui_but_a_broken_one_is_said(pack, tmp_path, monkeypatch):
    """An absent ComfyUI module means the pack runs on its own (CPU, no cancel); one that is there but fails to
    import must not silently mean the same: its error surfaces, naming the module."""
    bridge = pack_submodule(pack, "nodes.comfy_bridge")
    assert bridge._module("flowcache_absent_pkg.model_management") is None
    (tmp_path / "flowcache_broken_pkg").mkdir()
    (tmp_path / "flowcache_broken_pkg" / "__init__.py").write_text("")
    (tmp_path / "flowcache_broken_pkg" / "model_management.py").write_text("raise RuntimeError('no CUDA here')\n")
    (tmp_path / "flowcache_broken_pkg" / "ops.py").write_text("import flowcache_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"flowcache_broken_pkg\.model_management.*RuntimeError: no CUDA here"):
        bridge._module("flowcache_broken_pkg.model_management")
    with pytest.raises(ImportError, match=r"flowcache_broken_pkg\.ops.*'flowcache_missing_dependency'"):
        bridge._module("flowcache_broken_pkg.ops")
    for name in [m for m in sys.modules if m.startswith("flowcache_broken_pkg")]:
        del sys.modules[name]
