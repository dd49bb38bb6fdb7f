"""Errors lead with the answer: for each error class a ComfyUI user can meet, a representative error's first
120 characters (what the UI shows before anyone scrolls) name the widget or input, what was given and what is
expected. The nodes run without ComfyUI (stubbed, as in test_nodes.py)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_helpers import pack_submodule, run_node, write_tiny_wan
from test_nodes import cond, demo, nodes, sampler_inputs  # noqa: F401 (demo: a fixture)
from test_nodes_native import StubModelPatcher
from test_wan_tree import copy_into, foreign_tree
from tiny_models import tiny_wan

HEAD = 120


def first(exc_info) -> str:
    return str(exc_info.value)[:HEAD]


def raised(pack, cls_name: str, node: str, **inputs):
    errors = pack_submodule(pack, "flowcache.errors")
    with pytest.raises(getattr(errors, cls_name)) as e:
        run_node(nodes(pack)[node], **inputs)
    assert type(e.value) is getattr(errors, cls_name)  # the class itself, not only a subclass of it
    return e


def assert_leads_with(exc_info, *needles: str) -> None:
    head = first(exc_info)
    for needle in needles:
        assert needle in head, f"{needle!r} not in the first {HEAD} characters: {str(exc_info.value)!r}"


# ----------------------------------------------------------------------------------------------- InputError

def test_an_image_to_video_comfyui_model_says_so_first(pack, comfy):
    ref = tiny_wan(seed=1, has_fps=False)
    i2v = copy_into(foreign_tree(ref.cfg), ref.state_dict())
    i2v.img_emb = torch.nn.Linear(4, 4)
    e = raised(pack, "InputError", "FlowCacheSampler",
               **sampler_inputs(pack, StubModelPatcher(i2v), positive=cond(32, 6, 1), negative=cond(32, 6, 2)))
    assert str(e.value).startswith("model: a Wan image-to-video model (it has img_emb); FlowCache runs text-to-video")
    assert_leads_with(e, "model:", "image-to-video", "img_emb", "text-to-video")
    assert str(e.value).count("model:") == 1  # no nested repeat of the input's name


def test_a_model_that_is_not_wan_says_what_is_expected_first(pack, comfy):
    flux_like = torch.nn.Module()
    flux_like.double_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    e = raised(pack, "InputError", "FlowCacheSampler", **sampler_inputs(pack, StubModelPatcher(flux_like)))
    assert_leads_with(e, "model:", "expected a Wan2.1-architecture model", "SkyReels-V2 DF")


def test_slow_on_a_model_without_presets_says_so_first(pack, comfy):
    write_tiny_wan(comfy.models_dir / "uncalibrated.safetensors", pack, model_key="uncalibrated", presets=None)
    (model,) = run_node(nodes(pack)["FlowCacheModelLoader"], model_name="uncalibrated.safetensors",
                        dtype="fp32")["result"]
    e = raised(pack, "InputError", "FlowCacheSampler", **sampler_inputs(pack, model, preset="slow"))
    assert_leads_with(e, "preset='slow'", "'uncalibrated' has no flowcache slow preset", "expected preset = custom")
    assert "python -m flowcache calibrate" in str(e.value)


@pytest.mark.parametrize("over, needles", [
    (dict(num_frames=20), ("num_frames=20", "must be 4·k+1", "nearest")),
    (dict(positive=cond(dim=23)), ("positive:", "23", "24")),
    (dict(width=40), ("width=40", "multiple of 16")),
    (dict(preset="custom", threshold=-1.0), ("threshold=-1", "must be")),
])
def test_sampler_widget_errors_lead_with_the_widget(pack, comfy, over, needles):
    write_tiny_wan(comfy.models_dir / "tiny_wan.safetensors", pack)
    (model,) = run_node(nodes(pack)["FlowCacheModelLoader"], model_name="tiny_wan.safetensors",
                        dtype="fp32")["result"]
    assert_leads_with(raised(pack, "InputError", "FlowCacheSampler", **sampler_inputs(pack, model, **over)), *needles)


def test_cache_node_errors_lead_with_the_widget(pack, comfy):
    e = raised(pack, "InputError", "FlowCacheCache", method="flowcache", preset="custom", threshold=0.1,
               warmup_steps=1, kv_budget=0, mix_lambda=0.07, max_skips=3, attention="sideways")
    assert_leads_with(e, "attention='sideways'", "must be one of", "block_causal")


def test_demo_prompt_errors_lead_with_the_widget(pack, comfy, demo):
    e = raised(pack, "InputError", "FlowCacheDemoTextEncode", prompt="a purple dragon bouncing")
    assert_leads_with(e, "prompt:", "unknown word(s) 'dragon'", "expected only words the demo model knows")


# ------------------------------------------------------------------------------------------ CheckpointError

def test_loader_errors_lead_with_model_name_and_the_file(pack, comfy):
    (comfy.models_dir / "broken_model.safetensors").write_bytes(b"\x00" * 20)
    e = raised(pack, "CheckpointError", "FlowCacheModelLoader", model_name="broken_model.safetensors", dtype="auto")
    assert_leads_with(e, "model_name: broken_model.safetensors", "not a safetensors file")

    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3)}, str(comfy.models_dir / "a_vae.safetensors"))
    e = raised(pack, "CheckpointError", "FlowCacheModelLoader", model_name="a_vae.safetensors", dtype="auto")
    assert_leads_with(e, "model_name: a_vae.safetensors", "not a supported video model", "Expected a Wan2.1")

    sd = {k: v.contiguous() for k, v in tiny_wan(seed=2).state_dict().items()}
    sd["img_emb.proj.1.weight"] = torch.zeros(64, 64)
    save_file(sd, str(comfy.models_dir / "wan_i2v.safetensors"), metadata={"flowcache.num_heads": "2"})
    e = raised(pack, "CheckpointError", "FlowCacheModelLoader", model_name="wan_i2v.safetensors", dtype="auto")
    assert_leads_with(e, "model_name: wan_i2v.safetensors", "image-to-video", "img_emb", "text-to-video")

    e = raised(pack, "CheckpointError", "FlowCacheModelLoader", model_name="missing.safetensors", dtype="auto")
    assert_leads_with(e, "model_name: missing.safetensors", "not found in models/diffusion_models")


def test_a_widget_the_message_already_names_is_not_repeated(pack):
    errors = pack_submodule(pack, "flowcache.errors")
    e = errors.CheckpointError("loop='x': must be one of auto, diffusion_forcing, causal.")
    assert errors.led_by("model_name", e, "loop") is e
    led = errors.led_by("model_name", errors.InputError("f.safetensors: damaged."))
    assert type(led) is errors.InputError and str(led) == "model_name: f.safetensors: damaged."


# ------------------------------------------------------------------------------------------ OutputPathError

@pytest.mark.parametrize("prefix", ["../escape", "/etc/escape", "video/"])
def test_output_path_errors_lead_with_the_prefix_and_what_is_expected(pack, comfy, prefix):
    e = raised(pack, "OutputPathError", "FlowCacheVideoCombine", images=torch.rand(2, 16, 16, 3), frame_rate=8.0,
               loop_count=0, filename_prefix=prefix, format="video/h264-mp4", crf=19)
    assert_leads_with(e, f"filename_prefix {prefix!r}", "expected a name or a relative path inside the output")
