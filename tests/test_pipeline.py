"""The diffusion-forcing pipeline: equivalences, determinism, cancel, and early input errors."""
import pytest
import torch

from flowcache.cache import CacheSettings
from flowcache.df_schedule import timestep_matrix
from flowcache.errors import InputError
from flowcache.kv.store import KVStore, StepAttention
from flowcache.noise import ReplayNoise, SeededNoise
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.runner import RunHooks
from flowcache.schedulers import flow_sigmas, make_solver
from tiny_models import tiny_wan

GEO = LatentGeometry(temporal_stride=1, spatial_stride=4, channels=16)


def small(**kw) -> DFSettings:
    base = dict(width=32, height=32, num_frames=12, steps=6, cfg=3.0, shift=5.0, seed=3, ar_step=2,
                causal_block_size=3, base_num_frames=12, overlap_history=3, addnoise_condition=20)
    return DFSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    return tiny_wan(seed=1)


@pytest.fixture(scope="module")
def conds():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)


def run(model, conds, settings, method, **cache):
    """``method`` "off-chunked" is the chunk path with no cache: FlowCache's loop without reuse."""
    pipe = DiffusionForcingPipeline(model, GEO, text_len=8)
    if method == "off-chunked":
        settings.path, method = "chunk", "off"
    return pipe(conds[0], conds[1], settings, CacheSettings.of(method, **cache))


def test_chunk_forward_with_kv_equals_block_causal_window(model, conds):
    """Per-chunk forwards against the KV store reproduce one block-causal forward of the window."""
    x = torch.randn(1, 16, 9, 8, 8)
    t = torch.tensor([[900.0] * 3 + [500.0] * 3 + [100.0] * 3])
    with torch.no_grad():
        ref = model(x, t, conds[0], fps=24, block_causal=3)
        ctx = model.text_embed(conds[0])
        store = KVStore(model.cfg.num_layers, capacity_tokens=9 * 16)
        outs = []
        for c in range(3):
            fr = slice(3 * c, 3 * c + 3)
            e, e0 = model.time_embed(t[:, fr], 24)
            h = model.run_blocks(model.embed(x[:, :, fr]), e0, ctx, (3, 4, 4), 3 * c, store.view(c))
            outs.append(model.head_out(h, e, (3, 4, 4)))
    torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=1e-4, atol=1e-5)


def test_flowcache_threshold_zero_is_bit_identical_to_chunked_off(model, conds):
    a, sa = run(model, conds, small(), "off-chunked")
    b, sb = run(model, conds, small(), "flowcache", threshold=0.0, warmup=2)
    assert torch.equal(a, b) and sb.reused == 0 and sa.forwards == sb.forwards


def test_budget_zero_threshold_zero_equals_uncached_chunked(model, conds):
    a, _ = run(model, conds, small(num_frames=21), "off-chunked")
    b, _ = run(model, conds, small(num_frames=21), "flowcache", threshold=0.0, kv_budget=0)
    assert torch.equal(a, b)


def test_off_reproduces_plain_vanilla_loop(model, conds):
    """'off' is SkyReels vanilla: the whole window every step, CFG, one solver per chunk."""
    s = small()
    out, stats = run(model, conds, s, "off")
    sigmas, ts = flow_sigmas(s.steps, s.shift)
    sched = timestep_matrix(4, ts, s.ar_step)
    g = torch.Generator().manual_seed(s.seed)
    x = torch.randn(1, 16, 12, 8, 8, generator=g)
    solvers = [make_solver("unipc", sigmas) for _ in range(4)]
    with torch.no_grad():
        for it in range(sched.iterations):
            t = sched.timesteps[it].repeat_interleave(3)[None]
            vc = model(x, t, torch.cat([conds[0], torch.zeros(1, 0, 32)], 1), fps=24)
            vu = model(x, t, conds[1], fps=24)
            v = vu + s.cfg * (vc - vu)
            for b in range(4):
                if sched.update_mask[it, b]:
                    fr = slice(3 * b, 3 * b + 3)
                    x[:, :, fr] = solvers[b].step(v[:, :, fr], x[:, :, fr])
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    assert stats.forwards == 2 * sched.iterations


def test_same_seed_same_video_and_runs_do_not_leak(model, conds):
    s = small(num_frames=21)
    a, _ = run(model, conds, s, "flowcache", threshold=0.5, warmup=1, kv_budget=1)
    b, _ = run(model, conds, s, "flowcache", threshold=0.5, warmup=1, kv_budget=1)
    assert torch.equal(a, b)
    c, _ = run(model, conds, small(num_frames=21, seed=4), "flowcache", threshold=0.5, warmup=1, kv_budget=1)
    assert not torch.equal(a, c)


def test_run_after_cancel_equals_fresh_run(model, conds):
    s = small(num_frames=21)
    pipe = DiffusionForcingPipeline(model, GEO, text_len=8)
    cache = CacheSettings.of("flowcache", threshold=0.5, warmup=1)

    class Stop(Exception):
        pass

    def cancel_at_7(info):
        if info.done == 7:
            raise Stop()
    with pytest.raises(Stop):
        pipe(conds[0], conds[1], s, cache, RunHooks(on_step=cancel_at_7))
    after, _ = pipe(conds[0], conds[1], s, cache)
    fresh, _ = DiffusionForcingPipeline(model, GEO, text_len=8)(conds[0], conds[1], s, cache)
    assert torch.equal(after, fresh)


def test_long_video_windows_and_latent_overlap(model, conds):
    """Without a VAE the second window's clean prefix is the first window's last overlap latent frames as they
    are (a latent-space overlap), held through every iteration of the second window (the re-noise of
    addnoise_condition goes into the model's input only); the video is the first window, then the second
    window's new frames."""
    s = small(num_frames=21)  # 12 + 9 new latent frames over 2 windows, 3-frame overlap
    seen = []
    out, stats = DiffusionForcingPipeline(model, GEO, text_len=8)(
        conds[0], conds[1], s, CacheSettings(), RunHooks(on_step=lambda info: seen.append((info.window, info.preview()))))
    assert out.shape == (1, 16, 21, 8, 8) and stats.windows == 2
    first = [x for w, x in seen if w == 0][-1]
    second = [x for w, x in seen if w == 1]
    assert second and all(torch.equal(x[:, :, :3], first[:, :, -3:]) for x in second)
    assert torch.equal(out[:, :, :12], first) and torch.equal(out[:, :, 12:], second[-1][:, :, 3:])


def test_noise_source_default_is_the_seeded_generator_in_order_and_replays(model, conds):
    """Every draw comes from the noise source: by default one CPU generator seeded with ``seed``, drawn in the order
    window 0's init, window 1's init, then window 1's prefix re-noise at each of its iterations; replaying the
    recorded draws gives the same video bit for bit, and other draws another video."""
    s = small(num_frames=21)  # 2 windows, the second with a 3-frame prefix re-noised every iteration
    pipe = DiffusionForcingPipeline(model, GEO, text_len=8)
    cache = CacheSettings.of("flowcache", threshold=0.5, warmup=1)
    default, _ = pipe(conds[0], conds[1], s, cache)
    rec = SeededNoise(s.seed, record=True)
    recorded, _ = pipe(conds[0], conds[1], s, cache, noise=rec)
    assert torch.equal(default, recorded)
    iters = timestep_matrix(4, flow_sigmas(s.steps, s.shift)[1], s.ar_step, 1).iterations  # 4 chunks, 1 clean
    names = ["window 0 init", "window 1 init"] + [f"window 1 iteration {i} prefix" for i in range(iters)]
    assert [n for n, _ in rec.draws] == names
    g = torch.Generator(device="cpu").manual_seed(s.seed)
    for _, d in rec.draws:
        assert torch.equal(d, torch.randn(d.shape, generator=g))
    replayed, _ = pipe(conds[0], conds[1], s, cache, noise=ReplayNoise(rec.draws))
    assert torch.equal(replayed, default)
    other = ReplayNoise([(n, d if "prefix" not in n else torch.zeros_like(d)) for n, d in rec.draws])
    assert not torch.equal(pipe(conds[0], conds[1], s, cache, noise=other)[0], default)


def test_step_hook_reads_the_current_window_after_each_iteration(model, conds):
    s = small(num_frames=21)
    seen = []
    out, stats = DiffusionForcingPipeline(model, GEO, text_len=8)(
        conds[0], conds[1], s, CacheSettings(), RunHooks(on_step=lambda info: seen.append((info.window, info.preview()))))
    assert len(seen) == sum(stats.iterations)
    assert [w for w, _ in seen] == [0] * stats.iterations[0] + [1] * stats.iterations[1]
    assert all(x.shape == (1, 16, 12, 8, 8) for _, x in seen)
    last0, last1 = seen[stats.iterations[0] - 1][1], seen[-1][1]
    torch.testing.assert_close(out, torch.cat([last0, last1[:, :, 3:]], 2), rtol=0, atol=0)
    assert torch.equal(last1[:, :, :3], last0[:, :, -3:])  # the clean prefix, never stepped
    assert not torch.equal(seen[0][1], seen[1][1])  # a copy of each step's latents, not a view of the buffer


@pytest.mark.parametrize("kw,needle", [
    (dict(num_frames=13, base_num_frames=15), "causal_block_size"),
    (dict(num_frames=20), "last window"),
    (dict(width=30), "width"),
    (dict(num_frames=21, overlap_history=0), "overlap_history"),
    (dict(solver="dpm"), "solver"),
    (dict(steps=0), "steps"),
])
def test_impossible_settings_rejected_before_sampling(model, conds, kw, needle):
    calls = []
    pipe = DiffusionForcingPipeline(model, GEO, text_len=8)
    with pytest.raises(InputError, match=needle):
        pipe(conds[0], conds[1], small(**kw), CacheSettings(), RunHooks(on_step=calls.append))
    assert calls == []


def test_wan_geometry_frame_rule():
    with pytest.raises(InputError, match=r"4·k\+1"):
        from flowcache.pipelines import plan_windows
        plan_windows(DFSettings(num_frames=96), LatentGeometry())
    from flowcache.pipelines import plan_windows
    wins = plan_windows(DFSettings(num_frames=177), LatentGeometry())
    assert [(w.length, w.prefix) for w in wins] == [(25, 0), (25, 5)]


def test_conditioning_errors(model, conds):
    pipe = DiffusionForcingPipeline(model, GEO, text_len=8)
    with pytest.raises(InputError, match="positive.*width is 4096"):
        pipe(torch.zeros(1, 8, 4096), conds[1], small(), CacheSettings())
    with pytest.raises(InputError, match="negative.*12 tokens"):
        pipe(conds[0], torch.zeros(1, 12, 32), small(), CacheSettings())


def test_position_channels_reach_the_model_in_every_path(conds):
    """A model with extra input channels (Wan's image-to-video conditioning input; the demo feeds each latent
    pixel's (y, x)) gets them in the window path and in every chunk forward, at the chunk's own frames."""
    geo = LatentGeometry(1, 4, 16, position_channels=2)
    pos = geo.positions(3, 8, 8)
    assert pos.shape == (1, 2, 3, 8, 8) and float(pos[0, 0, 0, 0, 0]) == -1 and float(pos[0, 1, 2, 7, 7]) == 1
    assert torch.equal(pos[0, 0, 1, :, 3], torch.linspace(-1, 1, 8)) and LatentGeometry().positions(1, 2, 2) is None
    model = tiny_wan(seed=2, in_dim=18)
    seen = []
    embed = model.embed

    def spy(x, y=None):
        seen.append(None if y is None else (tuple(x.shape), tuple(y.shape)))
        return embed(x, y)

    model.embed = spy
    pipe = DiffusionForcingPipeline(model, geo, text_len=8)
    for cache in (CacheSettings(), CacheSettings.of("flowcache", threshold=0.0)):
        seen.clear()
        out, _ = pipe(conds[0], conds[1], small(), cache)
        assert out.shape == (1, 16, 12, 8, 8) and torch.isfinite(out).all()
        assert seen and all(s is not None and s[1] == (1, 2) + s[0][2:] for s in seen), (cache.method, seen[:3])
    a, _ = pipe(conds[0], conds[1], small(path="chunk"), CacheSettings())
    b, _ = pipe(conds[0], conds[1], small(), CacheSettings.of("flowcache", threshold=0.0))
    assert torch.equal(a, b)


@pytest.mark.parametrize("mask_limit", [1 << 24, 0])  # one masked call per layer; chunk by chunk
def test_batched_chunks_and_branches_equal_one_forward_each(model, conds, monkeypatch, mask_limit):
    """One forward over chunks 0 and 2 for two CFG branches (chunk 1 stale in the store, written earlier), with
    one block-masked attention call per layer, gives what a forward per chunk and branch gives, and stores the
    same keys/values (within float noise: 1e-5)."""
    from flowcache.kv import store as store_mod
    from flowcache.models.wan import rope_angles

    monkeypatch.setattr(store_mod, "MAX_MASK_ELEMENTS", mask_limit)
    monkeypatch.setattr(store_mod, "MASK_DEVICES", {"cpu"})  # the masked call is the GPU's path: run it here
    cos, sin = rope_angles(16, (6, 4, 4), (0, 6), torch.device("cpu"))
    cos_a, _ = rope_angles(16, (3, 4, 4), 0, torch.device("cpu"))
    cos_b, _ = rope_angles(16, (3, 4, 4), 6, torch.device("cpu"))
    assert torch.equal(cos, torch.cat([cos_a, cos_b])) and sin.shape == cos.shape

    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 9, 8, 8, generator=g)
    t = torch.tensor([[900.0] * 3 + [500.0] * 3 + [100.0] * 3])
    with torch.no_grad():
        ctxs = [model.text_embed(c) for c in conds]
        e, e0 = model.time_embed(t, 24)
        h = model.embed(x)  # [1, 9*16, D]; chunk c is tokens 48c..48c+48
        tok = [slice(48 * c, 48 * c + 48) for c in range(3)]
        fr = [slice(3 * c, 3 * c + 3) for c in range(3)]

        def per_branch_stores():
            out = []
            for ctx in ctxs:  # every chunk written once, as an earlier step would have
                st = KVStore(model.cfg.num_layers, capacity_tokens=9 * 16)
                for c in range(3):
                    model.run_blocks(h[:, tok[c]], e0[:, fr[c]], ctx, (3, 4, 4), 3 * c, st.view(c))
                out.append(st)
            return out

        one = per_branch_stores()
        ref = [[model.run_blocks(h[:, tok[c]], e0[:, fr[c]], ctx, (3, 4, 4), 3 * c, st.view(c)) for c in (0, 2)]
               for ctx, st in zip(ctxs, one)]
        both = KVStore(model.cfg.num_layers, capacity_tokens=9 * 16, branches=2)
        for c in range(3):
            model.run_blocks(h[:, tok[c]].expand(2, -1, -1), e0[:, fr[c]].expand(2, -1, -1, -1), torch.cat(ctxs),
                             (3, 4, 4), 3 * c, both.view(c))
        kv = StepAttention(both, [0, 2], [48, 48], slice(None), causal=True)
        got = model.run_blocks(torch.cat([h[:, tok[0]], h[:, tok[2]]], 1).expand(2, -1, -1),
                               torch.cat([e0[:, fr[0]], e0[:, fr[2]]], 1).expand(2, -1, -1, -1),
                               torch.cat(ctxs), (6, 4, 4), (0, 6), kv)
    for b in range(2):
        torch.testing.assert_close(got[b:b + 1], torch.cat(ref[b], 1), rtol=1e-4, atol=1e-5)
        for la, lb in zip(one[b].layers, both.layers):
            assert la.ranges == lb.ranges
            torch.testing.assert_close(la.k[0], lb.k[b], rtol=1e-4, atol=1e-5)
    assert kv.context_rows == {0: 48, 2: 144}
    assert not torch.allclose(ref[0][1], ref[1][1])  # the branches really differ


def test_window_attention_at_threshold_zero_is_the_window_path(model, conds):
    """With every chunk active at every step (ar_step 0) and nothing reused, the chunk path with window
    attention computes exactly the whole-window forward: equal to the window path within float noise (the
    attention runs over the KV store's rows instead of the window's tokens; tolerance 1e-5). Block-causal
    attention is measurably different."""
    s = small(ar_step=0)
    ref, st_ref = run(model, conds, s, "off")
    win, st_win = run(model, conds, small(ar_step=0), "flowcache", threshold=0.0, attention="window")
    causal, _ = run(model, conds, small(ar_step=0), "flowcache", threshold=0.0, attention="block_causal")
    assert st_ref.settings["path"] == "window" and st_win.settings["path"] == "chunk" and st_win.reused == 0
    torch.testing.assert_close(win, ref, rtol=1e-5, atol=1e-5)
    assert (causal - ref).abs().max() > 1e-3


def test_window_refresh_at_threshold_zero_is_much_closer_to_the_window_path(model, conds):
    """With asynchronous steps (ar_step 2: chunks start one after another and finish early) the window path
    feeds every chunk each iteration: the not-started ones at their noise (t = 999), the finished ones clean at
    t = 0. Plain window attention has no K/V for the former and the last-step K/V of the latter. window_refresh
    writes the former once as the window starts and the latter once after their last step. It is not exact (a
    stored chunk's deeper K/V also depend on the other chunks, which move), but at threshold 0 it is far closer
    to off: measured 0.0017 against 0.064 max abs error here. The extra forwards are counted exactly."""
    s = dict(num_frames=21, base_num_frames=21)  # 7 chunks of 3 latent frames, one window
    ref, _ = run(model, conds, small(**s), "off")
    fresh, st_fresh = run(model, conds, small(**s), "flowcache", threshold=0.0, attention="window_refresh")
    plain, st_plain = run(model, conds, small(**s), "flowcache", threshold=0.0, attention="window")
    assert st_fresh.settings["path"] == "chunk" and st_fresh.reused == 0
    err_fresh, err_plain = (fresh - ref).abs().max().item(), (plain - ref).abs().max().item()
    assert err_fresh < err_plain / 10 and err_fresh < 5e-3, (err_fresh, err_plain)
    # both branches: 6 chunks prefilled as the window starts (chunk 0 starts at once), 6 refreshed after their
    # last step (the last chunk finishes at the window's final iteration)
    assert st_fresh.forwards - st_plain.forwards == 2 * (6 + 6)


def test_head_runs_only_for_chunks_whose_prediction_is_read():
    """window_refresh forwards the clean prefix, the not-started chunks and each just-finished chunk only to write
    their K/V: the head runs on exactly the chunk-steps the solver moves (every new chunk, ``steps`` times)."""
    from flowcache.pipelines import plan_windows

    model = tiny_wan(seed=3)
    geo = LatentGeometry(1, 4, 16)
    s = DFSettings(width=32, height=32, num_frames=33, steps=8, cfg=2.0, shift=5.0, seed=0, ar_step=2,
                   causal_block_size=3, base_num_frames=21, overlap_history=9)
    headed, forwarded = [], []
    head_out, run_blocks = model.head_out, model.run_blocks
    model.head_out = lambda x, *a, **k: headed.append(x.shape[1]) or head_out(x, *a, **k)
    model.run_blocks = lambda x, *a, **k: forwarded.append(x.shape[1]) or run_blocks(x, *a, **k)
    g = torch.Generator().manual_seed(0)
    DiffusionForcingPipeline(model, geo, text_len=8)(torch.randn(1, 8, 32, generator=g), torch.zeros(1, 8, 32), s,
                                                     CacheSettings.of("flowcache", threshold=0.0,
                                                                      attention="window_refresh"))
    chunk_tokens = 3 * (32 // 4 // 2) ** 2
    new_chunks = sum((w.length - w.prefix) // 3 for w in plan_windows(s, geo))
    assert sum(headed) == new_chunks * s.steps * chunk_tokens
    assert sum(forwarded) > sum(headed)  # the K/V-only passes were forwarded, not headed
