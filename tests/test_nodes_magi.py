"""MAGI-1 through the nodes (loader, MAGI-1 text encode, the one sampler, MAGI-1 VAE, decode) and the streaming
Decode & Save Video node, with ComfyUI stubbed. Tiny random models in the released key layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from comfy_helpers import StubInterrupt, pack_submodule, run_node, widget_defaults
from test_magi_model import make_sd
from test_magi_vae_text import D, _tiny_t5_sd

tokenizers = pytest.importorskip("tokenizers")

MAGI = dict(layers=2, hidden=96, heads=3, kv=1, dh=32, ffn=192, in_ch=4, cap=D, cap_len=16, cond=48, gated=False)
VAE_DD = {"video_size": 16, "video_length": 8, "patch_size": 8, "patch_length": 4, "z_chans": 4, "embed_dim": 32,
          "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "double_z": True, "ln_in_attn": True, "qkv_bias": True,
          "conv_last_layer": True, "with_cls_token": True, "use_rope": False, "norm_code": False}
WORDS = ["a", "red", "fox", "runs", "in", "snow"]
# 24 frames = 6 latent frames = 3 chunks of 2; 8 steps over a window of 4 chunks: 2 steps per stage.
SETTINGS = dict(width=32, height=32, num_frames=24, steps=8, shift=3.0, seed=5, causal_block_size=2)
CACHE = dict(method="flowcache", preset="custom", threshold=0.05, warmup_steps=1, kv_budget=0, mix_lambda=0.07)


def nodes(pack):
    return pack.NODE_CLASSES


def write_tiny_magi_files(models_root: Path, vocab: int | None = None) -> None:
    """A tiny distilled MAGI-1 DiT, T5 encoder (``vocab`` rows of embeddings), special tokens and MAGI-1 VAE
    under ``models_root`` (diffusion_models/, text_encoders/, vae/) in the released layouts."""
    folder = models_root / "diffusion_models" / "magi_4.5B_distill"
    folder.mkdir(parents=True)
    save_file(make_sd(**MAGI, seed=3), str(folder / "model.safetensors"))
    te = models_root / "text_encoders"
    te.mkdir(exist_ok=True)
    t5 = _tiny_t5_sd()
    if vocab:
        t5["shared.weight"] = torch.randn(vocab, D, generator=torch.Generator().manual_seed(2))
    save_file({k: v.half() for k, v in t5.items()}, str(te / "t5_tiny.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(te / "magi1_special_tokens.npz", caption_token=rng.normal(0, 0.125, (1, D)),
             logo_token=rng.normal(0, 0.125, (1, D)), other_tokens=rng.normal(0, 0.125, (100, D)))
    vae_dir = models_root / "vae" / "magi1"
    vae_dir.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in _vae_shapes().items()}
    save_file(sd, str(vae_dir / "diffusion_pytorch_model.safetensors"))
    (vae_dir / "config.json").write_text(json.dumps({"_class_name": "ViTVAE", "ddconfig": VAE_DD}))


@pytest.fixture
def magi_files(comfy, tmp_path):
    """The tiny MAGI-1 files where the stubbed ComfyUI keeps models, and a word-level T5-style tokenizer."""
    write_tiny_magi_files(comfy.models_dir.parent)
    tok_dir = tmp_path / "comfy" / "text_encoders" / "t5_tokenizer"
    tok_dir.mkdir(parents=True)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tok_dir / "tokenizer.json"))
    comfy.modules["comfy"].__path__ = [str(tmp_path / "comfy")]
    return comfy


def _vae_shapes() -> dict:
    """A MAGI-1 VAE state dict's shapes for VAE_DD (8x spatial, 4x temporal, like the released one)."""
    from flowcache.models.magi_vae import MagiVAE, MagiVAEConfig

    cfg = MagiVAEConfig(embed_dim=32, enc_depth=1, dec_depth=1, num_heads=2, mlp_hidden=64, patch_size=8,
                        patch_length=4, z_chans=4, ref_latent_length=2, ref_latent_size=2, unpatch_channels=4,
                        use_final_proj=True)  # narrow tokens: a final projection unpatchifies them
    return MagiVAE(cfg).state_dict()


def _graph(pack, prompt: str = "a red fox runs in snow", **over):
    n = nodes(pack)
    (model,) = run_node(n["FlowCacheModelLoader"], model_name="magi_4.5B_distill/model.safetensors", dtype="fp32")["result"]
    (cond,) = run_node(n["FlowCacheMagiTextEncode"], t5_name="t5_tiny.safetensors", prompt=prompt)
    (vae,) = run_node(n["FlowCacheMagiVAELoader"], vae_name="magi1/diffusion_pytorch_model.safetensors")
    (cache,) = run_node(n["FlowCacheCache"], **CACHE)
    kw = widget_defaults(n["FlowCacheSampler"])
    kw.update(SETTINGS, model=model, positive=cond, negative=cond, cache=cache, unique_id="9")
    kw.update(over)
    out = run_node(n["FlowCacheSampler"], **kw)
    return model, cond, vae, out


def test_magi_through_the_nodes_matches_the_pipeline(pack, magi_files):
    model, cond, vae, out = _graph(pack)
    assert model.loaded.family == "magi" and model.loaded.model.distill is True  # the folder name says distill
    states, extra = cond[0]
    assert states.shape == (1, 800, D) and int(extra["attention_mask"].sum()) == 6 + 1  # 6 words and </s>
    (latent,) = out["result"]
    assert latent["flowcache_codec"] == "magi" and latent["samples"].shape == (1, 4, 6, 4, 4)
    stats = out["ui"]["flowcache_stats"][0]
    assert stats["reused"] > 0 and stats["settings"]["magi"]["chunks"] == 3
    texts = [d["text"] for e, d in magi_files.events if e == "flowcache.progress"]
    assert texts[0] == "window 1/1, chunk 0: step 1/8, reused 0" and texts[-1].startswith("window 1/1, chunk 2: step 8/8")

    # The same run straight through the core: the nodes add nothing and lose nothing.
    magi = pack_submodule(pack, "flowcache.pipelines.magi")  # the pack's own copy, as the nodes use it
    resolve_cache = pack_submodule(pack, "flowcache.presets").resolve_cache
    magi_chunk_captions = pack_submodule(pack, "flowcache.text").magi_chunk_captions
    MagiPipeline, MagiSettings = magi.MagiPipeline, magi.MagiSettings
    caption, mask = magi_chunk_captions(states, extra["attention_mask"], 3, extra["flowcache_magi_special_tokens"])
    s = MagiSettings(num_frames=24, width=32, height=32, num_steps=8, chunk_width=2, shift=3.0, seed=5)
    cache = resolve_cache("magi-4.5B", "flowcache", "custom", threshold=0.05, warmup=1, kv_budget=0)
    ref, _ = MagiPipeline(model.loaded.model)(caption, mask, s, cache)
    assert torch.equal(latent["samples"], ref)

    (frames,) = run_node(nodes(pack)["FlowCacheDecode"], samples=latent, magi_vae=vae)
    assert frames.shape == (24, 32, 32, 3) and 0 <= float(frames.min()) <= float(frames.max()) <= 1
    saved = run_node(nodes(pack)["FlowCacheDecodeSave"], samples=latent, magi_vae=vae, filename_prefix="magi",
                     frame_rate=24.0, loop_count=0, format="video/h264-mp4", crf=19, unique_id="10")
    entry = saved["ui"]["images"][0]
    assert entry["frames"] == 24 and (magi_files.output_dir / entry["filename"]).is_file()
    from flowcache.video import read_video

    assert read_video(saved["result"][0]).shape == (24, 32, 32, 3)


def test_magi_bad_inputs_name_the_widget(pack, magi_files):
    n = nodes(pack)
    _, cond, vae, out = _graph(pack)
    (latent,) = out["result"]
    err = pack_submodule(pack, "flowcache.errors").InputError
    with pytest.raises(err, match="magi_vae"):
        run_node(n["FlowCacheDecode"], samples=latent)
    with pytest.raises(err, match="magi_vae"):
        run_node(n["FlowCacheDecodeSave"], samples=latent, filename_prefix="x", frame_rate=24.0, loop_count=0,
                 format="video/h264-mp4", crf=19)
    with pytest.raises(err, match="prefix_images"):  # a prefix needs the VAE to encode it
        _graph(pack, prefix_images=torch.rand(1, 32, 32, 3))
    wan_cond = [[torch.randn(1, 8, 4096), {}]]
    with pytest.raises(err, match="positive"):
        _graph(pack, positive=wan_cond)
    ck = pack_submodule(pack, "flowcache.errors").CheckpointError
    (magi_files.models_dir.parent / "text_encoders" / "magi1_special_tokens.npz").unlink()
    with pytest.raises(ck, match="magi1_special_tokens.npz"):
        run_node(n["FlowCacheMagiTextEncode"], t5_name="t5_tiny.safetensors", prompt="a fox")


def test_magi_image_to_video_through_the_nodes(pack, magi_files):
    *_, vae, _ = _graph(pack)
    _, _, _, out = _graph(pack, magi_vae=vae, prefix_images=torch.rand(1, 32, 32, 3))
    (latent,) = out["result"]
    # the image's latent frame, then 6 generated ones, rounded up to whole chunks of 2 (I2V returns them all)
    assert latent["samples"].shape[2] == 8
    assert out["ui"]["flowcache_stats"][0]["settings"]["magi"]["prefix_chunks"] == 0


# ------------------------------------------------------------------------------------ decode & save

class ComfyLikeVAE:
    """What ComfyUI's VAE object exposes that the streaming decoder uses: the Wan module, named as Wan names it."""

    def __init__(self, module):
        self.first_stage_model = module


def test_wan_stream_from_a_comfy_vae_equals_one_whole_decode(pack, comfy):
    from flowcache.models.wan_vae import WanVAE

    torch.manual_seed(0)
    wan = WanVAE(dim=8, z_dim=16).eval()
    z = torch.randn(1, 16, 5, 4, 4)
    stream = pack_submodule(pack, "nodes.decode_save").wan_stream_from_comfy(ComfyLikeVAE(wan))
    pieces = torch.cat([stream(z[:, :, a:a + 2]) for a in range(0, 5, 2)])
    whole = wan.decode(z)
    assert pieces.shape == whole.shape == (1 + 4 * 4, 32, 32, 3)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-5)

    out = run_node(nodes(pack)["FlowCacheDecodeSave"], samples={"samples": z}, vae=ComfyLikeVAE(wan),
                   filename_prefix="wan/long", frame_rate=16.0, loop_count=0, format="image/webp", crf=19)
    entry = out["ui"]["images"][0]
    assert entry["subfolder"] == "wan" and entry["frames"] == 17 and out["ui"]["animated"] == [True]
    err = pack_submodule(pack, "flowcache.errors").InputError
    with pytest.raises(err, match="vae"):
        run_node(nodes(pack)["FlowCacheDecodeSave"], samples={"samples": z}, filename_prefix="x", frame_rate=16.0,
                 loop_count=0, format="image/webp", crf=19)


def test_decode_save_cancel_leaves_no_file(pack, comfy):
    from flowcache.models.wan_vae import WanVAE

    wan = WanVAE(dim=8, z_dim=16).eval()
    z = torch.randn(1, 16, 9, 4, 4)
    comfy.interrupt_after = 2  # the second piece's progress check raises, as Cancel does
    with pytest.raises(StubInterrupt):
        run_node(nodes(pack)["FlowCacheDecodeSave"], samples={"samples": z}, vae=ComfyLikeVAE(wan),
                 filename_prefix="cancelled", frame_rate=16.0, loop_count=0, format="video/h264-mp4", crf=19)
    assert [p for p in comfy.output_dir.rglob("*") if p.is_file()] == []
