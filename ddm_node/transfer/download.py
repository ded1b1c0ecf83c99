"""Downloads of verified files (`fetch_file`) and whole artifacts (`fetch_artifact`) from many holders.

Nothing a peer sends is trusted: manifests are checked against their id, signature and the trusted
keys; files are written to a `.part` file, never past the size the manifest names, and renamed into
place only after their sha256 matches. Downloads resume at the `.part` file's length.

No holder can hold a download: each has a budget per file (`budget.Budget`: first bytes within a
connect timeout, then a minimum average rate over all its attempts, and a total time); one over budget
is dropped and remembered as slow (`budget.SLOW`). When no running holder has delivered anything for a
connect timeout, the other holders are raced, each into its own part file that starts as a copy of
the `.part` so far; the first whole, verified file wins. Manifests are raced the same way.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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
from ddm_node.transfer.budget import SLOW, Budget, Clock
from ddm_node.transfer.client import DEFAULT_TIMEOUT, NodeClient, PeerError
from ddm_node.transfer.store import DEFAULT_MAX_MESSAGE, is_hex64, parse_signed_manifest

log = logging.getLogger(__name__)

Progress = Callable[[int], None]

MIN_RATE = 256 * 1024  # bytes/s: one stream's deadline is timeout + remaining / MIN_RATE (a backstop; see Budget)
TICK = 0.1  # seconds between two looks at a download's holders (budgets, racing), at most
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


class _Stopped(Exception):
    """The download stopped this holder's lane: over budget ("slow"), paused ("pause") or no longer needed ("done")."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _Lane:
    """One holder streaming one file into its own part file, on its own thread; `stop` works from any thread."""

    def __init__(self, holder: str, part: Path, copy_from: Path | None, clock: Clock, now: float) -> None:
        self.holder = holder
        self.part = part
        self.copy_from = copy_from  # a racing lane starts from a copy of the base .part
        self.clock = clock
        self.started = now
        self.last_data = now  # the lane's last sign of life: its start, then every chunk written
        self.received = 0
        self.outcome: object = None  # True (the file is whole and verified), _HolderFailed, _Stopped or an error
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
            raise _Stopped(self.stop_kind, self.stop_reason)

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
                 hasher: _PartHash, lane: _Lane) -> None:
    """One Fetch call from the .part file's length; raises PeerError or _Violation."""
    hasher.sync()
    start = _part_size(part)
    deadline = client.timeout + (entry.size - start) / MIN_RATE
    stream = client.fetch_stream(entry.sha256, start, compress, deadline)
    lane.attach(stream)  # from here on, stopping the lane cancels the call
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
        lane.detach()


def _from_holder(holder: str, entry: FileEntry, part: Path, progress: Progress | None, compress: bool,
                 retries: int, backoff: float, timeout: float, max_message: int, lane: _Lane) -> None:
    """Fill `part` with the verified file from one holder; raises _HolderFailed, or _Stopped once the lane stops."""
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
            lane.check()
            have = _part_size(part)
            if have < entry.size:
                try:
                    _stream_once(client, entry, part, compress, progress, hasher, lane)
                    problem = None
                    if _part_size(part) < entry.size:
                        problem = f"stream ended at byte {_part_size(part)} of {entry.size}"
                except _Violation as exc:
                    _truncate(part, own_from)  # what this holder wrote is suspect
                    raise _HolderFailed(str(exc), integrity=True) from None
                except PeerError as exc:
                    lane.check()  # a call we cancelled ourselves is not the holder's failure
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
            raise _HolderFailed(f"sha256 mismatch (got {got.sha256[:16]}, {got.size} bytes)", integrity=True)


def _copy_prefix(src: Path, dst: Path, lane: _Lane) -> None:
    """Start a racing lane's part file as a copy of the bytes the base .part holds now (any prefix will do:
    the bytes are checked by the final sha256, and the lane's holder gets a fresh try if they are bad)."""
    with open(dst, "wb") as out:
        try:
            f = open(src, "rb")
        except FileNotFoundError:
            return
        with f:
            while block := f.read(1 << 20):
                lane.check()
                out.write(block)


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


def _racer_part(dest: Path, n: int) -> Path:
    return dest.with_name(f"{dest.name}.{n}.part")


class _FileRace:
    """One file from many holders within their budgets (see `fetch_file`).

    Lanes run on their own threads; this loop (the caller's thread) looks at them every TICK seconds:
    it drops holders over budget, pauses lanes beyond `budget.keep` once several deliver, and starts the
    next holder when nothing runs, or every remaining one (up to `budget.race` lanes) when every running
    lane has been silent for `budget.connect` seconds. The first lane to hold the whole verified file wins.
    The base `.part` belongs to at most one lane; a lane started while it is taken works on a copy.
    """

    def __init__(self, holders: list[str], entry: FileEntry, dest: Path, progress: Progress | None, compress: bool,
                 retries: int, backoff: float, timeout: float, max_message: int, budget: Budget) -> None:
        self.entry, self.dest, self.part = entry, dest, dest.with_name(dest.name + ".part")
        self.progress, self.compress, self.retries, self.backoff = progress, compress, retries, backoff
        self.timeout, self.max_message, self.budget = timeout, max_message, budget
        self.pending = deque(SLOW.order(holders))  # not tried yet, remembered-slow holders last
        self.standby: deque[str] = deque()  # paused while faster holders delivered; not blamed
        self.lanes: list[_Lane] = []
        self.clocks: dict[str, Clock] = {}
        self.base_owner: _Lane | None = None
        self.cond = threading.Condition()
        self.progress_lock = threading.Lock()
        self.racers = 0
        self.reasons: list[str] = []
        self.integrity = False

    def run(self) -> tuple[Path, str]:
        try:
            while True:
                now = time.monotonic()
                for lane in [lane for lane in self.lanes if lane.outcome is not None]:
                    won = self._ended(lane, now)
                    if won is not None:
                        return won, lane.holder
                self._police(now)
                self._prune(now)
                self._hedge(now)
                if not self.lanes:
                    break
                # Wake at the next lane's end, at the first moment a lane can turn silent, or after TICK.
                silent_at = min(lane.last_data for lane in self.lanes) + self.budget.connect
                with self.cond:
                    if all(lane.outcome is None for lane in self.lanes):
                        self.cond.wait(min(TICK, max(0.005, silent_at - time.monotonic() + 0.001)))
        finally:
            self._stop_all("done", "the download ended")
        error = IntegrityError if self.integrity else DDMError
        tried = "; ".join(self.reasons) if self.reasons else "no holders given"
        raise error(f"cannot fetch file {self.entry.sha256} ({self.entry.size} bytes): {tried}")

    # -- lanes ----------------------------------------------------------------------------------

    def _start(self, holder: str, now: float) -> None:
        clock = self.clocks.setdefault(holder, Clock())
        clock.start(now)
        if self.base_owner is None:
            part, copy_from = self.part, None
        else:
            self.racers += 1
            part, copy_from = _racer_part(self.dest, self.racers), self.part
        lane = _Lane(holder, part, copy_from, clock, now)
        if copy_from is None:
            self.base_owner = lane
        lane.thread = threading.Thread(target=self._lane_main, args=(lane,), daemon=True,
                                       name=f"ddm-fetch-{self.entry.sha256[:8]}-{holder}")
        self.lanes.append(lane)
        lane.thread.start()

    def _lane_main(self, lane: _Lane) -> None:
        def written(n: int) -> None:
            lane.received += n
            lane.clock.received += n
            lane.last_data = time.monotonic()
            if self.progress is not None:
                with self.progress_lock:
                    self.progress(n)

        try:
            if lane.copy_from is not None:
                _copy_prefix(lane.copy_from, lane.part, lane)
            _from_holder(lane.holder, self.entry, lane.part, written, self.compress, self.retries, self.backoff,
                         self.timeout, self.max_message, lane)
            outcome: object = True
        except (_HolderFailed, _Stopped) as exc:
            outcome = exc
        except OSError as exc:
            outcome = DDMError(f"cannot write {lane.part}: {exc.strerror or exc}")
        except BaseException as exc:  # handed to the caller's thread, which re-raises it
            outcome = exc
        with self.cond:
            lane.outcome = outcome
            self.cond.notify_all()

    def _ended(self, lane: _Lane, now: float) -> Path | None:
        """Account for a lane that ended; the file's path when it won."""
        assert lane.thread is not None
        lane.thread.join()
        self.lanes.remove(lane)
        lane.clock.stop(now)
        outcome = lane.outcome
        if outcome is True:
            for other in self.lanes:  # raced and sent nothing at all while this holder sent a MiB or more: slow
                if other.received == 0 and lane.received >= PROGRESS_RESET and not other.stopped:
                    SLOW.add(other.holder, f"sent nothing in {now - other.started:.1f} s while {lane.holder} sent "
                             f"the file", self.budget.remember)
            self._stop_all("done", f"{lane.holder} finished the file")
            path = _finish(lane.part, self.dest)
            if lane is not self.base_owner:
                self.part.unlink(missing_ok=True)
            self.base_owner = None
            return path
        if isinstance(outcome, _Stopped) and outcome.kind == "pause":
            log.info("fetch %s: pausing %s (%s)", self.entry.sha256[:16], lane.holder, outcome.reason)
            self.standby.append(lane.holder)
        elif isinstance(outcome, (_HolderFailed, _Stopped)):
            log.warning("fetch %s from %s failed: %s", self.entry.sha256[:16], lane.holder, outcome.reason)
            self.reasons.append(f"{lane.holder}: {outcome.reason}")
            if isinstance(outcome, _HolderFailed):
                self.integrity = self.integrity or outcome.integrity
            else:  # over budget: remembered, and tried after every other holder for a while
                SLOW.add(lane.holder, outcome.reason, self.budget.remember)
        self._release(lane)
        if not isinstance(outcome, (_HolderFailed, _Stopped)):
            self._stop_all("done", "the download failed")
            raise outcome  # a local error (disk full, ...), not the holder's
        return None

    def _release(self, lane: _Lane) -> None:
        """A lane's part file after it ended: the base stays (a later lane or call resumes it); a racer's copy
        becomes the base when the base is free and shorter, else it is deleted."""
        if lane is self.base_owner:
            self.base_owner = None
        elif lane.part != self.part:
            if self.base_owner is None and _part_size(lane.part) > _part_size(self.part):
                os.replace(lane.part, self.part)
            else:
                lane.part.unlink(missing_ok=True)

    def _stop_all(self, kind: str, reason: str) -> None:
        for lane in self.lanes:
            lane.stop(kind, reason)
        for lane in list(self.lanes):
            assert lane.thread is not None
            lane.thread.join()
            self.lanes.remove(lane)
            lane.clock.stop(time.monotonic())
            self._release(lane)

    # -- the policy -----------------------------------------------------------------------------

    def _police(self, now: float) -> None:
        """Drop the holders over budget (their bytes so far stay)."""
        for lane in self.lanes:
            why = self.budget.over(lane.clock.received, lane.clock.spent(now))
            if why is not None:
                lane.stop("slow", why)

    def _prune(self, now: float) -> None:
        """Keep at most `keep` lanes once they have shown their speed; pause the slowest of the others."""
        connect = self.budget.connect
        delivering = [lane for lane in self.lanes if not lane.stopped and lane.received > 0
                      and now - lane.started >= connect and now - lane.last_data < connect]
        if len(delivering) > self.budget.keep:
            delivering.sort(key=lambda lane: lane.received / max(now - lane.started, 1e-9), reverse=True)
            for lane in delivering[self.budget.keep:]:
                lane.stop("pause", "faster holders are delivering")

    def _hedge(self, now: float) -> None:
        """Nothing runs: start the next holder. Every running lane silent for `connect` s: race the others."""
        live = [lane for lane in self.lanes if not lane.stopped]
        if any(now - lane.last_data < self.budget.connect for lane in live):
            return
        take = 1 if not self.lanes else self.budget.race - len(self.lanes)
        started = []
        while take > 0 and (self.pending or self.standby):
            holder = self.pending.popleft() if self.pending else self.standby.popleft()
            if any(lane.holder == holder for lane in self.lanes):
                continue
            self._start(holder, now)
            started.append(holder)
            take -= 1
        if started and live:
            log.info("fetch %s: nothing from %s for %.1f s; racing %s", self.entry.sha256[:16],
                     ", ".join(lane.holder for lane in live), self.budget.connect, ", ".join(started))


def fetch_file(holders: list[str], entry: FileEntry, dest: str | Path, progress: Progress | None = None,
               compress: bool = False, retries: int = 3, backoff: float = 0.2, timeout: float = DEFAULT_TIMEOUT,
               max_message: int = DEFAULT_MAX_MESSAGE, budget: Budget | None = None) -> Path:
    """Download the file `entry` (sha256 + size) from the holders, the first whole verified copy winning.

    Bytes go to `dest` + ".part" (resumed at its length). Holders are tried in the order given, those
    remembered as slow last. Each holder gets `retries` retries with exponential backoff (`backoff`,
    2x, 4x ...; an attempt that made progress does not count), and is dropped at once for a protocol
    violation or a final sha256 mismatch, or when it goes over its `budget` (then it is remembered as
    slow). When every running holder has sent nothing for `budget.connect` seconds, the other holders
    are raced, each into a copy of the `.part`. `progress(n)` is called (from download threads, one call
    at a time) with the number of new bytes written by any holder. The verified file is fsynced and
    renamed to `dest`. Raises IntegrityError (a holder sent bad data) or DDMError naming the sha and
    every holder tried. Two concurrent downloads to the same `dest` are not supported.
    """
    return _fetch_file(holders, entry, dest, progress, compress, retries, backoff, timeout, max_message, budget)[0]


def _fetch_file(holders: list[str], entry: FileEntry, dest: str | Path, progress: Progress | None, compress: bool,
                retries: int, backoff: float, timeout: float, max_message: int,
                budget: Budget | None) -> tuple[Path, str | None]:
    """`fetch_file`, and the holder that sent the file (None when no network was needed)."""
    if not is_hex64(entry.sha256) or not isinstance(entry.size, int) or entry.size < 0:
        raise DDMError(f"bad file entry {entry!r}")
    if isinstance(holders, str):
        raise DDMError("holders must be a list of host:port addresses, not one string")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for stale in dest.parent.glob(glob.escape(dest.name) + ".*.part"):  # racers' copies from an interrupted call
        stale.unlink(missing_ok=True)
    if _part_complete(part, entry):
        return _finish(part, dest), None
    if entry.size == 0:
        part.touch()  # nothing to download; the hash check below still applies
        if sha256_file(part).sha256 == entry.sha256:
            return _finish(part, dest), None
        part.unlink()
        raise IntegrityError(f"file {entry.sha256} has size 0 but is not the empty file's hash")
    race = _FileRace(list(holders), entry, dest, progress, compress, retries, backoff, timeout, max_message,
                     budget or Budget.default())
    return race.run()


# ---------------------------------------------------------------- manifests


@dataclass(frozen=True)
class ManifestAnswer:
    """A verified signed manifest and the holder that gave it."""

    manifest: Manifest
    raw: bytes
    signature: bytes
    holder: str


def race_manifest(holders: Iterable[str], manifest_id: str, trusted_keys: Iterable[str] | None = None,
                  timeout: float = DEFAULT_TIMEOUT,
                  budget: Budget | None = None) -> tuple[ManifestAnswer | None, list[tuple[str, DDMError]]]:
    """The signed manifest from the first holder that gives a verified one, asking one holder at a time
    while they answer, and every remaining one (up to `budget.race` at once) when the holders asked have
    been silent for `budget.connect` seconds. Holders still silent when another answered are remembered
    as slow. Returns (the answer or None, [(holder, error)] of the holders that failed, in that order).
    """
    if not is_hex64(manifest_id):
        raise DDMError(f"bad manifest id {manifest_id!r} (want 64 lowercase hex chars)")
    trusted = list(trusted_keys) if trusted_keys is not None else None
    budget = budget or Budget.default()
    pending = deque(SLOW.order(holders))
    answers: queue.Queue = queue.Queue()
    clients: list[NodeClient] = []
    lock = threading.Lock()
    done = threading.Event()
    running: dict[str, float] = {}  # holder -> when it was asked
    errors: list[tuple[str, DDMError]] = []

    def ask(holder: str) -> None:
        try:
            client = NodeClient(holder, timeout)
        except DDMError as exc:
            answers.put((holder, None, exc))
            return
        with lock:
            if done.is_set():
                client.close()
                return
            clients.append(client)
        try:
            manifest, raw, signature = client.get_manifest(manifest_id, trusted)
            answers.put((holder, ManifestAnswer(manifest, raw, signature, holder), None))
        except DDMError as exc:
            answers.put((holder, None, exc))
        except Exception as exc:  # whatever a peer's bytes make a parser raise: that peer's failure
            answers.put((holder, None, DDMError(f"{holder}: manifest {manifest_id[:16]}: {exc!r}")))

    def start(n: int) -> None:
        while n > 0 and pending:
            holder = pending.popleft()
            running[holder] = time.monotonic()
            threading.Thread(target=ask, args=(holder,), daemon=True, name=f"ddm-manifest-{holder}").start()
            n -= 1

    start(1)
    answer = None
    try:
        while running:
            now = time.monotonic()
            silent_until = max(running.values()) + budget.connect
            if now >= silent_until and pending:  # every holder asked has been silent: ask the others too
                log.info("manifest %s: no answer from %s for %.1f s; asking %d more", manifest_id[:16],
                         ", ".join(running), budget.connect, min(len(pending), budget.race - len(running)))
                start(budget.race - len(running))
                continue
            try:
                holder, got, exc = answers.get(timeout=max(0.0, silent_until - now) if pending else None)
            except queue.Empty:
                continue
            running.pop(holder, None)
            if got is not None:
                answer = got
                break
            errors.append((holder, exc))
            log.warning("manifest %s: %s", manifest_id[:16], exc)
            if not running:
                start(1)
    finally:
        with lock:
            done.set()
            stale = list(clients)
        for client in stale:
            client.close()  # cancels the calls still waiting
    if answer is not None:
        now = time.monotonic()
        for holder, asked in running.items():
            if now - asked >= budget.connect:
                SLOW.add(holder, f"no manifest within {budget.connect:g} s while {answer.holder} answered",
                         budget.remember)
    return answer, errors


def _first_manifest(holders: list[str], manifest_id: str, trusted_keys: Iterable[str] | None = None,
                    timeout: float = DEFAULT_TIMEOUT,
                    budget: Budget | None = None) -> tuple[Manifest, bytes, bytes, str, list[str]]:
    """The manifest from the first holder that gives a verified one (`race_manifest`).

    Returns (manifest, raw, signature, holder that gave it, holders that sent a bad one).
    """
    answer, errors = race_manifest(holders, manifest_id, trusted_keys, timeout, budget)
    bad = [h for h, exc in errors if isinstance(exc, IntegrityError)]
    if answer is None:
        error = IntegrityError if bad else DDMError
        reasons = "; ".join(str(exc) for _, exc in errors) or "no holders given"
        raise error(f"no verified manifest {manifest_id}: {reasons}")
    return answer.manifest, answer.raw, answer.signature, answer.holder, bad


def download_dir(dest_dir: Path, manifest_id: str) -> Path:
    """Where an artifact's files collect before commit; fixed per manifest so a new call resumes."""
    return dest_dir.parent / f".{dest_dir.name}.dl-{manifest_id[:16]}"


def fetch_artifact(holders: list[str], manifest_id: str, dest_dir: str | Path,
                   trusted_keys: Iterable[str] | None = None, files: Iterable[str] | None = None,
                   progress: Progress | None = None, compress: bool = False, retries: int = 3, backoff: float = 0.2,
                   timeout: float = DEFAULT_TIMEOUT, signed: tuple[bytes, bytes] | None = None,
                   budget: Budget | None = None) -> Manifest:
    """Download a signed artifact into `dest_dir` (replacing an older copy) and return its manifest.

    The manifest is `signed` (its bytes and signature, when the caller already fetched them; checked
    again here) or comes from the first holder that gives a verified one (`race_manifest`); files (all,
    or the subset `files`) from any holder, by sha256, within each holder's `budget` (`fetch_file`).
    Everything collects in a hidden download directory beside `dest_dir` (kept on failure, so the
    next call resumes), is verified with `verify_artifact`, then renamed into place: a half download
    never appears at `dest_dir`.
    """
    if isinstance(holders, str) or isinstance(files, str):
        raise DDMError("holders and files must be lists, not a single string")
    dest_dir = Path(dest_dir)
    if signed is not None:
        raw, signature = signed
        manifest = parse_signed_manifest(raw, signature, trusted_keys, f"manifest {manifest_id[:16]}",
                                         expected_id=manifest_id)
        file_holders = list(dict.fromkeys(holders))  # in the caller's order
    else:
        manifest, raw, signature, source, bad = _first_manifest(holders, manifest_id, trusted_keys, timeout, budget)
        # The holder that just answered goes first; holders that sent a bad manifest are not asked for files.
        file_holders = [source] + [h for h in dict.fromkeys(holders) if h != source and h not in bad]
    names = sorted(manifest.files) if files is None else sorted(set(files))
    unknown = [n for n in names if n not in manifest.files]
    if unknown:
        raise DDMError(f"manifest {manifest_id[:16]} does not list {', '.join(unknown)}")
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
            got, sender = _fetch_file(file_holders, entry, incoming / entry.sha256, progress, compress, retries,
                                      backoff, timeout, DEFAULT_MAX_MESSAGE, budget)
            if sender is not None:  # the holder that sent the last file whole goes first for the next one
                file_holders = [sender] + [h for h in file_holders if h != sender]
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
