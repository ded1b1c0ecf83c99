"""Training one claimed shard: resume from the newest verified checkpoint anywhere in the swarm, train
(one process, or a supervised DDP worker group), publish every checkpoint, and handle the two ways a
shard's training can end badly without ending the island: a full disk, and a peer's checkpoint that
verified but does not load (for any reason). Such a checkpoint is quarantined: moved to
WORK/quarantine/ (the newest `QUARANTINE_KEEP` are kept there for a post-mortem) and put on the island's
persisted reject list, so neither this run nor the next start loads or fetches it again.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ddm_node.core.errors import DDMError
from ddm_node.core.events import EventKind, EventLog
from ddm_node.core.identity import Identity
from ddm_node.core.live import LiveProgress
from ddm_node.core.meter import Count
from ddm_node.core.workdir import WorkDir, step_of
from ddm_node.data.plan import Plan
from ddm_node.exchange.candidates import checkpoint_candidates
from ddm_node.exchange.fetch import (
    RejectedArtifact,
    RejectList,
    describe,
    failure_reason,
    fetch_checkpoint,
    signed_publisher,
)
from ddm_node.node.mirror import Mirror
from ddm_node.node.publisher import Publisher
from ddm_node.node.state import NodeState
from ddm_node.swarm.dht import Swarm
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.checkpointer import DiskFull, is_disk_full
from ddm_node.train.expert import train_shard
from ddm_node.train.limits import ArtifactRules
from ddm_node.train.supervisor import train_shard_distributed

log = logging.getLogger(__name__)
QUARANTINE = "quarantine"  # WORK/quarantine/: peers' checkpoints that verified but did not load
QUARANTINE_KEEP = 4  # quarantined checkpoints kept (older ones are deleted: a peer could send many)


@dataclass(frozen=True)
class TrainSettings:
    """How this island trains: device, processes, and the key file its DDP workers sign with."""

    device: str | None
    nproc: int
    identity: Identity
    identity_path: Path | None


class ShardJob:
    """Trains claimed shards of one plan (`run(shard)`)."""

    def __init__(self, plan: Plan, rules: ArtifactRules, work: WorkDir, swarm: Swarm, settings: TrainSettings,
                 state: NodeState, publisher: Publisher, mirror: Mirror, rejects: RejectList, events: EventLog,
                 trusted: list[str] | None):
        self.plan, self.rules, self.work, self.swarm, self.settings, self.state = plan, rules, work, swarm, settings, state
        self.publisher, self.mirror, self.rejects, self.events, self.trusted = (publisher, mirror, rejects, events,
                                                                                trusted)
        self._loaded = threading.Event()  # set once the trainer resumed (one process: the state loaded)

    def run(self, shard: int) -> None:
        """Train `shard` (already claimed) until its budget, a stop, a lost lease or a full disk; then the island
        hands the claim back (recorded here, where the outcome is known)."""
        try:
            self._run(shard)
        finally:
            if not self.state.lease_lost.is_set():
                done = step_of(ckpt.latest_checkpoint(self.work.root, shard)) >= self.plan.cfg.train.steps
                reason = ("done" if done else "disk full" if self.state.disk_full
                          else "stopping" if self.state.stop.is_set() else "training ended")
                self.events.record(EventKind.RELEASE, shard=shard, reason=reason)

    def _run(self, shard: int) -> None:
        self.resume_from_swarm(shard)
        if self.state.should_stop_training():
            return
        resumed = ckpt.latest_checkpoint(self.work.root, shard)
        self._loaded.clear()
        try:
            self._train(shard)
        except (DiskFull, OSError) as exc:
            if not isinstance(exc, DiskFull) and not is_disk_full(exc):
                raise
            self._on_disk_full(shard, exc)
            return
        except Exception as exc:  # the shard's boundary: a peer's checkpoint that does not load never ends the island
            if not self._quarantine_unloadable(shard, resumed, exc):
                raise
            return
        self.publisher.stats(shard)
        if step_of(ckpt.latest_checkpoint(self.work.root, shard)) >= self.plan.cfg.train.steps:
            self.events.record(EventKind.DONE, shard=shard, step=self.plan.cfg.train.steps)

    def _train(self, shard: int) -> None:
        s = self.settings
        train = self.plan.cfg.train
        live = LiveProgress(shard, train.steps, train.batch_size * train.grad_accum)

        def on_start(step: int) -> None:
            if s.nproc <= 1:  # one process: the state is loaded by now (a DDP group loads it after this call)
                self._loaded.set()
            live.start(step)
            self.state.live = live  # the heartbeat, metrics and console read it from now on
            self.events.record(EventKind.TRAIN, shard=shard, step=step)

        hooks = dict(device=s.device, on_checkpoint=lambda d: self.publisher.checkpoint(d, shard),
                     should_stop=self.state.should_stop_training, on_start=on_start, on_losses=live.update)
        try:
            if s.nproc > 1:  # a DDP worker group under torchrun, supervised (ddm_node/train/supervisor.py)
                train_shard_distributed(self.plan, shard, self.work.root, s.nproc, identity_path=s.identity_path,
                                        on_event=lambda kind, fields: self.events.record(kind, shard=shard, **fields),
                                        **hooks)
            else:
                train_shard(self.plan, shard, self.work.root, identity=s.identity, **hooks)
        finally:
            self.state.live = None

    def resume_from_swarm(self, shard: int) -> None:
        """Fetch the newest verified checkpoint of the shard from the swarm when it is newer than ours."""
        local = ckpt.latest_checkpoint(self.work.root, shard)
        local_step = step_of(local)
        for c in checkpoint_candidates(self.swarm.checkpoints(shard), self.swarm.replicas(shard)):
            if c.step <= local_step:
                break
            if c.key in self.rejects:
                continue
            try:
                step_dir = fetch_checkpoint(self.work.root, shard, c, self.rules, self.trusted,
                                            progress=self.state.meter.adder(Count.BYTES_FETCHED))
                publisher = signed_publisher(step_dir)
                self.events.record(EventKind.RESUME, shard=shard, step=c.step, source="swarm",
                                   publisher=publisher[:12], holders=tuple(c.holders))
                mine = publisher == self.publisher.me
                self.publisher.checkpoint(step_dir, shard, mirrored_from=None if mine else publisher)
                return
            except Exception as exc:  # one candidate's boundary: whatever its data does, the next one is tried
                if isinstance(exc, RejectedArtifact):
                    self.rejects.add(c.key, str(exc))
                self.state.meter.add(Count.FETCH_FAILURES, label=failure_reason(exc))
                log.warning("shard %d: checkpoint at step %d unusable: %s", shard, c.step, describe(exc),
                            exc_info=None if isinstance(exc, DDMError) else exc)
        if local:
            publisher = ckpt.verify_checkpoint(local)[0].publisher
            source = "local mirror" if publisher != self.publisher.me else "local"
            self.events.record(EventKind.RESUME, shard=shard, step=local_step, source=source, publisher=publisher[:12])

    def _on_disk_full(self, shard: int, exc: BaseException) -> None:
        """A checkpoint did not fit even after pruning: stop training and mirroring, give the shard back (another
        island resumes it from our newest checkpoint, which stays intact and served), keep serving. A restart
        after space was freed resumes normal work."""
        newest = ckpt.latest_checkpoint(self.work.root, shard)
        step = step_of(newest) if newest else None
        log.error("DISK FULL in %s: %s; shard %d goes back to the swarm, newest checkpoint (step %s) is still "
                  "served; this island stops training and mirroring until restarted with more space",
                  self.work.root, exc, shard, step)
        self.state.disk_full = True
        for s in range(len(self.plan.shards)):
            self.mirror.pause(s)
        self.events.record(EventKind.DISK_FULL, shard=shard, step=step, error=str(exc)[:200])

    def _quarantine_unloadable(self, shard: int, resumed: Path | None, exc: Exception) -> bool:
        """A peer's checkpoint that verified but does not load, for any reason (a valid signer's garbage, a number
        out of range, an exception of a kind nobody expected), must not end the island, now or at any later
        start: remember it in the persisted reject list, stop serving it, move it to WORK/quarantine/ and give
        the shard back (the next claim resumes from something else). False when the failure is not about such
        a checkpoint: the state had loaded (one process), training wrote a checkpoint of ours since, or the
        checkpoint is our own (then it is our bug, and it is raised)."""
        if resumed is None or self._loaded.is_set() or ckpt.latest_checkpoint(self.work.root, shard) != resumed:
            return False
        try:
            expert, state = ckpt.verify_checkpoint(resumed)
        except DDMError:
            return False
        if expert.publisher == self.publisher.me:
            return False
        why = describe(exc)
        self.rejects.add(((expert.id, state.id), expert.step), why)  # first: remembered even if the move fails
        self.publisher.withdraw(shard, expert.id, state.id)
        where = self._quarantine(shard, resumed)
        log.warning("shard %d: checkpoint step %d by %s verified but does not load (%s); quarantined in %s",
                    shard, expert.step, expert.publisher[:12], why, where,
                    exc_info=None if isinstance(exc, DDMError) else exc)
        self.events.record(EventKind.REJECTED, shard=shard, step=expert.step, publisher=expert.publisher[:12],
                           reason=why[:500])
        return True

    def _quarantine(self, shard: int, step_dir: Path) -> Path | None:
        """Move a step dir to WORK/quarantine/ (one rename: it never looks like a checkpoint again) and keep the
        newest QUARANTINE_KEEP there; None when it could not be moved (then it is deleted, as before)."""
        root = self.work.root / QUARANTINE
        dest = root / f"shard_{shard:03d}-{step_dir.name}-{time.time_ns()}"
        try:
            root.mkdir(exist_ok=True)
            os.rename(step_dir, dest)
        except OSError as exc:
            log.warning("could not move %s to %s (%s); deleting it", step_dir, root, exc.strerror or exc)
            doomed = step_dir.with_name(f".{step_dir.name}.rejected-{os.getpid()}")
            os.rename(step_dir, doomed)  # first, so a half-deleted directory never looks like a checkpoint
            shutil.rmtree(doomed, ignore_errors=True)
            return None

        def moved_at(p: Path) -> int:
            suffix = p.name.rsplit("-", 1)[-1]
            return int(suffix) if suffix.isdigit() else 0

        kept = sorted((p for p in root.iterdir() if p.is_dir()), key=moved_at, reverse=True)
        for old in kept[QUARANTINE_KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
        return dest
