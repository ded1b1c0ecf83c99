"""DHT keys and the record codec: which record type lives under which key, how a record is checked before
it is stored, and how a stored value is parsed back (skipping anything that is not a valid owned record, and
addresses this node may not dial: `DialFilter`)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from hivemind.utils import MSGPackSerializer, get_dht_time

from ddm_node.core.errors import DDMError
from ddm_node.swarm.addresses import SwarmHosts, maddr_host
from ddm_node.swarm.records import (
    CheckpointRecord,
    Claim,
    PackRecord,
    PeerRecord,
    PlanRecord,
    RecordKind,
    ReplicaRecord,
    RouterRecord,
    StatsRecord,
)
from ddm_node.swarm.validator import MAX_VALUE_BYTES, owner_of_subkey

HEX64 = re.compile(r"^[0-9a-f]{64}$")
logger = logging.getLogger("ddm_node.swarm.dht")  # the readers' skip warnings, as before

@dataclass(frozen=True)
class _Kind:
    record: type
    owner_field: str | None  # the record field that must equal the subkey's owner

    @property
    def per_shard(self) -> bool:
        return self.record.KIND.per_shard


KINDS: dict[RecordKind, _Kind] = {k.record.KIND: k for k in (
    _Kind(PeerRecord, "public_key"),
    _Kind(Claim, "public_key"),
    _Kind(CheckpointRecord, "publisher"),
    _Kind(ReplicaRecord, "holder_key"),
    _Kind(StatsRecord, None),
    _Kind(RouterRecord, "publisher"),
    _Kind(PlanRecord, None),
    _Kind(PackRecord, "holder"),
)}


@dataclass(frozen=True)
class Entry:
    """A valid record as read from the DHT, with its owner (public key hex) and DHT expiration."""

    owner: str
    record: Any
    expiration: float


def dht_time() -> float:
    """The clock DHT expirations are measured on (hivemind's get_dht_time, i.e. wall time)."""
    return get_dht_time()


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not HEX64.match(run_id):
        raise DDMError(f"run id must be 64 lowercase hex characters, got {run_id!r}")
    return run_id


def dht_key(run_id: str, kind: str, shard: int | None = None) -> str:
    """The DHT key of a record kind (see the module docstring)."""
    check_run_id(run_id)
    spec = KINDS.get(kind)
    if spec is None:
        raise DDMError(f"unknown DHT record kind {kind!r} (known: {', '.join(KINDS)})")
    if spec.per_shard:
        if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
            raise DDMError(f"DHT kind {kind!r} needs a shard index >= 0, got {shard!r}")
        return f"ddm/{run_id}/{kind}/{shard}"
    if shard is not None:
        raise DDMError(f"DHT kind {kind!r} takes no shard, got {shard!r}")
    if kind == RecordKind.PLAN:
        return f"ddm/plan/{run_id}"
    return f"ddm/{run_id}/{kind}"


def encode(kind: str, shard: int | None, record: Any, run_id: str, owner: str) -> tuple[str, Any]:
    """(key, value) to store `record` under, or DDMError for a record readers would skip."""
    spec = KINDS.get(kind)
    if spec is None:
        raise DDMError(f"unknown DHT record kind {kind!r} (known: {', '.join(KINDS)})")
    if not isinstance(record, spec.record):
        raise DDMError(f"DHT kind {kind!r} takes a {spec.record.__name__}, got {type(record).__name__}")
    run_id = record.run_id if kind == RecordKind.PLAN else run_id
    key = dht_key(run_id, kind, shard)
    if spec.per_shard and record.shard != shard:
        raise DDMError(f"{kind} record for shard {record.shard} written under shard {shard}")
    if spec.owner_field and getattr(record, spec.owner_field) != owner:
        raise DDMError(f"{kind} record's {spec.owner_field} is not this node's key")
    value = record.validated().to_value()
    size = len(MSGPackSerializer.dumps(value))
    if size > MAX_VALUE_BYTES:
        raise DDMError(f"{kind} record is {size} bytes, over the {MAX_VALUE_BYTES}-byte DHT limit")
    return key, value


def parse_entry(kind: str, spec: _Kind, key: str, shard: int | None, subkey: Any, item: Any,
                 skip: Any = logger.warning) -> Entry | None:
    """The entry of one stored subkey, or None (reported through `skip`) when readers must skip it."""
    owner = owner_of_subkey(subkey)
    if owner is None:  # impossible with our validator on every peer; cheap to check
        skip("skipping a record without owner under %s", key)
        return None
    try:
        record = spec.record.from_value(item.value)
    except DDMError as exc:
        skip("skipping a garbage record of %s under %s: %s", owner[:12], key, exc)
        return None
    except Exception as exc:  # a reader must never fail on one value: skip it, read the rest
        skip("skipping an unreadable record of %s under %s: %r", owner[:12], key, exc)
        return None
    if spec.per_shard and record.shard != shard:
        skip("skipping a record of %s under %s that names shard %s", owner[:12], key, record.shard)
        return None
    if spec.owner_field and getattr(record, spec.owner_field) != owner:
        skip("skipping a record under %s whose %s is not its owner %s", key, spec.owner_field, owner[:12])
        return None
    if kind == RecordKind.PLAN and key != dht_key(record.run_id, RecordKind.PLAN):
        skip("skipping a plan record of %s for another run under %s", owner[:12], key)
        return None
    if isinstance(record, Claim):
        record = replace(record, expires_at=float(item.expiration_time))  # the DHT's expiration counts
    return Entry(owner=owner, record=record, expiration=float(item.expiration_time))


# record kinds whose `grpc` address readers dial (claims and peer records name one too, nobody dials it)
DIALED = frozenset({RecordKind.CKPT, RecordKind.REPLICA, RecordKind.STATS, RecordKind.ROUTER, RecordKind.PLAN})
MAX_REFUSED = 1024  # refused addresses remembered (each is logged once)


class DialFilter:
    """What a reader keeps of a record's addresses: only those at hosts of the swarm (`SwarmHosts`, see
    swarm/addresses.py). A record whose gRPC address is elsewhere is skipped (logged once per address); a peer
    record keeps only its multiaddrs at such hosts. The node's own records are kept as they are."""

    def __init__(self, hosts: SwarmHosts, me: str):
        self.hosts, self.me = hosts, me
        self._refused: dict[str, None] = {}

    def __call__(self, kind: str, entry: Entry) -> Entry | None:
        record, kind = entry.record, RecordKind(kind)
        if entry.owner == self.me:
            return entry
        if kind in DIALED:
            if self.hosts.allows(record.grpc):
                return entry
            if record.grpc not in self._refused:
                logger.warning("not dialing %s, announced by %s in a %s record: not a host of this swarm",
                               record.grpc[:80], entry.owner[:12], kind)
                self._refused[record.grpc] = None
                while len(self._refused) > MAX_REFUSED:
                    del self._refused[next(iter(self._refused))]
            return None
        if kind == RecordKind.PEERS:
            kept = tuple(m for m in record.maddrs if self.hosts.allows_host(maddr_host(m) or ""))
            if kept != record.maddrs:
                return replace(entry, record=replace(record, maddrs=kept))
        return entry
