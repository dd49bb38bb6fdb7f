import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowcache.errors import InputError, OutputPathError
from flowcache.metrics import psnr
from flowcache.video import FORMATS, VideoWriter, read_video, resolve_output_path, write_video


def moving_square(n: int = 12, h: int = 48, w: int = 64) -> torch.Tensor:
    """A red square sliding right over a blue-ish background with a horizontal gradient."""
    x = torch.zeros(n, h, w, 3)
    x[..., 1] = torch.linspace(0.1, 0.6, w)
    x[..., 2] = 0.35
    for i in range(n):
        x[i, 10:26, 2 + 3 * i:18 + 3 * i, 0] = 1.0
    return x


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_format_table():
    assert set(FORMATS) == {"video/h264-mp4", "video/webm", "image/gif", "image/webp"}
    assert FORMATS["video/h264-mp4"].extension == "mp4" and FORMATS["video/h264-mp4"].codec == "libx264"
    assert FORMATS["video/h264-mp4"].widgets["crf"] == 19 and FORMATS["video/h264-mp4"].pix_fmt == "yuv420p"
    assert FORMATS["video/webm"].codec == "libvpx-vp9"
    assert FORMATS["image/webp"].pillow_options == {"lossless": False, "quality": 90}
    assert [f.is_video for f in FORMATS.values()] == [True, True, False, False]
    assert {f.encoder for f in FORMATS.values()} == {"pyav", "pillow"}


@pytest.mark.parametrize("fmt,min_db", [("video/h264-mp4", 25), ("video/webm", 25), ("image/gif", 25),
                                        ("image/webp", 25)])
def test_round_trip(tmp_path, fmt, min_db):
    clip = moving_square()
    path = tmp_path / f"clip.{FORMATS[fmt].extension}"
    assert write_video(clip, path, fmt, fps=8) == path
    out = read_video(path)
    assert out.dtype == np.uint8 and out.shape == (12, 48, 64, 3)
    assert psnr(torch.from_numpy(out).float() / 255, clip) > min_db
    assert listing(tmp_path) == [path.name]  # the temp file was renamed away


ENCODE_IN_CHILD = r"""
import hashlib, sys, torch
from flowcache.video import write_video
n, size, fmt, out = 36, 64, sys.argv[1], sys.argv[2]
x = torch.zeros(n, size, size, 3)  # a disc moving over a gradient, as small as the demo's videos
yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
x[..., 1] = 0.3 * xx / size
for t in range(n):
    d = ((xx - (0.2 + 0.6 * t / n) * size) ** 2 + (yy - 0.5 * size) ** 2).sqrt()
    x[t, ..., 0] = ((size * 0.2 - d) / 2).clamp(0, 1)
write_video(x, out, fmt, fps=8)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MALLOC_PERTURB_ is glibc's")
@pytest.mark.parametrize("fmt", ["video/h264-mp4"])
def test_same_frames_same_file_whatever_the_heap_holds(tmp_path, fmt):
    """Issue 24 (8): libx264's mb-tree with B-frames reads memory it never initialised, so in a long-running
    ComfyUI the same frames gave a different mp4 (up to 30/255 per pixel) from one prompt to the next. glibc's
    MALLOC_PERTURB_ fills fresh allocations with a byte: two different bytes must give the same file."""
    root = Path(__file__).resolve().parent.parent
    digests = []
    for byte in ("85", "170"):
        out = tmp_path / f"{byte}.{FORMATS[fmt].extension}"
        env = dict(os.environ, MALLOC_PERTURB_=byte, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", ENCODE_IN_CHILD, fmt, str(out)], env=env, check=True, timeout=120)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_streaming_writes_in_several_calls(tmp_path):
    clip = moving_square(n=20)
    path = tmp_path / "stream.mp4"
    with VideoWriter(path, "video/h264-mp4", fps=16) as w:
        w.write(clip[:7])
        w.write(clip[7:7].numpy())  # an empty batch is fine
        w.write(clip[7:15].numpy())  # numpy works too
        w.write(clip[15])  # a single [H,W,3] frame
        w.write((clip[16:] * 255).round().to(torch.uint8))  # uint8 is taken as is
        assert not path.exists()  # still a temp file
        temps = [n for n in listing(tmp_path) if n.startswith(".") and n.endswith(".partial.mp4")]
        assert len(temps) == 1
    out = read_video(path)
    assert out.shape == (20, 48, 64, 3)
    assert psnr(out, clip) > 25
    assert listing(tmp_path) == ["stream.mp4"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_exception_inside_with_leaves_nothing(tmp_path, fmt):
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(tmp_path / f"x.{FORMATS[fmt].extension}", fmt, fps=8) as w:
            w.write(moving_square(n=4))
            raise RuntimeError("boom")
    assert listing(tmp_path) == []


def test_abort_and_bad_input_leave_nothing(tmp_path):
    w = VideoWriter(tmp_path / "a.mp4", "video/h264-mp4", fps=8)
    w.write(moving_square(n=3))
    w.abort()
    assert listing(tmp_path) == []

    with pytest.raises(InputError, match="same size"):
        with VideoWriter(tmp_path / "b.mp4", "video/h264-mp4", fps=8) as w:
            w.write(moving_square(n=2))
            w.write(moving_square(n=2, h=32))
    with pytest.raises(InputError, match=r"\[N, H, W, 3\]"):
        write_video(torch.zeros(2, 3, 16, 16), tmp_path / "c.mp4", "video/h264-mp4", fps=8)
    with pytest.raises(InputError, match="no frames"):
        with VideoWriter(tmp_path / "d.gif", "image/gif", fps=8):
            pass
    assert listing(tmp_path) == []


def test_bad_options():
    with pytest.raises(InputError, match="not supported"):
        VideoWriter("x.avi", "video/avi", fps=8)
    with pytest.raises(InputError, match="fps"):
        VideoWriter("x.mp4", "video/h264-mp4", fps=0)
    with pytest.raises(InputError, match="crf"):
        VideoWriter("x.mp4", "video/h264-mp4", fps=8, crf=60)


def test_odd_size_padded_for_h264(tmp_path):
    clip = moving_square(n=6, h=47, w=63)
    path = write_video(clip, tmp_path / "odd.mp4", "video/h264-mp4", fps=8)
    out = read_video(path)
    assert out.shape == (6, 48, 64, 3)
    assert psnr(out[:, :47, :63], clip) > 25
    # the padding repeats the edge rather than adding black
    assert psnr(out[:, 47:, :63], clip[:, 46:47]) > 25


def test_gif_webp_loop_and_timing(tmp_path):
    clip = moving_square(n=6)
    gif = write_video(clip, tmp_path / "a.gif", "image/gif", fps=10, loop_count=2)
    webp = write_video(clip, tmp_path / "a.webp", "image/webp", fps=10, loop_count=2)
    forever = write_video(clip, tmp_path / "b.gif", "image/gif", fps=10)
    with Image.open(gif) as im:
        assert im.info["loop"] == 2 and im.info["duration"] == 100 and im.n_frames == 6
    with Image.open(webp) as im:
        assert im.info["loop"] == 3 and im.n_frames == 6  # WebP counts total plays
    with Image.open(forever) as im:
        assert im.info["loop"] == 0


def test_resolve_counter_increments(tmp_path):
    p1, sub, name = resolve_output_path(tmp_path, "flowcache", "mp4")
    assert (p1, sub, name) == (tmp_path / "flowcache_00001.mp4", "", "flowcache_00001.mp4")
    p1.write_bytes(b"x")
    p2, _, name2 = resolve_output_path(tmp_path, "flowcache", ".mp4")
    assert name2 == "flowcache_00002.mp4"
    # a preview png with a higher counter pushes the counter past it, like ComfyUI
    (tmp_path / "flowcache_00007_.png").write_bytes(b"x")
    assert resolve_output_path(tmp_path, "flowcache", "mp4")[2] == "flowcache_00008.mp4"
    # hidden temp files of a writer in progress do not count; other prefixes do not either
    (tmp_path / ".flowcache_00050.ab12cd34.partial.mp4").write_bytes(b"x")
    (tmp_path / "flowcache2_00090.mp4").write_bytes(b"x")
    assert resolve_output_path(tmp_path, "flowcache", "mp4")[2] == "flowcache_00008.mp4"


def test_resolve_subfolders(tmp_path):
    path, sub, name = resolve_output_path(tmp_path, "video/flowcache", "webm")
    assert (tmp_path / "video").is_dir()
    assert (path, sub, name) == (tmp_path / "video" / "flowcache_00001.webm", "video", "flowcache_00001.webm")
    path, sub, _ = resolve_output_path(tmp_path, "a/b/../c/run", "gif")  # '..' that stays inside is fine
    assert sub == "a/c" and path == tmp_path / "a" / "c" / "run_00001.gif"
    write_video(moving_square(n=2), path, "image/gif", fps=8)
    assert resolve_output_path(tmp_path, "a/c/run", "gif")[2] == "run_00002.gif"


@pytest.mark.parametrize("prefix", ["../x", "/abs", "/abs/x", "a/../../x", "", "   ", "..", "a/..", "video/",
                                    "a/b/..", "C:\\x", "..\\x"])
def test_resolve_rejects_escapes(tmp_path, prefix):
    out = tmp_path / "output"
    out.mkdir()
    with pytest.raises(OutputPathError, match="filename_prefix") as e:
        resolve_output_path(out, prefix, "mp4")
    assert "relative path inside the output folder" in str(e.value)
    assert listing(out) == [] and listing(tmp_path) == ["output"]


@pytest.mark.parametrize("prefix,error,match", [
    ("a" * 300, InputError, "file name 'aaa.* is 300 bytes long"),
    ("é" * 101, InputError, "is 202 bytes long"),  # bytes, not characters, are what the file system counts
    ("d" * 256 + "/x", InputError, "folder name 'ddd.* is 256 bytes long"),
    ("x/" * 600 + "y", InputError, "filename_prefix is 1201 bytes long"),
    ("tab\there", InputError, "control character"),
    ("demo_00001.mp4/x", OutputPathError, "demo_00001.mp4 is an existing file in the output folder, not a folder"),
    ("demo_00001.mp4/a/b", OutputPathError, "demo_00001.mp4 is an existing file"),
])
def test_resolve_refuses_names_the_file_system_cannot_take(tmp_path, prefix, error, match):
    (tmp_path / "demo_00001.mp4").write_bytes(b"x")
    with pytest.raises(error, match=match) as e:
        resolve_output_path(tmp_path, prefix, "mp4")
    assert "filename_prefix" in str(e.value)
    assert listing(tmp_path) == ["demo_00001.mp4"]


def test_resolve_reports_a_folder_it_cannot_create(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "deeper")
    with pytest.raises(OutputPathError, match="filename_prefix 'dangling/x': cannot use the folder"):
        resolve_output_path(tmp_path, "dangling/x", "mp4")


def test_longest_allowed_prefix_writes(tmp_path):
    path, _, name = resolve_output_path(tmp_path, "s" * 200, "webm")
    write_video(moving_square(n=2), path, "video/webm", fps=8)
    assert listing(tmp_path) == [name] and name == "s" * 200 + "_00001.webm"
