"""Watching a node: the metrics and dashboard server and the TensorBoard writer, composed for an island
(`IslandMonitor`, started by `ddm-node start --metrics-port`) or for a DHT client that trains nothing
(`run_dashboard`, `ddm-node dashboard`)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ddm_node import __version__
from ddm_node.core.events import EventKind
from ddm_node.core.meter import Count
from ddm_node.exchange.peers import fetch_plan, join_swarm
from ddm_node.node.island import Island
from ddm_node.observe.metrics import About, EventCounts, NodeMetrics
from ddm_node.observe.server import MonitorServer
from ddm_node.observe.tensorboard import ScalarWriter, summary_writer
from ddm_node.observe.view import Feed, SwarmView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorSettings:
    """What `--metrics-port`, `--metrics-host`, `--tensorboard` and `--samples` asked for."""

    port: int | None = None  # None: no HTTP server; 0: a free port (logged)
    host: str = "127.0.0.1"
    tensorboard: Path | None = None
    samples: Path | None = None  # a PNG, or a folder whose newest PNG the dashboard shows
    interval: float = 2.0  # seconds between DHT reads of the dashboard's view (while someone looks)


class IslandMonitor:
    """An island's observers; `attach` before the island starts (events are counted from the first one)."""

    def __init__(self, island: Island, settings: MonitorSettings):
        self.island, self.settings = island, settings
        self.counts = EventCounts(island.events)
        self.feed = Feed(island.events)
        self.metrics = NodeMetrics(island.state, self.counts, self._about, self._held)
        self.view = SwarmView(self._source, self.feed, settings.interval, me=island.me,
                              live=lambda: island.state.live, node=self._node, samples=settings.samples)
        self.server: MonitorServer | None = None
        self.scalars: ScalarWriter | None = None

    def start(self) -> IslandMonitor:
        s = self.settings
        if s.port is not None:
            self.server = MonitorServer(self.metrics.registry(), self.view, s.host, s.port)
            url = self.server.start()
            self.view.start()
            log.info("dashboard at %s, Prometheus metrics at %smetrics", url, url)
        if s.tensorboard is not None:
            writer = summary_writer(s.tensorboard)
            if writer is not None:
                self.scalars = ScalarWriter(writer, lambda: self.island.state.live).start()
        return self

    def close(self) -> None:
        self.view.close()
        if self.server is not None:
            self.server.close()
        if self.scalars is not None:
            self.scalars.close()

    def _about(self) -> About:
        isl = self.island
        return About(__version__, isl.me, isl.swarm.peer_id if isl.swarm is not None else "",
                     isl.plan.run_id if isl.plan is not None else (isl.opts.run_id or ""), isl.grpc)

    def _held(self) -> list[int]:
        claims = self.island.claims
        return list(claims.held()) if claims is not None else []

    def _source(self):
        isl = self.island
        swarm, plan = isl.swarm, isl.plan
        if swarm is None or plan is None or isl.stop.is_set():
            return None
        return swarm, plan

    def _node(self) -> dict:
        a, snap = self._about(), self.island.state.meter.snapshot()

        def total(name: Count) -> float:
            return sum(v for (n, _), v in snap.counts.items() if n is name)

        return {"mode": "island", "version": a.version, "public_key": a.public_key, "peer_id": a.peer_id,
                "run_id": a.run_id, "grpc": a.grpc, "phase": self.island.state.phase.value,
                "bytes_served": total(Count.BYTES_SERVED), "bytes_fetched": total(Count.BYTES_FETCHED),
                "fetch_failures": total(Count.FETCH_FAILURES),
                "checkpoints_published": self.counts.get(EventKind.CHECKPOINT)}


def run_dashboard(initial_peers: list[str], run_id: str, settings: MonitorSettings, stop: threading.Event,
                  timeout: float = 20.0) -> int:
    """`ddm-node dashboard`: join the DHT as a client (no training, no records of ours), serve the dashboard
    until `stop` is set."""
    swarm = join_swarm(initial_peers, run_id)
    try:
        plan = fetch_plan(swarm, run_id, timeout=timeout, stop=stop)
        node = {"mode": "client", "version": __version__, "public_key": swarm.public_key, "peer_id": swarm.peer_id,
                "run_id": run_id, "grpc": "", "phase": "watching"}
        view = SwarmView(lambda: (swarm, plan), Feed(), settings.interval, me=None, node=lambda: node,
                         samples=settings.samples)
        server = MonitorServer(None, view, settings.host, settings.port or 0)
        url = server.start()
        view.start()
        log.info("dashboard of run %s at %s", run_id[:16], url)
        try:
            stop.wait()
        finally:
            view.close()
            server.close()
    finally:
        swarm.shutdown()
    return 0
