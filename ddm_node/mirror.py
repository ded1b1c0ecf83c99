"""Mirroring: every island keeps verified copies of the newest training state of R other shards.

Which shards an island mirrors is decided by rendezvous hashing of (its key, shard), so copies
spread over the swarm without coordination. A mirrored checkpoint lives in the same layout as the
island's own (`WORK/shard_k/step_s/{expert,state}`), is served over gRPC and announced as a replica,
so whoever takes the shard over next resumes from it.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ddm_node.errors import DDMError, IntegrityError
from ddm_node.manifest import commit_dir, staging_dir
from ddm_node.swarm.dht import Swarm
from ddm_node.train import checkpoint as ckpt
from ddm_node.transfer.client import fetch_artifact

if TYPE_CHECKING:
    from ddm_node.daemon import Island

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteCheckpoint:
    """One checkpoint as announced in the swarm, with every holder that serves it."""

    step: int
    expert_manifest: str
    state_manifest: str
    holders: tuple[str, ...]
    publisher: str

    def __iter__(self):  # unpack as (step, expert, state, holders, publisher)
        return iter((self.step, self.expert_manifest, self.state_manifest, list(self.holders), self.publisher))


def newest_remote(swarm: Swarm, shard: int, exclude_key: str | None = None) -> list[RemoteCheckpoint]:
    """Announced checkpoints and replicas of a shard, grouped by manifest, newest step first."""
    groups: dict[tuple[str, str], dict] = {}
    for r in swarm.checkpoints(shard):
        g = groups.setdefault((r.expert_manifest, r.state_manifest), {"step": r.step, "pub": r.publisher, "h": []})
        g["h"].append(r.grpc)
    for r in swarm.replicas(shard):
        if exclude_key is not None and r.holder_key == exclude_key:
            continue
        g = groups.setdefault((r.expert_manifest, r.state_manifest),
                              {"step": r.step, "pub": r.publisher_of_checkpoint, "h": []})
        g["h"].append(r.grpc)
    out = [RemoteCheckpoint(g["step"], e, s, tuple(dict.fromkeys(g["h"])), g["pub"]) for (e, s), g in groups.items()]
    return sorted(out, key=lambda c: c.step, reverse=True)


def fetch_checkpoint(work_dir: Path, shard: int, step: int, expert_id: str, state_id: str, holders: list[str],
                     run_id: str, trusted_keys: Iterable[str] = (), stats_holders: list[tuple[str, str]] = ()) -> Path:
    """Fetch both artifacts of a checkpoint into WORK/shard_k/step_s atomically and verify them.

    The announced step, shard and run must match the signed manifests; a record that lies is an
    IntegrityError and nothing is kept.
    """
    trusted = list(trusted_keys) or None
    final = ckpt.checkpoint_dir(work_dir, shard, step)
    stage = staging_dir(final)
    try:
        for kind, manifest_id in ((ckpt.EXPERT, expert_id), (ckpt.STATE, state_id)):
            m = fetch_artifact(holders, manifest_id, stage / kind, trusted_keys=trusted)  # verified on arrival
            if (m.kind, m.run_id, m.shard, m.step) != (kind, run_id, shard, step):
                raise IntegrityError(f"{kind} announced as run {run_id[:12]} shard {shard} step {step} is a "
                                     f"{m.kind} of run {m.run_id[:12]} shard {m.shard} step {m.step}")
        commit_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for manifest_id, holder in stats_holders:
        if ckpt.stats_dir(work_dir, shard).is_dir():
            break
        try:
            fetch_artifact([holder], manifest_id, ckpt.stats_dir(work_dir, shard), trusted_keys=trusted)
        except DDMError as exc:
            log.warning("stats of shard %d from %s: %s", shard, holder, exc)
    return final


class Mirror:
    """The mirror thread of an island."""

    def __init__(self, island: "Island"):
        self.island = island
        self._paused: set[int] = set()
        self._lock = threading.Lock()

    def pause(self, shard: int) -> None:
        with self._lock:
            self._paused.add(shard)

    def resume(self, shard: int) -> None:
        with self._lock:
            self._paused.discard(shard)

    def targets(self) -> list[int]:
        """The R shards this island mirrors: top of its rendezvous order, skipping what it trains or trained."""
        from ddm_node.daemon import rendezvous

        isl = self.island
        shards = [s for s in range(len(isl.plan.shards)) if s != isl.active and s not in isl.trained]
        return rendezvous("mirror/" + isl.me, shards)[: isl.cfg.replicas]

    def loop(self) -> None:
        isl = self.island
        while not isl.stop.wait(isl.cfg.mirror_interval):
            try:
                self.sweep()
            except Exception as exc:  # one bad sweep must not end mirroring
                log.warning("mirror sweep failed: %s", exc)

    def sweep(self) -> None:
        isl = self.island
        for shard in self.targets():
            with self._lock:
                if shard in self._paused:
                    continue
            if isl.stop.is_set():
                return
            local = ckpt.latest_checkpoint(isl.work_dir, shard)
            local_step = int(local.name.split("_")[1]) if local else -1
            for remote in newest_remote(isl.swarm, shard, exclude_key=isl.me):
                if remote.step <= local_step:
                    break
                try:
                    stats = [(r.manifest, r.grpc) for r in isl.swarm.stats(shard)]
                    step_dir = fetch_checkpoint(isl.work_dir, shard, remote.step, remote.expert_manifest,
                                                remote.state_manifest, list(remote.holders), isl.plan.run_id,
                                                isl.cfg.trusted_keys, stats)
                    isl.publish_checkpoint(step_dir, shard, mirrored_from=remote.publisher)
                    ckpt.prune_checkpoints(isl.work_dir, shard, keep=2)
                    log.info("mirrored shard %d step %d", shard, remote.step)
                    break
                except DDMError as exc:
                    log.warning("mirror of shard %d step %d failed: %s", shard, remote.step, exc)
