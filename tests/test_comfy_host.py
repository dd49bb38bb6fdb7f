"""The pack inside a real ComfyUI server (runs only when COMFYUI_PATH points to a ComfyUI checkout).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python python -m pytest tests/test_comfy_host.py -q

The pack is linked into a temporary custom_nodes folder given to ComfyUI with --extra-model-paths-config
(together with a temporary diffusion_models folder); ``main.py --cpu`` runs as a subprocess, so this test
process never imports ComfyUI (and never needs the pack root on sys.path).
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import torch

from comfy_helpers import (NEEDS_COMFYUI, NODE_IDS, PACK_DIR_NAME, ROOT, TINY_KEY, TINY_PRESETS, MiniWebSocket,
                           demo_available, demo_missing, host_workdir, http_json, import_pack, pack_submodule, serve,
                           ui_to_api, write_tiny_wan)

pytestmark = NEEDS_COMFYUI

FOLDERS = ("diffusion_models", "text_encoders", "vae")
TINY_FILE = "tiny_demo_space.safetensors"
CAUSAL_FILE = "self_forcing_tiny.pt"
DEMO_GEOMETRY = {"temporal_stride": 1, "spatial_stride": 8, "channels": 32, "position_channels": 2}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """(server, pack, work dir): ComfyUI with this pack and a tiny model; killed afterwards."""
    work = host_workdir(tmp_path_factory, "comfyhost", FOLDERS, test_nodes=False)
    pack = import_pack()  # only to write the tiny model with the pack's own WanDiT; no ComfyUI import
    if demo_available(pack):
        # demo latent space and text width, so the demo text encoder and codec serve it without weights
        write_tiny_wan(work / "diffusion_models" / TINY_FILE, pack, text_dim=64, text_len=16, dim=64, layers=3,
                       heads=2, latent_format="demo", geometry=DEMO_GEOMETRY)
    try:  # tiny MAGI-1 files; the T5 has the real vocabulary size, for ComfyUI's own T5 tokenizer file
        from test_nodes_magi import write_tiny_magi_files
        write_tiny_magi_files(work, vocab=32128)
    except ImportError:  # no `tokenizers` here: the MAGI-1 test skips
        pass
    # a tiny Self-Forcing-style .pt (generator / generator_ema, keys prefixed "model."), text width of the demo
    # text encoder's states, so a causal run needs no downloads
    from tiny_models import tiny_wan
    causal = tiny_wan(seed=4, has_fps=False, dim=64, text_dim=64)
    sd = {"model." + k: v.detach().clone() for k, v in causal.state_dict().items()}
    torch.save({"generator": sd, "generator_ema": sd, "critic": {}}, work / "diffusion_models" / CAUSAL_FILE)
    for server in serve(work, FOLDERS):
        yield server, pack, work


def need_demo(pack) -> None:
    if not demo_available(pack):
        pytest.skip("flowcache.demo is not installed: without it there is no weight-free text encoder and "
                    "decoder to drive a whole prompt on a CPU-only ComfyUI")


CACHE_WIDGETS = ("method", "preset", "threshold", "warmup_steps", "kv_budget", "mix_lambda", "max_skips", "attention")


def cache_node(method: str = "flowcache", preset: str = "slow", **custom) -> dict:
    """A FlowCache Cache node (API format) with the custom widgets' defaults."""
    inputs = dict(method=method, preset=preset, threshold=0.1, warmup_steps=5, kv_budget=0, mix_lambda=0.07,
                  max_skips=3, attention="auto")
    inputs.update(custom)
    return {"class_type": "FlowCacheCache", "inputs": inputs}


def graph(model_name: str, prefix: str, *, dtype: str = "auto", steps: int = 6, seed: int = 3, with_cache: bool = True,
          **sampler) -> dict:
    """Loader -> demo text encode (x2) -> sampler (cache settings from a FlowCache Cache node, "8") -> decode ->
    video combine, plus core SaveLatent. Cache widget keywords (method, preset, threshold, ...) go to node 8."""
    cache = {k: sampler.pop(k) for k in CACHE_WIDGETS if k in sampler}
    settings = dict(width=64, height=64, num_frames=36, steps=steps, cfg=5.0, shift=5.0, seed=seed, ar_step=5,
                    causal_block_size=4, base_num_frames=20, overlap_history=4, addnoise_condition=20,
                    solver="unipc", keep_model_loaded=False)
    settings.update(sampler)
    if with_cache:
        settings["cache"] = ["8", 0]
    nodes = {
        "1": {"class_type": "FlowCacheModelLoader", "inputs": {"model_name": model_name, "dtype": dtype}},
        "2": {"class_type": "FlowCacheDemoTextEncode", "inputs": {"prompt": "a red circle bouncing on a blue "
                                                                            "background"}},
        "3": {"class_type": "FlowCacheDemoTextEncode", "inputs": {"prompt": ""}},
        "4": {"class_type": "FlowCacheSampler", "inputs": dict(settings, model=["1", 0], positive=["2", 0],
                                                               negative=["3", 0])},
        "5": {"class_type": "FlowCacheDecode", "inputs": {"samples": ["4", 0]}},
        "6": {"class_type": "FlowCacheVideoCombine", "inputs": {"images": ["5", 0], "frame_rate": 8.0,
                                                                "loop_count": 0, "filename_prefix": prefix,
                                                                "format": "video/h264-mp4", "crf": 19}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if with_cache:
        nodes["8"] = cache_node(**cache)
    return nodes


def outputs_of(entry: dict, work: Path) -> tuple[Path, Path]:
    """(mp4, .latent) paths from a finished run's history entry."""
    errors = [m[1].get("exception_message") for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", errors or entry["status"]
    out = entry["outputs"]
    (video,) = out["6"]["images"]
    assert out["6"]["animated"] == [True] and video["type"] == "output"
    (latent,) = out["7"]["latents"]
    root = work / "output"
    return root / video["subfolder"] / video["filename"], root / latent["subfolder"] / latent["filename"]


def read_latent(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


FILE_LISTS = {("FlowCacheModelLoader", "model_name"), ("FlowCacheModelLoader", "lora"),
              ("FlowCacheMagiTextEncode", "t5_name"), ("FlowCacheMagiVAELoader", "vae_name")}


def test_nodes_are_listed(host):
    """The pack registers through comfy_entrypoint (V3; it has no NODE_CLASS_MAPPINGS, which ComfyUI would read
    first), and the server describes every node exactly as the pack's schemas do outside ComfyUI (the stand-in
    of nodes/comfy_v3.py): same inputs, types, options and tooltips, in the same order."""
    server, pack, _ = host
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and callable(pack.comfy_entrypoint)
    info = http_json(server.url + "/object_info")
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"not registered: {missing}\n{server.log()[-3000:]}"
    assert "IMPORT FAILED" not in "\n".join(l for l in server.log().splitlines() if PACK_DIR_NAME in l)
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["category"] in ("FlowCache", "FlowCache/MAGI-1")
        assert node["display_name"] == pack.DISPLAY_NAMES[node_id]
        cls = pack.NODE_CLASSES[node_id]
        assert node["output"] == list(cls.RETURN_TYPES) and node["output_name"] == list(cls.RETURN_NAMES)
        assert node["output_tooltips"] == list(cls.OUTPUT_TOOLTIPS) and node["description"] == cls.DESCRIPTION
        assert node["output_node"] is cls.OUTPUT_NODE
        ours = json.loads(json.dumps(cls.INPUT_TYPES()))  # tuples as JSON lists, as the server sends them
        for section in ("required", "optional"):
            for name in ours.get(section, {}):
                if (node_id, name) in FILE_LISTS:  # the model folders differ between the server and this process
                    ours[section][name][1].pop("options")
                    node["input"][section][name][1].pop("options")
        assert node["input"] == ours, node_id
        assert node["input_order"] == {k: list(v) for k, v in ours.items()}
    sampler = info["FlowCacheSampler"]
    assert sampler["input"]["required"]["model"][0] == "FLOWCACHE_MODEL,MODEL"
    assert sampler["input"]["optional"]["vae"][0] == "VAE"
    # PROMPT: where a MODEL came from
    assert sampler["input"]["hidden"] == {"unique_id": ["UNIQUE_ID"], "prompt": ["PROMPT"]}
    assert info["FlowCacheVideoCombine"]["output_node"] is True
    # WEB_DIRECTORY serves web/ under the folder name; pyproject's [tool.comfy] web serves it again under the
    # project name when the two differ (as here), which web/flowcache.js guards against (it registers once).
    served = http_json(server.url + "/extensions")
    for js in sorted((ROOT / "web").rglob("*.js")):
        rel = js.relative_to(ROOT / "web").as_posix()
        assert f"/extensions/{PACK_DIR_NAME}/{rel}" in served, served
    demo_entry = pack_submodule(pack, "nodes.demo").DEMO_ENTRY
    loader = http_json(server.url + "/object_info/FlowCacheModelLoader")["FlowCacheModelLoader"]
    models = loader["input"]["required"]["model_name"][1]["options"]
    assert models[0] == demo_entry
    if demo_available(pack):
        assert TINY_FILE in models  # found through the extra diffusion_models path


def test_model_presets_route(host):
    """The frontend's read-ahead of a model's preset values, served by the pack's route."""
    server, pack, _ = host
    need_demo(pack)
    from urllib.parse import quote

    def ask(name: str) -> dict:
        return http_json(f"{server.url}/flowcache/model_presets?model_name={quote(name)}")

    tiny = ask(TINY_FILE)
    assert tiny["known"] and tiny["key"] == "tiny-test" and tiny["rows"]["flowcache"]["fast"]["kv_budget"] == 1
    demo = ask(pack_submodule(pack, "nodes.demo").DEMO_ENTRY)
    assert demo["key"] == "demo" and demo["rows"]["flowcache"]["slow"]["threshold"] == 0.15
    assert demo["rows"]["flowcache"]["slow"]["reuse"] == "extrapolate"  # the row says what auto resolves to
    missing = ask("no_such_model.safetensors")
    assert missing["known"] is False and "not found in models/diffusion_models" in missing["error"]


def test_demo_prompt_writes_a_playable_video(host):
    server, pack, work = host
    need_demo(pack)
    why = demo_missing(pack)
    if why:
        pytest.skip(why)
    demo_entry = pack_submodule(pack, "nodes.demo").DEMO_ENTRY
    pid = server.queue(graph(demo_entry, "demo_run", steps=8), client_id=uuid.uuid4().hex)
    entry = server.wait_done(pid)
    video_path, latent_path = outputs_of(entry, work)
    assert video_path.is_file() and video_path.suffix == ".mp4"
    frames = pack_submodule(pack, "flowcache.video").read_video(video_path)
    assert frames.shape == (36, 64, 64, 3)
    stats = entry["outputs"]["4"]["flowcache_stats"][0]
    assert stats["mode"] == "flowcache" and stats["windows"] == 2
    assert stats["note"] == "" and (stats["settings"]["method"], stats["settings"]["preset"]) == ("flowcache", "slow")
    assert read_latent(latent_path).shape == (1, 32, 36, 8, 8)


def test_cache_node_settings_and_the_note_without_one(host):
    """FlowCache Cache's settings reach the run; without the node the sampler runs FlowCache slow and says so."""
    server, pack, work = host
    need_demo(pack)
    client = uuid.uuid4().hex
    custom = server.wait_done(server.queue(graph(TINY_FILE, "cache_custom", steps=4, preset="custom", threshold=0.3,
                                                 warmup_steps=1, kv_budget=1), client_id=client))
    outputs_of(custom, work)
    stats = custom["outputs"]["4"]["flowcache_stats"][0]
    s = stats["settings"]
    assert stats["note"] == "" and (s["method"], s["preset"], s["threshold"], s["warmup"], s["kv_budget"]) == \
        ("flowcache", "custom", 0.3, 1, 1), s
    bare = server.wait_done(server.queue(graph(TINY_FILE, "no_cache", steps=4, with_cache=False), client_id=client))
    outputs_of(bare, work)
    stats = bare["outputs"]["4"]["flowcache_stats"][0]
    assert stats["note"].startswith("no cache node connected"), stats["note"]
    slow = TINY_PRESETS[TINY_KEY]["flowcache"]["slow"]
    assert (stats["settings"]["method"], stats["settings"]["preset"], stats["settings"]["threshold"]) == \
        ("flowcache", "slow", slow["threshold"]), stats["settings"]


def test_alternating_seeds_give_identical_videos_per_seed(host):
    """Issue 24 (8): the demo graph (FlowCache fast, 8 steps) queued at once with seeds 0, 1, 0, 1, ... gives, per
    seed, bit-identical latents, bit-identical mp4 files and the same cache decisions. ComfyUI keeps the loader's
    model, the text states and the cache request between prompts and re-runs the sampler, decoder and video
    writer each time (the seed before differs). The latents were always identical; the mp4s were not, because
    libx264's B-frame mb-tree read uninitialised memory (``flowcache.video``)."""
    server, pack, work = host
    need_demo(pack)
    why = demo_missing(pack)
    if why:
        pytest.skip(why)
    demo_entry = pack_submodule(pack, "nodes.demo").DEMO_ENTRY
    seeds = [0, 1] * 6
    client = uuid.uuid4().hex
    pids = [server.queue(graph(demo_entry, f"alt/seed{seed}", steps=8, seed=seed, preset="fast"), client_id=client)
            for seed in seeds]
    video = pack_submodule(pack, "flowcache.video")
    first: dict[int, tuple] = {}
    for i, (seed, pid) in enumerate(zip(seeds, pids)):
        entry = server.wait_done(pid)
        video_path, latent_path = outputs_of(entry, work)
        stats = entry["outputs"]["4"]["flowcache_stats"][0]
        assert (stats["settings"]["method"], stats["settings"]["preset"]) == ("flowcache", "fast")
        got = (read_latent(latent_path), video_path.read_bytes(), video.read_video(video_path),
               (stats["maps"], stats["maps_uncond"], stats["forwards"]))
        if seed not in first:
            first[seed] = got
            continue
        want = first[seed]
        assert torch.equal(got[0], want[0]), f"prompt {i} (seed {seed}): latents differ from the first seed-{seed} run"
        assert got[3] == want[3], f"prompt {i} (seed {seed}): other cache decisions than the first seed-{seed} run"
        diff = int(abs(got[2].astype(int) - want[2].astype(int)).max())
        assert got[1] == want[1], f"prompt {i} (seed {seed}): the mp4 differs (up to {diff}/255 per pixel)"
    assert not torch.equal(first[0][0], first[1][0])  # the seed reaches the run


TERMINAL = ("execution_success", "execution_error", "execution_interrupted")


def events_until_done(ws: MiniWebSocket, prompt_id: str) -> list[tuple[str, dict]]:
    """Websocket events up to this prompt's success, error or interruption."""
    events = []
    while True:
        msg = ws.recv_json()
        assert msg is not None, "websocket closed"
        events.append((msg["type"], msg.get("data") or {}))
        if msg["type"] in TERMINAL and (msg.get("data") or {}).get("prompt_id") == prompt_id:
            return events


def test_interrupt_then_next_run_equals_fresh_run(host):
    server, pack, work = host
    need_demo(pack)
    client = uuid.uuid4().hex
    ws = MiniWebSocket("127.0.0.1", server.port, f"/ws?clientId={client}")
    try:
        slow = dict(steps=20)
        pid = server.queue(graph(TINY_FILE, "interrupted", **slow), client_id=client)
        seen: list[dict] = []
        deadline = time.time() + 120
        while time.time() < deadline:
            msg = ws.recv_json()
            assert msg is not None, "websocket closed"
            if msg["type"] in TERMINAL and msg["data"].get("prompt_id") == pid:
                pytest.fail(f"run ended before it could be interrupted: {msg}")
            if msg["type"] == "flowcache.progress":
                seen.append(msg["data"])
                if msg["data"]["value"] >= 3:
                    http_json(server.url + "/interrupt", {})
                    break
        assert seen and seen[0]["node"] == "4" and seen[0]["max"] > 3 and "window 1/2" in seen[0]["text"]
        assert events_until_done(ws, pid)[-1][0] == "execution_interrupted"
        interrupted = server.wait_done(pid)
        assert interrupted["status"]["status_str"] == "error"
        messages = dict(interrupted["status"]["messages"])
        assert messages["execution_interrupted"]["node_id"] == "4"
        assert not list((work / "output").rglob("interrupted*"))  # nothing half-written

        # The same prompt again: the loader's model (cached by ComfyUI) is the one the interrupted run used.
        pid = server.queue(graph(TINY_FILE, "after", **slow), client_id=client)
        events = events_until_done(ws, pid)
        after = server.wait_done(pid)
        assert events[-1][0] == "execution_success"
        kinds = [k for k, _ in events]
        assert "execution_cached" in kinds and "1" in dict(events)["execution_cached"]["nodes"]  # loader reused
        progress = [d for k, d in events if k == "progress" and d.get("node") == "4"]
        assert progress and progress[-1]["value"] == progress[-1]["max"]
        (stats_event,) = [d for k, d in events if k == "flowcache.stats"]
        assert stats_event["node"] == "4" and stats_event["stats"]["windows"] == 2

        # A fresh model object (another dtype widget value, the same fp32 weights on a CPU) for comparison.
        fresh = server.wait_done(server.queue(graph(TINY_FILE, "fresh", dtype="fp32", **slow), client_id=client))
        v_after, l_after = outputs_of(after, work)
        v_fresh, l_fresh = outputs_of(fresh, work)
        assert torch.equal(read_latent(l_after), read_latent(l_fresh))
        # The latents are the bit-exact check; the videos go through the demo codec, whose stats are re-read
        # from the demo model file each time (and change while someone retrains it), and a lossy encoder.
        video = pack_submodule(pack, "flowcache.video")
        fa, ff = video.read_video(v_after), video.read_video(v_fresh)
        assert fa.shape == ff.shape == (36, 64, 64, 3)
        assert abs(fa.astype(float) - ff.astype(float)).mean() < 2.0
        a, f = after["outputs"]["4"]["flowcache_stats"][0], fresh["outputs"]["4"]["flowcache_stats"][0]
        timing = ("wall_seconds", "compress_seconds")
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in f.items() if k not in timing}
    finally:
        ws.close()


def test_magi_text_to_video_in_the_server(host):
    """Loader -> MAGI-1 text encode (ComfyUI's T5 tokenizer file, our T5) -> the one sampler in MAGI-1 mode ->
    Decode & Save Video with MAGI-1's VAE, on tiny models in the released layouts."""
    server, pack, work = host
    if not (work / "text_encoders" / "t5_tiny.safetensors").is_file():
        pytest.skip("the tiny MAGI-1 files need the `tokenizers` package in the test environment")
    sampler = dict(width=32, height=32, num_frames=24, steps=8, cfg=1.0, shift=3.0, seed=5, ar_step=5,
                   causal_block_size=2, base_num_frames=97, overlap_history=17, addnoise_condition=20,
                   solver="unipc", keep_model_loaded=False, cache=["6", 0])
    prompt = {
        "1": {"class_type": "FlowCacheModelLoader",
              "inputs": {"model_name": "magi_4.5B_distill/model.safetensors", "dtype": "auto"}},
        "2": {"class_type": "FlowCacheMagiTextEncode",
              "inputs": {"t5_name": "t5_tiny.safetensors", "prompt": "A red fox runs through the snow."}},
        "3": {"class_type": "FlowCacheMagiVAELoader", "inputs": {"vae_name": "magi1/diffusion_pytorch_model.safetensors"}},
        "4": {"class_type": "FlowCacheSampler", "inputs": dict(sampler, model=["1", 0], positive=["2", 0],
                                                               negative=["2", 0])},
        "5": {"class_type": "FlowCacheDecodeSave", "inputs": {"samples": ["4", 0], "magi_vae": ["3", 0],
                                                              "frame_rate": 24.0, "loop_count": 0,
                                                              "filename_prefix": "magi/tiny", "format": "video/h264-mp4",
                                                              "crf": 19}},
        "6": cache_node("flowcache", "fast", threshold=0.015, kv_budget=1),
    }
    entry = server.wait_done(server.queue(prompt, client_id=uuid.uuid4().hex))
    errors = [m[1].get("exception_message") for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", errors or server.log()[-3000:]
    stats = entry["outputs"]["4"]["flowcache_stats"][0]
    assert stats["mode"] == "flowcache" and stats["settings"]["magi"]["chunks"] == 3
    assert (stats["settings"]["preset"], stats["settings"]["kv_budget"], stats["note"]) == ("fast", 1, ""), stats["settings"]
    assert stats["settings"]["magi"]["distill"] is True  # from the folder name
    (video,) = entry["outputs"]["5"]["images"]
    path = work / "output" / video["subfolder"] / video["filename"]
    frames = pack_submodule(pack, "flowcache.video").read_video(path)
    assert frames.shape == (24, 32, 32, 3) and video["frames"] == 24


def test_causal_loop_through_the_nodes_in_the_server(host):
    """A Self-Forcing .pt through FlowCache Load Model (the loop decided as causal, its notes on the node), FlowCache
    Causal Options (rolling window with a sink) and the sampler, block by block, into core SaveLatent; then the
    same graph again gives the same latents (no state carried between runs)."""
    server, pack, work = host
    need_demo(pack)  # its text encoder makes the 64-wide text states without weights
    sampler = dict(width=32, height=32, num_frames=33, steps=4, cfg=1.0, shift=5.0, seed=7, ar_step=0,
                   causal_block_size=3, base_num_frames=97, overlap_history=17, addnoise_condition=0,
                   solver="unipc", keep_model_loaded=False, cache=["6", 0], causal=["5", 0])
    prompt = {
        "1": {"class_type": "FlowCacheModelLoader", "inputs": {"model_name": CAUSAL_FILE, "dtype": "fp32"}},
        "2": {"class_type": "FlowCacheDemoTextEncode", "inputs": {"prompt": "a red circle bouncing on a blue "
                                                                            "background"}},
        "4": {"class_type": "FlowCacheSampler", "inputs": dict(sampler, model=["1", 0], positive=["2", 0],
                                                               negative=["2", 0])},
        "5": {"class_type": "FlowCacheCausalOptions", "inputs": {"kv_mode": "rolling", "window_frames": 6,
                                                                 "sink_frames": 3, "schedule": "self_forcing"}},
        "6": cache_node("off", "slow"),
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "latents/causal"}},
    }
    latents = []
    for threshold in (0.1, 0.2):  # unused by method off; a changed input makes ComfyUI run the sampler again
        prompt["6"]["inputs"]["threshold"] = threshold
        entry = server.wait_done(server.queue(prompt, client_id=uuid.uuid4().hex))
        errors = [m[1].get("exception_message") for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert entry["status"]["status_str"] == "success", errors or server.log()[-3000:]
        stats = entry["outputs"]["4"]["flowcache_stats"][0]
        assert stats["settings"]["loop"] == "causal" and stats["settings"]["kv_mode"] == "rolling"
        assert stats["forwards"] == 3 * (4 + 1)  # 3 blocks of 4 steps and a clean pass
        notes = entry["outputs"]["1"]["flowcache_notes"]
        assert any("Self-Forcing" in n for n in notes), notes
        (latent,) = entry["outputs"]["7"]["latents"]
        latents.append(read_latent(work / "output" / latent["subfolder"] / latent["filename"]))
    assert latents[0].shape == (1, 16, 9, 4, 4) and torch.equal(latents[0], latents[1])


SHIPPED = sorted((ROOT / "workflows").glob("*.json"))
FILE_WIDGET_NAMES = {"model_name", "lora", "t5_name", "vae_name", "clip_name", "unet_name", "lora_name", "ckpt_name"}


def test_shipped_workflows_validate_in_the_server(host):
    """Every shipped workflow, turned into the API prompt the editor sends (widget values by the server's own
    widget order), passes the server's validation of the V3 nodes: the only complaints are model files this test
    server does not have, refused when queued as V1 combos were (ComfyUI does not check V3 combos itself; the
    nodes' validate_inputs do). (tests/test_browser.py loads each one in the editor itself.)"""
    server, pack, _ = host
    info = http_json(server.url + "/object_info")
    import urllib.error

    for path in SHIPPED:
        if path.stem == "flowcache_demo_cpu":
            continue  # it needs no files, so it would run: see the next test
        prompt = ui_to_api(json.loads(path.read_text(encoding="utf-8")), info)
        assert any(n["class_type"].startswith("FlowCache") for n in prompt.values())
        try:
            answer = http_json(server.url + "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
            pytest.fail(f"{path.name}: queued although its model files are missing: {answer}")
        except urllib.error.HTTPError as e:
            assert e.code == 400
            body = json.loads(e.read().decode())
        problems = []
        for node_id, err in body.get("node_errors", {}).items():
            for item in err["errors"]:
                name, details = item.get("extra_info", {}).get("input_name"), item.get("details", "")
                if item["type"] == "custom_validation_failed":  # the pack's own combo check (check_choices)
                    named = [part.split(":")[0] for part in details.split(" - ", 1)[-1].split("; ")]
                    if set(named) <= FILE_WIDGET_NAMES:
                        continue
                elif item["type"] == "value_not_in_list" and name in FILE_WIDGET_NAMES:  # core V1 loaders
                    continue
                problems.append((path.name, err["class_type"], item["type"], name, details))
        assert body.get("node_errors") and not problems, problems


def test_shipped_demo_workflow_and_an_api_prompt_saved_before_v3_run(host):
    """The shipped CPU demo workflow (converted as the editor does, with the server's V3 node descriptions) and an
    API prompt saved with the V1 nodes before they moved to V3 (tests/data/api_prompt_v1_demo.json: the same graph
    as the pack's V1 nodes turned it into, from before the loader's and cache node's optional widgets existed)
    both run, with the same latents. Both at 8 steps instead of the workflow's 50, to keep the test short."""
    server, pack, work = host
    need_demo(pack)
    why = demo_missing(pack)
    if why:
        pytest.skip(why)
    info = http_json(server.url + "/object_info")
    shipped = ui_to_api(json.loads((ROOT / "workflows" / "flowcache_demo_cpu.json").read_text(encoding="utf-8")), info)
    saved = json.loads((ROOT / "tests" / "data" / "api_prompt_v1_demo.json").read_text(encoding="utf-8"))
    assert set(shipped) == set(saved) and shipped["4"]["inputs"]["steps"] == 50
    shipped["4"]["inputs"]["steps"] = 8
    latents = []
    for name, prompt in (("shipped", shipped), ("saved", saved)):
        prompt = dict(prompt, latent={"class_type": "SaveLatent",
                                      "inputs": {"samples": ["4", 0], "filename_prefix": f"api/{name}"}})
        entry = server.wait_done(server.queue(prompt, client_id=uuid.uuid4().hex))
        errors = [m[1].get("exception_message") for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert entry["status"]["status_str"] == "success", errors
        (video,) = entry["outputs"]["6"]["images"]
        assert video["filename"].endswith(".mp4") and entry["outputs"]["6"]["animated"] == [True]
        assert entry["outputs"]["1"]["flowcache_notes"]  # the loader's notes (V3 ui dict) reach the history
        (item,) = entry["outputs"]["latent"]["latents"]
        latents.append(read_latent(work / "output" / item["subfolder"] / item["filename"]))
    assert latents[0].shape == (1, 32, 36, 8, 8) and torch.equal(latents[0], latents[1])


def test_a_bad_choice_is_refused_when_queued(host):
    """As with the V1 nodes, a combo value that is not one of its options (here a cache method and a model file)
    is refused by POST /prompt with the widget named, before anything runs."""
    server, pack, _ = host
    import urllib.error

    prompt = graph("no_such_model.safetensors", "bad_choice", method="sideways")
    with pytest.raises(urllib.error.HTTPError) as caught:
        http_json(server.url + "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert caught.value.code == 400
    errors = json.loads(caught.value.read().decode())["node_errors"]
    assert "method: 'sideways' is not one of off, teacache, flowcache" in errors["8"]["errors"][0]["details"]
    assert "model_name: 'no_such_model.safetensors' is not one of" in errors["1"]["errors"][0]["details"]
