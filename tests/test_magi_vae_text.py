"""MAGI-1 VAE (released key layout, tiling) and the T5 / special-token text path, on tiny random models."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowcache.errors import CheckpointError, InputError
from flowcache.models.magi_vae import (MAGI_VAE_SCALE_FACTOR, MagiVAE, MagiVAECodec, MagiVAEConfig, build_magi_vae,
                                       load_magi_vae, magi_vae_config_from_state_dict, tiled_apply)
from flowcache.text import (T5Tokenizer, clean_caption, encode_ids, find_magi_special_tokens,
                            load_magi_special_tokens, load_t5_encoder, magi_chunk_captions, pad_ids)
from flowcache.text.t5 import build_t5_encoder, relative_position_bucket, t5_config_from_state_dict

torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------------ VAE helpers
# Tiny MAGI VAE: 2x spatial, 2x temporal, width 32 = 4 unpatch channels x (2*2*2) pixels, 2 heads.
TINY_DD = {"video_size": 8, "video_length": 4, "patch_size": 2, "patch_length": 2, "z_chans": 4, "embed_dim": 32,
           "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "double_z": True, "ln_in_attn": True, "qkv_bias": True,
           "conv_last_layer": True, "with_cls_token": True, "use_rope": False, "norm_code": False}


def _tiny_vae_cfg() -> MagiVAEConfig:
    return MagiVAEConfig(embed_dim=32, enc_depth=2, dec_depth=2, num_heads=2, mlp_hidden=128, patch_size=2,
                         patch_length=2, z_chans=4, ref_latent_length=2, ref_latent_size=4, unpatch_channels=4)


def _tiny_vae_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in MagiVAE(_tiny_vae_cfg()).state_dict().items()}


def _make_local(vae: MagiVAE, spatial_conv: bool) -> MagiVAE:
    """Token-local VAE: attention adds a constant (zero out-projection), positional tables constant (any resize
    of a constant table is the same constant), decoder conv centre tap only (or full 3x3 spatial taps)."""
    with torch.no_grad():
        for side in (vae.encoder, vae.decoder):
            for blk in side.blocks:
                blk.attn.proj.weight.zero_()
            side.pos_embed.copy_(side.pos_embed[:, :1].expand_as(side.pos_embed).clone())
        w = vae.decoder.last_layer.weight
        keep = torch.zeros_like(w)
        if spatial_conv:
            keep[:, :, 1] = w[:, :, 1]       # temporal centre only (MAGI has no temporal overlap)
        else:
            keep[:, :, 1, 1, 1] = w[:, :, 1, 1, 1]
        w.copy_(keep)
    return vae


# ------------------------------------------------------------------------------------------------ VAE tests
def test_vae_released_key_names_and_config_from_shapes(tmp_path):
    sd = _tiny_vae_sd()
    for k in ("encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.pos_embed",
              "encoder.blocks.1.attn.qkv.weight", "encoder.blocks.0.attn.qkv.bias", "encoder.blocks.0.attn.proj.bias",
              "encoder.blocks.0.norm2.weight", "encoder.blocks.0.mlp.fc1.weight", "encoder.blocks.0.mlp.fc2.bias",
              "encoder.norm.weight", "encoder.last_layer.weight", "decoder.proj_in.weight", "decoder.cls_token",
              "decoder.pos_embed", "decoder.blocks.1.mlp.fc2.weight", "decoder.norm.bias", "decoder.last_layer.weight"):
        assert k in sd, k
    assert not any("norm1" in k or "quant_conv" in k for k in sd)
    assert sd["encoder.patch_embed.proj.weight"].shape == (32, 3, 2, 2, 2)
    assert sd["encoder.pos_embed"].shape == (1, 2 * 4 * 4 + 1, 32)
    assert sd["decoder.last_layer.weight"].shape == (3, 4, 3, 3, 3)

    cfg = magi_vae_config_from_state_dict(sd, "x", ddconfig=TINY_DD)
    assert cfg == _tiny_vae_cfg()
    # Without config.json: heads default to width/64 (MAGI: 1024/64 = 16) unless given; grid from video_length 16.
    assert magi_vae_config_from_state_dict(sd, "x", num_heads=2).num_heads == 2

    # Released folder layout: config.json + diffusion_pytorch_model.safetensors (bf16 storage upcast on load).
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": TINY_DD}))
    vae = load_magi_vae(folder)
    assert vae.cfg == cfg and vae.dtype == torch.float32
    torch.testing.assert_close(vae.decoder.proj_in.weight, sd["decoder.proj_in.weight"].to(torch.bfloat16).float())
    # A prefix in front of the keys is stripped.
    pre = build_magi_vae({"vae." + k: v for k, v in sd.items()}, "p.safetensors", ddconfig=TINY_DD)
    assert pre.cfg == cfg


def test_vae_codec_shapes_scale_and_frame_rules():
    vae = build_magi_vae(_tiny_vae_sd(), "tiny", ddconfig=TINY_DD)
    codec = MagiVAECodec(vae, fps=8, tiled=False)
    torch.manual_seed(0)
    pix = torch.rand(8, 12, 20, 3)
    z = codec.encode(pix)
    assert z.shape == (1, 4, 4, 6, 10) == codec.latent_shape(8, 12, 20)
    raw = vae.encode_tile(pix.permute(3, 0, 1, 2)[None] * 2 - 1)
    torch.testing.assert_close(z, raw * MAGI_VAE_SCALE_FACTOR)            # DiT space = mode x 0.18215
    out = codec.decode(z)
    assert out.shape == (8, 12, 20, 3) and out.min() >= 0 and out.max() <= 1
    expect = ((vae.decode_tile(z / MAGI_VAE_SCALE_FACTOR)[0] + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)
    torch.testing.assert_close(out, expect)
    # One image -> one latent frame (repeated to 4 frames inside); one latent frame -> one frame.
    assert codec.encode(pix[:1]).shape == (1, 4, 1, 6, 10)
    assert codec.decode(z[:, :, :1]).shape == (1, 12, 20, 3)
    with pytest.raises(InputError, match="multiple of 2"):
        codec.encode(pix[:3])
    with pytest.raises(InputError, match="multiple of 2 pixels"):
        codec.encode(pix[:, :11])


def test_tiler_equals_untiled_for_a_local_map():
    """MAGI's tiling on a map without context (nearest upsampling): blending equal values changes nothing, so
    tiled == untiled exactly, with several tiles along T, H and W and short last tiles."""
    def up(z):
        return z.repeat_interleave(4, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)

    z = torch.randn(1, 2, 7, 45, 37)
    out = tiled_apply(z, up, tile=(3, 32, 32), step=(3, 24, 24), blend=(0, 64, 64), scale=(None, 8, 8),
                      blend_from_blended=False)
    torch.testing.assert_close(out, up(z), rtol=0, atol=1e-6)
    out2 = tiled_apply(z, up, tile=(3, 32, 32), step=(3, 24, 24), blend=(0, 64, 64), scale=(None, 8, 8),
                       blend_from_blended=True)
    torch.testing.assert_close(out2, up(z), rtol=0, atol=1e-6)


def test_vae_tiled_matches_untiled_on_overlapping_tiles():
    torch.manual_seed(1)
    vae = _make_local(build_magi_vae(_tiny_vae_sd(1), "tiny", ddconfig=TINY_DD), spatial_conv=False)
    # tile 16 px = 8 latents, step 6 latents / 12 px, blend 4 px (decode) / 2 latents (encode); 4-frame T tiles.
    z = torch.randn(1, 4, 5, 15, 13)
    tiled = vae.decode(z, fps=8, tile_px=16)
    whole = vae.decode(z, fps=8, tiled=False)
    # Latent T 5 = tiles 2 + 2 + 1: the 1-frame tile decodes to one frame, as in MAGI.
    assert tiled.shape == (1, 3, 9, 30, 26) and whole.shape == (1, 3, 10, 30, 26)
    torch.testing.assert_close(tiled, whole[:, :, :9], rtol=0, atol=1e-5)
    x = torch.rand(1, 3, 8, 30, 26) * 2 - 1
    torch.testing.assert_close(vae.encode(x, fps=8, tile_px=16), vae.encode(x, fps=8, tiled=False), rtol=0, atol=1e-5)

    # With the 3x3 spatial conv, tile borders see zero padding; the linear blend hides the seam: far below hard
    # stitching, and only inside the blend bands. (One column of tiles: where four tiles meet, MAGI's decoder
    # blends with its neighbours as decoded, not as blended, so a neighbour's border row shows there.)
    vae3 = _make_local(build_magi_vae(_tiny_vae_sd(1), "tiny", ddconfig=TINY_DD), spatial_conv=True)
    z = torch.randn(1, 4, 2, 20, 6)
    whole = vae3.decode(z, fps=8, tiled=False)
    blended = vae3.decode(z, fps=8, tile_px=16)
    hard = tiled_apply(z, vae3.decode_tile, tile=(2, 8, 8), step=(2, 6, 6), blend=(0, 0, 0), scale=(None, 2, 2),
                       blend_from_blended=False)
    err_blend, err_hard = (blended - whole).abs(), (hard - whole).abs()
    assert err_hard.max() > 1e-3
    assert err_blend.max() < 0.5 * err_hard.max()
    rows = err_blend.amax(dim=(0, 1, 2, 4)) > 1e-5
    allowed = torch.zeros_like(rows)
    for start in range(12, rows.numel(), 12):
        allowed[start:start + 4] = True
    assert not (rows & ~allowed).any()


def test_vae_bad_keys_are_explained(tmp_path):
    sd = _tiny_vae_sd()
    f = tmp_path / "wrong_vae.safetensors"
    save_file({"x_embedder.weight": torch.zeros(4, 4), "videodit_blocks.layers.0.x": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError, match=r"wrong_vae\.safetensors.*MAGI-1 DiT"):
        load_magi_vae(f)
    bad = dict(sd)
    del bad["decoder.blocks.1.mlp.fc1.weight"]
    bad["encoder.blocks.0.attn.to_q.weight"] = torch.zeros(32, 32)
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors.*missing 1.*decoder\.blocks\.1\.mlp\.fc1\.weight"
                                              r".*unexpected 1.*to_q"):
        build_magi_vae(bad, "tiny.safetensors", ddconfig=TINY_DD)
    bad = dict(sd)
    bad["encoder.blocks.0.mlp.fc2.weight"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError, match="wrong shape: encoder.blocks.0.mlp.fc2.weight"):
        build_magi_vae(bad, "tiny.safetensors", ddconfig=TINY_DD)
    conv_vae = {"encoder.down.0.block.0.conv1.weight": torch.zeros(1),
                "decoder.up.0.block.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="convolutional"):
        build_magi_vae(conv_vae, "sdxl_vae.safetensors")


# ------------------------------------------------------------------------------------------------ T5 helpers
D, DKV, HEADS, DFF, LAYERS, VOCAB = 32, 8, 4, 48, 3, 64


def _tiny_t5_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny T5 v1.1 encoder in Hugging Face key layout, as t5xxl_fp16.safetensors stores it."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {"shared.weight": r(VOCAB, D, s=1.0), "encoder.final_layer_norm.weight": 1 + r(D)}
    for i in range(LAYERS):
        b = f"encoder.block.{i}.layer."
        for n in "qkvo":
            sd[f"{b}0.SelfAttention.{n}.weight"] = r(D, D) if n != "o" else r(D, HEADS * DKV)
        sd[f"{b}0.layer_norm.weight"] = 1 + r(D)
        sd[f"{b}1.DenseReluDense.wi_0.weight"] = r(DFF, D)
        sd[f"{b}1.DenseReluDense.wi_1.weight"] = r(DFF, D)
        sd[f"{b}1.DenseReluDense.wo.weight"] = r(D, DFF)
        sd[f"{b}1.layer_norm.weight"] = 1 + r(D)
    sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = r(32, HEADS, s=1.0)
    return sd


def _bucket_plain(rel: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    half = num_buckets // 2
    out = half if rel > 0 else 0
    d = abs(rel)
    exact = half // 2
    if d < exact:
        return out + d
    return out + min(half - 1, exact + int(math.log(d / exact) / math.log(max_distance / exact) * (half - exact)))


def _t5_plain(sd: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """T5 v1.1 encoder written out directly (fp32): the re-derivation the module is checked against."""
    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    L = ids.shape[1]
    x = sd["shared.weight"][ids[0]]
    table = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    bias = torch.stack([torch.stack([table[_bucket_plain(j - i)] for j in range(L)]) for i in range(L)])  # L L H
    bias = bias.permute(2, 0, 1) + torch.where(mask[0].bool(), 0.0, -1e30)[None, None, :]
    for i in range(LAYERS):
        b = f"encoder.block.{i}.layer."
        h = rms(x, sd[f"{b}0.layer_norm.weight"])
        q, k, v = (h @ sd[f"{b}0.SelfAttention.{n}.weight"].T for n in "qkv")
        q, k, v = (t.view(L, HEADS, DKV).transpose(0, 1) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1) @ v
        x = x + att.transpose(0, 1).reshape(L, HEADS * DKV) @ sd[f"{b}0.SelfAttention.o.weight"].T
        h = rms(x, sd[f"{b}1.layer_norm.weight"])
        ff = F.gelu(h @ sd[f"{b}1.DenseReluDense.wi_0.weight"].T, approximate="tanh") * (
            h @ sd[f"{b}1.DenseReluDense.wi_1.weight"].T)
        x = x + ff @ sd[f"{b}1.DenseReluDense.wo.weight"].T
    return rms(x, sd["encoder.final_layer_norm.weight"])[None]


# ------------------------------------------------------------------------------------------------ T5 tests
def test_relative_position_buckets():
    rel = torch.arange(-300, 301)
    got = relative_position_bucket(rel).tolist()
    assert got == [_bucket_plain(r) for r in rel.tolist()]
    assert relative_position_bucket(torch.tensor([0, -1, 1, -7, -8, -16, -127, -128, 500])).tolist() == \
        [0, 1, 17, 7, 8, 10, 15, 15, 31]


def test_t5_config_from_shapes_and_matches_plain_rederivation():
    sd = _tiny_t5_sd()
    cfg = t5_config_from_state_dict(sd)
    got = (cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers, cfg.num_buckets, cfg.vocab_size, cfg.gated)
    assert got == (D, DKV, HEADS, DFF, LAYERS, 32, VOCAB, True)
    enc = build_t5_encoder(dict(sd), "tiny")
    ids, mask = pad_ids(torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(3)).tolist(), 28)
    out = enc(ids, mask)
    torch.testing.assert_close(out, _t5_plain(sd, ids, mask), rtol=1e-4, atol=1e-4)
    # Position enters only through the relative bias: with a zero table the encoder is permutation-equivariant,
    # with the real one it is not.
    seq = ids[:, :12]
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    flat = dict(sd)
    flat["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, HEADS)
    enc0 = build_t5_encoder(flat)
    torch.testing.assert_close(enc0(seq[:, perm]), enc0(seq)[:, perm], rtol=1e-5, atol=1e-5)
    assert (enc(seq[:, perm]) - enc(seq)[:, perm]).abs().max() > 1e-2


def test_t5_padding_does_not_change_real_tokens_and_output_is_800_rows():
    enc = build_t5_encoder(_tiny_t5_sd(), "tiny")
    tokens = torch.randint(3, VOCAB, (37,), generator=torch.Generator().manual_seed(4)).tolist()
    ids, mask = pad_ids(tokens, 800)
    assert ids.shape == mask.shape == (1, 800) and int(mask.sum()) == 38 and ids[0, 37] == 1 and ids[0, 38:].eq(0).all()
    n = 38
    short = enc(ids[:, :n])
    full = enc(ids, mask)
    torch.testing.assert_close(full[:, :n], short, rtol=1e-5, atol=1e-5)
    ids2 = ids.clone()
    ids2[0, n:] = 7                              # what sits in the padding must not matter either
    torch.testing.assert_close(enc(ids2, mask)[:, :n], full[:, :n], rtol=1e-5, atol=1e-5)
    states, m = encode_ids(enc, ids, mask)       # default: run only the real tokens, zero rows after
    assert states.shape == (1, 800, D) and states.dtype == torch.float32 and torch.equal(m, mask)
    torch.testing.assert_close(states[:, :n], full[:, :n], rtol=1e-5, atol=1e-5)
    assert states[:, n:].abs().max() == 0
    states_full, _ = encode_ids(enc, ids, mask, full=True)
    torch.testing.assert_close(states_full, full)
    # Truncation as MAGI's tokenizer call: 799 text tokens + </s>.
    ids, mask = pad_ids(list(range(3, 903)), 800)
    assert int(mask.sum()) == 800 and ids[0, -1] == 1 and ids[0, -2] == 801


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_t5_fp16_fp8_and_scaled_fp8_files_load_and_upcast(tmp_path):
    sd = _tiny_t5_sd()
    ids, mask = pad_ids([5, 9, 11, 40, 3], 12)
    # fp16 file in the bundled-checkpoint prefix layout, with HF's duplicate embed_tokens.
    f16 = {"text_encoders.t5xxl.transformer." + k: v.half() for k, v in sd.items()}
    f16["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"] = sd["shared.weight"].half()
    save_file(f16, str(tmp_path / "t5xxl_fp16.safetensors"))
    enc16 = load_t5_encoder(tmp_path / "t5xxl_fp16.safetensors")
    assert enc16.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16  # kept as stored
    ref16 = build_t5_encoder({k: v.half().float() for k, v in sd.items()}, keep_storage_dtype=False)
    torch.testing.assert_close(enc16(ids, mask), ref16(ids, mask), rtol=1e-5, atol=1e-5)

    # fp8 e4m3fn file (norms stored in fp8 too, as some fp8 files do).
    f8 = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
    save_file(f8, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    enc8 = load_t5_encoder(tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    ref8 = build_t5_encoder({k: v.float() for k, v in f8.items()}, keep_storage_dtype=False)
    out8 = enc8(ids, mask)
    assert torch.isfinite(out8).all()
    torch.testing.assert_close(out8, ref8(ids, mask), rtol=1e-5, atol=1e-5)

    # ComfyUI's scaled fp8: weight = fp8(w / s) with X.scale_weight beside it, plus a scaled_fp8 marker.
    scaled = {}
    for k, v in sd.items():
        if k.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")):
            s = v.abs().max() / 448.0
            scaled[k] = (v / s).to(torch.float8_e4m3fn)
            scaled[k[: -len("weight")] + "scale_weight"] = s.reshape(())
        else:
            scaled[k] = v.half()
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    encs = load_t5_encoder(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    deq = {k: (scaled[k].float() * scaled[k[: -len("weight")] + "scale_weight"]) if
           k[: -len("weight")] + "scale_weight" in scaled else v.float()
           for k, v in scaled.items() if not k.endswith("scale_weight") and k != "scaled_fp8"}
    torch.testing.assert_close(encs(ids, mask), build_t5_encoder(deq)(ids, mask), rtol=1e-4, atol=1e-4)
    # Close to the fp32 weights (the quantisation is the only difference).
    assert (encs(ids, mask) - build_t5_encoder(dict(sd))(ids, mask)).abs().max() < 0.5

    # bf16 compute runs and stays close to fp32.
    encbf = load_t5_encoder(tmp_path / "t5xxl_fp16.safetensors", compute_dtype=torch.bfloat16)
    assert (encbf(ids, mask).float() - enc16(ids, mask)).abs().max() < 0.2


def test_t5_bad_files_are_explained(tmp_path):
    f = tmp_path / "clip_l.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, str(f))
    with pytest.raises(CheckpointError, match=r"clip_l\.safetensors: not a T5 encoder.*CLIP"):
        load_t5_encoder(f)
    sd = _tiny_t5_sd()
    del sd["encoder.block.2.layer.1.DenseReluDense.wo.weight"]
    with pytest.raises(CheckpointError, match=r"t5\.safetensors.*missing 1.*block\.2\.layer\.1\.DenseReluDense\.wo"):
        build_t5_encoder(sd, "t5.safetensors")
    sd = _tiny_t5_sd()
    sd["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, HEADS)
    with pytest.raises(CheckpointError, match="UMT5"):
        build_t5_encoder(sd, "umt5.safetensors")


def test_tokenizer_is_imported_lazily_with_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        T5Tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="t5_tokenizer/tokenizer.json"):
        T5Tokenizer(tmp_path / "missing.json")


def _comfy_tokenizer() -> Path | None:
    for root in (os.environ.get("COMFYUI_PATH"), "/tmp/comfyui"):
        if root and (Path(root) / "comfy/text_encoders/t5_tokenizer/tokenizer.json").is_file():
            return Path(root) / "comfy/text_encoders/t5_tokenizer/tokenizer.json"
    return None


@pytest.mark.skipif(_comfy_tokenizer() is None, reason="ComfyUI's t5_tokenizer/tokenizer.json not found")
def test_comfyui_tokenizer_json_is_t5_v11():
    pytest.importorskip("tokenizers")
    tok = T5Tokenizer(_comfy_tokenizer())
    assert tok.vocab_size == 32100
    ids, mask = tok(clean_caption("Good Boy"), 800)
    assert ids[0, :3].tolist() == [207, 4940, 1] and int(mask.sum()) == 3 and ids.shape == (1, 800)


def test_clean_caption_matches_magi_preprocessing():
    # Expected strings produced by MAGI-1's T5Embedder.text_preprocessing (run once, outside the tests).
    assert clean_caption("Good Boy") == "good boy"
    assert clean_caption('A cute DOG runs—fast!  Visit https://x.com/abc now. 猫 “quoted” @someone #12') == \
        'a cute dog runs-fast! visit now. "quoted"'
    assert clean_caption("<p>Hello &amp; <b>world</b></p> image.png 1920x1080 free shipping") == "hello world"
    assert clean_caption("this-is-my_cute-cat_photo") == "this is my cute cat photo"
    assert clean_caption("A–B — C (test) [x] {y} | * ~ ½") == "a-b - c test x y"


# ------------------------------------------------------------------------------------------------ special tokens
def _npz(tmp_path, dim=D, rows=100, name="magi1_special_tokens.npz"):
    rng = np.random.default_rng(0)
    path = tmp_path / name
    np.savez(path, caption_token=rng.normal(0, 0.125, (1, dim)), logo_token=rng.normal(0, 0.125, (1, dim)),
             other_tokens=rng.normal(0, 0.125, (rows, dim)))
    return path


def test_special_tokens_load_and_per_chunk_captions(tmp_path):
    path = _npz(tmp_path)
    assert find_magi_special_tokens([tmp_path / "nope", tmp_path]) == path
    tok = load_magi_special_tokens(path)
    raw = np.load(path)["other_tokens"]
    torch.testing.assert_close(tok.other_tokens, torch.from_numpy(raw.astype(np.float16).astype(np.float32)))
    assert not np.array_equal(tok.other_tokens.double().numpy(), raw)          # rounded through fp16 like MAGI
    torch.testing.assert_close(tok.hq, tok.other_tokens[1:2])
    torch.testing.assert_close(tok.named("DURATION_TOKEN_1"), tok.other_tokens[7:8])
    torch.testing.assert_close(tok.duration(99), tok.other_tokens[14:15])

    L = 10
    cap = torch.randn(1, L, D)
    mask = torch.tensor([[1] * 4 + [0] * 6])
    n = 3
    c, m = magi_chunk_captions(cap, mask, n, tok)
    assert c.shape == (1, n, L, D) and m.shape == (1, n, L)
    for i in range(n):
        torch.testing.assert_close(c[0, i, 0], tok.other_tokens[7 + (n - 1 - i)])  # DURATION first
        torch.testing.assert_close(c[0, i, 1], tok.other_tokens[1])                # then HQ
        torch.testing.assert_close(c[0, i, 2:], cap[0, : L - 2])                   # caption cut to L
        assert m[0, i].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    c10, _ = magi_chunk_captions(cap, mask, 10, tok)
    torch.testing.assert_close(c10[0, 0, 0], tok.other_tokens[14])                 # capped at 7 chunks after
    torch.testing.assert_close(c10[0, 9, 0], tok.other_tokens[7])
    full = torch.ones(1, L, dtype=torch.long)
    _, mf = magi_chunk_captions(cap, full, 2, tok)
    assert mf.shape == (1, 2, L) and mf.all()
    plain, pm = magi_chunk_captions(cap, mask, 2, None)                            # explicit opt-out
    torch.testing.assert_close(plain[0, 1], cap[0])
    assert torch.equal(pm[0, 0], mask[0])


def test_special_tokens_errors_say_where_the_file_goes(tmp_path):
    with pytest.raises(CheckpointError, match=r"models/text_encoders/magi1_special_tokens\.npz"):
        load_magi_special_tokens(tmp_path / "magi1_special_tokens.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="missing caption_token"):
        load_magi_special_tokens(tmp_path / "other.npz")
    obj = tmp_path / "obj.npz"
    np.savez(obj, caption_token=np.array([{"x": 1}], dtype=object), logo_token=np.zeros((1, 4)),
             other_tokens=np.zeros((100, 4)))
    with pytest.raises(CheckpointError, match="special_tokens.npz"):
        load_magi_special_tokens(obj)                                            # pickles are refused
    with pytest.raises(CheckpointError, match="rows"):
        load_magi_special_tokens(_npz(tmp_path, rows=10, name="short.npz"))
    tok = load_magi_special_tokens(_npz(tmp_path, dim=16, name="d16.npz"))
    with pytest.raises(InputError, match="16-d"):
        magi_chunk_captions(torch.zeros(1, 5, D), torch.ones(1, 5), 2, tok)
