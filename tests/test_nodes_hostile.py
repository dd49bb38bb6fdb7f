"""Hostile input at the ComfyUI edge: the presets route with damaged model files, and filename_prefix values the
file system cannot take. The route must always answer (never an HTTP 500); the video nodes must refuse before
any work and write nothing."""
from __future__ import annotations

import json
import logging
import struct

import pytest
import torch

from comfy_helpers import pack_submodule, run_node, write_tiny_wan
from tiny_models import HOSTILE_FORMATS, write_hostile


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

    def broken(*args):
        raise RuntimeError("something nobody foresaw")
    monkeypatch.setattr(route, "preset_rows", broken)
    write_tiny_wan(comfy.models_dir / "tiny.safetensors", pack)
    with caplog.at_level(logging.ERROR, logger="FlowCache"):
        got = route.model_presets("tiny.safetensors")
    assert got["known"] is False and "RuntimeError: something nobody foresaw" in got["error"]
    assert "model_name" in got["error"] and any(r.exc_info for r in caplog.records)  # logged with its traceback



@pytest.mark.parametrize("how", HOSTILE_FORMATS)
def test_hostile_pt_in_the_models_folder_is_refused_in_one_line_without_warnings(pack, comfy, how, recwarn):
    """The loader node and the presets route with a pickle-laden .pt: one message naming the file, no torch
    warning on the side (the issue's "Detected pickle protocol 4"), nothing run."""
    marker = comfy.models_dir / "pwned"
    write_hostile(comfy.models_dir / "evil.pt", marker, how, {"blocks.0.w": torch.zeros(2)})
    errors = pack_submodule(pack, "flowcache.errors")
    with pytest.raises(errors.CheckpointError) as e:
        run_node(pack.NODE_CLASSES["FlowCacheModelLoader"], model_name="evil.pt", dtype="auto")
    assert str(e.value).startswith("model_name: evil.pt: not loadable as a weights-only torch file") and "\n" not in str(e.value)
    got = pack_submodule(pack, "nodes.presets_route").model_presets("evil.pt")
    assert got["known"] is False and got["error"].startswith("evil.pt: ") and "\n" not in got["error"]
    assert not marker.exists()
    assert [str(w.message) for w in recwarn] == []


# ----------------------------------------------------------------------------------------- filename_prefix

def nodes(pack):
    return pack.NODE_CLASSES


def combine(pack, prefix: str, **over):
    kw = dict(images=torch.rand(2, 16, 16, 3), frame_rate=8.0, loop_count=0, filename_prefix=prefix,
              format="video/h264-mp4", crf=19)
    return run_node(nodes(pack)["FlowCacheVideoCombine"], **{**kw, **over})


def decode_save(pack, prefix: str, **over):
    # Wan latents without a VAE: the node would refuse them, so reaching that error means the prefix passed.
    kw = dict(samples={"samples": torch.zeros(1, 16, 2, 4, 4)}, frame_rate=8.0, loop_count=0,
              filename_prefix=prefix, format="video/h264-mp4", crf=19)
    return run_node(nodes(pack)["FlowCacheDecodeSave"], **{**kw, **over})


def files_under(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("node", [combine, decode_save])
def test_long_or_odd_prefix_is_refused_before_any_work(pack, comfy, node):
    errors = pack_submodule(pack, "flowcache.errors")
    for prefix, match in (("a" * 300, "filename_prefix: the file name 'aaa.* is 300 bytes long; at most 200"),
                          ("d" * 300 + "/x", "filename_prefix: the folder name 'ddd.* is 300 bytes long"),
                          ("ok/" * 400 + "x", "filename_prefix is 1201 bytes long"),
                          ("line\nbreak", "filename_prefix 'line\\\\nbreak' contains a control character")):
        with pytest.raises(errors.FlowCacheError, match=match):
            node(pack, prefix)
        assert files_under(comfy.output_dir) == []


@pytest.mark.parametrize("node", [combine, decode_save])
def test_prefix_that_turns_a_file_into_a_folder_is_refused(pack, comfy, node):
    errors = pack_submodule(pack, "flowcache.errors")
    existing = comfy.output_dir / "FlowCache" / "demo_00001.mp4"
    existing.parent.mkdir()
    existing.write_bytes(b"a video")
    with pytest.raises(errors.OutputPathError,
                       match="filename_prefix 'FlowCache/demo_00001.mp4/x': FlowCache/demo_00001.mp4 is an "
                             "existing file in the output folder, not a folder"):
        node(pack, "FlowCache/demo_00001.mp4/x")
    with pytest.raises(errors.OutputPathError, match="is an existing file"):
        node(pack, "FlowCache/demo_00001.mp4/deeper/x")
    assert files_under(comfy.output_dir) == ["FlowCache", "FlowCache/demo_00001.mp4"]
    assert existing.read_bytes() == b"a video"


def test_decode_save_checks_the_file_widgets_before_the_vae(pack, comfy):
    errors = pack_submodule(pack, "flowcache.errors")
    with pytest.raises(errors.InputError, match="vae: these are Wan2.1 latents"):
        decode_save(pack, "sub/fine")  # a good prefix gets as far as the missing VAE
    with pytest.raises(errors.InputError, match="crf for video/h264-mp4 must be a whole number in 0..51"):
        decode_save(pack, "sub/fine", crf=60)
    assert files_under(comfy.output_dir) == []  # not even the subfolder


def test_a_long_but_legal_prefix_still_writes(pack, comfy):
    out = combine(pack, "v/" + "b" * 200)
    (path,) = out["result"]
    assert path.endswith("b" * 200 + "_00001.mp4") and files_under(comfy.output_dir)[-1].endswith(".mp4")
