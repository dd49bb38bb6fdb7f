"""MAGI-1 DiT: config from shapes, loading every file layout, and the forward against a plain re-derivation.

The reference forward below is written from the raw weights with explicit per-head / per-group loops, so the
model's GQA, per-group cross-attention K/V split, TP8 output interleave, weight+1 norms, RoPE and gating are
checked against an independent computation rather than against themselves.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowcache.checkpoint import load_checkpoint
from flowcache.errors import CheckpointError
from flowcache.checkpoint import split_prefix
from flowcache.models import MAGI_ANCHORS, detect_family, load_model
from flowcache.models.magi import Fp8Linear, build_magi, distill_dt_for_steps, magi_config_from_state_dict

FP8 = torch.float8_e4m3fn


def load_magi(path, dtype: str = "auto"):
    """A MAGI-1 DiT through the pack's one loader."""
    return load_model(path, dtype, expect="magi").model


def is_magi(keys) -> bool:
    keys = list(keys)
    prefix = split_prefix(keys, MAGI_ANCHORS)
    return detect_family(k[len(prefix):] for k in keys if k.startswith(prefix)) == "magi"
SMALL = dict(layers=3, hidden=192, heads=6, kv=2, dh=32, ffn=384, in_ch=4, cap=64, cap_len=16, cond=48, gated=False)
BIG_LIKE = dict(SMALL, in_ch=32, gated=True)  # 24B-like: doubled input channels, SwiGLU, x_rescale 0.1


def make_sd(layers, hidden, heads, kv, dh, ffn, in_ch, cap, cap_len, cond, gated, seed=0):
    """Random weights under the released key names and [out, in] shapes."""
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    def small(*s):
        return 0.2 * torch.randn(*s, generator=g)

    out_ch = in_ch
    sd = {
        "x_embedder.weight": torch.randn(hidden, in_ch, 1, 2, 2, generator=g) / math.sqrt(in_ch * 4),
        "t_embedder.mlp.0.weight": lin(cond, 256), "t_embedder.mlp.0.bias": small(cond),
        "t_embedder.mlp.2.weight": lin(cond, cond), "t_embedder.mlp.2.bias": small(cond),
        "y_embedder.y_proj_xattn.0.weight": lin(hidden, cap), "y_embedder.y_proj_xattn.0.bias": small(hidden),
        "y_embedder.y_proj_adaln.0.weight": lin(cond, cap), "y_embedder.y_proj_adaln.0.bias": small(cond),
        "y_embedder.null_caption_embedding": torch.randn(cap_len, cap, generator=g),
        "rope.bands": (1.0 / 10000 ** (torch.arange(dh // 8) / (dh // 8))) * (1 + small(dh // 8)),
        "videodit_blocks.final_layernorm.weight": small(hidden), "videodit_blocks.final_layernorm.bias": small(hidden),
        "final_linear.linear.weight": lin(4 * out_ch, hidden),
    }
    for i in range(layers):
        p = f"videodit_blocks.layers.{i}."
        sd.update({
            p + "ada_modulate_layer.proj.0.weight": lin(2 * hidden, cond), p + "ada_modulate_layer.proj.0.bias": small(2 * hidden),
            p + "self_attention.linear_qkv.layer_norm.weight": 1 + small(hidden),
            p + "self_attention.linear_qkv.layer_norm.bias": small(hidden),
            p + "self_attention.linear_qkv.q.weight": lin(heads * dh, hidden),
            p + "self_attention.linear_qkv.qx.weight": lin(heads * dh, hidden),
            p + "self_attention.linear_qkv.k.weight": lin(kv * dh, hidden),
            p + "self_attention.linear_qkv.v.weight": lin(kv * dh, hidden),
            p + "self_attention.linear_kv_xattn.weight": lin(2 * kv * dh, hidden),
            p + "self_attention.linear_proj.weight": lin(hidden, 2 * heads * dh),
            p + "self_attn_post_norm.weight": small(hidden), p + "self_attn_post_norm.bias": small(hidden),
            p + "mlp.layer_norm.weight": 1 + small(hidden), p + "mlp.layer_norm.bias": small(hidden),
            p + "mlp.linear_fc1.weight": lin(ffn * (2 if gated else 1), hidden),
            p + "mlp.linear_fc2.weight": lin(hidden, ffn),
            p + "mlp_post_norm.weight": small(hidden), p + "mlp_post_norm.bias": small(hidden),
        })
        for n in ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn"):
            sd[p + f"self_attention.{n}.weight"], sd[p + f"self_attention.{n}.bias"] = small(dh), small(dh)
    return sd


def quantize_fp8(sd, layers):
    """The release's fp8 layout for layers 1..L-2, and the dequantized weights the fp8 forward approximates."""
    g = torch.Generator().manual_seed(1)
    q, deq = dict(sd), dict(sd)
    for i in range(1, layers - 1):
        p = f"videodit_blocks.layers.{i}."
        tensor_wise = ["self_attention.linear_qkv." + n for n in ("q", "qx", "k", "v")] + ["mlp.linear_fc1"]
        for name in tensor_wise + ["self_attention.linear_proj", "mlp.linear_fc2"]:
            w = q.pop(p + name + ".weight")
            s = 0.75 + 0.5 * torch.rand(w.shape[1], generator=g)
            a = s[0] if name in tensor_wise else torch.tensor(0.9)  # the scalar the kernel multiplies by
            wt = w * s[None] / a
            ws = wt.abs().max() / 448
            w8 = (wt / ws).to(FP8)
            q[p + name + ".weight"], q[p + name + ".weight_scale"] = w8[None], ws.reshape(1)
            if name in tensor_wise:
                q[p + name + ".input_scale"] = s
            else:
                q[p + name + ".input_scale"], q[p + name + ".smooth_scale"] = a.reshape(1), s[None]
            deq[p + name + ".weight"] = w8.float() * ws * a / s[None]
    return q, deq


# ------------------------------------------------------------------------------------------------- reference
def ref_forward(sd, x, t, caption, mask, n, chunk_start=0, distill_dt=None, uncond=False, kv_split="group",
                proj_order="tp8", eps=1e-6):
    """Plain fp32 re-derivation of the MAGI-1 forward from raw weights; caption [B, n, Ly, Cc], mask [B, n, Ly]."""
    W = {k: v.float() for k, v in sd.items()}
    dh = W["videodit_blocks.layers.0.self_attention.q_layernorm.weight"].shape[0]
    hidden, in_ch = W["x_embedder.weight"].shape[:2]
    half = in_ch == 32
    rescale_x = 0.1 if half else 1.0
    Hq = W["videodit_blocks.layers.0.self_attention.linear_qkv.q.weight"].shape[0] // dh
    G = W["videodit_blocks.layers.0.self_attention.linear_qkv.k.weight"].shape[0] // dh
    layers = 1 + max(int(k.split(".")[2]) for k in W if k.startswith("videodit_blocks.layers."))
    B, C, T, H, Wd = x.shape
    h, w, Tc = H // 2, Wd // 2, T // n
    L, Lc = T * h * w, Tc * h * w
    chunk_of = torch.arange(L) // Lc

    def ln(v, wt, b, one_p):
        return F.layer_norm(v, v.shape[-1:], wt + 1 if one_p else wt, b, eps)

    def temb(tt):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = tt[:, None] * freqs * 1000
        e = torch.cat([torch.cos(args), torch.sin(args)], -1).bfloat16().float()
        e = F.silu(e @ W["t_embedder.mlp.0.weight"].T + W["t_embedder.mlp.0.bias"])
        return e @ W["t_embedder.mlp.2.weight"].T + W["t_embedder.mlp.2.bias"]

    # RoPE angles per token: [t bands | h bands | w bands], spatial coordinates on a 16x16 reference grid.
    bands = W["rope.bands"]
    nb = bands.numel()
    r = math.sqrt(h * w / 256)
    f_idx, i_idx, j_idx = torch.meshgrid(torch.arange(T), torch.arange(h), torch.arange(w), indexing="ij")
    pos_t = (chunk_start * Tc + f_idx).float().reshape(-1)
    pos_h = ((i_idx - (h - 1) / 2) / (h - 1) * (h / r - 1)).reshape(-1)
    pos_w = ((j_idx - (w - 1) / 2) / (w - 1) * (w / r - 1)).reshape(-1)
    ang = torch.cat([pos_t[:, None] * bands, pos_h[:, None] * bands, pos_w[:, None] * bands], -1)  # [L, 3nb]

    def rope(v):  # v [L, Dh]: dim m pairs with dim m + 3nb for m < 3nb
        out = v.clone()
        for m in range(3 * nb):
            a, b2 = v[:, m], v[:, m + 3 * nb]
            out[:, m] = a * ang[:, m].cos() - b2 * ang[:, m].sin()
            out[:, m + 3 * nb] = b2 * ang[:, m].cos() + a * ang[:, m].sin()
        return out

    outs = []
    for b in range(B):
        xb = x[b:b + 1].float() * rescale_x
        if half:
            xb = torch.cat([xb, xb], 1)
        tok = F.conv3d(xb, W["x_embedder.weight"], stride=(1, 2, 2))[0].flatten(1).T  # [L, D]
        cond = temb(t[b].float())
        if distill_dt is not None:
            cond = cond + temb(torch.full((n,), float(distill_dt)))
        null = W["y_embedder.null_caption_embedding"][-1 if uncond else -2]
        cond = cond + null @ W["y_embedder.y_proj_adaln.0.weight"].T + W["y_embedder.y_proj_adaln.0.bias"]
        ys = [F.silu(caption[b, c].float()[mask[b, c].bool()] @ W["y_embedder.y_proj_xattn.0.weight"].T
                     + W["y_embedder.y_proj_xattn.0.bias"]) for c in range(n)]
        for i in range(layers):
            p = f"videodit_blocks.layers.{i}."
            A = lambda k: W[p + "self_attention." + k]  # noqa: E731
            hn = ln(tok, A("linear_qkv.layer_norm.weight"), A("linear_qkv.layer_norm.bias"), False)
            core = torch.zeros(L, Hq * dh)
            cross = torch.zeros(L, Hq * dh)
            q_all = hn @ A("linear_qkv.q.weight").T
            qx_all = hn @ A("linear_qkv.qx.weight").T
            k_all, v_all = hn @ A("linear_qkv.k.weight").T, hn @ A("linear_qkv.v.weight").T
            ks = [rope(ln(k_all[:, g * dh:(g + 1) * dh], A("k_layernorm.weight"), A("k_layernorm.bias"), True)) for g in range(G)]
            blocked = chunk_of[None, :] > chunk_of[:, None]  # key chunk after query chunk
            wkv = A("linear_kv_xattn.weight")
            for hq in range(Hq):
                g = hq // (Hq // G)  # grouped-query attention
                qh = rope(ln(q_all[:, hq * dh:(hq + 1) * dh], A("q_layernorm.weight"), A("q_layernorm.bias"), True))
                s = (qh @ ks[g].T / math.sqrt(dh)).masked_fill(blocked, float("-inf"))
                core[:, hq * dh:(hq + 1) * dh] = s.softmax(-1) @ v_all[:, g * dh:(g + 1) * dh]
                qx = ln(qx_all[:, hq * dh:(hq + 1) * dh], A("q_layernorm_xattn.weight"), A("q_layernorm_xattn.bias"), True)
                if kv_split == "group":  # rows [k_g, v_g] per group
                    wk, wv = wkv[2 * g * dh:(2 * g + 1) * dh], wkv[(2 * g + 1) * dh:(2 * g + 2) * dh]
                else:  # the wrong, naive half split
                    wk, wv = wkv[g * dh:(g + 1) * dh], wkv[(G + g) * dh:(G + g + 1) * dh]
                for c in range(n):
                    rows = slice(c * Lc, (c + 1) * Lc)
                    kx = ln(ys[c] @ wk.T, A("k_layernorm_xattn.weight"), A("k_layernorm_xattn.bias"), True)
                    att = (qx[rows] @ kx.T / math.sqrt(dh)).softmax(-1)
                    cross[rows, hq * dh:(hq + 1) * dh] = att @ (ys[c] @ wv.T)
            if proj_order == "tp8":
                hd = Hq * dh // 8
                inp = torch.cat([torch.cat([core[:, j * hd:(j + 1) * hd], cross[:, j * hd:(j + 1) * hd]], 1) for j in range(8)], 1)
            else:
                inp = torch.cat([core, cross], 1)
            attn = inp @ A("linear_proj.weight").T
            gates = torch.tanh(F.silu(cond) @ W[p + "ada_modulate_layer.proj.0.weight"].T + W[p + "ada_modulate_layer.proj.0.bias"])
            g_attn, g_mlp = gates[chunk_of, :hidden], gates[chunk_of, hidden:]
            tok = ln(attn * g_attn, W[p + "self_attn_post_norm.weight"], W[p + "self_attn_post_norm.bias"], True) + tok
            m = ln(tok, W[p + "mlp.layer_norm.weight"], W[p + "mlp.layer_norm.bias"], False) @ W[p + "mlp.linear_fc1.weight"].T
            if m.shape[1] == 2 * W[p + "mlp.linear_fc2.weight"].shape[1]:
                m = F.silu(m[:, : m.shape[1] // 2]) * m[:, m.shape[1] // 2:]
            else:
                m = F.gelu(m)
            m = m @ W[p + "mlp.linear_fc2.weight"].T
            tok = ln(m * g_mlp, W[p + "mlp_post_norm.weight"], W[p + "mlp_post_norm.bias"], True) + tok
        tok = ln(tok, W["videodit_blocks.final_layernorm.weight"], W["videodit_blocks.final_layernorm.bias"], True)
        o = tok @ W["final_linear.linear.weight"].T  # [L, (pH pW C)]
        co = o.shape[1] // 4
        img = torch.zeros(co, T, H, Wd)
        for f in range(T):
            for ii in range(h):
                for jj in range(w):
                    vec = o[(f * h + ii) * w + jj].view(2, 2, co)
                    img[:, f, 2 * ii:2 * ii + 2, 2 * jj:2 * jj + 2] = vec.permute(2, 0, 1)
        if half:
            img = img[: co // 2]
        outs.append(img / rescale_x)
    return torch.stack(outs)


class ListKV:
    """Plain history: keeps every chunk's K/V per layer and returns context + current."""

    def __init__(self):
        self.k, self.v, self.seen_q = {}, {}, {}

    def extend(self, layer, q, k, v):
        assert q.dim() == k.dim() == v.dim() == 4 and q.shape[2] == k.shape[2]
        self.k[layer] = torch.cat([self.k[layer], k], 2) if layer in self.k else k
        self.v[layer] = torch.cat([self.v[layer], v], 2) if layer in self.v else v
        self.seen_q[layer] = q.shape
        return self.k[layer], self.v[layer]


def inputs(cfg_kw, n=2, B=1, Tc=2, HW=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    lat = 16 if cfg_kw["in_ch"] == 32 else cfg_kw["in_ch"]
    x = torch.randn(B, lat, n * Tc, HW, HW, generator=g)
    t = torch.rand(B, n, generator=g)
    cap = torch.randn(B, n, 10, cfg_kw["cap"], generator=g)
    mask = torch.zeros(B, n, 10, dtype=torch.bool)
    for c in range(n):
        mask[:, c, : 4 + 2 * c] = True  # different valid lengths per chunk
    return x, t, cap, mask


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sd():
    return make_sd(**SMALL)


@pytest.fixture(scope="module")
def model32(sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("m32") / "model.safetensors"
    save_file(sd, str(path))
    return load_magi(path, dtype="fp32")


# ------------------------------------------------------------------------------------------------- tests
def test_config_from_shapes(sd):
    cfg = magi_config_from_state_dict(sd)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 192, 6, 2, 32)
    assert (cfg.ffn_hidden_size, cfg.gated_linear_unit, cfg.in_channels, cfg.out_channels) == (384, False, 4, 4)
    assert (cfg.caption_channels, cfg.caption_max_length, cfg.cond_dim, cfg.xattn_dim) == (64, 16, 48, 192)
    assert (cfg.patch_size, cfg.t_patch_size, cfg.rope_bands, cfg.fp8) == (2, 1, 4, False)
    assert (cfg.half_channel_vae, cfg.x_rescale_factor) == (False, 1.0)
    big = magi_config_from_state_dict(make_sd(**BIG_LIKE))
    assert big.gated_linear_unit and big.half_channel_vae and big.x_rescale_factor == 0.1 and big.latent_channels == 16


def test_detector_and_wrong_checkpoints(sd, tmp_path):
    assert is_magi(sd) and is_magi("model." + k for k in sd)
    wan = {"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2), "head.modulation": torch.zeros(1, 2, 8),
           "blocks.0.self_attn.q.weight": torch.zeros(8, 8), "text_embedding.0.weight": torch.zeros(8, 64)}
    assert not is_magi(wan)
    with pytest.raises(CheckpointError, match=r"Wan2\.1"):
        magi_config_from_state_dict({"model.diffusion_model." + k: v for k, v in wan.items()})
    with pytest.raises(CheckpointError, match=r"not a MAGI-1 DiT.*missing x_embedder\.weight.*Wan2\.1"):
        magi_config_from_state_dict(wan)
    save_file(wan, str(tmp_path / "wan.safetensors"))
    with pytest.raises(CheckpointError, match=r"^wan\.safetensors: this is a Wan2\.1 / SkyReels-V2 DiT checkpoint, but "
                                              r"this loader expects a MAGI-1 DiT"):
        load_magi(tmp_path / "wan.safetensors")
    broken = dict(sd)
    del broken["videodit_blocks.layers.1.mlp_post_norm.bias"]
    broken["videodit_blocks.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing videodit_blocks\.layers\.1\.mlp_post_norm\.bias; "
                                              r"unexpected videodit_blocks\.layers\.0\.extra\.weight"):
        magi_config_from_state_dict(broken, "x.safetensors")
    bad_shape = dict(sd, **{"videodit_blocks.layers.2.mlp.layer_norm.weight": torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"shapes.*layers\.2\.mlp\.layer_norm\.weight \(7,\)"):
        magi_config_from_state_dict(bad_shape)


def test_forward_matches_reference(model32, sd):
    x, t, cap, mask = inputs(SMALL, n=2)
    out = model32(x, t, cap, mask, chunk_start=0, distill_dt=distill_dt_for_steps(16))
    assert out.shape == x.shape and out.dtype == torch.float32
    ref = ref_forward(sd, x, t, cap, mask, n=2, distill_dt=8.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # The layouts matter: the naive K/V half split or an un-interleaved projection give other results.
    for kw in (dict(kv_split="half"), dict(proj_order="plain")):
        assert (ref_forward(sd, x, t, cap, mask, n=2, distill_dt=8.0, **kw) - ref).abs().max() > 1e-2
    # uncond switches the AdaLN null row; a shared caption [B, Ly, C] equals per-chunk copies of it.
    out_u = model32(x, t, cap, mask, uncond=True)
    torch.testing.assert_close(out_u, ref_forward(sd, x, t, cap, mask, n=2, uncond=True), rtol=1e-4, atol=1e-4)
    shared = model32(x, t, cap[:, 0], mask[:, 0])
    per_chunk = model32(x, t, cap[:, :1].expand(-1, 2, -1, -1), mask[:, :1].expand(-1, 2, -1))
    torch.testing.assert_close(shared, per_chunk, rtol=1e-5, atol=1e-5)


def test_24b_like_variant_matches_reference(tmp_path):
    sd = make_sd(**BIG_LIKE, seed=5)
    save_file(sd, str(tmp_path / "m.safetensors"))
    model = load_magi(tmp_path / "m.safetensors", dtype="fp32")
    x, t, cap, mask = inputs(BIG_LIKE, n=1, B=2)
    out = model(x, t, cap, mask, chunk_start=3)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref_forward(sd, x, t, cap, mask, n=1, chunk_start=3), rtol=1e-4, atol=1e-4)


def test_chunked_forward_with_kv_equals_block_causal_whole(model32):
    x, t, cap, mask = inputs(SMALL, n=3, B=2, seed=7)
    whole = model32(x, t, cap, mask, chunk_start=0, distill_dt=32.0)
    kv = ListKV()
    first = model32(x[:, :, :2], t[:, :1], cap[:, :1], mask[:, :1], chunk_start=0, kv=kv, distill_dt=32.0)
    rest = model32(x[:, :, 2:], t[:, 1:], cap[:, 1:], mask[:, 1:], chunk_start=1, kv=kv, distill_dt=32.0)
    assert kv.k[0].shape == (2, 2, 3 * 2 * 16, 32) and kv.seen_q[0] == (2, 6, 2 * 2 * 16, 32)
    torch.testing.assert_close(torch.cat([first, rest], 2), whole, rtol=1e-4, atol=1e-4)
    # One chunk at a time gives the same.
    kv = ListKV()
    parts = [model32(x[:, :, 2 * c:2 * c + 2], t[:, c:c + 1], cap[:, c:c + 1], mask[:, c:c + 1], chunk_start=c,
                     kv=kv, distill_dt=32.0) for c in range(3)]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-4, atol=1e-4)
    # A chunk alone is shift-invariant (RoPE is relative); against a context its position shows.
    alone = model32(x[:, :, :2], t[:, :1], cap[:, :1], mask[:, :1], chunk_start=4, distill_dt=32.0)
    torch.testing.assert_close(alone, first, rtol=1e-4, atol=1e-4)
    kv = ListKV()
    model32(x[:, :, :2], t[:, :1], cap[:, :1], mask[:, :1], chunk_start=0, kv=kv, distill_dt=32.0)
    far = model32(x[:, :, 2:4], t[:, 1:2], cap[:, 1:2], mask[:, 1:2], chunk_start=3, kv=kv, distill_dt=32.0)
    assert (far - parts[1]).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["bare", "prefixed", "sharded", "bf16"])
def test_file_layouts(sd, model32, tmp_path, layout):
    if layout == "bare":
        save_file(sd, str(tmp_path / "model.safetensors"))
        path = tmp_path / "model.safetensors"
    elif layout == "prefixed":
        save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(tmp_path / "magi.safetensors"))
        path = tmp_path / "magi.safetensors"
    elif layout == "sharded":
        keys = sorted(sd)
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        wmap = {}
        for part, name in zip((keys[: len(keys) // 2], keys[len(keys) // 2:]), names):
            save_file({"model." + k: sd[k] for k in part}, str(tmp_path / name))
            wmap.update({"model." + k: name for k in part})
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        path = tmp_path / "model.safetensors.index.json"
    else:  # mixed precision as released: fp32 embeddings/head, bf16 elsewhere
        keep32 = ("x_embedder", "t_embedder", "y_embedder", "final_linear", "rope")
        save_file({k: v if k.startswith(keep32) else v.bfloat16() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
        path = tmp_path / "m.safetensors"
    model = load_magi(path)
    assert model.config == model32.config
    want = torch.bfloat16 if layout == "bf16" else torch.float32
    assert model.videodit_blocks.layers[0].self_attention.linear_qkv.q.weight.dtype == want
    # Promoted modules stay fp32 whatever the compute dtype; the xattn norms follow the compute dtype.
    att = model.videodit_blocks.layers[1].self_attention
    assert att.q_layernorm.weight.dtype == torch.float32 and att.q_layernorm_xattn.weight.dtype == want
    x, t, cap, mask = inputs(SMALL, n=2)
    out = model(x, t, cap, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    ref = model32(x, t, cap, mask)
    tol = 0.05 if layout == "bf16" else 1e-5
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    if layout == "sharded":  # a folder holding the index works as well, and so does an already read checkpoint
        assert load_magi(tmp_path).config == model32.config
        built = build_magi(load_checkpoint(path, anchors=MAGI_ANCHORS), torch.float32)
        assert built.cfg == model32.config
        torch.testing.assert_close(built(x, t, cap, mask), ref, rtol=1e-5, atol=1e-5)


def test_fp8_variant(sd, tmp_path):
    q, deq = quantize_fp8({k: v.bfloat16() if v.dim() == 2 else v for k, v in sd.items()}, layers=3)
    save_file(q, str(tmp_path / "fp8.safetensors"))
    model = load_magi(tmp_path / "fp8.safetensors")
    cfg = model.config
    assert cfg.fp8 and cfg.fp8_layers == (1,)
    lin = model.videodit_blocks.layers[1].self_attention.linear_qkv.q
    assert isinstance(lin, Fp8Linear) and lin.weight.dtype == FP8 and lin.weight.shape == (1, 192, 192)
    assert not isinstance(model.videodit_blocks.layers[0].self_attention.linear_qkv.q, Fp8Linear)
    assert model.dtype == torch.bfloat16

    # One fp8 linear against the kernel's math written out: q8(x / s) @ W8ᵀ · s[0] · w_scale.
    x = torch.randn(5, 192, dtype=torch.float32)
    for mod, s in ((lin, lin.input_scale), (model.videodit_blocks.layers[1].mlp.linear_fc2, None)):
        xin = torch.randn(5, mod.weight.shape[2])
        div = s if s is not None else mod.smooth_scale
        xq = (xin / div).clamp(-448, 448).bfloat16().to(FP8).float()
        want = xq @ mod.weight[0].float().T * mod.input_scale[0] * mod.weight_scale[0]
        torch.testing.assert_close(mod(xin), want, rtol=1e-5, atol=1e-5)
    del x

    # The whole fp8 model follows the dequantized one up to activation quantization noise.
    save_file(deq, str(tmp_path / "deq.safetensors"))
    ref_model = load_magi(tmp_path / "deq.safetensors", dtype="fp32")
    xs, t, cap, mask = inputs(SMALL, n=2)
    out, ref = model(xs, t, cap, mask).float(), ref_model(xs, t, cap, mask)
    assert out.shape == xs.shape and torch.isfinite(out).all()
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.995


def test_embed_input_and_distill_dt(model32):
    x = torch.randn(1, 4, 4, 8, 8)
    tok = model32.embed_input(x)
    assert tok.shape == (1, 4 * 16, 192) and tok.dtype == torch.float32
    torch.testing.assert_close(tok[0, :16], F.conv3d(x[:, :, :1], model32.x_embedder.weight, stride=(1, 2, 2))[0].flatten(1).T)
    assert [distill_dt_for_steps(s) for s in (8, 16, 32, 64)] == [4, 8, 16, 32]
    assert distill_dt_for_steps(12, 2) == 4 and distill_dt_for_steps(12, 1) == 8
    emb, mask = model32.null_caption()
    assert emb.shape == (16, 64) and mask.sum() == 16  # tiny model: fewer than 50 rows
