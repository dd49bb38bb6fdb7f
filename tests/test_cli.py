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
    (["demo", "--preset", "ludicrous"], "argument --preset: invalid choice: 'ludicrous'"),
    (["bench", "--seeds", "two"], "argument --seeds: invalid int value: 'two'"),
    (["inspect", "a", "b"], "unrecognized arguments: b"),
    (["calibrate"], "the following arguments are required: CHECKPOINT"),  # calibrate's own parser
    (["calibrate", "m.safetensors", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
])
def test_argument_errors(capsys, argv, needle):
    err = one_line_error(capsys, argv)
    assert needle in err and "--help" in err


def test_turbo_is_a_preset_choice_and_a_model_without_it_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """``--preset turbo`` parses everywhere a preset is chosen; a model whose presets have slow and fast but no
    turbo row (every released model) is refused before sampling: one line naming the model, the presets it has,
    and that turbo needs calibration of its own."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    import flowcache.jobs as jobs

    for command in (["demo", "--preset", "turbo", "--help"], ["generate", "x", "--cond", "y", "--preset", "turbo",
                                                              "--help"]):
        with pytest.raises(SystemExit) as e:
            main(command)
        assert e.value.code == 0
    capsys.readouterr()
    model = tiny_wan()
    ckpt = save_wan(model, tmp_path / "m.safetensors")
    with safe_open(str(ckpt), framework="pt") as f:
        meta, sd = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    row = {"threshold": 0.1, "warmup": 2, "kv_budget": 0}
    meta.update({"flowcache.model_key": "tiny-no-turbo", "flowcache.presets": json.dumps(
        {"tiny-no-turbo": {"coefficients": [1.0, 0.0], "flowcache": {"slow": row, "fast": row}}})})
    save_file(sd, str(ckpt), metadata=meta)
    cond = tmp_path / "cond.safetensors"
    save_file({"context": torch.randn(1, 5, model.cfg.text_dim)}, str(cond))
    ran = []
    monkeypatch.setattr(jobs.DiffusionForcingPipeline, "__call__", lambda *a, **k: ran.append(1))
    err = one_line_error(capsys, ["generate", str(ckpt), "--cond", str(cond), "--out", str(tmp_path / "o.mp4"),
                                  "--preset", "turbo"])
    assert err.startswith("error: preset='turbo': model 'tiny-no-turbo' has no flowcache turbo preset; its flowcache "
                          "presets are slow, fast; turbo needs calibration of its own"), err
    assert "bench --sweep --grid turbo" in err and not ran


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


# ------------------------------------------------------------------------------------ a newcomer's first minutes

def parsers(monkeypatch) -> dict[str, "argparse.ArgumentParser"]:
    """Every subcommand's parser, as ``main`` builds it (captured when it parses), plus calibrate's own."""
    import argparse

    import flowcache.cli as cli
    from flowcache.calibrate import calibrate_parser

    seen = []

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(cli._Parser, "parse_args", capture)
    with pytest.raises(SystemExit):
        main(["demo"])
    (sub,) = [a for a in seen[0]._actions if isinstance(a, argparse._SubParsersAction)]
    found = dict(sub.choices)
    found["calibrate"] = calibrate_parser()  # the stub above only points at it
    return found


def test_every_option_of_every_subcommand_has_help(monkeypatch):
    import argparse

    found = parsers(monkeypatch)
    assert {"inspect", "demo", "generate", "bench", "calibrate"} <= set(found)
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in found.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS
               and len((a.help or "").split()) < 3]
    assert not missing, f"options without a sentence of help: {missing}"


def test_demo_help_lists_the_demo_vocabulary(capsys):
    from flowcache.demo.data import VOCABULARY

    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    words = set(out.replace(",", " ").split())
    assert set(VOCABULARY) <= words, set(VOCABULARY) - words
    for flag in ("--prompt", "--preset", "--seed", "--steps", "--frames"):
        assert flag in out


def demo_argv(tmp_path, *extra: str) -> list[str]:
    return ["demo", "--steps", "1", "--frames", "4", "--out", str(tmp_path / "d.mp4"), *extra]


def test_demo_shows_progress_and_writes_before_the_comparison(tmp_path, capsys, monkeypatch):
    """Forced on (stderr is not a terminal here): a bar per run on stderr with steps, chunk and time left; the
    video is written and said so before the uncached run starts; the FLOPs figure first, then wall with what it
    is measured against."""
    from flowcache.progress import ENV

    monkeypatch.setenv(ENV, "1")
    assert main(demo_argv(tmp_path)) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "then again uncached, for comparison" in lines[0]
    wrote = next(i for i, l in enumerate(lines) if l.startswith(f"wrote {tmp_path / 'd.mp4'} (4 frames"))
    again = next(i for i, l in enumerate(lines) if l.startswith("sampling again with the cache off"))
    flops = next(i for i, l in enumerate(lines) if l.startswith("FLOPs: "))
    wall = next(i for i, l in enumerate(lines) if l.startswith("wall: "))
    assert wrote < again < flops < wall
    assert "uncached run just made" in lines[wall] and "noisy" in lines[wall] and "same on any machine" in lines[flops]
    bars = err.replace("\r", "\n")
    for label in ("flowcache fast: 100%", "uncached: 100%"):
        assert label in bars, bars
    assert "steps [" in bars and "window 1/1, chunk 0: step 1/1" in bars and "<00:00" in bars


def test_demo_no_compare_says_so_and_draws_no_bar_off_a_terminal(tmp_path, capsys, monkeypatch):
    from flowcache.progress import ENV

    monkeypatch.delenv(ENV, raising=False)
    assert main(demo_argv(tmp_path, "--no-compare")) == 0
    out, err = capsys.readouterr()
    assert "(no uncached comparison run: --no-compare)" in out.splitlines()[0]
    assert "for comparison" not in out.replace("no uncached comparison", "") and "sampling again" not in out
    assert out.splitlines()[1].startswith("sampling with FlowCache (fast preset): 4 frames, 1 steps")
    assert f"wrote {tmp_path / 'd.mp4'}" in out and "FLOPs: " in out and "wall: " not in out
    assert err == ""  # stderr is not a terminal: no bar, the phase lines above still say what runs
    monkeypatch.setenv(ENV, "0")
    assert main(demo_argv(tmp_path, "--no-compare")) == 0
    assert capsys.readouterr().err == ""


def test_errors_name_the_flag_the_user_typed(tmp_path, capsys):
    err = one_line_error(capsys, ["demo", "--frames", "7", "--no-compare"])
    assert "--frames 7 gives 7 latent frames" in err and "try --frames 4" in err and "num_frames" not in err
    err = one_line_error(capsys, ["demo", "--steps", "0", "--no-compare"])
    assert "--steps 0: must be at least 1" in err
    err = one_line_error(capsys, ["bench", "--frames", "7", "--prompts", "1", "--seeds", "1", "--repeats", "1",
                                  "--quiet"])
    assert "--frames 7 gives" in err and "num_frames" not in err
    from flowcache.demo import demo_model_path

    demo_file = str(demo_model_path())
    assert "--frames 3 gives 3 latent frames" in one_line_error(capsys, ["inspect", demo_file, "--memory", "64x64",
                                                                          "--frames", "3"])


def test_inspect_prints_text_by_default_and_json_with_the_flag(tmp_path, capsys):
    import json

    ckpt = str(save_wan(tiny_wan(), tmp_path / "m.safetensors"))
    assert main(["inspect", ckpt]) == 0
    text = capsys.readouterr().out
    assert text.startswith("m.safetensors: Wan2.1 / SkyReels-V2 DiT\n") and "  loop           diffusion_forcing" in text
    with pytest.raises(ValueError):
        json.loads(text)
    assert main(["inspect", ckpt, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["file"] == "m.safetensors" and facts["config"]["dim"] == 64


def test_inspect_memory_of_the_demo_uses_its_own_frames(capsys):
    from flowcache.demo import DEMO_SETTINGS, demo_model_path

    assert main(["inspect", str(demo_model_path()), "--memory", "64x64"]) == 0
    assert f"64x64, diffusion forcing, {DEMO_SETTINGS['num_frames']} frames" in capsys.readouterr().out.splitlines()[0]


def test_a_mistyped_released_name_lists_the_released_names(capsys):
    from flowcache.memory import RELEASED

    err = one_line_error(capsys, ["inspect", "skyreels-1.3b", "--memory", "960x544"])
    assert err.startswith("error: skyreels-1.3b: no such file or folder") and "did you mean skyreels-v2-df-1.3b" in err
    assert all(name in err for name in RELEASED)
