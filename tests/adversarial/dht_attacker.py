"""A DHT attacker with free identities that writes signed records straight into other peers' storage.

`DHTAttacker` is a raw `hivemind.DHT` (no record validator, no storage caps; in client mode, so it
serves nothing) whose DHT child calls the real `rpc_store` of every peer in its routing table, the
way any libp2p peer can. Its records are validly signed by their owners (free, fresh Ed25519 identities
made for the purpose), so an honest validator that checks only owner, signature, size and expiry
admits them:

- `push`: a few records given whole (for example one value that is not msgpack, `signed_record`).
- `flood`: `count` identities, each storing one valid ~4 KiB record under one key (or records spread
  over many keys, by few identities). The identities and records are made inside the DHT child from a seed: hivemind's
  pipe to its child breaks on requests over ~16 KiB, so megabytes of records cannot be sent through it.

`count_records` and `inject` look into, and write past every validator into, an honest node's own
storage (run in its DHT child). Everything runs on 127.0.0.1; `close` stops the DHT child and its p2pd.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache, partial

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)

# isort: split
import hivemind  # noqa: E402  (after ddm_node.swarm, see above)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.timed_storage import TimedStorage

from ddm_node.core.identity import Identity
from ddm_node.swarm.records import PeerRecord
from ddm_node.swarm.validator import MAX_VALUE_BYTES, Ed25519RecordValidator, owner_marker

TIMEOUT = 60.0
BATCH = 128  # records per store message: 128 x ~4.3 KB = 0.55 MB, well under p2pd's 4 MiB


def signed_record(identity: Identity, key: str, value: bytes, expiration: float) -> tuple[str, bytes]:
    """(subkey, value + owner signature) as the owner's validator would store it, for any value bytes."""
    subkey = owner_marker(identity.public_hex)
    record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey), value, expiration)
    return subkey, Ed25519RecordValidator(identity).sign_value(record)


PEER_ID = "Qm" + "z" * 44
_MADDR = "/dns/{host}/tcp/1/p2p/" + PEER_ID


def big_peer_record(public_hex: str, size: int = MAX_VALUE_BYTES - 40) -> bytes:
    """A well-formed PeerRecord of at most `size` packed bytes, padded with long multiaddrs (the 4 KiB cap)."""
    n, length = _maddrs_for(size)
    record = PeerRecord(PEER_ID, public_hex, "", _maddrs(n, length), "0.1.0", 1.0, "idle", -1).validated()
    return MSGPackSerializer.dumps(record.to_value())


def _maddrs(n: int, length: int) -> tuple[str, ...]:
    """`n` valid multiaddrs of the record's own peer id, each `length` characters (a long DNS name)."""
    h = length - len(_MADDR.format(host=""))
    labels = -(-(h + 1) // 64)  # DNS labels of at most 63 characters, joined by dots
    chars = h - (labels - 1)
    host = ".".join("a" * (chars // labels + (i < chars % labels)) for i in range(labels))
    return tuple(_MADDR.format(host=host) for _ in range(n))


@lru_cache(maxsize=8)
def _maddrs_for(size: int) -> tuple[int, int]:
    """(count, length) of the longest multiaddr padding that keeps a PeerRecord within `size` bytes."""
    shortest = len(_MADDR.format(host="a"))
    for n in range(16, -1, -1):
        for length in range(250, shortest - 1, -1):
            record = PeerRecord(PEER_ID, "0" * 64, "", _maddrs(n, length), "0.1.0", 1.0, "idle", -1)
            if len(MSGPackSerializer.dumps(record.to_value())) <= size:
                return n, length
    raise ValueError(f"no PeerRecord fits in {size} bytes")


def _identity(seed: bytes, i: int) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed + i.to_bytes(8, "big")).digest()))


def flood_keys(seed: bytes, count: int) -> list[str]:
    """The public keys `flood` uses for `seed` (the same derivation, for tests to recognise them)."""
    return [_identity(seed, i).public_hex for i in range(count)]


async def _send(node, key_ids: list, subkeys: list, values: list, expirations: list, in_cache: bool = False,
                only: str | None = None) -> dict:
    """rpc_store every record at every peer in the routing table (or only at the peer `only`, base58), in
    batches; per peer: how many were accepted."""
    accepted = {}
    for peer in list(node.protocol.routing_table.peer_id_to_uid):
        if only is not None and peer.to_base58() != only:
            continue
        ok = 0
        for i in range(0, len(values), BATCH):
            result = await node.protocol.call_store(peer, keys=key_ids[i:i + BATCH], values=values[i:i + BATCH],
                                                    expiration_time=expirations[i:i + BATCH],
                                                    subkeys=subkeys[i:i + BATCH], in_cache=in_cache)
            ok += sum(bool(r) for r in result or ())
        accepted[peer.to_base58()] = ok
    return accepted


async def _push(_dht, node, key: str, records: list[tuple[str, bytes]], expiration: float, in_cache: bool) -> dict:
    key_id = DHTID.generate(source=key)
    n = len(records)
    return await _send(node, [key_id] * n, [r[0] for r in records], [r[1] for r in records], [expiration] * n,
                       in_cache=in_cache)


async def _flood(_dht, node, key: str, count: int, seed: bytes, size: int, expiration: float, spread: int,
                 identities: int, only: str | None) -> dict:
    names = [key] if spread <= 1 else [f"{key}/{i}" for i in range(spread)]
    owners = [_identity(seed, i) for i in range(min(count, identities))]
    key_ids, subkeys, values = [], [], []
    for i in range(count):
        ident, name = owners[i % len(owners)], names[i % len(names)]
        subkey, value = signed_record(ident, name, big_peer_record(ident.public_hex, size), expiration)
        key_ids.append(DHTID.generate(source=name))
        subkeys.append(subkey)
        values.append(value)
    return await _send(node, key_ids, subkeys, values, [expiration] * count, only=only)


async def _count(_dht, node, key: str | None) -> dict:
    """Records in a node's DHT storage and cache (whatever storage class it runs), and under `key`."""
    def records(storage) -> int:
        return sum(len(item.value) if isinstance(item.value, DictionaryDHTValue) else 1 for _, item in storage.items())

    out = {"storage": records(node.protocol.storage), "cache": records(node.protocol.cache)}
    if key is not None:
        item = node.protocol.storage.get(DHTID.generate(source=key))
        out["key"] = len(item.value) if item is not None and isinstance(item.value, DictionaryDHTValue) else 0
    return out


async def _inject(_dht, node, key: str, subkey: str, value: bytes, expiration: float) -> bool:
    """Put a value straight into a node's own storage, past every validator (as an older version that
    admitted it would hold it)."""
    return bool(node.protocol.storage.store_subkey(DHTID.generate(source=key), subkey, value, expiration))


def count_records(dht, key: str | None = None) -> dict:
    """What a node's DHT holds (run in its DHT child): records in its storage and cache, and under `key`."""
    return dht.run_coroutine(partial(_count, key=key), return_future=True).result(timeout=TIMEOUT)


def inject(dht, key: str, subkey: str, value: bytes, expiration: float) -> bool:
    """Store a value in `dht`'s own storage without validation (see `_inject`)."""
    return dht.run_coroutine(partial(_inject, key=key, subkey=subkey, value=value, expiration=expiration),
                             return_future=True).result(timeout=TIMEOUT)


async def _answer(_dht, node, key: str, records: list[tuple[str, bytes]], expiration: float, outer: float) -> bool:
    d = DictionaryDHTValue()
    for subkey, value in records:
        d.store(subkey, value, expiration)
    storage = node.protocol.storage
    key_id = DHTID.generate(source=key)
    del storage[key_id]
    return bool(super(type(storage), storage).store(key_id, d, outer) if type(storage) is not TimedStorage
                else storage.store(key_id, d, outer))


async def _known(_dht, node) -> int:
    return len(node.protocol.routing_table.peer_id_to_uid)


class DHTAttacker:
    """A raw hivemind DHT peer that writes signed records of its choosing into every peer it knows."""

    def __init__(self, initial_peers: list[str], serve: bool = False):
        """`serve=False`: client mode, it calls others' rpc_store but serves nothing and is handed no records, so
        whatever a reader finds comes from the honest nodes (a real attacker would not serve the honest records).
        `serve=True`: a full DHT node that answers lookups (see `answer`)."""
        self.dht = hivemind.DHT(initial_peers=list(initial_peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                                nat_port_map=False, client_mode=not serve)

    def answer(self, key: str, records: list[tuple[str, bytes]], expiration: float, outer: float) -> bool:
        """Answer every lookup of `key` with these (subkey, signed value) records, each expiring at `expiration`,
        as one dictionary whose own expiration is `outer` (hivemind takes it from the answer, unchecked)."""
        return self.dht.run_coroutine(partial(_answer, key=key, records=records, expiration=expiration,
                                              outer=outer), return_future=True).result(timeout=TIMEOUT)

    def push(self, key: str, records: list[tuple[str, bytes]], expiration: float, in_cache: bool = False) -> dict:
        """Store these (subkey, signed value) records under `key` at every known peer (`in_cache`: into its
        cache, as hivemind nodes do after a lookup); per peer, how many it took. Keep them small (the pipe)."""
        future = self.dht.run_coroutine(partial(_push, key=key, records=records, expiration=expiration,
                                                in_cache=in_cache), return_future=True)
        return future.result(timeout=TIMEOUT)

    def flood(self, key: str, count: int, expiration: float, seed: bytes = b"flood", size: int = MAX_VALUE_BYTES - 40,
              spread: int = 1, identities: int | None = None, only: str | None = None) -> dict:
        """`count` valid PeerRecords of at most `size` bytes, record i signed by identity i % `identities`
        (default: a fresh identity each) under `key`, or with `spread` > 1 under key i % spread of the keys
        f"{key}/0".."{key}/{spread-1}"; to every known peer, or only to the peer `only` (base58 peer id); per
        peer, how many records it accepted."""
        future = self.dht.run_coroutine(partial(_flood, key=key, count=count, seed=seed, size=size,
                                                expiration=expiration, spread=spread,
                                                identities=identities or count, only=only), return_future=True)
        return future.result(timeout=TIMEOUT)

    def known_peers(self) -> int:
        """Peers in the attacker's routing table (it writes to each of them)."""
        return self.dht.run_coroutine(_known, return_future=True).result(timeout=TIMEOUT)

    def close(self) -> None:
        self.dht.shutdown()
