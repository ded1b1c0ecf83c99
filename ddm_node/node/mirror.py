"""Mirroring: every island keeps verified copies of the newest training state of R other shards.

Who mirrors a shard is decided by rendezvous hashing of (shard, peer key) over the live peers that
do not already hold it, so every shard gets R copies without coordination. A mirrored checkpoint
lives in the same layout as the island's own (`WORK/shard_k/step_s/{expert,state}`), is served over
gRPC and announced as a replica, so whoever takes the shard over next resumes from it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from ddm_node.core.config import SwarmConfig
from ddm_node.core.errors import DDMError
from ddm_node.core.events import EventKind, EventLog
from ddm_node.core.meter import Count, Gauge
from ddm_node.core.placement import rendezvous
from ddm_node.core.workdir import WorkDir, step_of
from ddm_node.exchange.candidates import Candidate, checkpoint_candidates
from ddm_node.exchange.fetch import (
    RejectedArtifact,
    RejectList,
    describe,
    failure_reason,
    fetch_checkpoint,
    signed_publisher,
)
from ddm_node.node.publisher import Publisher
from ddm_node.node.state import NodeState, Phase
from ddm_node.swarm.dht import Swarm
from ddm_node.swarm.records import CheckpointRecord, RecordKind
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.limits import ArtifactRules

log = logging.getLogger(__name__)
KEEP = 2  # mirrored checkpoints kept per shard
FULL_SWEEP_EVERY = 12  # every 12th sweep reads every shard's checkpoint records (see Mirror.targets)


class Mirror:
    """The mirror thread of an island (`loop`); `sweep` is one pass."""

    def __init__(self, swarm: Swarm, me: str, num_shards: int, rules: ArtifactRules, cfg: SwarmConfig, work: WorkDir,
                 state: NodeState, publisher: Publisher, rejects: RejectList, events: EventLog):
        self.swarm, self.me, self.num_shards, self.rules, self.cfg = swarm, me, num_shards, rules, cfg
        self.work, self.state, self.publisher, self.rejects, self.events = work, state, publisher, rejects, events
        self._paused: set[int] = set()
        self._lock = threading.Lock()
        self._seen: dict[int, set[str]] = {}  # shard -> every trainer and publisher of it seen so far
        self._sweeps = 0
        # the full sweeps of islands that started together fall on different sweeps (after the first, full one)
        self._phase = int(hashlib.sha256(me.encode()).hexdigest(), 16) % FULL_SWEEP_EVERY

    def pause(self, shard: int) -> None:
        with self._lock:
            self._paused.add(shard)

    def resume(self, shard: int) -> None:
        with self._lock:
            self._paused.discard(shard)

    def paused(self, shard: int) -> bool:
        with self._lock:
            return shard in self._paused

    def targets(self) -> dict[int, list[CheckpointRecord]]:
        """The shards this island mirrors: those where it ranks in the top R of the shard's rendezvous order.

        Ranking the live peers per shard (not shards per peer) gives every shard R mirrors whenever R
        peers besides its trainers are alive; ranking shards per peer could leave a shard with none
        (two idle islands may both pick the same R shards). Peers that publish or train the shard are
        left out of its order: they already hold it. Returns each such shard with its checkpoint records.

        A shard's checkpoint records (its publishers) are read only where this island ranks in the top R
        even with every holder it has seen of the shard left out: leaving out more peers only raises its
        rank, so no shard it would mirror is skipped, and each sweep reads about R keys, not K (at 32
        islands the K reads per sweep of every island took both cores of the simulation: bench.protocol),
        all in one DHT traversal (`Swarm.read_many`).
        A holder never seen (it trained and published the shard between two looks, and stopped training it)
        is found by a full sweep: the first, then every FULL_SWEEP_EVERY-th (at a phase of this island's own).
        """
        peers = self.swarm.peers()
        live = {r.public_key for r in peers if r.state != Phase.LEAVING.value} | {self.me}  # leaving: fetches nothing
        training: dict[int, set[str]] = {}
        for r in peers:
            training.setdefault(r.shard, set()).add(r.public_key)
        full = self._sweeps == 0 or self._sweeps % FULL_SWEEP_EVERY == self._phase
        self._sweeps += 1
        read = []
        for shard in range(self.num_shards):
            if shard == self.state.active or shard in self.state.trained:
                continue
            # only live peers matter below (live - seen): keeping the rest would grow with every identity ever seen
            seen = self._seen[shard] = (self._seen.get(shard, set()) | training.get(shard, set())) & live
            if full or self.me in self._top(shard, live - seen):
                read.append(shard)
        out = {}
        for shard, entries in self.swarm.read_many(RecordKind.CKPT, read).items():  # one DHT traversal
            checkpoints = [e.record for e in entries]
            holders = training.get(shard, set()) | {c.publisher for c in checkpoints}
            self._seen[shard] |= holders
            if self.me in self._top(shard, live - holders):
                out[shard] = checkpoints
        return out

    def _top(self, shard: int, candidates: set[str]) -> list[str]:
        """The first R of the shard's rendezvous order over `candidates` (peer keys)."""
        return rendezvous(f"mirror/{shard}", sorted(candidates))[: self.cfg.replicas]

    def loop(self) -> None:
        while not self.state.stop.wait(self.cfg.mirror_interval):
            try:
                self.sweep()
            except Exception as exc:  # one bad sweep must not end mirroring
                log.warning("mirror sweep failed: %s", exc)

    def sweep(self) -> None:
        for shard, checkpoints in self.targets().items():
            if self.state.stop.is_set():
                return
            if self.paused(shard):
                continue
            try:
                self._mirror(shard, checkpoints)
            except Exception as exc:  # the shard's boundary: one shard's peer data never ends the sweep
                log.warning("mirror of shard %d failed: %s", shard, describe(exc),
                            exc_info=None if isinstance(exc, DDMError) else exc)
            self._lag(shard, checkpoints)

    def _lag(self, shard: int, checkpoints: list[CheckpointRecord]) -> None:
        """How many steps our copy of a mirrored shard is behind its newest announced checkpoint."""
        if checkpoints:
            newest = max(c.step for c in checkpoints)
            held = step_of(ckpt.latest_checkpoint(self.work.root, shard))
            self.state.meter.set(Gauge.MIRROR_LAG, newest - held if held >= 0 else newest, label=str(shard))

    def _mirror(self, shard: int, checkpoints: list[CheckpointRecord]) -> None:
        """Fetch the newest verified checkpoint of a shard newer than ours, if any."""
        local_step = step_of(ckpt.latest_checkpoint(self.work.root, shard))
        for c in checkpoint_candidates(checkpoints, self.swarm.replicas(shard), exclude_holder=self.me):
            if c.step <= local_step:
                break
            if c.key in self.rejects:
                continue
            try:
                step_dir = self._fetch(shard, c)
                publisher = signed_publisher(step_dir)
                self.publisher.checkpoint(step_dir, shard, mirrored_from=publisher)
                ckpt.prune_checkpoints(self.work.root, shard, keep=KEEP)
                self.events.record(EventKind.MIRROR, shard=shard, step=c.step, publisher=publisher[:12])
                return
            except Exception as exc:  # one candidate's boundary: whatever its data does, the next one is tried
                if isinstance(exc, RejectedArtifact):
                    self.rejects.add(c.key, str(exc))
                self.state.meter.add(Count.FETCH_FAILURES, label=failure_reason(exc))
                log.warning("mirror of shard %d step %d failed: %s", shard, c.step, describe(exc),
                            exc_info=None if isinstance(exc, DDMError) else exc)

    def _fetch(self, shard: int, c: Candidate) -> Path:
        """A candidate's checkpoint (and the shard's statistics, when missing here) into the work dir through the one
        verified fetch; its step dir."""
        stats = [(r.manifest, r.grpc) for r in self.swarm.stats(shard)]
        return fetch_checkpoint(self.work.root, shard, c, self.rules, list(self.cfg.trusted_keys) or None, stats,
                                progress=self.state.meter.adder(Count.BYTES_FETCHED))
