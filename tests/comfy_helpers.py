"""Test helpers for the ComfyUI glue: importing the pack as ComfyUI does, ComfyUI stubs, a tiny Wan model,
and a small client for a real ComfyUI server (HTTP + a stdlib websocket reader).

Nothing here imports ComfyUI. The pack root is never put on ``sys.path`` (its ``nodes/`` would shadow
ComfyUI's ``nodes`` module); the pack and the core are imported by file path.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
NODE_IDS = ("FlowCacheModelLoader", "FlowCacheSampler", "FlowCacheCache", "FlowCacheCausalOptions", "FlowCacheDecode", "FlowCacheVideoCombine",
            "FlowCacheDemoTextEncode", "FlowCacheDecodeSave", "FlowCacheMagiTextEncode", "FlowCacheMagiVAELoader",
            "FlowCachePromptSchedule")


# ----------------------------------------------------------------------------------------- importing

def pack_module_name(root: Path = ROOT) -> str:
    """The sys.modules name ComfyUI gives a pack folder (nodes.py load_custom_node: '.' -> '_x_')."""
    return str(root).replace(".", "_x_")


def import_pack(root: Path = ROOT) -> types.ModuleType:
    """Import the pack's ``__init__.py`` by file path, as ComfyUI's ``load_custom_node`` does."""
    name = pack_module_name(root)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def forget_pack(root: Path = ROOT) -> None:
    name = pack_module_name(root)
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def pack_submodule(pack: types.ModuleType, dotted: str) -> types.ModuleType:
    """e.g. pack_submodule(pack, 'flowcache.errors'): the pack's own copy of a module."""
    return importlib.import_module(f"{pack.__name__}.{dotted}")


def demo_missing(pack: types.ModuleType) -> str | None:
    """Why the built-in demo cannot run yet (None when it can): package, model file, cache presets."""
    demo = pack_submodule(pack, "nodes.demo").demo_module()
    if demo is None:
        return "flowcache.demo is not installed"
    try:
        path = Path(demo.demo_model_path())
    except Exception as e:  # the package is there but its weights are not (yet)
        return f"the demo model file is missing ({e})"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    key = meta.get("flowcache.model_key", "demo")
    presets = pack_submodule(pack, "flowcache.presets")
    if key not in {**presets.builtin_presets(), **presets.embedded_presets(meta, path.name)}:
        return f"the demo model has no cache presets for {key!r} yet (not calibrated)"
    return None


def demo_available(pack: types.ModuleType) -> bool:
    """The demo's text encoder and codec are there (enough for tiny models in the demo's latent space)."""
    demo = pack_submodule(pack, "nodes.demo").demo_module()
    if demo is None:
        return False
    try:
        return Path(demo.demo_model_path()).exists()
    except Exception:
        return False


# ------------------------------------------------------------------------------------- a tiny model

TINY_KEY = "tiny-test"
TINY_PRESETS = {TINY_KEY: {
    "coefficients": [1.0, 0.0],
    "flowcache": {"slow": {"threshold": 0.05, "warmup": 1, "kv_budget": 0},
                  "fast": {"threshold": 0.2, "warmup": 1, "kv_budget": 1}},
    "teacache": {"slow": {"threshold": 0.05, "warmup": 1, "kv_budget": 0},
                 "fast": {"threshold": 0.2, "warmup": 1, "kv_budget": 0}},
}}


def write_tiny_wan(path: Path, pack: types.ModuleType, *, text_dim: int = 24, text_len: int = 16, dim: int = 32,
                   layers: int = 2, heads: int = 2, seed: int = 0, latent_format: str | None = None,
                   geometry: dict | None = None, model_key: str = TINY_KEY,
                   presets: dict | None = TINY_PRESETS) -> Path:
    """A random Wan2.1 DiT as a safetensors file with bare keys and ``flowcache.*`` metadata (``presets=None``:
    no embedded presets, as a model nobody calibrated)."""
    from safetensors.torch import save_file

    wan = pack_submodule(pack, "flowcache.models.wan")
    channels = (geometry or {}).get("channels", 16)
    extra = (geometry or {}).get("position_channels", 0)
    cfg = wan.WanConfig(dim=dim, ffn_dim=2 * dim, num_heads=heads, num_layers=layers, text_dim=text_dim,
                        freq_dim=16, in_dim=channels + extra, out_dim=channels)
    gen = torch.Generator().manual_seed(seed)
    model = wan.WanDiT(cfg)
    sd = {k: (torch.randn(v.shape, generator=gen) * 0.05).contiguous() for k, v in model.state_dict().items()}
    meta = {"flowcache.num_heads": str(heads), "flowcache.model_key": model_key, "flowcache.text_len": str(text_len)}
    if presets is not None:
        meta["flowcache.presets"] = json.dumps(presets)
    if latent_format:
        meta["flowcache.latent_format"] = latent_format
    if geometry:
        meta["flowcache.geometry"] = json.dumps(geometry)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    return path


# ---------------------------------------------------------------------------------- ComfyUI stubs

class StubInterrupt(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@dataclass
class ComfyStubs:
    """The few ComfyUI modules the nodes touch, recording what was done with them."""

    output_dir: Path
    models_dir: Path
    events: list[tuple[str, Any]] = field(default_factory=list)
    progress: list[tuple[Any, int, int]] = field(default_factory=list)
    previews: list[tuple[int, Any]] = field(default_factory=list)  # (progress value, preview) when one was sent
    loads: list[Any] = field(default_factory=list)
    unloads: list[Any] = field(default_factory=list)
    interrupt_after: int | None = None   # raise at this many interrupt checks (1-based)
    checks: int = 0
    free_memory: int = 64 * 1024 ** 3    # what get_free_memory answers (bytes)
    modules: dict[str, types.ModuleType] = field(default_factory=dict)
    saved: dict[str, Any] = field(default_factory=dict)

    def install(self) -> "ComfyStubs":
        stubs = self
        comfy = types.ModuleType("comfy")
        comfy.__path__ = []

        mm = types.ModuleType("comfy.model_management")
        mm.InterruptProcessingException = StubInterrupt
        mm.current_loaded_models = []
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.text_encoder_device = lambda: torch.device("cpu")
        mm.vae_device = lambda: torch.device("cpu")
        mm.soft_empty_cache = lambda force=False: None
        mm.get_free_memory = lambda dev=None, torch_free_too=False: stubs.free_memory

        class LoadedEntry:
            def __init__(self, patcher):
                self.model = patcher

            def model_unload(self, memory_to_free=None, unpatch_weights=True):
                stubs.unloads.append(self.model)
                self.model.detach()
                return True

        def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                            force_full_load=False):
            for p in models:
                stubs.loads.append(p)
                if not any(e.model is p for e in mm.current_loaded_models):
                    p.model.to(p.load_device)
                    mm.current_loaded_models.insert(0, LoadedEntry(p))

        def throw_exception_if_processing_interrupted():
            stubs.checks += 1
            if stubs.interrupt_after is not None and stubs.checks >= stubs.interrupt_after:
                stubs.interrupt_after = None
                raise StubInterrupt()

        mm.load_models_gpu = load_models_gpu
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current, self.node_id = total, 0, node_id

            def update_absolute(self, value, total=None, preview=None):
                if total is not None:
                    self.total = total
                self.current = min(value, self.total)
                stubs.progress.append((self.node_id, self.current, self.total))
                if preview is not None:
                    stubs.previews.append((self.current, preview))

        utils.ProgressBar = ProgressBar

        mp = types.ModuleType("comfy.model_patcher")

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device

            def detach(self, unpatch_all=True):
                self.model.to(self.offload_device)
                return self.model

        mp.ModelPatcher = ModelPatcher

        fp = types.ModuleType("folder_paths")

        def folder_dir(folder):  # diffusion_models is models_dir; other model folders sit beside it
            return stubs.models_dir if folder == "diffusion_models" else stubs.models_dir.parent / folder

        def get_filename_list(folder):
            root = folder_dir(folder)
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) \
                if root.is_dir() else []

        def get_full_path(folder, name):
            p = folder_dir(folder) / name
            return str(p) if p.is_file() else None

        fp.get_filename_list = get_filename_list
        fp.get_full_path = get_full_path
        fp.get_folder_paths = lambda folder: [str(folder_dir(folder))]
        fp.get_output_directory = lambda: str(stubs.output_dir)

        server = types.ModuleType("server")

        class _Instance:
            def send_sync(self, event, data, sid=None):
                stubs.events.append((event, json.loads(json.dumps(data))))  # must be JSON-serialisable

        server.PromptServer = type("PromptServer", (), {"instance": _Instance()})

        comfy.model_management, comfy.utils, comfy.model_patcher = mm, utils, mp
        self.modules = {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                        "comfy.model_patcher": mp, "folder_paths": fp, "server": server}
        for name, mod in self.modules.items():
            if name in sys.modules:
                self.saved[name] = sys.modules[name]
            sys.modules[name] = mod
        return self

    def remove(self) -> None:
        for name in self.modules:
            sys.modules.pop(name, None)
        sys.modules.update(self.saved)
        self.saved.clear()

    def event_names(self) -> list[str]:
        return [e for e, _ in self.events]


# ------------------------------------------------------------------------------- node call helpers

def widget_defaults(cls: type) -> dict:
    """Default values of every widget of a node (what a fresh node in the editor would send), from its V1 view
    (``INPUT_TYPES()``, which ComfyUI derives from a V3 schema; combos are ``("COMBO", {"options": [...]})``)."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            options = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
            if options is not None:
                out[name] = opts.get("default", options[0] if options else None)
            elif "default" in opts:
                out[name] = opts["default"]
    return out


def combo_options(spec: tuple | list) -> list | None:
    """The choices of a combo input's V1 view (``("COMBO", {"options": [...]})`` from a V3 schema, or V1's own
    ``([...], {...})``), or None for any other input."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return kind
    return list(opts.get("options") or []) if kind == "COMBO" else None


def node_classes(pack: types.ModuleType) -> dict[str, type]:
    """The pack's node classes by node id."""
    return pack.NODE_CLASSES


def run_node(cls: type, **inputs: Any) -> Any:
    """Call a node the way ComfyUI's executor calls a V3 node: its hidden inputs (the ones its schema asks for,
    e.g. ``unique_id``, ``prompt``) on a clone of the class (``cls.hidden``), the rest as keyword arguments to
    ``EXECUTE_NORMALIZED``. The ``NodeOutput`` comes back in V1's shape for the assertions: ``{"ui", "result"}``
    when the node returned a UI message, else the result tuple."""
    hidden = {}
    for name, spec in cls.INPUT_TYPES().get("hidden", {}).items():
        if name in inputs:
            hidden[spec[0] if isinstance(spec, (tuple, list)) else spec] = inputs.pop(name)
    out = getattr(cls.PREPARE_CLASS_CLONE(hidden), cls.FUNCTION)(**inputs)
    ui = out.ui if out.ui is None or isinstance(out.ui, dict) else out.ui.as_dict()
    result = tuple(out.args)
    return {"ui": ui, "result": result} if ui is not None else result


WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI workflow (what the editor saves) as the API prompt the frontend's graphToPrompt sends for it, read with
    ``object_info`` (the server's, or a pack's V1 view): each node's widgets_values taken in its widget order
    (required, then optional inputs; a seed's control_after_generate value skipped), links as [node id, slot].
    Nodes the server does not know (Note) and muted or bypassed nodes are left out; a workflow saved before a
    widget existed simply has no value for it (the server uses the default)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None or node.get("mode", 0) in (2, 4):
            continue
        values = iter(node.get("widgets_values") or [])
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs: dict = {}
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, list(info["input"].get(section, {}))):
                spec = info["input"][section][name]
                kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
                if (isinstance(kind, list) or kind in WIDGET_KINDS) and not opts.get("forceInput"):
                    value = next(values, _MISSING)
                    if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                        next(values, None)
                    if value is not _MISSING and name not in linked:
                        inputs[name] = value
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


_MISSING = object()


# ----------------------------------------------------------------------------- real ComfyUI server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: Any = None, timeout: float = 30.0) -> Any:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"},
                                 method="GET" if data is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip() else None


COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
try:
    import pytest
    NEEDS_COMFYUI = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to a "
                                                               "ComfyUI checkout to run the real-server tests")
except ImportError:  # the scripts run in ComfyUI's own Python import these helpers without pytest
    NEEDS_COMFYUI = None
PACK_DIR_NAME = "flowcache-pack"  # the pack's folder in the server's custom_nodes


def host_workdir(tmp_path_factory, name: str, folders: tuple[str, ...], test_nodes: bool = True) -> Path:
    """A fresh folder for one ComfyUI server: ``custom_nodes`` with this pack linked in (and the test nodes), an
    ``output`` folder and the model ``folders`` (e.g. diffusion_models, loras); ComfyUI at COMFYUI_PATH checked."""
    if not (Path(COMFYUI_PATH or "") / "main.py").is_file():
        raise AssertionError(f"COMFYUI_PATH={COMFYUI_PATH} has no main.py")
    work = tmp_path_factory.mktemp(name)
    for d in ("custom_nodes", "output", *folders):
        (work / d).mkdir(exist_ok=True)
    (work / "custom_nodes" / PACK_DIR_NAME).symlink_to(ROOT, target_is_directory=True)
    if test_nodes:
        (work / "custom_nodes" / "flowcache-test-nodes").symlink_to(ROOT / "tests" / "host_test_nodes",
                                                                    target_is_directory=True)
    return work


def serve(work: Path, folders: tuple[str, ...], extra_args: tuple[str, ...] = ()):
    """A started ``ComfyServer`` reading ``work``'s custom_nodes and model ``folders`` (through an
    extra_model_paths.yaml there) and writing into its output folder; a generator for a pytest fixture, which
    stops the server afterwards."""
    config = work / "extra_model_paths.yaml"
    config.write_text(f"{work.name.replace('-', '_')}:\n    base_path: {work}\n    custom_nodes: custom_nodes\n"
                      + "".join(f"    {d}: {d}\n" for d in folders))
    server = ComfyServer(Path(COMFYUI_PATH), COMFYUI_PYTHON, work, config, work / "output", extra_args=extra_args)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class ComfyServer:
    """``python main.py --cpu ... [extra_args]`` as a subprocess; log in ``log_path``; killed by ``stop``."""

    def __init__(self, comfy_path: Path, python: str, workdir: Path, extra_config: Path, output_dir: Path,
                 extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "comfyui.log"
        self.cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                    "--disable-auto-launch", "--extra-model-paths-config", str(extra_config),
                    "--output-directory", str(output_dir), "--temp-directory", str(workdir / "temp"),
                    "--user-directory", str(workdir / "user"), *extra_args]
        self.cwd = comfy_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        for d in ("temp", "user"):
            (self.log_path.parent / d).mkdir(exist_ok=True)
        # One thread: the test models are tiny, and on a busy machine OpenMP spinning makes them ~20x slower.
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)  # the server must not see the pack root (its nodes/ would shadow ComfyUI's)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                http_json(self.url + "/object_info/KSampler", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                time.sleep(0.3)
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def queue(self, prompt: dict, client_id: str) -> str:
        try:
            answer = http_json(self.url + "/prompt", {"prompt": prompt, "client_id": client_id})
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST /prompt failed ({e.code}): {e.read().decode(errors='replace')}") from e
        assert not answer.get("node_errors"), answer
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return http_json(f"{self.url}/history/{prompt_id}").get(prompt_id)

    def wait_done(self, prompt_id: str, timeout: float = 300.0, need_outputs: bool = True) -> dict:
        """Poll /history until the run has finished (and, on success, its outputs are filled in)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("status_str") == "error" or status.get("completed") is False:
                return entry
            # Right after the run the entry can still have empty outputs (comfyui-host.md §8.3).
            if status.get("status_str") == "success" and (entry.get("outputs") or not need_outputs):
                return entry
            time.sleep(0.2)
        raise AssertionError(f"prompt {prompt_id} not finished after {timeout} s:\n{self.log()[-4000:]}")


class MiniWebSocket:
    """Just enough of a websocket client (RFC 6455) to read ComfyUI's JSON events; stdlib only."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 60.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake failed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        return buf

    def recv_json(self) -> dict | None:
        """The next text message as JSON (binary preview frames are skipped); None on close."""
        while True:
            b0, b1 = self._read(2)
            opcode, length = b0 & 0x0F, b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            if opcode == 0x8:
                return None
            if opcode == 0x9:  # ping -> pong (client frames must be masked)
                m = os.urandom(4)
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + m +
                                  bytes(c ^ m[i % 4] for i, c in enumerate(payload)))
                continue
            if opcode == 0x1:
                return json.loads(payload.decode())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
