"""Cache decisions checked by arithmetic, per unit and per branch, on dummy signals and in the pipeline."""
from dataclasses import fields

import numpy as np
import pytest
import torch

from flowcache.cache import AccumulatedL1Config, AccumulatedL1Policy, CacheSettings, make_policy, relative_l1
from flowcache.cache.easycache import EasyCacheConfig
from flowcache.presets import SHARED_VALUES, default_request, resolve_cache
from flowcache.df_schedule import timestep_matrix
from flowcache.errors import InputError
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.schedulers import flow_sigmas
from tiny_models import tiny_wan


def expected_decisions(rels, threshold, warmup, forced_last=True, poly=(1.0, 0.0)):
    """The rule written out by hand: warm-up and last step compute; accumulate; reuse below threshold."""
    out, acc = [], 0.0
    for i, r in enumerate(rels):
        if i < warmup or (forced_last and i == len(rels) - 1) or threshold <= 0:
            acc = 0.0
            out.append(True)
            continue
        acc += np.polyval(poly, r)
        if acc < threshold:
            out.append(False)
        else:
            acc = 0.0
            out.append(True)
    return out


def test_rule_on_dummy_signals_per_unit_and_branch():
    # signal s_k = 1 + k*0.1 for unit A, constant for unit B: relative L1s are known exactly
    pol = AccumulatedL1Policy(AccumulatedL1Config(threshold=0.25, warmup=2, coefficients=[1.0, 0.0]))
    sa = [torch.full((4,), 1.0 + 0.1 * k) for k in range(10)]
    rels = [0.0] + [relative_l1(sa[k], sa[k - 1]) for k in range(1, 10)]
    got_cond = []
    got_uncond = []
    for k in range(10):
        got_cond.append(pol.should_compute(("cond", 0), sa[k], force=(k == 9)))
        if got_cond[-1]:
            pol.remember(("cond", 0), torch.zeros(1))
        got_uncond.append(pol.should_compute(("uncond", 0), torch.ones(4), force=(k == 9)))
        if got_uncond[-1]:
            pol.remember(("uncond", 0), torch.zeros(1))
    assert got_cond == expected_decisions(rels, 0.25, 2)
    # a constant signal accumulates nothing: reuse everything between warm-up and the forced last step
    assert got_uncond == [True, True] + [False] * 7 + [True]
    assert pol.state(("cond", 0)).computed + pol.state(("cond", 0)).reused == 10


def test_polynomial_rescale_and_threshold_zero():
    poly = [2.0, 0.0, 0.05]  # 2x^2 + 0.05
    pol = AccumulatedL1Policy(AccumulatedL1Config(threshold=0.2, warmup=1, coefficients=poly))
    sig = [torch.full((3,), v) for v in (1.0, 1.1, 1.2, 1.25, 1.3, 2.0)]
    rels = [0.0] + [relative_l1(sig[k], sig[k - 1]) for k in range(1, 6)]
    got = []
    for k, s in enumerate(sig):
        got.append(pol.should_compute("u", s, force=False))
        if got[-1]:
            pol.remember("u", torch.zeros(1))
    assert got == expected_decisions(rels, 0.2, 1, forced_last=False, poly=poly)
    never = AccumulatedL1Policy(AccumulatedL1Config(threshold=0.0, warmup=0, coefficients=[1.0, -1.0]))  # negative rescale
    assert all(never.should_compute("u", s) for s in sig)


def test_pipeline_decisions_follow_rule_per_chunk_and_branch():
    """Replays the rule from each chunk's own e0 trajectory (which depends only on its timesteps)."""
    model = tiny_wan(seed=2)
    s = DFSettings(width=32, height=32, num_frames=12, steps=8, cfg=2.0, shift=5.0, seed=0, ar_step=2,
                   causal_block_size=3, base_num_frames=12)
    thr, warm, poly = 1.2, 2, [1.0, 0.0]  # a random tiny model's e0 moves ~0.5-0.9 per step
    pipe = DiffusionForcingPipeline(model, LatentGeometry(1, 4, 16), text_len=8)
    cond = torch.randn(1, 8, 32)
    _, stats = pipe(cond, torch.zeros(1, 8, 32), s, CacheSettings.of("flowcache", threshold=thr, warmup=warm,
                                                                 coefficients=poly))
    _, ts = flow_sigmas(s.steps, s.shift)
    with torch.no_grad():
        e0s = [model.time_embed(torch.full((1, 3), float(t)), s.fps)[1] for t in ts]
    rels = [0.0] + [relative_l1(e0s[k], e0s[k - 1]) for k in range(1, len(ts))]
    want = "".join("C" if c else "R" for c in expected_decisions(rels, thr, warm))
    assert "R" in want and want.endswith("C")
    assert stats.maps[0] == [want] * 4          # every chunk walks the same schedule
    assert stats.maps_uncond[0] == [want] * 4   # the uncond branch decides on its own, identically
    counts = stats.chunk_counts()[0]
    assert counts[0] == {"computed": 2 * want.count("C"), "reused": 2 * want.count("R")}


def test_teacache_is_one_decision_per_window():
    model = tiny_wan(seed=2)
    s = DFSettings(width=32, height=32, num_frames=12, steps=8, cfg=2.0, shift=5.0, seed=0, ar_step=2,
                   causal_block_size=3, base_num_frames=12)
    pipe = DiffusionForcingPipeline(model, LatentGeometry(1, 4, 16), text_len=8)
    _, stats = pipe(torch.randn(1, 8, 32), torch.zeros(1, 8, 32), s,
                    CacheSettings.of("teacache", threshold=1.2, warmup=3, coefficients=[1.0, 0.0]))
    iters = timestep_matrix(4, flow_sigmas(8, 5.0)[1], 2).iterations
    (row,) = stats.maps[0][:1]
    assert len(row) == iters and row[:3] == "CCC" and row[-1] == "C" and "R" in row
    assert stats.forwards == 2 * row.count("C")


def test_presets_are_data():
    slow = resolve_cache("wan-1.3B", "flowcache", "slow")
    fast = resolve_cache("wan-1.3B", "flowcache", "fast", threshold=0.9)  # named presets ignore the widgets
    custom = resolve_cache("wan-1.3B", "flowcache", "custom", threshold=0.123, warmup=3, kv_budget=2)
    assert (slow.config.threshold, slow.config.warmup, fast.config.threshold) == (0.1, 5, 0.15)
    assert (custom.config.threshold, custom.config.warmup, custom.kv_budget) == (0.123, 3, 2)
    assert slow.config.coefficients[0] == pytest.approx(-5.21862437e04)
    assert resolve_cache("wan-14B", "flowcache", "slow").config.coefficients[0] == pytest.approx(-3.03318725e05)
    with pytest.raises(InputError, match="wan-dim64.*calibrate"):
        resolve_cache("wan-dim64", "flowcache", "slow")
    with pytest.raises(InputError, match="method="):
        resolve_cache("wan-1.3B", "fastest", "slow")
    # off needs no presets; custom runs an uncalibrated model with the identity rescale
    assert resolve_cache("wan-dim64", "off", "slow").method == "off"
    assert resolve_cache("wan-dim64", "flowcache", "custom", threshold=0.2).config.coefficients == [1.0, 0.0]


def test_with_no_cache_chosen_every_model_gets_one():
    """FlowCache's slow preset where the model has it; calibration-free easycache with its defaults otherwise."""
    request, note = default_request("wan-1.3B")
    assert (request.method, request.preset, note) == ("flowcache", "slow", "no cache node connected: FlowCache, "
                                                                           "the model's slow preset")
    request, note = default_request("wan-dim64")
    settings = request.resolve("wan-dim64")
    assert settings.method == "easycache" and settings.config == EasyCacheConfig() and settings.path == "chunk"
    assert "'wan-dim64' has no presets" in note and "python -m flowcache calibrate" in note
    # easycache's defaults read nothing calibrated: no model-level values among its settings
    assert not {f.name for f in fields(EasyCacheConfig)} & set(SHARED_VALUES)
    # a model's own presets count: a calibrated file's extra rows
    extra = {"mine": {"coefficients": [1.0, 0.0], "flowcache": {"slow": {"threshold": 0.1, "warmup": 2}}}}
    assert default_request("mine", extra)[0].method == "flowcache"
    assert default_request("mine", {"mine": {"coefficients": [1.0, 0.0]}})[0].method == "easycache"


@pytest.mark.parametrize("widget,value", [("threshold", float("nan")), ("threshold", float("inf")),
                                          ("warmup_steps", -1), ("threshold", -0.1)])
def test_config_knobs_are_validated_naming_the_widget(widget, value):
    field = {"warmup_steps": "warmup"}.get(widget, widget)
    for method in ("teacache", "flowcache"):
        with pytest.raises(InputError, match=widget):
            CacheSettings.of(method, **{field: value})
    with pytest.raises(InputError, match="kv_budget"):
        CacheSettings.of("flowcache", kv_budget=-1)
    with pytest.raises(InputError, match="mix_lambda"):
        CacheSettings.of("flowcache", mix_lambda=float("nan"))


# -- pinned to hand-worked numbers: the reference rule, not this package's code, produced the expected strings ---
# TeaCache4Wan2.1's rescale of Wan2.1-T2V-1.3B's e0 change (use_ret_steps), the pack's wan-1.3B coefficients:
# p(x) = -52186.2437 x^4 + 9230.41404 x^3 - 528.275948 x^2 + 13.6987616 x - 0.0499875664, so
# p(0.005) = 0.0064205, p(0.01) = 0.0428810, p(0.02) = 0.0781708, p(0.03) = 0.0924773, p(0.04) = 0.1098711.
WAN_1_3B_E0 = [-52186.2437, 9230.41404, -528.275948, 13.6987616, -0.0499875664]


def signal_with_changes(changes: list[float], start: float = 1.0) -> list[torch.Tensor]:
    """Constant signals whose relative L1 change from one step to the next is ``changes[k - 1]`` at step k."""
    values = [start]
    for r in changes:
        values.append(values[-1] * (1 + r))
    return [torch.full((4,), v) for v in values]


def test_teacache_pinned_to_the_reference_rule_by_hand():
    """TeaCache4Wan2.1: before ret_steps compute and reset; else acc += p(rel L1 of e0 since the previous step,
    reused or not); reuse while acc < threshold, else compute and reset acc to 0. The last step computes (the
    pipeline forces it). Threshold 0.2 (SkyReels' "0.2 ~ 3x"), ret_steps 1, 8 steps, one decision per window."""
    policy = make_policy(CacheSettings.of("teacache", threshold=0.2, warmup=1, coefficients=WAN_1_3B_E0))
    signals = signal_with_changes([0.02, 0.01, 0.03, 0.005, 0.01, 0.04, 0.02])
    # step 0: ret step                                   -> C
    # step 1: acc = p(0.02)            = 0.0781708 < 0.2 -> R
    # step 2: acc = 0.0781708 + p(0.01) = 0.1210518 < 0.2 -> R
    # step 3: acc = 0.1210518 + p(0.03) = 0.2135291      -> C, acc = 0
    # step 4: acc = p(0.005)           = 0.0064205       -> R
    # step 5: acc = 0.0064205 + p(0.01) = 0.0493015       -> R
    # step 6: acc = 0.0493015 + p(0.04) = 0.1591726       -> R
    # step 7: the last step                              -> C
    got = ""
    for k, s in enumerate(signals):
        compute = policy.should_compute(("cond", "window"), s, force=k == 7)
        got += "C" if compute else "R"
        if compute:
            policy.remember(("cond", "window"), torch.zeros(1))
    assert got == "CRRCRRRC"


def test_flowcache_pinned_per_chunk_by_hand():
    """FlowCache's rule is TeaCache's per chunk, each chunk on its own step counter: SkyReels-V2-1.3B's slow
    preset (threshold 0.1, warm-up 5 of the chunk's own steps, the Wan e0 rescale above), 9 steps a chunk, chunk 1
    starting 2 steps after chunk 0 (ar_step 2). Both walk the same own-step e0 changes (e0 depends on the timestep
    only) from other signal levels, so no chunk's state may leak into the other's."""
    policy = make_policy(CacheSettings.of("flowcache", threshold=0.1, warmup=5, coefficients=WAN_1_3B_E0))
    changes = [0.05, 0.04, 0.03, 0.03, 0.02, 0.01, 0.02, 0.03]
    signals = {0: signal_with_changes(changes, 1.0), 1: signal_with_changes(changes, 3.0)}
    # own steps 0-4: warm-up                                  -> CCCCC
    # own step 5: acc = p(0.02)             = 0.0781708 < 0.1 -> R
    # own step 6: acc = 0.0781708 + p(0.01) = 0.1210518       -> C, acc = 0
    # own step 7: acc = p(0.02)             = 0.0781708       -> R
    # own step 8: the chunk's last step                       -> C
    got = {0: "", 1: ""}
    for step in range(11):  # global steps; chunk c denoises at steps 2c .. 2c + 8
        for chunk in (0, 1):
            own = step - 2 * chunk
            if 0 <= own < 9:
                compute = policy.should_compute(("cond", chunk), signals[chunk][own], force=own == 8)
                got[chunk] += "C" if compute else "R"
                if compute:
                    policy.remember(("cond", chunk), torch.zeros(1))
    assert got == {0: "CCCCCRCRC", 1: "CCCCCRCRC"}
