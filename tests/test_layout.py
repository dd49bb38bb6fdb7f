"""The core never imports ComfyUI; the pack has the fixed layout."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY_MODULES = {"comfy", "folder_paths", "server", "nodes", "comfy_api", "comfy_execution", "execution"}


def test_core_never_imports_comfyui():
    offenders = []
    for py in (ROOT / "flowcache").rglob("*.py"):
        tree = ast.parse(py.read_text(), str(py))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{py.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in COMFY_MODULES]
    assert not offenders, offenders


def test_fixed_layout_exists():
    for name in ("nodes", "flowcache", "web", "workflows", "tests", "__init__.py", "pyproject.toml", "README.md"):
        assert (ROOT / name).exists(), name
