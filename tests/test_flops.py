"""The FLOP model reproduces the paper's own accounting for SkyReels-V2-DF-1.3B at 540P."""
import pytest

from flowcache.flops import paper_window_flops
from flowcache.pipelines import DFSettings, LatentGeometry, plan_windows
from flowcache.df_schedule import timestep_matrix
from flowcache.schedulers import flow_sigmas


def test_full_window_forward_is_420_8_tflops():
    f = paper_window_flops(tokens_per_chunk=10200, chunks=5, dim=1536, ffn=8960, layers=30, text_len=512)
    assert f / 1e12 == pytest.approx(420.8, abs=0.5)


def test_vanilla_177_frames_with_cfg_is_about_113_pflops():
    s = DFSettings()  # 544x960, 177 frames, 50 steps, ar_step 5, block 5, base 97, overlap 17
    wins = plan_windows(s, LatentGeometry())
    _, ts = flow_sigmas(s.steps, s.shift)
    iters = [timestep_matrix(w.length // 5, ts, 5, w.prefix // 5).iterations for w in wins]
    assert iters == [70, 65]
    per = paper_window_flops(10200, 5, 1536, 8960, 30, 512)
    total = sum(iters) * 2 * per
    assert total / 1e15 == pytest.approx(113.6, abs=0.5)
