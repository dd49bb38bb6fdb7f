"""The Wan forward over any module tree with Wan's layer names, and models built from other layer operations.

A host (ComfyUI) hands the pack its own module tree, built from its own layer classes, which cast, dequantize
or add LoRA weights when they run. These tests build such trees here from fake operations (layers that count
their calls, hold their weights in another dtype and cast at use, or hold parameters as a tensor subclass) and
check that the pack's forward over them equals ``WanDiT`` and never changes them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flowcache.cache import CacheSettings
from flowcache.checkpoint import read_named_tensors
from flowcache.errors import CheckpointError, InputError
from flowcache.kv.store import KVStore, StepAttention
from flowcache.models import load_model
from flowcache.models.common import Operations, TorchLayers, held
from flowcache.models.wan import (FPS_SHAPES, WAN_ANCHORS, RMSNorm, WanConfig, WanDiT, WanTreeModel, build_wan,
                                  fps_layers_from_tensors, wan_config_from_tree)
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from tiny_models import save_wan, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")


# -- fake layer operations ---------------------------------------------------------------------------------

class Calls:
    n = 0


class CastingLinear(nn.Linear):
    """A host's linear layer: counts its calls and casts its (possibly other-dtype) weight to the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Calls.n += 1
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, self.weight.to(device=x.device, dtype=x.dtype), b)


class CastingConv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class CastingLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class CastingRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class CastingEmbedding(nn.Embedding):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


class HostLayers:
    Linear, Conv3d, LayerNorm, RMSNorm, Embedding = CastingLinear, CastingConv3d, CastingLayerNorm, CastingRMSNorm, \
        CastingEmbedding


HOST = Operations(lambda hold, compute: HostLayers, casts=True, name="fake host")


class Stored(torch.Tensor):
    """A tensor subclass, as a quantized-model pack holds parameters (ComfyUI-GGUF's GGMLTensor)."""


def foreign_tree(cfg: WanConfig, ops: type = HostLayers) -> nn.Module:
    """A tree with Wan's layer names built from plain containers (not the pack's classes), like ComfyUI's."""
    d, root = cfg.dim, nn.Module()
    root.patch_embedding = ops.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
    root.text_embedding = nn.Sequential(ops.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), ops.Linear(d, d))
    root.time_embedding = nn.Sequential(ops.Linear(cfg.freq_dim, d), nn.SiLU(), ops.Linear(d, d))
    root.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(d, 6 * d))
    blocks = []
    for _ in range(cfg.num_layers):
        blk = nn.Module()
        for name in ("self_attn", "cross_attn"):
            attn = nn.Module()
            attn.q, attn.k, attn.v, attn.o = (ops.Linear(d, d) for _ in range(4))
            attn.norm_q, attn.norm_k = ops.RMSNorm(d, eps=cfg.eps), ops.RMSNorm(d, eps=cfg.eps)
            attn.num_heads = cfg.num_heads
            setattr(blk, name, attn)
        blk.norm3 = ops.LayerNorm(d, eps=cfg.eps)
        blk.ffn = nn.Sequential(ops.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), ops.Linear(cfg.ffn_dim, d))
        blk.modulation = nn.Parameter(torch.zeros(1, 6, d))
        blocks.append(blk)
    root.blocks = nn.ModuleList(blocks)
    root.head = nn.Module()
    root.head.head = ops.Linear(d, 4 * cfg.out_dim)
    root.head.modulation = nn.Parameter(torch.zeros(1, 2, d))
    return root


def copy_into(tree: nn.Module, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> nn.Module:
    """Load Wan weights into a tree (the fps keys are not its own: a host drops them)."""
    own = {k: v if dtype is None else v.to(dtype) for k, v in sd.items() if not k.startswith("fps_")}
    tree.load_state_dict(own, strict=True, assign=True)
    return tree.requires_grad_(False)


def fps_of(model: WanDiT) -> nn.Module:
    sd = {k: v for k, v in model.state_dict().items() if k in FPS_SHAPES}
    return fps_layers_from_tensors(sd, model.cfg.dim, torch.float32, "cpu")


def snapshot(tree: nn.Module) -> tuple[dict, dict]:
    """Every tensor and every module's attribute names: what a run must leave as it found it."""
    tensors = {k: v.clone() for k, v in tree.state_dict().items()}
    attrs = {n: sorted(vars(m)) for n, m in tree.named_modules()}
    return tensors, attrs


def inputs(cfg: WanConfig, frames: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, frames, 8, 8, generator=g)
    t = torch.tensor([[900.0, 700.0, 400.0, 100.0][:frames]])
    ctx = torch.randn(1, 8, cfg.text_dim, generator=g)
    return x, t, ctx


# -- the forward over a foreign tree ---------------------------------------------------------------------------

@pytest.mark.parametrize("block_causal", [0, 2])
def test_foreign_tree_equals_wandit_and_is_left_unchanged(block_causal):
    ref = tiny_wan(seed=3)
    tree = copy_into(foreign_tree(ref.cfg), ref.state_dict())
    before = snapshot(tree)
    runner = WanTreeModel(tree, wan_config_from_tree(tree), torch.float32, "cpu", fps_of(ref))
    x, t, ctx = inputs(ref.cfg)
    Calls.n = 0
    out = runner(x, t, ctx, fps=24, block_causal=block_causal)
    # every linear layer of the tree ran through its own forward: 4+4+2 per block, text 2, time 2+1, head 1, +fps 2
    assert Calls.n == ref.cfg.num_layers * 10 + 6
    assert torch.equal(out, ref(x, t, ctx, fps=24, block_causal=block_causal))
    after = snapshot(tree)
    assert after[1] == before[1]  # no attribute added to any module
    assert all(torch.equal(before[0][k], v) for k, v in after[0].items())


def test_fps_embedding_is_applied_from_the_separate_layers():
    ref = tiny_wan(seed=3)
    tree = copy_into(foreign_tree(ref.cfg), ref.state_dict())
    cfg = wan_config_from_tree(tree)
    x, t, ctx = inputs(ref.cfg)
    with_fps = WanTreeModel(tree, cfg, torch.float32, "cpu", fps_of(ref))
    without = WanTreeModel(tree, cfg, torch.float32, "cpu", None)
    assert with_fps.cfg.has_fps and not without.cfg.has_fps
    a, b = with_fps(x, t, ctx, fps=24), without(x, t, ctx, fps=24)
    assert (a - b).abs().max() > 1e-3  # what a run without the file's fps keys loses
    assert torch.equal(with_fps(x, t, ctx, fps=16), ref(x, t, ctx, fps=16))  # the other fps index too


def test_weights_held_in_half_precision_are_cast_layer_by_layer():
    """Layers that cast at use: weights held in fp16, computed in fp32, equal a model whose weights were rounded
    to fp16 and converted once (what torch's own layers need)."""
    ref = tiny_wan(seed=5, has_fps=False)
    rounded = {k: v.half().float() for k, v in ref.state_dict().items()}
    tree = copy_into(foreign_tree(ref.cfg), ref.state_dict(), torch.float16)
    assert tree.blocks[0].ffn[0].weight.dtype == torch.float16
    runner = WanTreeModel(tree, wan_config_from_tree(tree), torch.float32, "cpu")
    expect = WanDiT(ref.cfg)
    expect.load_state_dict(rounded)
    x, t, ctx = inputs(ref.cfg, seed=1)
    assert torch.equal(runner(x, t, ctx), expect.eval()(x, t, ctx))


def test_raw_parameters_held_as_a_tensor_subclass():
    """``modulation`` held as a tensor subclass (as a quantized pack holds it) is converted at use."""
    ref = tiny_wan(seed=2, has_fps=False)
    tree = copy_into(foreign_tree(ref.cfg), ref.state_dict())
    for blk in tree.blocks:
        blk.modulation = nn.Parameter(blk.modulation.detach().as_subclass(Stored), requires_grad=False)
    assert type(held(tree.blocks[0].modulation, torch.device("cpu"))) is torch.Tensor
    runner = WanTreeModel(tree, wan_config_from_tree(tree), torch.float32, "cpu")
    x, t, ctx = inputs(ref.cfg, seed=2)
    assert torch.equal(runner(x, t, ctx), ref(x, t, ctx))


def test_chunk_pieces_with_a_kv_store_match_wandit():
    """The pieces the pipelines call (embed, time_embed, text_embed, run_blocks against a KV store, head_out)."""
    ref = tiny_wan(seed=4)
    tree = copy_into(foreign_tree(ref.cfg), ref.state_dict())
    runner = WanTreeModel(tree, wan_config_from_tree(tree), torch.float32, "cpu", fps_of(ref))
    x, t, ctx = inputs(ref.cfg)
    outs = []
    for m in (ref, runner):
        store = KVStore(m.cfg.num_layers, 4 * 16)
        e, e0 = m.time_embed(t, 24)
        h = m.run_blocks(m.embed(x), e0, m.text_embed(ctx), m.grid(x.shape), (0, 2),
                         StepAttention(store, [0, 1], [32, 32], slice(None), causal=True))
        outs.append(m.head_out(h, e, m.grid(x.shape)))
    assert torch.equal(*outs)


def test_whole_skyreels_run_on_a_foreign_tree_equals_wandit():
    ref = tiny_wan(seed=1)
    tree = copy_into(foreign_tree(ref.cfg), ref.state_dict())
    runner = WanTreeModel(tree, wan_config_from_tree(tree), torch.float32, "cpu", fps_of(ref))
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    s = dict(width=32, height=32, num_frames=21, steps=5, cfg=3.0, shift=5.0, seed=3, ar_step=2, causal_block_size=3,
             base_num_frames=12, overlap_history=3, addnoise_condition=20)
    geo = LatentGeometry(temporal_stride=1, spatial_stride=4, channels=16)
    cache = CacheSettings.of("flowcache", threshold=1.5, warmup=1, coefficients=[1.0, 0.0], kv_budget=1)
    za, sa = DiffusionForcingPipeline(ref, geo, 8)(cond, uncond, DFSettings(**s), cache)
    zb, sb = DiffusionForcingPipeline(runner, geo, 8)(cond, uncond, DFSettings(**s), cache)
    assert torch.equal(za, zb) and sa.forwards == sb.forwards and sa.maps == sb.maps


def test_host_rmsnorm_class_is_close():
    """A host whose RMSNorm is torch's own (ComfyUI's) computes the same up to float rounding."""
    class TorchNorm(HostLayers):
        RMSNorm = nn.RMSNorm
    ref = tiny_wan(seed=6, has_fps=False)
    tree = copy_into(foreign_tree(ref.cfg, TorchNorm), ref.state_dict())
    runner = WanTreeModel(tree, wan_config_from_tree(tree), torch.float32, "cpu")
    x, t, ctx = inputs(ref.cfg, seed=3)
    torch.testing.assert_close(runner(x, t, ctx), ref(x, t, ctx), rtol=1e-4, atol=1e-5)


# -- what is not a Wan tree ------------------------------------------------------------------------------------

def test_not_a_wan_tree_is_refused_with_the_missing_names():
    flux_like = nn.Module()
    flux_like.double_blocks = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(InputError, match=r"^model: expected a Wan2.1-architecture model .*; this Module has no "
                                         r"patch_embedding"):
        wan_config_from_tree(flux_like)
    ref = tiny_wan(has_fps=False)
    tree = copy_into(foreign_tree(ref.cfg), ref.state_dict())
    del tree.blocks[0].ffn
    with pytest.raises(InputError, match="blocks.0.ffn"):
        WanTreeModel(tree, ref.cfg, torch.float32, "cpu")
    i2v = copy_into(foreign_tree(ref.cfg), ref.state_dict())
    i2v.img_emb = nn.Linear(2, 2)
    with pytest.raises(InputError, match=r"^model: a Wan image-to-video model \(it has img_emb\); FlowCache runs "
                                         "text-to-video"):
        wan_config_from_tree(i2v)


def test_config_read_off_a_tree():
    ref = tiny_wan(has_fps=True)
    cfg = wan_config_from_tree(copy_into(foreign_tree(ref.cfg), ref.state_dict()))
    assert cfg == WanConfig(**{**ref.cfg.to_dict(), "has_fps": False})


# -- the pack's own model built from a host's layers -----------------------------------------------------------

def test_build_wan_with_casting_layers_keeps_fp8_weights(tmp_path):
    ref = tiny_wan(seed=7)
    path = save_wan(ref, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    plain = load_model(path, dtype="fp32")  # torch's layers: upcast once at load
    hosted = load_model(path, dtype="fp32", operations=HOST)
    q = hosted.model.blocks[0].self_attn.q
    assert isinstance(q, CastingLinear) and q.weight.dtype == torch.float8_e4m3fn
    assert hosted.model.patch_embedding.weight.dtype == torch.float32  # only linear weights stay fp8
    assert plain.model.blocks[0].self_attn.q.weight.dtype == torch.float32
    assert "layers: fake host" in hosted.notes
    x, t, ctx = inputs(ref.cfg)
    assert torch.equal(hosted.model(x, t, ctx, fps=24), plain.model(x, t, ctx, fps=24))
    held_bytes = sum(p.numel() * p.element_size() for p in hosted.model.parameters())
    assert held_bytes < 0.5 * sum(p.numel() * p.element_size() for p in plain.model.parameters())


def test_build_wan_default_layers_are_torch():
    ref = tiny_wan(seed=8)
    m = build_wan(ref.state_dict(), torch.float32)
    assert type(m.blocks[0].self_attn.q) is nn.Linear and type(m.blocks[0].self_attn.norm_q) is RMSNorm
    assert TorchLayers.RMSNorm is RMSNorm


def test_compute_device_is_where_the_forward_runs():
    m = tiny_wan(seed=9)
    assert m.device == torch.device("cpu")
    m.compute_device = torch.device("meta")  # a host that keeps weights elsewhere names its device
    assert m.device == torch.device("meta") and m.rope((1, 2, 2), 0)[0].device.type == "meta"


def test_magi_with_casting_layers_equals_torch_layers():
    from flowcache.models.magi import MagiDiT, magi_config_from_state_dict
    from test_magi_model import SMALL, make_sd

    sd = make_sd(**SMALL, seed=4)
    cfg = magi_config_from_state_dict(sd)
    plain = MagiDiT(cfg, dtype=torch.float32)
    plain.load_state_dict(sd)
    hosted = MagiDiT(cfg, dtype=torch.float32, operations=HOST)
    hosted.load_state_dict(sd)
    assert isinstance(hosted.videodit_blocks.layers[0].self_attention.linear_proj, CastingLinear)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 4, 4, 4, generator=g)
    cap, mask = torch.randn(1, 6, SMALL["cap"], generator=g), torch.ones(1, 6, dtype=torch.bool)
    t = torch.tensor([[0.3, 0.6]])
    Calls.n = 0
    out = hosted(x, t, cap, mask)
    assert Calls.n > 0
    assert torch.equal(out, plain(x, t, cap, mask))


# -- SkyReels' fps embedding from a file -----------------------------------------------------------------------

def test_fps_tensors_read_alone_from_a_prefixed_file(tmp_path):
    ref = tiny_wan(seed=3)
    path = save_wan(ref, tmp_path / "comfy.safetensors", prefix="model.diffusion_model.")
    got = read_named_tensors(path, FPS_SHAPES, WAN_ANCHORS)
    assert sorted(got) == sorted(FPS_SHAPES)
    assert torch.equal(got["fps_projection.2.weight"], ref.state_dict()["fps_projection.2.weight"])
    layers = fps_layers_from_tensors(got, ref.cfg.dim, torch.float32, "cpu")
    assert torch.equal(layers.fps_embedding.weight, ref.fps_embedding.weight)
    none = save_wan(tiny_wan(has_fps=False), tmp_path / "plain.safetensors")
    assert read_named_tensors(none, FPS_SHAPES, WAN_ANCHORS) == {}
    assert fps_layers_from_tensors({}, 64, torch.float32, "cpu") is None


def test_fps_tensors_of_another_width_are_refused(tmp_path):
    ref = tiny_wan(seed=3)
    got = {k: v for k, v in ref.state_dict().items() if k in FPS_SHAPES}
    with pytest.raises(CheckpointError, match="does not fit this model"):
        fps_layers_from_tensors(got, 128, torch.float32, "cpu")
    got.pop("fps_projection.0.bias")
    with pytest.raises(CheckpointError, match="fps_projection.0.bias missing"):
        fps_layers_from_tensors(got, 64, torch.float32, "cpu")
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="only .safetensors and .gguf"):
        read_named_tensors(tmp_path / "x.ckpt", FPS_SHAPES)


def test_fps_tensors_from_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    ref = tiny_wan(seed=3)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="wan")
    for k, v in ref.state_dict().items():
        if k in FPS_SHAPES:
            q = gguf.GGMLQuantizationType.Q8_0 if k == "fps_projection.2.weight" else gguf.GGMLQuantizationType.F32
            data = gguf.quants.quantize(v.numpy(), q)
            w.add_tensor(k, data, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = read_named_tensors(tmp_path / "m.gguf", FPS_SHAPES, WAN_ANCHORS)
    assert torch.equal(got["fps_embedding.weight"], ref.fps_embedding.weight)
    q8 = got["fps_projection.2.weight"]
    assert q8.shape == ref.fps_projection[2].weight.shape
    assert (q8 - ref.fps_projection[2].weight).abs().max() < 0.01  # Q8_0 dequantized
