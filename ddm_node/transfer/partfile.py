"""A download's `.part` file: appended to by a writer thread that hashes as it writes, resumed at its length,
fsynced and renamed into place only when whole and verified.

The receive thread (gRPC) only parses and checks chunks; `PartWriter` takes the checked bytes through a queue
bounded in bytes (the stream waits when the disk is slower), appends them and feeds the running sha256
(`PartHash`: the final check needs no read-back pass). Every `FLUSH_EVERY` bytes a flusher thread runs
`fdatasync` beside the transfer, so the fsync at the end (`finish`) has little left to flush. Why not a
write-back hint (sync_file_range) instead: on this machine's virtual disk a flush costs about 1 ms per MiB
written since the last one even when the pages are already written back (a 128 MiB file: 0.13 s after a
waited sync_file_range of the whole file), so a single fsync at the end added 0.05-0.2 s to every 128 MiB
download and held a 1 Gbit/s link at 0.82-0.91 of its rate; flushed on the way, the end's fsync takes 1-7 ms
(docs/TRANSFER.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ddm_node.core.manifest import FileEntry, _fsync_dir, hash_file, sha256_file

log = logging.getLogger(__name__)

QUEUE_BYTES = 16 << 20  # received bytes waiting for the writer, at most (one chunk more if a chunk is bigger)
FLUSH_EVERY = 8 << 20  # start a background fdatasync after this many new bytes (one in flight at a time)


class Flusher:
    """fdatasync of one open file on a thread of its own, at most one at a time: `kick` starts one unless one
    runs; `wait` waits for the running one and raises its error (an fsync error is reported once: kept here)."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd, self._name = fd, name
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def kick(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._error = self._error or exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error


def part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def truncate(part: Path, size: int) -> None:
    """Cut a .part file back to `size` bytes (deleting it at 0)."""
    if size == 0:
        part.unlink(missing_ok=True)
    elif part_size(part) > size:
        os.truncate(part, size)


class PartHash:
    """sha256 of a .part file, updated as chunks are appended: the final check needs no read-back pass.

    `sync` re-reads the file only when its size is not the one tracked (a resumed, truncated or
    deleted .part); concurrent downloads to one file are unsupported anyway (see fetch_file)."""

    def __init__(self, part: Path):
        self.part = part
        self.size = -1
        self.h = hashlib.sha256()

    def sync(self) -> None:
        if part_size(self.part) != self.size:
            self.h, self.size = hash_file(self.part) if self.part.exists() else (hashlib.sha256(), 0)

    def update(self, data: bytes | memoryview) -> None:
        self.h.update(data)
        self.size += len(data)

    def result(self) -> FileEntry:
        self.sync()
        return FileEntry(self.h.hexdigest(), self.size)


class PartWriter:
    """Appends bytes to an open .part file and its `PartHash` on its own thread.

    `put` queues checked bytes (waiting while `limit` bytes are queued); `close` writes what is queued and
    re-raises the first write error. After an error nothing more is written, and `put` raises it.
    `written(n)` is called on the writer's thread after each append (bytes on disk, not in flight).
    """

    def __init__(self, f, hasher: PartHash, written: Callable[[int], None] | None, limit: int = QUEUE_BYTES,
                 name: str = "ddm-part-writer") -> None:
        self._f, self._hasher, self._written, self._limit = f, hasher, written, limit
        self._queue: deque[bytes | memoryview | None] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._flushed = self._pos = f.tell()
        self._flusher = Flusher(f.fileno(), name + "-flush")
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def put(self, data: bytes | memoryview) -> None:
        with self._cond:
            while self._queued >= self._limit and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._queue.append(data)
            self._queued += len(data)
            self._cond.notify_all()

    def close(self) -> None:
        """Write everything queued, stop the thread and wait for a running flush; raise the write or flush error
        if there was one."""
        with self._cond:
            self._queue.append(None)
            self._cond.notify_all()
        self._thread.join()
        try:
            self._flusher.wait()  # before any raise: the caller closes the file next
        finally:
            if self._error is not None:
                raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                data = self._queue.popleft()
            if data is None:
                return
            if self._error is None:
                try:
                    self._append(data)
                except BaseException as exc:  # handed to the receive thread by put / close
                    self._error = exc
            with self._cond:
                self._queued -= len(data)
                self._cond.notify_all()

    def _append(self, data: bytes) -> None:
        self._f.write(data)
        self._hasher.update(data)
        self._pos += len(data)
        if self._pos - self._flushed >= FLUSH_EVERY:
            self._f.flush()  # into the kernel, then to disk beside the transfer
            self._flusher.kick()
            self._flushed = self._pos
        if self._written is not None:
            self._written(len(data))


def copy_prefix(src: Path, dst: Path, check: Callable[[], None]) -> None:
    """Start a racing lane's part file as a copy of the bytes the base .part holds now (any prefix will do:
    the bytes are checked by the final sha256, and the lane's holder gets a fresh try if they are bad).
    `check` raises to stop the copy."""
    with open(dst, "wb") as out:
        try:
            f = open(src, "rb")
        except FileNotFoundError:
            return
        with f:
            while block := f.read(1 << 20):
                check()
                out.write(block)


def part_complete(part: Path, entry: FileEntry) -> bool:
    """A leftover .part that is already the whole, correct file; a too-long or wrong one is deleted."""
    size = part_size(part)
    if size < entry.size or not part.exists():
        return False
    if size == entry.size:
        got = sha256_file(part)
        if got.sha256 == entry.sha256:
            return True
    part.unlink()
    return False


def finish(part: Path, dest: Path) -> Path:
    """The one fsync of a verified file, then its rename into place (and the directory's fsync)."""
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    return dest


def racer_part(dest: Path, n: int) -> Path:
    return dest.with_name(f"{dest.name}.{n}.part")
