"""FlowCache Sampler with ComfyUI's own MODEL, without ComfyUI: a stand-in ModelPatcher holding a Wan-named
module tree built from fake layers, the prompt graph the server would pass, and stubbed ComfyUI modules.
The real server runs the same paths in tests/test_comfy_native.py."""
from __future__ import annotations

import logging
import types

import pytest
import torch

from comfy_helpers import pack_submodule, run_node
from test_nodes import cond, nodes, sampler_inputs
from test_wan_tree import HostLayers, copy_into, foreign_tree, snapshot
from tiny_models import save_wan, tiny_wan

FILE = "tiny_df.safetensors"


class StubBaseModel(torch.nn.Module):
    """ComfyUI's BaseModel as the sampler sees it: ``diffusion_model``, ``get_dtype``, ``manual_cast_dtype``."""

    def __init__(self, tree: torch.nn.Module):
        super().__init__()
        self.diffusion_model = tree
        self.manual_cast_dtype = None

    def get_dtype(self) -> torch.dtype:
        return torch.float32


class StubModelPatcher:
    """A ComfyUI MODEL: ``model`` (the BaseModel), load/offload devices, ``detach``."""

    def __init__(self, tree: torch.nn.Module):
        self.model = StubBaseModel(tree)
        self.load_device = self.offload_device = torch.device("cpu")

    def detach(self, unpatch_all: bool = True):
        return self.model


def prompt_graph(unet_name: str = FILE) -> dict:
    """UNETLoader -> LoraLoaderModelOnly -> FlowCache Sampler (node 5), as the server passes it in PROMPT."""
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "x.safetensors",
                                                                  "strength_model": 1.0}},
            "5": {"class_type": "FlowCacheSampler", "inputs": {"model": ["2", 0]}}}


@pytest.fixture
def df(pack, comfy):
    """(file model, ComfyUI-like MODEL of the same weights without the fps keys, FlowCache Load Model's model)."""
    ref = tiny_wan(seed=11)
    save_wan(ref, comfy.models_dir / FILE)
    mp = StubModelPatcher(copy_into(foreign_tree(ref.cfg), ref.state_dict()))
    (ours,) = run_node(nodes(pack)["FlowCacheModelLoader"], model_name=FILE, dtype="fp32")["result"]
    return ref, mp, ours


def run(pack, model, **over):
    kw = sampler_inputs(pack, model, positive=cond(32, 6, 1), negative=cond(32, 6, 2), num_frames=9,
                        base_num_frames=9, causal_block_size=1, method="flowcache", preset="custom", **over)
    return run_node(nodes(pack)["FlowCacheSampler"], **kw)


def test_a_comfyui_model_equals_flowcache_load_model(pack, comfy, df, caplog):
    _, mp, ours = df
    before = snapshot(mp.model.diffusion_model)
    with caplog.at_level(logging.INFO, logger="FlowCache"):
        native = run(pack, mp, prompt=prompt_graph(), unique_id="5")
    assert f"restored SkyReels' fps embedding from {FILE} (UNETLoader (node 1) unet_name '{FILE}')" in caplog.text
    loader = run(pack, ours)
    a, b = native["result"][0]["samples"], loader["result"][0]["samples"]
    assert torch.equal(a, b)
    assert native["ui"]["flowcache_stats"][0]["maps"] == loader["ui"]["flowcache_stats"][0]["maps"]
    after = snapshot(mp.model.diffusion_model)
    assert after[1] == before[1] and all(torch.equal(before[0][k], v) for k, v in after[0].items())
    assert comfy.loads[0] is mp and comfy.unloads[0] is mp  # ComfyUI loaded it; keep_model_loaded=False let go


def test_without_the_file_the_run_warns_and_goes_on_without_fps(pack, comfy, df, caplog):
    _, mp, _ = df
    with caplog.at_level(logging.WARNING, logger="FlowCache"):
        out = run(pack, mp, prompt=None)
    assert "could not find the file this MODEL was loaded from" in caplog.text
    assert "fps conditioning" in caplog.text and "videos differ from the released model's" in caplog.text
    with_fps = run(pack, mp, prompt=prompt_graph(), unique_id="5")
    a, b = out["result"][0]["samples"], with_fps["result"][0]["samples"]
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_a_comfyui_model_without_presets_runs_easycache_with_no_cache_node(pack, comfy, df):
    """A ComfyUI MODEL of a size the table does not know (as a GGUF or a fine-tune is): easycache, and the note."""
    _, mp, _ = df
    kw = sampler_inputs(pack, mp, positive=cond(32, 6, 1), negative=cond(32, 6, 2), num_frames=9,
                        base_num_frames=9, causal_block_size=1, prompt=prompt_graph(), unique_id="5")
    del kw["cache"]
    stats = run_node(nodes(pack)["FlowCacheSampler"], **kw)["ui"]["flowcache_stats"][0]
    assert stats["mode"] == "easycache" and stats["settings"]["model_key"] == "wan-dim64"
    assert "'wan-dim64' has no presets: easycache" in stats["note"] and "python -m flowcache calibrate" in stats["note"]


def test_working_memory_is_passed_to_comfyui(pack, comfy, df):
    _, mp, _ = df
    mm = comfy.modules["comfy.model_management"]
    seen = {}
    load = mm.load_models_gpu

    def spy(models, memory_required=0, **kw):
        seen.update(kw, memory_required=memory_required)
        return load(models, memory_required=memory_required, **kw)

    mm.load_models_gpu = spy
    out = run(pack, mp, prompt=prompt_graph(), unique_id="5")
    # the working memory asked for is the plan the run used: its activations, state and K/V on the device
    (stats,) = out["ui"]["flowcache_stats"]
    plan = stats["memory_plan"]
    assert plan["device_bytes"] > 0 and seen["memory_required"] == plan["device_bytes"]
    assert seen["minimum_memory_required"] == seen["memory_required"]
    assert "force_full_load" not in seen  # ComfyUI may load the model partially


def test_a_model_that_is_not_wan_is_refused_naming_the_input(pack, comfy):
    flux_like = torch.nn.Module()
    flux_like.double_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with pytest.raises(Exception, match=r"^model: expected a Wan2.1-architecture model .* This MODEL is "
                                         r"StubBaseModel \(Module\)\."):
        run(pack, StubModelPatcher(flux_like))
    with pytest.raises(Exception, match="^model: expected FlowCache Load Model's model or a ComfyUI MODEL, got str"):
        run(pack, "model.safetensors")
    ref = tiny_wan(seed=1, in_dim=48, out_dim=48, has_fps=False)  # Wan2.2-5B-like channels
    with pytest.raises(Exception, match="^model: this Wan MODEL takes 48 latent channels"):
        run(pack, StubModelPatcher(copy_into(foreign_tree(ref.cfg), ref.state_dict())))


def test_source_file_follows_the_graph_inside_the_model_folders(pack, comfy, tmp_path):
    native = pack_submodule(pack, "nodes.native")
    (comfy.models_dir / FILE).write_bytes(b"x")
    path, how = native.source_file(prompt_graph(), "5")
    assert path == str(comfy.models_dir / FILE) and how == f"UNETLoader (node 1) unet_name '{FILE}'"
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    path, why = native.source_file(prompt_graph("../outside.safetensors"), "5")
    assert path is None and "is not a file in diffusion_models" in why  # no way out of the model folders
    merge = {"1": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["3", 0], "model2": ["4", 0]}},
             "5": {"class_type": "FlowCacheSampler", "inputs": {"model": ["1", 0]}}}
    assert native.source_file(merge, "5") == (None, "the MODEL comes from ModelMergeSimple (node 1), which names "
                                                    "no model file")
    loop = {"1": {"class_type": "X", "inputs": {"model": ["2", 0]}}, "2": {"class_type": "Y", "inputs": {"model": ["1", 0]}},
            "5": {"class_type": "FlowCacheSampler", "inputs": {"model": ["1", 0]}}}
    assert native.source_file(loop, "5")[0] is None
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": FILE}},
            "5": {"class_type": "FlowCacheSampler", "inputs": {"model": ["1", 0]}}}
    assert native.source_file(ckpt, "5") == (None, f"CheckpointLoaderSimple's ckpt_name '{FILE}' is not a file in "
                                                   "checkpoints")


def test_loader_builds_from_comfyui_operations(pack, comfy, monkeypatch):
    """Inside ComfyUI the pack's loader builds its model from ``comfy.ops.pick_operations`` (here a stand-in):
    its layers cast at use, so ComfyUI may load it partially; it computes on ComfyUI's device."""
    ops = types.ModuleType("comfy.ops")
    asked = []
    ops.pick_operations = lambda hold, compute, load_device=None: asked.append((hold, compute)) or HostLayers
    monkeypatch.setitem(comfy.modules, "comfy.ops", ops)
    monkeypatch.setitem(__import__("sys").modules, "comfy.ops", ops)
    save_wan(tiny_wan(seed=2), comfy.models_dir / FILE, dtype=torch.float8_e4m3fn)
    (fm,) = run_node(nodes(pack)["FlowCacheModelLoader"], model_name=FILE, dtype="fp32")["result"]
    q = fm.loaded.model.blocks[0].self_attn.q
    assert type(q).__name__ == "CastingLinear" and q.weight.dtype == torch.float8_e4m3fn  # fp8 stays fp8
    assert asked == [(torch.float8_e4m3fn, torch.float32)]
    assert fm.loaded.model.compute_device == torch.device("cpu")
    out = run(pack, fm)
    assert torch.isfinite(out["result"][0]["samples"]).all()


def test_patches_the_sampler_does_not_apply_are_named(pack, comfy, df):
    """What a MODEL carries besides weights: an attention override is used; block replacements, wrappers,
    callbacks, sampler functions, object patches and unknown options are named in the note and the notes."""
    _, mp, _ = df
    plain = run(pack, mp, prompt=prompt_graph(), unique_id="5")["ui"]["flowcache_stats"][0]
    assert "not applied" not in plain["note"] and not any("not applied" in n for n in plain["notes"])
    assert plain["attention"] == {"kernel": "sdpa"}  # no ComfyUI: the core's own SDPA

    mp.model_options = {"transformer_options": {
        "optimized_attention_override": lambda func, *a, **k: func(*a, **k),
        "patches_replace": {"dit": {("double_block", 3): lambda args, extra: args}},
        "patches": {"attn1_patch": [lambda *a: a]},
        "wrappers": {"diffusion_model": {"easycache": [lambda *a: a]}},
        "easycache": object()},
        "sampler_post_cfg_function": [lambda args: args["denoised"]], "disable_cfg1_optimization": True}
    mp.wrappers = {"outer_sample": {"easycache": [lambda *a: a]}, "apply_model": {}}
    mp.callbacks = {"on_pre_run": {None: [lambda *a: None]}}
    mp.object_patches = {"model_sampling": object(), "diffusion_model.blocks.0.forward": object()}
    stats = run(pack, mp, prompt=prompt_graph(), unique_id="5")["ui"]["flowcache_stats"][0]
    notes = [n for n in stats["notes"] if n.startswith("MODEL ")]
    assert notes == [
        "MODEL patches_replace dit double_block 3: not applied (FlowCache's chunked forward calls the blocks' "
        "layers, not ComfyUI's blocks)",
        "MODEL patches attn1_patch: not applied (FlowCache's chunked forward has no ComfyUI patch points)",
        "MODEL wrappers diffusion_model (easycache): not applied (FlowCache runs its own loop and forward, not "
        "ComfyUI's sampler or model forward)",
        "MODEL transformer_options easycache: not read by FlowCache",
        "MODEL sampler_post_cfg_function: not applied (FlowCache computes guidance itself, from the cfg widget)",
        "MODEL wrappers outer_sample (easycache): not applied (FlowCache runs its own loop and forward, not "
        "ComfyUI's sampler or model forward)",
        "MODEL callbacks on_pre_run (unnamed): not applied (FlowCache runs its own loop, not ComfyUI's sampler)",
        "MODEL model_sampling patch: not applied (FlowCache Sampler's shift and steps widgets set the schedule)",
        "MODEL object patches diffusion_model.blocks.0.forward: not applied (FlowCache calls the MODEL's layers, "
        "not its patched methods)"]
    for n in notes:
        assert n in stats["note"]
