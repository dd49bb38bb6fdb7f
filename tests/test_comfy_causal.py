"""Krea Realtime 14B and LongLive v1.0 in a real ComfyUI server (runs only when COMFYUI_PATH is set).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python python -m pytest tests/test_comfy_causal.py -q

* The shipped workflows ``krea_realtime_14b_prompt_changes`` and ``longlive_interactive_story_three_prompts``, turned
  into the API prompt the editor sends (``ui_to_api`` with the server's own node descriptions), run on tiny weights
  in the releases' layouts under the workflows' own file names: Krea's one safetensors of ``model.``-prefixed keys
  (through Load Diffusion Model in fp8, as the workflow loads it), LongLive's ``{'generator': …}`` base .pt and
  ``{'generator_lora': …}`` lora.pt, and a Wan2.1 VAE of the released architecture with random weights. What
  changes: every CLIP Text Encode becomes the test nodes' seeded text states (a real umT5-XXL is 11 GB), the
  video is shrunk (48x32, 8 blocks) with the prompt changes moved to the same share of it, and LongLive's cache
  node takes the slow preset's values as custom ones (a toy model has no presets row).
* LongLive's LoRA through ComfyUI's own loaders: ``python -m flowcache convert`` writes the base and the LoRA as
  safetensors; Load Diffusion Model + LoraLoaderModelOnly on them gives the latents of FlowCache Load Model's merge
  of the release files.

The tiny DiTs are 128 wide with one head (ComfyUI's Wan detection assumes 128-wide heads) and read umT5's 4096-wide
text states.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_helpers import (NEEDS_COMFYUI, ROOT, ComfyServer, host_workdir, http_json, import_pack, pack_submodule, serve,
                           ui_to_api)

pytestmark = NEEDS_COMFYUI

KREA = ROOT / "workflows" / "krea_realtime_14b_prompt_changes.json"
LONGLIVE = ROOT / "workflows" / "longlive_interactive_story_three_prompts.json"
CONVERTED_BASE = "base_for_comfyui.safetensors"  # no "longlive" in the name: its metadata says the loop
CONVERTED_LORA = "longlive_lora.safetensors"
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
FOLDERS = ("diffusion_models", "loras", "vae")
BLOCKS, FRAMES = 8, 4 * 3 * 8 - 3  # the shrunk videos: 8 blocks of 3 latent frames = 93 frames


def tiny_wan_sd(pack, seed: int) -> dict[str, torch.Tensor]:
    """Wan2.1-1.3B's layout at toy size (no fps layers: a causal release), as ComfyUI's detection reads it."""
    wan = pack_submodule(pack, "flowcache.models.wan")
    cfg = wan.WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=4096, freq_dim=256, has_fps=False)
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen) * 0.05).contiguous() for k, v in wan.WanDiT(cfg).state_dict().items()}


def longlive_lora(sd: dict[str, torch.Tensor], rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA in lora.pt's peft layout on every Linear of the attention blocks (no alpha: LongLive's scale 1)."""
    gen = torch.Generator().manual_seed(11)
    out = {}
    for b in range(2):
        for t in LORA_TARGETS:
            w = sd[f"blocks.{b}.{t}.weight"]
            out[f"base_model.model.blocks.{b}.{t}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=gen) * 0.1
            out[f"base_model.model.blocks.{b}.{t}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=gen) * 0.1
    return out


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """(server, pack, work dir, workflow file names): ComfyUI with this pack, the test nodes and the tiny files."""
    work = host_workdir(tmp_path_factory, "comfycausal", FOLDERS)
    pack = import_pack()
    krea = json.loads(KREA.read_text(encoding="utf-8"))
    longlive = json.loads(LONGLIVE.read_text(encoding="utf-8"))
    names = {"krea": next(n for n in krea["nodes"] if n["type"] == "UNETLoader")["widgets_values"][0],
             "vae": next(n for n in krea["nodes"] if n["type"] == "VAELoader")["widgets_values"][0]}
    loader = next(n for n in longlive["nodes"] if n["type"] == "FlowCacheModelLoader")["widgets_values"]
    names["base"], names["lora"] = loader[0], loader[5]
    # Krea's release layout: one safetensors, keys 'model.' + Wan2.1's
    save_file({"model." + k: v for k, v in tiny_wan_sd(pack, 1).items()}, str(work / "diffusion_models" / names["krea"]))
    # LongLive's: {'generator': 'model.' keys} and {'generator_lora': peft keys}
    sd = tiny_wan_sd(pack, 2)
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, work / "diffusion_models" / names["base"])
    torch.save({"generator_lora": longlive_lora(sd)}, work / "loras" / names["lora"])
    # the converter's outputs, for ComfyUI's own loaders
    convert = pack_submodule(pack, "flowcache.convert")
    convert.convert("longlive-base", work / "diffusion_models" / names["base"], work / "diffusion_models" / CONVERTED_BASE)
    convert.convert("longlive-lora", work / "loras" / names["lora"], work / "loras" / CONVERTED_LORA)
    # the Wan2.1 VAE's architecture with random weights (ComfyUI builds it at its released size)
    torch.manual_seed(0)
    vae = pack_submodule(pack, "flowcache.models.wan_vae").WanVAE()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}, str(work / "vae" / names["vae"]))
    del vae
    for server in serve(work, FOLDERS):
        yield server, pack, work, names


def run(server: ComfyServer, prompt: dict, timeout: float = 600.0) -> dict:
    entry = server.wait_done(server.queue(prompt, client_id=uuid.uuid4().hex), timeout=timeout)
    errors = [m[1].get("exception_message") for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", errors or server.log()[-3000:]
    return entry


def shipped(server: ComfyServer, path: Path) -> tuple[dict, dict]:
    """(API prompt, UI workflow): the workflow as the editor would queue it, its CLIP Text Encode nodes replaced by
    seeded text states of umT5's width (the CLIP loader dropped), the video shrunk to ``FRAMES`` at 48x32."""
    wf = json.loads(path.read_text(encoding="utf-8"))
    prompt = ui_to_api(wf, http_json(server.url + "/object_info"))
    for nid, node in list(prompt.items()):
        if node["class_type"] == "CLIPTextEncode":
            prompt[nid] = {"class_type": "FlowCacheTestConditioning",
                           "inputs": {"seed": int(nid), "tokens": 12, "width": 4096}}
        elif node["class_type"] == "CLIPLoader":
            del prompt[nid]
        elif node["class_type"] == "FlowCacheSampler":
            node["inputs"].update(width=48, height=32, num_frames=FRAMES)
    return prompt, wf


def node_id(prompt: dict, class_type: str) -> str:
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return nid


def move_changes(prompt: dict, frames: list[int]) -> None:
    """Prompt i + 2 of the schedule from frame ``frames[i]`` (the shrunk video's share of the workflow's)."""
    inputs = prompt[node_id(prompt, "FlowCachePromptSchedule")]["inputs"]
    for i, f in enumerate(frames, start=2):
        assert f"conditioning_{i}" in inputs
        inputs[f"start_frame_{i}"] = f
    for i in range(len(frames) + 2, 7):  # the unconnected ones after them, still increasing
        inputs[f"start_frame_{i}"] = FRAMES - 7 + i


def video_of(entry: dict, prompt: dict, work: Path, pack) -> tuple[dict, object]:
    save = node_id(prompt, "FlowCacheDecodeSave")
    (video,) = entry["outputs"][save]["images"]
    path = work / "output" / video["subfolder"] / video["filename"]
    return video, pack_submodule(pack, "flowcache.video").read_video(path)


def test_krea_workflow_runs_in_the_server(host):
    """The Krea workflow as shipped: Load Diffusion Model (fp8 storage) of the release's file, four prompts blended
    by Krea's rule, its context re-encoded through ComfyUI's VAE every block from block 2 on, decoded into the mp4."""
    server, pack, work, _ = host
    prompt, _ = shipped(server, KREA)
    unet = prompt[node_id(prompt, "UNETLoader")]["inputs"]
    assert unet["weight_dtype"] == "fp8_e4m3fn"
    move_changes(prompt, [4 * 6 - 3, 4 * 12 - 3, 4 * 18 - 3])  # blocks 10/20/30 of 40 -> 2/4/6 of 8
    sampler = node_id(prompt, "FlowCacheSampler")
    mark = len(server.log())
    entry = run(server, prompt)
    stats = entry["outputs"][sampler]["flowcache_stats"][0]
    s = stats["settings"]
    assert (s["loop"], s["blocks"], s["context_frames"], s["method"]) == ("krea_realtime", BLOCKS, 3, "off"), s
    assert s["model_key"].endswith("-causal"), s  # a causal model's own presets row, native or not
    assert [(x["chunk"], x["rule"], x["entry"]) for x in stats["switches"]] == [(2, "blend", 2), (4, "blend", 3),
                                                                                  (6, "blend", 4)]
    assert stats["computed"] == BLOCKS * 5 and stats["forwards"] == BLOCKS * 5 + BLOCKS - 1, stats
    assert s["memory_plan"], s
    log = server.log()[mark:]
    assert "Krea Realtime loop, 8 blocks" in log and "trained at 832x480" in log
    video, frames = video_of(entry, prompt, work, pack)
    assert frames.shape == (FRAMES, 32, 48, 3) and video["frames"] == FRAMES


def test_longlive_workflow_runs_in_the_server(host):
    """The LongLive workflow as shipped: the base .pt with lora.pt merged by FlowCache Load Model, the release's
    window and sink, three prompts re-cached at their blocks, decoded into the mp4."""
    server, pack, work, names = host
    prompt, _ = shipped(server, LONGLIVE)
    loader = node_id(prompt, "FlowCacheModelLoader")
    assert (prompt[loader]["inputs"]["model_name"], prompt[loader]["inputs"]["lora"]) == (names["base"], names["lora"])
    move_changes(prompt, [4 * 9 - 3, 4 * 15 - 3])  # blocks 14/27 of 40 -> 3 and 5 of 8 (the first re-writes the sink)
    # the tiny model is no 1.3B, so it has no presets row: the slow row's values as custom ones
    cache = prompt[node_id(prompt, "FlowCacheCache")]["inputs"]
    assert (cache["method"], cache["preset"]) == ("flowcache", "slow")
    slow = pack_submodule(pack, "flowcache.presets").preset_rows("wan-1.3B-causal", {})["rows"]["flowcache"]["slow"]
    cache.update(preset="custom", threshold=slow["threshold"], warmup_steps=slow["warmup"], kv_budget=slow["kv_budget"],
                 mix_lambda=slow["mix_lambda"])
    sampler = node_id(prompt, "FlowCacheSampler")
    entry = run(server, prompt)
    notes = entry["outputs"][loader]["flowcache_notes"]
    assert notes[0].startswith("longlive loop") and "LoRA lora.pt merged into 20 of its 20" in notes[1], notes
    stats = entry["outputs"][sampler]["flowcache_stats"][0]
    s = stats["settings"]
    assert (s["loop"], s["kv_mode"], s["blocks"], s["method"], s["preset"]) == \
        ("causal", "rolling", BLOCKS, "flowcache", "custom"), s
    assert [(x["chunk"], x["rule"]) for x in stats["switches"]] == [(3, "recache"), (5, "recache")]
    assert stats["forwards"] == stats["computed"] + BLOCKS + 2, "a clean pass per block, one re-cache per change"
    video, frames = video_of(entry, prompt, work, pack)
    assert frames.shape == (FRAMES, 32, 48, 3) and video["frames"] == FRAMES


def longlive_graph(model_nodes: dict, model_ref: list, prefix: str) -> dict:
    """model -> FlowCache Sampler (LongLive's options, two prompts re-cached at block 3, cache off) -> SaveLatent."""
    text = lambda seed: {"class_type": "FlowCacheTestConditioning",  # noqa: E731
                         "inputs": {"seed": seed, "tokens": 12, "width": 4096}}
    return {**model_nodes, "20": text(1), "21": text(2), "22": text(3),
            "23": {"class_type": "FlowCachePromptSchedule",
                   "inputs": {"conditioning_1": ["20", 0], "conditioning_2": ["21", 0], "start_frame_2": 33,
                              "transition": "auto", "blend_blocks": 4, "keep_sink": True}},
            "24": {"class_type": "FlowCacheCausalOptions",
                   "inputs": {"kv_mode": "rolling", "window_frames": 12, "sink_frames": 3, "schedule": "self_forcing"}},
            "25": {"class_type": "FlowCacheCache",
                   "inputs": {"method": "off", "preset": "slow", "threshold": 0.1, "warmup_steps": 1, "kv_budget": 0,
                              "mix_lambda": 0.07, "max_skips": 3, "attention": "auto"}},
            "30": {"class_type": "FlowCacheSampler",
                   "inputs": dict(width=48, height=32, num_frames=4 * 3 * 6 - 3, steps=4, cfg=1.0, shift=5.0, seed=9,
                                  ar_step=0, causal_block_size=3, base_num_frames=81, overlap_history=17,
                                  addnoise_condition=0, solver="unipc", keep_model_loaded=False, model=model_ref,
                                  positive=["23", 0], negative=["22", 0], cache=["25", 0], causal=["24", 0])},
            "9": {"class_type": "SaveLatent", "inputs": {"samples": ["30", 0], "filename_prefix": f"ll/{prefix}"}}}


def latent(entry: dict, work: Path) -> torch.Tensor:
    (item,) = entry["outputs"]["9"]["latents"]
    return load_file(str(work / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def test_converted_longlive_lora_through_comfyui_loaders_equals_the_merge(host):
    """``convert longlive-base`` + ``convert longlive-lora`` through Load Diffusion Model and LoraLoaderModelOnly
    (strength 1): the same latents as FlowCache Load Model merging lora.pt into longlive_base.pt, LongLive's loop
    picked from the converted file's metadata (its name does not say it), the same presets row."""
    server, _, work, names = host
    ours = run(server, longlive_graph({"1": {"class_type": "FlowCacheModelLoader",
                                             "inputs": {"model_name": names["base"], "dtype": "auto",
                                                        "lora": names["lora"]}}}, ["1", 0], "merged"))
    native = run(server, longlive_graph({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": CONVERTED_BASE, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": CONVERTED_LORA,
                                                              "strength_model": 1.0}}}, ["2", 0], "native"))
    bare = run(server, longlive_graph({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": CONVERTED_BASE, "weight_dtype": "default"}}},
        ["1", 0], "bare"))
    assert "lora key not loaded" not in server.log()
    a, b, c = latent(ours, work), latent(native, work), latent(bare, work)
    assert a.shape == (1, 16, 18, 4, 6) and torch.isfinite(a).all()
    assert (a - c).abs().max() > 1e-2, "the LoRA does something"
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    sa, sb = (e["outputs"]["30"]["flowcache_stats"][0] for e in (ours, native))
    assert sb["settings"]["model_key"] == sa["settings"]["model_key"] and sa["settings"]["model_key"].endswith("-causal")
    assert [x["rule"] for x in sb["switches"]] == ["recache"] and sb["forwards"] == sa["forwards"]
