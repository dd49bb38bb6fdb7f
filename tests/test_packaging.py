"""Packaging: the wheel holds the core with the data it reads at run time and nothing of the ComfyUI pack;
pyproject.toml carries what the ComfyUI Registry needs; requirements.txt (ComfyUI Manager's) follows it.
.ci/run also installs the checkout into a fresh venv and runs ``python -m flowcache --help`` from elsewhere."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging_copy import ROOT, copy_checkout

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()


def test_wheel_holds_the_core_and_its_data_and_not_the_pack(tmp_path):
    """~4 s: a wheel of a copy of the checkout (nothing is written into it), without network or isolation."""
    src = copy_checkout(tmp_path / "src")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = (tmp_path / "dist").glob("flowcache_video-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("flowcache/__init__.py", "flowcache/__main__.py", "flowcache/presets.json",
                   "flowcache/demo/assets/demo_dit.safetensors", "flowcache/demo/assets/demo_text.safetensors",
                   "flowcache/cache/easycache.py", "flowcache/models/wan.py"):
        assert needed in names, needed
    # every data file the core reads sits in the wheel: whatever under flowcache/ is not Python
    shipped = {str(p.relative_to(src)) for p in (src / "flowcache").rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert shipped <= names, shipped - names
    top = {n.split("/", 1)[0] for n in names} - {"flowcache"}
    assert len(top) == 1 and top.pop().endswith(".dist-info")  # no other top-level package or file
    assert not any(n.startswith(("nodes/", "tests/", "web/", "workflows/")) for n in names)


def test_pyproject_has_what_the_comfyui_registry_needs():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z_.-][A-Za-z0-9_.-]*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and isinstance(project["license"], dict) and project["license"].get("text")
    assert project["dependencies"] and project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy.get("Icon", "https://").startswith("https://")  # absent, or a real URL: never ""
    assert (ROOT / comfy["web"]).is_dir()
    # `pip install .` must not trip over the flat layout: the packages are named
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["flowcache", "flowcache.*"]


def test_requirements_txt_is_pyproject_without_torch():
    """ComfyUI Manager installs requirements.txt, not pyproject's dependencies; torch is ComfyUI's own."""
    lines = [ln.split("#", 1)[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln]
    deps = [d for d in PYPROJECT["project"]["dependencies"] if _requirement_name(d) != "torch"]
    assert sorted(reqs) == sorted(deps)
    assert "torch" not in {_requirement_name(r) for r in reqs}
