"""FlowCache Sampler's attention goes through ComfyUI's, in a real ComfyUI server (runs only when COMFYUI_PATH is set).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python python -m pytest tests/test_comfy_attention.py -q

The server runs with --use-pytorch-cross-attention, so ComfyUI's kernel is attention_pytorch (on a CPU ComfyUI
otherwise picks its sub-quadratic kernel, which rounds differently from torch's SDPA). A test node installs an
``optimized_attention_override`` on a MODEL (what attention-patch nodes do) that counts its calls and may scale
the attention's output. The reference is the same sampler run outside the server with the backend switched off:
the core's own SDPA, as before attention went through the host (a subprocess on ComfyUI's Python, so the torch
build and the MODEL's layers are the server's).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_helpers import (COMFYUI_PATH, COMFYUI_PYTHON as PYTHON, NEEDS_COMFYUI, ROOT, TINY_KEY, TINY_PRESETS,
                           host_workdir, import_pack, serve)
from test_comfy_native import DF_FILE, SAMPLER, cond, flowcache_loader, latent, released_tiny_wan, run, save, \
    sampler, unet

pytestmark = NEEDS_COMFYUI

# The sampler of test_comfy_native's graphs, run in ComfyUI's own Python without the server and with the host
# attention switched off; prints the latents' file and the number of SDPA calls as JSON.
CORE_RUN = r'''
import json, sys
tests, work, out = sys.argv[1:4]
sys.path.append(tests)
from comfy.cli_args import args
args.cpu = True
import torch
import torch.nn.functional as F
import comfy.model_management, comfy.sd, folder_paths
from safetensors.torch import save_file
from comfy_helpers import import_pack, node_classes, pack_submodule, run_node
spec = json.loads(sys.stdin.read())
folder_paths.add_model_folder_path("diffusion_models", work + "/diffusion_models")
pack = import_pack()
pack_submodule(pack, "nodes.comfy_bridge").host_attention = lambda options=None: None  # the core's own SDPA
model = comfy.sd.load_diffusion_model(folder_paths.get_full_path("diffusion_models", spec["file"]))

def cond(seed):  # FlowCacheTestConditioning's states
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 12, 4096, generator=g) * 0.5, {}]]

calls, sdpa = [0], F.scaled_dot_product_attention
def counting(*a, **k):
    calls[0] += 1
    return sdpa(*a, **k)
F.scaled_dot_product_attention = counting
res = run_node(node_classes(pack)["FlowCacheSampler"], model=model, positive=cond(1), negative=cond(2),
               unique_id="30", prompt=spec["prompt"], **spec["settings"])
F.scaled_dot_product_attention = sdpa
save_file({"latent_tensor": res["result"][0]["samples"].contiguous()}, out)
print(json.dumps({"sdpa_calls": calls[0], "stats": res["ui"]["flowcache_stats"][0]["attention"]}))
'''


@pytest.fixture(scope="module")
def attn(tmp_path_factory):
    """(server, work dir): ComfyUI (pytorch attention) with this pack, the test nodes and a tiny Wan."""
    work = host_workdir(tmp_path_factory, "comfyattn", ("diffusion_models",))
    pack = import_pack()
    meta = {"flowcache.model_key": TINY_KEY, "flowcache.presets": json.dumps(TINY_PRESETS)}
    save_file(released_tiny_wan(pack), str(work / "diffusion_models" / DF_FILE), metadata=meta)
    for server in serve(work, ("diffusion_models",), extra_args=("--use-pytorch-cross-attention",)):
        yield server, work


def override(model: list, tag: str, scale: float = 1.0) -> dict:
    return {"class_type": "FlowCacheTestAttentionOverride", "inputs": {"model": model, "tag": tag, "scale": scale}}


def graph(model_nodes: dict, model_ref: list, prefix: str, tag: str | None = None) -> dict:
    """model nodes -> FlowCache Sampler (node "30", seeded text states) -> SaveLatent ("9"), and the override's call
    count ("10") when ``tag`` names one."""
    g = {**model_nodes, "20": cond(1), "21": cond(2), "30": sampler(model_ref, ["20", 0], ["21", 0]),
         "9": save(["30", 0], prefix)}
    if tag is not None:
        g["10"] = {"class_type": "FlowCacheTestAttentionCalls", "inputs": {"samples": ["30", 0], "tag": tag}}
    return g


def stats(entry: dict) -> dict:
    return entry["outputs"]["30"]["flowcache_stats"][0]


def core_run(work: Path, prompt: dict) -> tuple[torch.Tensor, dict]:
    """The same sampler run in ComfyUI's Python, outside the server, with the core's own SDPA."""
    out = work / "core_latent.safetensors"
    spec = {"file": DF_FILE, "prompt": prompt, "settings": SAMPLER}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([PYTHON, "-c", CORE_RUN, str(ROOT / "tests"), str(work), str(out)], input=json.dumps(spec),
                       capture_output=True, text=True, cwd=COMFYUI_PATH, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return load_file(str(out))["latent_tensor"], json.loads(r.stdout.strip().splitlines()[-1])


def test_override_sees_every_attention_and_no_override_is_todays_output(attn):
    """No override: ComfyUI's attention_pytorch gives the bits of the core's own SDPA (today's output), in as many
    calls. A recording override is called for every one of them and changes nothing; an override that scales the
    attention's output changes the latents."""
    server, work = attn
    plain_prompt = graph({"1": unet(DF_FILE)}, ["1", 0], "plain")
    plain = run(server, plain_prompt)
    s = stats(plain)
    assert s["attention"]["kernel"] == "attention_pytorch" and s["attention"]["override"] is False
    calls = s["attention"]["calls"]
    assert calls > 0 and "attention: ComfyUI's attention_pytorch" in s["notes"]

    core, info = core_run(work, plain_prompt)
    assert info["stats"] == {"kernel": "sdpa"} and info["sdpa_calls"] == calls
    assert torch.equal(latent(plain, work), core), (latent(plain, work) - core).abs().max()

    rec = run(server, graph({"1": unet(DF_FILE), "2": override(["1", 0], "rec")}, ["2", 0], "rec", tag="rec"))
    assert rec["outputs"]["10"]["attention_calls"] == [calls]
    assert stats(rec)["attention"] == {"kernel": "attention_pytorch", "override": True, "calls": calls}
    assert "attention: the MODEL's optimized_attention_override around ComfyUI's attention_pytorch" in \
        stats(rec)["notes"]
    assert torch.equal(latent(rec, work), latent(plain, work))

    half = run(server, graph({"1": unet(DF_FILE), "2": override(["1", 0], "half", 0.5)}, ["2", 0], "half",
                             tag="half"))
    assert half["outputs"]["10"]["attention_calls"] == [stats(half)["attention"]["calls"]]
    a, b = latent(half, work), latent(plain, work)
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-3


def test_flowcache_loader_model_uses_comfyui_attention(attn):
    """FlowCache Load Model's own model (no MODEL options) runs on ComfyUI's kernel too, with the same result as
    the MODEL of the same file."""
    server, work = attn
    ours = run(server, graph({"1": flowcache_loader(DF_FILE)}, ["1", 0], "loader"))
    native = run(server, graph({"1": unet(DF_FILE)}, ["1", 0], "native"))
    assert stats(ours)["attention"] == dict(stats(native)["attention"], override=False)
    assert stats(ours)["attention"]["kernel"] == "attention_pytorch"
    assert torch.equal(latent(ours, work), latent(native, work))


def test_patches_not_applied_are_named_on_the_node(attn):
    """ModelSamplingSD3 (an object patch), EasyCache (wrappers and a transformer_options entry) and a block
    replacement on the MODEL: the run goes on, and the node's note and notes name each as not applied."""
    server, work = attn
    nodes = {"1": unet(DF_FILE),
             "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 5.0}},
             "3": {"class_type": "EasyCache", "inputs": {"model": ["2", 0], "reuse_threshold": 0.2,
                                                         "start_percent": 0.15, "end_percent": 0.95,
                                                         "verbose": False}},
             "4": {"class_type": "FlowCacheTestBlockPatch", "inputs": {"model": ["3", 0]}},
             "5": override(["4", 0], "patched")}
    entry = run(server, graph(nodes, ["5", 0], "patched", tag="patched"))
    s = stats(entry)
    note, notes = s["note"], " | ".join(s["notes"])
    for text in (note, notes):
        assert "patches_replace dit double_block 0: not applied" in text
        assert "outer_sample (easycache)" in text and "diffusion_model (easycache)" in text
        assert "transformer_options easycache: not read by FlowCache" in text
        assert "model_sampling patch: not applied" in text
    assert "optimized_attention_override" not in note  # applied, so not in the list of what was not
    assert entry["outputs"]["10"]["attention_calls"] == [s["attention"]["calls"]] and s["attention"]["override"]
    plain = run(server, graph({"1": unet(DF_FILE)}, ["1", 0], "plain_again"))
    assert "not applied" not in stats(plain)["note"] and not any("not applied" in n for n in stats(plain)["notes"])
