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
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.manifest import (
    MANIFEST,
    SIGNATURE,
    FileEntry,
    Manifest,
    _fsync_dir,
    commit_dir,
    fsync_write,
    sha256_file,
    verify_artifact,
)
from ddm_node.transfer.budget import SLOW, Budget, Clock
from ddm_node.transfer.client import DEFAULT_TIMEOUT
from ddm_node.transfer.holder import PROGRESS_RESET, HolderFailed, Lane, Progress, Stopped, from_holder
from ddm_node.transfer.manifest_race import first_manifest
from ddm_node.transfer.partfile import copy_prefix, finish, part_complete, part_size, racer_part
from ddm_node.transfer.store import DEFAULT_MAX_MESSAGE, is_hex64, parse_signed_manifest

log = logging.getLogger(__name__)

TICK = 0.1  # seconds between two looks at a download's holders (budgets, racing), at most


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
        self.lanes: list[Lane] = []
        self.clocks: dict[str, Clock] = {}
        self.base_owner: Lane | None = None
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
            part, copy_from = racer_part(self.dest, self.racers), self.part
        lane = Lane(holder, part, copy_from, clock, now)
        if copy_from is None:
            self.base_owner = lane
        lane.thread = threading.Thread(target=self._lane_main, args=(lane,), daemon=True,
                                       name=f"ddm-fetch-{self.entry.sha256[:8]}-{holder}")
        self.lanes.append(lane)
        lane.thread.start()

    def _lane_main(self, lane: Lane) -> None:
        def written(n: int) -> None:
            lane.received += n
            lane.clock.received += n
            lane.last_data = time.monotonic()
            if self.progress is not None:
                with self.progress_lock:
                    self.progress(n)

        try:
            if lane.copy_from is not None:
                copy_prefix(lane.copy_from, lane.part, lane.check)
            from_holder(lane.holder, self.entry, lane.part, written, self.compress, self.retries, self.backoff,
                         self.timeout, self.max_message, lane)
            outcome: object = True
        except (HolderFailed, Stopped) as exc:
            outcome = exc
        except OSError as exc:
            outcome = DDMError(f"cannot write {lane.part}: {exc.strerror or exc}")
        except BaseException as exc:  # handed to the caller's thread, which re-raises it
            outcome = exc
        with self.cond:
            lane.outcome = outcome
            self.cond.notify_all()

    def _ended(self, lane: Lane, now: float) -> Path | None:
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
            path = finish(lane.part, self.dest)
            if lane is not self.base_owner:
                self.part.unlink(missing_ok=True)
            self.base_owner = None
            return path
        if isinstance(outcome, Stopped) and outcome.kind == "pause":
            log.info("fetch %s: pausing %s (%s)", self.entry.sha256[:16], lane.holder, outcome.reason)
            self.standby.append(lane.holder)
        elif isinstance(outcome, (HolderFailed, Stopped)):
            log.warning("fetch %s from %s failed: %s", self.entry.sha256[:16], lane.holder, outcome.reason)
            self.reasons.append(f"{lane.holder}: {outcome.reason}")
            if isinstance(outcome, HolderFailed):
                self.integrity = self.integrity or outcome.integrity
            else:  # over budget: remembered, and tried after every other holder for a while
                SLOW.add(lane.holder, outcome.reason, self.budget.remember)
        self._release(lane)
        if not isinstance(outcome, (HolderFailed, Stopped)):
            self._stop_all("done", "the download failed")
            raise outcome  # a local error (disk full, ...), not the holder's
        return None

    def _release(self, lane: Lane) -> None:
        """A lane's part file after it ended: the base stays (a later lane or call resumes it); a racer's copy
        becomes the base when the base is free and shorter, else it is deleted."""
        if lane is self.base_owner:
            self.base_owner = None
        elif lane.part != self.part:
            if self.base_owner is None and part_size(lane.part) > part_size(self.part):
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
    if part_complete(part, entry):
        return finish(part, dest), None
    if entry.size == 0:
        part.touch()  # nothing to download; the hash check below still applies
        if sha256_file(part).sha256 == entry.sha256:
            return finish(part, dest), None
        part.unlink()
        raise IntegrityError(f"file {entry.sha256} has size 0 but is not the empty file's hash")
    race = _FileRace(list(holders), entry, dest, progress, compress, retries, backoff, timeout, max_message,
                     budget or Budget.default())
    return race.run()


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
        manifest, raw, signature, source, bad = first_manifest(holders, manifest_id, trusted_keys, timeout, budget)
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
