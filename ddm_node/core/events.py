"""Typed island events: what an island did, one JSON line each in WORK/events.jsonl.

Written by the node (and the training supervisor through it), read by the demo report, the loopback
network, benchmarks and tests. Everything goes through `Event`: the on-disk line is its non-empty
fields with the kind under "event", so old logs read the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

log = logging.getLogger(__name__)
EVENTS_FILE = "events.jsonl"


class EventKind(str, Enum):
    """Every kind of event an island records."""

    START = "start"  # services up: grpc, peer_id
    CLAIM = "claim"  # won the claim of a shard
    TRAIN = "train"  # training of a shard starts at `step`
    RESUME = "resume"  # resumed a shard at `step` from `source` (swarm, local, local mirror)
    CHECKPOINT = "checkpoint"  # wrote and announced a checkpoint
    MIRROR = "mirror"  # copied another island's checkpoint
    DONE = "done"  # a shard reached its step budget
    LEASE_LOST = "lease_lost"  # another island owns the shard now
    REJOINED = "rejoined"  # found `peers` DHT peers again after a partition
    DISK_FULL = "disk_full"  # a checkpoint did not fit; training and mirroring stop
    REJECTED = "rejected"  # a peer's checkpoint verified but did not load; discarded
    ROUTER = "router"  # trained and published the learned router
    HANDOFF = "handoff"  # leaving: another peer holds our checkpoint of `shard` at `step` (or not: `reason`)
    PACK = "pack"  # holds a data pack of `shard` (K: held-out) from `source` (built, imported, fetched, mirrored)
    WORKERS_START = "workers_start"  # a DDP worker group started (attempt, resume_step)
    WORKERS_EXIT = "workers_exit"  # a worker group exited (code, stopped)
    WORKERS_RESTART = "workers_restart"  # a crashed worker group is restarted
    RELEASE = "release"  # gave a claimed shard back (`reason`: done, stopping, disk full, ...)

    def __str__(self) -> str:  # the value in f-strings and DHT keys, as on Python 3.12
        return self.value

@dataclass(frozen=True)
class Event:
    """One event. Fields that do not apply to a kind stay None."""

    kind: EventKind
    t: float = 0.0  # wall-clock seconds
    island: str = ""  # the island's key prefix
    name: str | None = None  # the island's name in a loopback network (set by the reader)
    shard: int | None = None
    step: int | None = None
    source: str | None = None
    publisher: str | None = None
    holders: tuple[str, ...] | None = None
    grpc: str | None = None
    peer_id: str | None = None
    peers: int | None = None
    steps: int | None = None
    reason: str | None = None
    error: str | None = None
    pid: int | None = None
    nproc: int | None = None
    attempt: int | None = None
    resume_step: int | None = None
    code: int | None = None
    stopped: bool | None = None
    failures: int | None = None
    maddrs: tuple[str, ...] | None = None
    run_id: str | None = None

    def line(self) -> str:
        """The event as one console line (the island's log of what it does)."""
        where = f"shard {self.shard}: " if self.shard is not None else ""
        values = {f.name: " ".join(v) if isinstance(v, tuple) else v
                  for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        text = _LINES.get(self.kind)
        if text is not None:
            return where + text.format(**values)
        extra = {k: v for k, v in values.items() if k not in ("kind", "t", "island", "name", "shard") and v is not None}
        return where + self.kind.value.replace("_", " ") + "".join(f" {k}={v}" for k, v in extra.items())

    def to_json(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("kind", "name")}
        data = {"t": round(self.t, 3), "event": self.kind.value, "island": self.island}
        data.update({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()
                     if v is not None and k not in data})
        return json.dumps(data)

    @classmethod
    def from_json(cls, line: str, name: str | None = None) -> Event | None:
        """The event on one line, or None for a line that is not one (cut by a kill, or of an unknown kind)."""
        try:
            data = json.loads(line)
            kind = EventKind(data.pop("event"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if k in ("holders", "maddrs") and isinstance(v, list) else v for k, v in data.items()
                  if k in known}
        return cls(kind=kind, name=name, **values)


# Console lines of the kinds a user follows (fields by name; None fields are not used by their kind's text).
_LINES: dict[EventKind, str] = {
    EventKind.START: "ready: peer {peer_id}, gRPC {grpc}, run {run_id}, DHT {maddrs}",
    EventKind.CLAIM: "claimed",
    EventKind.TRAIN: "training from step {step}",
    EventKind.RESUME: "resumed at step {step} from {source} (checkpoint by {publisher})",
    EventKind.CHECKPOINT: "checkpoint at step {step} published",
    EventKind.MIRROR: "mirrored step {step} (checkpoint by {publisher})",
    EventKind.DONE: "done at step {step}",
    EventKind.RELEASE: "handed back ({reason})",
    EventKind.ROUTER: "router trained ({steps} steps) and published",
}
# Kinds whose cause is already logged, with more detail, where it happens: their event line goes to DEBUG.
_LOGGED_ELSEWHERE = {EventKind.LEASE_LOST, EventKind.DISK_FULL, EventKind.REJECTED, EventKind.WORKERS_START,
                     EventKind.WORKERS_RESTART}


class EventLog:
    """Appends events to one file and logs each as one line; thread-safe, and never raises over a log line (a
    full disk must not end a node). `subscribe` adds a listener (metrics, the dashboard) called per event."""

    def __init__(self, path: Path, island: str):
        self.path = Path(path)
        self.island = island
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def record(self, kind: EventKind, **fields) -> Event:
        event = Event(kind=kind, t=time.time(), island=self.island, **fields)
        try:
            with self._lock, open(self.path, "a") as f:
                f.write(event.to_json() + "\n")
        except OSError as exc:
            log.warning("could not record event %s: %s", kind.value, exc)
        log.log(logging.DEBUG if kind in _LOGGED_ELSEWHERE else logging.INFO, "%s", event.line())
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception as exc:  # a listener's bug must not stop the node
                log.debug("event listener failed on %s: %r", kind.value, exc)
        return event


def read_events(path: Path, name: str | None = None) -> list[Event]:
    """The events in one file, in order (missing file: none; unreadable lines are skipped)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [e for line in text.splitlines() if (e := Event.from_json(line, name)) is not None]
