"""What work is left in a run, as this island can prove it: a shard is done when a final checkpoint of it is
here, or a peer announces one (its own, or a replica of someone's) whose signed manifest says so (a DHT record
alone proves nothing). Replicas count so that after a whole-swarm restart a mirror's copy of a finished shard
keeps it finished while its trainer is still down."""

from __future__ import annotations

from ddm_node.core.workdir import WorkDir, step_of
from ddm_node.data.plan import Plan
from ddm_node.exchange.fetch import AnnouncementCheck, Expected
from ddm_node.swarm.dht import Swarm
from ddm_node.train import checkpoint as ckpt


class Progress:
    """Done checks over the local work dir and the swarm's announcements (verified, verdicts cached)."""

    def __init__(self, plan: Plan, work: WorkDir, swarm: Swarm, checks: AnnouncementCheck, router_job: bool):
        self.plan, self.work, self.swarm, self.checks, self.router_job = plan, work, swarm, checks, router_job
        self.budget = plan.cfg.train.steps

    def shard_done(self, shard: int) -> bool:
        if step_of(ckpt.latest_checkpoint(self.work.root, shard)) >= self.budget:
            return True
        finals = [(r.expert_manifest, r.grpc, r.step) for r in self.swarm.checkpoints(shard)
                  if r.final and r.step >= self.budget]
        finals += [(r.expert_manifest, r.grpc, r.step) for r in self.swarm.replicas(shard)
                   if r.step >= self.budget and r.publisher_of_checkpoint != r.holder_key]  # a copy of another's
        return any(self.checks.holds(m, grpc, Expected(ckpt.EXPERT, self.plan.run_id, shard, step))
                   for m, grpc, step in finals)

    def has_state(self, shard: int) -> bool:
        """Some training state of the shard is visible: a checkpoint here, or one announced (not verified: this
        only decides whether to claim now or after the restart wait, `ClaimGate`)."""
        return (ckpt.latest_checkpoint(self.work.root, shard) is not None or bool(self.swarm.checkpoints(shard))
                or bool(self.swarm.replicas(shard)))

    def pending(self) -> list[int]:
        """Shards not done, in index order."""
        return [s for s in range(len(self.plan.shards)) if not self.shard_done(s)]

    def router_done(self) -> bool:
        return (not self.router_job or self.work.router.is_dir()
                or any(self.checks.holds(r.manifest, r.grpc, Expected("router", self.plan.run_id, -1, r.step))
                       for r in self.swarm.routers()))
