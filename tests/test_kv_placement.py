"""How a KV store holds its rows: fp8 with per-chunk scales, offloaded to host memory through two staging slots,
and the live-bytes counter that measures what a run holds."""
import gc

import pytest
import torch

from flowcache.kv.scoring import CompressionConfig
from flowcache.kv.store import FP8_MAX, KVStore, StepAttention, dequantize, fp8_supported, quantize
from flowcache.memtrack import track

pytestmark = pytest.mark.usefixtures("one_thread")


def _drive(store: KVStore, seed: int = 0, steps: int = 12, T: int = 8, layers: int = 3) -> list[torch.Tensor]:
    """Diffusion-forcing-like traffic: two chunks active at a time, written by both branches or by one,
    finishing in order (so a budget compresses), attended block-causally and as a window."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for step in range(steps):
        live = [step // 2, step // 2 + 1]
        rows = slice(None) if step % 3 else [1]  # some steps only the second branch computes
        n_rows = 2 if step % 3 else 1
        for causal in (True, False):
            att = StepAttention(store, live, [T, T], rows, causal)
            for layer in range(layers):
                q = torch.randn(n_rows, 2, 2 * T, 4, generator=g)
                k, v = torch.randn(n_rows, 2, 2 * T, 4, generator=g), torch.randn(n_rows, 2, 2 * T, 4, generator=g)
                outs.append(att.attend(layer, q, k, v))
        if step % 2 == 1:
            store.mark_clean(step // 2)
    return outs


@pytest.mark.parametrize("budget", [0, 8])
def test_offloaded_rows_give_bit_identical_attention(budget):
    """On a CPU the offloaded store runs the same arithmetic on its staging slots as the resident store on its
    buffers: every attention output is bit-identical, with and without compression; and it moved bytes."""
    def store(offload):
        return KVStore(3, 8 * 8 + budget, budget, CompressionConfig(query_granularity="chunk"), 4, 2,
                       offload=offload)
    resident, offloaded = store(False), store(True)
    a, b = _drive(resident), _drive(offloaded)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    offloaded.flush()
    for la, lb in zip(resident.layers, offloaded.layers):
        assert la.ranges == lb.ranges and torch.equal(la.k[:, :, :la.used], lb.k[:, :, :lb.used])
    moved = offloaded.stats()["moved_bytes"]
    assert moved["to_device"] > 0 and moved["to_host"] > 0 and resident.stats()["moved_bytes"]["to_device"] == 0
    # two staging layers on the device, every layer in host memory
    layer_bytes = resident.allocated_bytes // 3
    assert offloaded.device_bytes == 2 * layer_bytes and offloaded.host_bytes == 3 * layer_bytes
    if budget:
        assert sum(offloaded.stats()["dropped_per_layer"]) > 0


def test_offload_moves_only_used_and_changed_rows():
    """One chunk of 8 rows in a 40-row store, 2 layers, one branch, fp32 [1, 2, ·, 4] keys and values: the first
    write copies nothing in (no rows used yet) and writes back the 8 rows of each layer; the next forward brings
    those 8 rows of each layer in and writes back the same 8 again."""
    store = KVStore(2, 40, offload=True)
    row = 2 * 4 * 4 * 2  # heads x dim x fp32 bytes, keys and values
    for _ in range(2):
        att = StepAttention(store, [0], [8], slice(None), causal=False)
        for layer in range(2):
            att.attend(layer, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
        store.flush()
    assert store.moved == {"to_device": 2 * 8 * row, "to_host": 2 * 2 * 8 * row}


def test_fp8_rows_carry_one_scale_per_branch_head_and_chunk():
    x = torch.randn(2, 3, 16, 8) * torch.tensor([1.0, 10.0, 0.0]).view(1, 3, 1, 1)
    x8, scale = quantize(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 1, 1)
    assert torch.equal(scale[:, 2], torch.ones(2, 1, 1))  # an all-zero head keeps scale 1
    amax = x.abs().amax(dim=(2, 3), keepdim=True)
    assert torch.allclose(scale[:, :2], amax[:, :2] / FP8_MAX)
    back = dequantize(x8, scale.expand(-1, -1, 16, 1), torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4 of each value, and small values are relative to amax
    err = (back - x).abs()
    assert (err <= x.abs() / 16 + amax * 2 ** -9 + 1e-12).all()
    assert (back[:, 2] == 0).all()


def test_fp8_store_bytes_and_precision():
    """fp8 rows take 1 byte per element plus one 4-byte scale per head and row (keys and values each), against
    4 bytes per element in this fp32 test; attention over fp8 rows stays within e4m3's rounding (3 mantissa bits:
    a few percent) of attention over the full-precision rows."""
    def make(fp8):
        return KVStore(2, 8 * 8, 0, CompressionConfig(query_granularity="chunk"), 4, 2, fp8=fp8)
    plain, small = make(False), make(True)
    a, b = _drive(plain, layers=2), _drive(small, layers=2)
    assert plain.allocated_bytes == 2 * 2 * 2 * 64 * (2 * 4 * 4)  # layers x branches x heads x rows x (k, v)
    assert small.allocated_bytes == 2 * 2 * 2 * 64 * (2 * 4 * 1 + 2 * 4)  # fp8 values + fp32 scales
    rel = [float((x - y).norm() / x.norm()) for x, y in zip(a, b)]
    assert 0 < max(rel) < 0.08 and sorted(rel)[len(rel) // 2] < 0.05


def test_fp8_compression_moves_each_kept_row_with_its_scale():
    """Chunks 0 and 1 (scales 100x apart) are compressed together to 4 rows when chunk 2 writes: each kept row,
    read back, is exactly one of the 16 rows as they read before compression, and both chunks are among them
    (so a kept row that lost its own scale would read 100x off)."""
    store = KVStore(1, 4 + 3 * 8, 4, CompressionConfig(query_granularity="chunk"), fp8=True)
    g = torch.Generator().manual_seed(3)
    for c, size in ((0, 1.0), (1, 100.0)):
        k = torch.randn(1, 2, 8, 4, generator=g) * size
        before, _ = store.extend(c, 0, torch.randn(1, 2, 8, 4, generator=g), k, k.clone())
    before = before.clone()
    store.mark_clean(0)
    store.mark_clean(1)
    after, _ = store.extend(2, 0, torch.randn(1, 2, 8, 4, generator=g), torch.randn(1, 2, 8, 4, generator=g),
                            torch.randn(1, 2, 8, 4, generator=g))
    assert store.layers[0].compressed == 4
    sources = set()
    for h in range(2):
        for row in after[0, h, :4]:
            match = [i for i in range(16) if torch.equal(row, before[0, h, i])]
            assert len(match) == 1
            sources.add(match[0] // 8)
    assert sources == {0, 1}


def test_fp8_support_is_probed():
    assert fp8_supported("cpu") is None
    assert "meta" in (fp8_supported("meta") or "meta")  # a probe that cannot run says why (or passes)


def test_live_bytes_counts_each_storage_once_and_frees():
    keep = torch.zeros(1000)  # made before: never counted, also when an in-place op returns it
    with track("cpu") as mem:
        a = torch.ones(1000)          # 4000 bytes
        view = a[:10]                 # a view: no new storage
        keep.add_(1)                  # in place on an old storage
        b = a * 2                     # 4000 more: peak 8000
        del a, b
        c = torch.empty(250)          # 1000 bytes; `view` still holds a's storage
    assert mem.peak == 8000 and mem.live == 5000
    del view, c
    gc.collect()


def test_live_bytes_of_a_store_are_its_allocation():
    with track("cpu") as mem:
        store = KVStore(2, 40, fp8=True)
        att = StepAttention(store, [0], [8], slice(None), causal=False)
        for layer in range(2):
            att.attend(layer, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
        held = store.allocated_bytes
        del att
    assert mem.live == held
    del store
    gc.collect()
