"""Hostile and damaged model files: shard indexes that point outside their folder, malformed safetensors headers,
old-format and pickle-laden torch files. Every one must end in a CheckpointError that names the file, never in a
raw exception, a read outside the model folder, or code run from the file."""
from __future__ import annotations

import builtins
import io
import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flowcache import checkpoint
from flowcache.checkpoint import checkpoint_files, load_checkpoint, shard_index_of
from flowcache.cli import main as cli_main
from flowcache.errors import CheckpointError
from flowcache.models import header_facts
from flowcache.presets import preset_rows as rows_for_key


def preset_rows(path):
    """What the presets route reads for a file: its header facts, then its rows."""
    facts = header_facts(path)
    return rows_for_key(facts.preset_key, facts.extra_presets)
from flowcache.models import load_model
from tiny_models import HOSTILE_FORMATS, save_wan, tiny_wan, write_hostile

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tiny_wan().state_dict().items()}


def write_sharded(folder: Path, sd: dict, second: str = SHARDS[1]) -> list[str]:
    """Both shards in ``folder`` and an index that maps the second half of the keys to ``second`` (a name that
    may point anywhere; a file there is the caller's business). Returns the sorted keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    half = len(keys) // 2
    for name, part in zip(SHARDS, (keys[:half], keys[half:])):
        if not (folder / name).exists():
            save_file({k: sd[k] for k in part}, str(folder / name), metadata={"flowcache.num_heads": "2"})
    weight_map = {k: SHARDS[0] if i < half else second for i, k in enumerate(keys)}
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return keys


def write_outside_shard(outside: Path, sd: dict) -> Path:
    """The second half of the keys, plus a marker key, in a folder outside the model folder."""
    keys = sorted(sd)
    path = outside / SHARDS[1]
    save_file({**{k: sd[k] for k in keys[len(keys) // 2:]}, "SECRET": torch.zeros(1)}, str(path))
    return path


# ------------------------------------------------------------------------------------------ item 1: traversal

@pytest.fixture
def trav(tmp_path, state_dict):
    """The issue's layout: models/diffusion_models/trav/ with shard 1 and the index, shard 2 in outside_secret/."""
    folder = tmp_path / "models" / "diffusion_models" / "trav"
    outside = tmp_path / "models" / "outside_secret"
    outside.mkdir(parents=True)
    return folder, outside


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_index_naming_a_shard_outside_its_folder_is_refused(trav, state_dict, how, capsys):
    folder, outside = trav
    second = "../../outside_secret/" + SHARDS[1] if how == "relative" else str(outside / SHARDS[1])
    write_outside_shard(outside, state_dict)  # real, and loadable if the index were followed
    keys = write_sharded(folder, state_dict, second)
    entry = keys[len(keys) // 2]
    for target in (folder / SHARDS[0], folder / INDEX, folder):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(target)
        msg = str(e.value)
        assert INDEX in msg and repr(entry) in msg and repr(second) in msg and "not a file inside" in msg
    with pytest.raises(CheckpointError, match="not a file inside the index's folder"):
        load_model(folder / SHARDS[0])
    with pytest.raises(CheckpointError, match="not a file inside the index's folder"):
        preset_rows(folder / SHARDS[0])  # the presets route reads headers through the same check
    assert cli_main(["inspect", str(folder / SHARDS[0])]) == 2
    out, err = capsys.readouterr()
    assert "outside_secret" not in out and "2 shards" not in out and "not a file inside" in err


def test_refusal_does_not_reveal_whether_the_outside_file_exists(trav, state_dict):
    folder, _ = trav
    messages = []
    for target in ("/etc/passwd", "/etc/no_such_file_here"):
        second = "../" * 8 + target.lstrip("/")
        write_sharded(folder, state_dict, second)
        for call in (load_checkpoint, preset_rows):
            with pytest.raises(CheckpointError) as e:
                call(folder / SHARDS[0])
            messages.append(str(e.value).replace(second, "X"))
    assert "passwd" not in "".join(messages) and "unsupported file type" not in messages[0]
    assert messages[0] == messages[2] and messages[1] == messages[3]


def test_symlinked_shard_pointing_outside_is_refused(trav, state_dict):
    folder, outside = trav
    folder.mkdir(parents=True)
    (folder / SHARDS[1]).symlink_to(write_outside_shard(outside, state_dict))  # a name inside, a file outside
    write_sharded(folder, state_dict)
    with pytest.raises(CheckpointError, match=f"names the shard '{SHARDS[1]}', which is not a file inside"):
        load_checkpoint(folder / INDEX)
    with pytest.raises(CheckpointError, match="not a file inside"):
        shard_index_of(folder / SHARDS[0])


def test_shard_index_of_holds_the_index_beside_a_shard_to_the_rule(tmp_path, state_dict):
    good = tmp_path / "good"
    write_sharded(good, state_dict)
    assert shard_index_of(good / SHARDS[0]) == good / INDEX
    assert [f.name for f in checkpoint_files(good / SHARDS[1])] == list(SHARDS)
    bad = tmp_path / "bad" / "m"
    write_sharded(bad, state_dict, "../" + SHARDS[1])
    with pytest.raises(CheckpointError, match=f"{INDEX}: weight_map entry .* names the shard '../{SHARDS[1]}'"):
        shard_index_of(bad / SHARDS[0])
    # an index that does not name the picked file is not its index, hostile or not: the file loads alone
    single = save_wan(tiny_wan(), bad / "single.safetensors")
    assert checkpoint_files(single) == [single]


def test_benign_index_paths_still_load(tmp_path, state_dict):
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    write_sharded(folder, state_dict, "./sub/../" + SHARDS[1])  # stays inside: fine
    ck = load_checkpoint(folder / INDEX)
    assert set(ck.tensors) == set(state_dict) and ck.name == "m (2 shards)"


# ------------------------------------------------------------------------------- item 2: malformed headers

def raw_safetensors(path: Path, header: bytes, data: bytes = b"\0" * 8) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header,entry", [
    (b"[1,2,3]", "expected a JSON object of tensors, got an array"),
    (b'{"head.modulation":5}', "tensor 'head.modulation' is a number"),
    (b'{"head.modulation":{"dtype":"F32","shape":[2]}}', "tensor 'head.modulation' has data_offsets None"),
])
def test_malformed_headers_are_explained(tmp_path, header, entry, capsys):
    path = raw_safetensors(tmp_path / "bad.safetensors", header)
    for call in (load_checkpoint, preset_rows, load_model):
        with pytest.raises(CheckpointError) as e:
            call(path)
        assert str(e.value).startswith("bad.safetensors: damaged safetensors header") and entry in str(e.value)
    assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and entry in err and "Traceback" not in err


def test_header_checks_each_field(tmp_path):
    def check(header: dict, data_len: int, match: str):
        path = raw_safetensors(tmp_path / "h.safetensors", json.dumps(header).encode(), b"\0" * data_len)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path)
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    check({"__metadata__": {"a": 1}, "w": ok}, 8, "'__metadata__' must map names to strings")
    check({"w": {**ok, "dtype": "F31"}}, 8, "tensor 'w' has dtype 'F31'; expected one of BOOL")
    check({"w": {**ok, "shape": [-2]}}, 8, r"tensor 'w' has shape \[-2\]")
    check({"w": {**ok, "shape": [True]}}, 8, r"tensor 'w' has shape \[True\]")
    check({"w": {**ok, "data_offsets": [8, 0]}}, 8, "data_offsets")
    check({"w": {**ok, "data_offsets": [0, 16]}}, 8, "truncated: the header promises .* bytes .*tensor 'w'")
    check({"w": {**ok, "shape": [3]}}, 8, "tensor 'w' has 8 bytes of data, but F32 \\[3\\] needs 12")
    path = raw_safetensors(tmp_path / "fine.safetensors", json.dumps({"__metadata__": None, "w": ok}).encode())
    assert load_checkpoint(path).tensors["w"].shape == (2,)


# ----------------------------------------------------------------------------------- item 5: torch formats

def test_legacy_torch_file_loads(tmp_path, state_dict):
    path = tmp_path / "legacy.pt"
    torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    lm = load_model(path)
    assert lm.family == "wan" and lm.config.dim == 64
    assert torch.equal(lm.model.state_dict()["blocks.0.self_attn.q.weight"], state_dict["blocks.0.self_attn.q.weight"])


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zip_format", [False, True])
def test_pickle_payload_never_runs(tmp_path, state_dict, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**state_dict, "x": _Payload(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert not marker.exists()
    msg = str(e.value)
    assert msg.startswith("evil.pt: not loadable as a weights-only torch file (it holds a Python object that is "
                          "not plain data: ") and "never run" in msg
    assert "weights_only` set to `False`" not in msg  # torch's own advice would be the wrong advice here


def test_hostile_pt_refusal_is_exactly_one_line_subprocess(tmp_path):
    """The issue's reproduction as a user runs it: torch's "Detected pickle protocol 4" warning (with a path into
    torch) must not print before the refusal."""
    marker = tmp_path / "pwned"
    evil = write_hostile(tmp_path / "evil.pt", marker, "pickle4")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "flowcache", "inspect", str(evil)], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and not marker.exists()
    assert r.stderr.startswith("error: evil.pt: not loadable as a weights-only torch file") and r.stderr.count("\n") == 1, r.stderr
    assert "Warning" not in r.stderr and "torch/" not in r.stderr


@pytest.mark.parametrize("how", HOSTILE_FORMATS)
def test_hostile_pt_is_refused_without_warnings_at_every_entry_point(tmp_path, state_dict, how, capsys, recwarn):
    marker = tmp_path / "pwned"
    evil = str(write_hostile(tmp_path / "evil.pt", marker, how, state_dict))
    cond = tmp_path / "cond.safetensors"
    save_file({"context": torch.zeros(1, 4, 32)}, str(cond))
    with pytest.raises(CheckpointError) as e:
        load_model(evil)
    assert str(e.value).startswith("evil.pt: not loadable as a weights-only torch file") and "\n" not in str(e.value)
    for argv in (["inspect", evil], ["inspect", evil, "--memory", "64x64"], ["generate", evil, "--cond", str(cond)],
                 ["bench", "--model", evil], ["calibrate", evil]):
        assert cli_main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert err.startswith("error: evil.pt: not loadable as a weights-only torch file") and err.count("\n") == 1, (argv, err)
        assert "pwned" not in out
    assert not marker.exists()
    assert [str(w.message) for w in recwarn] == []  # torch's "Detected pickle protocol" note never escapes


# ------------------------------------------------------------------------------------------- fuzzing

class ReadSpy:
    """Records every file opened for reading through Python, safetensors or torch while installed."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real_open, real_safe_open, real_load = builtins.open, checkpoint.safe_open, torch.load

        def note(file):
            if isinstance(file, (str, bytes, os.PathLike)):
                self.paths.append(os.path.abspath(os.fsdecode(file)))

        def spy_open(file, *a, **kw):
            note(file)
            return real_open(file, *a, **kw)

        def spy_safe_open(file, *a, **kw):
            note(file)
            return real_safe_open(file, *a, **kw)

        def spy_load(file, *a, **kw):
            note(file)
            return real_load(file, *a, **kw)
        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(io, "open", spy_open)
        monkeypatch.setattr(checkpoint, "safe_open", spy_safe_open)
        monkeypatch.setattr(torch, "load", spy_load)

    def outside(self, allowed: Path, forbidden: list[Path]) -> list[str]:
        """Opened paths that resolve into a forbidden folder and not into ``allowed``."""
        bad = []
        for p in self.paths:
            try:
                rp = Path(p).resolve()
            except (OSError, RuntimeError, ValueError):
                rp = Path(p)
            if not rp.is_relative_to(allowed.resolve()) and any(rp.is_relative_to(f.resolve()) for f in forbidden):
                bad.append(p)
        self.paths.clear()
        return bad


def attempt(call, path) -> str:
    """'ok' or 'refused'; anything other than CheckpointError fails the test; each call under a second."""
    start = time.perf_counter()
    try:
        result = call(path)
        outcome = "ok"
        if call is load_checkpoint:
            assert "SECRET" not in result.tensors
    except CheckpointError:
        outcome = "refused"
    assert time.perf_counter() - start < 1.0, f"{call.__name__}({path}) took too long"
    return outcome


def header_variants(header: dict, rng: random.Random) -> list[object]:
    """Valid header dicts with one field replaced by a wrong JSON type or value."""
    wrong = [None, True, 1, 1.5, "x", "", [], {}, [1], {"a": 1}]
    name = next(k for k in header if k != "__metadata__")
    out: list[object] = [w for w in wrong if not isinstance(w, dict) or w]  # the whole header
    out += [{**header, "__metadata__": w} for w in wrong + [{"a": None}, {"a": []}, {"a": {"b": "c"}}]]
    out += [{**header, name: w} for w in wrong]
    for field in ("dtype", "shape", "data_offsets"):
        out.append({**header, name: {k: v for k, v in header[name].items() if k != field}})
        out += [{**header, name: {**header[name], field: w}} for w in wrong]
    out += [{**header, name: {**header[name], "dtype": d}} for d in ("F31", "f32", "F4", "F8_E8M0", "x" * 500)]
    begin, end = header[name]["data_offsets"]
    out += [{**header, name: {**header[name], "shape": s}} for s in
            ([-1], [1.5], [True], [[1]], ["1"], [2 ** 70], [0], header[name]["shape"] * 2)]
    out += [{**header, name: {**header[name], "data_offsets": o}} for o in
            ([begin], [begin, end, end], [str(begin), end], [float(begin), end], [-4, end - 4], [end, begin],
             [begin, 10 ** 12], [begin + 2 ** 64, end + 2 ** 64], [begin + 1, end + 1], [0, 0])]
    # every tensor pointed at the same bytes (legal in JSON, not in safetensors)
    out.append({k: ({**v, "data_offsets": [0, v["data_offsets"][1] - v["data_offsets"][0]]} if k != "__metadata__"
                    else v) for k, v in header.items()})
    rng.shuffle(out)
    return out


def test_fuzz_safetensors_and_indexes(tmp_path, state_dict, monkeypatch):
    rng = random.Random(1234)
    models = tmp_path / "models"
    single_dir, sharded = models / "single", models / "sharded"
    outside = tmp_path / "outside_secret"
    outside.mkdir()
    keys = sorted(state_dict)
    write_outside_shard(outside, state_dict)
    forbidden = [outside, Path("/etc")]

    single_dir.mkdir(parents=True)
    valid = save_wan(tiny_wan(), single_dir / "valid.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", valid[:8])
    header, data = json.loads(valid[8:8 + n]), valid[8 + n:]
    target = single_dir / "case.safetensors"

    spy = ReadSpy(monkeypatch)
    outcomes = {"ok": 0, "refused": 0}

    def run(path: Path) -> None:
        for call in (load_checkpoint, preset_rows):
            outcomes[attempt(call, path)] += 1
        assert spy.outside(models, forbidden) == []

    # random bytes: whole files, and random headers behind a consistent length
    for _ in range(60):
        target.write_bytes(rng.randbytes(rng.randrange(0, 64)))
        run(target)
    for _ in range(60):
        body = rng.randbytes(rng.randrange(2, 300))
        target.write_bytes(struct.pack("<Q", len(body)) + body + data[:rng.randrange(0, 64)])
        run(target)
    # the valid header with random characters changed (often still JSON, rarely still right)
    text = json.dumps(header)
    for _ in range(80):
        chars = list(text)
        for _ in range(rng.randrange(1, 4)):
            chars[rng.randrange(len(chars))] = rng.choice('{}[]":,0123456789-eE.a ')
        body = "".join(chars).encode()
        target.write_bytes(struct.pack("<Q", len(body)) + body + data)
        run(target)
    # truncation at and around every section boundary: length prefix, header, each tensor's data
    cuts = set(range(0, 10)) | {8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(valid) - 1}
    for k, v in header.items():
        if k != "__metadata__":
            for off in v["data_offsets"]:
                cuts |= {8 + n + off - 1, 8 + n + off, 8 + n + off + 1}
    for cut in sorted(c for c in cuts if 0 <= c < len(valid)):
        target.write_bytes(valid[:cut])
        run(target)
    # a length prefix that lies: huge, zero, one, past the end
    for length in (0, 1, n - 1, n + 1, len(valid), 2 ** 63, 2 ** 64 - 1, 100 * 1024 * 1024 + 1):
        target.write_bytes(struct.pack("<Q", length) + valid[8:])
        run(target)
    # wrong JSON types and out-of-bounds values in every field
    for variant in header_variants(header, rng):
        body = json.dumps(variant).encode()
        target.write_bytes(struct.pack("<Q", len(body)) + body + data)
        run(target)

    # shard indexes: traversal in every string field, and wrong types everywhere
    write_sharded(sharded, state_dict)
    (sharded / "link_out.safetensors").symlink_to(outside / SHARDS[1])
    good_map = json.loads((sharded / INDEX).read_text())["weight_map"]
    hostile = ["../../outside_secret/" + SHARDS[1], str(outside / SHARDS[1]), "../" * 12 + "etc/passwd",
               "./../sharded/../../outside_secret/" + SHARDS[1], "sub/../../../outside_secret/" + SHARDS[1],
               SHARDS[1] + "/../../../outside_secret/" + SHARDS[1], "link_out.safetensors", "", ".", "..", "/",
               "a\x00b", "a" * 5000, "~/x.safetensors", "C:\\x.safetensors", "%2e%2e/x.safetensors"]
    wrong = [None, True, 1, 1.5, [], {}, ["x"], {"a": "b"}]
    indexes: list[object] = []
    for h in hostile:
        one = next(k for k, v in good_map.items() if v == SHARDS[1])
        indexes.append({"weight_map": {**good_map, one: h}})                   # one entry
        indexes.append({"weight_map": {k: h for k in good_map}})               # every entry
        indexes.append({"weight_map": {**good_map, h: SHARDS[1]}})             # a key (just a name)
        indexes.append({"metadata": {"total_size": h}, "weight_map": good_map})  # metadata (never a path)
    indexes += wrong + [{"weight_map": w} for w in wrong] + [{"weight_map": {**good_map, keys[0]: w}} for w in wrong]
    indexes.append({"nothing": 1})
    for index in indexes:
        (sharded / INDEX).write_text(json.dumps(index))
        for path in (sharded / INDEX, sharded / SHARDS[0], sharded):
            run(path)
    for junk in (b"", b"\xff\xfe", b"[" * 100_000, b'{"weight_map": ' * 10_000):
        (sharded / INDEX).write_bytes(junk)
        for path in (sharded / INDEX, sharded / SHARDS[0]):
            run(path)
    assert outcomes["refused"] > 500 and outcomes["ok"] > 20  # both kinds really happened
