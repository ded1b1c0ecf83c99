"""Mirroring: every island keeps verified copies of the newest training state of R other shards.

Who mirrors a shard is decided by rendezvous hashing of (shard, peer key) over the live peers that
do not already hold it, so every shard gets R copies without coordination. A mirrored checkpoint
lives in the same layout as the island's own (`WORK/shard_k/step_s/{expert,state}`), is served over
gRPC and announced as a replica, so whoever takes the shard over next resumes from it.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.manifest import Manifest, commit_dir, read_manifest, staging_dir
from ddm_node.swarm.dht import Swarm
from ddm_node.swarm.records import CheckpointRecord
from ddm_node.train import checkpoint as ckpt
from ddm_node.transfer.client import NodeClient
from ddm_node.transfer.download import fetch_artifact

if TYPE_CHECKING:
    from ddm_node.node.island import Island

log = logging.getLogger(__name__)
MANIFEST_TIMEOUT = 10.0  # seconds for one GetManifest call


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


def newest_remote(swarm: Swarm, shard: int, exclude_key: str | None = None,
                  checkpoints: list[CheckpointRecord] | None = None) -> list[RemoteCheckpoint]:
    """Announced checkpoints and replicas of a shard, one entry per (manifests, announced step), newest first.

    A record that announces genuine manifests under a false step forms its own entry (rejected when
    fetched), so it cannot hide the honest announcement of the same manifests. The holders of an
    entry are every address announcing its manifests at any step, publishers first (bytes are checked).
    """
    if checkpoints is None:
        checkpoints = swarm.checkpoints(shard)
    entries = [(r.expert_manifest, r.state_manifest, r.step, r.grpc, r.publisher) for r in checkpoints]
    entries += [(r.expert_manifest, r.state_manifest, r.step, r.grpc, r.publisher_of_checkpoint)
                for r in swarm.replicas(shard) if exclude_key is None or r.holder_key != exclude_key]
    holders: dict[tuple[str, str], list[str]] = {}
    groups: dict[tuple[str, str, int], str] = {}
    for expert, state, step, grpc, publisher in entries:
        known = holders.setdefault((expert, state), [])
        if grpc not in known:
            known.append(grpc)
        groups.setdefault((expert, state, step), publisher)
    out = [RemoteCheckpoint(step, e, s, tuple(holders[(e, s)]), pub) for (e, s, step), pub in groups.items()]
    return sorted(out, key=lambda c: c.step, reverse=True)


class RejectedCheckpoint(IntegrityError):
    """The announced checkpoint itself is bad, whoever serves it: its signed manifest contradicts the
    announcement, or a verified file is not safetensors. Callers remember it and never fetch it again."""


def _announced_manifest(holders: list[str], manifest_id: str, trusted: list[str] | None) -> Manifest:
    """The (small) signed manifest from the first holder giving a verified one, before any file is fetched."""
    reasons, integrity = [], False
    for holder in dict.fromkeys(holders):
        try:
            with NodeClient(holder, timeout=MANIFEST_TIMEOUT) as client:
                return client.get_manifest(manifest_id, trusted)[0]
        except IntegrityError as exc:
            reasons.append(str(exc))
            integrity = True
        except DDMError as exc:
            reasons.append(str(exc))
    error = IntegrityError if integrity else DDMError
    raise error(f"no verified manifest {manifest_id[:16]}: " + ("; ".join(reasons) or "no holders"))


def _check_tensor_files(directory: Path, manifest: Manifest) -> None:
    for name in manifest.files:
        if name.endswith(".safetensors"):
            try:
                ckpt.check_tensor_file(directory / name)
            except IntegrityError as exc:
                raise RejectedCheckpoint(f"{manifest.kind} {manifest.id[:16]} by {manifest.publisher[:12]}: "
                                         f"{name} is not a safetensors file ({exc})") from None


def fetch_checkpoint(work_dir: Path, shard: int, step: int, expert_id: str, state_id: str, holders: list[str],
                     run_id: str, trusted_keys: Iterable[str] = (), stats_holders: list[tuple[str, str]] = ()) -> Path:
    """Fetch both artifacts of a checkpoint into WORK/shard_k/step_s atomically and verify them.

    The announced step, shard and run must match the signed manifests (checked before any file is
    downloaded) and every tensor file must be safetensors; otherwise RejectedCheckpoint and nothing is kept.
    """
    trusted = list(trusted_keys) or None
    for kind, manifest_id in ((ckpt.EXPERT, expert_id), (ckpt.STATE, state_id)):
        m = _announced_manifest(holders, manifest_id, trusted)
        if (m.kind, m.run_id, m.shard, m.step) != (kind, run_id, shard, step):
            raise RejectedCheckpoint(f"{kind} announced as run {run_id[:12]} shard {shard} step {step} is a "
                                     f"{m.kind} of run {m.run_id[:12]} shard {m.shard} step {m.step}")
    final = ckpt.checkpoint_dir(work_dir, shard, step)
    stage = staging_dir(final)
    try:
        for kind, manifest_id in ((ckpt.EXPERT, expert_id), (ckpt.STATE, state_id)):
            m = fetch_artifact(holders, manifest_id, stage / kind, trusted_keys=trusted)  # verified on arrival
            if (m.kind, m.run_id, m.shard, m.step) != (kind, run_id, shard, step):
                raise RejectedCheckpoint(f"{kind} announced as run {run_id[:12]} shard {shard} step {step} is a "
                                         f"{m.kind} of run {m.run_id[:12]} shard {m.shard} step {m.step}")
            _check_tensor_files(stage / kind, m)
        commit_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for manifest_id, holder in stats_holders:
        if ckpt.stats_dir(work_dir, shard).is_dir():
            break
        try:
            _fetch_stats(work_dir, shard, run_id, manifest_id, holder, trusted)
        except DDMError as exc:
            log.warning("stats of shard %d from %s: %s", shard, holder, exc)
    return final


def _fetch_stats(work_dir: Path, shard: int, run_id: str, manifest_id: str, holder: str,
                 trusted: list[str] | None) -> None:
    """A shard's stats artifact, kept only when it is the stats of this run and shard, in safetensors."""
    final = ckpt.stats_dir(work_dir, shard)
    stage = staging_dir(final)
    try:
        m = fetch_artifact([holder], manifest_id, stage / "stats", trusted_keys=trusted)
        if (m.kind, m.run_id, m.shard) != (ckpt.STATS, run_id, shard):
            raise RejectedCheckpoint(f"stats announced for run {run_id[:12]} shard {shard} is a {m.kind} of "
                                     f"run {m.run_id[:12]} shard {m.shard}")
        _check_tensor_files(stage / "stats", m)
        commit_dir(stage / "stats", final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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

    def targets(self) -> dict[int, list[CheckpointRecord]]:
        """The shards this island mirrors: those where it ranks in the top R of the shard's rendezvous order.

        Ranking the live peers per shard (not shards per peer) gives every shard R mirrors whenever R
        peers besides its trainers are alive; ranking shards per peer could leave a shard with none
        (two idle islands may both pick the same R shards). Peers that publish or train the shard are
        left out of its order: they already hold it. Returns each such shard with its checkpoint records.
        """
        from ddm_node.node.island import rendezvous

        isl = self.island
        peers = isl.swarm.peers()
        live = {r.public_key for r in peers} | {isl.me}
        training = {}
        for r in peers:
            training.setdefault(r.shard, set()).add(r.public_key)
        out = {}
        for shard in range(len(isl.plan.shards)):
            if shard == isl.active or shard in isl.trained:
                continue
            checkpoints = isl.swarm.checkpoints(shard)
            holders = training.get(shard, set()) | {c.publisher for c in checkpoints}
            order = rendezvous(f"mirror/{shard}", sorted(live - holders))
            if isl.me in order[: isl.cfg.replicas]:
                out[shard] = checkpoints
        return out

    def loop(self) -> None:
        isl = self.island
        while not isl.stop.wait(isl.cfg.mirror_interval):
            try:
                self.sweep()
            except Exception as exc:  # one bad sweep must not end mirroring
                log.warning("mirror sweep failed: %s", exc)

    def sweep(self) -> None:
        isl = self.island
        for shard, checkpoints in self.targets().items():
            with self._lock:
                if shard in self._paused:
                    continue
            if isl.stop.is_set():
                return
            local = ckpt.latest_checkpoint(isl.work_dir, shard)
            local_step = int(local.name.split("_")[1]) if local else -1
            for remote in newest_remote(isl.swarm, shard, exclude_key=isl.me, checkpoints=checkpoints):
                if remote.step <= local_step:
                    break
                if (remote.expert_manifest, remote.state_manifest, remote.step) in isl.rejected:
                    continue
                try:
                    stats = [(r.manifest, r.grpc) for r in isl.swarm.stats(shard)]
                    step_dir = fetch_checkpoint(isl.work_dir, shard, remote.step, remote.expert_manifest,
                                                remote.state_manifest, list(remote.holders), isl.plan.run_id,
                                                isl.cfg.trusted_keys, stats)
                    publisher = read_manifest(step_dir / ckpt.EXPERT).publisher  # signed, not the announcer's word
                    isl.publish_checkpoint(step_dir, shard, mirrored_from=publisher)
                    ckpt.prune_checkpoints(isl.work_dir, shard, keep=2)
                    log.info("mirrored shard %d step %d", shard, remote.step)
                    isl.event("mirror", shard=shard, step=remote.step, publisher=publisher[:12])
                    break
                except DDMError as exc:
                    if isinstance(exc, RejectedCheckpoint):
                        isl.rejected.add((remote.expert_manifest, remote.state_manifest, remote.step))
                    log.warning("mirror of shard %d step %d failed: %s", shard, remote.step, exc)
