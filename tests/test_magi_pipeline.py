"""MAGI-1 chunk-wise AR pipeline: schedule against the reference, the FlowCache/TeaCache rules by arithmetic on a
fake model, equivalences and determinism on a tiny random MAGI-1 DiT, bounded KV store, I2V/V2V, guidance,
and model-type errors."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from flowcache.cache import CacheSettings
from flowcache.errors import CheckpointError, InputError
from flowcache import plan as plan_mod
from flowcache.kv import store as store_mod
from flowcache.models import load_model
from flowcache.models.magi import MagiConfig, MagiDiT, magi_config_from_state_dict
from flowcache.pipelines import DiffusionForcingPipeline, LatentGeometry
from flowcache.pipelines import magi as magi_mod
from flowcache.pipelines.magi import MagiPipeline, MagiSettings, stage_schedule, time_schedule
from flowcache.runner import RunHooks
from test_magi_model import SMALL, make_sd
from tiny_models import tiny_wan

GEO = LatentGeometry(temporal_stride=4, spatial_stride=8, channels=4)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- schedule
def test_stage_schedule_matches_reference():
    sched = stage_schedule(60, 6, 4, 64)  # 240 frames -> 60 latent frames -> 10 chunks, FlowCache's T2V run
    assert len(sched) == 16 * 13 == 208
    seen: dict[int, list[tuple[int, int]]] = {}
    for k, window in enumerate(sched):
        ids = [c for c, _ in window]
        assert ids == list(range(ids[0], ids[-1] + 1)) and len(ids) <= 4
        assert [i for _, i in window] == sorted((i for _, i in window), reverse=True)  # oldest = most denoised
        for c, i in window:
            assert i == k - 16 * c  # chunk c starts at stage c, 16 steps per stage
            seen.setdefault(c, []).append((k, i))
    assert sorted(seen) == list(range(10))
    assert all([i for _, i in steps] == list(range(64)) for steps in seen.values())  # exactly num_steps each

    # the reference's worked example: 4 chunks, 64 steps -> 112 forwards
    ex = stage_schedule(24, 6, 4, 64)
    assert len(ex) == 112
    assert ex[0] == [(0, 0)] and ex[15] == [(0, 15)] and ex[16] == [(0, 16), (1, 0)]
    assert [c for c, _ in ex[4 * 16]] == [1, 2, 3] and [c for c, _ in ex[6 * 16]] == [3]

    # generate_sequences' documented examples (per stage clip_start / clip_end / t ranges), one step per stage
    ex2 = stage_schedule(8, 1, 4, 4)
    assert [w[0][0] for w in ex2] == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert [w[-1][0] + 1 for w in ex2] == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8]
    t_start, t_end = [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3], [1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4]
    assert [[i for _, i in w] for w in ex2] == [list(range(a, b))[::-1] for a, b in zip(t_start, t_end)]
    ex3 = stage_schedule(8, 1, 4, 4, prefix_chunks=2)
    assert [w[0][0] for w in ex3] == [2, 2, 2, 2, 3, 4, 5, 6, 7]
    assert [w[-1][0] + 1 for w in ex3] == [3, 4, 5, 6, 7, 8, 8, 8, 8]
    assert len(stage_schedule(8, 1, 1, 4)) == 8 * 4  # window 1: one chunk after the other

    with pytest.raises(InputError, match="multiple of window_size"):
        stage_schedule(24, 6, 4, 30)


def test_time_schedule_hand_formula():
    for n in (8, 16, 64):
        s = torch.arange(n + 1, dtype=torch.float64) / n
        hand = s ** 2 / (3 - 2 * s ** 2)  # (1/3)·u / (1 + (1/3 − 1)·u) with u = s²
        torch.testing.assert_close(time_schedule(n).double(), hand, rtol=0, atol=1e-6)
    t16 = [0, .0013, .0053, .012, .0217, .0348, .0517, .0731, .1, .1337, .1761, .23, .3, .393, .5213, .7075, 1]
    assert torch.allclose(time_schedule(16).double(), torch.tensor(t16, dtype=torch.float64), atol=6e-5)
    t64 = time_schedule(64)
    assert [round(float(t64[i]), 4) for i in (0, 16, 32, 48, 64)] == [0, 0.0217, 0.1, 0.3, 1.0]
    u = torch.tensor([0, .125, .1875, .25, .375, .4375, .5, .625, .6875, .75, .875, .9375, 1.0], dtype=torch.float64)
    torch.testing.assert_close(time_schedule(12).double(), u ** 2 / (3 - 2 * u ** 2), rtol=0, atol=1e-6)
    assert magi_mod.step_intervals(12)[:3] == [2, 1, 1]


def test_guidance_buckets():
    w = magi_mod.cfg_weights
    s = MagiSettings()
    assert w(s, 0.0) == (7.5, 1.5 - 7.5, 1 - 1.5)
    assert w(s, 0.2999) == (7.5, -6.0, -0.5)
    assert w(s, 0.3) == (0.0, 1.0, 0.0) and w(s, 0.9) == (0.0, 1.0, 0.0)


# ------------------------------------------------------------------------------------------------- fake model
class FakeMagi(MagiDiT):
    """A MagiDiT whose patch embedding is the identity and whose velocity is -a(chunk)·x."""

    def __init__(self):
        super().__init__(MagiConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                                    ffn_hidden_size=32, in_channels=4, out_channels=4, caption_channels=8,
                                    caption_max_length=4, cond_dim=8, xattn_dim=32, rope_bands=2), torch.float32)
        self.seen, self.calls = [], []

    def embed_input(self, x):
        self.seen.append(x.clone())
        return x.clone()

    def forward(self, x, t, caption, caption_mask, chunk_start=0, kv=None, distill_dt=None, uncond=False, between=None):
        self.calls.append((chunk_start, float(t), kv is None, distill_dt))
        return -(0.5 + 0.25 * chunk_start) * x


def fake_settings(**kw):
    """FlowCache's MAGI loop on both paths (full causal history, no clean refresh): the arithmetic below is
    about the cache rules; MAGI-1's own key ranges and refresh have their own tests."""
    base = dict(num_frames=40, width=16, height=16, num_steps=16, window_size=4, chunk_width=2, seed=5,
                distill=True, noise2clean_kvrange=(), clean_refresh=False)
    return MagiSettings(**{**base, **kw})


def replay(signals, forced, thr, warm):
    """The accumulate rule by hand: per unit, C while warming up / forced / no previous signal, else accumulate
    rel-L1 and reuse while under the threshold."""
    out, acc, prev = [], 0.0, None
    for j, (sig, f) in enumerate(zip(signals, forced)):
        if f or j < warm or prev is None:
            acc, c = 0.0, True
        else:
            acc += float((sig - prev).abs().mean() / prev.abs().mean())
            c = acc >= thr
            if c:
                acc = 0.0
        out.append("C" if c else "R")
        prev = sig
    return "".join(out)


@pytest.mark.parametrize("warm", [2, 0])
def test_flowcache_rule_on_magi_by_arithmetic(warm):
    model = FakeMagi()
    s = fake_settings()
    thr = 0.03
    cap = torch.randn(1, 3, 8)
    out, stats = MagiPipeline(model, GEO)(cap, None, s, CacheSettings.of("flowcache", threshold=thr, warmup=warm))
    sched = stage_schedule(10, 2, 4, 16)
    total = len(sched)
    ts = time_schedule(16)
    xs: dict[int, list] = {}
    forced: dict[int, list] = {}
    it = iter(model.seen)
    for k, window in enumerate(sched):
        for c, _ in window:
            xs.setdefault(c, []).append(next(it))
            forced.setdefault(c, []).append(k in (0, total - 1))
    assert next(it, None) is None  # one signal per active chunk and step
    maps = stats.maps[0]
    assert stats.windows == 1 and stats.iterations == [total] and len(maps) == 5
    for c in range(5):
        want = replay(xs[c], forced[c], thr, warm)
        assert maps[c] == want and want[0] == "C"  # a newly entered chunk always computes
        assert "R" in want
    assert maps[0][0] == "C" and maps[4][-1] == "C"  # global first and last steps
    assert sum(m.count("C") for m in maps) == stats.computed == stats.forwards == len(model.calls)
    assert sum(m.count("R") for m in maps) == stats.reused > 0
    assert stats.flops < stats.flops_nocache

    # the latent update: computed -> Euler with the model's velocity; reused -> exactly the last computed Δx
    for c in range(5):
        a = 0.5 + 0.25 * c
        last = None
        seq = xs[c] + [out[:, :, 2 * c:2 * c + 2]]
        for j in range(16):
            if maps[c][j] == "C":
                dt = float(ts[j + 1] - ts[j])
                torch.testing.assert_close(seq[j + 1], seq[j] + (-a * seq[j]) * dt, rtol=0, atol=0)
                last = seq[j + 1] - seq[j]
            else:
                assert torch.equal(seq[j + 1], seq[j] + last)
    assert all(kv is False and dd == 8 for _, _, kv, dd in model.calls)  # KV context, distill dt 16/4·2


def test_teacache_is_one_whole_window_decision_on_magi():
    model = FakeMagi()
    thr, warm = 0.03, 3
    out, stats = MagiPipeline(model, GEO)(torch.randn(1, 3, 8), None, fake_settings(),
                                          CacheSettings.of("teacache", threshold=thr, warmup=warm))
    sched = stage_schedule(10, 2, 4, 16)
    assert len(model.seen) == len(sched)  # one whole-window signal per step
    forced = [k in (0, len(sched) - 1) or (k > 0 and [c for c, _ in sched[k]] != [c for c, _ in sched[k - 1]])
              for k in range(len(sched))]
    want = replay(model.seen, forced, thr, warm)
    assert "R" in want and want[:warm] == "C" * warm
    maps = stats.maps[0]
    pos = {c: 0 for c in range(5)}
    for k, window in enumerate(sched):
        for c, _ in window:
            assert maps[c][pos[c]] == want[k]  # every chunk of the window shares the decision
            pos[c] += 1
    # a reuse adds the stored whole-window update: within a stage each step repeats the last computed Δx
    for k in range(1, len(sched)):
        if want[k] == "R":
            j = max(i for i in range(k) if want[i] == "C")
            nxt = model.seen[k + 1] if k + 1 < len(sched) else None
            if nxt is not None and [c for c, _ in sched[k + 1]] == [c for c, _ in sched[k]]:
                assert torch.equal(nxt, model.seen[k] + (model.seen[j + 1] - model.seen[j]))


def test_nearly_clean_blend_on_fake_model():
    model = FakeMagi()
    s = fake_settings(discard_nearly_clean_chunk=False)
    out, _ = MagiPipeline(model, GEO)(torch.randn(1, 3, 8), None, s, CacheSettings())
    sched = stage_schedule(10, 2, 4, 16)
    ts = time_schedule(16)
    extra = [k for k, w in enumerate(sched) if float(ts[w[0][1]]) > 0.3]  # the oldest chunk is past t = 0.3
    assert len(model.calls) == sum(len(w) for w in sched) + len(extra)
    extra_calls = [c for c in model.calls if c[2]]  # the self-only forwards
    assert [c[0] for c in extra_calls] == [sched[k][-1][0] + 1 for k in extra]  # RoPE positions after the window
    # last step: only chunk 4 is left; its output is x + (0.7·v_with_context + 0.3·v_self_only)·dt
    (c, i), = sched[-1]
    x_in = model.seen[-1]
    v = 0.7 * (-(0.5 + 0.25 * c) * x_in) + 0.3 * (-(0.5 + 0.25 * (c + 1)) * x_in)
    torch.testing.assert_close(out[:, :, 2 * c:], x_in + v * float(ts[i + 1] - ts[i]), rtol=0, atol=1e-7)
    plain, _ = MagiPipeline(FakeMagi(), GEO)(torch.randn(1, 3, 8), None, fake_settings(), CacheSettings())
    assert not torch.equal(out, plain)


def test_distill_step_size_embedding_and_12_step_shortcut():
    model = FakeMagi()
    MagiPipeline(model, GEO)(torch.randn(1, 3, 8), None, fake_settings(num_steps=12), CacheSettings())
    sched = stage_schedule(10, 2, 4, 12)
    ts = time_schedule(12)
    want = [(c, float(ts[i]), [4.0, 8.0, 8.0][k % 3]) for k, w in enumerate(sched) for c, i in w]  # intervals 2,1,1
    assert [(c, t, dd) for c, t, _, dd in model.calls] == want
    base = FakeMagi()
    MagiPipeline(base, GEO)(torch.randn(1, 3, 8), None, fake_settings(distill=False), CacheSettings())
    assert all(dd is None for *_, dd in base.calls)


# ------------------------------------------------------------------------------------------------- tiny MAGI-1
@pytest.fixture(scope="module")
def tiny():
    sd = make_sd(**SMALL, seed=4)
    model = MagiDiT(magi_config_from_state_dict(sd), dtype=torch.float32)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def caption():
    g = torch.Generator().manual_seed(7)
    cap = torch.randn(1, 6, SMALL["cap"], generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    return cap, mask


def tiny_settings(**kw):
    base = dict(num_frames=48, width=32, height=32, num_steps=8, window_size=4, chunk_width=2, seed=11,
                distill=True)  # 12 latent frames = 6 chunks of 8 tokens
    return MagiSettings(**{**base, **kw})


def run(model, caption, s, mode="off", prefix=None, on_step=None, **cache):
    return MagiPipeline(model, GEO)(caption[0], caption[1], s, CacheSettings.of(mode, **cache), prefix=prefix,
                                    hooks=RunHooks(on_step=on_step))


def test_threshold_zero_equals_uncached_bit_for_bit(tiny, caption):
    """A threshold of 0 never reuses: FlowCache equals its own loop uncached (the chunk path), TeaCache equals
    MAGI-1's own loop (``off``), bit for bit."""
    s = tiny_settings()
    ref, st0 = run(tiny, caption, s, "off")
    chunk, stc = run(tiny, caption, tiny_settings(path="chunk"), "off")
    fc, st1 = run(tiny, caption, s, "flowcache", threshold=0.0, warmup=5)
    tc, st2 = run(tiny, caption, s, "teacache", threshold=0.0, warmup=5)
    assert ref.shape == (1, 4, 12, 4, 4) and torch.isfinite(ref).all()
    assert torch.equal(chunk, fc) and torch.equal(ref, tc) and not torch.equal(ref, fc)
    assert st1.reused == st2.reused == 0 and stc.forwards == st1.forwards == 6 * 8
    assert st0.forwards == st2.forwards == 6 * 8 + 5  # MAGI-1's loop refreshes chunks 0..4 once each
    # off spends exactly the reference; the chunk path uncached spends its own loop (the paper column): full
    # causal history but no refresh forwards, cheaper than MAGI-1's loop here
    assert st0.flops == pytest.approx(st0.flops_nocache, rel=1e-12)
    assert stc.flops == pytest.approx(stc.flops_nocache_paper, rel=1e-12) and stc.flops_nocache == st0.flops_nocache


def test_two_runs_identical_and_run_after_cancel_equals_fresh(tiny, caption):
    s = tiny_settings()
    cache = dict(threshold=0.05, warmup=1)
    a, sa = run(tiny, caption, s, "flowcache", **cache)
    b, sb = run(tiny, caption, s, "flowcache", **cache)
    assert torch.equal(a, b) and sa.maps == sb.maps and sa.reused > 0

    class Stop(Exception):
        pass

    def stop(info):
        assert info.total == 18 and info.done == info.iteration + 1
        if info.done == 13:
            raise Stop()
    pipe = MagiPipeline(tiny, GEO)
    with pytest.raises(Stop):
        pipe(caption[0], caption[1], s, CacheSettings.of("flowcache", **cache), hooks=RunHooks(on_step=stop))
    after, _ = pipe(caption[0], caption[1], s, CacheSettings.of("flowcache", **cache))
    assert torch.equal(after, a)


@pytest.fixture
def stores(monkeypatch):
    made, events = [], []

    class Recording(store_mod.KVStore):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

        def compress_clean(self, queries):
            done = super().compress_clean(queries)
            events.append((len(made), done, tuple(queries[0].shape)))
            return done
    monkeypatch.setattr(plan_mod, "KVStore", Recording)  # the run's stores are built from its plan
    return made, events


def test_kv_store_bounded_with_compression(tiny, caption, stores, monkeypatch):
    made, events = stores
    last_q = []
    extend = store_mod.TappedContext.extend

    def spy(self, layer, q, k, v):
        if layer == 0 and self.tap is not None:
            last_q.append((self.view.chunk_id, q[:, :, -4:].clone()))
        return extend(self, layer, q, k, v)
    monkeypatch.setattr(store_mod.TappedContext, "extend", spy)
    compress = store_mod.KVStore.compress_clean
    used = []

    def check(self, queries):
        used.append(torch.equal(queries[0], last_q[-1][1]))
        return compress(self, queries)
    monkeypatch.setattr(store_mod.KVStore, "compress_clean", check)
    s = tiny_settings(num_frames=80)  # 20 latent frames = 10 chunks
    tok = 2 * 2 * 2
    out, st = run(tiny, caption, s, "flowcache", threshold=0.05, warmup=1, kv_budget=1)
    (store,) = made
    assert store.peak_rows <= (1 + 4) * tok and store.capacity == (1 + 4) * tok
    assert all(lay.compressed == tok for lay in store.layers) and sum(st.kv_dropped_per_layer) > 0
    # once per stage while new chunks enter and two or more chunks are clean: before chunks 5..9 enter
    assert [done for _, done, _ in events] == [False] * 4 + [True] * 5
    assert all(shape[2] == 4 for _, _, shape in events)  # "frame" queries: the last latent frame (4 tokens)
    assert torch.isfinite(out).all() and out.shape[2] == 20
    assert len(used) == 9 and all(used)  # scored with the queries of the last computed chunk forward

    # base model (3-pass guidance): two stores that see previous chunks, both bounded
    made.clear()
    run(tiny, caption, tiny_settings(num_frames=64, distill=False, path="chunk"), "off", kv_budget=1)
    assert len(made) == 2 and all(m.peak_rows <= 5 * tok for m in made)


def test_kv_budget_on_magi_own_loop_compresses_after_the_clean_refresh(tiny, caption, stores, monkeypatch):
    """MAGI-1's own loop (window path: key ranges, clean refresh) with a budget: a finished chunk is compressed
    only after its clean refresh has written its final K/V (it crashed when compression came first: the refresh
    re-registered a chunk already folded into the history)."""
    made, events = stores
    order = []
    forward = MagiDiT.forward

    def spy(self, x, t, *a, **kw):
        order.append(("refresh" if abs(float(t) - MagiSettings.clean_t) < 1e-6 else "forward", len(events)))
        return forward(self, x, t, *a, **kw)
    monkeypatch.setattr(MagiDiT, "forward", spy)
    s = tiny_settings(num_frames=80, path="window")  # 10 chunks, a stage of 2 steps
    tok = 2 * 2 * 2
    out, st = run(tiny, caption, s, "off", kv_budget=1)
    (store,) = made
    assert store.peak_rows <= (1 + 4) * tok and sum(st.kv_dropped_per_layer) > 0 and torch.isfinite(out).all()
    assert [done for _, done, _ in events] == [False] * 4 + [True] * 5  # before chunks 5..9 enter
    for e in [i + 1 for i, (_, done, _) in enumerate(events) if done]:  # each right after the stage's refresh
        first_after = next(i for i, (_, n) in enumerate(order) if n == e)
        assert order[first_after - 1][0] == "refresh" and order[first_after][0] == "forward"
    unbounded, _ = run(tiny, caption, s, "off")
    assert not torch.equal(out, unbounded)  # the budget did drop history


def test_base_guidance_passes(tiny, caption):
    s = tiny_settings(distill=False, path="chunk")
    out, st = run(tiny, caption, s, "off")
    ts = time_schedule(8)
    sched = stage_schedule(12, 2, 4, 8)
    want = sum(2 + (float(ts[i]) < 0.3 - 1e-7) for w in sched for _, i in w)  # chunk-alone pass only when p ≠ 1
    assert st.forwards == want and torch.isfinite(out).all()
    distilled, _ = run(tiny, caption, tiny_settings(path="chunk"), "off")
    assert not torch.equal(out, distilled)


def test_nearly_clean_extra_on_tiny_model(tiny, caption):
    keep, st = run(tiny, caption, tiny_settings(discard_nearly_clean_chunk=False), "off")
    drop, sd = run(tiny, caption, tiny_settings(), "off")
    assert st.forwards > sd.forwards and not torch.equal(keep, drop)


def test_i2v_and_v2v_prefix(tiny, caption, stores):
    made, _ = stores
    g = torch.Generator().manual_seed(3)
    # V2V: 5 clean latent frames = 2 clean chunks + 1 frame padded into chunk 2 at every step
    pre = torch.randn(1, 4, 5, 4, 4, generator=g)
    s = tiny_settings(num_frames=28, path="chunk")  # 7 new latent frames; ceil((7 + 5) / 2) = 6 chunks
    out, st = run(tiny, caption, s, "off", prefix=pre)
    assert out.shape == (1, 4, 12 - 5, 4, 4)
    assert st.forwards == 2 + 4 * 8  # the 2 prefix chunks once, then 8 steps for each of the 4 new chunks
    lay = made[-1].layers[0]
    assert list(lay.ranges)[:2] == [0, 1]  # the prefix chunks' K/V are in the store
    other, _ = run(tiny, caption, s, "off", prefix=pre + 1.0)
    assert not torch.equal(out, other)  # the continuation depends on the prefix
    # I2V: one latent frame; every chunk is returned, the image frame included
    img = torch.randn(1, 4, 1, 4, 4, generator=g)
    out_i, st_i = run(tiny, caption, tiny_settings(num_frames=20), "flowcache", threshold=0.05, warmup=1,
                      prefix=img)
    assert out_i.shape == (1, 4, 6, 4, 4) and len(st_i.maps[0]) == 3
    with pytest.raises(InputError, match="prefix"):
        run(tiny, caption, s, "off", prefix=torch.randn(1, 4, 2, 8, 8))


def test_per_chunk_captions_and_distill_flag_from_model(tiny, caption):
    s = tiny_settings(distill=None)
    pipe = MagiPipeline(tiny, GEO)
    assert pipe.is_distill(s) is False
    tiny.distill = True
    try:
        assert pipe.is_distill(s) is True
    finally:
        del tiny.distill
    cap = caption[0][:, None].expand(1, 6, 6, SMALL["cap"])
    mask = caption[1][:, None].expand(1, 6, 6)
    shared, _ = run(tiny, caption, tiny_settings(), "off")
    per, _ = MagiPipeline(tiny, GEO)(cap, mask, tiny_settings(), CacheSettings())
    torch.testing.assert_close(per, shared)


@pytest.mark.parametrize("kw,needle", [
    (dict(num_steps=6), "multiple of window_size"),
    (dict(width=40), "width"),
    (dict(num_frames=2), "num_frames"),
    (dict(shift=0.5), "shift"),
])
def test_impossible_settings_rejected_before_sampling(tiny, caption, kw, needle):
    calls = []
    with pytest.raises(InputError, match=needle):
        run(tiny, caption, tiny_settings(**kw), "off", on_step=calls.append)
    assert calls == []
    with pytest.raises(InputError, match="caption width"):
        MagiPipeline(tiny, GEO)(torch.zeros(1, 4, 4096), None, tiny_settings(), CacheSettings())


def test_model_family_mismatch_is_explained(tiny, tmp_path):
    with pytest.raises(InputError, match="DiffusionForcingPipeline"):
        MagiPipeline(tiny_wan(), LatentGeometry())
    with pytest.raises(InputError, match="MagiPipeline"):
        DiffusionForcingPipeline(tiny, LatentGeometry())
    path = tmp_path / "magi.safetensors"
    save_file(make_sd(**SMALL), str(path))
    with pytest.raises(CheckpointError, match="loader"):
        load_model(path, expect="wan")
    assert math.isfinite(magi_mod.magi_forward_flops(tiny.config, 8, 16, 4))


def test_off_is_magi_own_loop_key_ranges_and_clean_refresh(tiny, caption, monkeypatch):
    """``off`` (the window path) is the released loop: noise2clean_kvrange [5, 4, 3, 2] and, at the first step of
    each stage, the just-finished chunk forwarded again at clean_t, seeing only itself. Checked call by call."""
    calls = []
    extend = store_mod.TappedContext.extend

    def spy(self, layer, q, k, v):
        keys, vals = extend(self, layer, q, k, v)
        if layer == 0:
            calls.append((self.view.chunk_id, keys.shape[2]))
        return keys, vals
    monkeypatch.setattr(store_mod.TappedContext, "extend", spy)
    seen_t = []
    forward = tiny.forward

    def spy_forward(x, t, *a, **kw):
        seen_t.append(float(t))
        return forward(x, t, *a, **kw)
    monkeypatch.setattr(tiny, "forward", spy_forward)
    s = tiny_settings(num_frames=64, num_steps=8)  # 16 latent frames = 8 chunks of 8 tokens, 2 steps a stage
    out, st = run(tiny, caption, s, "off")
    tok, per = 8, 2
    want = []
    for k, window in enumerate(stage_schedule(16, 2, 4, 8)):
        ids = [c for c, _ in window]
        if k % per == 0 and ids[0] > 0:
            want.append((ids[0] - 1, tok, 0.9999))  # the clean refresh of the chunk that just left
        for c, i in window:
            r = (5, 4, 3, 2)[i // 2]  # 8 steps over 4 ranges
            want.append((c, min(r, c + 1) * tok, float(time_schedule(8)[i])))
    assert [(c, n) for c, n in calls] == [(c, n) for c, n, _ in want]
    assert seen_t == pytest.approx([t for _, _, t in want])
    assert st.forwards == len(want) == 8 * 8 + 7 and torch.isfinite(out).all()
    # the FlowCache loop is the other choice: full causal history, no refresh
    calls.clear()
    run(tiny, caption, tiny_settings(num_frames=64, num_steps=8, path="chunk"), "off")
    assert len(calls) == 8 * 8 and all(n == (c + 1) * tok for c, n in calls)
