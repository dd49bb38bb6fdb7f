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


def _module_name(py: Path, root: Path = ROOT) -> str:
    parts = list(py.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(py: Path, name: str, top: str = "flowcache") -> set[str]:
    """Every module of the package ``top`` that ``py`` imports, at module level or inside a function (a lazy
    import that closes a circle still breaks whoever imports first). ``from pkg import x`` counts pkg.x too."""
    package = name if py.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(py.read_text(), str(py))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(top)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith(top):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


def import_cycles(root: Path, top: str) -> tuple[list[list[str]], dict[str, set[str]]]:
    """Cycles of the import graph of the package ``root/top`` (a module depends on what it imports and on the
    packages above what it imports), and the graph."""
    files = {_module_name(py, root): py for py in (root / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, py in files.items():
        deps = set()
        for target in _imports(py, name, top):
            while target and target not in files:  # ``from .x import y`` where y is a name, not a module
                target = target.rsplit(".", 1)[0] if "." in target else ""
            parts = target.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys()
        graph[name] = deps - {name} - {p for p in files if name.startswith(p + ".")}  # own packages run first
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles, graph


def test_no_import_cycle_in_the_core():
    cycles, graph = import_cycles(ROOT, "flowcache")
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert len(graph) > 30 and graph["flowcache.models"] >= {"flowcache.presets", "flowcache.checkpoint"}


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("from ..b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from .sub.a import f  # lazy, still a circle\n    return f\n")
    cycles, _ = import_cycles(tmp_path, "pkg")
    assert cycles and {"pkg.b", "pkg.sub.a"} <= set(cycles[0])
