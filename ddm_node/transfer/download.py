"""Downloads of verified files (`fetch_file`) and whole artifacts (`fetch_artifact`) from many holders.

Nothing a peer sends is trusted: manifests are checked against their id, signature and the trusted
keys; files are written to a `.part` file, never past the size the manifest names, and renamed into
place only after their sha256 matches. Downloads resume at the `.part` file's length.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import zstandard

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.manifest import (
    MANIFEST,
    SIGNATURE,
    FileEntry,
    Manifest,
    _fsync_dir,
    commit_dir,
    fsync_write,
    hash_file,
    sha256_file,
    verify_artifact,
)
from ddm_node.transfer.client import DEFAULT_TIMEOUT, NodeClient, PeerError
from ddm_node.transfer.store import DEFAULT_MAX_MESSAGE, is_hex64

log = logging.getLogger(__name__)

Progress = Callable[[int], None]

MIN_RATE = 256 * 1024  # bytes/s: a stream's deadline is timeout + remaining / MIN_RATE
PROGRESS_RESET = 1 << 20  # an attempt that wrote this much (or finished) resets the failure count
# Status codes that retrying the same holder cannot fix: move on to the next holder at once.
_GIVE_UP = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                      grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED,
                      grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION})


class _Violation(Exception):
    """A holder broke the protocol (wrong offset, too many bytes, bad compression): drop it."""


class _HolderFailed(Exception):
    def __init__(self, reason: str, integrity: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.integrity = integrity


# ---------------------------------------------------------------- one file

def _decompress(data: bytes, limit: int) -> bytes:
    """One zstd frame, at most `limit` (>= 1) bytes out: a frame that claims or makes more is refused
    before its output is allocated (decompression bomb)."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit:
            raise _Violation(f"compressed chunk claims {declared} bytes, more than the {limit} allowed")
        # With no size in the header, max_output_size caps the buffer; with one, it is <= limit.
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise _Violation(f"bad or oversized zstd chunk ({exc})") from None
    if len(out) > limit:
        raise _Violation(f"compressed chunk expands past the {limit} bytes allowed")
    return out


class _PartHash:
    """sha256 of a .part file, updated as chunks are appended: the final check needs no read-back pass.

    `sync` re-reads the file only when its size is not the one tracked (a resumed, truncated or
    deleted .part); concurrent downloads to one file are unsupported anyway (see fetch_file)."""

    def __init__(self, part: Path):
        self.part = part
        self.size = -1
        self.h = hashlib.sha256()

    def sync(self) -> None:
        if _part_size(self.part) != self.size:
            self.h, self.size = hash_file(self.part) if self.part.exists() else (hashlib.sha256(), 0)

    def update(self, data: bytes) -> None:
        self.h.update(data)
        self.size += len(data)

    def result(self) -> FileEntry:
        self.sync()
        return FileEntry(self.h.hexdigest(), self.size)


def _receive(chunks: Iterator, entry: FileEntry, f, start: int, compress: bool, max_chunk: int,
             progress: Progress | None, hasher: _PartHash | None = None) -> None:
    """Append a Fetch stream to `f` (positioned at `start`), refusing anything off-protocol before it is written."""
    pos = start
    first = True
    for chunk in chunks:
        if chunk.total_size != entry.size:
            raise _Violation(f"holder says the file has {chunk.total_size} bytes, the manifest says {entry.size}")
        if chunk.offset != pos:
            raise _Violation(f"chunk at offset {chunk.offset}, expected {pos}")
        remaining = entry.size - pos
        if remaining == 0:
            # Only one empty chunk is allowed at the end (the server's answer to offset == size).
            if chunk.data or not first:
                raise _Violation(f"stream goes past the end of the file ({entry.size} bytes)")
            first = False
            continue
        if chunk.compressed:
            if not compress:
                raise _Violation("compressed chunk that was not asked for")
            data = _decompress(chunk.data, min(remaining, max_chunk)) if chunk.data else b""
        else:
            data = chunk.data
        if not data:
            raise _Violation("empty chunk before the end of the file")
        if len(data) > remaining:
            raise _Violation(f"stream exceeds the file size ({entry.size} bytes)")
        f.write(data)
        if hasher is not None:
            hasher.update(data)
        pos += len(data)
        first = False
        if progress is not None:
            progress(len(data))


def _part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def _truncate(part: Path, size: int) -> None:
    if size == 0:
        part.unlink(missing_ok=True)
    elif _part_size(part) > size:
        os.truncate(part, size)


def _stream_once(client: NodeClient, entry: FileEntry, part: Path, compress: bool, progress: Progress | None,
                 hasher: _PartHash | None = None) -> None:
    """One Fetch call from the .part file's length; raises PeerError or _Violation."""
    if hasher is not None:
        hasher.sync()
    start = _part_size(part)
    deadline = client.timeout + (entry.size - start) / MIN_RATE
    stream = client.fetch_stream(entry.sha256, start, compress, deadline)
    try:
        with open(part, "ab") as f:
            if f.tell() != start:
                raise DDMError(f"{part}: changed while downloading (another download of the same file?)")
            _receive(stream, entry, f, start, compress, client.max_message, progress, hasher)
    except grpc.RpcError as exc:
        raise client.peer_error(f"Fetch {entry.sha256[:16]}", exc) from None
    except OSError as exc:
        raise DDMError(f"cannot write {part}: {exc.strerror or exc}") from None
    finally:
        stream.cancel()  # stop the server's stream when we stop reading (no-op when it ended)


def _from_holder(holder: str, entry: FileEntry, part: Path, progress: Progress | None, compress: bool,
                 retries: int, backoff: float, timeout: float, max_message: int) -> None:
    """Fill `part` with the verified file from one holder, or raise _HolderFailed."""
    try:
        client = NodeClient(holder, timeout, max_message)
    except DDMError as exc:
        raise _HolderFailed(str(exc)) from None
    # Bytes before `own_from` came from elsewhere (another holder, an earlier run); when the hash fails
    # they may be the bad ones, so this holder gets one more try from byte 0 before it is blamed.
    own_from = _part_size(part)
    fresh_try_used = False
    failures = 0
    hasher = _PartHash(part)
    with client:
        while True:
            have = _part_size(part)
            if have < entry.size:
                try:
                    _stream_once(client, entry, part, compress, progress, hasher)
                    problem = None
                    if _part_size(part) < entry.size:
                        problem = f"stream ended at byte {_part_size(part)} of {entry.size}"
                except _Violation as exc:
                    _truncate(part, own_from)  # what this holder wrote is suspect
                    raise _HolderFailed(str(exc), integrity=True) from None
                except PeerError as exc:
                    if exc.code in _GIVE_UP:
                        raise _HolderFailed(str(exc)) from None
                    problem = str(exc)
                if problem is not None:
                    now = _part_size(part)
                    failures = 0 if now - have >= min(PROGRESS_RESET, entry.size - have) else failures + 1
                    if failures > retries:
                        raise _HolderFailed(f"{problem} (gave up after {retries} retries)")
                    log.info("fetch %s from %s: %s; retrying at byte %d", entry.sha256[:16], holder, problem, now)
                    if failures:
                        time.sleep(backoff * 2 ** (failures - 1))
                    continue
            got = hasher.result()
            if got.size == entry.size and got.sha256 == entry.sha256:
                return
            part.unlink(missing_ok=True)
            if own_from > 0 and not fresh_try_used:
                log.warning("fetch %s: sha256 mismatch on a resumed file; restarting from %s at byte 0",
                            entry.sha256[:16], holder)
                fresh_try_used, own_from = True, 0
                continue
            raise _HolderFailed(f"sha256 mismatch (got {got.sha256[:16]}, {got.size} bytes)", integrity=True)


def _part_complete(part: Path, entry: FileEntry) -> bool:
    """A leftover .part that is already the whole, correct file; a too-long or wrong one is deleted."""
    size = _part_size(part)
    if size < entry.size or not part.exists():
        return False
    if size == entry.size:
        got = sha256_file(part)
        if got.sha256 == entry.sha256:
            return True
    part.unlink()
    return False


def _finish(part: Path, dest: Path) -> Path:
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    return dest


def fetch_file(holders: list[str], entry: FileEntry, dest: str | Path, progress: Progress | None = None,
               compress: bool = False, retries: int = 3, backoff: float = 0.2, timeout: float = DEFAULT_TIMEOUT,
               max_message: int = DEFAULT_MAX_MESSAGE) -> Path:
    """Download the file `entry` (sha256 + size) from the first holder that serves it intact.

    Bytes go to `dest` + ".part" (resumed at its length); each holder gets `retries` retries with
    exponential backoff (`backoff`, 2x, 4x ...; an attempt that made progress does not count), and is
    dropped at once for a protocol violation or a final sha256 mismatch. `progress(n)` is called with
    the number of new bytes written. The verified file is fsynced and renamed to `dest`.
    Raises IntegrityError (a holder sent bad data) or DDMError naming the sha and every holder tried.
    Two concurrent downloads to the same `dest` are not supported.
    """
    if not is_hex64(entry.sha256) or not isinstance(entry.size, int) or entry.size < 0:
        raise DDMError(f"bad file entry {entry!r}")
    if isinstance(holders, str):
        raise DDMError("holders must be a list of host:port addresses, not one string")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if _part_complete(part, entry):
        return _finish(part, dest)
    order = list(dict.fromkeys(holders))
    if entry.size == 0:
        part.touch()  # nothing to download; the hash check below still applies
        if sha256_file(part).sha256 == entry.sha256:
            return _finish(part, dest)
        part.unlink()
        raise IntegrityError(f"file {entry.sha256} has size 0 but is not the empty file's hash")
    reasons: list[str] = []
    integrity = False
    for holder in order:
        try:
            _from_holder(holder, entry, part, progress, compress, retries, backoff, timeout, max_message)
            return _finish(part, dest)
        except _HolderFailed as exc:
            log.warning("fetch %s from %s failed: %s", entry.sha256[:16], holder, exc.reason)
            reasons.append(f"{holder}: {exc.reason}")
            integrity = integrity or exc.integrity
    error = IntegrityError if integrity else DDMError
    tried = "; ".join(reasons) if reasons else "no holders given"
    raise error(f"cannot fetch file {entry.sha256} ({entry.size} bytes): {tried}")


# ---------------------------------------------------------------- whole artifacts

def _first_manifest(holders: list[str], manifest_id: str, trusted_keys: Iterable[str] | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> tuple[Manifest, bytes, bytes, str, list[str]]:
    """The manifest from the first holder that gives a verified one.

    Returns (manifest, raw, signature, holder that gave it, holders that sent a bad one).
    """
    if not is_hex64(manifest_id):
        raise DDMError(f"bad manifest id {manifest_id!r} (want 64 lowercase hex chars)")
    reasons: list[str] = []
    bad: list[str] = []
    for holder in dict.fromkeys(holders):
        try:
            with NodeClient(holder, timeout) as client:
                manifest, raw, signature = client.get_manifest(manifest_id, trusted_keys)
            return manifest, raw, signature, holder, bad
        except IntegrityError as exc:
            bad.append(holder)
            reasons.append(str(exc))
        except DDMError as exc:
            reasons.append(str(exc))
        log.warning("manifest %s: %s", manifest_id[:16], reasons[-1])
    error = IntegrityError if bad else DDMError
    raise error(f"no verified manifest {manifest_id}: " + ("; ".join(reasons) if reasons else "no holders given"))


def download_dir(dest_dir: Path, manifest_id: str) -> Path:
    """Where an artifact's files collect before commit; fixed per manifest so a new call resumes."""
    return dest_dir.parent / f".{dest_dir.name}.dl-{manifest_id[:16]}"


def fetch_artifact(holders: list[str], manifest_id: str, dest_dir: str | Path,
                   trusted_keys: Iterable[str] | None = None, files: Iterable[str] | None = None,
                   progress: Progress | None = None, compress: bool = False, retries: int = 3, backoff: float = 0.2,
                   timeout: float = DEFAULT_TIMEOUT) -> Manifest:
    """Download a signed artifact into `dest_dir` (replacing an older copy) and return its manifest.

    The manifest comes from the first holder that gives a verified one; files (all, or the subset
    `files`) from any holder, by sha256. Everything collects in a hidden download directory beside
    `dest_dir` (kept on failure, so the next call resumes), is verified with `verify_artifact`,
    then renamed into place: a half download never appears at `dest_dir`.
    """
    if isinstance(holders, str) or isinstance(files, str):
        raise DDMError("holders and files must be lists, not a single string")
    dest_dir = Path(dest_dir)
    manifest, raw, signature, source, bad = _first_manifest(holders, manifest_id, trusted_keys, timeout)
    names = sorted(manifest.files) if files is None else sorted(set(files))
    unknown = [n for n in names if n not in manifest.files]
    if unknown:
        raise DDMError(f"manifest {manifest_id[:16]} does not list {', '.join(unknown)}")
    # The holder that just answered goes first; holders that sent a bad manifest are not asked for files.
    file_holders = [source] + [h for h in dict.fromkeys(holders) if h != source and h not in bad]
    work = download_dir(dest_dir, manifest_id)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DDMError(f"another download of {manifest_id[:16]} into {dest_dir} is running") from None
        incoming = work / ".incoming"  # .part files named by sha256: no clash with any artifact file name
        for name in names:
            entry = manifest.files[name]
            target = work / name
            if target.is_file() and sha256_file(target) == entry:
                continue  # finished by an earlier call
            got = fetch_file(file_holders, entry, incoming / entry.sha256, progress, compress, retries, backoff,
                             timeout)
            os.replace(got, target)
        keep = set(names) | {MANIFEST, SIGNATURE, ".lock"}
        for item in work.iterdir():
            if item.name not in keep:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        fsync_write(work / MANIFEST, raw)
        fsync_write(work / SIGNATURE, signature)
        try:
            verify_artifact(work, require_signature=True, trusted_keys=trusted_keys, files=names)
        except IntegrityError:
            shutil.rmtree(work, ignore_errors=True)
            raise
        (work / ".lock").unlink()
        _fsync_dir(work)  # the renames into `work` must be durable before it becomes dest_dir
        commit_dir(work, dest_dir)
    log.info("fetched artifact %s (%d files) into %s", manifest_id[:16], len(names), dest_dir)
    return manifest
