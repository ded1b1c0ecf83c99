"""Leaving without losing steps: after a stop, the island keeps serving until another peer holds its newest
checkpoints.

On SIGTERM/SIGINT the trainer writes a checkpoint at the step it reached, announces it and releases its
claim; until now the island then left at once, before any mirror had fetched that checkpoint, and the takeover
resumed from an older, mirrored one (steps lost). `Handoff.wait` bridges the gap: it tells the swarm that this
island is leaving (its heartbeat's phase, so peers neither wait for it nor rank it as a mirror), then polls
until every shard whose newest checkpoint is ours is held by another peer, as that peer's announcement says
and its server confirms: a replica of that checkpoint (a mirror's copy, or the taker's, which fetches it from
us to resume), or a newer checkpoint of the shard. It gives up after `timeout` seconds, or at once when no
live peer is left that could take it (every other island is gone or leaving too: a whole-swarm stop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ddm_node.core.errors import DDMError
from ddm_node.core.events import EventKind, EventLog
from ddm_node.exchange.announcer import Announcer
from ddm_node.exchange.done import DoneCheck
from ddm_node.exchange.fetch import Expected
from ddm_node.node.state import Phase
from ddm_node.swarm.dht import Swarm
from ddm_node.swarm.records import CheckpointRecord, RecordKind
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.limits import ArtifactRules

log = logging.getLogger(__name__)
POLL = 0.5  # seconds between looks at the swarm while handing over
IDLE_PHASES = {Phase.LEAVING.value, Phase.DISK_FULL.value}  # peers that will not fetch anything


class Handoff:
    """See the module docstring. `announce_leaving` puts this node's leaving heartbeat on the DHT."""

    def __init__(self, swarm: Swarm, announcer: Announcer, checks: DoneCheck, me: str, rules: ArtifactRules,
                 num_shards: int, events: EventLog, announce_leaving: Callable[[], None]):
        self.swarm, self.announcer, self.checks, self.me, self.rules = swarm, announcer, checks, me, rules
        self.num_shards, self.events, self.announce_leaving = num_shards, events, announce_leaving

    def wait(self, timeout: float, abort: threading.Event | None = None) -> bool:
        """Serve until our newest checkpoints are held elsewhere (True), or give up (False); see the module doc."""
        ours = [r for r in (self.announcer.current(RecordKind.CKPT, s) for s in range(self.num_shards)) if r]
        try:
            # Always, even with nothing to hand over: a peer handing over its own checkpoints must not count us as a
            # taker until our last heartbeat expires (in a whole-swarm stop every trainer waited out that TTL).
            self.announce_leaving()
            return True if timeout <= 0 or not ours else self._wait(ours, timeout, abort)
        except DDMError as exc:  # the DHT died: the checkpoints stay on disk, announced again at the next start
            log.warning("leaving without a hand-off: %s", exc)
            return not ours

    def _wait(self, ours: list[CheckpointRecord], timeout: float, abort: threading.Event | None) -> bool:
        t0 = time.monotonic()
        pending = ours
        while True:
            pending = [r for r in pending if not self.held_elsewhere(r)]
            waited = time.monotonic() - t0
            if not pending:
                log.info("handed over in %.1f s: another peer holds %s", waited, _steps(ours))
                for r in ours:
                    self.events.record(EventKind.HANDOFF, shard=r.shard, step=r.step)
                return True
            why = ("no live peer could take it" if not self.takers() else
                   f"no peer fetched it in {timeout:.0f} s" if waited >= timeout else
                   "asked to leave at once" if abort is not None and abort.is_set() else None)
            if why is not None:
                log.warning("leaving with %s held nowhere else: %s", _steps(pending), why)
                for r in pending:
                    self.events.record(EventKind.HANDOFF, shard=r.shard, step=r.step, reason=why)
                return False
            time.sleep(POLL)

    def takers(self) -> list[str]:
        """Keys of live peers (a heartbeat not yet expired) that could still fetch from us: not leaving, not
        disk-full."""
        return [p.public_key for p in self.swarm.peers() if p.public_key != self.me and p.state not in IDLE_PHASES]

    def held_elsewhere(self, ours: CheckpointRecord) -> bool:
        """Another peer announces, and its server confirms, a copy of our checkpoint or a newer one of the shard."""
        shard = ours.shard
        claims = [(r.expert_manifest, r.grpc, r.step) for r in self.swarm.replicas(shard)
                  if r.holder_key != self.me and (r.expert_manifest == ours.expert_manifest or r.step > ours.step)]
        claims += [(r.expert_manifest, r.grpc, r.step) for r in self.swarm.checkpoints(shard)
                   if r.publisher != self.me and r.step > ours.step]
        return any(self.checks.announced(m, grpc, Expected(ckpt.EXPERT, self.rules, shard, step))
                   for m, grpc, step in claims)


def _steps(records: list[CheckpointRecord]) -> str:
    return ", ".join(f"shard {r.shard} step {r.step}" for r in records)
