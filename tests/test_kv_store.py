"""The KV store: bounded by budget + active window, per-head selection, composes with caching."""
import torch

from flowcache.cache import CacheSettings
from flowcache.kv.scoring import CompressionConfig
from flowcache.kv.store import KVStore
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry
from tiny_models import tiny_wan


def test_store_never_exceeds_budget_plus_active_window():
    T, layers, budget, active = 16, 3, 16, 2
    store = KVStore(layers, capacity_tokens=budget + (active + 1) * T, budget_tokens=budget,
                    compression=CompressionConfig(query_granularity="chunk"), tokens_per_frame=8)
    g = torch.Generator().manual_seed(0)
    # chunks become active two at a time and finish in order, as in diffusion forcing
    for step in range(40):
        live = [c for c in (step // 2, step // 2 + 1)]
        for c in live:
            for layer in range(layers):
                q = torch.randn(1, 2, T, 8, generator=g)
                k, v = torch.randn(1, 2, T, 8, generator=g), torch.randn(1, 2, T, 8, generator=g)
                keys, vals = store.extend(c, layer, q, k, v)
                assert keys.shape[2] <= budget + active * T
                assert torch.equal(keys[:, :, -T:], k)  # own K/V are the last rows attended
        if step % 2 == 1:  # chunk step//2 has taken its last step
            store.mark_clean(step // 2)
        assert all(lay.used <= budget + (active + 1) * T for lay in store.layers)
    assert sum(store.stats()["dropped_per_layer"]) > 0
    assert store.allocated_bytes == layers * 2 * (budget + (active + 1) * T) * 2 * 8 * 4


def test_compressed_heads_keep_different_tokens():
    store = KVStore(1, capacity_tokens=64, budget_tokens=4, compression=CompressionConfig(query_granularity="chunk"))
    k0 = torch.zeros(1, 2, 8, 4)
    k0[0, 0, :4, 0] = 5.0  # head 0: the first four keys align with the query
    k0[0, 1, 4:, 1] = 5.0  # head 1: the last four
    k0 += 0.01 * torch.randn_like(k0)
    v0 = torch.arange(16.0).view(1, 2, 8, 1).expand(1, 2, 8, 4).clone()
    store.extend(0, 0, torch.zeros(1, 2, 8, 4), k0, v0)
    store.mark_clean(0)
    q = torch.zeros(1, 2, 8, 4)
    q[0, 0, :, 0] = 5.0
    q[0, 1, :, 1] = 5.0
    keys, vals = store.extend(1, 0, q, torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4))
    kept0 = vals[0, 0, :4, 0].tolist()
    kept1 = vals[0, 1, :4, 0].tolist()
    assert kept0 != [v - 8 for v in kept1]  # heads kept different token positions
    assert keys.shape[2] == 4 + 8


def test_compression_bounds_kv_and_composes_with_caching():
    model = tiny_wan(seed=5)
    geo = LatentGeometry(1, 4, 16)
    s = DFSettings(width=32, height=32, num_frames=30, steps=6, cfg=2.0, shift=5.0, seed=0, ar_step=2,
                   causal_block_size=3, base_num_frames=30)
    cond = torch.randn(1, 8, 32)
    pipe = DiffusionForcingPipeline(model, geo, text_len=8)
    full, st_full = pipe(cond, torch.zeros(1, 8, 32), s, CacheSettings.of("flowcache", threshold=1.2, warmup=2))
    comp, st_comp = pipe(cond, torch.zeros(1, 8, 32), s, CacheSettings.of("flowcache", threshold=1.2, warmup=2,
                                                                       kv_budget=1))
    assert st_comp.kv_peak_bytes < st_full.kv_peak_bytes
    assert sum(st_comp.kv_dropped_per_layer) > 0 and sum(st_full.kv_dropped_per_layer) == 0
    assert st_comp.reused > 0 and torch.isfinite(comp).all() and not torch.equal(full, comp)
