"""The memory plans run: offloaded K/V bit-identical to resident ones on a CPU, the lean forward equal to the
batched one within float rounding, a cancelled run frees everything it held, and the plan's estimate agrees with
the live tensor bytes measured during the run."""
from __future__ import annotations

import gc

import pytest
import torch

import flowcache.plan as plan_mod
from flowcache.cache import CacheSettings
from flowcache.memory import auto_plan
from flowcache.memtrack import track
from flowcache.models.wan import WanForward
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.pipelines.causal_wan import CausalSettings, CausalWanPipeline
from flowcache.plan import MemoryOptions
from flowcache.runner import RunHooks
from tiny_models import tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")

GEO = LatentGeometry(1, 4, 16)
FLOWCACHE = dict(method_name="flowcache", threshold=1.5, warmup=1)  # reuses a quarter of the chunk-steps


@pytest.fixture(scope="module")
def wide():
    """A tiny Wan whose tokens are wide enough (dim 256) that per-token memory dominates, as in real models."""
    return tiny_wan(seed=5, dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32)


def df_settings(**kw) -> DFSettings:
    base = dict(width=64, height=64, num_frames=24, steps=4, cfg=2.0, shift=5.0, seed=0, ar_step=1,
                causal_block_size=3, base_num_frames=24)
    return DFSettings(**{**base, **kw})


def df_run(model, s, cache, options, hooks=None):
    pipe = DiffusionForcingPipeline(model, GEO, text_len=8)
    plan = pipe.plan(s, cache, options)
    g = torch.Generator().manual_seed(1)
    return (*pipe(torch.randn(1, 8, 32, generator=g), torch.zeros(1, 8, 32), s, cache, hooks, plan=plan), plan)


def causal_run(model, cache, options, hooks=None, **kw):
    pipe = CausalWanPipeline(model, GEO, text_len=8)
    mode = "compressed" if cache.kv_budget else "rolling"
    s = CausalSettings(**{**dict(width=64, height=64, num_frames=12, num_frame_per_block=2, kv_mode=mode,
                                 local_attn_frames=6, sink_frames=2, denoising_steps=(1000.0, 750.0, 500.0, 250.0)), **kw})
    plan = pipe.plan(s, cache, options)
    g = torch.Generator().manual_seed(2)
    return (*pipe(torch.randn(1, 8, 32, generator=g), s, cache, hooks, plan=plan), plan)


# -- offload and lean give the resident, batched results -----------------------------------------------------

@pytest.mark.parametrize("attention", ["window_refresh", "block_causal"])
def test_offloaded_kv_is_bit_identical_to_resident(wide, attention):
    """Host = device on a CPU: the offloaded store's staging slots run the same arithmetic."""
    cache = CacheSettings.of(**FLOWCACHE, kv_budget=1, attention=attention)
    s = df_settings(num_frames=30, base_num_frames=18, overlap_history=6)  # two windows
    a, sa, _ = df_run(wide, s, cache, MemoryOptions())
    b, sb, _ = df_run(wide, s, cache, MemoryOptions(kv_offload=True))
    assert torch.equal(a, b) and sa.forwards == sb.forwards and sa.reused == sb.reused > 0
    assert sb.kv_moved_bytes > 0 == sa.kv_moved_bytes and sb.kv_host_bytes > 0
    c, sc, _ = causal_run(wide, CacheSettings.of(**FLOWCACHE, kv_budget=1), MemoryOptions())
    d, sd, _ = causal_run(wide, CacheSettings.of(**FLOWCACHE, kv_budget=1), MemoryOptions(kv_offload=True))
    assert torch.equal(c, d) and sd.kv_moved_bytes > 0 and sc.reused == sd.reused > 0


def test_offloaded_magi_kv_is_bit_identical():
    from test_magi_model import SMALL, make_sd
    from test_magi_pipeline import GEO as MAGI_GEO, tiny_settings

    from flowcache.models.magi import MagiDiT, magi_config_from_state_dict
    from flowcache.pipelines.magi import MagiPipeline

    sd = make_sd(**SMALL, seed=4)
    model = MagiDiT(magi_config_from_state_dict(sd), dtype=torch.float32)
    model.load_state_dict(sd)
    pipe = MagiPipeline(model.eval(), MAGI_GEO)
    s = tiny_settings(num_frames=40, num_steps=4)
    cache = CacheSettings.of("flowcache", threshold=0.05, warmup=1, kv_budget=1)
    caption = torch.randn(1, 6, SMALL["cap"], generator=torch.Generator().manual_seed(3))
    outs = [pipe(caption, None, s, cache, plan=pipe.plan(s, 0, cache, MemoryOptions(kv_offload=o))) for o in (0, 1)]
    assert torch.equal(outs[0][0], outs[1][0]) and outs[1][1].kv_moved_bytes > 0


@pytest.mark.parametrize("cache", [CacheSettings(), CacheSettings.of(**FLOWCACHE, kv_budget=1),
                                   CacheSettings.of(**FLOWCACHE, attention="window_refresh", reuse="extrapolate")],
                         ids=["off", "flowcache-budget", "flowcache-refresh"])
def test_lean_forward_equals_the_batched_one(wide, cache, monkeypatch):
    """Branches one after the other and token-wise stages in slices of 2 frames (of 64 tokens): the same decisions
    and latents within float rounding, and the lean blocks really ran."""
    monkeypatch.setattr(plan_mod, "LEAN_SLICE_TOKENS", 128)
    lean_blocks = []
    original = WanForward._lean_block
    monkeypatch.setattr(WanForward, "_lean_block",
                        lambda self, *a: lean_blocks.append(a[1].shape) or original(self, *a))
    a, sa, _ = df_run(wide, df_settings(), cache, MemoryOptions())
    assert not lean_blocks
    b, sb, plan = df_run(wide, df_settings(), cache, MemoryOptions(lean=True))
    assert plan.memory.options.slice_tokens == 128 and lean_blocks and lean_blocks[0][0] == 2
    assert sa.maps == sb.maps and sa.forwards == sb.forwards
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    c, sc, _ = causal_run(wide, cache, MemoryOptions())
    d, sd, _ = causal_run(wide, cache, MemoryOptions(lean=True))
    assert sc.maps == sd.maps
    torch.testing.assert_close(d, c, rtol=1e-5, atol=1e-5)


# -- a cancelled run keeps nothing -----------------------------------------------------------------------------

class Cancelled(Exception):
    pass


@pytest.mark.parametrize("options", [MemoryOptions(), MemoryOptions(kv_offload=True, kv_fp8=True)],
                         ids=["resident", "offload-fp8"])
def test_a_cancelled_run_frees_its_host_and_device_kv(wide, options):
    steps = []

    def cancel():
        steps.append(1)
        if len(steps) > 6:
            raise Cancelled

    cache = CacheSettings.of(**FLOWCACHE, attention="window_refresh")
    with track("cpu") as mem:
        try:
            df_run(wide, df_settings(), cache, options, RunHooks(cancel=cancel))
        except Cancelled:
            pass
    gc.collect()
    plan = DiffusionForcingPipeline(wide, GEO, text_len=8).plan(df_settings(), cache, options)
    assert mem.peak >= plan.memory.kv_bytes > 0  # the store was allocated before the cancel
    assert mem.live == 0, f"{mem.live} bytes still alive after the cancelled run"


# -- estimated vs measured ----------------------------------------------------------------------------------

PLANS = [MemoryOptions(), MemoryOptions(kv_fp8=True), MemoryOptions(kv_offload=True),
         MemoryOptions(kv_offload=True, kv_fp8=True, lean=True)]


def _measured(run) -> tuple[int, object]:
    with track("cpu") as mem:
        out = run()
        plan = out[-1]
        del out
    # on a CPU host and device are the same memory: the offloaded rows count too
    return mem.peak, plan.memory.device_bytes + plan.memory.host_bytes


@pytest.mark.parametrize("options", PLANS, ids=[o.name for o in PLANS])
def test_estimate_agrees_with_the_measured_peak(wide, options):
    """Live tensor bytes during a run (everything it allocates: activations, state, K/V) against the plan's
    figure, within 10%, for the window path, FlowCache's chunk path (extrapolating, and forecasting from three
    residuals; each chunk attention) and the causal loop."""
    runs = {"flowcache": lambda: df_run(wide, df_settings(), CacheSettings.of(
                **FLOWCACHE, attention="window_refresh", reuse="extrapolate"), options),
            # three residuals per unit and branch: the plan counts what forecast2 keeps
            "forecast2": lambda: df_run(wide, df_settings(), CacheSettings.of(
                **FLOWCACHE, attention="window_refresh", reuse="forecast2"), options),
            "causal": lambda: causal_run(wide, CacheSettings.of(**FLOWCACHE), options)}
    for attention in ("window", "block_causal"):  # chunks registered as they come; block_causal reads per chunk
        runs[attention] = lambda a=attention: df_run(wide, df_settings(), CacheSettings.of(**FLOWCACHE, attention=a),
                                                     options)
    if not (options.kv_fp8 or options.kv_offload) or options.lean:
        runs["off"] = lambda: df_run(wide, df_settings(), CacheSettings(), options)
    for name, run in runs.items():
        measured, estimated = _measured(run)
        assert 0.9 <= measured / estimated <= 1.1, f"{name}: measured {measured}, estimated {estimated}"


def test_fp8_asked_where_it_cannot_run_keeps_the_model_dtype_and_says_so(wide, monkeypatch):
    monkeypatch.setattr(plan_mod, "fp8_supported", lambda device: "this device has no float8 kernels")
    pipe = DiffusionForcingPipeline(wide, GEO, text_len=8)
    cache = CacheSettings.of(**FLOWCACHE)
    plan, note = auto_plan(lambda o, w, h: pipe.plan(df_settings(width=w, height=h), cache, o), "auto", "fp8", 64, 64,
                           24, torch.device("cpu"), None, None, 16)
    assert not plan.memory.options.kv_fp8 and note.startswith("kv_dtype=fp8 is not available here (this device")


def test_gpucheck_runs_its_table_small_on_a_cpu_and_refuses_without_a_gpu(capsys, tmp_path):
    """The device check's script itself, on a tiny model: every row ran, the estimates hold, the offloaded rows
    copied K/V; the full check refuses in one line where there is no GPU."""
    import json

    from flowcache.cli import main

    assert main(["gpucheck", "--small", "--device", "cpu", "--quiet", "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "g.json").read_text())["gpucheck"]
    assert [r["plan"] for r in rows if r["run"] == "flowcache fast"] == [
        "resident", "resident + fp8 K/V", "offload + fp8 K/V", "offload + fp8 K/V + sequential branches"]
    assert all(0.9 <= r["ratio"] <= 1.1 for r in rows), rows
    assert all((r["moved_per_step"] > 0) == ("offload" in r["plan"]) for r in rows)
    assert "flowcache fast vs off:" in out and "block-causal attention: one masked call per layer" in out
    if not torch.cuda.is_available():
        assert main(["gpucheck"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: gpucheck: no CUDA device here")
