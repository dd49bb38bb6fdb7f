"""Prompts that change over time (issue 23): the schedule's checks, and a change on every loop: the causal loop's
switch and re-cache, Krea Realtime's blend, diffusion forcing per window, MAGI-1 per chunk; through the nodes
with a tiny model and the demo model; loading the LongLive and Krea release layouts."""
from __future__ import annotations

import types

import pytest
import torch

from flowcache.cache import CacheSettings
from flowcache.errors import CheckpointError, InputError
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.pipelines.causal_wan import CausalSettings, CausalWanPipeline
from flowcache.prompts import PromptEntry, PromptSchedule, latent_frame
from tiny_models import tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")
GEO = LatentGeometry(temporal_stride=4, spatial_stride=4, channels=16)


def texts(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(1, 6, 32, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return tiny_wan(seed=3, has_fps=False)


def test_latent_frames_of_video_frames():
    assert [latent_frame(p, 4) for p in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("starts,match", [
    ([0, 20, 10], "entry 3 starts at frame 10, not after entry 2"),
    ([0, 20, 20], "entry 3 starts at frame 20, not after entry 2"),
    ([0, 40, 99], r"entry 3 starts at frame 99, past the video's end \(num_frames=57"),
    ([4, 20], "entry 1 starts at frame 4; the first prompt starts the video"),
])
def test_bad_schedules_name_the_entry(starts, match):
    s = PromptSchedule([PromptEntry(f, t) for f, t in zip(starts, texts(len(starts)))])
    with pytest.raises(InputError, match=match):
        s.check(57, 4)


def causal(**kw) -> CausalSettings:
    base = dict(width=32, height=32, num_frames=4 * 12 - 3, num_frame_per_block=3, seed=5, kv_mode="rolling",
                local_attn_frames=9, sink_frames=3)  # 12 latent frames = 4 blocks
    return CausalSettings(**{**base, **kw})


def test_causal_switch_and_recache(model):
    a, b, _ = texts()
    pipe = CausalWanPipeline(model, GEO, text_len=8)
    only_a, _ = pipe(a, causal())
    # prompt b from video frame 25 = latent frame 7: takes effect at block 3 (frames 9..11)
    for transition in ("switch", "recache"):
        sched = PromptSchedule([PromptEntry(0, a), PromptEntry(25, b)], transition=transition)
        out, stats = pipe(sched, causal())
        assert torch.equal(out[:, :, :9], only_a[:, :, :9])  # before the change: prompt a exactly
        assert not torch.allclose(out[:, :, 9:], only_a[:, :, 9:])
        assert stats.switches == [{"chunk": 3, "latent_frame": 9, "frame": 33, "entry": 2, "rule": transition}]
    switched, _ = pipe(PromptSchedule([PromptEntry(0, a), PromptEntry(25, b)], transition="switch"), causal())
    recached, st = pipe(PromptSchedule([PromptEntry(0, a), PromptEntry(25, b)], transition="recache"), causal())
    assert not torch.allclose(switched[:, :, 9:], recached[:, :, 9:])  # the re-cache changed the stored K/V
    assert st.forwards == 4 * 5 + 1
    with pytest.raises(InputError, match="transition='blend'"):
        pipe(PromptSchedule([PromptEntry(0, a), PromptEntry(25, b)], transition="blend"), causal())


def test_krea_blend_and_the_missing_vae(model):
    from flowcache.pipelines.krea_realtime import KreaRealtimePipeline, KreaSettings

    a, b, _ = texts()
    s = KreaSettings(width=32, height=32, num_frames=4 * 12 - 3, seed=1)
    with pytest.raises(InputError, match="vae: Krea Realtime's loop re-encodes"):
        KreaRealtimePipeline(model, GEO, 8)(a, s)

    class Codec:  # a lossy stand-in: the decoded frame is the latent's channel mean
        def decode(self, z):
            return z.mean(1)[0, :, :, :, None].repeat_interleave(4, 1).repeat_interleave(4, 2).expand(-1, -1, -1, 3)

        def encode(self, p):
            return p[None, :, ::4, ::4, :1].permute(0, 4, 1, 2, 3).expand(1, 16, -1, -1, -1)

    pipe = KreaRealtimePipeline(model, GEO, 8, Codec())
    only_a, _ = pipe(a, s)
    out, stats = pipe(PromptSchedule([PromptEntry(0, a), PromptEntry(21, b)], blend_blocks=3), s)  # block 2 on
    # the release's blend: block 2 still reads prompt a (weight 0), blocks 3 on move towards b
    assert torch.equal(out[:, :, :9], only_a[:, :, :9]) and not torch.allclose(out[:, :, 9:], only_a[:, :, 9:])
    assert stats.switches[0]["chunk"] == 2 and stats.switches[0]["rule"] == "blend"
    with pytest.raises(InputError, match="transition='recache'"):
        pipe(PromptSchedule([PromptEntry(0, a), PromptEntry(21, b)], transition="recache"), s)


def test_diffusion_forcing_switches_per_window():
    m = tiny_wan(seed=1)
    a, b, _ = texts()
    geo = LatentGeometry(temporal_stride=1, spatial_stride=4, channels=16)
    s = dict(width=32, height=32, num_frames=18, steps=4, cfg=1.0, shift=5.0, seed=3, ar_step=0, causal_block_size=3,
             base_num_frames=12, overlap_history=3, addnoise_condition=0)
    pipe = DiffusionForcingPipeline(m, geo, text_len=8)
    only_a, _ = pipe(a, None, DFSettings(**s), CacheSettings())
    # window 1's new frames start at latent frame 12: a change at frame 13 is read by no window, one at 12 by window 1
    late, st_late = pipe(PromptSchedule([PromptEntry(0, a), PromptEntry(13, b)]), None, DFSettings(**s), CacheSettings())
    assert torch.equal(late, only_a) and st_late.switches == []
    out, stats = pipe(PromptSchedule([PromptEntry(0, a), PromptEntry(5, b)]), None, DFSettings(**s), CacheSettings())
    assert torch.equal(out[:, :, :12], only_a[:, :, :12]) and not torch.allclose(out[:, :, 12:], only_a[:, :, 12:])
    assert [(w["chunk"], w["rule"], w["entry"]) for w in stats.switches] == [(1, "window", 2)]


def test_magi_captions_per_chunk():
    from comfy_helpers import import_pack, forget_pack
    pack = import_pack()
    try:
        magi_nodes = pack.nodes.magi if hasattr(pack, "nodes") else None
        import sys
        mod = next(v for k, v in sys.modules.items() if k.endswith("nodes.magi") and hasattr(v, "magi_scheduled_captions"))
        g = torch.Generator().manual_seed(2)
        c = [torch.randn(1, 4, 8, generator=g), torch.randn(1, 6, 8, generator=g)]
        sched = PromptSchedule([PromptEntry(0, c[0]), PromptEntry(9, c[1])], extras=[{}, {}])
        plan = types.SimpleNamespace(chunk_num=4)
        settings = types.SimpleNamespace(num_frames=4 * 12 - 3, chunk_width=3)
        caption, mask, switches = mod.magi_scheduled_captions(sched, 8, plan, settings, 4)
    finally:
        forget_pack()
    # frame 9 is latent frame 3: chunk 1 (latent frames 3..5) on takes prompt 2; prompt 1 padded to 6 tokens
    assert caption.shape == (1, 4, 6, 8) and mask.shape == (1, 4, 6)
    assert torch.equal(caption[0, 0, :4], c[0][0]) and mask[0, 0].tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.equal(caption[0, 1], c[1][0]) and bool(mask[0, 1].all())
    assert switches == [{"chunk": 1, "latent_frame": 3, "frame": 9, "entry": 2, "rule": "chunk"}]


# -------------------------------------------------------------------------------------------------- loading
def test_release_layouts_load_and_say_which_loop(tmp_path):
    from flowcache.models import Checkpoint, inspect_checkpoint, load_model, wan_loop

    m = tiny_wan(seed=8, has_fps=False)
    sd = {"model." + k: v.detach().clone() for k, v in m.state_dict().items()}
    torch.save({"generator": sd}, tmp_path / "longlive_base.pt")
    lm = load_model(tmp_path / "longlive_base.pt", "fp32")
    assert lm.loop == "longlive" and "longlive_base.pt" in lm.notes[0] and "no LoRA merged" in lm.notes[1]
    # LongLive's lora.pt: {'generator_lora': peft keys}; merged, and it alone says LongLive
    r = 2
    lora = {f"base_model.model.blocks.{i}.{n}.lora_{s}.weight": torch.randn(r, 64) if s == "A" else torch.randn(64, r)
            for i in range(2) for n in ("self_attn.q", "cross_attn.o") for s in "AB"}
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    torch.save({"generator": sd}, tmp_path / "base.pt")
    merged = load_model(tmp_path / "base.pt", "fp32", lora=tmp_path / "lora.pt")
    assert merged.loop == "longlive" and "generator_lora" in merged.notes[0] and "merged into 4 of its 4" in merged.notes[1]
    w = m.blocks[1].self_attn.q.weight
    a, b = lora["base_model.model.blocks.1.self_attn.q.lora_A.weight"], lora["base_model.model.blocks.1.self_attn.q.lora_B.weight"]
    torch.testing.assert_close(merged.model.blocks[1].self_attn.q.weight, w + b @ a)
    info = inspect_checkpoint(tmp_path / "base.pt", lora=tmp_path / "lora.pt")
    assert info["loop"] == "longlive" and "LongLive LoRA" in info["loop_reason"]
    # a LoRA for another model: refused with the count of matched keys
    torch.save({"generator_lora": {"base_model.model.unet.down.0.lora_A.weight": torch.randn(2, 8),
                                   "base_model.model.unet.down.0.lora_B.weight": torch.randn(8, 2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="lora: other.pt matches 0 of its 1 modules in base.pt"):
        load_model(tmp_path / "base.pt", "fp32", lora=tmp_path / "other.pt")
    # Krea's release: one safetensors of 'model.'-prefixed keys; by its name, or its 14B layout without one
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "krea-realtime-video-14b.safetensors"))
    assert load_model(tmp_path / "krea-realtime-video-14b.safetensors", "fp32").loop == "krea_realtime"
    ck = Checkpoint({}, [tmp_path / "renamed.safetensors"], prefix="model.")
    assert wan_loop(ck, set(), dim=5120) == ("krea_realtime", "a 'model.'-prefixed Wan2.1-14B, the layout of "
                                                              "Krea Realtime 14B's release")
    assert wan_loop(ck, set(), dim=1536)[0] == "diffusion_forcing"


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle4"])
def test_payload_pt_refused_as_base_and_as_lora(tmp_path, how):
    from flowcache.models import load_model
    from tiny_models import write_hostile

    marker = tmp_path / "ran"
    m = tiny_wan(seed=8, has_fps=False)
    sd = {"model." + k: v.detach().clone() for k, v in m.state_dict().items()}
    write_hostile(tmp_path / "longlive_base.pt", marker, how, {"generator": sd} if how != "pickle4" else None)
    with pytest.raises(CheckpointError, match="longlive_base.pt: not loadable as a weights-only torch file"):
        load_model(tmp_path / "longlive_base.pt")
    torch.save({"generator": sd}, tmp_path / "base.pt")
    write_hostile(tmp_path / "lora.pt", marker, how)
    with pytest.raises(CheckpointError, match="lora.pt: not loadable as a weights-only torch file"):
        load_model(tmp_path / "base.pt", lora=tmp_path / "lora.pt")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- nodes
def _nodes(pack):
    return pack.NODE_CLASSES


def _cond(seed: int, dim: int = 32) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 5, dim, generator=g), {"pooled_output": None}]]


def test_schedule_node_errors_name_the_entry(pack):
    from comfy_helpers import run_node

    node = _nodes(pack)["FlowCachePromptSchedule"]
    spec = node.INPUT_TYPES()
    assert all("tooltip" in v[1] for part in ("required", "optional") for v in spec[part].values())
    (sched,) = run_node(node, conditioning_1=_cond(1), conditioning_2=_cond(2), start_frame_2=9,
                        conditioning_4=_cond(4), start_frame_4=30, start_frame_3=20)
    assert [e.start_frame for e in sched.entries] == [0, 9, 30]  # entry 3 not connected: its widget is unused
    with pytest.raises(Exception, match="entry 3 starts at frame 5, not after entry 2"):
        run_node(node, conditioning_1=_cond(1), conditioning_2=_cond(2), start_frame_2=9, conditioning_3=_cond(3),
                 start_frame_3=5)
    with pytest.raises(Exception, match="conditioning_2: expected CONDITIONING"):
        run_node(node, conditioning_1=_cond(1), conditioning_2="a cat", start_frame_2=9)


def test_longlive_and_self_forcing_schedules_through_the_sampler(pack, comfy):
    from comfy_helpers import run_node
    from test_nodes import sampler_inputs

    m = tiny_wan(seed=4, has_fps=False, dim=64)
    sd = {"model." + k: v.detach().clone() for k, v in m.state_dict().items()}
    torch.save({"generator": sd}, comfy.models_dir / "longlive_base.pt")
    n = _nodes(pack)
    out = run_node(n["FlowCacheModelLoader"], model_name="longlive_base.pt", dtype="fp32")
    (loaded,) = out["result"]
    assert loaded.loaded.loop == "longlive"
    (sched,) = run_node(n["FlowCachePromptSchedule"], conditioning_1=_cond(1), conditioning_2=_cond(2),
                        start_frame_2=25)
    kw = sampler_inputs(pack, loaded, width=32, height=32, num_frames=45, causal_block_size=3, cfg=1.0,
                        negative=None, method="off")
    kw["positive"] = sched
    stats = run_node(n["FlowCacheSampler"], **kw)["ui"]["flowcache_stats"][0]
    assert stats["settings"]["kv_mode"] == "rolling"  # the release's own window without the options node
    assert stats["switches"] == [{"chunk": 3, "latent_frame": 9, "frame": 33, "entry": 2, "rule": "recache"}]
    (past,) = run_node(n["FlowCachePromptSchedule"], conditioning_1=_cond(1), conditioning_2=_cond(2),
                       start_frame_2=60)
    kw["positive"] = past
    with pytest.raises(Exception, match="entry 2 starts at frame 60, past the video's end"):
        run_node(n["FlowCacheSampler"], **kw)


def test_schedule_on_the_demo_model(pack, comfy):
    from comfy_helpers import demo_missing, pack_submodule, run_node
    from test_nodes import widget_defaults

    why = demo_missing(pack)
    if why:
        pytest.skip(why)
    demo = pack_submodule(pack, "flowcache.demo")
    n = _nodes(pack)
    entry = pack_submodule(pack, "nodes.demo").DEMO_ENTRY
    (model,) = run_node(n["FlowCacheModelLoader"], model_name=entry, dtype="auto")["result"]
    (a,) = run_node(n["FlowCacheDemoTextEncode"], prompt=demo.DEMO_PROMPTS[0])
    (b,) = run_node(n["FlowCacheDemoTextEncode"], prompt=demo.DEMO_PROMPTS[1])
    (neg,) = run_node(n["FlowCacheDemoTextEncode"], prompt="")
    s = {k: v for k, v in demo.DEMO_SETTINGS.items() if k != "fps"}
    s.update(steps=3)
    frames = s["num_frames"]
    (sched,) = run_node(n["FlowCachePromptSchedule"], conditioning_1=a, conditioning_2=b,
                        start_frame_2=frames - 1)
    kw = dict(widget_defaults(n["FlowCacheSampler"]), **s, model=model, positive=sched, negative=neg, unique_id="3")
    stats = run_node(n["FlowCacheSampler"], **kw)["ui"]["flowcache_stats"][0]
    # the demo runs diffusion forcing: a change near the end is read by the window whose new frames hold it, if any
    assert all(sw["rule"] == "window" for sw in stats["switches"])
