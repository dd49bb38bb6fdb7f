"""The KV store: bounded by budget + active window, per-head selection, composes with caching."""
import pytest
import torch

from flowcache.cache import CacheSettings
from flowcache.kv.scoring import CompressionConfig
from kv_reference import importance_dense, redundancy_dense
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


def _heads_setup():
    """Head 0's queries point along dim 0, where keys 0-3 are large; head 1's along dim 1, keys 4-7."""
    g = torch.Generator().manual_seed(1)
    k0 = torch.zeros(1, 2, 8, 4)
    k0[0, 0, :4, 0] = 5.0
    k0[0, 1, 4:, 1] = 5.0
    k0 += 0.01 * torch.randn(k0.shape, generator=g)
    v0 = torch.arange(16.0).view(1, 2, 8, 1).expand(1, 2, 8, 4).clone()  # value = head * 8 + position
    q = torch.zeros(1, 2, 8, 4)
    q[0, 0, :, 0] = 5.0
    q[0, 1, :, 1] = 5.0
    return q, k0, v0


@pytest.mark.parametrize("mix_lambda", [1.0, 0.07])
def test_compression_keeps_exactly_the_positions_the_score_picks(mix_lambda):
    """Chunk 0 (8 tokens) is clean when chunk 1 writes; the budget of 4 keeps, per head, the 4 best-scored
    positions in order. λ = 1 (importance only): head 0 keeps 0-3 and head 1 keeps 4-7, as the setup makes
    them. λ = 0.07 (the default): the positions the dense reference formula λ·I − (1−λ)·R picks."""
    q, k0, v0 = _heads_setup()
    cfg = CompressionConfig(mix_lambda=mix_lambda, query_granularity="chunk", pool_kernel=1)
    store = KVStore(1, capacity_tokens=64, budget_tokens=4, compression=cfg)
    store.extend(0, 0, torch.zeros(1, 2, 8, 4), k0, v0)
    store.mark_clean(0)
    k1 = torch.full((1, 2, 8, 4), -1.0)
    keys, vals = store.extend(1, 0, q, k1, torch.full((1, 2, 8, 4), -2.0))
    kept = [vals[0, h, :4, 0].long().tolist() for h in range(2)]
    if mix_lambda == 1.0:
        assert kept == [[0, 1, 2, 3], [12, 13, 14, 15]]
    else:
        score = mix_lambda * importance_dense(q, k0, pool_kernel=1) - (1 - mix_lambda) * redundancy_dense(k0)
        want = score.topk(4, dim=-1).indices.sort(dim=-1).values[0]
        assert kept == [[8 * h + int(i) for i in want[h]] for h in range(2)]
    assert keys.shape[2] == 4 + 8 and torch.equal(keys[:, :, 4:], k1)  # the writer's own rows follow
    assert store.layers[0].compressed == 4 and store.layers[0].ranges == {1: (4, 12)}
    assert store.stats()["dropped_per_layer"] == [4]


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
