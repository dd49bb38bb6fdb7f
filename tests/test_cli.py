"""``python -m flowcache``: every error is one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowcache.cli import main
from tiny_models import save_wan, tiny_wan

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as e:  # argparse errors exit; command errors return
        sys.exit(main(argv))
    assert e.value.code == code
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_generate_settings_not_json_subprocess(tmp_path):
    """The issue's reproduction, as a user runs it."""
    ckpt = save_wan(tiny_wan(), tmp_path / "m.safetensors")
    r = subprocess.run([sys.executable, "-m", "flowcache", "generate", str(ckpt), "--cond", str(ckpt),
                        "--settings", "notjson"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: --settings: not valid JSON") and r.stderr.count("\n") == 1, r.stderr


def test_generate_input_errors(tmp_path, capsys):
    ckpt = str(save_wan(tiny_wan(), tmp_path / "m.safetensors"))
    gen = ["generate", ckpt, "--cond", ckpt]
    assert "--settings: not valid JSON" in one_line_error(capsys, gen + ["--settings", "{num_frames: 9}"])
    assert "expected a JSON object" in one_line_error(capsys, gen + ["--settings", "[1, 2]"])
    err = one_line_error(capsys, gen + ["--settings", '{"frames": 9, "stepz": 3}'])
    assert "unknown setting(s) frames, stepz; known: " in err and "num_frames" in err
    assert "--cond: " in one_line_error(capsys, ["generate", ckpt, "--cond", str(tmp_path / "none.safetensors")])
    assert "--vae: " in one_line_error(capsys, gen + ["--vae", str(tmp_path / "no_vae.safetensors")])
    assert "CHECKPOINT: " in one_line_error(capsys, ["generate", str(tmp_path / "gone.pt"), "--cond", ckpt])
    (tmp_path / "cond.safetensors").write_bytes(b"\x07\0\0\0\0\0\0\0[1,2,3]")
    err = one_line_error(capsys, ["generate", ckpt, "--cond", str(tmp_path / "cond.safetensors")])
    assert "cond.safetensors: damaged safetensors header" in err


@pytest.mark.parametrize("argv,needle", [
    ([], "the following arguments are required: cmd"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["generate", "x"], "the following arguments are required: --cond"),
    (["demo", "--preset", "turbo"], "argument --preset: invalid choice: 'turbo'"),
    (["bench", "--seeds", "two"], "argument --seeds: invalid int value: 'two'"),
    (["inspect", "a", "b"], "unrecognized arguments: b"),
    (["calibrate"], "the following arguments are required: CHECKPOINT"),  # calibrate's own parser
    (["calibrate", "m.safetensors", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
])
def test_argument_errors(capsys, argv, needle):
    err = one_line_error(capsys, argv)
    assert needle in err and "--help" in err


def test_missing_and_damaged_files(tmp_path, capsys):
    assert "no such file or folder" in one_line_error(capsys, ["inspect", str(tmp_path / "missing.safetensors")])
    (tmp_path / "bad.safetensors").write_bytes(b"\x07\0\0\0\0\0\0\0[1,2,3]")
    assert "bad.safetensors: damaged" in one_line_error(capsys, ["inspect", str(tmp_path / "bad.safetensors")])
    ckpt = str(save_wan(tiny_wan(), tmp_path / "m.safetensors"))
    err = one_line_error(capsys, ["bench", "--model", ckpt, "--long"])
    assert "bench --long runs on the shipped demo model only" in err


def test_unforeseen_error_is_one_line_too(capsys, monkeypatch):
    import flowcache.models

    def broken(*args):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(flowcache.models, "inspect_checkpoint", broken)
    err = one_line_error(capsys, ["inspect", "x"], code=1)
    assert "internal error (ZeroDivisionError: division by zero); please report it" in err


def test_generate_refuses_a_size_that_cannot_fit(tmp_path, capsys, monkeypatch):
    """Before any step runs: the estimate against the device's available memory (here set to 256 MiB), one line
    naming the widgets and the largest size that fits."""
    from safetensors.torch import save_file

    import flowcache.jobs as jobs

    model = tiny_wan()
    ckpt = str(save_wan(model, tmp_path / "m.safetensors"))
    cond = tmp_path / "cond.safetensors"
    save_file({"context": torch.randn(1, 5, model.cfg.text_dim)}, str(cond))
    monkeypatch.setattr(jobs, "available_bytes", lambda device: 256 * 1024 ** 2)
    ran = []
    monkeypatch.setattr(jobs.DiffusionForcingPipeline, "__call__", lambda *a, **k: ran.append(1))
    err = one_line_error(capsys, ["generate", ckpt, "--cond", str(cond), "--out", str(tmp_path / "o.mp4"), "--cache", "off",
                                  "--settings", '{"width": 4096, "height": 4096, "num_frames": 97, '
                                                '"base_num_frames": 97, "steps": 2}'])
    assert "generate: width=4096, height=4096, num_frames=97 need about" in err and "largest size" in err, err
    assert not ran and not list(tmp_path.glob("o.*"))
