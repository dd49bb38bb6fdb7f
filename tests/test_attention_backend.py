"""``attention_backend``: a host's attention function sees every attention of a run, and the nodes' adapter to
ComfyUI's kernels (``nodes.comfy_bridge.HostAttention``) computes what the core computes.

Every path of the core is run twice on tiny models: plainly (torch's SDPA; the calls are counted by wrapping
``F.scaled_dot_product_attention``) and under a counting backend (which computes with the same SDPA). Under the
backend nothing reaches SDPA directly, the backend is called as often as SDPA was, and the latents are the same
bit for bit.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowcache.cache import CacheSettings
from flowcache.models.common import attention, attention_backend
from flowcache.models.magi import MagiDiT, magi_config_from_state_dict
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from flowcache.pipelines.causal_wan import CausalSettings, CausalWanPipeline
from flowcache.pipelines.magi import MagiPipeline, MagiSettings
from comfy_helpers import pack_submodule
from test_magi_model import SMALL, make_sd
from tiny_models import tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")
SDPA = F.scaled_dot_product_attention


class Counter:
    """Counts direct SDPA calls while installed as ``F.scaled_dot_product_attention``."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return SDPA(*args, **kwargs)


class Backend:
    """A host's attention function: records each call's shapes and computes as the core does (with SDPA)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, q, k, v, mask=None):
        self.calls.append((tuple(q.shape), tuple(k.shape), None if mask is None else tuple(mask.shape)))
        if q.shape[1] != k.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return SDPA(q, k, v, attn_mask=mask)


def routed(monkeypatch, run):
    """(plain output, SDPA calls of the plain run, backend, direct SDPA calls under the backend, output)."""
    plain_count = Counter()
    monkeypatch.setattr(F, "scaled_dot_product_attention", plain_count)
    plain = run()
    direct, backend = Counter(), Backend()
    monkeypatch.setattr(F, "scaled_dot_product_attention", direct)
    with attention_backend(backend):
        out = run()
    monkeypatch.setattr(F, "scaled_dot_product_attention", SDPA)
    return plain, plain_count.calls, backend, direct.calls, out


def check(monkeypatch, run):
    plain, n_plain, backend, n_direct, out = routed(monkeypatch, run)
    assert n_plain > 0
    assert n_direct == 0, f"{n_direct} attention calls bypassed the backend"
    assert len(backend.calls) == n_plain
    assert torch.equal(out, plain)
    return backend


@pytest.fixture(scope="module")
def wan():
    return tiny_wan(seed=1)


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)


DF = dict(width=32, height=32, num_frames=12, steps=4, cfg=3.0, shift=5.0, seed=3, ar_step=2, causal_block_size=2,
          base_num_frames=8, overlap_history=2, addnoise_condition=20)
DF_GEO = LatentGeometry(temporal_stride=1, spatial_stride=4, channels=16)


@pytest.mark.parametrize("path,cache,masked", [
    ("window", CacheSettings.of("off"), False),
    ("window", CacheSettings.of("off"), True),
    ("chunk", CacheSettings.of("flowcache", threshold=0.0, warmup=1), False),
    ("chunk", CacheSettings.of("flowcache", threshold=0.0, warmup=1, attention="block_causal"), False),
    ("chunk", CacheSettings.of("flowcache", threshold=0.0, warmup=1, attention="block_causal"), True),
    ("chunk", CacheSettings.of("flowcache", threshold=0.3, warmup=1, kv_budget=1), False),
])
def test_diffusion_forcing_routes_every_attention(monkeypatch, wan, text, path, cache, masked):
    """Two windows (so the window path, the overlap and the second window's history are all covered); masked:
    the block-causal mask of the window path, and the batched chunk path's one masked call per layer (the GPU's
    way, run here on the CPU)."""
    from flowcache.kv import store as store_mod

    if masked and path == "chunk":
        monkeypatch.setattr(store_mod, "MASK_DEVICES", {"cpu"})

    def run():
        settings = DFSettings(**DF, window_mask="block_causal" if masked and path == "window" else "full")
        settings.path = path
        return DiffusionForcingPipeline(wan, DF_GEO, text_len=8)(text[0], text[1], settings, cache)[0]

    backend = check(monkeypatch, run)
    heads = wan.cfg.num_heads
    assert all(q[1] == heads for q, _, _ in backend.calls)
    assert any(m is not None for *_, m in backend.calls) == masked


@pytest.mark.parametrize("kv_mode", ["global", "rolling"])
def test_causal_loop_routes_every_attention(monkeypatch, kv_mode):
    model = tiny_wan(seed=3, has_fps=False)
    cond = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))
    settings = dict(width=32, height=32, num_frames=33, num_frame_per_block=3, seed=5, kv_mode=kv_mode,
                    local_attn_frames=6, sink_frames=3 if kv_mode == "rolling" else 0)

    def run():
        return CausalWanPipeline(model, LatentGeometry(temporal_stride=4, spatial_stride=4, channels=16),
                                 text_len=8)(cond, CausalSettings(**settings), CacheSettings())[0]

    check(monkeypatch, run)


@pytest.mark.parametrize("path", ["magi", "chunk"])
def test_magi_routes_every_attention_grouped_query_included(monkeypatch, path):
    sd = make_sd(**SMALL, seed=4)
    model = MagiDiT(magi_config_from_state_dict(sd), dtype=torch.float32)
    model.load_state_dict(sd)
    model = model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(7)
    caption = torch.randn(1, 6, SMALL["cap"], generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    settings = dict(num_frames=32, width=32, height=32, num_steps=4, window_size=4, chunk_width=2, seed=11,
                    distill=True)
    if path == "chunk":
        settings["path"] = "chunk"

    def run():
        return MagiPipeline(model, LatentGeometry(temporal_stride=4, spatial_stride=8, channels=4))(
            caption, mask, MagiSettings(**settings), CacheSettings())[0]

    backend = check(monkeypatch, run)
    # grouped-query attention reaches the backend as it is (6 query heads, 2 key/value heads)
    assert any(q[1] == SMALL["heads"] and k[1] == SMALL["kv"] for q, k, _ in backend.calls)


# -- the nodes' adapter to ComfyUI's kernels, with a kernel of ComfyUI's signature ------------------------------

def comfy_like_pytorch_kernel(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                              skip_output_reshape=False, **kwargs):
    """ComfyUI's attention_pytorch in the layout the adapter uses (skip_reshape, skip_output_reshape)."""
    assert skip_reshape and skip_output_reshape and q.shape[1] == k.shape[1] == heads
    assert mask is None or mask.dtype == q.dtype  # ComfyUI's kernels take additive masks
    if mask is not None and mask.ndim == 2:
        mask = mask[None, None]
    return SDPA(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,masked", [(4, 4, False), (4, 4, True), (6, 2, False), (6, 2, True)])
def test_host_attention_adapter_equals_the_core(pack, dtype, hq, hkv, masked):
    """Boolean masks become additive (0 / -inf), grouped key/value heads are repeated: the same bits as the
    core's SDPA call."""
    bridge = pack_submodule(pack, "nodes.comfy_bridge")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, 24, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, hkv, 30, 16, generator=g).to(dtype) for _ in range(2))
    mask = (torch.rand(24, 30, generator=g) > 0.4) | torch.eye(24, 30, dtype=torch.bool) if masked else None
    host = bridge.HostAttention(comfy_like_pytorch_kernel, {}, override=False)
    assert torch.equal(host(q, k, v, mask), attention(q, k, v, mask))
    assert host.calls == 1 and host.to_dict() == {"kernel": "comfy_like_pytorch_kernel", "override": False,
                                                  "calls": 1}


def test_host_attention_reshapes_a_flat_output(pack):
    """A kernel (or an override) that returns ComfyUI's flat [B, L, H*D] layout is read back as [B, H, L, D]."""
    bridge = pack_submodule(pack, "nodes.comfy_bridge")

    def flat(q, k, v, heads, mask=None, **kwargs):
        return SDPA(q, k, v).transpose(1, 2).flatten(2)

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    assert torch.equal(bridge.HostAttention(flat, {}, False)(q, k, v), SDPA(q, k, v))


def test_no_comfyui_no_host_attention(pack):
    """Without ComfyUI the nodes keep the core's SDPA (no backend)."""
    assert pack_submodule(pack, "nodes.comfy_bridge").host_attention({}) is None
