"""``python -m flowcache bench`` on cut-down settings: every row of the paper's table, with sane values.

Timings are not asserted (they are the benchmark's job, measured side by side in one run); the counts,
FLOPs, KV sizes and quality columns are.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from flowcache.cli import main
from tiny_models import save_wan, tiny_wan

# the rows the tiny presets below give: off, every method × preset with presets, FlowCache also with the chunk
# attentions other than its preset's (block_causal when a row names none) and with the other reuse (hold when a
# row names none), and FlowCache fast with a KV budget
ROWS = ["off", "teacache-slow", "teacache-fast", "flowcache-slow", "flowcache-slow/win", "flowcache-slow/ref",
        "flowcache-slow/ext", "flowcache-fast", "flowcache-fast/win", "flowcache-fast/ref", "flowcache-fast/ext",
        "flowcache-fast+kv", "flowcache-fast+fp8kv", "flowcache-fast+offload"]
PRESETS = {"tiny-bench": {"coefficients": [1.0, 0.0],
                          "flowcache": {"slow": {"threshold": 0.3, "warmup": 2, "kv_budget": 0},
                                        "fast": {"threshold": 0.6, "warmup": 2, "kv_budget": 0}},
                          "teacache": {"slow": {"threshold": 0.3, "warmup": 2, "kv_budget": 0},
                                       "fast": {"threshold": 0.6, "warmup": 2, "kv_budget": 0}}}}


def with_presets(path) -> None:
    """Give a tiny checkpoint the key and presets above, in its metadata (as calibrate writes them)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        sd = {k: f.get_tensor(k) for k in f.keys()}
    meta.update({"flowcache.model_key": "tiny-bench", "flowcache.presets": json.dumps(PRESETS)})
    save_file(sd, str(path), metadata=meta)


pytestmark = pytest.mark.usefixtures("one_thread")


def check_table(table: dict, expected: list[str] = ROWS, fast_reuses_more: bool = True) -> dict:
    rows = {r["mode"]: r for r in table["rows"]}
    assert list(rows) == expected
    off = rows["off"]
    assert off["speedup"] == 1.0 and off["flops_speedup"] == 1.0 and off["psnr_db"] == math.inf
    assert off["peak_kv_bytes"] == 0 and off["ssim"] == pytest.approx(1.0)
    for name in expected[1:]:
        r = rows[name]
        assert r["forwards"] > 0 and r["tflops"] > 0 and r["wall_s"] > 0 and r["speedup"] > 0
        assert r["psnr_db"] > 0 and -1.0 <= r["ssim"] <= 1.0 + 1e-6
    # caching spends fewer FLOPs than the vanilla loop (the paper's accounting); TeaCache skips whole windows
    for name in ("teacache-fast", "flowcache-slow", "flowcache-fast", "flowcache-fast+kv"):
        r = rows[name]
        assert r["flops_speedup"] > 1.0
        assert r["flops_speedup"] == pytest.approx(off["tflops"] / r["tflops"], rel=1e-9)
    assert rows["teacache-fast"]["forwards"] < off["forwards"]  # forwards of the whole window
    for name in [n for n in expected if n.endswith(("/ext", "/hold"))]:  # another reuse: the same work
        base = rows[name.rsplit("/", 1)[0]]
        assert (rows[name]["forwards"], rows[name]["tflops"]) == (base["forwards"], base["tflops"])
        assert rows[name]["reuse"] != base["reuse"]
    if fast_reuses_more:  # same warm-up, higher threshold (forwards of one chunk)
        assert rows["flowcache-fast"]["forwards"] <= rows["flowcache-slow"]["forwards"]
    # off runs cond and uncond as one batch per iteration; FlowCache batches a step's chunks and branches
    assert off["model_calls"] * 2 == off["forwards"]
    assert rows["flowcache-fast"]["model_calls"] < rows["flowcache-fast"]["forwards"] / 2
    # the chunk path keeps a KV store, never larger with a budget
    assert rows["flowcache-fast"]["peak_kv_bytes"] > 0
    assert rows["flowcache-fast+kv"]["peak_kv_bytes"] <= rows["flowcache-fast"]["peak_kv_bytes"]
    # the chunk path with no reuse, for each attention: its distance to off and the policy's bookkeeping time
    assert set(table["overhead"]) == {"window", "window_refresh", "block_causal"}
    for o in table["overhead"].values():
        assert o["chunked_s"] > 0 and o["flowcache_threshold0_s"] > 0 and math.isfinite(o["fraction"])
        assert o["threshold0_psnr_db"] > 0
    t0 = {a: o["threshold0_psnr_db"] for a, o in table["overhead"].items()}
    assert t0["window_refresh"] >= t0["window"]  # refreshing K/V brings the chunk path closer to off
    # how K/V are held, with flowcache-fast's own decisions: offloaded is exact and copies each step; fp8 stores
    # fewer bytes at a small distance; every run's measured peak covers its K/V
    fast, fp8, offload = rows["flowcache-fast"], rows["flowcache-fast+fp8kv"], rows["flowcache-fast+offload"]
    assert fp8["replays"] == offload["replays"] == "flowcache-fast"
    assert offload["psnr_vs_replayed_db"] == math.inf and offload["forwards"] == fast["forwards"]
    assert offload["moved_bytes_per_step"] > 0 == fast["moved_bytes_per_step"]
    assert fp8["forwards"] == fast["forwards"] and 30 < fp8["psnr_vs_replayed_db"] < math.inf
    assert fp8["peak_kv_bytes"] < fast["peak_kv_bytes"] / 1.5
    assert all(r["peak_bytes"] >= r["peak_kv_bytes"] and r["peak_bytes"] > 0 for r in rows.values())
    return rows


@pytest.mark.slow
def test_bench_json_on_a_checkpoint(tmp_path):
    model = tiny_wan(seed=3)
    path = save_wan(model, tmp_path / "tiny.safetensors")
    with_presets(path)
    out = tmp_path / "bench.json"
    # 57 frames = 15 latent frames = 3 chunks of SkyReels' 5; 96x96 pixels (12x12 latents, enough for SSIM)
    assert main(["bench", "--model", str(path), "--prompts", "2", "--seeds", "1", "--repeats", "1", "--frames", "57",
                 "--steps", "12", "--width", "96", "--height", "96", "--json", str(out), "--quiet"]) == 0
    table = json.loads(out.read_text())["table"]
    check_table(table)
    s = table["setting"]
    assert s["quality_on"] == "LatentPreview" and s["num_frames"] == 57 and s["device"] == "cpu"
    assert s["prompts"] == ["benchmark prompt 0", "benchmark prompt 1"]


def test_bench_random_architecture_is_built_without_a_file():
    from flowcache.jobs import RANDOM_WAN, load_checkpoint_kit

    assert set(RANDOM_WAN) == {"random-wan-1.3B", "random-wan-14B"}
    with torch.device("meta"):  # the 1.3B config is what a GPU run builds; check it without allocating it
        from flowcache.models.wan import WanConfig, WanDiT
        n = sum(p.numel() for p in WanDiT(WanConfig(**RANDOM_WAN["random-wan-1.3B"])).parameters())
    assert 1.2e9 < n < 1.5e9
    from flowcache.errors import InputError
    with pytest.raises(InputError, match="unknown setting"):
        load_checkpoint_kit("random-wan-1.3B", dtype="fp32", bogus=1)


def test_off_spends_exactly_the_vanilla_flops_in_both_accountings(tmp_path):
    """Stats count the vanilla loop every iteration, every branch, as one whole-window forward: with full
    attention as computed, and as the paper counts it (chunk j attending to j chunks). ``off`` spends exactly
    that; FlowCache's speedups are measured against it."""
    from flowcache.cache import CacheSettings
    from flowcache.flops import forward_flops, paper_window_flops
    from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry, plan_windows

    model = tiny_wan(seed=1)
    s = DFSettings(width=32, height=32, num_frames=37, base_num_frames=21, overlap_history=9, steps=4, ar_step=1,
                   causal_block_size=1, cfg=3.0)  # windows of 6 latent frames, later ones with 3 carried over
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 5, 32, generator=g), torch.zeros(1, 5, 32)
    pipe = DiffusionForcingPipeline(model, text_len=8)
    _, off = pipe(cond, uncond, s, CacheSettings())
    _, fc = pipe(cond, uncond, s, CacheSettings.of("flowcache", threshold=0.0))
    c = model.cfg
    windows = plan_windows(s, LatentGeometry())
    assert len(windows) == len(off.iterations) == 3
    # chunks of 1 latent frame of 2x2 tokens; every chunk of the window, prefix included, is forwarded
    dims = (c.dim, c.ffn_dim, c.num_layers, 8)
    per = [paper_window_flops(4, w.length, *dims) for w in windows]
    paper = sum(it * 2 * f for it, f in zip(off.iterations, per))
    real = sum(it * 2 * forward_flops(4 * w.length, 4 * w.length, *dims) for it, w in zip(off.iterations, windows))
    assert off.flops == pytest.approx(real, rel=1e-12) and off.flops_nocache == pytest.approx(real)
    assert off.flops_paper == pytest.approx(paper, rel=1e-12) and off.flops_nocache_paper == pytest.approx(paper)
    assert fc.flops_nocache == pytest.approx(real) and fc.flops_nocache_paper == pytest.approx(paper)
    assert fc.flops == pytest.approx(fc.flops_paper) and fc.flops < paper  # finished chunks are not run


@pytest.mark.slow
def test_bench_on_a_retrained_demo_file_uses_its_own_text_embedding(tmp_path):
    """A demo model trained elsewhere (``python -m flowcache.demo.train --out DIR``) is benched and calibrated
    at the demo's settings with the text embedding beside it, not the shipped one."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from flowcache import demo
    from flowcache.calibrate import _encoder_for
    from flowcache.demo.text import DemoTextEncoder
    from flowcache.errors import CheckpointError
    from flowcache.jobs import load_demo_kit
    from flowcache.models import load_model

    model = tmp_path / demo.DIT_FILE
    shutil.copy(demo.demo_model_path(), model)
    with pytest.raises(CheckpointError, match=r"demo_text\.safetensors.*same folder"):
        load_demo_kit(model)
    shipped_text = demo.ASSETS / demo.TEXT_FILE
    with safe_open(str(shipped_text), framework="pt") as f:
        meta = f.metadata()
    text = load_file(str(shipped_text))
    text["token.weight"] = text["token.weight"].flip(0).contiguous()  # a different embedding than the shipped one
    save_file(text, str(tmp_path / demo.TEXT_FILE), metadata=meta)
    prompt = demo.DEMO_PROMPTS[0]
    own = DemoTextEncoder.load(tmp_path / demo.TEXT_FILE).encode(prompt)
    assert not torch.equal(own, demo.load_demo_text().encode(prompt))
    assert torch.equal(load_demo_kit(model).text.encode(prompt), own)
    encode, source = _encoder_for(load_model(model, dtype="fp32"), model, [prompt], None, False)
    assert source == "demo_text" and torch.equal(encode(prompt), own)

    assert main(["bench", "--model", str(model), "--long"]) == 2  # --long decodes the shipped model only
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(model), "--prompts", "1", "--seeds", "1", "--repeats", "1", "--steps", "6",
                 "--json", str(out), "--quiet"]) == 0
    table = json.loads(out.read_text())["table"]
    # the demo's presets: every method, FlowCache with its preset's attention and the two others, every chunk-path
    # method with its preset's reuse and the other
    demo_rows = ["off"] + [f"{m}-{p}" + tag for m in ("teacache", "flowcache", "magcache", "easycache")
                           for p in ("slow", "fast", "turbo") if (m, p) != ("teacache", "turbo")  # no such row
                           for tag in ([""] + (["/a", "/b"] if m == "flowcache" else [])
                                       + (["/r"] if m != "teacache" else []))] + ["flowcache-fast+kv", "flowcache-fast+fp8kv", "flowcache-fast+offload"]
    got = [r["mode"] for r in table["rows"]]
    assert [m.split("/")[0] for m in got] == [m.split("/")[0] for m in demo_rows], got
    # the demo's slow preset warms up 3 steps, fast 5: at 6 steps fast may compute more
    check_table(table, got, fast_reuses_more=False)
    s = table["setting"]
    assert s["prompts"] == [prompt] and s["num_frames"] == demo.DEMO_SETTINGS["num_frames"]
    assert s["quality_on"] == "DemoCodec"


def test_sweep_covers_every_attention_and_reuse_and_marks_the_frontier(tmp_path):
    """``run_sweep`` (what ``bench --sweep`` prints) on a tiny model: every chunk-path threshold with every
    attention and both reuses (the reuse changes what a skip applies, never which steps skip: equal FLOPs), the
    window path once with its preset's, and a frontier that no other row beats in FLOPs speedup and PSNR at once."""
    from flowcache.bench import SWEEP_REUSES as REUSE, _grid, run_sweep
    from flowcache.cache import ATTENTION
    from flowcache.jobs import load_checkpoint_kit

    path = save_wan(tiny_wan(seed=3), tmp_path / "tiny.safetensors")
    with_presets(path)
    kit = load_checkpoint_kit(str(path), num_frames=57, steps=24, width=32, height=32)
    # on this tiny model a threshold of 2 reuses most middle steps, 0 none
    grid = {"flowcache": _grid((0.0, 2.0), warmup=2), "teacache": _grid((2.0,))}
    rows = run_sweep(["a prompt"], [0], grid=grid, kit=kit, log=lambda *_: None)
    fc = {(r["attention"], r["reuse"], r["threshold"]): r for r in rows if r["method"] == "flowcache"}
    assert set(fc) == {(a, u, t) for a in ATTENTION for u in REUSE for t in (0.0, 2.0)}
    tea = [r for r in rows if r["method"] == "teacache"]
    assert len(tea) == 1 and tea[0]["reuse"] == "hold"
    for attention in ATTENTION:
        none, hold, line = (fc[(attention, u, t)] for u, t in (("hold", 0.0), ("hold", 2.0), ("extrapolate", 2.0)))
        assert hold["flops_speedup"] > none["flops_speedup"]  # threshold 2 reuses
        assert line["flops_speedup"] == pytest.approx(hold["flops_speedup"], rel=1e-12)
        assert line["psnr_db"] != hold["psnr_db"]  # the reused chunks applied something else
        assert fc[(attention, "extrapolate", 0.0)]["psnr_db"] == none["psnr_db"]  # nothing reused: the same video
    for r in rows:
        beaten = any(o["flops_speedup"] >= r["flops_speedup"] and o["psnr_db"] >= r["psnr_db"]
                     and (o["flops_speedup"], o["psnr_db"]) != (r["flops_speedup"], r["psnr_db"]) for o in rows)
        assert r["frontier"] == (not beaten)


def test_sweep_takes_forecast2_and_cfg_reuse_when_asked(tmp_path):
    """The sweep's grid can hold reuse=forecast2 and CFG-aware reuse (the default grid's rows are as before)."""
    from flowcache.bench import _grid, format_sweep, run_sweep
    from flowcache.jobs import load_checkpoint_kit

    path = save_wan(tiny_wan(seed=3), tmp_path / "tiny.safetensors")
    with_presets(path)
    kit = load_checkpoint_kit(str(path), num_frames=17, steps=8, width=32, height=32)
    rows = run_sweep(["a prompt"], [0], grid={"flowcache": _grid((2.0,), warmup=2)}, kit=kit, log=lambda *_: None,
                     attentions=("block_causal",), reuses=("hold", "forecast2"), cfgs=(("off", 2), ("own", 2)))
    got = {(r["reuse"], r.get("cfg_reuse", "off")): r for r in rows}
    assert set(got) == {(u, c) for u in ("hold", "forecast2") for c in ("off", "own")}
    assert got[("hold", "own")]["cfg_interval"] == 2 and "cfg_interval" not in got[("hold", "off")]
    assert got[("hold", "own")]["flops_speedup"] > got[("hold", "off")]["flops_speedup"]  # fewer uncond forwards
    assert got[("forecast2", "off")]["flops_speedup"] == pytest.approx(got[("hold", "off")]["flops_speedup"],
                                                                      rel=1e-12)
    assert "cfg=own/2" in format_sweep(rows)


def test_bench_says_each_phase_draws_a_bar_per_run_and_puts_its_figures_in_context(tmp_path, capsys):
    """What ``bench`` prints while it runs (a line before each phase, the threshold-0 runs included; a bar per
    run when bars are on) and the table's notes: what each figure is measured against, and that wall times are
    noisy on a shared machine while the FLOP ratios are not."""
    from flowcache.bench import format_table, run_table
    from flowcache.jobs import load_checkpoint_kit
    from flowcache.progress import Progress

    path = save_wan(tiny_wan(seed=3), tmp_path / "tiny.safetensors")
    with_presets(path)
    kit = load_checkpoint_kit(str(path), base_num_frames=17)
    said: list[str] = []
    over = {"num_frames": 17, "steps": 2, "width": 96, "height": 96}  # 12x12 latents: enough for SSIM
    res = run_table(["p"], [0], 1, over, log=lambda *_: None, kit=kit, progress=Progress(True, said.append))
    assert said[0] == f"bench: prompt 'p' seed 0: {len(ROWS)} modes, one run each ..."
    assert said[1].startswith("bench: prompt 'p' seed 0: the cache policy's bookkeeping") and "threshold 0" in said[1]
    bars = capsys.readouterr().err.replace("\r", "\n")
    for label in ("off: 100%", "flowcache-fast+kv: 100%", "window no policy: 100%", "block_causal threshold 0: 100%"):
        assert label in bars, label
    text = format_table(res)
    assert "counted, not timed" in text and "noisy" in text and "off's wall time / this mode's" in text
    assert text.count("target < 3% on an idle machine") == 3


@pytest.mark.parametrize("mode", ["longlive", "krea"])
def test_causal_bench_rows_of_longlive_and_krea_keep_kv_flat(mode):
    """bench --loop causal's LongLive row (window 12, sink 3, a prompt switch re-cached) and Krea row (its context
    rebuilt every block through the demo's codec, a prompt change blended): the KV bytes stay the same as the
    blocks grow past the window, where kv_mode global grows."""
    from flowcache import bench

    rows = [bench.causal_child("demo", n, mode) for n in (5, 8)]
    assert [r["frames"] for r in rows] == [15, 24] and all(r["switches"] == 1 for r in rows)
    assert rows[0]["peak_kv_bytes"] == rows[1]["peak_kv_bytes"] > 0, rows
    grows = [bench.causal_child("demo", n, "global")["peak_kv_bytes"] for n in (2, 4)]
    assert grows[1] > grows[0]
    assert mode in bench.format_causal(rows)


def test_round_trip_codec_is_exact():
    """The stand-in codec for Krea's loop on a model without its VAE gives back the latent frame it decoded."""
    from flowcache.bench import RoundTripCodec

    codec = RoundTripCodec(16, 8, 4)
    z = torch.randn(1, 16, 3, 2, 3)
    pixels = codec.decode(z)
    assert pixels.shape == (9, 16, 24, 3)
    assert torch.equal(codec.encode(pixels[-1:]), z[:, :, -1:])
    assert torch.equal(codec.encode(pixels), z)


def sweep_row(method: str, flops: float, db: float) -> dict:
    """A row as ``run_sweep`` makes them, with these figures."""
    return {"method": method, "attention": "window_refresh", "reuse": "hold", "threshold": 0.1,
            "custom": {"threshold": 0.1}, "flops_speedup": flops, "wall_speedup": flops, "psnr_db": db}


def test_preset_rule_picks_the_best_psnr_at_each_target_else_the_fastest():
    """``pick_presets``, the rule written in presets.py, on hand-made rows: per method, the highest PSNR among
    rows at >= the target FLOPs speedup (slow 3x, fast 4x, turbo 6x); a method none of whose rows reaches a target
    gets its fastest row (the higher PSNR of two equally fast)."""
    from flowcache.bench import format_sweep, mark_frontier, pick_presets
    from flowcache.presets import NAMED_PRESETS, PRESET_FLOPS_TARGETS

    assert PRESET_FLOPS_TARGETS == {"slow": 3.0, "fast": 4.0, "turbo": 6.0}
    assert tuple(PRESET_FLOPS_TARGETS) == NAMED_PRESETS
    a = [sweep_row("flowcache", 2.9, 40.0), sweep_row("flowcache", 3.0, 33.0), sweep_row("flowcache", 3.5, 34.0),
         sweep_row("flowcache", 4.2, 30.0), sweep_row("flowcache", 5.99, 29.0), sweep_row("flowcache", 6.0, 20.0),
         sweep_row("flowcache", 7.5, 22.0), sweep_row("flowcache", 9.0, 12.0)]
    b = [sweep_row("magcache", 3.2, 31.0), sweep_row("magcache", 5.1, 25.0), sweep_row("magcache", 5.1, 26.0)]
    picks = pick_presets(a + b)
    assert picks["flowcache"]["slow"] is a[2] and picks["flowcache"]["fast"] is a[3]
    assert picks["flowcache"]["turbo"] is a[6]  # 6.0x at 20 dB and 9x at 12 dB reach 6x too, with less PSNR
    assert picks["magcache"]["slow"] is b[0]
    assert picks["magcache"]["fast"] is b[2] and picks["magcache"]["turbo"] is b[2]  # none reaches 6x: the fastest
    text = format_sweep(mark_frontier(a + b))
    assert "flowcache turbo: threshold=0.1 window_refresh hold: 7.50x FLOPs, 22.00 dB" in text
    assert "magcache turbo: threshold=0.1 window_refresh hold: 5.10x FLOPs, 26.00 dB (none reaches the target" in text


def test_turbo_grid_reaches_past_6x_settings_with_every_reuse_and_each_setting_once():
    """The grid ``bench --sweep --grid turbo`` runs (``SWEEP_TURBO``): every reuse (hold, extrapolate, forecast2),
    CFG-aware reuse off / own / delta at intervals 2 and 3, and no setting twice."""
    from flowcache.bench import SWEEP_TURBO, block_points
    from flowcache.presets import resolve_cache

    class Kit:  # the released 1.3B's presets: every method has a slow row
        cache = staticmethod(lambda method, preset, **custom: resolve_cache("wan-1.3B", method, preset, **custom))

    points = block_points(Kit(), SWEEP_TURBO)
    keys = [(m, a, r, tuple(sorted(c.items())), cfg) for m, a, r, c, cfg in points]
    assert len(keys) == len(set(keys)) and sum(len(b.grid.get("flowcache", ())) for b in SWEEP_TURBO) > 1
    assert {m for m, *_ in points} == {"flowcache", "magcache", "easycache"}
    assert {r for _, _, r, _, _ in points} == {"hold", "extrapolate", "forecast2"}
    assert {cfg for *_, cfg in points} == {("off", 2), ("own", 2), ("own", 3), ("delta", 2), ("delta", 3)}
    magcache = [dict(c) for m, _, _, c, _ in keys if m == "magcache"]
    assert max(c["max_skips"] for c in magcache) >= 6 and max(c["threshold"] for c in magcache) >= 0.5


@pytest.mark.parametrize("cfg", [("off", 2), ("delta", 3)])
def test_a_picked_sweep_row_as_a_preset_row_resolves_to_the_settings_the_sweep_ran(cfg):
    """``preset_row`` (how a pick becomes a turbo row in a model's presets): the preset resolves to exactly the
    settings the sweep ran for that row (custom values on the slow row, then its attention, reuse and CFG-aware
    reuse)."""
    from dataclasses import replace

    from flowcache.bench import preset_row
    from flowcache.presets import builtin_presets, resolve_cache

    custom = {"threshold": 0.45, "max_skips": 6, "warmup": 1}
    r = {"method": "magcache", "attention": "window", "reuse": "forecast2", "custom": custom, "threshold": 0.45,
         **({"cfg_reuse": cfg[0], "cfg_interval": cfg[1]} if cfg[0] != "off" else {})}
    entry = builtin_presets()["wan-1.3B"]
    table = {"m": {**entry, "magcache": {**entry["magcache"], "turbo": preset_row(r)}}}
    swept = replace(resolve_cache("m", "magcache", "custom", table, **custom), attention="window", reuse="forecast2",
                    cfg_reuse=cfg[0], cfg_interval=cfg[1])
    turbo = resolve_cache("m", "magcache", "turbo", table)
    assert replace(turbo, preset="custom") == swept
    assert turbo.to_dict().get("cfg_reuse", "off") == cfg[0]
