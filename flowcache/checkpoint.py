"""Reading model checkpoints: one safetensors file, shards with an index json, or a torch file.

Only safe formats are read: safetensors, or ``torch.load(weights_only=True)``. The functions here know
nothing about model families; ``flowcache.models.detect_family`` decides what a set of keys is.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from .errors import CheckpointError

log = logging.getLogger("FlowCache")

# Key prefixes seen in the wild, longest first (ComfyUI packaging, Self-Forcing wrappers, ...).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "model.", "net.")

DTYPE_NAMES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    getattr(torch, "float8_e4m3fn", None): "fp8_e4m3fn", getattr(torch, "float8_e5m2", None): "fp8_e5m2",
}


@dataclass
class Checkpoint:
    """A loaded state dict with what was learned about its layout.

    ``tensors`` has the bare keys (prefix removed). ``files`` are the files read, ``prefix`` the stripped key
    prefix ('' when bare), ``dtypes`` counts tensors per storage dtype name.
    """

    tensors: dict[str, torch.Tensor]
    files: list[Path]
    prefix: str = ""
    dtypes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "flat"  # a torch file's layout: "flat", or the generator entry it was read from

    @property
    def name(self) -> str:
        return self.files[0].name if len(self.files) == 1 else f"{self.files[0].parent.name} ({len(self.files)} shards)"

    @property
    def main_dtype(self) -> str:
        return max(self.dtypes.items(), key=lambda kv: kv[1])[0] if self.dtypes else "unknown"


# safetensors dtype names -> bytes per element (whole-byte types only: torch reads no others).
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_INDEX_BYTES = 64 * 1024 * 1024  # a 40-layer model's weight map is well under 1 MB


def _entry(name: str) -> str:
    """A header or index entry for an error message, shortened: the file may be hostile."""
    r = repr(name)
    return r if len(r) <= 200 else r[:197] + "..."


def _json_kind(v: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_safetensors_header(path: Path) -> dict:
    """Read and validate a safetensors header; return it (tensor name -> {dtype, shape, data_offsets}, plus
    ``__metadata__``). Fail with the file's name and the bad entry on anything that is not a well-formed
    safetensors file, so no reader ever meets a header it would trip over."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            raw = f.read(n) if 1 < n <= min(size - 8, MAX_HEADER_BYTES) else b""
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot be read ({e.strerror or type(e).__name__}).") from None
    if len(head) < 8:
        raise CheckpointError(f"{path.name}: file is only {size} bytes; it is not a safetensors file (truncated or empty).")
    if n <= 1 or n > min(size - 8, MAX_HEADER_BYTES) or len(raw) != n:
        raise CheckpointError(
            f"{path.name}: not a safetensors file (bad header length). Use a .safetensors checkpoint, "
            "or a torch file that loads with weights_only=True.")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"{path.name}: safetensors header is not valid JSON ({str(e)[:120]}); the file is damaged.") from e
    bad = f"{path.name}: damaged safetensors header"
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: expected a JSON object of tensors, got {_json_kind(header)}.")
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and (not isinstance(info, dict)
                                     or not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())):
                raise CheckpointError(f"{bad}: '__metadata__' must map names to strings.")
            continue
        what = f"{bad}: tensor {_entry(key)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{what} is {_json_kind(info)}, expected an object {{dtype, shape, data_offsets}}.")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
            raise CheckpointError(f"{what} has dtype {_entry(dtype) if isinstance(dtype, str) else str(dtype)[:40]}; "
                                  f"expected one of {', '.join(SAFETENSORS_ITEMSIZE)}.")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{what} has shape {str(shape)[:80]}; expected a list of non-negative integers.")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{what} has data_offsets {str(offsets)[:80]}; expected [begin, end] with "
                                  "0 <= begin <= end.")
        if offsets[1] > data_size:
            raise CheckpointError(
                f"{path.name}: truncated: the header promises {8 + n + offsets[1]} bytes (tensor {_entry(key)}) "
                f"but the file has {size}. Download it again.")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * SAFETENSORS_ITEMSIZE[dtype]:
            raise CheckpointError(f"{what} has {offsets[1] - offsets[0]} bytes of data, but {dtype} {shape} needs "
                                  f"{numel * SAFETENSORS_ITEMSIZE[dtype]}.")
    return header


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file complete or not at all: to a temporary file beside it, renamed when written (an
    existing file is replaced only then; a failed write leaves no temporary behind)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, metadata) of a safetensors file, validated, without reading any weights."""
    header = _check_safetensors_header(Path(path))
    meta = header.pop("__metadata__", None) or {}
    return {k: list(v["shape"]) for k, v in header.items()}, meta


def _read_safetensors(path: Path, out: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta.update(f.metadata() or {})
            for k in f.keys():
                if k in out:
                    raise CheckpointError(f"{path.name}: key {k!r} appears in more than one shard.")
                out[k] = f.get_tensor(k)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path.name}: could not be read as safetensors: {e}") from e


def _unpickling_reason(e: BaseException) -> str:
    """What torch's weights-only refusal refused, without the rest of its message, which suggests
    weights_only=False: exactly what must not be done with an untrusted file."""
    for line in str(e).splitlines():
        line = line.strip()
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].split(" Please ", 1)[0].strip()
        if line.startswith("Unsupported operand"):  # e.g. FRAME (149): a pickle that torch.save did not write
            return (f"its pickle uses an instruction the weights-only reader refuses ({line[:60].rstrip('.')}); "
                    "torch.save does not write such files")
        if line.startswith(("Unsupported", "Trying to load unsupported")):
            return f"it holds a Python object that is not plain data: {line[:160].rstrip('.')}"
    return "it holds Python objects that are not plain data"


TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")  # read with torch.load(weights_only=True)

# Self-Forcing's .pt: {"generator", "critic", "generator_ema"}; CausVid's: {"generator"}. Weights sit under one.
GENERATOR_ENTRIES = ("generator_ema", "generator")


def _read_torch(path: Path, out: dict[str, torch.Tensor], entry: str | None = None,
                wrappers: tuple[str, ...] = ()) -> str:
    """Read a weights-only torch file into ``out``; returns its layout ("flat", or the entry taken).

    entry: for a Self-Forcing / CausVid dict, which generator to take (default generator_ema when present).
    wrappers: other entries whose dict holds the weights (LongLive's lora.pt: 'generator_lora')."""
    how = (f"{path.name}: not loadable as a weights-only torch file ({{}}). Only safetensors and plain tensor "
           "dicts are accepted; code stored in a torch file is never run.")
    # torch warns while it reads (e.g. "Detected pickle protocol 4", for a pickle torch did not write, which is
    # what a hostile file usually is): its notes are caught here, so a refusal is the one line below and nothing
    # else, and a file that loads says nothing either. They are logged for a bug report.
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        try:
            # mmap needs the zip format; files saved with _use_new_zipfile_serialization=False are read whole.
            mmap = zipfile.is_zipfile(path)
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise CheckpointError(how.format(_unpickling_reason(e))) from e
        except Exception as e:
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise CheckpointError(how.format(f"{type(e).__name__}: {first}")) from e
        finally:
            for note in notes:
                log.debug("FlowCache: reading %s, torch warned: %s", path.name, note.message)
    layout = "flat"
    wrapper = next((k for k in wrappers if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
    if wrapper is not None:
        obj, layout = obj[wrapper], wrapper
    elif isinstance(obj, dict) and any(k in obj for k in GENERATOR_ENTRIES):
        have = [k for k in GENERATOR_ENTRIES if isinstance(obj.get(k), dict)]
        pick = entry or (have[0] if have else None)
        if pick not in have:
            raise CheckpointError(f"{path.name}: weights={pick!r} is not in this file; it holds "
                                  f"{', '.join(have) or 'no generator weights'} (Self-Forcing: generator_ema or "
                                  "generator; CausVid: generator).")
        obj, layout = obj[pick], pick
    elif entry is not None:
        raise CheckpointError(f"{path.name}: weights={entry!r} applies to Self-Forcing / CausVid .pt files (a dict "
                              "with 'generator' / 'generator_ema'); this file is a plain state dict.")
    else:
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise CheckpointError(f"{path.name}: not a model checkpoint: expected a flat dict of named tensors, or a "
                              "Self-Forcing / CausVid dict with 'generator' / 'generator_ema' holding one.")
    out.update(obj)
    return layout


def _index_names(index: Path) -> dict[str, str]:
    """The weight map (tensor key -> shard name) of a ``*.index.json``; CheckpointError when it is not one."""
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError("too large")
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index.name}: not a shard index (expected a json with a 'weight_map').") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index.name}: 'weight_map' must map tensor names to shard file names.")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index.name}: weight_map entry {_entry(key)} is {str(name)[:80]!r}, "
                                  "expected a shard file name.")
    return weight_map


def _shard_files(index: Path, weight_map: dict[str, str]) -> list[Path]:
    """The shard files an index names, each resolved (symlinks too) and required to lie inside the index's folder.

    The check is made on the path alone, before anything is opened, and its message is the same whether or not
    something exists at the named path, so a hostile index can neither read nor probe files elsewhere.
    """
    folder = index.parent.resolve()
    files: dict[str, Path] = {}
    for key, name in weight_map.items():
        if name in files:
            continue
        try:
            target = (index.parent / name).resolve()
            inside = target != folder and target.is_relative_to(folder)
        except (OSError, ValueError, RuntimeError):  # NUL bytes, symlink loops, over-long names
            inside = False
        if not inside:
            raise CheckpointError(
                f"{index.name}: weight_map entry {_entry(key)} names the shard {_entry(name)}, which is not a file "
                f"inside the index's folder ({index.parent.name}/). Shards must sit beside their index; "
                "refusing to load this model.")
        # The checked file, under the folder path as the user gave it: MAGI-1's "distill" folder name or a
        # symlinked models folder stay visible.
        files[name] = index.parent / target.relative_to(folder)
    return sorted(set(files.values()))


def _is(test, path: Path) -> bool:
    """``path.exists()`` / ``is_file()`` / ``is_dir()`` that answers False for names the OS cannot even look up
    (too long, NUL bytes) instead of raising."""
    try:
        return test(path)
    except (OSError, ValueError):
        return False


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files that make up a checkpoint: a file, a shard index json, or a folder of shards.

    Shards named by an index must lie inside the index's folder (after resolving symlinks).
    """
    p = Path(path)
    if not _is(Path.exists, p):
        raise CheckpointError(f"{p}: no such file or folder.")
    if _is(Path.is_dir, p):
        idx = sorted(p.glob("*.safetensors.index.json"))
        if idx:
            return checkpoint_files(idx[0])
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{p}: folder holds no .safetensors files.")
        return files
    if p.name.endswith(".index.json"):
        files = _shard_files(p, _index_names(p))
        missing = [_entry(f.name) for f in files if not _is(Path.is_file, f)]
        if missing:
            raise CheckpointError(f"{p.name}: shards missing next to the index: {', '.join(missing[:5])}.")
        return files
    index = shard_index_of(p)
    return checkpoint_files(index) if index is not None else [p]


def shard_index_of(path: Path) -> Path | None:
    """The ``*.index.json`` beside ``path`` whose weight map names it, i.e. ``path`` is one shard of several.

    ComfyUI lists every shard of a sharded model (e.g. ``model-00001-of-00002.safetensors``); picking any of
    them loads the whole model. An index that names this shard is held to ``checkpoint_files``' rule: all its
    shards inside its folder, or CheckpointError.
    """
    for idx in sorted(path.parent.glob("*.index.json")):
        try:
            weight_map = _index_names(idx)
        except CheckpointError:
            continue  # some other json that happens to end in .index.json
        if path.name not in {Path(n).name for n in weight_map.values()}:
            continue
        files = _shard_files(idx, weight_map)
        if len(files) > 1 and path.resolve() in {f.resolve() for f in files}:
            return idx
    return None


def split_prefix(keys: Iterable[str], anchors: Iterable[str]) -> str:
    """The prefix in front of the model's own key names; ``anchors`` are bare keys a model always has."""
    keys = list(keys)
    anchors = list(anchors)
    for pre in KNOWN_PREFIXES:
        if any(pre + a in keys for a in anchors):
            return pre
    return ""


def load_checkpoint(path: str | os.PathLike, anchors: Iterable[str] = (), weights: str | None = None,
                    entries: tuple[str, ...] = ()) -> Checkpoint:
    """Read every tensor of a checkpoint on the CPU and strip a known key prefix.

    ``anchors`` are bare key names used to find the prefix; keys outside that prefix (a VAE or text encoder
    packed into the same file) are dropped. ``weights``: for Self-Forcing / CausVid .pt files, the generator entry
    to read (default: generator_ema when present). ``entries``: other wrapper entries of a torch file to read
    the weights from (LongLive's 'generator_lora').
    """
    files = checkpoint_files(path)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    layout = "flat"
    for f in files:
        if f.suffix == ".safetensors" or f.name.endswith(".sft"):
            _read_safetensors(f, tensors, meta)
        elif f.suffix in TORCH_SUFFIXES:
            layout = _read_torch(f, tensors, weights, entries)
        else:
            raise CheckpointError(f"{f.name}: unsupported file type {f.suffix!r}; use .safetensors (or .pt/.pth weights).")
    if not tensors:
        raise CheckpointError(f"{files[0].name}: holds no tensors.")
    prefix = split_prefix(tensors.keys(), anchors)
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    dtypes: dict[str, int] = {}
    for v in tensors.values():
        name = DTYPE_NAMES.get(v.dtype, str(v.dtype).replace("torch.", ""))
        dtypes[name] = dtypes.get(name, 0) + 1
    return Checkpoint(tensors=tensors, files=files, prefix=prefix, dtypes=dtypes, metadata=meta, layout=layout)


def compute_dtype(choice: str, stored: str) -> torch.dtype:
    """The dtype to run in. ``auto`` keeps fp32/bf16/fp16 weights as stored and upcasts fp8 to bf16."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if choice == "auto":
        return table.get(stored, torch.bfloat16)
    if choice not in table:
        raise CheckpointError(f"dtype={choice!r}: must be one of auto, fp32, bf16, fp16.")
    return table[choice]


def read_headers(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, merged metadata) of safetensors files, from their validated headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    meta: dict[str, str] = {}
    for f in files:
        if f.suffix != ".safetensors" and not f.name.endswith(".sft"):
            raise CheckpointError(f"{f.name}: presets can be read ahead only from .safetensors files.")
        file_shapes, file_meta = read_safetensors_header(f)
        meta.update(file_meta)
        shapes.update((k, tuple(v)) for k, v in file_shapes.items())
    return shapes, meta


def read_named_tensors(path: str | os.PathLike, bare_names: Iterable[str], anchors: Iterable[str] = ()
                       ) -> dict[str, torch.Tensor]:
    """Only the tensors called ``bare_names`` (after a known key prefix, found with ``anchors``) of one checkpoint
    file, on the CPU; names the file lacks are left out. Reads a .safetensors file (header validated first) or a
    .gguf file (with the ``gguf`` package, as ComfyUI-GGUF does; quantized tensors are dequantized to fp32).

    For a few small tensors of a large file: SkyReels' fps embedding, which ComfyUI's own Wan model drops."""
    p = Path(path)
    wanted = set(bare_names)
    if p.suffix == ".gguf":
        return _read_gguf_tensors(p, wanted, anchors)
    if p.suffix != ".safetensors" and not p.name.endswith(".sft"):
        raise CheckpointError(f"{p.name}: only .safetensors and .gguf files can be read tensor by tensor.")
    header = _check_safetensors_header(p)
    keys = [k for k in header if k != "__metadata__"]
    prefix = split_prefix(keys, anchors)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            for k in keys:
                if k.startswith(prefix) and k[len(prefix):] in wanted:
                    out[k[len(prefix):]] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{p.name}: could not be read as safetensors: {e}") from e
    return out


def _read_gguf_tensors(path: Path, wanted: set[str], anchors: Iterable[str]) -> dict[str, torch.Tensor]:
    try:
        import gguf  # ComfyUI-GGUF's dependency; present wherever a GGUF model can be loaded at all
        import numpy as np
    except ImportError:
        raise CheckpointError(f"{path.name}: reading a .gguf file needs the 'gguf' package "
                              "(installed with ComfyUI-GGUF).") from None
    try:
        reader = gguf.GGUFReader(str(path))
        tensors = {t.name: t for t in reader.tensors}
        prefix = split_prefix(tensors.keys(), anchors)
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            bare = name[len(prefix):] if name.startswith(prefix) else None
            if bare not in wanted:
                continue
            shape = tuple(int(v) for v in reversed(t.shape))  # GGUF lists the fastest dimension first
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                data = np.array(t.data, copy=True)
            else:
                data = gguf.quants.dequantize(t.data, t.tensor_type)
            out[bare] = torch.from_numpy(np.ascontiguousarray(data).reshape(shape)).float()
        return out
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path.name}: could not be read as GGUF: {e}") from e
