"""Data packs: a shard's samples (or the held-out split's) as content-addressed, chunked safetensors files.

A pack is a directory: `pack.json` (canonical JSON: the pack's kind and slot, the dataset fingerprint, and
per part its row count, its columns and every chunk file with its rows, sha256 and size) and the chunk files
(`<part>_<i>.safetensors`, float32 and int64 tensors only; never a pickle). The pack's address is the sha256
of the `pack.json` bytes; the plan records it with the pack's size (all files), so a pack from any peer is
checked against the plan alone: the index must hash to the plan's sha256 and every chunk to the index's.

Reading is bounded by what the plan implies (`PackSpec`): the index's size, the parts, rows and columns, the
chunk count and sizes, each chunk's safetensors header; ids must be the plan's, labels in range, values
finite (and within [-1, 1] for images). A pack that is published is also a signed artifact (kind "pack",
`seal_pack`): its manifest's config hash is the pack's sha256.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from ddm_node.core.config import canonical_json
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.jsonsafe import loads as load_json
from ddm_node.core.manifest import MAX_INT, FileEntry, Manifest, commit_dir, fsync_write, seal, staging_dir

PACK_INDEX = "pack.json"
PACK_KIND = "pack"  # the artifact kind of a published pack (core/manifest.py KINDS)
FORMAT = "ddm-pack/1"
CHUNK_BYTES = 64 << 20  # bytes of one chunk file, about (more when a part would need over MAX_CHUNKS)
MAX_CHUNKS = 128  # chunk files per part: the manifest listing them all stays far under its 64 KiB
MAX_INDEX_BYTES = 64 << 10
MAX_HEADER_BYTES = 64 << 10  # a chunk's safetensors header names four tensors at most
MAX_FEATURES = 1 << 16  # width of a features column
DTYPES = {"float32": ("F32", np.dtype(np.float32)), "int64": ("I64", np.dtype(np.int64))}
_ST_DTYPES = {code: dt for code, dt in DTYPES.values()}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PART = re.compile(r"^[a-z]{1,16}$")


@dataclass(frozen=True)
class PackRef:
    """A pack as the plan records it: the sha256 of its pack.json and its size (every file, in bytes)."""

    sha256: str
    size: int

    @classmethod
    def parse(cls, value: Any, where: str) -> PackRef:
        """A PackRef from plan JSON; DDMError naming `where` for anything else."""
        if not isinstance(value, dict) or set(value) != {"sha256", "size"}:
            raise DDMError(f"{where} must be an object with sha256 and size")
        if not isinstance(value["sha256"], str) or not _HEX64.match(value["sha256"]):
            raise DDMError(f"{where}.sha256 must be 64 lowercase hex characters")
        size = value["size"]
        if type(size) is not int or not 0 < size <= MAX_INT:
            raise DDMError(f"{where}.size must be a positive integer, got {size!r}")
        return cls(value["sha256"], size)


@dataclass(frozen=True)
class Column:
    """One array of a part: dtype name and the shape of one row (None: a features row of any width)."""

    dtype: str
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class PartSpec:
    """What the plan says a part holds: `rows` rows of these columns (`optional` ones may be absent), and with
    an `ids` column exactly the ids `ids`."""

    rows: int
    columns: dict[str, Column]
    optional: frozenset[str] = frozenset()
    ids: np.ndarray | None = None


@dataclass(frozen=True)
class PackSpec:
    """Everything a pack must be, from the plan: its ref, kind, slot, dataset, parts and value ranges."""

    ref: PackRef
    kind: str
    slot: int
    fingerprint: str
    parts: dict[str, PartSpec]
    num_classes: int  # labels "y" in [0, num_classes)
    bounded: bool  # images "x" within [-1, 1] (False for latents)
    where: str = field(default="pack")

    def error(self, what: str) -> IntegrityError:
        return IntegrityError(f"{self.where} ({self.ref.sha256[:12]}): {what}")


class Take:
    """Rows `ids` of `array`, read a slice at a time (a shard's rows of a dataset without copying the shard)."""

    def __init__(self, array: Any, ids: np.ndarray) -> None:
        self.array, self.ids = array, np.asarray(ids, dtype=np.int64)
        self.shape = (len(self.ids), *array.shape[1:])
        self.dtype = array.dtype

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, s: slice) -> np.ndarray:
        return np.asarray(self.array[self.ids[s]])


# ------------------------------------------------------------------------------------------ writing


def chunk_rows(rows: int, row_bytes: int) -> int:
    """Rows per chunk: about CHUNK_BYTES each, never more than MAX_CHUNKS chunks."""
    return max(1, CHUNK_BYTES // max(1, row_bytes), math.ceil(rows / MAX_CHUNKS))


def _dtype_name(dtype: Any) -> str:
    for name, (_, dt) in DTYPES.items():
        if np.dtype(dtype) == dt:
            return name
    raise DDMError(f"pack columns must be float32 or int64, got {dtype}")


def write_pack(dest: str | Path, kind: str, slot: int, fingerprint: str, parts: dict[str, dict[str, Any]]) -> PackRef:
    """Write a pack at `dest` (atomically: staging directory, then rename) and return its ref.

    `parts` maps a part name to its columns (numpy arrays or `Take`s of one length, float32 or int64). The bytes
    depend only on the arrays, so the same rows always make the same pack (any node holding the dataset can
    rebuild a plan's pack and match its sha256)."""
    dest = Path(dest)
    stage = staging_dir(dest)
    try:
        listed, total = [], 0
        for name, columns in parts.items():
            rows = {len(a) for a in columns.values()}
            if not _PART.match(name) or len(rows) != 1 or 0 in rows:
                raise DDMError(f"pack part {name!r}: columns must be non-empty and of one length")
            n = rows.pop()
            kinds = {c: _dtype_name(a.dtype) for c, a in columns.items()}
            row_bytes = sum(DTYPES[kinds[c]][1].itemsize * int(np.prod(a.shape[1:])) for c, a in columns.items())
            step, chunks = chunk_rows(n, row_bytes), []
            for i, start in enumerate(range(0, n, step)):
                stop = min(n, start + step)
                raw = st_save({c: np.ascontiguousarray(a[start:stop], dtype=DTYPES[kinds[c]][1])
                               for c, a in columns.items()})
                file = f"{name}_{i:05d}.safetensors"
                fsync_write(stage / file, raw)
                chunks.append({"file": file, "rows": stop - start, "sha256": hashlib.sha256(raw).hexdigest(),
                               "size": len(raw)})
                total += len(raw)
            listed.append({"name": name, "rows": n, "chunks": chunks,
                           "columns": {c: {"dtype": kinds[c], "shape": [int(v) for v in a.shape[1:]]}
                                       for c, a in columns.items()}})
        index = canonical_json({"format": FORMAT, "kind": kind, "slot": slot, "fingerprint": fingerprint,
                                "parts": listed})
        fsync_write(stage / PACK_INDEX, index)
        commit_dir(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return PackRef(hashlib.sha256(index).hexdigest(), total + len(index))


def pack_files(directory: str | Path) -> list[str]:
    """The files of a pack (its index first), as its index names them: call it on a pack `read_pack` verified."""
    index = _index_json(Path(directory), None)
    return [PACK_INDEX] + [c["file"] for p in index["parts"] for c in p["chunks"]]


def seal_pack(directory: str | Path, run_id: str, slot: int, ref: PackRef, identity: Identity | None) -> Manifest:
    """Sign a verified pack directory as an artifact of run `run_id` (kind "pack", config hash = its sha256)."""
    files = pack_files(directory)
    manifest = Manifest(kind=PACK_KIND, run_id=run_id, shard=slot, step=0, config_hash=ref.sha256,
                        files={name: FileEntry("", 0) for name in files})
    return seal(directory, manifest, identity)


def manifest_problem(m: Manifest, ref: PackRef) -> str | None:
    """Why a signed manifest cannot be the pack `ref` names, before anything is downloaded (None: it may be)."""
    index = m.files.get(PACK_INDEX)
    if index is None or index.sha256 != ref.sha256:
        return f"its {PACK_INDEX} is not the plan's pack {ref.sha256[:12]}"
    size = sum(e.size for e in m.files.values())
    if size != ref.size:
        return f"it lists {size} bytes, the plan's pack has {ref.size}"
    if len(m.files) > 1 + 3 * MAX_CHUNKS:
        return f"it lists {len(m.files)} files"
    return None


# ------------------------------------------------------------------------------------------ reading


def read_pack(directory: str | Path, spec: PackSpec, keep: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Verify a pack against `spec` (index hash, structure, every chunk's hash, header, ids and values) and return
    its parts' columns (empty dicts with `keep=False`: a check that holds one chunk at a time). IntegrityError
    (one line) for any defect."""
    directory = Path(directory)
    index = _index_json(directory, spec)
    out: dict[str, dict[str, np.ndarray]] = {}
    for part in index["parts"]:
        want = spec.parts[part["name"]]
        columns = {c: (DTYPES[v["dtype"]][1], tuple(v["shape"])) for c, v in part["columns"].items()}
        arrays = {c: np.empty((want.rows, *shape), dt) for c, (dt, shape) in columns.items()} if keep else {}
        start = 0
        for chunk in part["chunks"]:
            tensors = _chunk(directory, chunk, columns, spec)
            stop = start + chunk["rows"]
            _check_values(tensors, want, start, stop, spec, chunk["file"])
            for c, a in arrays.items():
                a[start:stop] = tensors[c]
            start = stop
        out[part["name"]] = arrays
    return out


def _index_json(directory: Path, spec: PackSpec | None) -> dict:
    """The pack's index, checked against `spec` (with None: only parsed, for sealing a pack just verified)."""
    path = directory / PACK_INDEX
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if spec is not None and hashlib.sha256(raw).hexdigest() != spec.ref.sha256:
        raise spec.error(f"{PACK_INDEX} has sha256 {hashlib.sha256(raw).hexdigest()[:12]}, not the plan's")
    index = load_json(raw, str(path), max_bytes=MAX_INDEX_BYTES)
    if spec is None:
        return index
    if not isinstance(index, dict) or set(index) != {"format", "kind", "slot", "fingerprint", "parts"}:
        raise spec.error(f"{PACK_INDEX} is not a pack index")
    got = (index["format"], index["kind"], index["slot"], index["fingerprint"])
    if got != (FORMAT, spec.kind, spec.slot, spec.fingerprint):
        raise spec.error(f"{PACK_INDEX} is {got[0]} {got[1]} slot {got[2]} of dataset {str(got[3])[:12]}, expected "
                         f"{FORMAT} {spec.kind} slot {spec.slot} of {spec.fingerprint[:12]}")
    parts = index["parts"]
    if not isinstance(parts, list) or [p.get("name") if isinstance(p, dict) else None for p in parts] != list(
            spec.parts):
        raise spec.error(f"parts must be {', '.join(spec.parts)}")
    size = len(raw) + sum(_check_part(p, spec.parts[p["name"]], spec) for p in parts)
    if size != spec.ref.size:
        raise spec.error(f"files hold {size} bytes, the plan says {spec.ref.size}")
    return index


def _check_part(part: dict, want: PartSpec, spec: PackSpec) -> int:
    """A part's structure against the plan; returns the bytes its chunks hold."""
    name = part["name"]
    if set(part) != {"name", "rows", "columns", "chunks"} or part["rows"] != want.rows:
        raise spec.error(f"part {name} must hold {want.rows} rows")
    columns = part["columns"]
    if not isinstance(columns, dict) or not set(want.columns) - want.optional <= set(columns) <= set(want.columns):
        raise spec.error(f"part {name} must have columns {', '.join(sorted(want.columns))}")
    for c, v in columns.items():
        expect = want.columns[c]
        ok = isinstance(v, dict) and set(v) == {"dtype", "shape"} and v["dtype"] == expect.dtype and isinstance(
            v["shape"], list) and all(type(d) is int for d in v["shape"])
        if ok and expect.shape is None:
            ok = len(v["shape"]) == 1 and 1 <= v["shape"][0] <= MAX_FEATURES
        elif ok:
            ok = tuple(v["shape"]) == expect.shape
        if not ok:
            raise spec.error(f"part {name} column {c} must be {expect.dtype} rows of shape {expect.shape}")
    chunks = part["chunks"]
    if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_CHUNKS:
        raise spec.error(f"part {name} must have 1 to {MAX_CHUNKS} chunks")
    rows, size = 0, 0
    for i, c in enumerate(chunks):
        if (not isinstance(c, dict) or set(c) != {"file", "rows", "sha256", "size"} or c["file"] != f"{name}_{i:05d}"
                ".safetensors" or type(c["rows"]) is not int or c["rows"] < 1 or not isinstance(c["sha256"], str)
                or not _HEX64.match(c["sha256"]) or type(c["size"]) is not int or not 0 < c["size"] <= MAX_INT):
            raise spec.error(f"part {name} chunk {i} is malformed")
        rows, size = rows + c["rows"], size + c["size"]
    if rows != want.rows:
        raise spec.error(f"part {name} chunks hold {rows} rows, not {want.rows}")
    return size


def _chunk(directory: Path, chunk: dict, columns: dict[str, tuple[np.dtype, tuple]],
           spec: PackSpec) -> dict[str, np.ndarray]:
    """A chunk file's tensors, after its size and sha256 matched the index and its header the columns."""
    path = directory / chunk["file"]
    try:
        if path.stat().st_size != chunk["size"]:
            raise spec.error(f"{chunk['file']} is {path.stat().st_size} bytes, the index says {chunk['size']}")
        raw = path.read_bytes()
    except OSError as exc:
        raise spec.error(f"{chunk['file']}: cannot read ({exc.strerror or exc})") from None
    if hashlib.sha256(raw).hexdigest() != chunk["sha256"]:
        raise spec.error(f"{chunk['file']} does not match its sha256 in {PACK_INDEX} (altered)")
    tensors = parse_safetensors(raw, f"{spec.where} {chunk['file']}")
    if set(tensors) != set(columns):
        raise spec.error(f"{chunk['file']} holds {', '.join(sorted(tensors))}, not {', '.join(sorted(columns))}")
    for c, (dt, shape) in columns.items():
        if tensors[c].dtype != dt or tensors[c].shape != (chunk["rows"], *shape):
            raise spec.error(f"{chunk['file']}: {c} is {tensors[c].dtype} {tensors[c].shape}, the index says "
                             f"{dt} {(chunk['rows'], *shape)}")
    return tensors


def parse_safetensors(raw: bytes, where: str) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file's bytes (float32 and int64 only), header bounded, offsets exact."""
    if len(raw) < 8:
        raise IntegrityError(f"{where}: not a safetensors file (too short)")
    n = int.from_bytes(raw[:8], "little")
    if not 2 <= n <= min(MAX_HEADER_BYTES, len(raw) - 8):
        raise IntegrityError(f"{where}: safetensors header of {n} bytes")
    header = load_json(raw[8:8 + n], where, max_bytes=MAX_HEADER_BYTES, max_depth=4)
    if not isinstance(header, dict):
        raise IntegrityError(f"{where}: safetensors header is not an object")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, e in sorted(header.items(), key=lambda kv: _offset(kv[1])):
        ok = isinstance(e, dict) and set(e) == {"dtype", "shape", "data_offsets"} and e["dtype"] in _ST_DTYPES \
            and isinstance(e["shape"], list) and all(type(d) is int and 0 <= d <= MAX_INT for d in e["shape"])
        if not ok or _offset(e) != end:
            raise IntegrityError(f"{where}: bad header entry for {str(name)[:40]}")
        dt, count = _ST_DTYPES[e["dtype"]], math.prod(e["shape"])
        end = e["data_offsets"][1]
        if end - e["data_offsets"][0] != count * dt.itemsize or 8 + n + end > len(raw):
            raise IntegrityError(f"{where}: {str(name)[:40]} does not fit its offsets")
        out[name] = np.frombuffer(raw, dt, count, 8 + n + e["data_offsets"][0]).reshape(e["shape"])
    if 8 + n + end != len(raw):
        raise IntegrityError(f"{where}: {len(raw) - 8 - n - end} bytes after the last tensor")
    return out


def _offset(e: Any) -> int:
    """A header entry's start offset (-1 when malformed, so it is reported, never trusted)."""
    offsets = e.get("data_offsets") if isinstance(e, dict) else None
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int and 0 <= v <= MAX_INT for v in offsets)
    return offsets[0] if ok and offsets[0] <= offsets[1] else -1


def _check_values(t: dict[str, np.ndarray], want: PartSpec, start: int, stop: int, spec: PackSpec, file: str) -> None:
    if want.ids is not None and not np.array_equal(t["ids"], want.ids[start:stop]):
        raise spec.error(f"{file}: sample ids are not the plan's")
    if "y" in t and len(t["y"]) and (t["y"].min() < 0 or t["y"].max() >= spec.num_classes):
        raise spec.error(f"{file}: labels outside [0, {spec.num_classes})")
    for c in ("x", "features", "text"):
        if c in t and not np.isfinite(t[c]).all():
            raise spec.error(f"{file}: {c} holds NaN or infinite values")
    if spec.bounded and "x" in t and len(t["x"]) and (t["x"].min() < -1.0 or t["x"].max() > 1.0):
        raise spec.error(f"{file}: x values outside [-1, 1]")
