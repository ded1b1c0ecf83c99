"""A simulated island: the real island parts (node/: `WorkLoop`, `ClaimManager`, `LeaseKeeper`, `Announcer`,
`Publisher`, `Mirror`, `Progress`) composed as `node/island.py` composes them, on an `IslandSwarm` that shares its host's
DHT peer and on its host's gRPC server. What is simulated: training (`SimJob` writes a tiny signed checkpoint every
`checkpoint_every` seconds) and the mirror's content check (`SimMirror` fetches tiny artifacts through the real
transfer code, `artifacts.fetch_tiny_checkpoint`). No torch runs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.protocol.artifacts import SimPlan, TinyRules, fetch_tiny_checkpoint, write_checkpoint, write_stats
from bench.protocol.shared import IslandSwarm, SharedKeysValidator
from ddm_node import __version__
from ddm_node.core.config import SwarmConfig
from ddm_node.core.events import EventKind, EventLog
from ddm_node.core.identity import Identity
from ddm_node.core.live import LiveProgress
from ddm_node.core.workdir import WorkDir, step_of
from ddm_node.exchange.announcer import Announcer
from ddm_node.exchange.candidates import Candidate
from ddm_node.exchange.done import DoneCheck
from ddm_node.exchange.fetch import RejectList
from ddm_node.node.gate import ClaimGate
from ddm_node.node.lease import LeaseKeeper, Timing
from ddm_node.node.mirror import KEEP, Mirror
from ddm_node.node.progress import Progress
from ddm_node.node.publisher import Publisher
from ddm_node.node.state import NodeState
from ddm_node.node.work import WorkLoop
from ddm_node.swarm.addresses import record_maddrs
from ddm_node.swarm.claims import ClaimManager
from ddm_node.swarm.dht import Swarm, dht_time
from ddm_node.swarm.records import PeerRecord, PlanRecord
from ddm_node.train import checkpoint as ckpt
from ddm_node.transfer.server import TransferServer
from ddm_node.transfer.store import ArtifactStore, NodeInfoData

log = logging.getLogger(__name__)
POLL = 0.25  # seconds between looks at the stop and lease-lost flags while a simulated shard trains


@dataclass(frozen=True)
class SimSettings:
    """The simulated run: the swarm's timing (the product defaults unless a test shortens them), how often a training
    island checkpoints, and the size of each tiny artifact."""

    swarm: SwarmConfig
    checkpoint_every: float = 30.0
    steps_per_checkpoint: int = 100
    artifact_bytes: int = 1024


class Host:
    """One DHT peer (a hivemind child and its p2pd) and one gRPC server, shared by the islands of `identities`."""

    def __init__(self, identities: list[Identity], run_id: str, initial_peers: list[str]):
        self.identities = identities
        self.swarm = Swarm(identities[0], run_id, initial_peers=initial_peers,
                           validator=SharedKeysValidator(identities))
        self.maddrs = self.swarm.visible_maddrs()
        self.store = ArtifactStore()
        self.server: TransferServer | None = None
        self.grpc = ""

    def serve(self) -> None:
        """Start the gRPC server (after every DHT child is forked: a fork under live gRPC threads can hang)."""
        self.server = TransferServer(self.store, NodeInfoData(peer_id=self.swarm.peer_id,
                                                              public_key=self.identities[0].public_hex))
        self.grpc = self.server.start()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0)
        self.swarm.shutdown()


class PacksHeld:
    """The run has no data packs: a shard's data is always here."""

    def ensure(self, slots, timeout: float) -> bool:
        return True


class SimJob:
    """Trains a claimed shard in name only: a tiny checkpoint every `checkpoint_every` seconds, published and announced
    as `ShardJob` does, with live progress in the heartbeat; returns when stopped or the lease is lost."""

    def __init__(self, island: SimIsland):
        self.island = island

    def run(self, shard: int) -> None:
        isl, s = self.island, self.island.settings
        work = isl.work.root
        step = max(step_of(ckpt.latest_checkpoint(work, shard)), 0)
        if not ckpt.stats_dir(work, shard).is_dir():
            write_stats(work, isl.plan.run_id, shard, isl.identity, s.artifact_bytes)
        isl.publisher.stats(shard)
        isl.state.live = live = LiveProgress(shard, isl.plan.cfg.train.steps, 32)
        live.start(step)
        isl.events.record(EventKind.TRAIN, shard=shard, step=step)
        try:
            while self._train_for(s.checkpoint_every):
                step += s.steps_per_checkpoint
                live.update(step, [0.5])
                step_dir = write_checkpoint(work, isl.plan.run_id, shard, step, isl.identity, s.artifact_bytes)
                isl.publisher.checkpoint(step_dir, shard)
                ckpt.prune_checkpoints(work, shard, keep=KEEP)
        finally:
            isl.state.live = None

    def _train_for(self, seconds: float) -> bool:
        """Wait `seconds` unless training must stop first; True when it may go on."""
        end = time.monotonic() + seconds
        state = self.island.state
        while time.monotonic() < end:
            if state.should_stop_training():
                return False
            time.sleep(min(POLL, end - time.monotonic()))
        return not state.should_stop_training()


class SimMirror(Mirror):
    """The real mirror (placement, sweep, candidates, publish, prune); only the fetch skips the content load."""

    def _fetch(self, shard: int, c: Candidate) -> Path:
        return fetch_tiny_checkpoint(self.work.root, shard, c, self.rules)


class SimIsland:
    """One simulated island (see the module docstring): `start` spawns the keeper, mirror and work-loop threads."""

    def __init__(self, name: str, identity: Identity, host: Host, plan: SimPlan, settings: SimSettings, root: Path):
        self.name, self.identity, self.host, self.plan, self.settings = name, identity, host, plan, settings
        self.me = identity.public_hex
        self.work = WorkDir(root / name)
        self.work.root.mkdir(parents=True, exist_ok=True)
        self.swarm = IslandSwarm(host.swarm, identity)
        self.state = NodeState()
        self.events = EventLog(self.work.events, self.me[:12])
        self._threads: list[threading.Thread] = []
        self._compose(host.grpc)

    def _compose(self, grpc: str) -> None:
        cfg, rules = self.settings.swarm, TinyRules(self.plan.run_id)
        self.announcer = Announcer(self.swarm, cfg.announce_ttl)
        self.claims = ClaimManager(self.swarm, ttl=cfg.lease_ttl, settle=cfg.settle, grpc=grpc)
        self.progress = Progress(self.plan, self.work, self.swarm, DoneCheck(rules, None, self.work.root), False)
        self.publisher = Publisher(self.host.store, self.announcer, self.work, self.me, grpc, rules.steps, None,
                                   self.events)
        self.mirror = SimMirror(self.swarm, self.me, self.plan.num_shards, rules, cfg, self.work, self.state,
                                self.publisher, RejectList(), self.events)
        self.timing = Timing(cfg)
        self.keeper = LeaseKeeper(self.swarm, self.claims, self.announcer, self.timing, self.state, self.events,
                                  self.me, self.heartbeat_record, [m for m in self.host.maddrs])
        gate = ClaimGate(False, None, set, max_wait=0.0, blind_wait=0.0)
        self.loop = WorkLoop(self.plan, self.work, self.identity, self.state, self.claims, self.progress, gate,
                             SimJob(self), self.mirror, self.publisher, self.events, self.timing, PacksHeld())

    def start(self) -> None:
        """Announce the plan, then run the keeper, the mirror and the work loop, as `Island.start` does."""
        self.announcer.announce(PlanRecord(self.plan.run_id, self.host.grpc))
        self.events.record(EventKind.START, grpc=self.host.grpc, peer_id=self.swarm.peer_id, run_id=self.plan.run_id)
        for fn, name in ((self.keeper.run, "keeper"), (self.mirror.loop, "mirror"), (self.loop.run, "work")):
            t = threading.Thread(target=fn, name=f"{self.name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def heartbeat_record(self) -> PeerRecord:
        active = self.state.active
        maddrs = record_maddrs(self.swarm.visible_maddrs(), self.swarm.peer_id)
        return PeerRecord(peer_id=self.swarm.peer_id, public_key=self.me, grpc=self.host.grpc, maddrs=maddrs,
                          version=__version__, heartbeat=dht_time(), state=self.state.phase.value,
                          shard=-1 if active is None else active, **self.state.live_fields())

    def stop(self) -> None:
        """Stop the threads and give the claim back (the lease would otherwise expire). The work loop releases its
        claim as it ends; then this island's swarm view closes, so a sweep or tick still in DHT calls ends at once."""
        self.state.stop.set()
        for t in self._threads:
            if t.name.endswith("-work"):
                t.join(timeout=30)
        for shard in self.claims.held():
            try:
                self.claims.release(shard)
            except Exception as exc:  # the DHT may be gone already; the lease then expires
                log.debug("release of shard %d: %s", shard, exc)
        self.swarm.shutdown()
        for t in self._threads:
            t.join(timeout=30)
