"""An island's data packs: serve the ones it holds or can make, fetch the ones its work needs, mirror R copies.

- `start`: packs already in WORK/packs/<sha256>/ (a restart), and partition's copies beside the plan file (the
  data box publishes every pack). Each is sealed with this island's key (a copy it made) or keeps its publisher's
  signature (a copy it fetched), registered with the gRPC store and announced as a pack record.
- `ensure(slots)`: before training a shard (or the router, which needs every shard), get what is missing: rebuilt
  from the dataset when this box has it (so its shard is checked against the plan: the pack must come out with the
  plan's sha256), else through the verified pack fetch (`exchange/packs.py`); False when no copy verified (the
  caller gives the claim back and tries later).
- `loop`: the pack mirror. For each pack, the live peers other than its publishers are ordered by rendezvous
  hashing (the same placement as checkpoints, `core/placement.py`) and the first R (`swarm.replicas`) fetch it,
  so the run keeps every pack after the box that partitioned it leaves.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

from ddm_node.core.config import SwarmConfig
from ddm_node.core.errors import DDMError
from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import MANIFEST, Manifest, commit_dir, read_manifest, staging_dir
from ddm_node.core.placement import rendezvous
from ddm_node.data.datasets import Dataset
from ddm_node.data.pack import PACK_INDEX, manifest_problem, pack_files, read_pack, seal_pack
from ddm_node.data.packing import PACKS_DIR, build_pack, local_dataset, pack_path, pack_ref, pack_slots, spec
from ddm_node.data.plan import Plan
from ddm_node.exchange.fetch import RejectList, describe
from ddm_node.exchange.packs import expected, fetch_any, pack_candidates
from ddm_node.node.publisher import Publisher
from ddm_node.node.state import NodeState
from ddm_node.swarm.dht import Swarm
from ddm_node.swarm.records import RecordKind

log = logging.getLogger(__name__)
MIN_SWEEP = 5.0  # seconds between pack mirror passes, at least (packs never change; peers come and go slowly)


class PackKeeper:
    """See the module docstring. Thread-safe: one fetch per pack at a time."""

    def __init__(self, plan: Plan, publisher: Publisher, swarm: Swarm, identity: Identity, cfg: SwarmConfig,
                 state: NodeState, rejects: RejectList):
        self.plan, self.publisher, self.swarm, self.identity, self.cfg = plan, publisher, swarm, identity, cfg
        self.state, self.rejects, self.work, self.events = state, rejects, publisher.work, publisher.events
        self.me, self.trusted = identity.public_hex, list(cfg.trusted_keys) or None
        self.sources: list[Path] = []
        self.local = False  # the plan's dataset is on this box (checked at start; loaded again when packs are made)
        self._locks = {slot: threading.Lock() for slot in pack_slots(plan)}
        self._held: dict[int, Manifest] = {}

    def held(self) -> set[int]:
        """The slots whose packs this island serves."""
        return set(self._held)

    # -- start --------------------------------------------------------------------------------

    def start(self, dataset: Dataset | None, sources: Iterable[Path] = ()) -> None:
        """Serve and announce the packs this island holds (see the module docstring); `sources` are directories that
        may hold partition's packs (`pack_sources`); `dataset`: the plan's dataset when this box has it."""
        self.sources, self.local = list(sources), dataset is not None
        for slot in pack_slots(self.plan):
            with self._locks[slot]:
                try:
                    self._serve(slot) or self._import(slot)
                except DDMError as exc:  # this pack is not served (from here); the others still are
                    log.warning("data pack of slot %d: %s", slot, exc)
        if self._held:
            log.info("serving data packs of slots %s", sorted(self._held))

    def _import(self, slot: int) -> bool:
        """Copy (hard-link where possible) partition's pack of `slot` from beside the plan, verified, and seal it."""
        ref = pack_ref(self.plan, slot)
        for root in self.sources:
            src = pack_path(root, ref)
            if not (src / PACK_INDEX).is_file():
                continue
            try:
                read_pack(src, spec(self.plan, slot), keep=False)
            except DDMError as exc:
                log.warning("not using %s: %s", src, exc)
                continue
            if src.resolve() == pack_path(self.work.root, ref).resolve():  # the work dir is the plan's directory
                seal_pack(src, self.plan.run_id, slot, ref, self.identity)
                self.events.record(EventKind.PACK, shard=slot, source="imported")
                return self._serve(slot)
            return self._commit(slot, lambda stage, src=src: _link_files(src, stage), "imported")
        return False

    def _build(self, slot: int, dataset: Dataset) -> bool:
        """Rebuild the pack of `slot` from the local dataset; it must come out as the plan records it."""
        def make(stage: Path) -> None:
            ref = build_pack(self.plan, dataset, slot, stage)
            if ref != pack_ref(self.plan, slot):
                raise DDMError(f"the pack of slot {slot} built from {dataset.spec!r} is {ref.sha256[:12]}, the plan "
                               f"records {pack_ref(self.plan, slot).sha256[:12]}; not serving it")

        return self._commit(slot, make, "built")

    def _commit(self, slot: int, fill, source: str) -> bool:
        """Fill a staging directory with the pack (`fill(stage)`), seal it with our key, move it into place, serve."""
        final = pack_path(self.work.root, pack_ref(self.plan, slot))
        stage = staging_dir(final)
        try:
            fill(stage)
            seal_pack(stage, self.plan.run_id, slot, pack_ref(self.plan, slot), self.identity)
            commit_dir(stage, final)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self.events.record(EventKind.PACK, shard=slot, source=source)
        return self._serve(slot)

    # -- serving ------------------------------------------------------------------------------

    def _serve(self, slot: int) -> bool:
        """Register and announce the pack of `slot` when WORK/packs holds a good copy; a bad copy is removed."""
        if slot in self._held:
            return True
        ref = pack_ref(self.plan, slot)
        path = pack_path(self.work.root, ref)
        if not (path / MANIFEST).is_file():  # none, or partition's own unsealed pack (`_import` seals it)
            return False
        try:
            m = read_manifest(path)
            problem = expected(self.plan.run_id, spec(self.plan, slot, ref)).mismatch(m) or manifest_problem(m, ref)
            if problem is not None:
                raise DDMError(f"{path}: {problem}")
            m = self.publisher.pack(path, slot, ref.sha256)  # every file hashed against the manifest, announced
        except DDMError as exc:
            log.warning("not serving the pack copy %s (removed): %s", path, exc)
            doomed = path.with_name(f".{path.name}.bad-{os.getpid()}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            return False
        self._held[slot] = m
        return True

    # -- fetching -----------------------------------------------------------------------------

    def ensure(self, slots: Iterable[int], retry: float = 0.0) -> bool:
        """Hold the packs of `slots` (fetching what is missing); True at once for a plan without packs. When a pack
        has no verified copy, wait `retry` seconds (or until the island stops) and return False: the caller gives
        its claim back and looks again."""
        wanted = [slot for slot in slots if slot in self._locks]
        missing = [slot for slot in wanted if slot not in self._held]
        dataset = local_dataset(self.plan) if self.local and missing else None
        if all(self._obtain(slot, "fetched", dataset) for slot in wanted):
            return True
        self.state.stop.wait(retry)
        return False

    def _obtain(self, slot: int, source: str, dataset: Dataset | None = None) -> bool:
        """Hold the pack of `slot`: ours already, rebuilt from `dataset`, or fetched from a peer."""
        with self._locks[slot]:
            if self._serve(slot):
                return True
            if dataset is not None:
                try:
                    return self._build(slot, dataset)
                except DDMError as exc:  # a pack that does not come out as the plan says: fetch the plan's instead
                    log.warning("data pack of slot %d: %s", slot, exc)
            s = spec(self.plan, slot)
            records = [e.record for e in self.swarm.read(RecordKind.PACK, slot)]
            candidates = pack_candidates(records, s.ref.sha256, exclude_holder=self.me)
            dest = pack_path(self.work.root, s.ref)
            m, reasons = fetch_any(candidates, dest, self.plan.run_id, s, self.trusted, self.rejects)
            if m is None:
                why = "; ".join(reasons) or "no peer announces it"
                log.warning("%s: no verified copy (%s)", s.where, why)
                self.events.record(EventKind.PACK, shard=slot, source="missing", reason=why[:500])
                return False
            holders = next((c.holders for c in candidates if c.manifest == m.id), [])
            self.events.record(EventKind.PACK, shard=slot, source=source, publisher=m.publisher[:12],
                               holders=tuple(holders))
            log.info("%s %s from %s", s.where, source, list(holders))
            return self._serve(slot)

    # -- mirroring ----------------------------------------------------------------------------

    def targets(self) -> list[int]:
        """The packs this island should hold: those where it ranks in the first R of the pack's rendezvous order
        over the live peers that did not publish it."""
        missing = [slot for slot in pack_slots(self.plan) if slot not in self._held]
        if not missing:
            return []
        live = {r.public_key for r in self.swarm.peers()} | {self.me}
        out = []
        for slot in missing:
            sha = pack_ref(self.plan, slot).sha256
            publishers = {r.holder for e in self.swarm.read(RecordKind.PACK, slot)
                          if (r := e.record).pack == sha and r.holder == r.publisher}
            if self.me in rendezvous(f"pack/{slot}", sorted(live - publishers))[: self.cfg.replicas]:
                out.append(slot)
        return out

    def loop(self) -> None:
        """The pack mirror thread (until the island stops)."""
        while not self.state.stop.wait(max(MIN_SWEEP, self.cfg.mirror_interval)):
            if self.state.disk_full:
                continue
            try:
                for slot in self.targets():
                    if self.state.stop.is_set():
                        return
                    self._obtain(slot, "mirrored")
            except Exception as exc:  # one bad pass must not end mirroring
                log.warning("pack mirror pass failed: %s", describe(exc), exc_info=None if isinstance(exc, DDMError)
                            else exc)


def _link_files(src: Path, stage: Path) -> None:
    """A pack's files into `stage`: hard links where the file system allows, copies elsewhere."""
    for name in pack_files(src):
        try:
            os.link(src / name, stage / name)
        except OSError:
            shutil.copyfile(src / name, stage / name)


def pack_sources(plan_path: Path | None) -> list[Path]:
    """Where partition's packs may be: the directory of the plan file given to `start` (its packs/ folder)."""
    if plan_path is None:
        return []
    root = plan_path if plan_path.is_dir() else plan_path.parent
    return [root] if (root / PACKS_DIR).is_dir() else []
