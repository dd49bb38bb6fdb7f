"""ComfyUI's own MODEL on FlowCache Sampler, in a real ComfyUI server (runs only when COMFYUI_PATH is set).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python python -m pytest tests/test_comfy_native.py -q

Tiny models in the released layouts (SkyReels-V2-DF-1.3B's key names, fps keys included; dim 128 so that
ComfyUI's own detection, which assumes 128-wide heads, builds them), all run through ``POST /prompt`` on the CPU:
Load Diffusion Model -> FlowCache Sampler against FlowCache Load Model -> FlowCache Sampler, LoRA against merged
weights, ComfyUI's partial loading against a full load, one MODEL shared with a native KSampler, and a GGUF from
ComfyUI-GGUF (skipped without that pack). ``tests/host_test_nodes`` supplies seeded text states (a real umT5-XXL
is 11 GB) and a weight budget that sends ComfyUI's loader down its lowvram path on a CPU.
"""
from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_helpers import (COMFYUI_PYTHON, NEEDS_COMFYUI, TINY_KEY, TINY_PRESETS, ComfyServer, host_workdir, http_json,
                           import_pack, pack_submodule, serve)

pytestmark = NEEDS_COMFYUI
FOLDERS = ("diffusion_models", "loras", "text_encoders")

DF_FILE = "tiny_skyreels_df.safetensors"
MERGED_FILE = "tiny_skyreels_df_lora_merged.safetensors"
GGUF_F32 = "tiny_skyreels_df_f32.gguf"
GGUF_Q8_NO_FPS = "tiny_skyreels_df_q8_0_nofps.gguf"
LORA, LORA_NOMATCH = "tiny_lora.safetensors", "tiny_lora_nomatch.safetensors"
LORA_STRENGTH, LORA_RANK, LORA_ALPHA = 0.8, 4, 2.0
LORA_TARGETS = ("self_attn.q", "self_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
SAMPLER = dict(width=64, height=64, num_frames=21, steps=6, cfg=4.0, shift=5.0, seed=3, ar_step=2,
               causal_block_size=2, base_num_frames=21, overlap_history=5, addnoise_condition=20, solver="unipc",
               keep_model_loaded=False)

GGUF_WRITER = r'''
import sys, gguf, numpy as np
from safetensors.torch import load_file
src, dst, quant, keep_fps = sys.argv[1], sys.argv[2], sys.argv[3] == "q8_0", sys.argv[4] == "1"
w = gguf.GGUFWriter(dst, arch="wan")  # as ComfyUI-GGUF's tools/convert.py (+ fix_5d_tensors.py) write them
w.add_quantization_version(gguf.GGML_QUANT_VERSION)
for key, t in load_file(src).items():
    if key.startswith("fps_") and not keep_fps:
        continue
    data = t.float().numpy()
    big = data.ndim == 2 and data.size > 1024 and ".modulation" not in key
    qtype = gguf.GGMLQuantizationType.Q8_0 if (quant and big) else gguf.GGMLQuantizationType.F32
    w.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
'''


def released_tiny_wan(pack, seed: int = 0) -> dict[str, torch.Tensor]:
    """SkyReels-V2-DF-1.3B's layout at toy size: bare keys, fps embedding, umT5 width 4096, 256-d sinusoid."""
    wan = pack_submodule(pack, "flowcache.models.wan")
    cfg = wan.WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=4096, freq_dim=256, has_fps=True)
    gen = torch.Generator().manual_seed(seed)
    model = wan.WanDiT(cfg)
    return {k: (torch.randn(v.shape, generator=gen) * 0.05).contiguous() for k, v in model.state_dict().items()}


def tiny_lora(sd: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for b in range(2):
        for target in LORA_TARGETS:
            w = sd[f"blocks.{b}.{target}.weight"]
            key = f"diffusion_model.blocks.{b}.{target}"
            out[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], LORA_RANK, generator=gen) * 0.1
            out[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, w.shape[1], generator=gen) * 0.1
            out[f"{key}.alpha"] = torch.tensor(LORA_ALPHA)
    return out


def merge(sd: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """The LoRA merged into the weights, in the arithmetic order of ComfyUI's ``calculate_weight``."""
    out = dict(sd)
    for k in lora:
        if k.endswith(".lora_up.weight"):
            base = k[len("diffusion_model."):-len(".lora_up.weight")]
            up, down = lora[k], lora[k.replace("lora_up", "lora_down")]
            alpha = float(lora[k.replace(".lora_up.weight", ".alpha")]) / down.shape[0]
            out[base + ".weight"] = sd[base + ".weight"] + (strength * alpha) * torch.mm(up.flatten(1), down.flatten(1))
    return out


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """(server, pack, work dir): ComfyUI with this pack, the test nodes and tiny models; killed afterwards."""
    python = COMFYUI_PYTHON
    work = host_workdir(tmp_path_factory, "comfynative", FOLDERS)
    pack = import_pack()
    # no flowcache.text_len: 512 text rows, as in the released files (a GGUF has no metadata to say otherwise)
    meta = {"flowcache.model_key": TINY_KEY, "flowcache.presets": json.dumps(TINY_PRESETS)}
    sd = released_tiny_wan(pack)
    models = work / "diffusion_models"
    save_file(sd, str(models / DF_FILE), metadata=meta)
    lora = tiny_lora(sd)
    save_file(lora, str(work / "loras" / LORA))
    save_file(merge(sd, lora, LORA_STRENGTH), str(models / MERGED_FILE), metadata=meta)
    save_file({"diffusion_model.no_such_layer.lora_up.weight": torch.ones(4, 2),
               "diffusion_model.no_such_layer.lora_down.weight": torch.ones(2, 4)}, str(work / "loras" / LORA_NOMATCH))
    for name, quant, fps in ((GGUF_F32, "f32", "1"), (GGUF_Q8_NO_FPS, "q8_0", "0")):
        r = subprocess.run([python, "-c", GGUF_WRITER, str(models / DF_FILE), str(models / name), quant, fps],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:  # no gguf package in ComfyUI's environment: the GGUF test skips
            (models / name).unlink(missing_ok=True)
    try:  # tiny MAGI-1 files; the T5 has the real vocabulary size, for ComfyUI's own T5 tokenizer file
        from test_nodes_magi import write_tiny_magi_files
        write_tiny_magi_files(work, vocab=32128)
    except ImportError:  # no `tokenizers` here: the MAGI-1 test skips
        pass
    for server in serve(work, FOLDERS):
        yield server, pack, work


# -- graphs --------------------------------------------------------------------------------------------------

def unet(name: str, weight_dtype: str = "default") -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": weight_dtype}}


def flowcache_loader(name: str) -> dict:
    return {"class_type": "FlowCacheModelLoader", "inputs": {"model_name": name, "dtype": "auto"}}


def lora_node(model: list, name: str, strength: float = LORA_STRENGTH) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": name,
                                                            "strength_model": strength}}


def cond(seed: int, after: list | None = None) -> dict:
    inputs = {"seed": seed, "tokens": 12, "width": 4096}
    if after is not None:
        inputs["after"] = after
    return {"class_type": "FlowCacheTestConditioning", "inputs": inputs}


def sampler(model: list, positive: list, negative: list, cache: list | None = None) -> dict:
    inputs = dict(SAMPLER, model=model, positive=positive, negative=negative)
    if cache is not None:
        inputs["cache"] = cache
    return {"class_type": "FlowCacheSampler", "inputs": inputs}


def save(samples: list, prefix: str) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": f"native/{prefix}"}}


def graph(model_nodes: dict, model_ref: list, prefix: str, cache: dict | None = None) -> dict:
    """model nodes -> FlowCache Sampler (seeded text states) -> SaveLatent (node "9")."""
    g = {**model_nodes, "20": cond(1), "21": cond(2),
         "30": sampler(model_ref, ["20", 0], ["21", 0], ["31", 0] if cache else None), "9": save(["30", 0], prefix)}
    if cache:
        g["31"] = {"class_type": "FlowCacheCache", "inputs": cache}
    return g


def run(server: ComfyServer, prompt: dict) -> dict:
    entry = server.wait_done(server.queue(prompt, client_id=uuid.uuid4().hex))
    errors = [m[1].get("exception_message") for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", errors or server.log()[-3000:]
    return entry


def latent(entry: dict, work: Path, node: str = "9") -> torch.Tensor:
    (item,) = entry["outputs"][node]["latents"]
    return load_file(str(work / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def log_since(server: ComfyServer, mark: int) -> str:
    return server.log()[mark:]


# -- tests -----------------------------------------------------------------------------------------------------

def test_sampler_accepts_both_model_types(native):
    server, _, _ = native
    spec = http_json(server.url + "/object_info/FlowCacheSampler")["FlowCacheSampler"]["input"]
    assert spec["required"]["model"][0] == "FLOWCACHE_MODEL,MODEL"
    assert spec["hidden"] == {"unique_id": ["UNIQUE_ID"], "prompt": ["PROMPT"]}


def test_unet_loader_model_equals_flowcache_loader(native):
    """Load Diffusion Model's MODEL (ComfyUI's layers, fps keys dropped by ComfyUI and restored from the file)
    gives the same latents as FlowCache Load Model on the same file."""
    server, _, work = native
    mark = len(server.log())
    native_run = run(server, graph({"1": unet(DF_FILE)}, ["1", 0], "unet"))
    log = log_since(server, mark)
    assert "unet unexpected" in log and "fps_embedding.weight" in log  # ComfyUI's own drop ...
    assert f"restored SkyReels' fps embedding from {DF_FILE}" in log   # ... and the pack's restore
    ours = run(server, graph({"1": flowcache_loader(DF_FILE)}, ["1", 0], "loader"))
    a, b = latent(native_run, work), latent(ours, work)
    assert a.shape == (1, 16, 6, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b), (a - b).abs().max()
    sa, sb = native_run["outputs"]["30"]["flowcache_stats"][0], ours["outputs"]["30"]["flowcache_stats"][0]
    assert sa["mode"] == "flowcache" and sa["forwards"] == sb["forwards"] and sa["maps"] == sb["maps"]


def test_lora_changes_the_output_as_merged_weights_do(native):
    server, _, work = native
    with_lora = run(server, graph({"1": unet(DF_FILE), "2": lora_node(["1", 0], LORA)}, ["2", 0], "lora"))
    merged = run(server, graph({"1": flowcache_loader(MERGED_FILE)}, ["1", 0], "merged"))
    base = run(server, graph({"1": unet(DF_FILE)}, ["1", 0], "unet"))
    a, b, c = latent(with_lora, work), latent(merged, work), latent(base, work)
    assert (a - c).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_lora_matching_nothing_warns_and_the_run_goes_on(native):
    server, _, work = native
    mark = len(server.log())
    entry = run(server, graph({"1": unet(DF_FILE), "2": lora_node(["1", 0], LORA_NOMATCH)}, ["2", 0], "nomatch"))
    assert "lora key not loaded: diffusion_model.no_such_layer" in log_since(server, mark)
    base = run(server, graph({"1": unet(DF_FILE)}, ["1", 0], "unet"))
    assert torch.equal(latent(entry, work), latent(base, work))


@pytest.mark.parametrize("source", ["unet+lora", "flowcache_loader"])
def test_partial_load_equals_full_load(native, source):
    """ComfyUI's lowvram path (most layers left where they are stored, cast and LoRA-patched at use) gives the
    same latents as a full load, for a MODEL with a LoRA and for FlowCache Load Model's own model."""
    server, _, work = native
    budget = 600_000  # bytes: the text embedding (2 MB) does not fit, ~1/8 of the 4.6 MB of weights does
    if source == "unet+lora":
        nodes, slot = {"1": unet(DF_FILE), "2": lora_node(["1", 0], LORA)}, 0
        full_ref = ["2", 0]
    else:
        nodes, slot = {"1": flowcache_loader(DF_FILE)}, 1
        full_ref = ["1", 0]
    full = run(server, graph(nodes, full_ref, f"full_{slot}"))
    mark = len(server.log())
    partial_nodes = {**nodes, "5": {"class_type": "FlowCacheTestWeightBudget",
                                    "inputs": {"model": full_ref, "bytes": budget}}}
    partial = run(server, graph(partial_nodes, ["5", slot], f"partial_{slot}"))
    log = log_since(server, mark)
    assert "loaded partially" in log, log[-2000:]
    if source == "unet+lora":  # LoRA patches applied at use by layers left behind (the last number logged)
        line = next(l for l in log.splitlines() if "loaded partially" in l)
        assert int(line.split()[-1]) > 0, line
    assert torch.equal(latent(partial, work), latent(full, work))


def test_one_model_feeds_flowcache_and_a_native_ksampler(native):
    """The same MODEL object into FlowCache Sampler and KSampler in one graph: neither output changes."""
    server, _, work = native
    ks = {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 5, "steps": 3, "cfg": 3.0,
                                               "sampler_name": "euler", "scheduler": "simple",
                                               "positive": ["40", 0], "negative": ["41", 0],
                                               "latent_image": ["42", 0], "denoise": 1.0}}
    empty = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                 "batch_size": 1}}
    alone = run(server, {"1": unet(DF_FILE), "40": cond(1), "41": cond(2), "42": empty, "43": ks,
                         "44": save(["43", 0], "ksampler_alone")})
    # FlowCache Sampler first, then KSampler (its text states wait for FlowCache's latents)
    both = {**graph({"1": unet(DF_FILE)}, ["1", 0], "flowcache_first"), "40": cond(1, ["30", 0]), "41": cond(2),
            "42": empty, "43": ks, "44": save(["43", 0], "ksampler_after")}
    both = run(server, both)
    assert torch.equal(latent(both, work, "44"), latent(alone, work, "44"))
    # KSampler first, then FlowCache Sampler (its text states wait for KSampler's latents)
    flipped = {"1": unet(DF_FILE), "40": cond(1), "41": cond(2), "42": empty, "43": ks,
               "44": save(["43", 0], "ksampler_first"), "20": cond(1, ["43", 0]), "21": cond(2),
               "30": sampler(["1", 0], ["20", 0], ["21", 0]), "9": save(["30", 0], "flowcache_after")}
    flipped = run(server, flipped)
    assert torch.equal(latent(flipped, work, "9"), latent(both, work, "9"))
    assert torch.equal(latent(flipped, work, "44"), latent(alone, work, "44"))


def test_fp8_storage_of_a_unet_loader_model_runs(native):
    """UNETLoader's weight_dtype fp8_e4m3fn: weights stay fp8 and ComfyUI's layers upcast them at use."""
    server, _, work = native
    fp8 = run(server, graph({"1": unet(DF_FILE, "fp8_e4m3fn")}, ["1", 0], "fp8"))
    full = run(server, graph({"1": unet(DF_FILE)}, ["1", 0], "unet"))
    a, b = latent(fp8, work), latent(full, work)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    assert (a - b).abs().mean() < 0.1 * b.abs().mean()  # fp8 rounding of 0.05-scale weights, not another model


def test_gguf_model_runs(native):
    """ComfyUI-GGUF's UnetLoaderGGUF: an all-F32 GGUF with the fps keys equals the safetensors file; a Q8_0 GGUF
    without them runs with a warning saying what the output loses."""
    server, _, work = native
    if "UnetLoaderGGUF" not in http_json(server.url + "/object_info"):
        pytest.skip("ComfyUI-GGUF is not installed in this ComfyUI")
    if not (work / "diffusion_models" / GGUF_F32).is_file():
        pytest.skip("no gguf package in ComfyUI's environment to write the test file")
    gguf_loader = lambda name: {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}  # noqa: E731
    # a GGUF has no metadata, so no presets row: the same custom numbers for every run compared here
    custom = {"method": "flowcache", "preset": "custom", "threshold": 0.05, "warmup_steps": 1, "kv_budget": 0,
              "mix_lambda": 0.07, "max_skips": 3, "attention": "auto"}
    mark = len(server.log())
    f32 = run(server, graph({"1": gguf_loader(GGUF_F32)}, ["1", 0], "gguf_f32", cache=custom))
    assert f"restored SkyReels' fps embedding from {GGUF_F32}" in log_since(server, mark)
    base = run(server, graph({"1": unet(DF_FILE)}, ["1", 0], "unet_custom", cache=custom))
    torch.testing.assert_close(latent(f32, work), latent(base, work), rtol=0, atol=1e-5)
    mark = len(server.log())
    q8 = run(server, graph({"1": gguf_loader(GGUF_Q8_NO_FPS)}, ["1", 0], "gguf_q8", cache=custom))
    log = log_since(server, mark)
    assert f"{GGUF_Q8_NO_FPS} has no fps embedding" in log and "fps conditioning" in log
    a = latent(q8, work)
    assert torch.isfinite(a).all() and a.shape == (1, 16, 6, 8, 8)


def test_magi_partial_load_equals_full_load(native):
    """MAGI-1 through FlowCache Load Model is built from ComfyUI's layers: its lowvram path (layers, custom fp32
    LayerNorms, rope bands and null caption left behind and moved at use) gives the full load's latents."""
    server, _, work = native
    if not (work / "text_encoders" / "t5_tiny.safetensors").is_file():
        pytest.skip("the tiny MAGI-1 files need the `tokenizers` package in the test environment")
    magi = dict(SAMPLER, width=32, height=32, num_frames=24, steps=8, cfg=1.0, shift=3.0, causal_block_size=2)

    def prompt(model: list, prefix: str, extra: dict) -> dict:
        return {"1": flowcache_loader("magi_4.5B_distill/model.safetensors"),
                "2": {"class_type": "FlowCacheMagiTextEncode",
                      "inputs": {"t5_name": "t5_tiny.safetensors", "prompt": "A red fox runs through the snow."}},
                "30": {"class_type": "FlowCacheSampler", "inputs": dict(magi, model=model, positive=["2", 0],
                                                                        negative=["2", 0])},
                "9": save(["30", 0], prefix), **extra}

    full = run(server, prompt(["1", 0], "magi_full", {}))
    mark = len(server.log())
    budget = {"5": {"class_type": "FlowCacheTestWeightBudget", "inputs": {"model": ["1", 0], "bytes": 200_000}}}
    partial = run(server, prompt(["5", 1], "magi_partial", budget))
    assert "loaded partially" in log_since(server, mark)
    assert torch.equal(latent(partial, work), latent(full, work))
