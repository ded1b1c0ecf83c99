"""Typed DHT records. Each converts to a msgpack-friendly dict and back, validating untrusted input.

`from_value` is the only door for data read from the DHT: it checks types, ranges and lengths and
raises `DDMError` on anything else, so a garbage record never reaches the daemon. Unknown extra
fields are ignored (a newer peer may add some); missing or malformed known fields are errors.
This module does not import hivemind (cheap to import, pure data).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

from ddm_node.core.errors import DDMError
from ddm_node.swarm.addresses import maddr_problem, split_grpc

MAX_STR = 256
MAX_MADDRS = 16
MAX_SHARD = 65535
MAX_STEP = 2**62
# Bounds of a peer record's live training fields (a writer clamps to them; readers reject anything else).
MAX_RATE = 1e9  # images/s
MAX_LOSS = 1e6
MAX_ETA = 1e9  # seconds
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{1,128}$")  # libp2p peer ids are base58
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")

R = TypeVar("R", bound="_Record")


class RecordKind(str, Enum):
    """The kinds of DHT record; each names its key (see swarm/dht.py). Per-shard kinds have one key per shard."""

    PEERS = "peers"
    CLAIM = "claim"
    CKPT = "ckpt"
    REPLICA = "replica"
    STATS = "stats"
    ROUTER = "router"
    PLAN = "plan"
    PACK = "pack"  # a data pack's holders; slot k < K: shard k's pack, slot K: the held-out pack

    def __str__(self) -> str:  # the value in f-strings and DHT keys, as on Python 3.12
        return self.value

    @property
    def per_shard(self) -> bool:
        return self in (RecordKind.CLAIM, RecordKind.CKPT, RecordKind.REPLICA, RecordKind.STATS, RecordKind.PACK)


def _bad(cls_name: str, field: str, why: str) -> DDMError:
    return DDMError(f"bad {cls_name} record: {field} {why}")


def _field(value: dict, cls_name: str, name: str) -> Any:
    if name not in value:
        raise _bad(cls_name, name, "is missing")
    return value[name]


def _int(v: Any, c: str, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(c, name, f"must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _bad(c, name, f"out of range [{lo}, {hi}]: {v}")
    return v


def _time(v: Any, c: str, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(c, name, f"must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < 0 or v > 1e11:
        raise _bad(c, name, f"is not a plausible time: {v}")
    return v


def _opt_number(v: Any, c: str, name: str, hi: float) -> float | None:
    """None, or a finite number in [0, hi]."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(c, name, f"must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or not 0 <= v <= hi:
        raise _bad(c, name, f"out of range [0, {hi:g}]: {v}")
    return float(v)


def _bool(v: Any, c: str, name: str) -> bool:
    if not isinstance(v, bool):
        raise _bad(c, name, f"must be a boolean, got {type(v).__name__}")
    return v


def _text(v: Any, c: str, name: str, max_len: int = MAX_STR, allow_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise _bad(c, name, f"must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise _bad(c, name, f"longer than {max_len} characters")
    if not v and not allow_empty:
        raise _bad(c, name, "is empty")
    if not _PRINTABLE.match(v):
        raise _bad(c, name, "holds non-printable characters")
    return v


def _hex64(v: Any, c: str, name: str) -> str:
    if not isinstance(v, str) or not _HEX64.match(v):
        raise _bad(c, name, "must be 64 lowercase hex characters")
    return v


def _peer_id(v: Any, c: str, name: str) -> str:
    if not isinstance(v, str) or not _PEER_ID.match(v):
        raise _bad(c, name, "is not a base58 peer id")
    return v


def _grpc(v: Any, c: str, name: str, allow_empty: bool = False) -> str:
    v = _text(v, c, name, allow_empty=allow_empty)
    if v and split_grpc(v) is None:  # swarm/addresses.py: the forms a peer can be dialed at
        raise _bad(c, name, f"is not host:port of a peer: {v[:80]!r}")
    return v


def _check_dict(value: Any, c: str) -> dict:
    if not isinstance(value, dict):
        raise DDMError(f"bad {c} record: expected a mapping, got {type(value).__name__}")
    return value


class _Record:
    """Shared helpers: `to_value` is the dataclass as a dict (tuples become lists, None fields are left out)."""

    def to_value(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is not None:  # an optional field left out reads back as None (and costs no bytes)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def validated(self: R) -> R:
        """Round-trip through `from_value`: raises DDMError if this record would be rejected by readers."""
        return type(self).from_value(self.to_value())  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PeerRecord(_Record):
    """A node's heartbeat: where to reach it and what it is doing (shard -1 = none), and while it trains a shard
    its live progress: step, images/s, smoothed loss, seconds to the budget (None: unknown or not training)."""

    KIND: ClassVar[RecordKind] = RecordKind.PEERS
    peer_id: str
    public_key: str
    grpc: str
    maddrs: tuple[str, ...]
    version: str
    heartbeat: float
    state: str
    shard: int
    step: int | None = None
    images_per_s: float | None = None
    loss: float | None = None
    eta: float | None = None

    @classmethod
    def from_value(cls, value: Any) -> PeerRecord:
        c = "peer"
        v = _check_dict(value, c)
        maddrs = _field(v, c, "maddrs")
        if not isinstance(maddrs, (list, tuple)) or len(maddrs) > MAX_MADDRS:
            raise _bad(c, "maddrs", f"must be a list of at most {MAX_MADDRS} strings")
        peer_id = _peer_id(_field(v, c, "peer_id"), c, "peer_id")
        for m in maddrs:  # a peer speaks for itself only: each multiaddr names its own peer id
            problem = maddr_problem(_text(m, c, "maddrs[]"), peer_id)
            if problem is not None:
                raise _bad(c, "maddrs[]", problem)
        return cls(
            peer_id=peer_id,
            public_key=_hex64(_field(v, c, "public_key"), c, "public_key"),
            grpc=_grpc(_field(v, c, "grpc"), c, "grpc", allow_empty=True),
            maddrs=tuple(maddrs),
            version=_text(_field(v, c, "version"), c, "version", max_len=64),
            heartbeat=_time(_field(v, c, "heartbeat"), c, "heartbeat"),
            state=_text(_field(v, c, "state"), c, "state", max_len=64),
            shard=_int(_field(v, c, "shard"), c, "shard", -1, MAX_SHARD),
            # live fields: optional (older peers do not send them)
            step=None if v.get("step") is None else _int(v["step"], c, "step", 0, MAX_STEP),
            images_per_s=_opt_number(v.get("images_per_s"), c, "images_per_s", MAX_RATE),
            loss=_opt_number(v.get("loss"), c, "loss", MAX_LOSS),
            eta=_opt_number(v.get("eta"), c, "eta", MAX_ETA),
        )


@dataclass(frozen=True)
class Claim(_Record):
    """A lease on a shard. `expires_at` mirrors the DHT expiration (readers overwrite it with the
    expiration the DHT reports, which is the one that counts)."""

    KIND: ClassVar[RecordKind] = RecordKind.CLAIM
    shard: int
    peer_id: str
    public_key: str
    grpc: str
    claimed_at: float
    released: bool = False
    expires_at: float = 0.0

    def live(self, now: float) -> bool:
        """Counts for ownership: not released and not expired at `now`."""
        return not self.released and self.expires_at > now

    @classmethod
    def from_value(cls, value: Any) -> Claim:
        c = "claim"
        v = _check_dict(value, c)
        return cls(
            shard=_int(_field(v, c, "shard"), c, "shard", 0, MAX_SHARD),
            peer_id=_peer_id(_field(v, c, "peer_id"), c, "peer_id"),
            public_key=_hex64(_field(v, c, "public_key"), c, "public_key"),
            grpc=_grpc(_field(v, c, "grpc"), c, "grpc", allow_empty=True),
            claimed_at=_time(_field(v, c, "claimed_at"), c, "claimed_at"),
            released=_bool(v.get("released", False), c, "released"),
            expires_at=_time(v.get("expires_at", 0.0), c, "expires_at"),
        )


@dataclass(frozen=True)
class CheckpointRecord(_Record):
    """A published expert checkpoint: manifest ids are sha256 hex of the manifest bytes."""

    KIND: ClassVar[RecordKind] = RecordKind.CKPT
    shard: int
    step: int
    expert_manifest: str
    state_manifest: str
    publisher: str
    grpc: str
    final: bool

    @classmethod
    def from_value(cls, value: Any) -> CheckpointRecord:
        c = "checkpoint"
        v = _check_dict(value, c)
        return cls(
            shard=_int(_field(v, c, "shard"), c, "shard", 0, MAX_SHARD),
            step=_int(_field(v, c, "step"), c, "step", 0, MAX_STEP),
            expert_manifest=_hex64(_field(v, c, "expert_manifest"), c, "expert_manifest"),
            state_manifest=_hex64(_field(v, c, "state_manifest"), c, "state_manifest"),
            publisher=_hex64(_field(v, c, "publisher"), c, "publisher"),
            grpc=_grpc(_field(v, c, "grpc"), c, "grpc"),
            final=_bool(_field(v, c, "final"), c, "final"),
        )


@dataclass(frozen=True)
class ReplicaRecord(_Record):
    """A mirror holding (and serving) a copy of someone's checkpoint."""

    KIND: ClassVar[RecordKind] = RecordKind.REPLICA
    shard: int
    step: int
    expert_manifest: str
    state_manifest: str
    publisher_of_checkpoint: str
    holder_key: str
    grpc: str

    @classmethod
    def from_value(cls, value: Any) -> ReplicaRecord:
        c = "replica"
        v = _check_dict(value, c)
        return cls(
            shard=_int(_field(v, c, "shard"), c, "shard", 0, MAX_SHARD),
            step=_int(_field(v, c, "step"), c, "step", 0, MAX_STEP),
            expert_manifest=_hex64(_field(v, c, "expert_manifest"), c, "expert_manifest"),
            state_manifest=_hex64(_field(v, c, "state_manifest"), c, "state_manifest"),
            publisher_of_checkpoint=_hex64(
                _field(v, c, "publisher_of_checkpoint"), c, "publisher_of_checkpoint"
            ),
            holder_key=_hex64(_field(v, c, "holder_key"), c, "holder_key"),
            grpc=_grpc(_field(v, c, "grpc"), c, "grpc"),
        )


@dataclass(frozen=True)
class StatsRecord(_Record):
    """A shard's cluster statistics artifact (manifest id) and where to fetch it."""

    KIND: ClassVar[RecordKind] = RecordKind.STATS
    shard: int
    manifest: str
    grpc: str

    @classmethod
    def from_value(cls, value: Any) -> StatsRecord:
        c = "stats"
        v = _check_dict(value, c)
        return cls(
            shard=_int(_field(v, c, "shard"), c, "shard", 0, MAX_SHARD),
            manifest=_hex64(_field(v, c, "manifest"), c, "manifest"),
            grpc=_grpc(_field(v, c, "grpc"), c, "grpc"),
        )


@dataclass(frozen=True)
class RouterRecord(_Record):
    """A trained learned-router artifact."""

    KIND: ClassVar[RecordKind] = RecordKind.ROUTER
    manifest: str
    step: int
    grpc: str
    publisher: str

    @classmethod
    def from_value(cls, value: Any) -> RouterRecord:
        c = "router"
        v = _check_dict(value, c)
        return cls(
            manifest=_hex64(_field(v, c, "manifest"), c, "manifest"),
            step=_int(_field(v, c, "step"), c, "step", 0, MAX_STEP),
            grpc=_grpc(_field(v, c, "grpc"), c, "grpc"),
            publisher=_hex64(_field(v, c, "publisher"), c, "publisher"),
        )


@dataclass(frozen=True)
class PlanRecord(_Record):
    """A peer that serves the plan file whose sha256 is `run_id`."""

    KIND: ClassVar[RecordKind] = RecordKind.PLAN
    run_id: str
    grpc: str

    @classmethod
    def from_value(cls, value: Any) -> PlanRecord:
        c = "plan"
        v = _check_dict(value, c)
        return cls(
            run_id=_hex64(_field(v, c, "run_id"), c, "run_id"),
            grpc=_grpc(_field(v, c, "grpc"), c, "grpc"),
        )


@dataclass(frozen=True)
class PackRecord(_Record):
    """A peer serving a data pack (the plan's sha256 `pack`) as the signed artifact `manifest` by `publisher`.
    The key's slot ("shard") is a shard index, or K for the held-out pack."""

    KIND: ClassVar[RecordKind] = RecordKind.PACK
    shard: int
    pack: str
    manifest: str
    publisher: str
    holder: str
    grpc: str

    @classmethod
    def from_value(cls, value: Any) -> PackRecord:
        c = "pack"
        v = _check_dict(value, c)
        return cls(
            shard=_int(_field(v, c, "shard"), c, "shard", 0, MAX_SHARD),
            pack=_hex64(_field(v, c, "pack"), c, "pack"),
            manifest=_hex64(_field(v, c, "manifest"), c, "manifest"),
            publisher=_hex64(_field(v, c, "publisher"), c, "publisher"),
            holder=_hex64(_field(v, c, "holder"), c, "holder"),
            grpc=_grpc(_field(v, c, "grpc"), c, "grpc"),
        )


# Every record class, for a check that cannot know the kind (the DHT record validator sees hashed keys).
RECORD_TYPES: tuple[type, ...] = (Claim, CheckpointRecord, ReplicaRecord, PeerRecord, StatsRecord, RouterRecord,
                                  PlanRecord, PackRecord)
