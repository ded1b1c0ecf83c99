"""The island's work loop: claim and train shards until none is left, then the router job.

Shards are tried in this island's rendezvous order; a shard is skipped while another island holds its claim,
and, during the restart wait of an island returning to the run (`ClaimGate`), while nobody visibly holds any
state of it. A claimed shard is trained by `ShardJob`; its claim is released when training ends (finished,
stopped, or given back after a full disk), unless the lease was lost to another island.
"""

from __future__ import annotations

import logging

from ddm_node.core.events import EventKind, EventLog
from ddm_node.core.identity import Identity
from ddm_node.core.placement import rendezvous
from ddm_node.core.workdir import WorkDir
from ddm_node.data.plan import Plan
from ddm_node.node.gate import ClaimGate
from ddm_node.node.lease import Timing
from ddm_node.node.mirror import Mirror
from ddm_node.node.packs import PackKeeper
from ddm_node.node.progress import Progress
from ddm_node.node.publisher import Publisher
from ddm_node.node.shard_job import ShardJob
from ddm_node.node.state import NodeState, Phase
from ddm_node.swarm.claims import ClaimManager
from ddm_node.train.router_job import train_plan_router

log = logging.getLogger(__name__)


class WorkLoop:
    """`run()`: the island's main thread between start-up and serving."""

    def __init__(self, plan: Plan, work: WorkDir, identity: Identity, state: NodeState, claims: ClaimManager,
                 progress: Progress, gate: ClaimGate, job: ShardJob, mirror: Mirror, publisher: Publisher,
                 events: EventLog, timing: Timing, packs: PackKeeper):
        self.plan, self.work, self.identity, self.state, self.claims = plan, work, identity, state, claims
        self.progress, self.gate, self.job, self.mirror, self.publisher = progress, gate, job, mirror, publisher
        self.events, self.timing, self.packs = events, timing, packs
        self.me = identity.public_hex
        self.stop = state.stop

    def run(self) -> None:
        """Claim and train shards until none is left, then the router job.

        Each shard is checked for done just before it is tried (two DHT reads), in this island's rendezvous order
        (over all shards: the order of the shards not done is the same), rather than every shard first: that cost
        2K sequential DHT reads before an island's first claim (bench.protocol, 32 simulated islands started together:
        the last claim after 126 s with the reads first, 7-15 s without; docs/SCALE.md)."""
        while not self.stop.is_set() and not self.state.disk_full:
            left = False
            for shard in rendezvous(self.me, list(range(len(self.plan.shards)))):
                if self.stop.is_set():
                    return
                if self.progress.shard_done(shard):
                    continue
                left = True
                if self._claim(shard):
                    self._train(shard)
                    break
            else:
                if left:
                    self.state.phase = Phase.WAITING
                    self.stop.wait(self.timing.claim_retry)
                elif self.progress.router_done() or self._router_job():
                    return

    def _held_by_other(self, slot: int) -> bool:
        owner = self.claims.owner(slot)
        return owner is not None and owner.public_key != self.me

    def _claim(self, shard: int) -> bool:
        """Claim a shard unless another island holds it or the restart wait holds it back."""
        if not self.gate.may_claim(lambda: self.progress.has_state(shard)):
            return False
        if self._held_by_other(shard) or not self.claims.try_claim(shard):
            return False
        self.events.record(EventKind.CLAIM, shard=shard)
        return True

    def _train(self, shard: int) -> None:
        self.state.active, self.state.phase = shard, Phase.TRAINING
        self.state.trained.add(shard)
        self.state.lease_lost.clear()
        self.mirror.pause(shard)
        try:
            if self.packs.ensure([shard], self.timing.claim_retry):  # its data pack, when the dataset is not here
                self.job.run(shard)
        finally:
            self.state.active = None
            if not self.state.disk_full:
                self.mirror.resume(shard)
            if not self.state.lease_lost.is_set():
                self.claims.release(shard)
            self.state.phase = Phase.IDLE

    def _router_job(self) -> bool:
        """Claim the router job (claim slot K) and train it; False when someone else holds it (or, during the
        restart wait, may still announce one)."""
        slot = len(self.plan.shards)
        if self._held_by_other(slot) or not self.gate.may_claim(lambda: False):
            self.state.phase = Phase.WAITING
            self.stop.wait(2.0)
            return False
        if not self.claims.try_claim(slot):
            return False
        self.state.active, self.state.phase = slot, Phase.ROUTER
        try:
            if not self.packs.ensure(range(slot), self.timing.claim_retry):  # it learns from every shard's pack
                return False
            out = train_plan_router(self.plan, self.work.router, identity=self.identity, work_dir=self.work.root)
            self.publisher.router(out)
            self.events.record(EventKind.ROUTER, steps=self.plan.cfg.router.steps)
            return True
        finally:
            self.state.active, self.state.phase = None, Phase.IDLE
            self.claims.release(slot)
