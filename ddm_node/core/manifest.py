"""Artifacts: a directory of files described by a signed manifest.

An artifact directory holds its files, `manifest.json` (canonical JSON: kind, run id, shard, step,
config hash, sha256 and size of every file, publisher key) and `manifest.sig` (Ed25519 signature of
the manifest bytes). Directories are written under a temporary name and renamed into place, so a
crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddm_node.core.config import canonical_json
from ddm_node.core.errors import IntegrityError
from ddm_node.core.identity import PUBLIC_HEX_LEN, Identity, verify_signature
from ddm_node.core.jsonsafe import loads as load_json

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
KINDS = ("expert", "state", "stats", "router", "plan", "pack")  # pack: a data pack (data/pack.py)
MAX_MANIFEST_BYTES = 64 * 1024
MAX_MANIFEST_DEPTH = 8  # a manifest nests 3 levels (files -> entry); `extra` is small flat metadata
MAX_SHARD = 2**31 - 1
MAX_INT = 2**62  # steps and file sizes: far beyond any real one, still exact in every integer type we pass them to
MAX_CREATED = 1e11  # seconds since 1970 (year 5138)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class MalformedManifest(IntegrityError):
    """Manifest bytes that do not parse into a valid manifest: whoever serves bytes with that id serves these."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    """What an artifact holds and who vouches for it. `id` is the sha256 of its canonical bytes."""

    kind: str
    run_id: str
    shard: int  # -1 for artifacts that belong to no shard (router)
    step: int
    config_hash: str
    files: dict[str, FileEntry]
    publisher: str = ""  # hex Ed25519 public key; empty when unsigned
    created: float = 0.0
    extra: dict = field(default_factory=dict)  # small JSON metadata (loss, data position, ...)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        return canonical_json(data)

    @property
    def id(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "manifest") -> Manifest:
        """Parse and validate untrusted manifest bytes; any defect is a one-line IntegrityError."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise MalformedManifest(f"{source}: manifest too large ({len(raw)} bytes)")
        data = load_json(raw, source, max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_MANIFEST_DEPTH,
                         error=MalformedManifest)
        if not isinstance(data, dict):
            raise MalformedManifest(f"{source}: manifest must be a JSON object")
        try:
            files = {}
            for name, e in dict(data.pop("files")).items():
                if not isinstance(e.get("size"), int) or isinstance(e.get("size"), bool):
                    raise ValueError(f"size of {str(name)[:40]!r} is not an integer")
                files[str(name)] = FileEntry(sha256=str(e["sha256"]), size=e["size"])
            m = cls(files=files, **data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedManifest(f"{source}: malformed manifest ({str(exc)[:200]})") from None
        try:
            m.check(source)
        except IntegrityError as exc:
            raise MalformedManifest(str(exc)) from None
        return m

    def check(self, source: str = "manifest") -> None:
        """Field types and ranges; file names must be plain names (never paths)."""
        problems = [
            (self.kind in KINDS, f"unknown kind {self.kind!r}"),
            (isinstance(self.run_id, str) and bool(_HEX64.match(self.run_id)), "run_id must be 64 hex chars"),
            (_int_in(self.shard, -1, MAX_SHARD), "bad shard"),
            (_int_in(self.step, 0, MAX_INT), "bad step"),
            (isinstance(self.config_hash, str) and len(self.config_hash) <= 128, "bad config_hash"),
            (self.publisher == "" or (isinstance(self.publisher, str) and len(self.publisher) == PUBLIC_HEX_LEN
                                      and bool(_HEX64.match(self.publisher))), "bad publisher key"),
            (isinstance(self.extra, dict), "extra must be a mapping"),
            (isinstance(self.created, (int, float)) and not isinstance(self.created, bool)
             and 0 <= self.created <= MAX_CREATED, "bad created time"),  # NaN and inf fail the comparison
        ]
        for ok, what in problems:
            if not ok:
                raise IntegrityError(f"{source}: {what}")
        for name, entry in self.files.items():
            if not _NAME_RE.match(name) or name in (MANIFEST, SIGNATURE):
                raise IntegrityError(f"{source}: illegal file name {name!r}")
            if not _HEX64.match(entry.sha256) or not _int_in(entry.size, 0, MAX_INT):
                raise IntegrityError(f"{source}: bad hash or size for {name}")


def _int_in(value: object, low: int, high: int) -> bool:
    """An int (not a bool) within [low, high]: numbers from peers are checked before anything uses them."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def hash_file(path: str | Path) -> tuple[hashlib._Hash, int]:
    """A sha256 object fed with the whole file (read in 1 MiB blocks) and the file's size; more bytes can follow."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return h, size


def sha256_file(path: str | Path) -> FileEntry:
    """sha256 and size of a file."""
    h, size = hash_file(path)
    return FileEntry(h.hexdigest(), size)


def fsync_write(path: str | Path, data: bytes) -> None:
    """Write bytes and fsync them (the caller renames the enclosing directory or file into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | Path, data: bytes | Iterable[bytes]) -> None:
    """Replace `path` with `data` (bytes, or chunks of bytes for large files) atomically: temp file in the same
    directory, fsync, rename. An exception while chunks are produced leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(final: str | Path) -> Path:
    """A fresh temporary directory beside `final`, to be filled and then passed to `commit_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def commit_dir(staging: Path, final: str | Path) -> Path:
    """Rename a filled staging directory to `final` (replacing an older copy), fsyncing the parent."""
    final = Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)
    _fsync_dir(final.parent)
    return final


def seal(directory: str | Path, manifest: Manifest, identity: Identity | None = None) -> Manifest:
    """Hash every file named in `manifest.files` inside `directory`, sign, write manifest.json/.sig.

    The files must already be written (and fsynced) in `directory`; this fills in their hashes.
    """
    directory = Path(directory)
    manifest.files = {name: sha256_file(directory / name) for name in sorted(manifest.files)}
    manifest.created = manifest.created or time.time()
    if identity is not None:
        manifest.publisher = identity.public_hex
    manifest.check()
    raw = manifest.to_bytes()
    fsync_write(directory / MANIFEST, raw)
    if identity is not None:
        fsync_write(directory / SIGNATURE, identity.sign(raw))
    return manifest


def check_signature(manifest: Manifest, raw: bytes, signature: bytes | None, trusted_keys: Iterable[str] | None,
                    source: str) -> None:
    """Raise IntegrityError unless the manifest is signed by its publisher (and trusted, when a list is given)."""
    if not manifest.publisher or signature is None:
        raise IntegrityError(f"{source}: manifest is not signed")
    if not verify_signature(manifest.publisher, raw, signature):
        raise IntegrityError(f"{source}: bad signature for publisher {manifest.publisher[:16]}")
    trusted = set(trusted_keys or ())
    if trusted and manifest.publisher not in trusted:
        raise IntegrityError(f"{source}: publisher {manifest.publisher[:16]} is not in trusted_keys")


def read_manifest(directory: str | Path) -> Manifest:
    """Parse an artifact's manifest without checking files or signature."""
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return Manifest.from_bytes(raw, str(path))


def verify_artifact(directory: str | Path, *, require_signature: bool = True,
                    trusted_keys: Iterable[str] | None = None, files: Iterable[str] | None = None) -> Manifest:
    """Check an artifact directory: manifest, signature, then size and sha256 of every file.

    `files` limits the byte check to those names (all of them by default). Raises IntegrityError
    naming the first bad file.
    """
    directory = Path(directory)
    raw_path = directory / MANIFEST
    _not_a_link(raw_path)
    try:
        raw = raw_path.read_bytes()
    except OSError as exc:
        raise IntegrityError(f"{raw_path}: cannot read ({exc.strerror or exc})") from None
    manifest = Manifest.from_bytes(raw, str(raw_path))
    if require_signature:
        sig_path = directory / SIGNATURE
        _not_a_link(sig_path)
        signature = sig_path.read_bytes() if sig_path.exists() else None
        check_signature(manifest, raw, signature, trusted_keys, str(raw_path))
    for name in sorted(files if files is not None else manifest.files):
        if name not in manifest.files:
            raise IntegrityError(f"{directory / name}: not listed in the manifest")
        path = directory / name
        _not_a_link(path)
        if not path.is_file():
            raise IntegrityError(f"{path}: missing")
        got = sha256_file(path)
        want = manifest.files[name]
        if got.size != want.size:
            raise IntegrityError(f"{path}: size {got.size} != {want.size} in the manifest (truncated or altered)")
        if got.sha256 != want.sha256:
            raise IntegrityError(f"{path}: sha256 does not match the manifest (altered)")
    return manifest


def _not_a_link(path: Path) -> None:
    """Artifacts hold plain files only: a symlink (which could point anywhere) is never read through."""
    if path.is_symlink():
        raise IntegrityError(f"{path}: a symlink, not a file of the artifact")


def copy_artifact(src: str | Path, dst: str | Path) -> Path:
    """Copy an artifact directory atomically (staging directory, then rename)."""
    stage = staging_dir(dst)
    try:
        for item in Path(src).iterdir():
            if item.is_file():
                shutil.copyfile(item, stage / item.name)
        return commit_dir(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

