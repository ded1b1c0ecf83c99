"""One holder's side of a download: streaming a file into a `.part` file, checked chunk by chunk, with
resume at its length; the lanes `download.fetch_file` races."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import zstandard

from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import FileEntry
from ddm_node.transfer.budget import Clock
from ddm_node.transfer.client import NodeClient, PeerError
from ddm_node.transfer.partfile import PartHash, PartWriter, part_size, truncate
from ddm_node.transfer.wire import WIDTHS, Chunk, ChunkError, decode_chunk, unshuffle

log = logging.getLogger(__name__)

Progress = Callable[[int], None]

MIN_RATE = 256 * 1024  # bytes/s: one stream's deadline is timeout + remaining / MIN_RATE (a backstop; see Budget)
PROGRESS_RESET = 1 << 20  # an attempt that wrote this much (or finished) resets the failure count
# Status codes that retrying the same holder cannot fix: move on to the next holder at once.
_GIVE_UP = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                      grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED,
                      grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION})


class _Violation(Exception):
    """A holder broke the protocol (wrong offset, too many bytes, bad compression): drop it."""


class HolderFailed(Exception):
    def __init__(self, reason: str, integrity: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.integrity = integrity


class Stopped(Exception):
    """The download stopped this holder's lane: over budget ("slow"), paused ("pause") or no longer needed ("done")."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Lane:
    """One holder streaming one file into its own part file, on its own thread; `stop` works from any thread."""

    def __init__(self, holder: str, part: Path, copy_from: Path | None, clock: Clock, now: float) -> None:
        self.holder = holder
        self.part = part
        self.copy_from = copy_from  # a racing lane starts from a copy of the base .part
        self.clock = clock
        self.started = now
        self.last_data = now  # the lane's last sign of life: its start, then every chunk written
        self.received = 0
        self.outcome: object = None  # True (the file is whole and verified), HolderFailed, Stopped or an error
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self, kind: str, reason: str) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self.stop_kind, self.stop_reason = kind, reason
            self._stop.set()
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def check(self) -> None:
        if self._stop.is_set():
            raise Stopped(self.stop_kind, self.stop_reason)

    def sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)
        self.check()

    def attach(self, stream) -> None:
        with self._lock:
            self._stream = stream
            stopped = self._stop.is_set()
        if stopped:
            stream.cancel()

    def detach(self) -> None:
        with self._lock:
            self._stream = None


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


def _unpack(chunk: Chunk, compress: bool, limit: int) -> bytes | memoryview:
    """A chunk's file bytes: decompressed (at most `limit`) and unshuffled when the holder packed them."""
    if chunk.shuffle and not (chunk.compressed and chunk.shuffle in WIDTHS):
        raise _Violation(f"chunk shuffled by {chunk.shuffle} bytes (only compressed chunks, by {WIDTHS})")
    if not chunk.compressed:
        return chunk.data
    if not compress:
        raise _Violation("compressed chunk that was not asked for")
    data = _decompress(chunk.data, limit) if chunk.data else b""
    return unshuffle(data, chunk.shuffle) if chunk.shuffle else data


def _receive(chunks: Iterator[bytes], entry: FileEntry, start: int, compress: bool, max_chunk: int,
             put: Callable[[bytes | memoryview], None]) -> None:
    """Hand a Fetch stream (serialized chunks) from byte `start` on to `put`, refusing anything off-protocol before it
    is handed on."""
    pos = start
    first = True
    for message in chunks:
        try:
            chunk = decode_chunk(message)
        except ChunkError as exc:
            raise _Violation(f"malformed chunk ({exc})") from None
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
        data = _unpack(chunk, compress, min(remaining, max_chunk))
        if not data:
            raise _Violation("empty chunk before the end of the file")
        if len(data) > remaining:
            raise _Violation(f"stream exceeds the file size ({entry.size} bytes)")
        put(data)
        pos += len(data)
        first = False


def _stream_once(client: NodeClient, entry: FileEntry, part: Path, compress: bool, progress: Progress | None,
                 hasher: PartHash, lane: Lane) -> None:
    """One Fetch call from the .part file's length; raises PeerError or _Violation. The chunks are checked here and
    written and hashed by a `PartWriter` thread; every byte checked is on disk when this returns or raises."""
    hasher.sync()
    start = part_size(part)
    deadline = client.timeout + (entry.size - start) / MIN_RATE
    stream = client.fetch_stream(entry.sha256, start, compress, deadline)
    lane.attach(stream)  # from here on, stopping the lane cancels the call
    try:
        with open(part, "ab") as f:
            if f.tell() != start:
                raise DDMError(f"{part}: changed while downloading (another download of the same file?)")
            writer = PartWriter(f, hasher, progress, name=f"ddm-write-{entry.sha256[:8]}")
            try:
                _receive(stream, entry, start, compress, client.max_message, writer.put)
            finally:
                writer.close()  # raises a write error (disk full ...) in place of the receive's outcome
    except grpc.RpcError as exc:
        raise client.peer_error(f"Fetch {entry.sha256[:16]}", exc) from None
    except OSError as exc:
        raise DDMError(f"cannot write {part}: {exc.strerror or exc}") from None
    finally:
        stream.cancel()  # stop the server's stream when we stop reading (no-op when it ended)
        lane.detach()


def from_holder(holder: str, entry: FileEntry, part: Path, progress: Progress | None, compress: bool,
                 retries: int, backoff: float, timeout: float, max_message: int, lane: Lane) -> None:
    """Fill `part` with the verified file from one holder; raises HolderFailed, or Stopped once the lane stops."""
    try:
        client = NodeClient(holder, timeout, max_message)
    except DDMError as exc:
        raise HolderFailed(str(exc)) from None
    # Bytes before `own_from` came from elsewhere (another holder, an earlier run); when the hash fails
    # they may be the bad ones, so this holder gets one more try from byte 0 before it is blamed.
    own_from = part_size(part)
    fresh_try_used = False
    failures = 0
    hasher = PartHash(part)
    with client:
        while True:
            lane.check()
            have = part_size(part)
            if have < entry.size:
                try:
                    _stream_once(client, entry, part, compress, progress, hasher, lane)
                    problem = None
                    if part_size(part) < entry.size:
                        problem = f"stream ended at byte {part_size(part)} of {entry.size}"
                except _Violation as exc:
                    truncate(part, own_from)  # what this holder wrote is suspect
                    raise HolderFailed(str(exc), integrity=True) from None
                except PeerError as exc:
                    lane.check()  # a call we cancelled ourselves is not the holder's failure
                    if exc.code in _GIVE_UP:
                        raise HolderFailed(str(exc)) from None
                    problem = str(exc)
                if problem is not None:
                    now = part_size(part)
                    failures = 0 if now - have >= min(PROGRESS_RESET, entry.size - have) else failures + 1
                    if failures > retries:
                        raise HolderFailed(f"{problem} (gave up after {retries} retries)")
                    log.info("fetch %s from %s: %s; retrying at byte %d", entry.sha256[:16], holder, problem, now)
                    if failures:
                        lane.sleep(backoff * 2 ** (failures - 1))
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
            raise HolderFailed(f"sha256 mismatch (got {got.sha256[:16]}, {got.size} bytes)", integrity=True)
