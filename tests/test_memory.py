"""Memory: the run plans' figures (``inspect --memory``), the estimate equal to what the stores allocate for every
family, attention, budget, placement and dtype, the automatic plan and its refusals."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowcache.cache import CacheSettings
from flowcache.errors import InputError
from flowcache.memory import GiB, estimate, released_shapes
from flowcache.models.wan import WanConfig
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.pipelines.diffusion_forcing import plan_df
from flowcache.plan import MemoryOptions, candidates
from tiny_models import save_wan, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")

KV_1_3B_540P = 2 * 5 * 10200 * 30 * 2 * 1536 * 2  # 2 branches x 5 chunks x 10200 tokens x 30 layers x K,V x dim x bf16


def test_kv_stores_of_the_released_1_3b_at_540p():
    e = estimate("skyreels-v2-df-1.3b", "960x544")
    assert e.facts["tokens_per_frame"] == (544 // 16) * (960 // 16) == 2040 and e.facts["chunk_tokens"] == 10200
    plans = {r["plan"]: r for r in e.rows()}
    # every chunk of the 97-frame window is in the store (window_refresh registers them all as the window starts)
    assert plans["resident"]["kv"] == KV_1_3B_540P
    # fp8: one byte per element plus a 4-byte scale per row and head for keys and values (12 heads of 128)
    assert plans["resident + fp8 K/V"]["kv"] == KV_1_3B_540P // 2 + 2 * 51000 * 30 * 12 * 2 * 4
    # offloaded: the K/V in host memory, two layers of it staged on the device
    off = plans["offload"]
    assert off["host"] == KV_1_3B_540P and off["working"] - off["activations"] - off["state"] == KV_1_3B_540P // 15
    params = sum(math.prod(s) for s, _ in released_shapes("skyreels-v2-df-1.3b")[2].values())
    assert 1.43e9 < params < 1.44e9 and e.weights == {"bf16": 2 * params}
    assert e.facts["forward"] == "2 branches x 25 latent frames x 2040 tokens"
    # the window path stores no K/V; sequential branches lower every plan's activations
    assert plans["off / teacache (whole window)"]["kv"] == 0
    assert plans["resident + sequential branches"]["activations"] < plans["resident"]["activations"] / 2
    # the dry run's figure for both branches batched (a regression pin: that dry runs match measured peaks is
    # tests/test_memory_plans.py's); a forward counted for one branch gives 2.77 GiB
    assert plans["resident"]["activations"] == pytest.approx(5743939584, rel=0.02)


def test_the_targets_of_the_memory_plan():
    """The estimates behind the README's table: 1.3B at 540P, FlowCache fast, fits 8 GiB with offload and 16 GiB
    resident with fp8 K/V; 14B in fp8 with streamed weights fits 24 GiB and 64 GB of host RAM; MAGI-1-4.5B-distill
    fits 16 GiB."""
    small = {r["plan"]: r for r in estimate("skyreels-v2-df-1.3b", "960x544").rows()}
    assert small["offload + fp8 K/V + sequential branches"]["device"] <= 8 * GiB
    assert small["resident + fp8 K/V + sequential branches"]["device"] <= 16 * GiB
    assert small["resident"]["device"] > 24 * GiB  # and why the plan matters
    big = {r["plan"]: r for r in estimate("skyreels-v2-df-14b", "960x544", weights="fp8_e4m3fn").rows()}
    lean = big["offload + fp8 K/V + sequential branches"]
    assert lean["device_streamed"] <= 24 * GiB and lean["host_streamed"] <= 64e9
    magi = {r["plan"]: r for r in estimate("magi-1-4.5b-distill", "720x720").rows()}
    assert min(r["device"] for r in magi.values()) <= 16 * GiB


def test_fp8_weights_and_magi():
    bf16 = estimate("skyreels-v2-df-14b", "960x544").weights
    fp8 = estimate("skyreels-v2-df-14b", "960x544", weights="fp8_e4m3fn").weights  # --weight-dtype
    assert set(fp8) == {"bf16", "fp8_e4m3fn"} and fp8["bf16"] < 0.01 * GiB
    assert abs(fp8["fp8_e4m3fn"] * 2 - bf16["bf16"]) < 0.01 * bf16["bf16"]
    m = estimate("magi-1-4.5b-distill", "720x720", preset="slow", budget=0)
    assert m.facts["tokens_per_chunk"] == 6 * 45 * 45 and m.facts["chunks"] == 4
    resident = m.rows()[0]
    assert resident["kv"] == 4 * 6 * 45 * 45 * 34 * 2 * 8 * 128 * 2  # 4 chunks, 34 layers, 8 kv heads x 128, bf16
    long = estimate("magi-1-4.5b-distill", "720x720", frames=480, budget=1).rows()[0]
    assert long["kv"] == resident["kv"] * 5 // 4  # budget 1 + window 4 chunks, however long the video
    assert "fp32" in m.weights  # the modules MAGI-1 promotes to fp32


def test_estimate_from_a_checkpoint_reads_its_header(tmp_path):
    model = tiny_wan()
    fp8 = save_wan(model, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    e = estimate(str(fp8), "64x64", frames=17)
    n = sum(v.numel() for v in model.state_dict().values())
    assert sum(e.weights.values()) < 2 * n and e.weights["fp8_e4m3fn"] > 0  # fp8 stays fp8, the rest bf16
    assert e.facts["chunk_tokens"] == 5 * 16


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowcache", *args], capture_output=True, text=True, timeout=300)


def test_cli(tmp_path):
    r = run_cli("inspect", "skyreels-v2-df-1.3b", "--memory", "960x544")
    assert r.returncode == 0, r.stderr
    for plan in ("resident", "resident + fp8 K/V", "offload", "offload + fp8 K/V + sequential branches",
                 "off / teacache (whole window)"):
        assert f"\n  {plan} " in r.stdout
    assert "weights 2.67 GiB" in r.stdout
    r = run_cli("inspect", "magi-1-4.5b-distill", "--memory", "720x720", "--json")
    d = json.loads(r.stdout)
    assert all(p["device"] == d["weights_total"] + p["working"] for p in d["plans"])
    r = run_cli("inspect", "skyreels-v2-df-1.3b", "--memory", "960by544")
    assert r.returncode == 2 and r.stderr.startswith("error: --memory '960by544'")
    r = run_cli("inspect", "skyreels-v2-df-14b")
    assert r.returncode == 2 and "add --memory" in r.stderr
    path = save_wan(tiny_wan(), tmp_path / "m.safetensors")
    r = run_cli("inspect", str(path), "--memory", "64x64", "--frames", "17", "--dtype", "fp32")
    assert r.returncode == 0 and "fp32 compute" in r.stdout


def test_largest_fitting_size_by_arithmetic():
    """need = 3 bytes per pixel, 1200x800 asked, 1,000,000 bytes: the longer side steps by 16 and the shorter one
    follows the aspect ratio, floored to 16. 704x464 needs 979,968 bytes; the next step, 720x480, 1,036,800."""
    from flowcache.memory import largest_fitting_size

    need = lambda w, h: 3 * w * h  # noqa: E731
    assert largest_fitting_size(need, 1200, 800, 1_000_000, 16) == (704, 464)
    assert need(704, 464) == 979_968 and need(720, 480) == 1_036_800
    assert largest_fitting_size(need, 1200, 800, 100, 16) is None  # not even 16x16 fits
    assert largest_fitting_size(need, 1200, 800, 10 ** 9, 16) == (1200, 800)  # never larger than asked


def test_available_bytes_on_this_machine():
    from flowcache.memory import available_bytes
    got = available_bytes(torch.device("cpu"))
    assert got is None or got > 0
    if Path("/proc/meminfo").exists():
        assert got is not None and got > 64 * 1024 ** 2


def test_cached_residuals_count_in_the_plan():
    """Each cached chunk residual is a window's tokens x dim per branch: none for off, one to hold, two to
    extrapolate; EasyCache also keeps each unit's last input (compute dtype) and its fp32 input and output."""
    cfg, geo = WanConfig(), LatentGeometry()
    s = DFSettings(num_frames=97)
    window = 2 * 5 * 10200 * 1536 * 2  # 2 branches x 5 chunks x 10200 tokens x 1536 dims, bf16

    def state(**kw):
        return plan_df(s, CacheSettings.of(**kw), cfg, geo, torch.bfloat16, 512).memory.state
    base = state(method_name="flowcache", threshold=0.0)  # never reuses: keeps nothing
    assert state(method_name="flowcache", threshold=0.1) - base == window
    assert state(method_name="flowcache", threshold=0.1, reuse="extrapolate") - base == 2 * window
    assert state(method_name="easycache", threshold=0.1) - base == window + window // 2 // 2 * (2 + 8)


# -- the estimate equals what the stores allocate --------------------------------------------------------------

OPTIONS = [MemoryOptions(), MemoryOptions(kv_fp8=True), MemoryOptions(kv_offload=True),
           MemoryOptions(kv_offload=True, kv_fp8=True)]


def _check_stores(plan, stats) -> None:
    memory = plan.memory
    assert stats.kv_device_bytes == sum(st.device_bytes for st in memory.stores) > 0
    assert stats.kv_host_bytes == sum(st.host_bytes for st in memory.stores)
    assert stats.kv_peak_bytes == sum(st.device_bytes + st.host_bytes for st in memory.stores)
    if memory.options.kv_offload:
        assert stats.kv_host_bytes == memory.kv_bytes and stats.kv_moved_bytes > 0


@pytest.mark.parametrize("attention", ["window", "window_refresh", "block_causal"])
@pytest.mark.parametrize("budget", [0, 1])
def test_df_estimate_equals_allocation(attention, budget):
    model = tiny_wan(seed=5)
    geo = LatentGeometry(1, 4, 16)
    s = DFSettings(width=32, height=32, num_frames=24, steps=3, cfg=2.0, shift=5.0, seed=0, ar_step=1,
                   causal_block_size=3, base_num_frames=15, overlap_history=6)  # two windows of 5 and 3 + 3 chunks
    cache = CacheSettings.of("flowcache", threshold=0.5, warmup=1, kv_budget=budget, attention=attention)
    pipe = DiffusionForcingPipeline(model, geo, text_len=8)
    for opt in OPTIONS:
        plan = pipe.plan(s, cache, opt)
        _, stats = pipe(torch.randn(1, 8, 32), torch.zeros(1, 8, 32), s, cache, plan=plan)
        _check_stores(plan, stats)


@pytest.mark.parametrize("kv_mode", ["global", "rolling", "compressed"])
def test_causal_estimate_equals_allocation(kv_mode):
    from flowcache.pipelines.causal_wan import CausalSettings, CausalWanPipeline

    model = tiny_wan(seed=2, has_fps=False)
    pipe = CausalWanPipeline(model, LatentGeometry(1, 4, 16), text_len=8)
    s = CausalSettings(width=32, height=32, num_frames=12, num_frame_per_block=2, kv_mode=kv_mode,
                       local_attn_frames=6, sink_frames=2, denoising_steps=(1000.0, 500.0))
    cache = CacheSettings.of("flowcache", threshold=0.5, warmup=1, kv_budget=1)
    for opt in OPTIONS:
        plan = pipe.plan(s, cache, opt)
        _, stats = pipe(torch.randn(1, 8, 32), s, cache, plan=plan)
        _check_stores(plan, stats)


@pytest.mark.parametrize("path", ["chunk", "window"])
@pytest.mark.parametrize("distill", [True, False])
@pytest.mark.parametrize("budget", [0, 1])
def test_magi_estimate_equals_allocation(distill, budget, path):
    from test_magi_model import SMALL, make_sd
    from test_magi_pipeline import GEO, tiny_settings

    from flowcache.models.magi import MagiDiT, magi_config_from_state_dict
    from flowcache.pipelines.magi import MagiPipeline

    sd = make_sd(**SMALL, seed=4)
    model = MagiDiT(magi_config_from_state_dict(sd), dtype=torch.float32)
    model.load_state_dict(sd)
    pipe = MagiPipeline(model.eval(), GEO)
    s = tiny_settings(num_frames=40, num_steps=4, distill=distill, path=path)  # 10 latent frames: 5 chunks, 4 at once
    cache = CacheSettings.of("flowcache", threshold=0.05, warmup=1, kv_budget=budget)
    caption = torch.randn(1, 6, SMALL["cap"])
    for opt in OPTIONS:
        plan = pipe.plan(s, 0, cache, opt)
        assert len(plan.stores) == (1 if distill else 2)
        _, stats = pipe(caption, None, s, cache, plan=plan)
        _check_stores(plan, stats)


# -- the automatic plan -----------------------------------------------------------------------------------

def test_candidates_in_the_automatic_order():
    names = [o.name for o in candidates()]
    assert names == ["resident", "resident + fp8 K/V", "offload + fp8 K/V", "offload + fp8 K/V + sequential branches"]
    assert [o.name for o in candidates("device", "bf16")] == ["resident", "resident + sequential branches"]
    assert [o.name for o in candidates("offload", "bf16")] == ["offload", "offload + sequential branches"]
    assert [o.name for o in candidates(fp8_ok=False)] == ["resident", "offload", "offload + sequential branches"]
    assert [o.name for o in candidates(stores_kv=False)] == ["resident", "resident + sequential branches"]
    with pytest.raises(InputError, match="kv_placement='gpu'"):
        candidates("gpu")


def _df_planner(cache):
    cfg, geo = WanConfig(), LatentGeometry()

    def planner(options, width, height):
        return plan_df(DFSettings(width=width, height=height, num_frames=97), cache, cfg, geo, torch.bfloat16, 512,
                       options)
    return planner


def test_choose_plan_takes_the_fastest_that_fits_and_refuses_with_figures():
    from flowcache.memory import choose_plan

    planner = _df_planner(CacheSettings.of("flowcache", threshold=0.2, attention="window_refresh"))
    opts = candidates()
    sizes = {o.name: planner(o, 960, 544).memory for o in opts}
    pick = lambda dev, host: choose_plan(planner, opts, 960, 544, 97, dev, host, "cuda", 16)  # noqa: E731
    assert pick(None, None).memory.options == opts[0]  # unknown memory: never refused
    need = {name: m.device_bytes for name, m in sizes.items()}
    lean = "offload + fp8 K/V + sequential branches"
    assert need["resident"] > need["resident + fp8 K/V"] > need["offload + fp8 K/V"] > need[lean]
    assert pick(need["resident"], 64 * GiB).memory.options.name == "resident"
    assert pick(need["resident"] - 1, 64 * GiB).memory.options.name == "resident + fp8 K/V"
    assert pick(need["offload + fp8 K/V"], 64 * GiB).memory.options.name == "offload + fp8 K/V"
    assert pick(need[lean], 64 * GiB).memory.options.name == lean
    with pytest.raises(InputError) as e:  # host RAM short for the offloaded K/V: both figures, no size hint
        pick(need[lean], 4 * GiB)
    assert str(e.value).startswith(f"FlowCache Sampler: kv_placement offload needs {sizes[lean].host_bytes / GiB:.1f} "
                                   "GiB of host RAM")
    assert "3.4 GiB can be pinned (4.0 GiB free" in str(e.value)
    with pytest.raises(InputError) as e:  # the device too small for any plan: the size that fits
        pick(1 * GiB, 64 * GiB)
    msg = str(e.value)
    assert msg.startswith("FlowCache Sampler: width=960, height=544, num_frames=97 need about "
                          f"{need[lean] / GiB:.1f} GiB beside the weights even with the smallest plan")
    assert "(offload + fp8 K/V + sequential branches)" in msg and "expected at most " in msg
    w, h = (int(v) for v in msg.split("expected at most ")[1].split(" ")[0].split("x"))
    smallest = opts[-1]
    assert planner(smallest, w, h).memory.device_bytes <= GiB < planner(smallest, w + 16, 544 * (w + 16) // 960 // 16
                                                                          * 16).memory.device_bytes
