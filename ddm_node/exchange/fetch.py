"""The one verified fetch: announced manifests checked before any download, bytes verified on arrival,
contents checked before use, and failures that are the artifact's own fault remembered.

Used by the mirror, by resume before training, and by assembly. A failure is either
- `RejectedArtifact`: the artifact itself is bad whoever serves it (its signed manifest contradicts the
  announcement, or a verified file does not load). Callers put the candidate on their `RejectList`.
- any other `DDMError`: a holder was unreachable, slow or lied in transit; the next pass tries again.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal, Protocol

import grpc

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.jsonsafe import load_file as load_json_file
from ddm_node.core.manifest import (
    MAX_INT,
    MalformedManifest,
    Manifest,
    commit_dir,
    read_manifest,
    staging_dir,
    write_atomic,
)
from ddm_node.data.pack import PACK_KIND
from ddm_node.exchange.candidates import FAILED_LISTINGS, Candidate, publisher_first
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.limits import ArtifactRules, mib
from ddm_node.transfer.client import PeerError
from ddm_node.transfer.download import fetch_artifact
from ddm_node.transfer.manifest_race import race_manifest
from ddm_node.transfer.store import parse_signed_manifest

log = logging.getLogger(__name__)
MANIFEST_TIMEOUT = 10.0  # seconds for one GetManifest call
Content = Literal["tensors", "load"]  # what to check in a verified artifact: safetensors headers, or a full load
MAX_REJECTS = 2000  # entries a reject list keeps (its file stays under about 3 MB)
REASON_CHARS = 200  # of each reason, kept for the logs
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Kinds fetched zstd-packed (after a byte shuffle, transfer/wire.py; a chunk that does not shrink travels raw): bf16
# experts pack ~1.4x smaller, data packs (fp32 pixels of 256 levels) about 2x; fp32 states and statistics gain
# too little for the CPU it costs on fast links (docs/BENCHMARKS.md, bench.transfer).
PACKED_KINDS = frozenset({ckpt.EXPERT, PACK_KIND})


class RejectedArtifact(IntegrityError):
    """The announced artifact itself is bad, whoever serves it: never fetch it again."""


class NoSpace(DDMError):
    """This node's disk cannot take an artifact now (not the artifact's fault: tried again later)."""


def describe(exc: BaseException) -> str:
    """For a log: our own errors as they are, anything else as its type and first line (it may be a bug of ours)."""
    if isinstance(exc, DDMError):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


class FetchFailure(str, Enum):
    """Why a fetch failed, for the metrics (a few fixed labels, whatever the peer sent)."""

    REJECTED = "rejected"  # the artifact itself is bad: never fetched again
    INTEGRITY = "integrity"  # bytes or manifest did not verify in transit
    UNREACHABLE = "unreachable"  # no holder answered
    TIMEOUT = "timeout"
    PEER = "peer"  # a holder answered with another error
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


def failure_reason(exc: BaseException) -> FetchFailure:
    """The metric label of a failed fetch."""
    if isinstance(exc, RejectedArtifact):
        return FetchFailure.REJECTED
    if isinstance(exc, IntegrityError):
        return FetchFailure.INTEGRITY
    if isinstance(exc, PeerError):
        return {grpc.StatusCode.UNAVAILABLE: FetchFailure.UNREACHABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED: FetchFailure.TIMEOUT}.get(exc.code, FetchFailure.PEER)
    if isinstance(exc, TimeoutError):
        return FetchFailure.TIMEOUT
    return FetchFailure.OTHER


class Rules(Protocol):
    """What a run's plan allows an artifact to be: `train.limits.ArtifactRules` (checkpoints, stats, routers) or
    `exchange.packs.PackRules` (a data pack the plan pins by hash and size)."""

    run_id: str

    def size_problem(self, m: Manifest) -> str | None: ...


@dataclass(frozen=True)
class Expected:
    """What an announcement says an artifact is, and what the run's plan allows it to be (`rules`: its files and
    their sizes); `mismatch` names the first thing a signed manifest contradicts, before anything is downloaded."""

    kind: str
    rules: Rules
    shard: int
    step: int | None = None
    config_hash: str | None = None

    @property
    def run_id(self) -> str:
        return self.rules.run_id

    def mismatch(self, m: Manifest) -> str | None:
        checks = [("kind", m.kind, self.kind), ("run", m.run_id, self.run_id), ("shard", m.shard, self.shard),
                  ("step", m.step, self.step), ("config hash", m.config_hash, self.config_hash)]
        for name, got, want in checks:
            if want is not None and got != want:
                return (f"{name} is {str(got)[:16]}, expected {str(want)[:16]}: it is a {m.kind} of run "
                        f"{m.run_id[:12]} shard {m.shard} step {m.step}")
        return self.rules.size_problem(m)


class RejectList:
    """Candidates found bad in themselves (see `RejectedArtifact`), never tried again; thread-safe.

    With `path` (an island's WORK/rejects.json) the list outlives the process: loaded here, rewritten
    atomically at every addition, so a checkpoint that failed once is not fetched or loaded again at the
    next start. It holds at most `limit` entries, the oldest forgotten first (a forgotten one costs one more
    check). Persisted are candidate keys (manifest ids, step); other keys live in memory only. An unreadable
    or damaged file is logged and ignored (the list starts empty); failing to write it is logged too.
    """

    def __init__(self, path: Path | None = None, limit: int = MAX_REJECTS) -> None:
        self.path, self.limit = (Path(path) if path is not None else None), limit
        self._reasons: dict[Hashable, str] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self._load()

    def add(self, key: Hashable, reason: str = "") -> None:
        with self._lock:
            self._reasons.pop(key, None)
            self._reasons[key] = reason[:REASON_CHARS]
            while len(self._reasons) > self.limit:
                del self._reasons[next(iter(self._reasons))]
            if self.path is not None and _persistable(key):
                self._save()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._reasons

    def __len__(self) -> int:
        with self._lock:
            return len(self._reasons)

    def _save(self) -> None:
        entries = [{"manifests": list(k[0]), "step": k[1], "reason": r}
                   for k, r in self._reasons.items() if _persistable(k)]
        try:
            write_atomic(self.path, json.dumps({"rejects": entries}, indent=0).encode())
        except OSError as exc:  # a full disk must not stop the caller; the list still holds in memory
            log.warning("could not save the reject list %s: %s", self.path, exc.strerror or exc)

    def _load(self) -> None:
        try:
            data = load_json_file(self.path, max_bytes=self.limit * (REASON_CHARS * 6 + 1024), error=DDMError)
            entries = data["rejects"] if isinstance(data, dict) and isinstance(data.get("rejects"), list) else None
            if entries is None:
                raise DDMError(f"{self.path}: not a reject list")
        except DDMError as exc:
            log.warning("ignoring the reject list: %s", exc)
            return
        for e in entries[-self.limit:]:
            key = (tuple(e["manifests"]), e["step"]) if isinstance(e, dict) and isinstance(e.get("manifests"),
                                                                                          list) else None
            if key is not None and _persistable(key) and isinstance(e.get("reason", ""), str):
                self._reasons[key] = e.get("reason", "")[:REASON_CHARS]
        log.info("reject list %s: %d checkpoint(s) found bad earlier", self.path, len(self._reasons))


def _persistable(key: Hashable) -> bool:
    """A candidate key: (1 to 4 manifest ids, a step)."""
    return (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], tuple) and 1 <= len(key[0]) <= 4
            and all(isinstance(m, str) and _HEX64.match(m) for m in key[0])
            and isinstance(key[1], int) and not isinstance(key[1], bool) and 0 <= key[1] <= MAX_INT)


_NOT_THERE = frozenset({"NOT_FOUND", "INVALID_ARGUMENT"})  # gRPC codes of a holder that does not have an id


class _SignedManifests:
    """The last few verified manifests' bytes and signatures by id, so that `download` right after
    `check_announced` does not ask the holders again. Thread-safe; checked again (trust) at every use."""

    def __init__(self, size: int = 64) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, tuple[bytes, bytes]] = {}
        self._size = size

    def put(self, manifest_id: str, raw: bytes, signature: bytes) -> None:
        with self._lock:
            self._items.pop(manifest_id, None)
            self._items[manifest_id] = (raw, signature)
            while len(self._items) > self._size:
                del self._items[next(iter(self._items))]

    def get(self, manifest_id: str) -> tuple[bytes, bytes] | None:
        with self._lock:
            return self._items.get(manifest_id)


_SIGNED = _SignedManifests()


def fetch_manifest(holders: Iterable[str], manifest_id: str, trusted: list[str] | None) -> Manifest:
    """The signed manifest from the first holder giving a verified one (id, signature, trusted keys).

    Holders are raced (`transfer.manifest_race.race_manifest`): one at a time while they answer, all of them once
    those asked were silent for a connect timeout. A holder that could not give the manifest (bad, forged or
    unknown to it) is remembered in FAILED_LISTINGS. The verified bytes are kept for `download` (`_SIGNED`).
    Raises PeerError when every holder was unreachable, IntegrityError when any gave a bad one, else DDMError.
    """
    answer, failed = race_manifest(holders, manifest_id, trusted, timeout=MANIFEST_TIMEOUT)
    for holder, exc in failed:
        if isinstance(exc, IntegrityError) or getattr(getattr(exc, "code", None), "name", None) in _NOT_THERE:
            FAILED_LISTINGS.add(manifest_id, holder)
    if answer is not None:
        _SIGNED.put(manifest_id, answer.raw, answer.signature)
        return answer.manifest
    reasons, errors = [str(exc) for _, exc in failed], [exc for _, exc in failed]
    message = f"no verified manifest {manifest_id[:16]}: " + ("; ".join(reasons) or "no holders")
    if any(isinstance(e, MalformedManifest) for e in errors):  # the bytes that hash to this id: bad for good
        raise RejectedArtifact(message)
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


def content_problem(expected: Expected, directory: Path, m: Manifest, content: Content) -> str | None:
    """Why a verified artifact is unusable, or None. "tensors" reads safetensors headers only, and the model config
    an expert or training state carries (it must be the plan's: nothing builds a model from a peer's config), and a
    training state's metadata (its numbers), so that no island keeps or serves what cannot load; "load" loads it
    the way a bundle does. Nothing is ever unpickled. Any exception a loader raises on the artifact's contents
    means it does not load (named by type when it is not one of ours)."""
    from ddm_node.train.router_job import load_router
    from router.stats import ClusterStats

    kind, rules = expected.kind, expected.rules
    try:
        for name in m.files:
            if name.endswith(".safetensors"):
                try:
                    ckpt.check_tensor_file(directory / name)
                except IntegrityError as exc:
                    return f"{name} is not a safetensors file ({exc})"
        if kind == ckpt.EXPERT:
            ckpt.read_model_config(directory, rules.model)
        elif kind == ckpt.STATE:
            saved, _ = ckpt.check_state(directory, m)
            ckpt.check_model_config(saved, rules.model, str(directory / ckpt.CONFIG_FILE))
        if content == "load":
            if kind == ckpt.EXPERT:
                ckpt.load_expert(directory, verify=False, expected=rules.model)
            elif kind == ckpt.STATS:
                ClusterStats.from_tensors(ckpt.read_stats(directory, verify=False))
            elif kind == "router":
                load_router(directory, rules=rules)
    except DDMError as exc:
        return str(exc)
    except Exception as exc:  # the load check's boundary: a loader failing on a peer's artifact in its own way
        return describe(exc)
    return None


def check_free_space(directory: Path, need: int, what: str) -> None:
    """DDMError naming need and free space when the disk under `directory` cannot take `need` more bytes; checked
    before a download starts (a full disk is this node's problem, not the artifact's: tried again later)."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise NoSpace(f"not enough disk space for {what} in {probe}: need {mib(need)}, {mib(free)} free")


def _total(m: Manifest) -> int:
    return sum(e.size for e in m.files.values())


def download(holders: list[str], manifest_id: str, dest: Path, expected: Expected, trusted: list[str] | None,
             content: Content = "tensors", progress: Callable[[int], None] | None = None) -> Manifest:
    """Download an artifact whose announcement was checked, verify every byte, then its manifest and contents.

    The signed manifest must be what `expected` allows (kind, run, shard, step, and the plan's files and sizes)
    and the disk must have room for it before a byte is fetched. Files come first from the addresses announced
    under the signed manifest's publisher key (`publisher_first`; a record announcing someone else's manifest
    under its own key does not count), then from the others."""
    signed = _SIGNED.get(manifest_id)
    if signed is not None:
        announced = parse_signed_manifest(*signed, trusted, f"manifest {manifest_id[:16]}", manifest_id)
    else:
        announced = fetch_manifest(holders, manifest_id, trusted)
        signed = _SIGNED.get(manifest_id)  # None only if other downloads pushed it out meanwhile: asked again
    problem = expected.mismatch(announced)
    if problem is not None:
        raise RejectedArtifact(f"{expected.kind} {manifest_id[:16]}: {problem}")
    check_free_space(dest.parent, _total(announced), f"{expected.kind} {manifest_id[:16]}")
    m = fetch_artifact(publisher_first(holders, announced.publisher), manifest_id, dest, trusted_keys=trusted,
                       progress=progress, signed=signed, compress=announced.kind in PACKED_KINDS)
    problem = expected.mismatch(m)
    if problem is None:
        problem = content_problem(expected, dest, m, content)
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


def fetch_checkpoint(work_dir: Path, shard: int, c: Candidate, rules: ArtifactRules, trusted: list[str] | None,
                     stats: Iterable[tuple[str, str]] = (), progress: Callable[[int], None] | None = None) -> Path:
    """Both artifacts of a checkpoint candidate (expert, state manifests) into WORK/shard_k/step_s, atomically.

    Both announcements are checked (and the disk has room for both) before any file is downloaded. `stats` are
    (manifest, holder) pairs for the shard's statistics artifact, fetched too when the work dir has none.
    `progress(n)` hears the bytes received (from download threads).
    """
    kinds = (ckpt.EXPERT, ckpt.STATE)
    manifests = [check_announced(c.holders, manifest_id, Expected(kind, rules, shard, c.step), trusted)
                 for kind, manifest_id in zip(kinds, c.manifests)]
    final = ckpt.checkpoint_dir(work_dir, shard, c.step)
    check_free_space(final.parent, sum(_total(m) for m in manifests), f"shard {shard} step {c.step}")
    stage = staging_dir(final)
    try:
        for kind, manifest_id in zip(kinds, c.manifests):
            download(c.holders, manifest_id, stage / kind, Expected(kind, rules, shard, c.step), trusted,
                     progress=progress)
        commit_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for manifest_id, holder in stats:
        if ckpt.stats_dir(work_dir, shard).is_dir():
            break
        try:
            fetch_stats(work_dir, shard, rules, manifest_id, [holder], trusted)
        except Exception as exc:  # one holder's boundary: the checkpoint is here already, try the next stats
            log.warning("stats of shard %d from %s: %s", shard, holder, describe(exc),
                        exc_info=None if isinstance(exc, DDMError) else exc)
    return final


def fetch_stats(work_dir: Path, shard: int, rules: ArtifactRules, manifest_id: str, holders: list[str],
                trusted: list[str] | None) -> Path:
    """A shard's stats artifact into WORK/shard_k/stats, kept only when it is this run's and shard's."""
    final = ckpt.stats_dir(work_dir, shard)
    stage = staging_dir(final)
    try:
        download(holders, manifest_id, stage / ckpt.STATS, Expected(ckpt.STATS, rules, shard), trusted)
        commit_dir(stage / ckpt.STATS, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


def signed_publisher(step_dir: Path) -> str:
    """The publisher a fetched checkpoint's signed manifest names (not the announcer's word)."""
    return read_manifest(step_dir / ckpt.EXPERT).publisher
