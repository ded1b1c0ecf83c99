"""Prometheus metrics of one island, read from its live state at scrape time.

`NodeMetrics` is a custom collector: nothing is pushed into prometheus-client while the node works; each
scrape reads the island's `NodeState` (phase, live training progress), its `Meter` (bytes served and
fetched, fetch failures by reason, mirror lag, DHT call latency), the claims it holds and the events it
recorded. Each island gets its own `CollectorRegistry` (`registry()`), so islands sharing a process do
not mix their numbers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ddm_node.core.events import Event, EventKind, EventLog
from ddm_node.core.meter import BUCKETS, Count, Gauge, Timer
from ddm_node.node.state import NodeState, Phase

PREFIX = "ddm"


@dataclass(frozen=True)
class About:
    """Who the node is (labels of `ddm_node_info`); empty strings until known."""

    version: str
    public_key: str
    peer_id: str = ""
    run_id: str = ""
    grpc: str = ""


class EventCounts:
    """Events recorded by the island, counted by kind (an EventLog listener)."""

    def __init__(self, events: EventLog | None = None):
        self._lock = threading.Lock()
        self._counts: dict[EventKind, int] = {}
        if events is not None:
            events.subscribe(self.add)

    def add(self, event: Event) -> None:
        with self._lock:
            self._counts[event.kind] = self._counts.get(event.kind, 0) + 1

    def get(self, kind: EventKind) -> int:
        with self._lock:
            return self._counts.get(kind, 0)

    def items(self) -> list[tuple[EventKind, int]]:
        with self._lock:
            return sorted(self._counts.items(), key=lambda kv: kv[0].value)


class NodeMetrics:
    """The collector (see the module docstring). `held()` lists the claim slots the island holds."""

    def __init__(self, state: NodeState, events: EventCounts, about: Callable[[], About],
                 held: Callable[[], Iterable[int]]):
        self.state, self.events, self.about, self.held = state, events, about, held

    def registry(self) -> CollectorRegistry:
        """A registry of its own holding this collector (and nothing process-wide)."""
        reg = CollectorRegistry(auto_describe=False)
        reg.register(self)
        return reg

    def collect(self) -> Iterator[Metric]:
        yield from self._identity()
        yield from self._training()
        yield from self._counters()
        yield from self._latency()

    def _identity(self) -> Iterator[Metric]:
        a = self.about()
        info = GaugeMetricFamily(f"{PREFIX}_node_info", "The node: version, keys, run (value 1)",
                                 labels=["version", "public_key", "peer_id", "run_id", "grpc"])
        info.add_metric([a.version, a.public_key, a.peer_id, a.run_id, a.grpc], 1)
        yield info
        phase = GaugeMetricFamily(f"{PREFIX}_phase", "The island's phase (1 for the current one)", labels=["phase"])
        for p in Phase:
            phase.add_metric([p.value], 1.0 if self.state.phase is p else 0.0)
        yield phase
        lease = GaugeMetricFamily(f"{PREFIX}_lease_held", "Claims (leases) this island holds, by claim slot "
                                  "(a shard, or K for the router job)", labels=["slot"])
        for slot in sorted(self.held()):
            lease.add_metric([str(slot)], 1)
        yield lease

    def _training(self) -> Iterator[Metric]:
        live = self.state.live
        stats = live.stats() if live is not None else None
        fams = {
            "step": ("Training step of the shard being trained", lambda s: s.step),
            "target_steps": ("Step budget of the shard being trained", lambda s: s.target),
            "loss": ("Smoothed training loss of the shard being trained", lambda s: s.loss),
            "images_per_second": ("Training throughput (images/s)", lambda s: s.images_per_s),
            "eta_seconds": ("Seconds to the shard's step budget at the current rate", lambda s: s.eta_s),
        }
        for name, (doc, get) in fams.items():
            fam = GaugeMetricFamily(f"{PREFIX}_training_{name}", doc, labels=["shard"])
            value = get(stats) if stats is not None else None
            if value is not None:
                fam.add_metric([str(stats.shard)], value)
            yield fam

    def _counters(self) -> Iterator[Metric]:
        snap = self.state.meter.snapshot()

        def total(name: Count) -> float:
            return sum(v for (n, _), v in snap.counts.items() if n is name)

        yield CounterMetricFamily(f"{PREFIX}_checkpoints_published", "Checkpoints this island wrote and announced",
                                  value=self.events.get(EventKind.CHECKPOINT))
        yield CounterMetricFamily(f"{PREFIX}_mirrors", "Checkpoints of other islands copied (mirrored)",
                                  value=self.events.get(EventKind.MIRROR))
        events = CounterMetricFamily(f"{PREFIX}_events", "Events recorded, by kind", labels=["kind"])
        for kind, n in self.events.items():
            events.add_metric([kind.value], n)
        yield events
        yield CounterMetricFamily(f"{PREFIX}_bytes_served", "Artifact bytes streamed to peers",
                                  value=total(Count.BYTES_SERVED))
        yield CounterMetricFamily(f"{PREFIX}_bytes_fetched", "Artifact bytes downloaded from peers",
                                  value=total(Count.BYTES_FETCHED))
        failures = CounterMetricFamily(f"{PREFIX}_fetch_failures", "Failed checkpoint fetches, by reason",
                                       labels=["reason"])
        for (name, label), v in sorted(snap.counts.items()):
            if name is Count.FETCH_FAILURES:
                failures.add_metric([label], v)
        yield failures
        lag = GaugeMetricFamily(f"{PREFIX}_mirror_lag_steps", "Steps our copy of a mirrored shard is behind its newest "
                                "announced checkpoint", labels=["shard"])
        for (name, label), v in sorted(snap.gauges.items()):
            if name is Gauge.MIRROR_LAG:
                lag.add_metric([label], v)
        yield lag

    def _latency(self) -> Iterator[Metric]:
        snap = self.state.meter.snapshot()
        fam = HistogramMetricFamily(f"{PREFIX}_dht_call_seconds", "Latency of DHT gets and stores", labels=["op"])
        for (name, label), h in sorted(snap.timers.items()):
            if name is not Timer.DHT_CALL:
                continue
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, BUCKETS), "+Inf"], h.counts):
                cumulative += n
                buckets.append((bound, cumulative))
            fam.add_metric([label], buckets, h.total)
        yield fam
