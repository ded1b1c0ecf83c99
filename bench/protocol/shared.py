"""Several simulated islands on one hivemind DHT peer: a validator that signs for several keys, a `Swarm` view per
island, and the DHT traffic each island makes (calls, bytes, latency per record kind).

A real island owns one DHT child (and p2pd). Hundreds of them do not fit on one 2-core box, so `bench.protocol`
starts one DHT peer per `Host` and lets `per_host` islands share it: the peer's validator (`SharedKeysValidator`)
signs each island's records with that island's own key, and every island writes and reads through its own
`IslandSwarm`, so each record is still owned and signed by one island key, exactly as on a DHT of real islands.
What differs from real islands: co-hosted islands share a libp2p peer id, multiaddrs and one pipe to the DHT child.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from hivemind.utils import MSGPackSerializer

from ddm_node.core.identity import Identity
from ddm_node.swarm.dht import Entry, Swarm
from ddm_node.swarm.keys import DialFilter
from ddm_node.swarm.records import RecordKind
from ddm_node.swarm.validator import SUFFIX_LEN, Ed25519RecordValidator, owner_marker

SUBKEY_BYTES = 74  # an owner marker as hivemind packs it (72 characters + header)


class SharedKeysValidator(Ed25519RecordValidator):
    """`Ed25519RecordValidator` for a DHT peer that several islands share: it signs a record with the key its owner
    subkey names, for every key it was given; what it admits is unchanged (any owned record its owner signed)."""

    def __init__(self, identities: Iterable[Identity]):
        identities = list(identities)
        super().__init__(identities[0])
        self._keys = {i.public_hex: i for i in identities}

    def signer(self, owner: str | None) -> Identity | None:
        return self._keys.get(owner or "")


@dataclass
class KindTraffic:
    """One record kind's DHT calls by one island: count, bytes (record values as stored, signature and owner subkey
    included) and latency of each call (seconds)."""

    puts: int = 0
    put_bytes: int = 0
    gets: int = 0
    get_bytes: int = 0
    get_records: int = 0
    put_s: list[float] = field(default_factory=list)
    get_s: list[float] = field(default_factory=list)


class Traffic:
    """DHT calls per record kind, for one island (thread-safe); `snapshot` copies the counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.kinds: dict[str, KindTraffic] = defaultdict(KindTraffic)

    def put(self, kind: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            t = self.kinds[str(kind)]
            t.puts, t.put_bytes = t.puts + 1, t.put_bytes + nbytes
            t.put_s.append(seconds)

    def get(self, kind: str, records: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            t = self.kinds[str(kind)]
            t.gets, t.get_bytes, t.get_records = t.gets + 1, t.get_bytes + nbytes, t.get_records + records
            t.get_s.append(seconds)

    def snapshot(self) -> dict[str, KindTraffic]:
        with self._lock:
            return {k: KindTraffic(v.puts, v.put_bytes, v.gets, v.get_bytes, v.get_records, list(v.put_s),
                                   list(v.get_s)) for k, v in self.kinds.items()}


def record_bytes(record) -> int:
    """A record's size on the DHT: its msgpack value, the signature suffix and the owner subkey."""
    return len(MSGPackSerializer.dumps(record.to_value())) + SUFFIX_LEN + SUBKEY_BYTES


class MeteredSwarm(Swarm):
    """A `Swarm` whose puts and reads are counted in `traffic` (the assembling client's)."""

    def __init__(self, *args, **kwargs):
        self.traffic = Traffic()
        super().__init__(*args, **kwargs)

    def put(self, kind, shard, record, ttl=120.0, *, expiration=None) -> bool:
        t = time.perf_counter()
        ok = super().put(kind, shard, record, ttl, expiration=expiration)
        self.traffic.put(kind, record_bytes(record), time.perf_counter() - t)
        return ok

    def read(self, kind, shard=None, run_id=None) -> list[Entry]:
        t = time.perf_counter()
        entries = super().read(kind, shard, run_id)
        self.traffic.get(kind, len(entries), sum(record_bytes(e.record) for e in entries), time.perf_counter() - t)
        return entries

    def read_many(self, kind, shards) -> dict[int, list[Entry]]:
        """Counted as one get (one traversal) with every key's records."""
        t = time.perf_counter()
        found = super().read_many(kind, shards)
        if found:
            entries = [e for es in found.values() for e in es]
            self.traffic.get(kind, len(entries), sum(record_bytes(e.record) for e in entries),
                             time.perf_counter() - t)
        return found


class IslandSwarm(MeteredSwarm):
    """One island's `Swarm` on a DHT peer another `Swarm` (its host's) started: its own key and owner subkey, the
    host's DHT child, pipe lock and dial rule. `shutdown` only closes this view (the host stops the DHT)."""

    def __init__(self, host: Swarm, identity: Identity):  # not super().__init__: that starts a DHT child
        self.identity, self.run_id, self.public_key = identity, host.run_id, identity.public_hex
        self.meter, self.validator, self.marker = None, host.validator, owner_marker(identity.public_hex)
        self._lock, self._child, self._dht, self._peer_id = host._lock, host._child, host._dht, host.peer_id
        self._dialable = DialFilter(host._dialable.hosts, self.public_key)
        self._closed = False
        self.traffic = Traffic()

    def shutdown(self) -> None:
        self._closed = True


KINDS_SHOWN = (RecordKind.PEERS, RecordKind.CLAIM, RecordKind.CKPT, RecordKind.REPLICA, RecordKind.STATS)
