"""The one verified fetch: announced manifests checked before any download, bytes verified on arrival,
contents checked before use, and failures that are the artifact's own fault remembered.

Used by the mirror, by resume before training, and by assembly. A failure is either
- `RejectedArtifact`: the artifact itself is bad whoever serves it (its signed manifest contradicts the
  announcement, or a verified file does not load). Callers put the candidate on their `RejectList`.
- any other `DDMError`: a holder was unreachable, slow or lied in transit; the next pass tries again.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterable, Literal

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.manifest import Manifest, commit_dir, read_manifest, staging_dir
from ddm_node.exchange.candidates import Candidate
from ddm_node.train import checkpoint as ckpt
from ddm_node.transfer.client import NodeClient, PeerError
from ddm_node.transfer.download import fetch_artifact

log = logging.getLogger(__name__)
MANIFEST_TIMEOUT = 10.0  # seconds for one GetManifest call
UNREACHABLE_RETRY = 30.0  # seconds before asking an unreachable holder about the same record again
Content = Literal["tensors", "load"]  # what to check in a verified artifact: safetensors headers, or a full load


class RejectedArtifact(IntegrityError):
    """The announced artifact itself is bad, whoever serves it: never fetch it again."""


@dataclass(frozen=True)
class Expected:
    """What an announcement says an artifact is; `mismatch` names the first field its manifest contradicts."""

    kind: str
    run_id: str
    shard: int
    step: int | None = None
    config_hash: str | None = None

    def mismatch(self, m: Manifest) -> str | None:
        checks = [("kind", m.kind, self.kind), ("run", m.run_id, self.run_id), ("shard", m.shard, self.shard),
                  ("step", m.step, self.step), ("config hash", m.config_hash, self.config_hash)]
        for name, got, want in checks:
            if want is not None and got != want:
                return (f"{name} is {str(got)[:16]}, expected {str(want)[:16]}: it is a {m.kind} of run "
                        f"{m.run_id[:12]} shard {m.shard} step {m.step}")
        return None


class RejectList:
    """Candidates found bad in themselves (see `RejectedArtifact`), never tried again."""

    def __init__(self) -> None:
        self._reasons: dict[Hashable, str] = {}

    def add(self, key: Hashable, reason: str = "") -> None:
        self._reasons[key] = reason

    def __contains__(self, key: Hashable) -> bool:
        return key in self._reasons

    def __len__(self) -> int:
        return len(self._reasons)


def fetch_manifest(holders: Iterable[str], manifest_id: str, trusted: list[str] | None) -> Manifest:
    """The signed manifest from the first holder giving a verified one (id, signature, trusted keys).

    Raises PeerError when every holder was unreachable, IntegrityError when any gave a bad one, else DDMError.
    """
    reasons, errors = [], []
    for holder in dict.fromkeys(holders):
        try:
            with NodeClient(holder, timeout=MANIFEST_TIMEOUT) as client:
                return client.get_manifest(manifest_id, trusted)[0]
        except DDMError as exc:
            reasons.append(str(exc))
            errors.append(exc)
    message = f"no verified manifest {manifest_id[:16]}: " + ("; ".join(reasons) or "no holders")
    if any(isinstance(e, IntegrityError) for e in errors):
        raise IntegrityError(message)
    if errors and all(isinstance(e, PeerError) for e in errors):
        raise PeerError(message)
    raise DDMError(message)


def check_announced(holders: Iterable[str], manifest_id: str, expected: Expected,
                    trusted: list[str] | None) -> Manifest:
    """The manifest behind an announcement, which must be what was announced (RejectedArtifact if not)."""
    m = fetch_manifest(holders, manifest_id, trusted)
    problem = expected.mismatch(m)
    if problem is not None:
        raise RejectedArtifact(f"{expected.kind} {manifest_id[:16]} announced as shard {expected.shard} step "
                               f"{expected.step}: {problem}")
    return m


def content_problem(kind: str, directory: Path, m: Manifest, content: Content) -> str | None:
    """Why a verified artifact is unusable, or None. "tensors" reads safetensors headers only; "load" loads it
    the way a bundle does. Nothing is ever unpickled."""
    from ddm_node.train.router_job import load_router
    from router.centroid import ClusterStats

    try:
        for name in m.files:
            if name.endswith(".safetensors"):
                try:
                    ckpt.check_tensor_file(directory / name)
                except IntegrityError as exc:
                    return f"{name} is not a safetensors file ({exc})"
        if content == "load":
            if kind == ckpt.EXPERT:
                ckpt.load_expert(directory, verify=False)
            elif kind == ckpt.STATS:
                ClusterStats.from_tensors(ckpt.read_stats(directory, verify=False))
            elif kind == "router":
                load_router(directory)
    except DDMError as exc:
        return str(exc)
    return None


def download(holders: list[str], manifest_id: str, dest: Path, expected: Expected, trusted: list[str] | None,
             content: Content = "tensors", progress: Callable[[int], None] | None = None) -> Manifest:
    """Download an artifact whose announcement was checked, verify every byte, then its manifest and contents."""
    m = fetch_artifact(holders, manifest_id, dest, trusted_keys=trusted, progress=progress)
    problem = expected.mismatch(m)
    if problem is None:
        problem = content_problem(expected.kind, dest, m, content)
        if problem is not None:
            problem = f"{m.kind} {m.id[:16]} by {m.publisher[:12]} verifies but does not load: {problem}"
    if problem is not None:
        raise RejectedArtifact(problem)
    return m


def fetch_verified(holders: list[str], manifest_id: str, dest: Path, expected: Expected,
                   trusted: list[str] | None, content: Content = "tensors",
                   progress: Callable[[int], None] | None = None) -> Manifest:
    """`check_announced`, then `download`: nothing is downloaded for an announcement that lies."""
    check_announced(holders, manifest_id, expected, trusted)
    return download(holders, manifest_id, dest, expected, trusted, content, progress)


def fetch_checkpoint(work_dir: Path, shard: int, c: Candidate, run_id: str, trusted: list[str] | None,
                     stats: Iterable[tuple[str, str]] = ()) -> Path:
    """Both artifacts of a checkpoint candidate (expert, state manifests) into WORK/shard_k/step_s, atomically.

    Both announcements are checked before any file is downloaded. `stats` are (manifest, holder) pairs
    for the shard's statistics artifact, fetched too when the work dir has none.
    """
    kinds = (ckpt.EXPERT, ckpt.STATE)
    for kind, manifest_id in zip(kinds, c.manifests):
        check_announced(c.holders, manifest_id, Expected(kind, run_id, shard, c.step), trusted)
    final = ckpt.checkpoint_dir(work_dir, shard, c.step)
    stage = staging_dir(final)
    try:
        for kind, manifest_id in zip(kinds, c.manifests):
            download(c.holders, manifest_id, stage / kind, Expected(kind, run_id, shard, c.step), trusted)
        commit_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for manifest_id, holder in stats:
        if ckpt.stats_dir(work_dir, shard).is_dir():
            break
        try:
            fetch_stats(work_dir, shard, run_id, manifest_id, [holder], trusted)
        except DDMError as exc:
            log.warning("stats of shard %d from %s: %s", shard, holder, exc)
    return final


def fetch_stats(work_dir: Path, shard: int, run_id: str, manifest_id: str, holders: list[str],
                trusted: list[str] | None) -> Path:
    """A shard's stats artifact into WORK/shard_k/stats, kept only when it is this run's and shard's."""
    final = ckpt.stats_dir(work_dir, shard)
    stage = staging_dir(final)
    try:
        download(holders, manifest_id, stage / ckpt.STATS, Expected(ckpt.STATS, run_id, shard), trusted)
        commit_dir(stage / ckpt.STATS, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


def signed_publisher(step_dir: Path) -> str:
    """The publisher a fetched checkpoint's signed manifest names (not the announcer's word)."""
    return read_manifest(step_dir / ckpt.EXPERT).publisher


class AnnouncementCheck:
    """Does the signed manifest behind a record say what the record says? Verdicts are cached; an
    unreachable holder is asked again after a while, a false record never."""

    def __init__(self, trusted: list[str] | None):
        self.trusted = trusted
        self._verdicts: dict[tuple[str, int, int | None], tuple[bool, float | None]] = {}

    def holds(self, manifest_id: str, holder: str, expected: Expected) -> bool:
        key = (manifest_id, expected.shard, expected.step)
        verdict = self._verdicts.get(key)
        if verdict is not None and (verdict[1] is None or time.monotonic() < verdict[1]):
            return verdict[0]
        try:
            check_announced([holder], manifest_id, expected, self.trusted)
            why, verdict = "", (True, None)
        except PeerError as exc:  # unreachable or gone: not a lie, ask again later
            why, verdict = str(exc), (False, time.monotonic() + UNREACHABLE_RETRY)
        except DDMError as exc:  # bad signature, untrusted publisher, malformed, or not what was announced
            why, verdict = str(exc), (False, None)
        if not verdict[0]:
            log.warning("not counting %s %s announced as shard %d step %s: %s", expected.kind, manifest_id[:12],
                        expected.shard, expected.step, why)
        self._verdicts[key] = verdict
        return verdict[0]
