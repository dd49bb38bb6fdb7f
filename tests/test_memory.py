"""``python -m flowcache inspect … --memory WxH``: the VRAM estimate of weights, one forward and the KV stores."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowcache.memory import GiB, estimate, estimate_wan, released_shapes
from flowcache.models.wan import WanConfig
from tiny_models import save_wan, tiny_wan


def test_kv_stores_of_the_released_1_3b_at_540p():
    e = estimate("skyreels-v2-df-1.3b", "960x544")
    tokens_per_chunk = 5 * (544 // 16) * (960 // 16)  # 5 latent frames of a 34 x 60 patch grid
    assert e.facts["tokens_per_chunk"] == tokens_per_chunk == 10200
    # every chunk of the 97-frame window is unclean at once (ar_step 5 x 5 chunks < 50 steps): the store holds
    # the window, for each of the 2 CFG branches, keys and values of 30 layers x 1536 dims in bf16
    assert e.kv == 2 * 5 * tokens_per_chunk * 30 * 2 * 1536 * 2
    assert e.kv_budget == e.kv  # a budget bounds history, and one window has none yet
    params = sum(math.prod(s) for s, _ in released_shapes("skyreels-v2-df-1.3b")[2].values())
    assert 1.43e9 < params < 1.44e9 and e.weights == {"bf16": 2 * params}
    assert e.facts["forward"] == "2 branches x 5 chunks x 10200 tokens"
    assert 3 * GiB < e.activations < 8 * GiB


def test_a_budget_bounds_the_store_when_fewer_chunks_are_active():
    cfg = WanConfig()
    short = estimate_wan(cfg, {}, 960, 544, frames=97, ar_step=5, steps=30)
    assert short.kv_budget == short.kv  # 30 steps / ar_step 5 = 6 >= 5 chunks: all active
    sync = estimate_wan(cfg, {}, 960, 544, frames=97, ar_step=20, steps=30, budget=0)
    assert sync.facts["forward"].startswith("2 branches x 2 chunks")  # chunks 20 steps apart: 2 at once
    assert sync.kv_budget == 2 * (0 + 2 + 1) * 10200 * 30 * 2 * 1536 * 2  # budget + active + the finishing one


def test_fp8_weights_and_magi():
    bf16 = estimate("skyreels-v2-df-14b", "960x544").weights
    fp8 = estimate("skyreels-v2-df-14b", "960x544", weights="fp8_e4m3fn").weights  # --weight-dtype
    assert set(fp8) == {"bf16", "fp8_e4m3fn"} and fp8["bf16"] < 0.01 * GiB
    assert abs(fp8["fp8_e4m3fn"] * 2 - bf16["bf16"]) < 0.01 * bf16["bf16"]
    m = estimate("magi-1-4.5b-distill", "720x720")
    assert m.facts["tokens_per_chunk"] == 6 * 45 * 45 and m.facts["chunks"] == 4
    assert m.kv == 4 * 6 * 45 * 45 * 34 * 2 * 8 * 128 * 2  # 4 chunks, 34 layers, 8 kv heads x 128, bf16
    long = estimate("magi-1-4.5b-distill", "720x720", frames=480, budget=1)
    assert long.kv == 5 * m.kv and long.kv_budget == m.kv * 5 // 4  # budget 1 + window 4 chunks
    assert "fp32" in m.weights  # the modules MAGI-1 promotes to fp32


def test_estimate_from_a_checkpoint_reads_its_header(tmp_path):
    model = tiny_wan()
    fp8 = save_wan(model, tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    e = estimate(str(fp8), "64x64", frames=17)
    n = sum(v.numel() for v in model.state_dict().values())
    assert sum(e.weights.values()) < 2 * n and e.weights["fp8_e4m3fn"] > 0  # fp8 stays fp8, the rest bf16
    assert e.facts["tokens_per_chunk"] == 5 * 16


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowcache", *args], capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    r = run_cli("inspect", "skyreels-v2-df-1.3b", "--memory", "960x544")
    assert r.returncode == 0, r.stderr
    assert "KV stores, no budget (2 x 51000 tokens)" in r.stdout and "weights bf16 2.67" in r.stdout
    r = run_cli("inspect", "magi-1-4.5b-distill", "--memory", "720x720", "--json")
    d = json.loads(r.stdout)
    assert d["total"] == d["weights_total"] + d["activations"] + d["kv"]
    r = run_cli("inspect", "skyreels-v2-df-1.3b", "--memory", "960by544")
    assert r.returncode == 2 and r.stderr.startswith("error: --memory '960by544'")
    r = run_cli("inspect", "skyreels-v2-df-14b")
    assert r.returncode == 2 and "add --memory" in r.stderr
    path = save_wan(tiny_wan(), tmp_path / "m.safetensors")
    r = run_cli("inspect", str(path), "--memory", "64x64", "--frames", "17", "--dtype", "fp32")
    assert r.returncode == 0 and "weights fp32" in r.stdout


def test_estimate_of_a_magi_checkpoint(tmp_path):
    from safetensors.torch import save_file
    from test_magi_model import SMALL, make_sd

    save_file(make_sd(**SMALL, seed=1), str(tmp_path / "magi.safetensors"))
    e = estimate(str(tmp_path / "magi.safetensors"), "64x64", frames=24, budget=0)
    assert e.facts["tokens_per_chunk"] == 6 * 4 * 4 and e.facts["chunks"] == 1
    assert set(e.weights) == {"bf16", "fp32"}  # the promoted modules stay fp32
    # one chunk of 96 tokens, keys and values of every layer's kv heads, bf16
    assert e.kv == 96 * SMALL["layers"] * 2 * SMALL["kv"] * SMALL["dh"] * 2


def test_largest_fitting_size_by_arithmetic():
    """need = 3 bytes per pixel, 1200x800 asked, 1,000,000 bytes: the longer side steps by 16 and the shorter one
    follows the aspect ratio, floored to 16. 704x464 needs 979,968 bytes; the next step, 720x480, 1,036,800."""
    from flowcache.memory import largest_fitting_size

    need = lambda w, h: 3 * w * h  # noqa: E731
    assert largest_fitting_size(need, 1200, 800, 1_000_000, 16) == (704, 464)
    assert need(704, 464) == 979_968 and need(720, 480) == 1_036_800
    assert largest_fitting_size(need, 1200, 800, 100, 16) is None  # not even 16x16 fits
    assert largest_fitting_size(need, 1200, 800, 10 ** 9, 16) == (1200, 800)  # never larger than asked


def test_check_fits_refuses_naming_the_widgets_and_the_size_that_fits():
    from flowcache.errors import InputError
    from flowcache.memory import GiB, check_fits

    need = lambda w, h: w * h * 1024  # noqa: E731
    assert check_fits(need, 512, 512, 33, None, "cuda", 16) == 512 * 512 * 1024  # unknown: never refused
    assert check_fits(need, 512, 512, 33, GiB, "cuda", 16) == 512 * 512 * 1024
    with pytest.raises(InputError) as e:
        check_fits(need, 4096, 2048, 33, GiB, "cuda", 16)
    msg = str(e.value)
    assert "width=4096, height=2048, num_frames=33" in msg and "8.0 GiB" in msg and "1.0 GiB" in msg
    # the longer side's largest multiple of 16 that fits: 1456 (with 720 below it: 1,073,479,680 bytes <= 1 GiB);
    # 1472x736 needs 1,109,393,408
    assert "1456x720" in msg and "cuda" in msg
    assert need(1456, 720) <= GiB < need(1472, 736)


def test_available_bytes_on_this_machine():
    import torch

    from flowcache.memory import available_bytes
    got = available_bytes(torch.device("cpu"))
    assert got is None or got > 0
    if Path("/proc/meminfo").exists():
        assert got is not None and got > 64 * 1024 ** 2


def test_cached_residuals_count_in_the_estimate():
    """Each cached chunk residual is a window's tokens x dim per branch: none for off, one to hold, two to
    extrapolate (residuals_kept reads it from the cache settings)."""
    from flowcache.cache import CacheSettings, residuals_kept

    cfg = WanConfig()
    base = estimate_wan(cfg, {}, 960, 544, frames=97)
    one = estimate_wan(cfg, {}, 960, 544, frames=97, residuals=1)
    two = estimate_wan(cfg, {}, 960, 544, frames=97, residuals=2)
    window = 2 * 5 * 10200 * 1536 * 2  # 2 branches x 5 chunks x 10200 tokens x 1536 dims, bf16
    assert one.activations - base.activations == window and two.activations - base.activations == 2 * window
    assert residuals_kept(CacheSettings.of("off")) == 0
    assert residuals_kept(CacheSettings.of("flowcache", threshold=0.0)) == 0  # never reuses: keeps nothing
    assert residuals_kept(CacheSettings.of("flowcache", threshold=0.1)) == 1
    assert residuals_kept(CacheSettings.of("flowcache", threshold=0.1, reuse="extrapolate")) == 2
