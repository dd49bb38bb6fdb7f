"""KV scoring: O(L) redundancy and blocked GQA importance against dense references, per-head top-k, memory bound."""
import math

import pytest
import torch

from flowcache.errors import InputError
from flowcache.kv import scoring
from flowcache.kv.scoring import (
    CompressionConfig,
    compress,
    importance,
    redundancy,
    score,
    select_queries,
    select_topk,
)
from kv_reference import importance_dense, redundancy_dense


@pytest.mark.parametrize("L", [1, 2, 17, 64, 333])
@pytest.mark.parametrize("B,H", [(1, 2), (2, 3), (2, 4)])
def test_redundancy_matches_dense(L, B, H):
    g = torch.Generator().manual_seed(L * 10 + H)
    k = torch.randn(B, H, L, 32, generator=g) + 0.5  # offset so similarities are not all ~0
    fast, dense = redundancy(k), redundancy_dense(k)
    assert fast.shape == (B, H, L) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast.sum(-1), torch.ones(B, H))


def test_redundancy_ranks_duplicates_highest():
    k = torch.eye(8)[None, None].clone()
    k[0, 0, 5] = k[0, 0, 2]  # tokens 2 and 5 duplicate each other
    r = redundancy(k)[0, 0]
    assert set(r.topk(2).indices.tolist()) == {2, 5}


def test_redundancy_bf16_input_computes_fp32():
    k = torch.randn(1, 2, 40, 16)
    out = redundancy(k.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, redundancy_dense(k.bfloat16()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("hq,hkv", [(3, 3), (6, 2)])
@pytest.mark.parametrize("block", [1, 7, 32, 64, 100, 1000])
def test_blocked_importance_matches_dense(hq, hkv, block):
    g = torch.Generator().manual_seed(hq * 1000 + block)
    q = torch.randn(2, hq, 100, 16, generator=g)
    k = torch.randn(2, hkv, 50, 16, generator=g)
    out = importance(q, k, query_block=block)
    assert out.shape == (2, hkv, 50) and out.dtype == torch.float32
    torch.testing.assert_close(out, importance_dense(q, k), rtol=1e-5, atol=1e-7)


def test_importance_explicit_scale_and_kernel():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 30, 8, generator=g), torch.randn(1, 2, 21, 8, generator=g)
    for kernel in (1, 3, 7):
        torch.testing.assert_close(
            importance(q, k, scale=0.3, query_block=8, pool_kernel=kernel),
            importance_dense(q, k, scale=0.3, pool_kernel=kernel), rtol=1e-5, atol=1e-7)


def test_gqa_group_logits_are_max_pooled_before_softmax():
    # Hq=4, Hkv=2, G=2: heads 0,1 -> kv 0; heads 2,3 -> kv 1. One-hot keys give logit s on one key, 0 elsewhere.
    L, D, s = 16, 16, 4.0
    k = torch.eye(L)[None, None].repeat(1, 2, 1, 1)
    q = torch.zeros(1, 4, 5, D)
    q[0, 1, :, 3] = s * math.sqrt(D)  # only head 1 (group of kv 0) sees key 3
    q[0, 2, :, 9] = s * math.sqrt(D)  # only head 2 (group of kv 1) sees key 9
    imp = importance(q, k, pool_kernel=1)[0]
    peak = math.exp(s) / (math.exp(s) + L - 1)  # softmax of the max-pooled row [0, .., s, .., 0]
    assert imp[0].argmax() == 3 and imp[1].argmax() == 9
    torch.testing.assert_close(imp[0, 3], torch.tensor(peak))
    torch.testing.assert_close(imp[1, 9], torch.tensor(peak))
    torch.testing.assert_close(imp[0, 0], torch.tensor(1 / (math.exp(s) + L - 1)))
    # Averaging the heads' softmaxes instead would give (1/L + peak) / 2; make sure that is far off.
    assert abs(imp[0, 3].item() - (1 / L + peak) / 2) > 0.2
    torch.testing.assert_close(importance(q, k, pool_kernel=1, query_block=2), importance_dense(q, k, pool_kernel=1))


def test_importance_max_pool_spreads_along_keys():
    L, D = 20, 20
    k = torch.eye(L)[None, None]
    q = torch.zeros(1, 1, 1, D)
    q[0, 0, 0, 10] = 50.0
    imp = importance(q, k, pool_kernel=7)[0, 0]
    assert torch.all(imp[7:14] > 0.9) and torch.all(imp[:7] < 0.1) and torch.all(imp[14:] < 0.1)


def test_importance_logits_never_exceed_query_block(monkeypatch):
    seen = []
    real = scoring._logits_block

    def spy(q_blk, k, scale):
        out = real(q_blk, k, scale)
        seen.append((tuple(q_blk.shape), tuple(out.shape)))
        return out

    monkeypatch.setattr(scoring, "_logits_block", spy)
    q, k = torch.randn(1, 6, 1000, 8), torch.randn(1, 2, 300, 8)
    out = importance(q, k, query_block=64)
    assert len(seen) == math.ceil(1000 / 64)
    assert all(qs[2] <= 64 and os[2] <= 64 for qs, os in seen)
    assert sum(qs[2] for qs, _ in seen) == 1000
    monkeypatch.setattr(scoring, "_logits_block", real)
    torch.testing.assert_close(out, importance_dense(q, k), rtol=1e-5, atol=1e-7)


def test_query_granularity_selects_rows():
    q = torch.arange(2 * 3 * 20 * 4, dtype=torch.float32).reshape(2, 3, 20, 4)
    assert torch.equal(select_queries(q, CompressionConfig(query_granularity="token", tail_tokens=5)), q[:, :, 15:])
    assert torch.equal(select_queries(q, CompressionConfig(query_granularity="frame"), tokens_per_frame=8), q[:, :, 12:])
    assert torch.equal(select_queries(q, CompressionConfig(query_granularity="chunk")), q)
    assert torch.equal(select_queries(q, CompressionConfig(query_granularity="token", tail_tokens=50)), q)
    with pytest.raises(InputError):
        select_queries(q, CompressionConfig(query_granularity="frame"))


def test_config_defaults_and_validation():
    cfg = CompressionConfig()
    assert (cfg.mix_lambda, cfg.pool_kernel, cfg.query_granularity, cfg.tail_tokens, cfg.query_block) == (
        0.07, 7, "frame", 50, 1024)
    for bad in (dict(mix_lambda=1.5), dict(pool_kernel=4), dict(query_granularity="video"),
                dict(tail_tokens=0), dict(query_block=0)):
        with pytest.raises(InputError):
            CompressionConfig(**bad)


def test_score_combines_terms():
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 4, 40, 8, generator=g), torch.randn(1, 2, 60, 8, generator=g)
    cfg = CompressionConfig(query_granularity="frame", query_block=16)
    expect = 0.07 * importance_dense(q[:, :, -10:], k) - 0.93 * redundancy_dense(k)
    torch.testing.assert_close(score(q, k, cfg, tokens_per_frame=10), expect, rtol=1e-5, atol=1e-7)


def test_per_head_selection_keeps_different_sorted_tokens():
    # Per head, five keys share one direction (redundant) and three are unique; q = 0 makes importance flat,
    # so each head must keep exactly its three unique tokens.
    L, D = 8, 8
    k = torch.zeros(1, 2, L, D)
    k[0, 0, :, 0] = 1.0
    for j, t in enumerate((6, 1, 4)):
        k[0, 0, t] = torch.eye(D)[j + 1]
    k[0, 1, :, 0] = 1.0
    for j, t in enumerate((7, 0, 2)):
        k[0, 1, t] = torch.eye(D)[j + 4]
    v = torch.randn(1, 2, L, 5)
    q = torch.zeros(1, 4, 10, D)
    k_kept, v_kept, index = compress(q, k, v, 3, CompressionConfig(query_granularity="chunk"))
    assert index.tolist() == [[[1, 4, 6], [0, 2, 7]]]
    assert not torch.equal(index[0, 0], index[0, 1])
    assert k_kept.shape == (1, 2, 3, D) and v_kept.shape == (1, 2, 3, 5)
    for h in range(2):
        assert torch.equal(k_kept[0, h], k[0, h, index[0, h]])
        assert torch.equal(v_kept[0, h], v[0, h, index[0, h]])


def test_select_topk_random_scores():
    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(2, 3, 40, 8, generator=g), torch.randn(2, 3, 40, 6, generator=g)
    scores = torch.randn(2, 3, 40, generator=g)
    k_kept, v_kept, index = select_topk(k, v, scores, 12)
    assert index.shape == (2, 3, 12)
    assert torch.all(index[..., 1:] > index[..., :-1])
    for b in range(2):
        for h in range(3):
            assert set(index[b, h].tolist()) == set(scores[b, h].topk(12).indices.tolist())
            assert torch.equal(k_kept[b, h], k[b, h, index[b, h]])
            assert torch.equal(v_kept[b, h], v[b, h, index[b, h]])


@pytest.mark.parametrize("budget", [30, 31, 100])
def test_budget_at_least_length_is_identity(budget):
    k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    q = torch.randn(1, 4, 9, 8)
    for out in (select_topk(k, v, torch.randn(1, 2, 30), budget),
                compress(q, k, v, budget, CompressionConfig(), tokens_per_frame=3)):
        assert out[0] is k and out[1] is v
        assert torch.equal(out[2], torch.arange(30).expand(1, 2, 30))
    with pytest.raises(InputError):
        select_topk(k, v, torch.randn(1, 2, 30), 0)


def test_importance_rejects_bad_head_ratio():
    with pytest.raises(InputError):
        importance(torch.randn(1, 5, 4, 8), torch.randn(1, 2, 6, 8))
