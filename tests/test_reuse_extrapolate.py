"""reuse = extrapolate: a reused unit applies the line through its last two computed payloads, continued to the
current step; reuse = forecast2: the parabola through its last three. Checked by arithmetic on dummy payloads (per branch, for per-branch and shared decisions), through
the settings, presets and the cache node, and in the pipeline (same decisions and FLOPs as hold, other latents;
no reuse, no difference)."""
import pytest
import torch

from flowcache.cache import (AccumulatedL1Config, AccumulatedL1Policy, CacheSettings, EasyCacheConfig,
                             EasyCachePolicy, make_policy)
from flowcache.errors import CheckpointError, InputError
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.presets import CacheRequest, check_table, resolve_cache
from comfy_helpers import combo_options, pack_submodule, run_node, widget_defaults
from tiny_models import tiny_wan


def payload_of(step: int, branch: int) -> torch.Tensor:
    """A payload that is not a line in the step, so a wrong step index gives a wrong number."""
    return torch.tensor([float(step * step + 10 * branch), -float(step) - branch])


def walk(policy, decisions: list[bool], branches=("cond", "uncond")) -> dict[str, list[torch.Tensor | None]]:
    """Drive one unit for len(decisions) steps (True: the policy is forced to compute; the signal grows slowly, so
    a large threshold reuses the rest); returns per branch what a reuse applied at each step (None: computed)."""
    got = {b: [] for b in branches}
    for k, force in enumerate(decisions):
        if policy.shared_decision:
            compute = {b: policy.should_compute(("*", 0), torch.full((2,), k + 1.0), force) for b in branches[:1]}
            compute = {b: compute[branches[0]] for b in branches}
        else:
            compute = {b: policy.should_compute((b, 0), torch.full((2,), k + 1.0), force) for b in branches}
        for i, b in enumerate(branches):
            if compute[b]:
                policy.remember((b, 0), payload_of(k, i))
                got[b].append(None)
            else:
                got[b].append(policy.recall((b, 0)))
    return got


# steps 0, 1 and 4 compute (warm-up 2, then forced), steps 2, 3, 5, 6 reuse
PATTERN = [True, True, False, False, True, False, False]


def by_hand(branch: int) -> dict[int, torch.Tensor]:
    r = {k: payload_of(k, branch) for k in (0, 1, 4)}
    return {2: r[1] + (r[1] - r[0]) * 1, 3: r[1] + (r[1] - r[0]) * 2,
            5: r[4] + (r[4] - r[1]) * (1 / 3), 6: r[4] + (r[4] - r[1]) * (2 / 3)}


def flowcache_policy(reuse: str) -> AccumulatedL1Policy:
    # a threshold no signal reaches: every unforced step after warm-up reuses
    return make_policy(CacheSettings.of("flowcache", threshold=10.0, warmup=2, reuse=reuse))


def test_extrapolated_reuse_by_arithmetic_per_branch():
    got = walk(flowcache_policy("extrapolate"), PATTERN)
    for i, b in enumerate(("cond", "uncond")):
        expect = by_hand(i)
        assert [k for k, v in enumerate(got[b]) if v is not None] == sorted(expect)
        for k, v in expect.items():
            torch.testing.assert_close(got[b][k], v, rtol=0, atol=1e-6)


def test_hold_reuses_the_last_payload_as_it_is():
    got = walk(flowcache_policy("hold"), PATTERN)
    for i, b in enumerate(("cond", "uncond")):
        assert torch.equal(got[b][2], payload_of(1, i)) and torch.equal(got[b][3], payload_of(1, i))
        assert torch.equal(got[b][5], payload_of(4, i)) and torch.equal(got[b][6], payload_of(4, i))


def test_one_computed_payload_is_held_until_there_are_two():
    pol = make_policy(CacheSettings.of("flowcache", threshold=10.0, warmup=1, reuse="extrapolate"))
    got = walk(pol, [True, False, False, True, False])
    assert torch.equal(got["cond"][1], payload_of(0, 0)) and torch.equal(got["cond"][2], payload_of(0, 0))
    r0, r3 = payload_of(0, 0), payload_of(3, 0)
    torch.testing.assert_close(got["cond"][4], r3 + (r3 - r0) / 3, rtol=0, atol=1e-6)


def test_shared_decisions_extrapolate_on_the_shared_step_count():
    """EasyCache decides once for both branches; each branch's payloads still extrapolate on the unit's steps."""
    pol = EasyCachePolicy(EasyCacheConfig(threshold=10.0, warmup=2))
    pol.extrapolate = True
    # EasyCache learns its rate k from two computes, so the rule reuses from step 2 on; force step 4
    got = walk(pol, PATTERN)
    for i, b in enumerate(("cond", "uncond")):
        for k, v in by_hand(i).items():
            torch.testing.assert_close(got[b][k], v, rtol=0, atol=1e-6)


def test_a_reset_starts_a_new_line():
    """After a reset (a new run or long-video window) a reuse extrapolates from nothing older than the reset: with
    one payload since, it holds it."""
    pol = make_policy(CacheSettings.of("flowcache", threshold=10.0, warmup=1, reuse="extrapolate"))
    walk(pol, [True] * 4)  # payloads at steps 0-3 before the reset: kept, they would bend the line
    pol.reset()
    got = walk(pol, [True, False])
    assert torch.equal(got["cond"][1], payload_of(0, 0)) and torch.equal(got["uncond"][1], payload_of(0, 1))


def test_settings_presets_and_node_take_reuse():
    assert make_policy(CacheSettings.of("flowcache", reuse="extrapolate")).extrapolate
    assert not make_policy(CacheSettings.of("flowcache")).extrapolate
    with pytest.raises(InputError, match="reuse='linear'.*hold, extrapolate"):
        CacheSettings.of("flowcache", reuse="linear")
    entry = {"coefficients": [1.0, 0.0], "reuse": "extrapolate",
             "flowcache": {"slow": {"threshold": 0.1, "warmup": 3}, "fast": {"threshold": 0.2, "warmup": 3,
                                                                              "reuse": "hold"}}}
    table = check_table({"mine": entry}, "mine.presets.json")
    assert resolve_cache("mine", "flowcache", "slow", table).reuse == "extrapolate"   # the entry's
    assert resolve_cache("mine", "flowcache", "fast", table).reuse == "hold"          # the row's wins
    assert resolve_cache("mine", "flowcache", "custom", table, threshold=0.3).reuse == "extrapolate"
    assert CacheRequest("flowcache", "fast", (), None, "extrapolate").resolve("mine", table).reuse == "extrapolate"
    for bad in ({**entry, "reuse": "lerp"},
                {**entry, "flowcache": {"slow": {"threshold": 0.1, "reuse": 2}}}):
        with pytest.raises(CheckpointError, match="mine.presets.json.*reuse.*must be one of hold, extrapolate"):
            check_table({"mine": bad}, "mine.presets.json")


def test_cache_node_reuse_widget(pack):
    node = pack.NODE_CLASSES["FlowCacheCache"]
    errors = pack_submodule(pack, "flowcache.errors")
    spec = node.INPUT_TYPES()
    # optional: old API prompts validate; forecast2 is the core's and the sweep's only (it lost everywhere measured)
    assert combo_options(spec["optional"]["reuse"]) == ["auto", "hold", "extrapolate"]
    assert node.validate_inputs(method="flowcache", preset="slow", reuse="forecast2") == (
        "reuse: 'forecast2' is not one of auto, hold, extrapolate")
    assert "tooltip" in spec["optional"]["reuse"][1]
    defaults = widget_defaults(node)
    assert defaults["reuse"] == "auto"
    (req,) = run_node(node, **{**defaults, "reuse": "extrapolate"})
    assert req.reuse == "extrapolate"
    (req,) = run_node(node, **{k: v for k, v in defaults.items() if k != "reuse"})  # a prompt saved before it
    assert req.reuse is None
    with pytest.raises(errors.InputError, match="FlowCache Cache: reuse='sideways'"):
        run_node(node, **{**defaults, "reuse": "sideways"})


def _run(cache: CacheSettings):
    model = tiny_wan(seed=3)
    s = DFSettings(width=32, height=32, num_frames=12, steps=8, cfg=2.0, shift=5.0, seed=0, ar_step=2,
                   causal_block_size=3, base_num_frames=12)
    g = torch.Generator().manual_seed(0)
    return DiffusionForcingPipeline(model, LatentGeometry(1, 4, 16), text_len=8)(
        torch.randn(1, 8, 32, generator=g), torch.zeros(1, 8, 32), s, cache)


@pytest.mark.parametrize("attention", ["window", "block_causal"])
def test_in_the_pipeline_same_work_other_latents(attention):
    kw = dict(threshold=10.0, warmup=2, attention=attention)
    hold, s_hold = _run(CacheSettings.of("flowcache", **kw))
    line, s_line = _run(CacheSettings.of("flowcache", reuse="extrapolate", **kw))
    assert s_hold.reused > 0 and s_hold.maps == s_line.maps
    assert (s_hold.forwards, s_hold.flops, s_hold.model_calls) == (s_line.forwards, s_line.flops, s_line.model_calls)
    assert not torch.equal(hold, line) and torch.isfinite(line).all()
    # nothing reused: nothing extrapolated
    hold0, _ = _run(CacheSettings.of("flowcache", threshold=0.0, warmup=2, attention=attention))
    line0, _ = _run(CacheSettings.of("flowcache", threshold=0.0, warmup=2, attention=attention, reuse="extrapolate"))
    assert torch.equal(hold0, line0)


# -- forecast2: the parabola through the last three computed payloads ---------------------------------------------

def square(step: int) -> torch.Tensor:
    """A payload that follows t² (and 2 − t² in the second entry): a parabola recovers it exactly, a line not."""
    return torch.tensor([float(step * step), 2.0 - step * step])


def forecast_walk(reuse: str, pattern: list[bool], payload=square) -> list[torch.Tensor | None]:
    pol = make_policy(CacheSettings.of("flowcache", threshold=10.0, warmup=1, reuse=reuse))
    got = []
    for k, force in enumerate(pattern):
        if pol.should_compute(("cond", 0), torch.full((2,), k + 1.0), force):
            pol.remember(("cond", 0), payload(k))
            got.append(None)
        else:
            got.append(pol.recall(("cond", 0)))
    return got


def test_forecast2_recovers_a_parabola_on_even_steps():
    # computed at steps 0, 1, 2 (payloads 0, 1, 4): steps 3 and 4 are forecast as 9 and 16
    got = forecast_walk("forecast2", [True, True, True, False, False])
    assert torch.equal(got[3], square(3)) and torch.equal(got[4], square(4))
    # the line through steps 1 and 2 misses: 4 + (4 − 1)·1 = 7, not 9
    line = forecast_walk("extrapolate", [True, True, True, False, False])
    assert line[3][0].item() == 7.0


def test_forecast2_on_uneven_steps_by_hand():
    # computed at steps 0, 1, 4 (payloads 0, 1, 16); Newton: [1, 4] = (16 − 1)/3 = 5, [0, 1] = 1,
    # [0, 1, 4] = (5 − 1)/4 = 1, so step 5: 16 + 1·5 + 1·4·1 = 25 and step 6: 16 + 2·5 + 2·5·1 = 36
    got = forecast_walk("forecast2", [True, True, False, False, True, False, False])
    assert torch.equal(got[5], square(5)) and torch.equal(got[6], square(6))
    # steps 2 and 3 have two points only: the line through steps 0 and 1 (payload 2 and 3), as extrapolate
    line = forecast_walk("extrapolate", [True, True, False, False, True, False, False])
    assert torch.equal(got[2], line[2]) and torch.equal(got[3], line[3])
    assert got[2][0].item() == 2.0 and got[3][0].item() == 3.0


def test_forecast2_of_a_cubic_by_hand():
    # t³ computed at steps 1, 2, 4 (1, 8, 64): [2, 4] = 56/2 = 28, [1, 2] = 7, [1, 2, 4] = (28 − 7)/3 = 7,
    # step 5: 64 + 1·28 + 1·3·7 = 113 (t³ is 125: a parabola is what is promised, no more)
    cube = lambda k: torch.tensor([float(k ** 3)])
    pol = make_policy(CacheSettings.of("flowcache", threshold=10.0, warmup=0, reuse="forecast2"))
    got = {}
    for k, force in enumerate([False, True, True, False, True, False]):
        if pol.should_compute(("cond", 0), torch.full((1,), k + 1.0), force):
            pol.remember(("cond", 0), cube(k))
        else:
            got[k] = pol.recall(("cond", 0))
    # step 0 had nothing cached (computed, payload 0): points (0, 0), (1, 1), (2, 8) at step 3: Newton
    # [1, 2] = 7, [0, 1] = 1, [0, 1, 2] = 3 -> 8 + 1·7 + 1·2·3 = 21; then (1, 2, 4) at step 5: 113
    assert got[3].item() == 21.0 and got[5].item() == 113.0


def test_forecast2_keeps_three_payloads_and_bf16_stays_in_its_dtype():
    pol = make_policy(CacheSettings.of("flowcache", threshold=10.0, warmup=1, reuse="forecast2"))
    for k in range(5):
        pol.should_compute(("cond", 0), torch.full((2,), k + 1.0), True)
        pol.remember(("cond", 0), square(k).to(torch.bfloat16))
    st = pol.state(("cond", 0))
    assert [s for s, _ in st.past] == [2, 3] and st.payload_step == 4  # three kept, the older dropped
    assert pol.payload_slots == 3 and pol.state_bytes(10, 4, 2, 2) == 3 * 2 * 10 * 4 * 2
    pol.should_compute(("cond", 0), torch.full((2,), 6.0), False)
    r = pol.recall(("cond", 0))
    assert r.dtype == torch.bfloat16 and r[0].item() == 25.0


def test_forecast2_through_settings():
    from flowcache.cache import residuals_kept
    assert make_policy(CacheSettings.of("flowcache", reuse="forecast2")).order == 2
    assert residuals_kept(CacheSettings.of("flowcache", threshold=0.1, reuse="forecast2")) == 3
    assert residuals_kept(CacheSettings.of("flowcache", threshold=0.0, reuse="forecast2")) == 0
    with pytest.raises(InputError, match="reuse='cubic': must be one of hold, extrapolate, forecast2"):
        CacheSettings.of("flowcache", reuse="cubic")


@pytest.mark.parametrize("attention", ["window", "block_causal"])
def test_forecast2_in_the_pipeline_same_work_other_latents(attention):
    kw = dict(threshold=10.0, warmup=2, attention=attention)
    hold, s_hold = _run(CacheSettings.of("flowcache", **kw))
    quad, s_quad = _run(CacheSettings.of("flowcache", reuse="forecast2", **kw))
    assert s_hold.reused > 0 and s_hold.maps == s_quad.maps
    assert (s_hold.forwards, s_hold.flops, s_hold.model_calls) == (s_quad.forwards, s_quad.flops, s_quad.model_calls)
    assert not torch.equal(hold, quad) and torch.isfinite(quad).all()
    hold0, _ = _run(CacheSettings.of("flowcache", threshold=0.0, warmup=2, attention=attention))
    quad0, _ = _run(CacheSettings.of("flowcache", threshold=0.0, warmup=2, attention=attention, reuse="forecast2"))
    assert torch.equal(hold0, quad0)
