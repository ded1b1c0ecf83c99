"""Data packs between peers: which announced copies to try, and the verified fetch of one pack.

A pack record says "I serve the plan's pack P as the signed artifact M". The plan pins P (the sha256 of the
pack's index) and its size, so a fetch checks, in this order and before using a byte: the signed manifest
behind M (the one verified fetch, `exchange/fetch.py`: signature, trusted keys, kind "pack", this run, this
slot, config hash P), that it lists the plan's index and exactly the plan's size (before anything is
downloaded, so a peer cannot make us fetch more than the plan says), every file's bytes against the manifest,
and then the whole pack against the plan (`data.pack.read_pack`: index hash, every chunk's hash, the
plan's ids, labels and values). A pack that fails any of it is rejected with a one-line reason and never
lands under WORK/packs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import Manifest, commit_dir, staging_dir
from ddm_node.data.pack import PACK_KIND, PackRef, PackSpec, manifest_problem, read_pack
from ddm_node.exchange.candidates import Announcement, Candidate, group
from ddm_node.exchange.fetch import Expected, RejectedArtifact, RejectList, check_announced, describe, download
from ddm_node.swarm.records import PackRecord

log = logging.getLogger(__name__)


def pack_candidates(records: Iterable[PackRecord], pack: str, exclude_holder: str | None = None) -> list[Candidate]:
    """Announced copies of the pack `pack` (other packs' records are ignored), grouped by manifest, the
    publishers' own announcements first; `exclude_holder`'s records are left out (our own)."""
    mine = [r for r in records if r.pack == pack and r.holder != exclude_holder]
    found = group(Announcement((r.manifest,), 0, r.grpc, r.holder, r.publisher) for r in mine)
    published = {r.manifest for r in mine if r.holder == r.publisher}
    return sorted(found, key=lambda c: (c.manifest not in published, -len(c.holders), c.manifests))


@dataclass(frozen=True)
class PackRules:
    """The plan's rule for a pack (`Expected.rules`): its manifest lists the plan's pack.json and size."""

    run_id: str
    ref: PackRef

    def size_problem(self, m: Manifest) -> str | None:
        return manifest_problem(m, self.ref)


def expected(run_id: str, spec: PackSpec) -> Expected:
    """What a pack's manifest must say: a pack of this run and slot whose config hash is the plan's sha256, with
    the plan's pack.json and size."""
    return Expected(PACK_KIND, PackRules(run_id, spec.ref), spec.slot, 0, spec.ref.sha256)


def fetch_pack(c: Candidate, dest: Path, run_id: str, spec: PackSpec, trusted: list[str] | None) -> Manifest:
    """One candidate's pack into `dest` (atomically), verified as the module docstring says.

    RejectedArtifact when the pack itself is bad (whoever serves it); another DDMError when its holders failed."""
    m = check_announced(c.holders, c.manifest, expected(run_id, spec), trusted)
    problem = manifest_problem(m, spec.ref)
    if problem is not None:
        raise RejectedArtifact(f"{spec.where} {c.manifest[:16]} by {m.publisher[:12]}: {problem}")
    stage = staging_dir(dest)
    try:
        download(c.holders, c.manifest, stage / "pack", expected(run_id, spec), trusted)
        try:
            read_pack(stage / "pack", spec, keep=False)
        except DDMError as exc:
            raise RejectedArtifact(f"{exc} (served as {c.manifest[:16]} by {m.publisher[:12]})") from None
        commit_dir(stage / "pack", dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return m


def fetch_any(candidates: list[Candidate], dest: Path, run_id: str, spec: PackSpec, trusted: list[str] | None,
              rejects: RejectList) -> tuple[Manifest | None, list[str]]:
    """The first candidate whose pack verifies, into `dest`: (its manifest, []) or (None, why each failed).
    Candidates found bad in themselves go on `rejects` and are never tried again."""
    reasons = []
    for c in candidates:
        if c.key in rejects:
            continue
        try:
            return fetch_pack(c, dest, run_id, spec, trusted), []
        except Exception as exc:  # one candidate's boundary: whatever its peers send, the next one is tried
            if isinstance(exc, RejectedArtifact):
                rejects.add(c.key, str(exc))
            reasons.append(describe(exc))
            log.warning("%s from %s: %s", spec.where, ", ".join(c.holders[:3]), reasons[-1],
                        exc_info=None if isinstance(exc, DDMError) else exc)
    return None, reasons
