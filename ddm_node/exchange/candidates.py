"""Candidate grouping: announcements of a shard (or the router) -> what to try fetching, newest first.

One rule for the mirror, resume and assembly: a candidate is a set of manifests (an expert, or an
expert and its training state) at an announced step. Its holders are every address that announces
those manifests at any step, publishers first (the bytes are checked anyway). Groups are per
(manifests, step), so a record announcing genuine manifests under a false step forms its own
candidate (rejected when fetched) and cannot hide the honest announcement of the same manifests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ddm_node.swarm.records import CheckpointRecord, ReplicaRecord, RouterRecord, StatsRecord


@dataclass(frozen=True)
class Announcement:
    """One record's claim: these manifests at this step are served at `grpc`; `announcer` signed the record."""

    manifests: tuple[str, ...]
    step: int
    grpc: str
    announcer: str
    publisher: str = ""  # the checkpoint's publisher as the record states it (not yet verified)


@dataclass
class Candidate:
    """Manifests announced at `step`, and every address that announces them."""

    manifests: tuple[str, ...]
    step: int
    holders: list[str]
    announced_by: list[str] = field(default_factory=list)  # public keys, for the logs
    publisher: str = ""  # as the first record stated it

    @property
    def manifest(self) -> str:
        """The first manifest (the expert of a checkpoint)."""
        return self.manifests[0]

    @property
    def key(self) -> tuple[tuple[str, ...], int]:
        """What a reject list remembers."""
        return self.manifests, self.step


def group(announcements: Iterable[Announcement]) -> list[Candidate]:
    """Candidates from announcements, newest step first (then most holders, then manifest id)."""
    announcements = list(announcements)
    holders: dict[tuple[str, ...], list[str]] = {}
    for a in announcements:
        known = holders.setdefault(a.manifests, [])
        if a.grpc not in known:
            known.append(a.grpc)
    groups: dict[tuple[tuple[str, ...], int], Candidate] = {}
    for a in announcements:
        c = groups.setdefault((a.manifests, a.step), Candidate(a.manifests, a.step, holders[a.manifests],
                                                               publisher=a.publisher))
        c.announced_by.append(a.announcer)
    return sorted(groups.values(), key=lambda c: (-c.step, -len(c.holders), c.manifests))


def checkpoint_candidates(checkpoints: list[CheckpointRecord], replicas: list[ReplicaRecord],
                          with_state: bool = True, exclude_holder: str | None = None) -> list[Candidate]:
    """A shard's checkpoints (expert and state manifests) or experts alone, from its checkpoint records
    (publishers first) and replica records (except those held by `exclude_holder`)."""

    def manifests(r: CheckpointRecord | ReplicaRecord) -> tuple[str, ...]:
        return (r.expert_manifest, r.state_manifest) if with_state else (r.expert_manifest,)

    return group([Announcement(manifests(r), r.step, r.grpc, r.publisher, r.publisher) for r in checkpoints]
                 + [Announcement(manifests(r), r.step, r.grpc, r.holder_key, r.publisher_of_checkpoint)
                    for r in replicas if exclude_holder is None or r.holder_key != exclude_holder])


def expert_candidates(checkpoints: list[CheckpointRecord], replicas: list[ReplicaRecord]) -> list[Candidate]:
    """A shard's expert candidates (assembly needs only the inference weights)."""
    return checkpoint_candidates(checkpoints, replicas, with_state=False)


def router_candidates(routers: list[RouterRecord]) -> list[Candidate]:
    return group([Announcement((r.manifest,), r.step, r.grpc, r.publisher, r.publisher) for r in routers])


def stats_candidates(records: list[StatsRecord], listed: Iterable[tuple[str, str]] = (),
                     prefer: Iterable[str] = ()) -> list[Candidate]:
    """Stats manifests from stats records and (manifest, holder) pairs a holder listed; those served by a
    `prefer` address first."""
    prefer = set(prefer)
    found = group([Announcement((r.manifest,), 0, r.grpc, "") for r in records]
                  + [Announcement((m,), 0, h, "") for m, h in listed])
    return sorted(found, key=lambda c: (not prefer & set(c.holders), -len(c.holders), c.manifests))
