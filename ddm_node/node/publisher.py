"""Publishing: serve a verified artifact over gRPC and announce it on the DHT.

A checkpoint this island wrote is announced as a checkpoint record, one it mirrored as a replica
record (naming the signed publisher). Every artifact is verified when registered, so the store only
ever serves what verifies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ddm_node.core.errors import DDMError
from ddm_node.core.events import EventKind, EventLog
from ddm_node.core.manifest import Manifest
from ddm_node.core.workdir import WorkDir
from ddm_node.exchange.announcer import Announcer
from ddm_node.swarm.records import CheckpointRecord, PackRecord, RecordKind, ReplicaRecord, RouterRecord, StatsRecord
from ddm_node.train import checkpoint as ckpt
from ddm_node.transfer.store import ArtifactStore

log = logging.getLogger(__name__)


@dataclass
class Publisher:
    """Serves and announces this island's artifacts."""

    store: ArtifactStore
    announcer: Announcer
    work: WorkDir
    me: str  # our public key
    grpc: str  # our announced gRPC address
    budget: int  # the plan's step count: a checkpoint at it is final
    trusted: list[str] | None
    events: EventLog

    def checkpoint(self, step_dir: Path, shard: int, mirrored_from: str | None = None) -> None:
        """Serve a verified step dir and announce it (ours as a checkpoint, others' as a replica)."""
        expert = self.store.register(step_dir / ckpt.EXPERT, trusted_keys=self.trusted)
        state = self.store.register(step_dir / ckpt.STATE, trusted_keys=self.trusted)
        if mirrored_from is None:
            self.events.record(EventKind.CHECKPOINT, shard=shard, step=expert.step)
            self.announcer.announce(CheckpointRecord(shard, expert.step, expert.id, state.id, self.me, self.grpc,
                                                     final=expert.step >= self.budget))
        else:
            self.announcer.announce(ReplicaRecord(shard, expert.step, expert.id, state.id, mirrored_from, self.me,
                                                  self.grpc))
        self.stats(shard)
        self._sweep_store()

    def stats(self, shard: int) -> None:
        """Serve and announce the shard's statistics artifact once it exists."""
        stats = self.work.stats(shard)
        if stats.is_dir() and self.announcer.current(RecordKind.STATS, shard) is None:
            m = self.store.register(stats, trusted_keys=self.trusted)
            self.announcer.announce(StatsRecord(shard, m.id, self.grpc))

    def pack(self, pack_dir: Path, slot: int, pack: str) -> Manifest:
        """Serve a data pack (every file hashed against its signed manifest) and announce that we hold it."""
        m = self.store.register(pack_dir, trusted_keys=self.trusted)
        self.announcer.announce(PackRecord(slot, pack, m.id, m.publisher, self.me, self.grpc))
        return m

    def router(self, router_dir: Path) -> None:
        m = self.store.register(router_dir, trusted_keys=self.trusted)
        self.announcer.announce(RouterRecord(m.id, m.step, self.grpc, self.me))

    def withdraw(self, shard: int, expert_id: str, state_id: str) -> None:
        """Stop serving a checkpoint and stop re-announcing it as our replica."""
        self.announcer.forget(RecordKind.REPLICA, shard, when=lambda r: r.expert_manifest == expert_id)
        self.store.unregister(expert_id)
        self.store.unregister(state_id)

    def local(self, num_shards: int) -> None:
        """Serve and announce what the work dir already holds (after a restart)."""
        for shard in range(num_shards):
            step_dir = ckpt.latest_checkpoint(self.work.root, shard, require_signature=True,
                                              trusted_keys=self.trusted)
            if step_dir is None:
                continue
            publisher = ckpt.verify_checkpoint(step_dir, require_signature=True)[0].publisher
            self.checkpoint(step_dir, shard, mirrored_from=None if publisher == self.me else publisher)
        if self.work.router.is_dir():
            try:
                self.router(self.work.router)
            except DDMError as exc:
                log.warning("not serving local router %s: %s", self.work.router, exc)

    def _sweep_store(self) -> None:
        """Stop serving artifacts whose directories were pruned."""
        for ref in self.store.list():
            stored = self.store.manifest(ref.manifest_id)
            if stored is not None and not Path(stored.directory).is_dir():
                self.store.unregister(ref.manifest_id)
