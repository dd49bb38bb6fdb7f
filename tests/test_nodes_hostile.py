"""Hostile input at the ComfyUI edge: the presets route with damaged model files, and filename_prefix values the
file system cannot take. The route must always answer (never an HTTP 500); the video nodes must refuse before
any work and write nothing."""
from __future__ import annotations

import json
import logging
import struct

from comfy_helpers import pack_submodule, write_tiny_wan


def raw(path, header: bytes, data: bytes = b"\0" * 8):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def damaged_files(models, pack) -> dict[str, str]:
    """File name -> what its error must mention, written into the stub diffusion_models folder."""
    good = write_tiny_wan(models / "good.safetensors", pack).read_bytes()
    (models / "truncated.safetensors").write_bytes(good[:len(good) // 2])
    (models / "zero.safetensors").write_bytes(b"")
    (models / "huge_header.safetensors").write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
    raw(models / "list.safetensors", b"[1,2,3]")
    raw(models / "number_entry.safetensors", b'{"head.modulation":5}')
    raw(models / "no_offsets.safetensors", b'{"head.modulation":{"dtype":"F32","shape":[2]}}')
    expect = {"truncated.safetensors": "truncated", "zero.safetensors": "only 0 bytes",
              "huge_header.safetensors": "bad header length", "list.safetensors": "got an array",
              "number_entry.safetensors": "'head.modulation' is a number",
              "no_offsets.safetensors": "'head.modulation' has data_offsets None"}
    for name, value in (("meta_notjson", "notjson"), ("meta_list", "[1]"), ("meta_entry", '{"k": 1}')):
        write_tiny_wan(models / f"{name}.safetensors", pack)  # then its metadata replaced, same data
        data = (models / f"{name}.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        header["__metadata__"]["flowcache.presets"] = value
        raw(models / f"{name}.safetensors", json.dumps(header).encode(), data[8 + n:])
        expect[f"{name}.safetensors"] = "metadata 'flowcache.presets'"
    for name, sidecar in (("side_notjson", "{oops"), ("side_list", "[1, 2]"), ("side_noco", '{"k": {}}'),
                          ("side_badmode", '{"tiny-test": {"coefficients": [1, 0], "flowcache": "x"}}')):
        write_tiny_wan(models / f"{name}.safetensors", pack)
        (models / f"{name}.presets.json").write_text(sidecar)
        expect[f"{name}.safetensors"] = "tiny-test" if name == "side_badmode" else f"{name}.presets.json"
    return expect


def test_presets_route_answers_every_damaged_file(pack, comfy):
    route = pack_submodule(pack, "nodes.presets_route")
    for name, needle in damaged_files(comfy.models_dir, pack).items():
        got = route.model_presets(name)  # what the aiohttp handler returns as JSON (status 200)
        json.dumps(got)
        assert got["known"] is False and got["rows"] == {} and got["model_name"] == name, name
        assert needle in got["error"], (name, got["error"])
    assert route.model_presets("good.safetensors")["known"] is True


def test_presets_route_answers_unforeseen_errors_too(pack, comfy, monkeypatch, caplog):
    route = pack_submodule(pack, "nodes.presets_route")

    def broken(path):
        raise RuntimeError("something nobody foresaw")
    monkeypatch.setattr(route, "preset_rows", broken)
    write_tiny_wan(comfy.models_dir / "tiny.safetensors", pack)
    with caplog.at_level(logging.ERROR, logger="FlowCache"):
        got = route.model_presets("tiny.safetensors")
    assert got["known"] is False and "RuntimeError: something nobody foresaw" in got["error"]
    assert "model_name" in got["error"] and any(r.exc_info for r in caplog.records)  # logged with its traceback
