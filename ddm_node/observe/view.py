"""This node's view of the swarm, for the dashboard: `/api/swarm` as one JSON document.

A `SwarmView` polls the DHT (the same `collect_status` as `ddm-node status`) on its own thread, only while
someone looks (a request in the last `IDLE_AFTER` seconds), and serves the newest result from memory, so a
page refresh never waits on the DHT and an idle node costs the DHT nothing. Between polls it keeps what a
single read cannot show: each shard's loss curve (bounded), when each peer was last seen (a peer whose
heartbeat stopped is shown silent, then gone), and a feed of what changed (peers joining and falling
silent, claims, checkpoints, shards done) next to the island's own events.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddm_node.clients.status import RunStatus, collect_status
from ddm_node.core.events import Event, EventLog
from ddm_node.core.live import MAX_POINTS, LiveProgress
from ddm_node.data.plan import Plan
from ddm_node.swarm.dht import Swarm

log = logging.getLogger(__name__)
IDLE_AFTER = 60.0  # seconds without a request after which polling pauses
MAX_EVENTS = 100  # feed entries kept
GONE_AFTER = 600.0  # seconds a vanished peer stays listed (as silent)
SILENT_BEATS = 3.0  # heartbeats missed before a peer counts as silent


@dataclass(frozen=True)
class FeedItem:
    t: float
    text: str
    source: str  # "self" (this island's own event) or "swarm" (a change seen in the DHT)
    level: str = "info"  # info | warn


class Feed:
    """Recent events, newest last, bounded; the island's own (an EventLog listener) and the observed ones."""

    def __init__(self, events: EventLog | None = None):
        self._items: deque[FeedItem] = deque(maxlen=MAX_EVENTS)
        self._lock = threading.Lock()
        if events is not None:
            events.subscribe(self.own)

    def own(self, event: Event) -> None:
        warn = event.kind.value in ("lease_lost", "disk_full", "rejected", "workers_restart")
        self.add(FeedItem(event.t, event.line(), "self", "warn" if warn else "info"))

    def add(self, item: FeedItem) -> None:
        with self._lock:
            self._items.append(item)

    def items(self) -> list[FeedItem]:
        with self._lock:
            return sorted(self._items, key=lambda i: i.t)


def newest_png(path: Path | None) -> Path | None:
    """The PNG at `path`, or the newest *.png in it (or one level below); None when there is none."""
    if path is None:
        return None
    if path.is_file():
        return path if path.suffix.lower() == ".png" else None
    try:
        found = [p for pattern in ("*.png", "*/*.png") for p in path.glob(pattern) if p.is_file()]
        return max(found, key=lambda p: p.stat().st_mtime, default=None)
    except OSError:
        return None


class SwarmView:
    """See the module docstring. `source()` gives (swarm, plan) once both are known (None until then)."""

    def __init__(self, source: Callable[[], tuple[Swarm, Plan] | None], feed: Feed, interval: float = 2.0,
                 me: str | None = None, live: Callable[[], LiveProgress | None] = lambda: None,
                 node: Callable[[], dict] = dict, samples: Path | None = None,
                 clock: Callable[[], float] = time.time):
        self.source, self.feed, self.interval, self.me, self.live = source, feed, interval, me, live
        self.node, self.samples, self.clock = node, samples, clock
        self._lock = threading.Lock()
        self._status: RunStatus | None = None
        self._heartbeat = 5.0
        self._updated: float | None = None
        self._error: str | None = None
        self._curves: dict[int, list[tuple[int, float]]] = {}
        self._peers_seen: dict[str, tuple[float, dict]] = {}  # public key -> (last seen, last peer json)
        self._asked = time.monotonic()  # a view starts watched: the first page load finds data
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ polling
    def start(self) -> SwarmView:
        self._thread = threading.Thread(target=self._loop, name="swarm-view", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() - self._asked < IDLE_AFTER:
                self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        """One read of the swarm; an error is kept for the page (the last good view stays, marked stale)."""
        try:
            got = self.source()
            if got is None:
                return
            swarm, plan = got
            status = collect_status(swarm, plan)
        except Exception as exc:  # the DHT may be down or shutting down: show it, keep polling
            with self._lock:
                self._error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.debug("swarm view poll failed: %s", exc)
            return
        with self._lock:
            self._heartbeat = plan.cfg.swarm.heartbeat
            self._observe(status)
            self._status, self._updated, self._error = status, self.clock(), None

    def _observe(self, status: RunStatus) -> None:
        """Curves, peers last seen, and feed entries for what changed since the previous poll."""
        now, old = self.clock(), self._status
        for s in status.shards:
            curve = self._curves.setdefault(s.shard, [])
            if s.loss is not None and s.live_step is not None and (not curve or s.live_step != curve[-1][0]):
                curve.append((s.live_step, s.loss))
                if len(curve) > MAX_POINTS:
                    self._curves[s.shard] = curve[::2]
        if old is not None:
            self._diff(old, status, now)
        silent_after = SILENT_BEATS * self._heartbeat + 2.0
        seen_now = {p.public_key for p in status.peers}
        for p in status.peers:
            was = self._peers_seen.get(p.public_key)
            if was is not None and was[1].get("silent") and p.heartbeat_age <= silent_after:
                self.feed.add(FeedItem(now, f"peer {p.peer_id[-8:]} is back", "swarm"))
            self._peers_seen[p.public_key] = (now - p.heartbeat_age, dataclasses.asdict(p))
        for key, (last, info) in list(self._peers_seen.items()):
            if key not in seen_now and not info.get("silent"):
                self.feed.add(FeedItem(now, f"peer {info['peer_id'][-8:]} went silent", "swarm", "warn"))
                info["silent"] = True
            if now - last > GONE_AFTER:
                del self._peers_seen[key]

    def _diff(self, old: RunStatus, new: RunStatus, now: float) -> None:
        before = {p.public_key for p in old.peers}
        for p in new.peers:
            if p.public_key not in before and p.public_key not in self._peers_seen:
                self.feed.add(FeedItem(now, f"peer {p.peer_id[-8:]} joined (version {p.version})", "swarm"))
        for o, s in zip(old.shards, new.shards):
            who = s.owner.public_key if s.owner else None
            if who and who != (o.owner.public_key if o.owner else None) and who != self.me:
                self.feed.add(FeedItem(now, f"shard {s.shard}: claimed by {s.owner.peer_id[-8:]}", "swarm"))
            if (s.newest_step or -1) > (o.newest_step or -1) and s.newest_publisher != self.me:
                by = f" by {s.newest_publisher[:8]}" if s.newest_publisher else ""
                self.feed.add(FeedItem(now, f"shard {s.shard}: checkpoint at step {s.newest_step}{by}", "swarm"))
            if s.state == "done" and o.state != "done":
                self.feed.add(FeedItem(now, f"shard {s.shard}: done", "swarm"))

    # ------------------------------------------------------------------------------ the document
    def snapshot(self) -> dict:
        """The JSON document of /api/swarm (see docs/ARCHITECTURE.md, observe)."""
        self._asked = time.monotonic()
        with self._lock:
            status, updated, error, heartbeat = self._status, self._updated, self._error, self._heartbeat
            curves = {k: list(v) for k, v in self._curves.items()}
            seen = {k: (last, dict(info)) for k, (last, info) in self._peers_seen.items()}
        live = self.live()
        if live is not None:
            curves[live.shard] = live.curve()  # our own shard: every point the trainer reported
        now = self.clock()
        silent_after = SILENT_BEATS * heartbeat + 2.0
        doc = {"now": now, "updated": updated, "interval": self.interval, "stale_after": 3 * self.interval + 5,
               "silent_after": silent_after, "error": error, "node": self.node(), "run": None, "shards": [],
               "router": None, "peers": [], "events": [dataclasses.asdict(i) for i in self.feed.items()],
               "sample": self._sample()}
        if status is None:
            return doc
        doc["run"] = {"run_id": status.run_id, "dataset": status.dataset, "num_shards": status.num_shards,
                      "target": status.target, "router_job": status.router_job}
        for s in status.shards:
            row = dataclasses.asdict(s)
            row["curve"] = curves.get(s.shard, [])
            row["owner_silent"] = s.state == "training" and (s.heartbeat_age is None or s.heartbeat_age > silent_after)
            if live is not None and live.shard == s.shard:  # fresher than our own last heartbeat
                ls = live.stats()
                row.update(step=max(ls.step, s.step or 0), live_step=ls.step, loss=ls.loss,
                           images_per_s=ls.images_per_s, eta_s=ls.eta_s)
            doc["shards"].append(row)
        doc["router"] = dataclasses.asdict(status.router)
        for key, (last, info) in sorted(seen.items(), key=lambda kv: kv[1][1]["peer_id"]):
            info["heartbeat_age"] = max(0.0, now - last)
            info["silent"] = info["heartbeat_age"] > silent_after
            info["me"] = key == self.me
            doc["peers"].append(info)
        return doc

    def _sample(self) -> dict | None:
        png = newest_png(self.samples)
        if png is None:
            return None
        mtime = png.stat().st_mtime
        return {"url": f"/api/sample.png?v={int(mtime)}", "name": png.name, "mtime": mtime}

    def sample_bytes(self) -> bytes | None:
        png = newest_png(self.samples)
        try:
            return png.read_bytes() if png is not None else None
        except OSError:
            return None
