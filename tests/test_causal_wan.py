"""The causal Wan loop (Self-Forcing, CausVid, Causal Forcing): against an independent re-derivation of the
official loop, replayable noise, rolling/sink/compressed KV stores, cancel, and its input errors."""
from __future__ import annotations

import pytest
import torch

from flowcache.cache import CacheSettings
from flowcache.errors import InputError
from flowcache.kv import store as store_mod
from flowcache.models.wan import block_causal_mask
from flowcache.noise import ReplayNoise, SeededNoise
from flowcache.pipelines import LatentGeometry
from flowcache.pipelines.causal_wan import CausalSettings, CausalWanPipeline, timesteps
from flowcache.runner import RunHooks
from tiny_models import tiny_wan

GEO = LatentGeometry(temporal_stride=4, spatial_stride=4, channels=16)
pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw) -> CausalSettings:
    # 9 latent frames = 3 blocks of 3; 4x4 tokens a frame
    base = dict(width=32, height=32, num_frames=33, num_frame_per_block=3, seed=5, kv_mode="global",
                local_attn_frames=9, sink_frames=0)
    return CausalSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    return tiny_wan(seed=3, has_fps=False)


@pytest.fixture(scope="module")
def cond():
    return torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))


def test_self_forcing_timesteps_are_the_warped_list():
    assert timesteps(CausalSettings()) == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    assert timesteps(CausalSettings(denoising_steps=(1000, 757, 522), warp=False, shift=8.0)) == [1000, 757, 522]


def test_loop_equals_a_step_by_step_rederivation(model, cond):
    """Each block: x0 = x − σ·v from a forward over all finished blocks' x0 at t = 0 and the block at t_i
    (block-causal, absolute positions); re-noise with fresh draws; a clean pass writes the K/V. Here derived with
    the model's plain forward and the run's own recorded draws, and compared with the cached loop (1e-5)."""
    s = small()
    rec = SeededNoise(5, record=True)
    out, stats = CausalWanPipeline(model, GEO, text_len=8)(cond, s, CacheSettings(), noise=rec)
    ts = timesteps(s)
    draws = iter(t for _, t in rec.draws)
    ctx = torch.cat([cond, torch.zeros(1, 2, 32)], dim=1)  # zero-padded to the model's text length
    finished = []
    with torch.no_grad():
        for b in range(3):
            x = next(draws)
            for i, t in enumerate(ts):
                seq = torch.cat(finished + [x], dim=2)
                tt = torch.tensor([[0.0] * 3 * b + [t] * 3])
                v = model(seq, tt, ctx, block_causal=3)[:, :, -3:]
                x0 = (x.double() - t / 1000 * v.double()).float()
                if i + 1 < len(ts):
                    x = (1 - ts[i + 1] / 1000) * x0 + ts[i + 1] / 1000 * next(draws)
            finished.append(x0)
    torch.testing.assert_close(out, torch.cat(finished, dim=2), rtol=1e-5, atol=1e-5)
    assert stats.forwards == 3 * (4 + 1) and stats.reused == 0 and stats.iterations == [15]


def test_text_keys_and_values_are_computed_once_per_run(model, cond):
    """As the official loop does: each layer's cross-attention K/V projection of the text runs on the first
    forward only (15 forwards here); the FLOP count says so, and off spends exactly the vanilla loop's FLOPs."""
    from flowcache.flops import forward_flops, text_projection_flops

    calls = []
    hooks = [blk.cross_attn.k.register_forward_hook(lambda m, i, o: calls.append(1)) for blk in model.tree.blocks]
    try:
        _, stats = CausalWanPipeline(model, GEO, text_len=8)(cond, small(), CacheSettings())
        assert len(calls) == len(model.tree.blocks)  # once per layer, not once per forward
        _, again = CausalWanPipeline(model, GEO, text_len=8)(cond, small(), CacheSettings())
        assert len(calls) == 2 * len(model.tree.blocks)  # a new run computes them again: nothing leaks
    finally:
        for h in hooks:
            h.remove()
    assert stats.flops == pytest.approx(stats.flops_nocache, rel=1e-12)
    c = model.cfg
    proj = text_projection_flops(c.dim, c.num_layers, 8)
    # the paper's column counts every forward whole; the real one saves the projection on 14 of 15 forwards
    assert stats.flops_paper - stats.flops == pytest.approx(14 * proj, rel=1e-9)
    assert proj == c.num_layers * 4 * 8 * c.dim * c.dim
    assert forward_flops(48, 48, c.dim, c.ffn_dim, c.num_layers, 8) > proj


def test_replay_from_recorded_draws_is_exact(model, cond):
    rec = SeededNoise(11, record=True)
    a, _ = CausalWanPipeline(model, GEO, 8)(cond, small(), noise=rec)
    assert len(rec.draws) == 3 * 4 and rec.draws[0][0] == "block 0 init" and rec.draws[1][0] == "block 0 step 1"
    b, _ = CausalWanPipeline(model, GEO, 8)(cond, small(), noise=ReplayNoise(rec.draws))
    c, _ = CausalWanPipeline(model, GEO, 8)(cond, small(seed=11))  # the default source is the same seed
    d, _ = CausalWanPipeline(model, GEO, 8)(cond, small(seed=12))
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)


def _store_contents(monkeypatch):
    """The chunk ids in the store each time a block starts (layer 0, before its forward)."""
    seen = []
    attend = store_mod.StepAttention.attend

    def spy(self, layer, q, k, v):
        out = attend(self, layer, q, k, v)
        if layer == 0:
            seen.append((self.chunk_ids[0], sorted(self.store.layers[0].ranges), self.store.layers[0].used))
        return out
    monkeypatch.setattr(store_mod.StepAttention, "attend", spy)
    return seen


@pytest.mark.parametrize("window,sink,want", [
    (9, 3, {3: [0, 2, 3], 4: [0, 3, 4]}),  # a window of 3 blocks, block 0 as the sink
    (6, 0, {2: [1, 2], 3: [2, 3]}),        # a window of 2 blocks, no sink
])
def test_rolling_window_and_sink_evict_as_a_block_starts(model, cond, monkeypatch, window, sink, want):
    seen = _store_contents(monkeypatch)
    s = small(num_frames=4 * 14 + 1, kv_mode="rolling", local_attn_frames=window, sink_frames=sink)  # 5 blocks
    out, stats = CausalWanPipeline(model, GEO, 8)(cond, s)
    per_block = {}
    for block, ids, used in seen:
        per_block.setdefault(block, (ids, used))  # the first forward of each block: right after eviction
    for block, ids in want.items():
        assert per_block[block][0] == ids, (block, per_block[block])
    assert max(used for _, _, used in seen) <= window * 16  # never more rows than the window
    assert torch.isfinite(out).all() and out.shape[2] == 15


def test_compressed_store_never_exceeds_budget_sink_and_block(model, cond, monkeypatch):
    seen = _store_contents(monkeypatch)
    s = small(num_frames=4 * 17 + 1, kv_mode="compressed", sink_frames=3, local_attn_frames=9)  # 6 blocks
    out, stats = CausalWanPipeline(model, GEO, 8)(cond, s, CacheSettings(kv_budget=1))
    block_rows = 3 * 16
    assert max(used for _, _, used in seen) <= (1 + 1 + 1) * block_rows  # sink + budget + the current block
    assert sum(stats.kv_dropped_per_layer) > 0 and torch.isfinite(out).all()
    ids_last = [ids for block, ids, _ in seen if block == 5][0]
    assert ids_last[0] == 0 and 5 in ids_last  # the sink block stays, the current block is there


def test_flowcache_reuse_on_the_causal_loop(model, cond):
    """A reused step runs no blocks: its tokens are the step's embedded input plus the residual (blocks' output
    minus input) of the block's last computed step, then the head at the step's own timestep. Derived here with
    the model's pieces (block-causal over the finished blocks at t = 0, as in the rederivation above) and the
    run's own draws, and compared with the cached loop (1e-5)."""
    s = small()
    rec = SeededNoise(5, record=True)
    out, stats = CausalWanPipeline(model, GEO, 8)(cond, s, CacheSettings.of("flowcache", threshold=5.0, warmup=1),
                                                  noise=rec)
    assert stats.reused > 0 and all(m == "CRRC" for m in stats.maps[0])  # e0 depends on t only: same per block
    ts, draws = timesteps(s), iter(t for _, t in rec.draws)
    ctx = model.text_embed(torch.cat([cond, torch.zeros(1, 2, 32)], dim=1))
    block_tokens = 3 * 4 * 4
    finished, residual = [], None
    with torch.no_grad():
        for b in range(3):
            x = next(draws)
            for i, (t, decision) in enumerate(zip(ts, stats.maps[0][b])):
                seq = torch.cat(finished + [x], dim=2)
                grid = model.grid(seq.shape)
                e, e0 = model.time_embed(torch.tensor([[0.0] * 3 * b + [t] * 3]))
                h0 = model.embed(seq)
                if decision == "C":
                    h = model.run_blocks(h0, e0, ctx, grid, 0, None, block_causal_mask(grid, 3, model.device))
                    residual = (h - h0)[:, -block_tokens:]
                h_block = h0[:, -block_tokens:] + residual
                v = model.head_out(h_block, e[:, -3:], (3,) + grid[1:])
                x0 = (x.double() - t / 1000 * v.double()).float()
                if i + 1 < len(ts):
                    x = (1 - ts[i + 1] / 1000) * x0 + ts[i + 1] / 1000 * next(draws)
            finished.append(x0)
    torch.testing.assert_close(out, torch.cat(finished, dim=2), rtol=1e-5, atol=1e-5)


def test_cancel_then_rerun_equals_a_fresh_run(model, cond):
    class Stop(Exception):
        pass

    pipe = CausalWanPipeline(model, GEO, 8)
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) == 7:  # inside a forward, between transformer blocks
            raise Stop()
    with pytest.raises(Stop):
        pipe(cond, small(), hooks=RunHooks(cancel=cancel))
    again, _ = pipe(cond, small())
    fresh, _ = CausalWanPipeline(model, GEO, 8)(cond, small())
    assert torch.equal(again, fresh)


@pytest.mark.parametrize("kw,widget", [
    (dict(num_frame_per_block=2), "num_frame_per_block"),
    (dict(kv_mode="rolling", local_attn_frames=2), "local_attn_frames"),
    (dict(kv_mode="rolling", sink_frames=9, local_attn_frames=9), "sink_frames"),
    (dict(kv_mode="compressed"), "kv_budget"),
    (dict(num_frames=34), "num_frames"),
    (dict(shift=float("nan")), "shift"),
    (dict(kv_mode="fifo"), "kv_mode"),
])
def test_bad_settings_are_refused_before_sampling(model, cond, kw, widget):
    calls = []
    with pytest.raises(InputError, match=widget):
        CausalWanPipeline(model, GEO, 8)(cond, small(**kw), hooks=RunHooks(on_step=calls.append))
    assert calls == []


def test_a_magi_model_is_refused():
    from test_magi_model import SMALL, make_sd
    from flowcache.models.magi import MagiDiT, magi_config_from_state_dict

    magi = MagiDiT(magi_config_from_state_dict(make_sd(**SMALL)), dtype=torch.float32)
    with pytest.raises(InputError, match="loop: the causal loop runs Wan2.1"):
        CausalWanPipeline(magi)


# ------------------------------------------------------------------------------------------------- loading
def _wan_sd(model, prefix=""):
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


def test_release_layouts_load_and_say_which_loop(model, tmp_path):
    """Self-Forcing's .pt (generator, critic, generator_ema; keys 'model.'-prefixed), CausVid's ['generator'],
    and safetensors conversions bare, 'model.' and 'model.diffusion_model.'-prefixed."""
    from safetensors.torch import save_file

    from flowcache.models import inspect_checkpoint, load_model

    ema = tiny_wan(seed=8, has_fps=False)
    sf = {"generator": _wan_sd(model, "model."), "critic": {"model.x": torch.zeros(2)},
          "generator_ema": _wan_sd(ema, "model.")}
    torch.save(sf, tmp_path / "self_forcing_dmd.pt")
    lm = load_model(tmp_path / "self_forcing_dmd.pt", "fp32")
    assert lm.loop == "causal" and "generator_ema" in lm.notes[-1] and lm.preset_key == "wan-dim64-causal"
    assert torch.equal(lm.model.patch_embedding.weight, ema.patch_embedding.weight)
    chosen = load_model(tmp_path / "self_forcing_dmd.pt", "fp32", weights="generator")
    assert torch.equal(chosen.model.patch_embedding.weight, model.patch_embedding.weight)
    torch.save({"generator": _wan_sd(model, "model.")}, tmp_path / "model.pt")  # CausVid
    assert load_model(tmp_path / "model.pt", "fp32").loop == "causal"
    with pytest.raises(Exception, match="weights='generator_ema' is not in this file; it holds generator"):
        load_model(tmp_path / "model.pt", "fp32", weights="generator_ema")
    for prefix in ("", "model.", "model.diffusion_model."):
        path = tmp_path / f"causal_forcing_{len(prefix)}.safetensors"
        save_file(_wan_sd(model, prefix), str(path))
        lm = load_model(path, "fp32")
        assert lm.loop == "causal" and lm.prefix == prefix and "file name" in lm.notes[-1]
    plain = tmp_path / "wan_t2v.safetensors"
    save_file(_wan_sd(model), str(plain), metadata={"flowcache.loop": "causal"})
    assert load_model(plain, "fp32").loop == "causal"
    save_file(_wan_sd(model), str(plain))
    assert load_model(plain, "fp32").loop == "diffusion_forcing"
    assert load_model(plain, "fp32", loop="causal").loop == "causal"  # the loader's choice wins
    info = inspect_checkpoint(tmp_path / "self_forcing_dmd.pt")
    assert info["loop"] == "causal" and info["torch_layout"] == "generator_ema" and "Self-Forcing" in info["loop_reason"]


def test_hostile_or_foreign_torch_files_are_refused(tmp_path):
    from flowcache.errors import CheckpointError
    from flowcache.models import load_model

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"generator_ema": {"model.x": Payload()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not a model checkpoint.*generator"):
        load_model(tmp_path / "other.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: not a model checkpoint"):
        load_model(tmp_path / "list.pt")


def test_a_causal_loop_is_not_asked_of_magi(tmp_path):
    from safetensors.torch import save_file

    from flowcache.errors import CheckpointError
    from flowcache.models import load_model
    from test_magi_model import SMALL, make_sd

    save_file(make_sd(**SMALL), str(tmp_path / "magi.safetensors"))
    with pytest.raises(CheckpointError, match="loop='causal'.*MAGI-1 DiT, which runs its own chunk-wise loop"):
        load_model(tmp_path / "magi.safetensors", loop="causal")


def test_magi_distill_is_decided_by_its_own_folder_and_can_be_overridden(tmp_path):
    """The same base file is not distilled under /x/distill_lab/base_model/ (only the file's own folder counts),
    is under .../inference_weight.distill/, and the loader's magi_variant wins either way."""
    from safetensors.torch import save_file

    from flowcache.models import load_model
    from test_magi_model import SMALL, make_sd

    sd = make_sd(**SMALL)
    lab = tmp_path / "distill_lab" / "base_model"
    rel = tmp_path / "4.5B_distill" / "inference_weight.distill"
    for folder in (lab, rel):
        folder.mkdir(parents=True)
        save_file(sd, str(folder / "model.safetensors"))
    base = load_model(lab / "model.safetensors", "fp32")
    assert base.model.distill is False and "'base_model' does not say 'distill'" in base.notes[-1]
    assert load_model(rel / "model.safetensors", "fp32").model.distill is True
    assert load_model(lab / "model.safetensors", "fp32", magi_variant="distill").model.distill is True
    assert load_model(rel / "model.safetensors", "fp32", magi_variant="base").model.distill is False
