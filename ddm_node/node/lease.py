"""The lease keeper: renews the claim on the shard being trained, heartbeats, re-announces, and rejoins
peers lost from the DHT routing table (a healed partition). The island's timing policy lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ddm_node.core.config import SwarmConfig
from ddm_node.core.events import EventKind, EventLog
from ddm_node.exchange.announcer import Announcer
from ddm_node.node.peer_memory import SAVE_PERIOD, PeerMemory, Seen
from ddm_node.node.state import NodeState
from ddm_node.swarm.claims import ClaimManager
from ddm_node.swarm.dht import Swarm
from ddm_node.swarm.records import PeerRecord

log = logging.getLogger(__name__)
REJOIN_PERIOD = 5.0  # seconds between looks for peers missing from the DHT routing table (a healed partition)
MADDR_MEMORY = 600.0  # seconds a peer's multiaddrs are kept for rejoining after it was last seen


@dataclass(frozen=True)
class Timing:
    """Every period and TTL an island uses, derived from the run's swarm settings (and this node's
    `--join-wait` / `--leave-timeout`) in one place."""

    cfg: SwarmConfig
    join_wait_s: float | None = None  # None: four lease TTLs
    leave_timeout: float = 30.0  # seconds a stopped island serves until a peer holds its checkpoints

    @property
    def join_wait(self) -> float:
        """The longest an island returning to a run holds back work nobody visibly started while the peers it
        saw before are not all back (node/gate.py): four lease TTLs, two minutes by default. It normally ends
        as soon as they are back; the bound only costs time when one of them never returns."""
        return 4 * self.cfg.lease_ttl if self.join_wait_s is None else self.join_wait_s

    @property
    def keeper_period(self) -> float:
        """Renew the lease three times per TTL (one lost renewal is not fatal), and heartbeat on time."""
        return min(self.cfg.lease_ttl / 3, self.cfg.heartbeat)

    @property
    def heartbeat_ttl(self) -> float:
        return max(3 * self.cfg.heartbeat, 10.0)

    @property
    def reannounce_period(self) -> float:
        return self.cfg.announce_ttl / 3

    @property
    def claim_retry(self) -> float:
        """How long an island with nothing claimable waits before looking again."""
        return min(2.0, self.cfg.lease_ttl / 4)


class LeaseKeeper:
    """The keeper thread's loop (`run`); `heartbeat_record` describes this node at each beat."""

    def __init__(self, swarm: Swarm, claims: ClaimManager, announcer: Announcer, timing: Timing, state: NodeState,
                 events: EventLog, me: str, heartbeat_record: Callable[[], PeerRecord], initial_peers: list[str],
                 memory: PeerMemory | None = None):
        """`memory`: the peers seen in this island's previous life (WORK/peers.json), dialed again when missing
        (their addresses survive restarts) and kept up to date for the next start."""
        self.swarm, self.claims, self.announcer = swarm, claims, announcer
        self.timing, self.state, self.events = timing, state, events
        self.me, self.heartbeat_record = me, heartbeat_record
        self.initial_peers = list(initial_peers)
        self.memory = memory
        now = time.monotonic()
        # peer key -> (last seen, maddrs); the remembered peers count as just seen, and age out like any other
        self._peer_maddrs: dict[str, tuple[float, list[str]]] = {
            k: (now, list(s.maddrs)) for k, s in (memory.peers.items() if memory else ())}
        self._seen: dict[str, Seen] = dict(memory.peers) if memory else {}
        self._rejoining: Future | None = None
        self._last_announce = self._last_rejoin = now
        self._last_save = 0.0

    def run(self) -> None:
        """Tick at once (peers see a restarted island, and stop waiting for it, without a period's delay), then
        every `keeper_period` until stopped."""
        while True:
            try:
                self.tick()
            except Exception as exc:  # keep the keeper alive through transient DHT errors
                log.warning("keeper: %s", exc)
            if self.state.stop.wait(self.timing.keeper_period):
                return

    def tick(self) -> None:
        self._renew()
        self.swarm.announce(self.heartbeat_record(), ttl=self.timing.heartbeat_ttl)
        self._collect_rejoin()
        if time.monotonic() - self._last_announce > self.timing.reannounce_period:
            self.announcer.reannounce()
            self._last_announce = time.monotonic()
        if self._rejoining is None and time.monotonic() - self._last_rejoin > REJOIN_PERIOD:
            self._rejoining, self._last_rejoin = self.swarm.rejoin(self._known_maddrs()), time.monotonic()

    def _renew(self) -> None:
        shard = self.state.active
        if shard is not None and shard in self.claims.held() and not self.claims.renew(shard):
            log.warning("lost the lease on shard %d; stopping its training", shard)
            self.events.record(EventKind.LEASE_LOST, shard=shard)
            self.state.lease_lost.set()

    def _collect_rejoin(self) -> None:
        job = self._rejoining
        if job is None or not job.done():
            return
        self._rejoining = None
        if job.exception() is not None:
            log.warning("rejoining the DHT failed: %s", job.exception())
        elif job.result():
            self.events.record(EventKind.REJOINED, peers=job.result())
            self._last_announce = 0.0  # hand the peers we found our records now

    def _known_maddrs(self) -> list[str]:
        """The initial peers and every peer seen in the last 10 minutes (for `Swarm.rejoin` after a partition or a
        restart); the peers seen are remembered in WORK/peers.json every SAVE_PERIOD seconds."""
        now = time.monotonic()
        for rec in self.swarm.peers():
            if rec.public_key != self.me:
                self._peer_maddrs[rec.public_key] = (now, list(rec.maddrs))
                self._seen[rec.public_key] = Seen(time.time(), tuple(rec.maddrs))
        self._peer_maddrs = {k: v for k, v in self._peer_maddrs.items() if now - v[0] < MADDR_MEMORY}
        if self.memory is not None and now - self._last_save >= SAVE_PERIOD:
            self._seen = {k: s for k, s in self._seen.items() if s.at > time.time() - MADDR_MEMORY}
            self.memory.save(self._seen)
            self._last_save = now
        return self.initial_peers + [m for _, maddrs in self._peer_maddrs.values() for m in maddrs]
