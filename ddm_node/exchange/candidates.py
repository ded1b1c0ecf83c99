"""Candidate grouping: announcements of a shard (or the router) -> what to try fetching, newest first.

One rule for the mirror, resume and assembly: a candidate is a set of manifests (an expert, or an
expert and its training state) at an announced step. Its holders are every address that announces
those manifests at any step, in announcement order (checkpoint records before replicas; the bytes
are checked anyway), each with the keys that announced it (`Holders.announcers`). A record's key
proves nothing about the manifest: once the signed manifest is known, `publisher_first` puts the
addresses announced under the manifest's publisher key first. Groups are per (manifests, step), so a
record announcing genuine manifests under a false step forms its own candidate (rejected when
fetched) and cannot hide the honest announcement of the same manifests.

Listings (what a holder's `ListArtifacts` names) are claims too: `cap_listed` keeps a few per holder,
drops (manifest, holder) pairs whose manifest that holder could not give (`FAILED_LISTINGS`), and
ignores a holder whose listed manifests failed LISTED_PER_HOLDER times (for FAILED_FOR seconds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ddm_node.swarm.records import CheckpointRecord, ReplicaRecord, RouterRecord, StatsRecord

LISTED_PER_HOLDER = 4  # artifacts of one kind and shard taken from one holder's listing
LISTED_TOTAL = 16  # listed artifacts taken in all per look
FAILED_FOR = 600.0  # seconds a (manifest, holder) pair that failed is not tried again from a listing
FAILED_MEMORY = 4096  # pairs remembered at most


class Holders(list):
    """Addresses (a plain list of "host:port"), plus `announcers`: address -> the public keys that announced it."""

    def __init__(self, addresses: Iterable[str] = (), announcers: dict[str, set[str]] | None = None) -> None:
        super().__init__(addresses)
        self.announcers: dict[str, set[str]] = announcers if announcers is not None else {}

    def add(self, address: str, announcer: str) -> None:
        if address not in self.announcers:
            self.append(address)
            self.announcers[address] = set()
        if announcer:
            self.announcers[address].add(announcer)


def publisher_first(holders: Iterable[str], publisher: str) -> list[str]:
    """`holders` without duplicates, those announced under `publisher`'s key first (each group in its order).

    Only a record signed by the publisher's own key puts an address first: a record announcing someone
    else's manifest under the announcer's key does not. A plain list (no announcers known) keeps its order."""
    announcers = getattr(holders, "announcers", {})
    unique = list(dict.fromkeys(holders))
    mine = [h for h in unique if publisher in announcers.get(h, ())]
    return mine + [h for h in unique if h not in mine]


class FailedListings:
    """(manifest id, holder) pairs whose manifest the holder did not give (forged, bad or unknown to it),
    each for `FAILED_FOR` seconds; thread-safe and bounded. A listing naming them again is not tried."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[tuple[str, str], float] = {}

    def add(self, manifest_id: str, holder: str) -> None:
        with self._lock:
            self._until.pop((manifest_id, holder), None)
            self._until[(manifest_id, holder)] = time.monotonic() + FAILED_FOR
            while len(self._until) > FAILED_MEMORY:
                del self._until[next(iter(self._until))]

    def __contains__(self, pair: tuple[str, str]) -> bool:
        with self._lock:
            until = self._until.get(pair)
            if until is not None and until <= time.monotonic():
                del self._until[pair]
                until = None
            return until is not None

    def failures(self, holder: str) -> int:
        """How many remembered pairs name `holder`."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for (_, h), until in self._until.items() if h == holder and until > now)

    def clear(self) -> None:
        with self._lock:
            self._until.clear()


FAILED_LISTINGS = FailedListings()


def cap_listed(listed: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(manifest, holder) pairs from listings: no pair that failed before, at most LISTED_PER_HOLDER per
    holder (fewer by its remembered failures) and LISTED_TOTAL in all (in the order given), so one lister
    cannot flood a caller with fakes: LISTED_PER_HOLDER failed manifest calls per FAILED_FOR seconds at most."""
    out: list[tuple[str, str]] = []
    per_holder: dict[str, int] = {}
    for pair in dict.fromkeys(listed):
        if len(out) >= LISTED_TOTAL:
            break
        if pair[1] not in per_holder:
            per_holder[pair[1]] = FAILED_LISTINGS.failures(pair[1])
        if pair in FAILED_LISTINGS or per_holder[pair[1]] >= LISTED_PER_HOLDER:
            continue
        per_holder[pair[1]] += 1
        out.append(pair)
    return out


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
    holders: Holders  # a list of addresses that also knows which keys announced each
    announced_by: list[str] = field(default_factory=list)  # public keys, for the logs
    publisher: str = ""  # as the first record stated it

    @property
    def announcers(self) -> dict[str, set[str]]:
        """address -> the public keys of the records that announced it (for these manifests, at any step)."""
        return getattr(self.holders, "announcers", {})

    def holders_for(self, publisher: str) -> list[str]:
        """The holders, those announced under `publisher`'s key (the signed manifest's) first."""
        return publisher_first(self.holders, publisher)

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
    holders: dict[tuple[str, ...], Holders] = {}
    for a in announcements:
        holders.setdefault(a.manifests, Holders()).add(a.grpc, a.announcer)
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
    """Stats manifests from stats records and (manifest, holder) pairs a holder listed (`cap_listed`); those
    served by a `prefer` address first."""
    prefer = set(prefer)
    found = group([Announcement((r.manifest,), 0, r.grpc, "") for r in records]
                  + [Announcement((m,), 0, h, "") for m, h in cap_listed(listed)])
    return sorted(found, key=lambda c: (not prefer & set(c.holders), -len(c.holders), c.manifests))
