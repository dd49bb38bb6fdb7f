"""MagCache and EasyCache, chunkwise: decisions checked by arithmetic per chunk and branch, on dummy signals and in
the pipeline; the registry and presets know them."""
import pytest
import torch

from flowcache.cache import CacheSettings, EasyCacheConfig, EasyCachePolicy, MagCacheConfig, MagCachePolicy
from flowcache.cache.base import UnitSignal, relative_l1
from flowcache.cache.magcache import resample
from flowcache.errors import InputError
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.presets import resolve_cache
from tiny_models import tiny_wan


def magcache_by_hand(ratios, steps, threshold, max_skips, warmup):
    """MagCache's rule written out: compute in warm-up and on the last step; else multiply the ratios since the
    last compute, add |1 − product| to the error, reuse while error ≤ threshold and fewer than K reuses in a row."""
    out, prod, err, skips = [], 1.0, 0.0, 0
    for k in range(steps):
        if k < warmup or k == steps - 1:
            out.append("C")
            prod, err, skips = 1.0, 0.0, 0
            continue
        p = prod * ratios[k]
        e = err + abs(1 - p)
        if e <= threshold and skips < max_skips:
            out.append("R")
            prod, err, skips = p, e, skips + 1
        else:
            out.append("C")
            prod, err, skips = 1.0, 0.0, 0
    return "".join(out)


def test_magcache_rule_per_branch_by_arithmetic():
    cond = [1.0, 1.02, 0.99, 0.995, 0.99, 0.97, 0.98, 0.9, 0.95, 0.8]
    uncond = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # never changes: reuse up to K in a row
    pol = MagCachePolicy(MagCacheConfig(threshold=0.05, max_skips=2, warmup=2, mag_ratios={"cond": cond,
                                                                                           "uncond": uncond}))
    pol.prepare(10)
    got = {"cond": "", "uncond": ""}
    for k in range(10):
        for b in got:
            c = pol.should_compute((b, 0), torch.zeros(1), force=k == 9)
            got[b] += "C" if c else "R"
            if c:
                pol.remember((b, 0), torch.zeros(1))
    assert got["cond"] == magcache_by_hand(cond, 10, 0.05, 2, 2)
    assert got["uncond"] == magcache_by_hand(uncond, 10, 0.05, 2, 2) == "CCRRCRRCRC"
    assert "R" in got["cond"] and got["cond"] != got["uncond"]  # each branch walks its own ratios


def test_magcache_resamples_its_curve_and_needs_ratios():
    assert resample([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.0, 3.0, 5.0] and resample([1.0, 2.0], 2) == [1.0, 2.0]
    # MagCache's nearest_interp: index round(i * 49 / 9) = round(0, 5.44, 10.89, 16.33, 21.78, 27.22, 32.67, 38.11,
    # 43.56, 49) (a floor would give 10, 21, 32, 43)
    assert resample(list(range(50)), 10) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]
    with pytest.raises(InputError, match="calibrate"):
        MagCacheConfig(threshold=0.1)
    with pytest.raises(InputError, match="max_skips"):
        MagCacheConfig(max_skips=-1, mag_ratios={"cond": [1.0]})


def test_magcache_in_the_pipeline_follows_the_rule_in_every_chunk():
    """Tiny SkyReels model, 8 steps per chunk: every chunk and both branches make the hand-replayed decisions
    (the ratio curves are given for 16 steps and resampled to 8, as MagCache does). The branches get different
    curves, so each branch's row of the maps must be its own."""
    model = tiny_wan(seed=2)
    s = DFSettings(width=32, height=32, num_frames=12, steps=8, cfg=2.0, shift=5.0, seed=0, ar_step=2,
                   causal_block_size=3, base_num_frames=12)
    cond = [1.0] + [1.0 - 0.01 * k for k in range(1, 16)]
    uncond = [1.0] * 16
    cache = CacheSettings.of("magcache", threshold=0.12, max_skips=3, warmup=1,
                             mag_ratios={"cond": cond, "uncond": uncond})
    _, stats = DiffusionForcingPipeline(model, LatentGeometry(1, 4, 16), text_len=8)(
        torch.randn(1, 8, 32), torch.zeros(1, 8, 32), s, cache)
    want = magcache_by_hand(resample(cond, 8), 8, 0.12, 3, 1)
    want_uncond = magcache_by_hand(resample(uncond, 8), 8, 0.12, 3, 1)
    assert "R" in want and want != want_uncond
    assert stats.maps[0] == [want] * 4 and stats.maps_uncond[0] == [want_uncond] * 4
    assert stats.settings["path"] == "chunk" and stats.reused == 4 * (want.count("R") + want_uncond.count("R"))


def test_easycache_rule_by_arithmetic_one_decision_for_both_branches():
    """Inputs x_k and the first branch's outputs o_k are known: k = rel(Δo)/rel(Δx) is measured between the two
    latest computes, then k·rel(Δx) accumulates until it reaches the threshold. One decision serves both."""
    xs = [torch.full((4,), 1.0 + 0.1 * k) for k in range(12)]
    out = [x * (2.0 if i % 2 == 0 else 2.5) for i, x in enumerate(xs)]  # o = g(x): the residual o − x
    pol = EasyCachePolicy(EasyCacheConfig(threshold=0.15, warmup=3))
    got = ""
    k_rate = None
    acc, last_c, want = 0.0, None, ""
    for i, x in enumerate(xs):
        c = pol.should_compute(("*", 0), UnitSignal(torch.zeros(1), x), force=i == 11)
        got += "C" if c else "R"
        if c:
            for b in ("cond", "uncond"):  # the cond branch (first) teaches k
                pol.remember((b, 0), (out[i] if b == "cond" else out[i] * 3) - x)
        # by hand
        if i < 3 or i == 11 or k_rate is None:
            dec = True
            acc = 0.0
        else:
            acc += k_rate * relative_l1(x, xs[i - 1])
            dec = acc >= 0.15
            if dec:
                acc = 0.0
        want += "C" if dec else "R"
        if dec:
            if last_c is not None:
                j = last_c
                k_rate = relative_l1(out[i], out[j]) / relative_l1(x, xs[j])
            last_c = i
    assert got == want and "R" in got and got.endswith("C")


def test_easycache_in_the_pipeline_keeps_branches_batched():
    model = tiny_wan(seed=2)
    s = DFSettings(width=32, height=32, num_frames=12, steps=8, cfg=2.0, shift=5.0, seed=0, ar_step=2,
                   causal_block_size=3, base_num_frames=12)
    pipe = DiffusionForcingPipeline(model, LatentGeometry(1, 4, 16), text_len=8)
    _, stats = pipe(torch.randn(1, 8, 32), torch.zeros(1, 8, 32), s, CacheSettings.of("easycache", threshold=1.0,
                                                                                       warmup=2))
    assert stats.reused > 0 and stats.maps[0] == stats.maps_uncond[0]  # one decision per chunk for both
    # every call covers both branches: forwards come in pairs, one batched call per computed set
    assert stats.forwards % 2 == 0 and stats.model_calls <= stats.forwards // 2


def test_every_method_has_presets_for_the_released_models():
    for key in ("wan-1.3B", "wan-14B", "magi-4.5B"):
        for method in ("teacache", "flowcache", "magcache", "easycache"):
            for preset in ("slow", "fast"):
                s = resolve_cache(key, method, preset)
                assert s.method == method and s.preset == preset
    mag = resolve_cache("wan-1.3B", "magcache", "slow").config
    assert len(mag.mag_ratios["cond"]) == 50 and mag.mag_ratios["uncond"][1] == pytest.approx(1.02213)


# -- pinned to hand-worked numbers: the reference rule, not this package's code, produced the expected strings ---
def test_magcache_pinned_to_the_reference_rule_by_hand():
    """MagCache4Wan2.1: after the retention steps, Γ *= γ_k, err += |1 − Γ|, steps += 1; skip while err is within
    the threshold and steps ≤ K, else compute and reset (Γ = 1, err = 0, steps = 0). γ: MagCache4Wan2.1's
    published Wan2.1-T2V-1.3B cond ratios (the pack's wan-1.3B presets), taken at 10 steps by MagCache's
    nearest_interp: indices round(k·49/9) = 0, 5, 11, 16, 22, 27, 33, 38, 44, 49 give
    γ = 1.0, 0.99634, 0.99535, 0.99518, 0.99388, 0.99171, 0.98758, 0.97977, 0.95086, 0.81838.
    Retention 0.2 (2 of 10 steps); the last step computes (the pipeline forces it)."""
    ratios = resolve_cache("wan-1.3B", "magcache", "slow").config.mag_ratios
    cases = {
        # threshold 0.06, K 2 (MagCache's slow Wan setting):
        # k2: Γ = 0.99535, err = 0.00465, 1 skip -> R
        # k3: Γ = 0.99535·0.99518 = 0.990552, err = 0.00465 + 0.009448 = 0.014098, 2 skips -> R
        # k4: a 3rd skip > K -> C;  k5: Γ = 0.99171, err = 0.00829 -> R
        # k6: Γ = 0.99171·0.98758 = 0.979393, err = 0.028897 -> R;  k7: 3rd skip -> C
        # k8: Γ = 0.95086, err = 0.04914 -> R;  k9: last -> C
        (0.06, 2): "CCRRCRRCRC",
        # threshold 0.02, K 3: k4: err = 0.014098 + |1 − 0.990552·0.99388| = 0.029607 > 0.02 -> C
        # k5: err = 0.00829 -> R;  k6: err = 0.028897 -> C;  k7: err = |1 − 0.97977| = 0.02023 -> C
        # k8: err = 0.04914 -> C;  k9: last -> C
        (0.02, 3): "CCRRCRCCCC",
    }
    for (threshold, k_max), want in cases.items():
        policy = MagCachePolicy(MagCacheConfig(threshold=threshold, max_skips=k_max, warmup=2, mag_ratios=ratios))
        policy.prepare(10)
        got = ""
        for k in range(10):
            compute = policy.should_compute(("cond", 0), torch.zeros(1), force=k == 9)
            got += "C" if compute else "R"
            if compute:
                policy.remember(("cond", 0), torch.zeros(1))
        assert got == want, (threshold, k_max)


def test_easycache_pinned_by_hand():
    """EasyCache's transformation rate, as this pack applies it per chunk: k = rel(Δo) / rel(Δx) between the two
    latest computed steps (rel: mean |change| / mean |earlier|), then acc += k · rel(x_n vs x_{n−1}) each step;
    reuse while acc < threshold, else compute and reset. Threshold 0.1, warm-up 2, 8 steps; inputs x and the
    outputs o = x + residual of the computed steps as below, one decision for both branches (the first teaches k;
    the second's outputs are shifted, not scaled, so a k learnt from it would differ)."""
    x = [1.0, 1.1, 1.12, 1.14, 1.16, 1.2, 1.24, 1.3]
    o = {0: 2.0, 1: 2.42, 4: 2.6, 7: 2.9}  # outputs of the steps that compute
    # k0, k1: warm-up -> C; after k1: k = rel(2.42, 2.0) / rel(1.1, 1.0) = 0.21 / 0.1 = 2.1
    # k2: acc = 2.1·(0.02/1.1)  = 0.0381818 -> R
    # k3: acc += 2.1·(0.02/1.12) = 0.0756818 -> R
    # k4: acc += 2.1·(0.02/1.14) = 0.1125239 -> C, acc = 0; k = rel(2.6, 2.42) / rel(1.16, 1.1) = 0.0743802 /
    #     0.0545455 = 1.3636364
    # k5: acc = 1.3636364·(0.04/1.16) = 0.0470219 -> R
    # k6: acc += 1.3636364·(0.04/1.2) = 0.0924764 -> R
    # k7: the last step -> C
    policy = EasyCachePolicy(EasyCacheConfig(threshold=0.1, warmup=2))
    got = ""
    for n, xn in enumerate(x):
        signal = torch.full((4,), xn)
        compute = policy.should_compute(("*", 0), UnitSignal(torch.zeros(1), signal), force=n == 7)
        got += "C" if compute else "R"
        if compute:
            on = o.get(n, 0.0)  # a compute the hand-worked rule does not make fails the assert below, not here
            policy.remember(("cond", 0), torch.full((4,), on) - signal)
            policy.remember(("uncond", 0), torch.full((4,), on + 1.0) - signal)  # does not teach k
    assert got == "CCRRCRRC"
