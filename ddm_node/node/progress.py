"""What work is left in a run, as this island can prove it: a shard is done when a final checkpoint of it is
here, or a peer announces one (its own, or a replica of someone's) that a verified, loadable expert backs
(`exchange.done.DoneCheck`: a DHT record alone proves nothing, and neither does a signed manifest without the
bytes it names). Replicas count so that after a whole-swarm restart a mirror's copy of a finished shard keeps it
finished while its trainer is still down."""

from __future__ import annotations

from ddm_node.core.workdir import WorkDir, step_of
from ddm_node.data.plan import Plan
from ddm_node.exchange.done import DoneCheck
from ddm_node.swarm.dht import Swarm
from ddm_node.train import checkpoint as ckpt


class Progress:
    """Done checks over the local work dir and the swarm's announcements (verified, verdicts cached)."""

    def __init__(self, plan: Plan, work: WorkDir, swarm: Swarm, checks: DoneCheck, router_job: bool):
        self.plan, self.work, self.swarm, self.checks, self.router_job = plan, work, swarm, checks, router_job
        self.budget = plan.cfg.train.steps

    def shard_done(self, shard: int) -> bool:
        if step_of(ckpt.latest_checkpoint(self.work.root, shard)) >= self.budget:
            return True
        return self.checks.shard(shard, self.swarm.checkpoints(shard), self.swarm.replicas(shard))

    def has_state(self, shard: int) -> bool:
        """Some training state of the shard is visible: a checkpoint here, or one announced (not verified: this
        only decides whether to claim now or after the restart wait, `ClaimGate`)."""
        return (ckpt.latest_checkpoint(self.work.root, shard) is not None or bool(self.swarm.checkpoints(shard))
                or bool(self.swarm.replicas(shard)))

    def pending(self) -> list[int]:
        """Shards not done, in index order."""
        return [s for s in range(len(self.plan.shards)) if not self.shard_done(s)]

    def router_done(self) -> bool:
        return not self.router_job or self.work.router.is_dir() or self.checks.router(self.swarm.routers())
