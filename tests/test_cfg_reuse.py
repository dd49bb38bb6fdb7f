"""CFG-aware reuse (``CacheSettings.cfg_reuse``, ``flowcache/cache/cfg.py``): the unconditional branch computes only
on every cfg_interval-th step its conditional branch computes; between, it reuses its own payload ("own") or the
conditional output plus the cached uncond − cond difference ("delta"). Checked by arithmetic on dummy payloads
through the runner, and in a tiny diffusion-forcing run: same decisions, same FLOPs; no reuse, the same video."""
import pytest
import torch

from flowcache.cache import CacheSettings, make_policy
from flowcache.errors import InputError
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.runner import RunState, Segment, Step, Unit, Work
from flowcache.stats import RunStats
from comfy_helpers import combo_options, run_node, widget_defaults
from tiny_models import tiny_wan

BRANCHES = ("cond", "uncond")
# warm-up 2 and a threshold no signal reaches: the cond branch computes steps 0, 1 and the forced 4 and 6
FORCED = [False, False, False, False, True, False, True]


def x_of(k: int) -> torch.Tensor:
    return torch.tensor([100.0 * k, 0.0])  # the unit's input at step k


def r_of(branch: str, k: int) -> torch.Tensor:
    """The residual a compute gives: cond [k, 1], uncond [10 + 2k, −1]."""
    return torch.tensor([float(k), 1.0]) if branch == "cond" else torch.tensor([10.0 + 2 * k, -1.0])


def drive(cfg_reuse: str, interval: int = 2, reuse: str = "hold"):
    """One unit through the runner's decide / reuse / book as a Wan step does them; per step the decisions and
    each branch's output (computed: x + r; reused: the ``Reuse`` rule, relative to ``base_branch``)."""
    settings = CacheSettings.of("flowcache", threshold=10.0, warmup=2, reuse=reuse, cfg_reuse=cfg_reuse,
                                cfg_interval=interval)
    run = RunState(make_policy(settings), RunStats(mode="flowcache"), BRANCHES, len(FORCED))
    run.begin_segment(Segment(0, 1, len(FORCED)))
    decisions, outputs = [], []
    for k, force in enumerate(FORCED):
        step = Step(k, [Unit(0, (0,), force=force)])
        d = run.decide(step, {0: torch.full((2,), k + 1.0)})
        work, out = Work(), {}
        for b in BRANCHES:  # cond first: a delta reuse reads its output
            key = (b, 0)
            if d[key]:
                out[b] = run.reuse.output(key, x_of(k), x_of(k) + r_of(b, k), work)
            else:
                base = run.reuse.base_branch(b)
                out[b] = run.reuse.output(key, x_of(k) if base is None else out[base], None, work)
        run.book(work)
        run.end_step(step, d)
        decisions.append((d[("cond", 0)], d[("uncond", 0)]))
        outputs.append(out)
    run.end_segment()
    return decisions, outputs, run.stats


def test_the_uncond_branch_computes_on_every_interval_th_cond_compute():
    decisions, _, stats = drive("own", interval=2)
    # cond computes 0, 1, 4, 6; uncond: 0 (nothing cached), sits out 1 (1st cond compute since), 4 and 6 forced
    assert [c for c, _ in decisions] == [True, True, False, False, True, False, True]
    assert [u for _, u in decisions] == [True, False, False, False, True, False, True]
    assert stats.maps == [["CCRRCRC"]] and stats.maps_uncond == [["CRRRCRC"]]
    off, _, off_stats = drive("off")
    assert [u for _, u in off] == [c for c, _ in off]  # today: the uncond rule decides as the cond one here
    assert off_stats.computed == stats.computed + 1  # the one uncond compute saved
    # interval 1: exactly today's decisions
    assert drive("own", interval=1)[0] == off
    assert drive("delta", interval=1)[0] == off


def test_own_reuse_applies_the_uncond_residual_by_arithmetic():
    _, out, _ = drive("own", interval=2)
    # step 1: x1 + r_uncond(0) = [100, 0] + [10, −1] = [110, −1]; steps 2, 3 likewise from their input
    assert torch.equal(out[1]["uncond"], torch.tensor([110.0, -1.0]))
    assert torch.equal(out[3]["uncond"], torch.tensor([310.0, -1.0]))
    # step 5: x5 + r_uncond(4) = [500, 0] + [18, −1] = [518, −1]
    assert torch.equal(out[5]["uncond"], torch.tensor([518.0, -1.0]))
    # the cond branch is untouched: step 2 holds r_cond(1) = [1, 1] -> [201, 1]
    assert torch.equal(out[2]["cond"], torch.tensor([201.0, 1.0]))


def test_delta_reuse_is_the_cond_output_plus_the_cached_difference_by_arithmetic():
    _, out, _ = drive("delta", interval=2)
    # kept at step 0: r_uncond(0) − r_cond(0) = [10, −1] − [0, 1] = [10, −2]
    # step 1 (cond computed, uncond sat out): cond x1 + r_cond(1) = [101, 1], uncond [101, 1] + [10, −2] = [111, −1]
    assert torch.equal(out[1]["cond"], torch.tensor([101.0, 1.0]))
    assert torch.equal(out[1]["uncond"], torch.tensor([111.0, -1.0]))  # own reuse gave [110, −1]
    # step 2 (both reuse): cond holds r_cond(1): [201, 1]; uncond [201, 1] + [10, −2] = [211, −1]
    assert torch.equal(out[2]["uncond"], torch.tensor([211.0, -1.0]))
    # step 5: the difference from step 4, [18, −1] − [4, 1] = [14, −2]; cond [504, 1]; uncond [518, −1]
    assert torch.equal(out[5]["uncond"], torch.tensor([518.0, -1.0]))
    # computed steps are the computed outputs
    assert torch.equal(out[4]["uncond"], x_of(4) + r_of("uncond", 4))


def test_delta_extrapolates_the_difference():
    _, out, _ = drive("delta", interval=1, reuse="extrapolate")
    # interval 1: both compute 0, 1, 4, 6. Step 2: cond line through r_cond(0), r_cond(1): [2, 1] -> [202, 1];
    # the difference is constant ([10 + k, −2] − ... = [10 + k, −2]): line through [10, −2], [11, −2] at 2:
    # [12, −2]; uncond [202, 1] + [12, −2] = [214, −1] = x2 + r_uncond(2) exactly (both residuals are lines)
    assert torch.equal(out[2]["uncond"], x_of(2) + r_of("uncond", 2))


def test_settings_validate_and_stay_as_today_when_off():
    s = CacheSettings.of("flowcache", cfg_reuse="delta", cfg_interval=3)
    assert s.to_dict()["cfg_reuse"] == "delta" and s.to_dict()["cfg_interval"] == 3
    assert "cfg_reuse" not in CacheSettings.of("flowcache").to_dict()  # stats and preset rows as they were
    assert not make_policy(CacheSettings.of("flowcache")).cfg.active
    with pytest.raises(InputError, match="cfg_reuse='fast': must be one of off, own, delta"):
        CacheSettings.of("flowcache", cfg_reuse="fast")
    with pytest.raises(InputError, match="cfg_interval"):
        CacheSettings.of("flowcache", cfg_reuse="own", cfg_interval=0)


def test_cache_node_cfg_widgets(pack):
    node = pack.NODE_CLASSES["FlowCacheCache"]
    spec = node.INPUT_TYPES()
    assert combo_options(spec["optional"]["cfg_reuse"]) == ["auto", "off", "own", "delta"]
    assert "tooltip" in spec["optional"]["cfg_reuse"][1] and "tooltip" in spec["optional"]["cfg_interval"][1]
    defaults = widget_defaults(node)
    assert defaults["cfg_reuse"] == "auto" and defaults["cfg_interval"] == 0  # 0: the presets' (2 if none)
    (req,) = run_node(node, **defaults)
    assert req.cfg_reuse is None and req.cfg_interval is None
    (req,) = run_node(node, **{**defaults, "cfg_reuse": "delta", "cfg_interval": 3})
    assert (req.cfg_reuse, req.cfg_interval) == ("delta", 3)
    (req,) = run_node(node, **{k: v for k, v in defaults.items() if k not in ("cfg_reuse", "cfg_interval")})
    assert req.cfg_reuse is None and req.cfg_interval is None  # a prompt saved before them
    assert node.validate_inputs(method="flowcache", preset="slow", cfg_reuse="sometimes").startswith(
        "cfg_reuse: 'sometimes' is not one of auto, off, own, delta")


def _run(cache: CacheSettings):
    model = tiny_wan(seed=3)
    s = DFSettings(width=32, height=32, num_frames=12, steps=8, cfg=2.0, shift=5.0, seed=0, ar_step=2,
                   causal_block_size=3, base_num_frames=12)
    g = torch.Generator().manual_seed(0)
    return DiffusionForcingPipeline(model, LatentGeometry(1, 4, 16), text_len=8)(
        torch.randn(1, 8, 32, generator=g), torch.zeros(1, 8, 32), s, cache)


def forwards_of(stats) -> int:
    """One forward per computed (branch, chunk) step on the block-causal chunk path."""
    return sum(m.count("C") for seg in stats.maps + stats.maps_uncond for m in seg)


@pytest.mark.parametrize("reuse", ["hold", "forecast2"])
def test_in_the_pipeline(reuse):
    kw = dict(threshold=10.0, warmup=2, reuse=reuse)
    base, s_base = _run(CacheSettings.of("flowcache", **kw))
    own, s_own = _run(CacheSettings.of("flowcache", cfg_reuse="own", **kw))
    delta, s_delta = _run(CacheSettings.of("flowcache", cfg_reuse="delta", **kw))
    # the cond branch decides as before; the uncond one computes less; forwards are the computed chunk-steps
    assert s_own.maps == s_base.maps and s_own.maps_uncond != s_base.maps_uncond
    assert forwards_of(s_base) == s_base.forwards and forwards_of(s_own) == s_own.forwards
    assert s_own.forwards < s_base.forwards and s_own.flops < s_base.flops
    assert s_own.settings["cfg_reuse"] == "own" and "cfg_reuse" not in s_base.settings
    # same decisions, same work: own and delta differ only in what a reuse applies
    assert s_delta.maps == s_own.maps and s_delta.maps_uncond == s_own.maps_uncond
    assert (s_delta.forwards, s_delta.flops, s_delta.flops_paper, s_delta.model_calls) == \
        (s_own.forwards, s_own.flops, s_own.flops_paper, s_own.model_calls)
    assert not torch.equal(own, delta) and torch.isfinite(delta).all() and torch.isfinite(own).all()
    # interval 1 with FlowCache's rule (both branches read the same e0): today's run to the bit
    same, s_same = _run(CacheSettings.of("flowcache", cfg_reuse="own", cfg_interval=1, **kw))
    assert torch.equal(same, base) and (s_same.forwards, s_same.flops) == (s_base.forwards, s_base.flops)


def test_no_reuse_is_the_same_video():
    off, _ = _run(CacheSettings.of("flowcache", threshold=0.0, warmup=2))
    for mode in ("own", "delta"):
        got, stats = _run(CacheSettings.of("flowcache", threshold=0.0, warmup=2, cfg_reuse=mode))
        assert torch.equal(got, off) and stats.reused == 0


def test_the_memory_plan_is_unchanged():
    """The delta takes the uncond residual's slot: no payload more to plan for."""
    model = tiny_wan(seed=3)
    s = DFSettings(width=32, height=32, num_frames=12, steps=8, cfg=2.0, shift=5.0, seed=0, ar_step=2,
                   causal_block_size=3, base_num_frames=12)
    pipe = DiffusionForcingPipeline(model, LatentGeometry(1, 4, 16), text_len=8)
    plans = [pipe.plan(s, CacheSettings.of("flowcache", threshold=0.1, cfg_reuse=m)).memory for m in
             ("off", "own", "delta")]
    assert plans[0].to_dict() == plans[1].to_dict() == plans[2].to_dict()
