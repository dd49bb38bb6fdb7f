"""The pack in a real ComfyUI, driven through its frontend in headless Chromium (tests/browser/flowcache_browser.js).

Runs only when COMFYUI_PATH points to a ComfyUI checkout (COMFYUI_PYTHON: its interpreter, default this one), and
skips when chromium, node or playwright-core (PLAYWRIGHT_CORE_DIR, default /tmp/pw/node_modules) is missing:

    COMFYUI_PATH=/tmp/comfyui COMFYUI_PYTHON=/tmp/comfyvenv/bin/python python -m pytest tests/test_browser.py -q

The server is started with the pack symlinked into a temporary custom_nodes folder (--extra-model-paths-config),
under a folder name different from the pyproject name so the web folder is served twice (see flowcache.js).
Every shipped workflow is loaded the way the Templates dialog does (GET /api/workflow_templates/<pack>/<name>.json,
app.loadGraphData) and checked for missing-node dialogs, warning toasts and widget mismatches; then the CPU demo
workflow is queued and the test waits for the mp4 <video> preview and the per-chunk compute/reuse map. FlowCache
Cache's preset lock is driven by hand (a calibrated file's own numbers from the server, custom, off, unplugged), and
a small run without a cache node shows the sampler's note and FlowCache Load Model's notes (what it decided), which
picking another model hides.
Screenshots go to tests/artifacts/browser/ (gitignored).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flowcache.presets import NAMED_PRESETS

from comfy_helpers import (TINY_KEY, TINY_PRESETS, ComfyServer, demo_available, http_json, import_pack,
                           write_tiny_wan)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "browser" / "flowcache_browser.js"
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
PACK_NAME = "ComfyUI-FlowCache"
# the shipped workflows (test_workflows.py pins the list): the server must list and load every one
EXPECTED = {p.stem for p in (ROOT / "workflows").glob("*.json")}
NEEDS_MODEL_FILES = EXPECTED - {"flowcache_demo_cpu"}
NODE_TYPES = {"FlowCacheSampler", "FlowCacheCache", "FlowCacheModelLoader", "FlowCacheDecode", "FlowCacheVideoCombine",
              "FlowCacheDemoTextEncode", "FlowCacheDecodeSave", "FlowCacheMagiTextEncode", "FlowCacheMagiVAELoader",
              "FlowCacheCausalOptions", "FlowCachePromptSchedule"}
DEMO_ASSETS = ROOT / "flowcache" / "demo" / "assets"
# Page noise of frontend 1.27.10 with no network (comfyui-host.md §8.4): not ours, ignored.
BENIGN = ("Cannot read properties of undefined (reading 'id')", "ERR_NAME_NOT_RESOLVED", "Error fetching file size",
          "Failed to fetch", "status of 404", "ERR_INTERNET_DISCONNECTED", "api.comfy.org", "huggingface.co/",
          "user.css", "/api/userdata", "comfy.templates.json")

CALIBRATED = "my_finetune.safetensors"
CALIBRATED_FAST = {"threshold": 0.123, "warmup": 2, "kv_budget": 1}
KNOBS = ("threshold", "warmup_steps", "kv_budget", "mix_lambda")
# a small model in the demo's latent space (the demo text encoder and codec serve it): a run in seconds
TINY_DEMO_SPACE = "tiny_demo_space.safetensors"
DEMO_GEOMETRY = {"temporal_stride": 1, "spatial_stride": 8, "channels": 32, "position_channels": 2}
COMFY = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout to run the browser tests")]


def _tools() -> dict:
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium and not Path(chromium).is_file():
        chromium = None
    node = shutil.which("node")
    pw = Path(os.environ.get("PLAYWRIGHT_CORE_DIR", "/tmp/pw/node_modules"))
    missing = [name for name, ok in (("chromium", chromium), ("node", node),
                                     (f"playwright-core in {pw}", (pw / "playwright-core" / "package.json").is_file()))
               if not ok]
    if missing:
        pytest.skip("missing " + ", ".join(missing))
    return {"chromium": chromium, "node": node, "pw": str(pw)}


@pytest.fixture(scope="module")
def tools():
    return _tools()


@pytest.fixture(scope="module")
def server(tools):
    comfy = Path(COMFY)
    if not (comfy / "main.py").is_file():
        pytest.skip(f"COMFYUI_PATH={COMFY} has no main.py")
    if not (ROOT / "__init__.py").is_file():
        pytest.skip("the pack has no __init__.py yet")
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    work = Path(tempfile.mkdtemp(prefix="flowcache_browser_"))
    (work / "custom_nodes").mkdir()
    (work / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
    (work / "output").mkdir()
    # a calibrated model under a name that says nothing of its family: the cache node must show the values of its
    # .presets.json, which only the server can read (GET /flowcache/model_presets)
    pack = import_pack()
    write_tiny_wan(work / "diffusion_models" / CALIBRATED, pack)
    if demo_available(pack):
        write_tiny_wan(work / "diffusion_models" / TINY_DEMO_SPACE, pack, text_dim=64, text_len=16, dim=64, layers=3,
                       heads=2, latent_format="demo", geometry=DEMO_GEOMETRY)
    row = json.loads(json.dumps(TINY_PRESETS[TINY_KEY]))
    row["flowcache"]["fast"] = CALIBRATED_FAST
    (work / "diffusion_models" / CALIBRATED.replace(".safetensors", ".presets.json")).write_text(
        json.dumps({TINY_KEY: row}))
    extra = work / "extra_model_paths.yaml"
    extra.write_text(f"flowcache_test:\n  base_path: {work}\n  custom_nodes: custom_nodes\n"
                     f"  diffusion_models: diffusion_models\n")
    srv = ComfyServer(comfy, python, work, extra, work / "output")
    try:
        srv.start(timeout=180)
        # hide the first-run "Get Started with a Template" dialog (a per-user setting)
        http_json(srv.url + "/api/settings/Comfy.TutorialCompleted", True)
        srv.work = work
        yield srv
    finally:
        srv.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy(srv.log_path, ARTIFACTS / "comfyui.log")
        except OSError:
            pass
        shutil.rmtree(work, ignore_errors=True)


def drive(server, tools, *, run_demo: bool = False, timeout: int = 1500, mode: str = "check", **env) -> dict:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, COMFY_URL=server.url, PACK_NAME=PACK_NAME, OUT_DIR=str(ARTIFACTS),
                    PLAYWRIGHT_CORE_DIR=tools["pw"], CHROMIUM=tools["chromium"], RUN_DEMO="1" if run_demo else "0",
                    **env)
    r = subprocess.run([tools["node"], str(SCRIPT), mode], capture_output=True, text=True, timeout=timeout,
                       env=full_env, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"browser script failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    (ARTIFACTS / f"result_{'demo' if run_demo else mode}.json").write_text(json.dumps(result, indent=1))
    return result


def ours(logs: list[str]) -> list[str]:
    """Page errors, console warnings and failed requests that are not the frontend's known offline noise.

    Failed requests are logged with their URL ("http 404 <url>"), so a 404 of one of our files is still caught.
    A media request the browser itself cancels (the <video> preview re-fetching its mp4) is not an error.
    """
    def cancelled_media(ln: str) -> bool:
        return ln.startswith("requestfailed ") and "/api/view?" in ln and ln.endswith("net::ERR_ABORTED")

    return [ln for ln in logs if not cancelled_media(ln)
            and ("flowcache" in ln.lower() or not any(b in ln for b in BENIGN))]


def test_extension_and_workflows_in_the_editor(server, tools):
    listing = http_json(server.url + "/workflow_templates")
    assert set(listing.get(PACK_NAME, [])) == EXPECTED, listing
    result = drive(server, tools, timeout=600)
    # the cache node's API-prompt inputs: every input the server declares for it (its widgets)
    cache_def = http_json(server.url + "/object_info/FlowCacheCache")["FlowCacheCache"]["input"]
    cache_inputs = {*cache_def.get("required", {}), *cache_def.get("optional", {})}
    assert {"method", "preset", *KNOBS} <= cache_inputs, cache_inputs

    ext = result["extension"]
    assert ext["registered"] == 1, "FlowCache.UI must register exactly once even when web/ is served twice"
    assert len(result["extensionUrls"]) >= 1, result["extensionUrls"]
    assert ext["ready"] and not ext["errors"], ext
    assert set(ext["types"]) == NODE_TYPES
    assert set(result["templates"]) == EXPECTED

    problems = []
    for wf in result["workflows"]:
        name = wf["name"]
        if wf.get("error"):
            problems.append(f"{name}: {wf['error']}")
            continue
        assert wf["thumb"]["status"] == 200 and "jpeg" in (wf["thumb"]["type"] or ""), (name, wf["thumb"])
        for text in wf["popups"]["dialogs"]:
            if "Missing Models" in text and name in NEEDS_MODEL_FILES:
                continue  # the model files are not in this test's models folder; the dialog offers the downloads
            problems.append(f"{name}: dialog {text[:160]!r}")
        for toast in wf["popups"]["toasts"]:
            if toast["severity"] in ("warn", "error"):
                problems.append(f"{name}: {toast['severity']} toast {toast['text'][:160]!r}")
        if wf["links"] != wf["fileLinks"]:
            problems.append(f"{name}: {wf['links']} links in the editor, {wf['fileLinks']} in the file")
        caches = [n for n in wf["nodes"] if n["type"] == "FlowCacheCache"]
        if len(caches) != 1:
            problems.append(f"{name}: {len(caches)} FlowCache Cache nodes")
        for node in wf["nodes"]:
            problems += [f"{name}: node {node['id']} {node['type']}: {p}" for p in node["problems"]]
            if node["type"] == "FlowCacheSampler" and set(node["widgetsOnSampler"]) & set(KNOBS + ("cache", "preset")):
                problems.append(f"{name}: cache widgets on the sampler {node['widgetsOnSampler']}")
            if node["type"] != "FlowCacheCache":
                continue
            fc = node["fc"] or {}
            named = node["preset"] in NAMED_PRESETS or node["method"] == "off"
            if set(node["locked"].values()) != {named}:
                problems.append(f"{name}: {node['method']}/{node['preset']} but locked={node['locked']}")
            if node["method"] == "off" or node["preset"] not in NAMED_PRESETS:
                continue
            if name in NEEDS_MODEL_FILES:
                # the file is not in this server's models folder: locked, no numbers, the model decides at run time
                if fc.get("source") != "model" or set(node["shown"].values()) != {"from model"}:
                    problems.append(f"{name}: expected 'from model' without the file, got {fc} {node['shown']}")
            elif not fc.get("known") or fc.get("source") != "server" or fc.get("key") != "demo":
                problems.append(f"{name}: the extension found no preset values for {fc}")
            elif any(not str(v).replace(".", "").isdigit() for v in node["shown"].values()):
                problems.append(f"{name}: locked values not shown as numbers {node['shown']}")
        prompt = wf["prompt"]
        if "error" in prompt:
            problems.append(f"{name}: graphToPrompt failed: {prompt['error']}")
        else:
            for nid, entry in prompt.items():
                inputs = set(entry["inputs"])
                if entry["class_type"] == "FlowCacheSampler" and (inputs & set(KNOBS + ("preset", "flowcache_map"))
                                                                  or "cache" not in inputs):
                    problems.append(f"{name}: sampler prompt inputs {sorted(inputs)}")
                if entry["class_type"] == "FlowCacheCache" and inputs != cache_inputs:
                    problems.append(f"{name}: cache node prompt inputs {sorted(inputs)}")
    # the preset lock on FlowCache Cache follows its widgets and the model the sampler it feeds uses
    it = result["interaction"]
    st = it["start"]  # SkyReels file not in the models folder: the server does not know it
    assert st["locked"] and st["shown"] == "from model" and st["fc"]["source"] == "model", st
    assert "run time" in st["fc"]["text"], st
    ff = it["fromFile"]  # a calibrated file: the values come from its .presets.json through the server
    assert ff["answer"]["key"] == TINY_KEY and ff["fc"]["source"] == "server" and ff["fc"]["key"] == TINY_KEY, ff
    assert (ff["threshold"], ff["warmup"], ff["kv"], ff["locked"]) == (0.123, 2, 1, True), ff
    assert ff["shown"] == "0.123" and ff["shownKv"] == "1", ff
    assert it["custom"]["unlocked"] and it["custom"]["threshold"] == 0.123 and it["custom"]["fc"]["source"] == "custom", it
    assert it["customEdited"]["threshold"] == 0.3 and it["customEdited"]["unlocked"], it
    slow = TINY_PRESETS[TINY_KEY]["flowcache"]["slow"]
    assert it["slow"]["locked"] and (it["slow"]["threshold"], it["slow"]["warmup"], it["slow"]["kv"]) == \
        (slow["threshold"], slow["warmup"], slow["kv_budget"]), it["slow"]
    tea = TINY_PRESETS[TINY_KEY]["teacache"]["fast"]
    assert it["teacacheFast"]["locked"] and it["teacacheFast"]["threshold"] == tea["threshold"], it["teacacheFast"]
    assert it["off"]["locked"] and it["off"]["shown"] == "unused" and it["off"]["fc"]["source"] == "off", it["off"]
    assert it["flowcacheFast"]["threshold"] == 0.123 and it["flowcacheFast"]["locked"], it["flowcacheFast"]
    pr = it["prompt"]
    assert pr["samplerCache"] == [pr["cacheId"], 0], pr
    assert pr["cacheInputs"]["method"] == "flowcache" and pr["cacheInputs"]["preset"] == "fast", pr
    un = it["unlinked"]
    assert un["locked"] and un["shown"] == "from model" and un["fc"]["reason"] == "unlinked", un
    problems += [f"page: {ln}" for ln in ours(result["logs"])]
    assert not problems, "\n".join(problems)
    for name in EXPECTED:
        assert (ARTIFACTS / f"loaded_{name}.png").is_file()


def test_video_combine_mp4_plays_in_place(server, tools):
    """No extension JS is involved: {"images": [mp4], "animated": [true]} gets the stock <video> preview."""
    result = drive(server, tools, mode="video", timeout=300)
    assert not result["errors"], result["errors"]
    (out,) = [e["output"] for e in result["executed"] if e.get("output", {}).get("images")]
    assert out["animated"] == [True] and out["images"][0]["filename"].endswith(".mp4"), out
    videos = [v for v in result["videos"] if ".mp4" in (v["src"] or "")]
    assert videos and videos[0]["ready"] >= 2 and videos[0]["visible"], result["videos"]
    assert (videos[0]["w"], videos[0]["h"]) == (64, 48) and videos[0]["controls"], videos[0]
    assert result["previewWidgets"] and result["previewWidgets"][0]["media"] == "video", result["previewWidgets"]
    assert list((server.work / "output").rglob("smoke_*.mp4"))


def _demo_ready() -> str | None:
    dit, text = DEMO_ASSETS / "demo_dit.safetensors", DEMO_ASSETS / "demo_text.safetensors"
    if not (dit.is_file() and text.is_file()):
        return "the demo model assets are not there"
    try:
        from safetensors import safe_open
        with safe_open(str(dit), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - an unreadable asset is reported as a skip reason
        return f"the demo model cannot be read: {e}"
    if "flowcache.presets" not in meta:
        return "the demo model has no embedded cache presets yet (run `python -m flowcache calibrate --embed`)"
    return None


def test_demo_workflow_runs_with_video_and_map(server, tools):
    why = _demo_ready()
    if why:
        pytest.skip(why)
    result = drive(server, tools, run_demo=True, WORKFLOWS="flowcache_demo_cpu",
                   RUN_TIMEOUT_S=os.environ.get("FLOWCACHE_DEMO_TIMEOUT_S", "1200"))
    demo = result["demo"]
    assert not demo["errors"], json.dumps(demo["errors"], indent=1)[:4000]
    # live progress reached the node while sampling
    assert demo["progressSeen"] and "window" in demo["progressSeen"]["text"], demo["progressSeen"]
    assert demo["progressSeen"]["drawn"]
    # the per-chunk map was drawn: 2 windows x 5 chunks x 50 steps for the demo settings
    drawn = demo["drawn"]
    assert drawn, f"no map drawn after {demo['seconds']} s: {demo}"
    assert (drawn["windows"], drawn["chunks"], drawn["steps"]) == (2, 5, 50), drawn
    assert demo["mapsAttr"] == "1"
    # the cache node is connected: no note on the sampler
    assert demo["note"] == "" and drawn["note"] == "", (demo["note"], drawn)
    (loaded,) = [w for w in result["workflows"] if w["name"] == "flowcache_demo_cpu"]
    (cache,) = [n for n in loaded["nodes"] if n["type"] == "FlowCacheCache"]
    assert cache["fc"]["source"] == "server" and cache["fc"]["key"] == "demo" and all(cache["locked"].values()), cache
    stats = demo["stats"]
    assert stats["windows"] == 2 and stats["computed"] > 0 and stats["flops_speedup"] >= 1.0, stats
    # the mp4 plays in place in the stock <video> preview
    videos = [v for v in demo["videos"] if ".mp4" in (v["src"] or "")]
    assert videos, demo["videos"]
    v = videos[0]
    assert v["ready"] >= 2 and v["visible"] and (v["w"], v["h"]) == (64, 64), v
    assert list((server.work / "output").rglob("*.mp4")), "no mp4 in the output folder"
    assert not demo["extErrorsAfter"], demo["extErrorsAfter"]
    assert Path(demo["screenshot"]).is_file()
    assert not [ln for ln in ours(result["logs"]) if "FlowCache" in ln or "flowcache" in ln], result["logs"]


def test_sampler_note_without_a_cache_node(server, tools):
    """The demo workflow with its cache node removed, on a small model: the run says it used FlowCache slow."""
    if not (server.work / "diffusion_models" / TINY_DEMO_SPACE).is_file():
        pytest.skip("flowcache.demo is not installed: no demo text encoder and codec for the small model")
    result = drive(server, tools, mode="note", timeout=600, NOTE_MODEL=TINY_DEMO_SPACE, NOTE_STEPS="6",
                   RUN_TIMEOUT_S="300")
    assert not result["errors"], json.dumps(result["errors"], indent=1)[:4000]
    assert "FlowCacheCache" not in result["prompt"] and "FlowCacheSampler" in result["prompt"], result["prompt"]
    assert result["note"] and result["note"].startswith("no cache node connected"), result["note"]
    drawn = result["drawn"]
    assert drawn and drawn["note"].startswith("no cache node connected") and drawn["windows"] == 2, drawn
    # FlowCache Load Model ran: its decisions are drawn on it, and picking another model hides them
    ln = result["loaderNotes"]
    assert ln["after"]["notes"] and any("diffusion forcing loop" in n for n in ln["after"]["notes"]), ln
    assert ln["after"]["drawnLines"] >= len(ln["after"]["notes"]) + 1 and ln["after"]["height"] > 0, ln  # + title
    assert ln["after"]["widgetSerialized"] is False, ln
    assert ln["cleared"]["notes"] is None and ln["cleared"]["height"] == 0 and ln["cleared"]["drawnLines"] == 0, ln
    assert "flowcache_notes" not in ln["promptInputs"], ln["promptInputs"]
    assert not result["extErrorsAfter"], result["extErrorsAfter"]
    assert not [ln for ln in ours(result["logs"]) if "flowcache" in ln.lower()], result["logs"]
