"""FLOP accounting against hand counts: SkyReels-V2-DF-1.3B at 540P (the paper's 420.8 TFLOPs per window forward,
612 as really computed with full attention) and MAGI-1-4.5B at 720x720, and the two columns a run reports."""
import pytest
import torch

from flowcache.cache import CacheSettings
from flowcache.df_schedule import timestep_matrix
from flowcache.flops import forward_flops, magi_forward_flops, paper_window_flops
from flowcache.models.magi import MagiConfig, MagiDiT
from flowcache.pipelines import DFSettings, DiffusionForcingPipeline, LatentGeometry, plan_windows
from flowcache.schedulers import flow_sigmas
from tiny_models import tiny_wan

# SkyReels-V2-DF-1.3B at 544x960: 68x120 latents, patch 2x2 -> 2040 tokens a frame, 5 frames a chunk, 5 chunks
T, CHUNKS, D, FFN, LAYERS, TEXT = 10200, 5, 1536, 8960, 30, 512


def by_hand(tokens: int, keys: int) -> float:
    """One Wan forward, term by term (2 FLOPs per multiply-add): self q,k,v,o; cross q,o on the tokens and
    cross k,v on the text; the FFN; self-attention scores and values over ``keys``; cross-attention over text."""
    per_layer = (4 * 2 * tokens * D * D + 2 * 2 * tokens * D * D + 2 * 2 * TEXT * D * D + 2 * 2 * tokens * D * FFN
                 + 2 * 2 * tokens * keys * D + 2 * 2 * tokens * TEXT * D)
    return LAYERS * per_layer


def test_paper_window_forward_is_420_8_tflops():
    """The paper's sheet: every chunk forwarded, chunk j attending to j chunks (block-causal)."""
    f = paper_window_flops(tokens_per_chunk=T, chunks=CHUNKS, dim=D, ffn=FFN, layers=LAYERS, text_len=TEXT)
    assert f == pytest.approx(sum(by_hand(T, j * T) for j in range(1, CHUNKS + 1)), rel=1e-12)
    assert f / 1e12 == pytest.approx(420.8, abs=0.1)


def test_real_window_forward_is_612_tflops():
    """The vanilla window forward as SkyReels runs it: full attention, every token sees all 51,000. 611.9 TFLOPs:
    the paper's 420.8 plus 191.8 for the attention to later chunks, less the 0.6 its sheet spends projecting
    the text K/V once per chunk rather than once per forward."""
    f = forward_flops(CHUNKS * T, CHUNKS * T, D, FFN, LAYERS, TEXT)
    assert f == pytest.approx(by_hand(CHUNKS * T, CHUNKS * T), rel=1e-12)
    extra_attention = LAYERS * 4 * T * T * D * (CHUNKS * CHUNKS - CHUNKS * (CHUNKS + 1) // 2)
    text_kv_per_chunk = LAYERS * 4 * TEXT * D * D * (CHUNKS - 1)
    paper = paper_window_flops(T, CHUNKS, D, FFN, LAYERS, TEXT)
    assert f == pytest.approx(paper + extra_attention - text_kv_per_chunk, rel=1e-12)
    assert f / 1e12 == pytest.approx(611.9, abs=0.1) and (paper + extra_attention) / 1e12 == pytest.approx(612.5, abs=0.1)


def test_vanilla_177_frames_with_cfg_is_about_113_pflops():
    s = DFSettings()  # 544x960, 177 frames, 50 steps, ar_step 5, block 5, base 97, overlap 17
    wins = plan_windows(s, LatentGeometry())
    _, ts = flow_sigmas(s.steps, s.shift)
    iters = [timestep_matrix(w.length // 5, ts, 5, w.prefix // 5).iterations for w in wins]
    assert iters == [70, 65]
    per = paper_window_flops(10200, 5, 1536, 8960, 30, 512)
    total = sum(iters) * 2 * per
    assert total / 1e15 == pytest.approx(113.6, abs=0.5)  # the paper's "113 PFLOPs"
    real = sum(iters) * 2 * forward_flops(51000, 51000, 1536, 8960, 30, 512)
    assert real / 1e15 == pytest.approx(165.2, abs=0.2)  # what the vanilla loop really computes


def test_magi_forward_by_hand_from_the_module_tree():
    """MAGI-1-4.5B at 720x720 (12,150 tokens a chunk), a chunk seeing 2 chunks of keys and 800 text tokens:
    the linear terms come from the model's own Linear layers (built on the meta device), the attention terms
    from the head counts."""
    cfg = MagiConfig()  # the released 4.5B shapes
    with torch.device("meta"):
        layer = MagiDiT(cfg).videodit_blocks.layers[0]
    tokens, keys, text = 6 * 45 * 45, 2 * 6 * 45 * 45, 800
    linear = 0
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.startswith("ada_modulate_layer"):  # per chunk: negligible
            rows = text if name.endswith("linear_kv_xattn") else tokens  # the text K/V are projected from the text
            linear += 2 * rows * mod.in_features * mod.out_features
    q_width = cfg.num_heads * cfg.head_dim
    attention = 2 * 2 * tokens * keys * q_width + 2 * 2 * tokens * text * q_width
    assert magi_forward_flops(cfg, tokens, keys, text) == pytest.approx(cfg.num_layers * (linear + attention),
                                                                        rel=1e-12)
    assert magi_forward_flops(cfg, tokens, keys, text) / 1e12 == pytest.approx(226.5, abs=0.1)


def test_a_run_reports_both_columns():
    """off on the window path spends exactly its reference in both columns; the chunk path's block-causal
    forwards are the same in both; window attention counts every row it reads."""
    model = tiny_wan(seed=1)
    geo = LatentGeometry(1, 4, 16)
    cond = torch.randn(1, 8, 32)
    s = dict(width=32, height=32, num_frames=12, steps=4, cfg=1.0, shift=5.0, seed=0, ar_step=1, causal_block_size=3,
             base_num_frames=12)
    pipe = DiffusionForcingPipeline(model, geo, text_len=8)
    _, off = pipe(cond, None, DFSettings(**s), CacheSettings())
    tok, dims = 3 * 16, (64, 96, 2, 8)  # 3 frames of 4x4 tokens a chunk; tiny_wan's dim, ffn, layers; text
    iters = off.iterations[0]
    assert off.flops == pytest.approx(iters * forward_flops(4 * tok, 4 * tok, *dims), rel=1e-12)
    assert off.flops_paper == pytest.approx(iters * paper_window_flops(tok, 4, *dims), rel=1e-12)
    assert off.flops_nocache == pytest.approx(off.flops) and off.flops_nocache_paper == pytest.approx(off.flops_paper)
    _, causal = pipe(cond, None, DFSettings(**s), CacheSettings.of("flowcache", threshold=0.0))
    assert causal.flops == pytest.approx(causal.flops_paper) and causal.flops < causal.flops_nocache
    _, window = pipe(cond, None, DFSettings(**s), CacheSettings.of("flowcache", threshold=0.0, attention="window"))
    assert window.flops > causal.flops and window.flops_paper == pytest.approx(causal.flops_paper)
    assert window.flops_nocache == pytest.approx(off.flops_nocache)
