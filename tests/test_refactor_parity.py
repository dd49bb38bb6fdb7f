"""Same decisions, forwards and FLOPs, and the same latents to float32 rounding, before and after the shared runner.

``tests/data/refactor_golden.*`` were recorded by the pipelines as they were at commit c87be27 (each family with
its own loop): latents, forwards, FLOPs and the reference FLOPs of every case below. The same cases, written in
today's API, must give the same decisions (every window's, chunk's and branch's), forwards and FLOPs exactly and
the same tensors to float32 rounding (bit for bit on the recording CPU). Cases whose loop the refactor kept: the
demo model, tiny SkyReels on the window and chunk paths, with and without a KV budget, and tiny MAGI-1 distill and
base (MAGI-1's ``off`` is now its own released loop, so the old one is asked for explicitly: no key ranges, no
refresh).

The latents of the cases that sample with UniPC (every ``wan_*`` but ``wan_flowcache_nocfg_euler``, and every
``demo_*``) were re-recorded after the UniPC corrector fix of issue 21 (which moves them by 7e-3 to 9e-3 of the
peak on tiny SkyReels, 0.24 to 0.92 on the demo): today's pipelines ran each case here, on one thread, after
checking that its forwards, FLOPs and first-chunk decisions still equal the recorded facts (they did; the JSON is
unchanged), and their latents replaced the old ones. The Euler and MAGI-1 entries are still c87be27's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowcache.cache import CacheSettings
from flowcache.models.magi import MagiDiT, magi_config_from_state_dict
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.pipelines.magi import MagiPipeline, MagiSettings
from test_magi_model import SMALL, make_sd
from tiny_models import tiny_wan

DATA = Path(__file__).resolve().parent / "data"
GOLD = load_file(str(DATA / "refactor_golden.safetensors"))
FACTS = json.loads((DATA / "refactor_golden.json").read_text())  # and "_demo_presets": the demo's presets then
pytestmark = pytest.mark.usefixtures("one_thread")  # the recording ran on one thread


def check(name: str, z: torch.Tensor, stats) -> None:
    gold, facts = GOLD[name], FACTS[name]
    assert z.shape == gold.shape
    # Bit-identical on the recording machine; another CPU's float32 kernels sum in another order (seen: 5e-7 of
    # the peak on tiny models, 1e-3 after the demo's 16 cached steps on AVX-512). The decisions must not move.
    err = ((z - gold).abs().max() / gold.abs().max()).item()
    assert err <= (2e-3 if name.startswith("demo_") else 1e-5), f"{name}: max diff {err:.3g} of the peak"
    assert stats.forwards == facts["forwards"]
    # the recording counted FLOPs in the paper's accounting only, which is today's second column
    assert stats.flops_paper == pytest.approx(facts["flops"], rel=1e-12)
    assert stats.flops_nocache_paper == pytest.approx(facts["flops_nocache"], rel=1e-12)
    # every decision: each window, chunk and branch. Diffusion forcing's window path takes one decision per step,
    # which the recording wrote on the first chunk's row and today's maps write on every chunk row it covers.
    one_per_window = name.startswith(("wan_", "demo_")) and stats.settings["path"] == "window"
    for now, then in ((stats.maps, facts["maps"]), (stats.maps_uncond, facts["maps_uncond"])):
        assert len(now) == len(then), f"{name}: {len(now)} windows, recorded {len(then)}"
        for w, (rows, recorded) in enumerate(zip(now, then)):
            if one_per_window:
                assert set(rows) == {recorded[0]} and not any(recorded[1:]), f"{name} window {w}: {rows}"
            else:
                assert rows == recorded, f"{name} window {w}: {rows}, recorded {recorded}"


WAN = dict(width=32, height=32, num_frames=21, steps=6, cfg=3.0, shift=5.0, seed=3, ar_step=2, causal_block_size=3,
           base_num_frames=12, overlap_history=3, addnoise_condition=20)
C = dict(threshold=1.5, warmup=1, coefficients=[1.0, 0.0], attention="block_causal")  # the recorded arithmetic
WAN_CASES = {
    "wan_off": ({}, CacheSettings()),
    "wan_off_blockcausal": ({"window_mask": "block_causal"}, CacheSettings()),
    "wan_off_chunked": ({"path": "chunk"}, CacheSettings(attention="block_causal")),
    "wan_teacache": ({}, CacheSettings.of("teacache", **C)),
    "wan_flowcache": ({}, CacheSettings.of("flowcache", **C)),
    "wan_flowcache_kv": ({}, CacheSettings.of("flowcache", **C, kv_budget=1)),
    "wan_flowcache_kv_t0": ({"num_frames": 36, "base_num_frames": 18},
                            CacheSettings.of("flowcache", threshold=0.0, warmup=1, kv_budget=1,
                                             attention="block_causal")),
    "wan_flowcache_nocfg_euler": ({"cfg": 1.0, "solver": "euler"},
                                  CacheSettings.of("flowcache", threshold=1.5, warmup=1, attention="block_causal")),
}


@pytest.mark.parametrize("name", WAN_CASES)
def test_tiny_skyreels(name):
    model = tiny_wan(seed=1)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    over, cache = WAN_CASES[name]
    s = DFSettings(**{**WAN, **over})
    pipe = DiffusionForcingPipeline(model, LatentGeometry(temporal_stride=1, spatial_stride=4, channels=16), 8)
    check(name, *pipe(cond, uncond if s.cfg > 1 else None, s, cache))


@pytest.mark.slow
@pytest.mark.parametrize("method,preset,custom", [("off", "slow", {}), ("teacache", "fast", {}),
                                                  ("flowcache", "slow", {}), ("flowcache", "fast", {}),
                                                  ("flowcache", "custom", {"threshold": 0.15, "kv_budget": 1})])
def test_demo_model(method, preset, custom):
    from flowcache.jobs import load_demo_kit

    from flowcache.presets import resolve_cache

    kit = load_demo_kit()
    s = DFSettings(**{**kit.settings.__dict__, "steps": 16, "seed": 1})
    cache = resolve_cache("demo", method, preset, FACTS["_demo_presets"], **custom)  # the presets of the recording
    cache.attention = "block_causal"
    z, stats = kit.pipeline()(kit.text.encode("a red circle bouncing on a blue background"), kit.text.encode(""), s,
                              cache)
    check(f"demo_{method}_{preset}" + ("_kv" if custom else ""), z, stats)


OLD_MAGI_LOOP = {"noise2clean_kvrange": (), "clean_refresh": False}
MAGI = dict(num_frames=48, width=32, height=32, num_steps=8, window_size=4, chunk_width=2, seed=11)
M = dict(threshold=0.02, warmup=2)
MAGI_CASES = {
    "magi_distill_off": ({"distill": True, **OLD_MAGI_LOOP}, CacheSettings()),
    "magi_distill_teacache": ({"distill": True, **OLD_MAGI_LOOP}, CacheSettings.of("teacache", **M)),
    "magi_distill_flowcache": ({"distill": True}, CacheSettings.of("flowcache", **M)),
    "magi_distill_flowcache_kv": ({"distill": True}, CacheSettings.of("flowcache", **M, kv_budget=1)),
    "magi_distill_nearly_clean": ({"distill": True, "discard_nearly_clean_chunk": False},
                                  CacheSettings.of("flowcache", **M)),
    "magi_base_off": ({"distill": False, **OLD_MAGI_LOOP}, CacheSettings()),
    "magi_base_flowcache_kv": ({"distill": False}, CacheSettings.of("flowcache", threshold=0.1, warmup=2, kv_budget=1)),
    "magi_v2v_flowcache_kv": ({"distill": True}, CacheSettings.of("flowcache", **M, kv_budget=1)),
}


@pytest.fixture(scope="module")
def magi():
    sd = make_sd(**SMALL, seed=4)
    model = MagiDiT(magi_config_from_state_dict(sd), dtype=torch.float32)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("name", MAGI_CASES)
def test_tiny_magi(magi, name):
    g = torch.Generator().manual_seed(7)
    cap = torch.randn(1, 6, SMALL["cap"], generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    over, cache = MAGI_CASES[name]
    prefix = (torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
              if name.startswith("magi_v2v") else None)
    pipe = MagiPipeline(magi, LatentGeometry(temporal_stride=4, spatial_stride=8, channels=4))
    check(name, *pipe(cap, mask, MagiSettings(**{**MAGI, **over}), cache, prefix=prefix))
