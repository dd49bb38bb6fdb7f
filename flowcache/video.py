"""Writing and reading videos and animated images, without any ComfyUI imports.

Frames are RGB, ``[N, H, W, 3]``, float in 0..1 (torch tensor or numpy array; uint8 arrays are taken as is).
``VideoWriter`` streams: it takes frames in as many batches as the caller likes, so a long video never
has to exist as one tensor. Output goes to a hidden temporary file next to the target and is renamed onto
the target only when the writer closes successfully, so a failed or cancelled run leaves nothing behind.

``loop_count`` (gif/webp) counts *extra* plays after the first, as VideoHelperSuite documents its widget:
0 loops forever, 1 plays twice, and so on. GIF stores exactly that number in its NETSCAPE loop field;
animated WebP stores the total number of plays, so it gets ``loop_count + 1`` (VideoHelperSuite writes
the raw value there, which plays one time fewer than its own widget description says).
"""
from __future__ import annotations

import math
import os
import re
import secrets
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import Any, Iterable, Union

import numpy as np
import torch

from .errors import InputError, OutputPathError

FrameBatch = Union[torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class VideoFormat:
    """One entry of ``FORMATS``.

    ``encoder`` is the library that writes it ("pyav" or "pillow"); ``codec``/``container``/``pix_fmt`` are
    PyAV names (None for Pillow); ``is_video`` says whether a preview shows it in a <video> element rather
    than an <img>; ``widgets`` lists the writer options that apply, with their defaults.
    """

    name: str
    extension: str
    encoder: str
    is_video: bool
    mime: str
    codec: str | None = None
    container: str | None = None
    pix_fmt: str | None = None
    pillow_format: str | None = None
    even_size: bool = False
    crf_range: tuple[int, int] | None = None
    widgets: dict[str, Any] = field(default_factory=dict)
    codec_options: dict[str, str] = field(default_factory=dict)
    pillow_options: dict[str, Any] = field(default_factory=dict)


FORMATS: dict[str, VideoFormat] = {
    "video/h264-mp4": VideoFormat(
        name="video/h264-mp4", extension="mp4", encoder="pyav", is_video=True, mime="video/mp4",
        codec="libx264", container="mp4", pix_fmt="yuv420p",
        even_size=True,  # yuv420p subsamples chroma 2x2; libx264 rejects odd sizes
        crf_range=(0, 51), widgets={"crf": 19},
        # No B-frames: with them, libx264's mb-tree (as in PyAV 18's x264 core 165) reads memory it never
        # initialised, so the same frames encode differently depending on the heap (in a long-running ComfyUI,
        # from one prompt to the next: up to 30/255 per pixel). Without B-frames the file is a function of the
        # frames; mb-tree stays (about 4% more bytes at the same crf, not the ~20% of turning mb-tree off).
        codec_options={"bf": "0"},
    ),
    "video/webm": VideoFormat(
        name="video/webm", extension="webm", encoder="pyav", is_video=True, mime="video/webm",
        codec="libvpx-vp9", container="webm", pix_fmt="yuv420p",
        crf_range=(0, 63), widgets={"crf": 19},
        # b=0 makes crf a constant-quality target (otherwise libvpx caps the bitrate); cpu-used 0 (the
        # default) is several times slower for a barely visible gain at these resolutions.
        codec_options={"b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"},
    ),
    "image/gif": VideoFormat(
        name="image/gif", extension="gif", encoder="pillow", is_video=False, mime="image/gif",
        pillow_format="GIF", widgets={"loop_count": 0},
    ),
    "image/webp": VideoFormat(
        name="image/webp", extension="webp", encoder="pillow", is_video=False, mime="image/webp",
        pillow_format="WEBP", widgets={"loop_count": 0},
        pillow_options={"lossless": False, "quality": 90},
    ),
}


def get_format(fmt: str | VideoFormat) -> VideoFormat:
    """Return the ``FORMATS`` entry for a format name (or pass a ``VideoFormat`` through)."""
    if isinstance(fmt, VideoFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise InputError(f"format {fmt!r} is not supported; choose one of: {', '.join(FORMATS)}") from None


# ----------------------------------------------------------------------------------------------- paths

# What a filename_prefix must be, said right after what was wrong with it.
_PREFIX_EXPECTED = ("expected a name or a relative path inside the output folder, e.g. 'flowcache' or "
                    "'video/flowcache' (no absolute path, drive letter or '..' that climbs out of it)")


MAX_NAME_BYTES = 255  # one path component, on every common file system
MAX_STEM_BYTES = 200  # leaves room for "_00001", ".<8 hex>.partial" and the extension
MAX_PREFIX_BYTES = 1024  # folders included; far below PATH_MAX once the output folder is in front


def _short(text: str) -> str:
    r = repr(text)
    return r if len(r) <= 60 else r[:57] + "..."


def _split_prefix(output_dir: Path, filename_prefix: str) -> tuple[list[str], str]:
    """Validate ``filename_prefix`` and return (subfolder parts, file name stem); raise OutputPathError."""
    if not isinstance(filename_prefix, str) or not filename_prefix.strip():
        raise OutputPathError(f"filename_prefix is empty; {_PREFIX_EXPECTED}.")
    if "\x00" in filename_prefix:
        raise OutputPathError(f"filename_prefix {_short(filename_prefix)} contains a NUL character; "
                              f"{_PREFIX_EXPECTED}.")
    if re.search(r"[\x01-\x1f\x7f]", filename_prefix):
        raise InputError(f"filename_prefix {_short(filename_prefix)} contains a control character (a line break, "
                         "tab, ...); use letters, digits, '-', '_' and '/'.")
    if len(os.fsencode(filename_prefix)) > MAX_PREFIX_BYTES:
        raise InputError(f"filename_prefix is {len(os.fsencode(filename_prefix))} bytes long; at most "
                         f"{MAX_PREFIX_BYTES} are allowed. Use a shorter name.")
    # Both separators count on every host so a workflow made on Windows cannot escape on Linux and vice versa.
    win = PureWindowsPath(filename_prefix)
    if PurePosixPath(filename_prefix).is_absolute() or win.drive or win.root:
        raise OutputPathError(f"filename_prefix {_short(filename_prefix)} is an absolute path; {_PREFIX_EXPECTED}.")
    parts: list[str] = []
    for part in re.split(r"[\\/]+", filename_prefix):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise OutputPathError(f"filename_prefix {_short(filename_prefix)} leaves the output folder; "
                                      f"{_PREFIX_EXPECTED}. The output folder is {output_dir}.")
            parts.pop()
        else:
            parts.append(part)
    # "video/" or "a/b/.." name a folder, not a file; do not silently write "_00001.mp4" or "a_00001.mp4".
    if not parts or re.split(r"[\\/]+", filename_prefix.rstrip())[-1] in ("", ".", ".."):
        raise OutputPathError(f"filename_prefix {_short(filename_prefix)} does not end in a file name; "
                              f"{_PREFIX_EXPECTED}.")
    # File systems cap a name at 255 bytes; the writer's hidden temp name adds ~30 to the stem.
    for part in parts[:-1]:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise InputError(f"filename_prefix: the folder name {_short(part)} is {len(os.fsencode(part))} bytes "
                             f"long; file systems allow {MAX_NAME_BYTES}. Use a shorter name.")
    if len(os.fsencode(parts[-1])) > MAX_STEM_BYTES:
        raise InputError(f"filename_prefix: the file name {_short(parts[-1])} is {len(os.fsencode(parts[-1]))} bytes "
                         f"long; at most {MAX_STEM_BYTES} are allowed (the counter and extension are added to it).")
    return parts[:-1], parts[-1]


def _output_folder(output_dir: str | os.PathLike[str], filename_prefix: str,
                   extension: str) -> tuple[Path, Path, list[str], str, str]:
    """Check ``filename_prefix`` against ``output_dir`` without creating anything: (root, folder, subfolder parts,
    stem, extension). Raises OutputPathError or InputError naming the widget."""
    ext = extension.lstrip(".")
    if not ext or re.search(r"[\\/\x00]", ext):
        raise InputError(f"extension {extension!r} is not a plain file extension such as 'mp4'")
    # Lexical check (like ComfyUI), not realpath: a user may symlink a subfolder of output to another disk.
    root = Path(os.path.abspath(output_dir))
    sub_parts, stem = _split_prefix(root, filename_prefix)
    folder = root.joinpath(*sub_parts)
    if os.path.commonpath([root, os.path.abspath(folder)]) != str(root):
        raise OutputPathError(f"filename_prefix {_short(filename_prefix)} leaves the output folder; "
                              f"{_PREFIX_EXPECTED}. The output folder is {root}.")
    # A prefix like "FlowCache/demo_00001.mp4/x" would need an existing file to become a folder.
    for i in range(1, len(sub_parts) + 1):
        here = root.joinpath(*sub_parts[:i])
        if here.exists() and not here.is_dir():
            raise OutputPathError(f"filename_prefix {_short(filename_prefix)}: {'/'.join(sub_parts[:i])} is an "
                                  "existing file in the output folder, not a folder. Pick another name.")
    return root, folder, sub_parts, stem, ext


def check_output_prefix(output_dir: str | os.PathLike[str], filename_prefix: str, extension: str) -> None:
    """Raise, creating nothing, when ``resolve_output_path`` would refuse this prefix; call it before any work."""
    _output_folder(output_dir, filename_prefix, extension)


def resolve_output_path(output_dir: str | os.PathLike[str], filename_prefix: str,
                        extension: str) -> tuple[Path, str, str]:
    """Pick the next free ``<prefix>_00001.<ext>`` name under ``output_dir``, ComfyUI style.

    Returns (full path, subfolder relative to ``output_dir`` with '/' separators or '', file name). Subfolders
    in the prefix are created; the file itself is not. The counter is one more than the highest counter of any
    existing ``<prefix>_NNNNN*.*`` file (any extension, like ComfyUI and VideoHelperSuite), then skips names
    that exist. Raises OutputPathError, creating nothing, when the prefix would leave ``output_dir``, names an
    existing file as a folder, or is too long for the file system (InputError).
    """
    root, folder, sub_parts, stem, ext = _output_folder(output_dir, filename_prefix, extension)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        existing = os.listdir(folder)
    except OSError as e:
        raise OutputPathError(f"filename_prefix {_short(filename_prefix)}: cannot use the folder {folder} "
                              f"({e.strerror or type(e).__name__}).") from None

    pattern = re.compile(rf"^{re.escape(stem)}_(\d+)\D*\..+$", re.IGNORECASE)
    counter = 1 + max((int(m.group(1)) for m in map(pattern.match, existing) if m), default=0)
    while True:
        filename = f"{stem}_{counter:05d}.{ext}"
        full = folder / filename
        if not os.path.lexists(full):
            return full, "/".join(sub_parts), filename
        counter += 1


# ---------------------------------------------------------------------------------------------- frames

def _to_uint8(frames: FrameBatch) -> np.ndarray:
    """Float 0..1 (clamped; NaN -> 0) or uint8 frames -> contiguous uint8 numpy array of the same shape."""
    if isinstance(frames, torch.Tensor):
        t = frames.detach()
        if t.dtype != torch.uint8:
            if not t.is_floating_point():
                raise InputError(f"frames must be float in 0..1 or uint8, got dtype {t.dtype}")
            t = (t.float().nan_to_num(0.0).clamp_(0.0, 1.0) * 255.0).round_().to(torch.uint8)
        return np.ascontiguousarray(t.cpu().numpy())
    if frames.dtype != np.uint8:
        if not np.issubdtype(frames.dtype, np.floating):
            raise InputError(f"frames must be float in 0..1 or uint8, got dtype {frames.dtype}")
        frames = np.rint(np.clip(np.nan_to_num(frames.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(frames)


def _pad_even(arr: np.ndarray) -> np.ndarray:
    """Pad ``[N,H,W,3]`` on the bottom/right by repeating the edge so H and W are even."""
    ph, pw = arr.shape[1] % 2, arr.shape[2] % 2
    if not (ph or pw):
        return arr
    return np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


def _durations_ms(n: int, fps: float, step_ms: int) -> list[int]:
    """Per-frame durations in whole ``step_ms`` units whose running sum tracks n/fps (no cumulative drift)."""
    ticks = [round(i * 1000.0 / fps / step_ms) for i in range(n + 1)]
    return [max(1, ticks[i + 1] - ticks[i]) * step_ms for i in range(n)]


# ---------------------------------------------------------------------------------------------- writer

def check_writer_options(fmt: str | VideoFormat, fps: float, loop_count: int = 0, crf: int = 19) -> None:
    """Raise InputError for options ``VideoWriter`` would refuse; lets callers fail before any work."""
    fmt = get_format(fmt)
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise InputError(f"fps must be a positive number, got {fps}")
    if int(loop_count) != loop_count or loop_count < 0:
        raise InputError(f"loop_count must be a whole number >= 0 (0 loops forever), got {loop_count}")
    if fmt.crf_range is not None:
        lo, hi = fmt.crf_range
        if int(crf) != crf or not lo <= crf <= hi:
            raise InputError(f"crf for {fmt.name} must be a whole number in {lo}..{hi}, got {crf}")


class VideoWriter:
    """Streaming writer for one output file; use as a context manager.

    ``VideoWriter(path, fmt, fps, loop_count=0, crf=19)``: ``fmt`` is a ``FORMATS`` key; ``crf`` applies to
    the PyAV formats, ``loop_count`` to gif/webp (see the module docstring). Call ``write(frames)`` any number
    of times with ``[N,H,W,3]`` batches of the same size; ``close()`` finishes and renames the temporary file
    onto ``path``. An exception in the ``with`` block, in ``write``/``close``, or ``abort()`` deletes the
    temporary file and leaves nothing. For h264, odd sizes are padded to even by repeating the last row/column.
    """

    def __init__(self, path: str | os.PathLike[str], fmt: str | VideoFormat, fps: float,
                 loop_count: int = 0, crf: int = 19) -> None:
        self.format = get_format(fmt)
        self.path = Path(path)
        check_writer_options(self.format, fps, loop_count, crf)
        fps = float(fps)
        self.fps = fps
        self.loop_count = int(loop_count)
        self.crf = int(crf)
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (H, W) of the input frames, fixed by the first write
        self._images: list[Any] = []
        self._container: Any = None
        self._stream: Any = None
        self._time_base = Fraction(1)
        self._next_pts = 0
        self._done = False

        ext = "." + self.format.extension
        # Created with O_EXCL and mode 0666 (minus umask): unique name, and normal permissions after the rename
        # (mkstemp would leave the final file 0600).
        while True:
            tmp = self.path.with_name(f".{self.path.stem}.{secrets.token_hex(4)}.partial{ext}")
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
        self.temp_path = tmp
        if self.format.encoder == "pyav":
            try:
                import av

                options = {"movflags": "+faststart"} if self.format.container == "mp4" else {}
                self._container = av.open(str(tmp), mode="w", format=self.format.container, options=options)
            except BaseException:
                self._cleanup()
                raise

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def write(self, frames: FrameBatch) -> None:
        """Append ``[N,H,W,3]`` frames (float 0..1 or uint8; N may be 0). On error the writer is aborted."""
        if self._done:
            raise InputError(f"VideoWriter for {self.path} is already closed or aborted")
        try:
            self._write(frames)
        except BaseException:
            self.abort()
            raise

    def _write(self, frames: FrameBatch) -> None:
        if not isinstance(frames, (torch.Tensor, np.ndarray)):
            raise InputError(f"frames must be a torch tensor or numpy array, got {type(frames).__name__}")
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] == 0 or frames.shape[2] == 0:
            raise InputError(f"frames must have shape [N, H, W, 3] (RGB, channels last), got {list(frames.shape)}")
        size = (int(frames.shape[1]), int(frames.shape[2]))
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise InputError(f"all frames of one video must have the same size: the first batch was "
                             f"{self.size[0]}x{self.size[1]} (HxW), this one is {size[0]}x{size[1]}")
        # Convert in slices so a long float batch is never copied whole.
        for start in range(0, frames.shape[0], 16):
            arr = _to_uint8(frames[start:start + 16])
            if self.format.encoder == "pyav":
                self._encode(arr)
            else:
                from PIL import Image

                self._images.extend(Image.fromarray(frame) for frame in arr)
            self.frames_written += arr.shape[0]

    def _encode(self, arr: np.ndarray) -> None:
        import av

        if self.format.even_size:
            arr = _pad_even(arr)
        if self._stream is None:
            rate = Fraction(self.fps).limit_denominator(1001)
            options = {"crf": str(self.crf), **self.format.codec_options}
            stream = self._container.add_stream(self.format.codec, rate=rate, options=options)
            stream.width, stream.height = int(arr.shape[2]), int(arr.shape[1])
            stream.pix_fmt = self.format.pix_fmt
            self._stream = stream
            self._time_base = 1 / rate
        for frame_np in arr:
            frame = av.VideoFrame.from_ndarray(frame_np, format="rgb24").reformat(format=self.format.pix_fmt)
            frame.pts = self._next_pts
            self._next_pts += 1
            frame.time_base = self._time_base
            self._container.mux(self._stream.encode(frame))

    def close(self) -> Path:
        """Finish the file and move it onto ``path``; return ``path``. Writing no frames is an error."""
        if self._done:
            return self.path
        try:
            if self.frames_written == 0:
                raise InputError(f"no frames were written to {self.path}; a video needs at least one frame")
            if self.format.encoder == "pyav":
                self._container.mux(self._stream.encode(None))
                self._container.close()
                self._container = None
            else:
                self._save_pillow()
            os.replace(self.temp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def _save_pillow(self) -> None:
        fmt = self.format
        first, rest = self._images[0], self._images[1:]
        n = len(self._images)
        if fmt.pillow_format == "GIF":
            # GIF delays are in 1/100 s; WebP in ms.
            duration = _durations_ms(n, self.fps, 10)
            loop = self.loop_count
        else:
            duration = _durations_ms(n, self.fps, 1)
            loop = 0 if self.loop_count == 0 else self.loop_count + 1
        first.save(self.temp_path, format=fmt.pillow_format, save_all=True, append_images=rest,
                   duration=duration if n > 1 else duration[0], loop=loop, **fmt.pillow_options)
        self._images = []

    def abort(self) -> None:
        """Stop without producing a file: close the encoder and delete the temporary file."""
        self._done = True
        self._images = []
        if self._container is not None:
            import av

            try:
                self._container.close()
            except (av.FFmpegError, OSError):
                pass  # the file is being thrown away; a muxer complaint about it does not matter
            self._container = None
        self._cleanup()

    def _cleanup(self) -> None:
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


def write_video(frames: FrameBatch | Iterable[FrameBatch], path: str | os.PathLike[str], fmt: str | VideoFormat,
                fps: float, loop_count: int = 0, crf: int = 19) -> Path:
    """Write a whole clip (one ``[N,H,W,3]`` batch, or an iterable of batches) to ``path``; return ``path``."""
    with VideoWriter(path, fmt, fps, loop_count=loop_count, crf=crf) as writer:
        if isinstance(frames, (torch.Tensor, np.ndarray)):
            writer.write(frames)
        else:
            for batch in frames:
                writer.write(batch)
    return Path(path)


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode every frame of a video file to ``[N,H,W,3]`` uint8 RGB.

    Uses PyAV; .gif and .webp are read with Pillow, since FFmpeg builds differ in animated-WebP support.
    """
    path = Path(path)
    if path.suffix.lower() in (".gif", ".webp"):
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    else:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise InputError(f"{path} has no video frames")
    return np.stack(frames)
