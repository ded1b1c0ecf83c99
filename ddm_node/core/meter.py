"""A node's counters, gauges and latency histograms, kept by the parts that do the work and read by exporters.

The parts (the gRPC server, the DHT client, the mirror, resume) bump a `Meter` they were handed; the
observe layer turns a `snapshot()` into Prometheus text or JSON at read time. Nothing here imports a
metrics library, and one Meter per island keeps islands that share a process (tests) apart.
Names are enums; a label is one short string (a reason, an operation, a shard index).
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum


class Count(str, Enum):
    """Monotonic counters."""

    BYTES_SERVED = "bytes_served"  # artifact bytes our gRPC server streamed to peers
    BYTES_FETCHED = "bytes_fetched"  # artifact bytes we downloaded from peers (mirror, resume)
    FETCH_FAILURES = "fetch_failures"  # label: the reason (see exchange.fetch.failure_reason)

    def __str__(self) -> str:
        return self.value


class Gauge(str, Enum):
    """Values that go up and down."""

    MIRROR_LAG = "mirror_lag"  # label: shard; newest announced step minus the step of our copy

    def __str__(self) -> str:
        return self.value


class Timer(str, Enum):
    """Latency histograms, in seconds."""

    DHT_CALL = "dht_call"  # label: the operation (get, store)

    def __str__(self) -> str:
        return self.value


# Upper bounds (seconds) of the latency histogram buckets; the last, +Inf, is implied.
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_LABELS = 1024  # distinct labels kept per name (shard indices, reasons, operations: all bounded)


@dataclass(frozen=True)
class Histogram:
    """Cumulative-free bucket counts (one per BUCKETS bound, then +Inf), their sum and count."""

    counts: tuple[int, ...]
    total: float
    count: int


@dataclass(frozen=True)
class MeterSnapshot:
    counts: dict[tuple[Count, str], float] = field(default_factory=dict)
    gauges: dict[tuple[Gauge, str], float] = field(default_factory=dict)
    timers: dict[tuple[Timer, str], Histogram] = field(default_factory=dict)


class Meter:
    """Thread-safe counters, gauges and histograms (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[Count, str], float] = {}
        self._gauges: dict[tuple[Gauge, str], float] = {}
        self._timers: dict[tuple[Timer, str], list] = {}  # key -> [bucket counts, sum, count]

    def _room(self, table: dict, key: tuple) -> bool:
        return key in table or sum(1 for k in table if k[0] is key[0]) < MAX_LABELS

    def add(self, name: Count, value: float = 1, label: str = "") -> None:
        with self._lock:
            if self._room(self._counts, (name, label)):
                self._counts[(name, label)] = self._counts.get((name, label), 0) + value

    def adder(self, name: Count, label: str = "") -> Callable[[int], None]:
        """`add` bound to one counter: a progress callback (e.g. bytes received)."""
        return lambda n: self.add(name, n, label)

    def set(self, name: Gauge, value: float, label: str = "") -> None:
        with self._lock:
            if self._room(self._gauges, (name, label)):
                self._gauges[(name, label)] = float(value)

    def observe(self, name: Timer, seconds: float, label: str = "") -> None:
        with self._lock:
            if not self._room(self._timers, (name, label)):
                return
            entry = self._timers.setdefault((name, label), [[0] * (len(BUCKETS) + 1), 0.0, 0])
            entry[0][bisect.bisect_left(BUCKETS, seconds)] += 1
            entry[1] += seconds
            entry[2] += 1

    def snapshot(self) -> MeterSnapshot:
        with self._lock:
            return MeterSnapshot(dict(self._counts), dict(self._gauges),
                                 {k: Histogram(tuple(v[0]), v[1], v[2]) for k, v in self._timers.items()})


@contextlib.contextmanager
def timed(meter: Meter | None, name: Timer, label: str = "") -> Iterator[None]:
    """Observe the block's duration (also when it raises) on `meter`; nothing without one."""
    start = time.monotonic()
    try:
        yield
    finally:
        if meter is not None:
            meter.observe(name, time.monotonic() - start, label)
