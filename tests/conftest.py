"""Shared fixtures for the ComfyUI-glue tests (node tests with stubs; the real-server test).

Kept here, not at the pack root: a root conftest would make pytest import the pack's ``__init__.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for ``import comfy_helpers`` under any import mode

import comfy_helpers  # noqa: E402


@pytest.fixture(scope="module")
def pack():
    """The pack imported from its ``__init__.py`` by file path, as ComfyUI does; forgotten afterwards."""
    module = comfy_helpers.import_pack()
    threads = torch.get_num_threads()
    # The tiny models run ops of microseconds; on a busy machine OpenMP's spinning threads make them ~20x slower.
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)
    comfy_helpers.forget_pack()


@pytest.fixture
def comfy(tmp_path):
    """Stub ComfyUI modules (model management, progress, folder_paths, server) for one test."""
    stubs = comfy_helpers.ComfyStubs(output_dir=tmp_path / "output", models_dir=tmp_path / "diffusion_models")
    stubs.output_dir.mkdir()
    stubs.models_dir.mkdir()
    stubs.install()
    yield stubs
    stubs.remove()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all per-op overhead: on a busy 2-core machine two OpenMP threads make them several times
    slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
