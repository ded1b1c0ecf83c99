"""Swarm layer: records, the Ed25519 record validator, owner-bound DHT records and shard claims.

Unit tests run without processes; `multiproc` tests start real hivemind DHT peers on 127.0.0.1
(each a child process with its own p2pd) and shut every one down in fixtures.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import secrets
import socket
import threading
import time

import psutil
import pytest

import ddm_node.swarm  # noqa: F401  (first: it picks hivemind's memory sharing strategy before hivemind loads)

# isort: split
import hivemind  # noqa: E402  (after ddm_node.swarm, see above)
from hivemind.dht.routing import DHTID  # noqa: E402  (after ddm_node.swarm, see above)
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

import ddm_node.swarm.dht_process as dht_process
from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.swarm.claims import ClaimManager, winner
from ddm_node.swarm.dht import Swarm, dht_key
from ddm_node.swarm.records import (
    CheckpointRecord,
    Claim,
    PeerRecord,
    PlanRecord,
    RecordKind,
    ReplicaRecord,
    RouterRecord,
    StatsRecord,
)
from ddm_node.swarm.validator import MAX_VALUE_BYTES, Ed25519RecordValidator

H = "ab" * 32  # a valid 64-hex id
H2 = "cd" * 32
PEER = "12D3KooWHPmjMnsMBwLTJvWNnh7qgUvkjVeHuGniGo9tQ1ygBwoM"


def _p2pd_descendants() -> list[psutil.Process]:
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "p2pd" in p.name() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# records


def _samples(pub: str = H) -> list:
    return [
        PeerRecord(PEER, pub, "127.0.0.1:5000", ("/ip4/127.0.0.1/tcp/1/p2p/" + PEER,), "0.1.0", 1.5e9, "train", 3),
        Claim(2, PEER, pub, "", 1.7e9, released=True, expires_at=1.7e9 + 30),
        CheckpointRecord(1, 500, H, H2, pub, "node-a.local:50051", False),
        ReplicaRecord(1, 500, H, H2, H2, pub, "[::1]:50051"),
        StatsRecord(4, H2, "10.0.0.2:7000"),
        RouterRecord(H, 10, "127.0.0.1:1", pub),
        PlanRecord(H2, "127.0.0.1:2"),
    ]


@pytest.mark.parametrize("record", _samples(), ids=lambda r: type(r).__name__)
def test_record_round_trip(record):
    value = record.to_value()
    assert all(isinstance(v, (str, int, float, bool, list)) for v in value.values())
    packed = MSGPackSerializer.loads(MSGPackSerializer.dumps(value))
    assert type(record).from_value(packed) == record


@pytest.mark.parametrize(
    "cls, patch, needle",
    [
        (CheckpointRecord, {"step": "7"}, "step must be an integer"),
        (CheckpointRecord, {"step": -1}, "step out of range"),
        (CheckpointRecord, {"final": 1}, "final must be a boolean"),
        (CheckpointRecord, {"expert_manifest": "AB" * 32}, "expert_manifest must be 64 lowercase hex"),
        (CheckpointRecord, {"publisher": H[:-1]}, "publisher must be 64 lowercase hex"),
        (CheckpointRecord, {"grpc": "http://x:1"}, "grpc is not host:port"),
        (CheckpointRecord, {"grpc": "h:70000"}, "grpc is not host:port"),
        (CheckpointRecord, {"shard": True}, "shard must be an integer"),
        (PeerRecord, {"maddrs": ["x"] * 17}, "maddrs must be a list"),
        (PeerRecord, {"state": "s" * 65}, "state longer than 64"),
        (PeerRecord, {"version": "a\nb"}, "non-printable"),
        (PeerRecord, {"heartbeat": float("nan")}, "heartbeat is not a plausible time"),
        (PeerRecord, {"peer_id": "0OIl"}, "peer_id is not a base58"),
        (Claim, {"claimed_at": None}, "claimed_at must be a number"),
        (Claim, {"shard": -1}, "shard out of range"),
        (PlanRecord, {"run_id": None}, "run_id must be 64"),
    ],
)
def test_record_rejects_garbage(cls, patch, needle):
    base = next(r for r in _samples() if isinstance(r, cls)).to_value()
    with pytest.raises(DDMError, match=needle):
        cls.from_value({**base, **patch})


@pytest.mark.parametrize("junk", [None, 3, "x", [1, 2], b"\x00", {}])
def test_record_rejects_non_mappings_and_missing_fields(junk):
    with pytest.raises(DDMError):
        StatsRecord.from_value(junk)


def test_record_missing_field_named():
    value = _samples()[2].to_value()
    del value["state_manifest"]
    with pytest.raises(DDMError, match="state_manifest is missing"):
        CheckpointRecord.from_value(value)


# ---------------------------------------------------------------------------------------------
# validator


def _stats(shard: int, **extra) -> dict:
    """A well-formed record value (the validator admits only values that parse as some record type)."""
    return {**StatsRecord(shard, H, "127.0.0.1:1").to_value(), **extra}


def _record(validator: Ed25519RecordValidator, subkey, value=None, key="ddm/run/ckpt/0", ttl=60.0) -> DHTRecord:
    """A record as hivemind builds it (key hashed, subkey and value msgpack), signed by `validator`."""
    raw = DHTRecord(
        key=DHTID.generate(source=key).to_bytes(),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value if value is not None else _stats(1)),
        expiration_time=get_dht_time() + ttl,
    )
    return dataclasses.replace(raw, value=validator.sign_value(raw))


def test_validator_sign_validate_strip():
    va = Ed25519RecordValidator(Identity.generate())
    rec = _record(va, va.local_marker, _stats(5))
    assert rec.value != MSGPackSerializer.dumps(_stats(5))  # signature appended
    assert va.validate(rec)
    assert MSGPackSerializer.loads(va.strip_value(rec)) == _stats(5)
    # any peer's validator (another key) accepts it too: validity depends only on the owner's key
    assert Ed25519RecordValidator(Identity.generate()).validate(rec)


def test_validator_rejects_tampering():
    va = Ed25519RecordValidator(Identity.generate())
    rec = _record(va, va.local_marker, _stats(5))
    forged_value = MSGPackSerializer.dumps(_stats(6)) + rec.value[-72:]  # same signature, new value
    assert not va.validate(dataclasses.replace(rec, value=forged_value))
    assert not va.validate(dataclasses.replace(rec, expiration_time=rec.expiration_time + 100))
    other_key = DHTID.generate(source="ddm/run/ckpt/1").to_bytes()
    assert not va.validate(dataclasses.replace(rec, key=other_key))  # signature bound to the key
    flipped = bytearray(rec.value)
    flipped[-1] ^= 1
    assert not va.validate(dataclasses.replace(rec, value=bytes(flipped)))


def test_validator_rejects_wrong_owner_and_unowned():
    va, vb = Ed25519RecordValidator(Identity.generate()), Ed25519RecordValidator(Identity.generate())
    # A cannot sign under B's marker: sign_value leaves it unsigned, and a re-labelled signature fails
    unsigned = _record(va, vb.local_marker)
    assert not va.validate(unsigned)
    mine = _record(va, va.local_marker)
    relabelled = dataclasses.replace(mine, subkey=MSGPackSerializer.dumps(vb.local_marker))
    assert not vb.validate(relabelled)
    # every record must be owned: plain values, foreign subkeys, bytes subkeys are all refused
    assert not va.validate(_record(va, None))
    assert not va.validate(_record(va, "some-subkey"))
    assert not va.validate(_record(va, va.local_marker.encode()))
    assert not va.validate(_record(va, va.local_marker + "x"))


def test_validator_caps_size_and_expiration():
    va = Ed25519RecordValidator(Identity.generate())
    assert va.validate(_record(va, va.local_marker, _stats(1, x="a" * (MAX_VALUE_BYTES - 120))))
    assert not va.validate(_record(va, va.local_marker, _stats(1, x="a" * MAX_VALUE_BYTES)))
    assert not va.validate(_record(va, va.local_marker, ttl=30 * 86400.0))


def test_validator_never_raises_on_junk():
    va = Ed25519RecordValidator(Identity.generate())
    for _ in range(50):
        junk = DHTRecord(secrets.token_bytes(20), secrets.token_bytes(8), secrets.token_bytes(100), 1e9)
        assert va.validate(junk) is False
    marker = MSGPackSerializer.dumps(va.local_marker)
    assert va.validate(DHTRecord(b"", marker, b"", float("nan"))) is False


def test_validator_merge_policy():
    ident = Identity.generate()
    v = Ed25519RecordValidator(ident)
    assert v.merge_with(Ed25519RecordValidator(ident))
    assert not v.merge_with(Ed25519RecordValidator(Identity.generate()))


def _raw_record(validator: Ed25519RecordValidator, raw_value: bytes, ttl: float = 60.0) -> DHTRecord:
    """A record whose value bytes are given as they are (not msgpack-encoded here), signed by `validator`."""
    raw = DHTRecord(DHTID.generate(source="ddm/run/ckpt/0").to_bytes(), MSGPackSerializer.dumps(validator.local_marker),
                    raw_value, get_dht_time() + ttl)
    return dataclasses.replace(raw, value=validator.sign_value(raw))


def test_validator_admits_only_well_formed_typed_records():
    va = Ed25519RecordValidator(Identity.generate())
    for record in _samples():  # every record kind
        assert va.validate(_raw_record(va, MSGPackSerializer.dumps(record.to_value()))), record
    good = MSGPackSerializer.dumps(_stats(1))
    for junk in (b"\xc1 not msgpack", good + b"\x00",  # never-used byte; trailing bytes
                 MSGPackSerializer.dumps({"x": 1}), MSGPackSerializer.dumps([1, 2]), MSGPackSerializer.dumps(None),
                 MSGPackSerializer.dumps((_stats(1),)),  # an extension type (hivemind's tuple)
                 b"\xa3\xff\xfe\xfd",  # a str that is not UTF-8
                 b"\x91" * 2000 + b"\xc0"):  # 2,000 nested lists
        assert not va.validate(_raw_record(va, junk)), junk[:16]
    nan = _record(va, va.local_marker)
    assert not va.validate(dataclasses.replace(nan, expiration_time=float("nan")))


def test_strip_value_turns_an_undecodable_value_into_nil():
    from ddm_node.swarm.validator import UNREADABLE

    va = Ed25519RecordValidator(Identity.generate())
    assert va.strip_value(_raw_record(va, b"\xc1 not msgpack")) == UNREADABLE
    assert MSGPackSerializer.loads(UNREADABLE) is None  # readers skip it (no record class takes None)
    assert va.strip_value(_raw_record(va, MSGPackSerializer.dumps(_stats(2)))) == MSGPackSerializer.dumps(_stats(2))


# ---------------------------------------------------------------------------------------------
# bounded storage (swarm/storage.py), in this process


def _marker(i: int) -> str:
    return f"[owner:{i:064x}]"


def test_storage_caps_records_per_key_and_per_node():
    from ddm_node.swarm.storage import BoundedStorage, StorageLimits

    st = BoundedStorage(StorageLimits(subkeys=4, entries=10))
    now = get_dht_time()
    k1, k2, k3 = (DHTID.generate(source=f"k{i}") for i in range(3))
    assert all(st.store(k1, b"v", now + 60, subkey=_marker(i)) for i in range(4))
    assert not st.store(k1, b"v", now + 60, subkey=_marker(4))  # the key is full
    assert st.store(k1, b"renewed", now + 61, subkey=_marker(0))  # a renewal always fits
    assert st.store(k2, b"v", now + 60, subkey=_marker(0)) and st.store(k2, b"v", now + 60, subkey=_marker(1))
    assert all(st.store(k3, b"v", now + 60, subkey=_marker(i)) for i in range(4))
    assert st.record_count() == 10
    assert not st.store(k2, b"v", now + 60, subkey=_marker(2))  # the node is full
    assert st.store(k2, b"v", now + 62, subkey=_marker(1))  # renewals still fit
    st.protected = frozenset({f"{7:064x}"})
    assert st.store(k1, b"v", now + 60, subkey=_marker(7))  # a protected owner passes both caps
    assert len(st.get(k1).value) == 5 and st.record_count() == 11 and st.refused == 2
    # what the storage refuses outright: plain values, foreign subkeys, oversized or non-finite records
    assert not st.store(k2, b"plain", now + 600)
    assert not st.store(k1, b"v", now + 60, subkey="x" * 73)
    assert not st.store(k1, b"v" * 5000, now + 63, subkey=_marker(0))
    assert not st.store(k1, b"v", float("nan"), subkey=_marker(0))
    assert not st.store(k1, b"v", float("inf"), subkey=_marker(0))


def test_storage_frees_expired_records_and_keeps_renewals_and_replays_apart(monkeypatch):
    from ddm_node.swarm import storage
    from ddm_node.swarm.storage import BoundedStorage, StorageLimits

    monkeypatch.setattr(storage, "PURGE_INTERVAL", 0.0)  # purge at every refusal (normally at most once a second)
    st = BoundedStorage(StorageLimits(subkeys=2, entries=2))
    now = get_dht_time()
    key, other = DHTID.generate(source="k"), DHTID.generate(source="other")
    assert st.store(key, b"v1", now + 0.3, subkey=_marker(1)) and st.store(key, b"v1", now + 60, subkey=_marker(2))
    assert not st.store(other, b"v", now + 60, subkey=_marker(3))
    time.sleep(0.5)
    assert st.store(other, b"v", now + 60, subkey=_marker(3))  # the expired record's slot is free again
    assert st.record_count() == 2
    # a replay of a superseded record (earlier expiration) is refused and does not shorten the current one
    assert st.store(key, b"v2", now + 120, subkey=_marker(2))
    assert not st.store(key, b"v1", now + 60, subkey=_marker(2))
    entries = dict(st.get(key).value.items())
    assert entries[_marker(2)].value == b"v2" and entries[_marker(2)].expiration_time == now + 120
    # the expiry heap does not grow with renewals
    for i in range(1000):
        assert st.store(key, b"v", now + 200 + i, subkey=_marker(2))
    inner = st.data[key].value
    assert len(inner.expiration_heap) <= 2 * len(inner.key_to_heap) + 64
    assert len(st.expiration_heap) <= 2 * len(st.key_to_heap) + 64


def test_storage_hands_out_copies_and_caps_whole_dictionaries():
    from hivemind.dht.storage import DictionaryDHTValue

    from ddm_node.swarm.storage import BoundedStorage, NoCache, StorageLimits

    st = BoundedStorage(StorageLimits(subkeys=3, entries=100))
    now = get_dht_time()
    key = DHTID.generate(source="k")
    assert st.store(key, b"v", now + 60, subkey=_marker(0))
    copy = st.get(key).value
    copy.store(_marker(9), b"merged by a lookup", now + 60)  # what hivemind's lookup does to the value it got
    assert len(st.get(key).value) == 1 and st.record_count() == 1
    whole = DictionaryDHTValue()
    for i in range(1, 6):
        whole.store(_marker(i), b"v", now + 60)
    st.store(key, whole, now + 60)  # a whole dictionary goes in record by record, under the caps
    assert len(st.get(key).value) == 3
    assert not NoCache().store(key, whole, now + 60) and not NoCache().store_subkey(key, _marker(1), b"v", now + 60)


def test_a_full_key_fits_well_under_the_p2pd_message_limit():
    from hivemind.dht.storage import DictionaryDHTValue

    from ddm_node.swarm.storage import MAX_ENTRIES, MAX_SUBKEYS, SLOT_BYTES
    from ddm_node.swarm.validator import SUFFIX_LEN

    exp = get_dht_time() + 86400.0
    biggest = [_marker(2**255), b"v" * (MAX_VALUE_BYTES + SUFFIX_LEN), exp]
    assert len(MSGPackSerializer.dumps(biggest)) == SLOT_BYTES
    full = DictionaryDHTValue()
    for i in range(MAX_SUBKEYS):
        full.store(_marker(2**255 + i), biggest[1], exp)
    packed = len(MSGPackSerializer.dumps(full))
    assert packed <= MAX_SUBKEYS * SLOT_BYTES + 64 and packed < (4 << 20) // 3, packed
    assert MAX_ENTRIES * SLOT_BYTES < 70 << 20  # the node's record bytes, as docs/THREAT_MODEL.md says


def test_a_lookup_is_not_ended_by_an_answer_that_claims_to_expire_never(monkeypatch):
    import asyncio

    from hivemind.dht import node as hivemind_node
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.utils.timed_storage import ValueWithExpiration

    from ddm_node.swarm.storage import _harden_lookups

    state_cls = hivemind_node._SearchState
    monkeypatch.setattr(state_cls, "add_candidate", state_cls.add_candidate)  # restored after the test
    _harden_lookups()

    async def lookup() -> tuple[bool, float]:
        state = state_cls(DHTID.generate(source="k"), float("inf"))  # latest=True
        answer = DictionaryDHTValue()
        answer.store(_marker(1), b"v", get_dht_time() + 60)
        state.add_candidate(ValueWithExpiration(answer, float("inf")), source_node_id=None)
        return state.finished, state.expiration_time

    finished, expiration = asyncio.run(lookup())
    assert not finished and expiration < get_dht_time() + 61


# ---------------------------------------------------------------------------------------------
# winner rule


def _claim(pub: str, at: float, released: bool = False, expires: float = 1e10) -> Claim:
    return Claim(0, PEER, pub, "", at, released=released, expires_at=expires)


def test_winner_is_deterministic_and_order_free():
    claims = [_claim("3" * 64, 10.0), _claim("1" * 64, 11.0), _claim("2" * 64, 10.0), _claim("0" * 64, 12.0)]
    results = {winner(list(p), now=100.0) for p in itertools.permutations(claims)}
    assert results == {claims[2]}  # earliest claimed_at; the tie 10.0 goes to the smaller key "22.."


def test_winner_ignores_released_and_expired():
    now = 100.0
    assert winner([], now) is None
    assert winner([_claim("1" * 64, 1.0, released=True)], now) is None
    assert winner([_claim("1" * 64, 1.0, expires=now)], now) is None
    alive = _claim("2" * 64, 50.0)
    assert winner([_claim("1" * 64, 1.0, released=True), _claim("0" * 64, 2.0, expires=99.0), alive], now) == alive


def test_dht_keys():
    assert dht_key(H, "claim", 3) == f"ddm/{H}/claim/3"
    assert dht_key(H, "peers") == f"ddm/{H}/peers"
    assert dht_key(H, "plan") == f"ddm/plan/{H}"
    for args in [(H, "claim"), (H, "peers", 1), (H, "nope"), ("xyz", "peers"), (H, "ckpt", -1)]:
        with pytest.raises(DDMError):
            dht_key(*args)


# ---------------------------------------------------------------------------------------------
# real DHT peers


@pytest.fixture(scope="module")
def trio():
    """Three peers of one run: A bootstraps, B and C join through A."""
    run_id = secrets.token_hex(32)
    swarms: list[Swarm] = []
    try:
        swarms.append(Swarm(Identity.generate(), run_id))
        for _ in range(2):
            swarms.append(Swarm(Identity.generate(), run_id, initial_peers=swarms[0].visible_maddrs()))
        yield tuple(swarms)
    finally:
        for s in swarms:
            s.shutdown()
        leftover = _p2pd_descendants()
        assert not leftover, f"p2pd still running after shutdown: {[p.pid for p in leftover]}"


_shards = itertools.count(100)  # each test uses its own shards, so tests do not see each other's records


def _ckpt(swarm: Swarm, shard: int, step: int) -> CheckpointRecord:
    return CheckpointRecord(shard, step, H, H2, swarm.public_key, "127.0.0.1:50051", False)


@pytest.mark.multiproc
def test_read_many_finds_what_a_read_per_key_finds(trio):
    a, b, c = trio
    shards = [next(_shards) for _ in range(5)]
    for i, shard in enumerate(shards[:4]):
        assert (a if i % 2 else b).announce(_ckpt(a if i % 2 else b, shard, 10 + i), ttl=30)
    assert b.announce(_ckpt(b, shards[1], 7), ttl=30)  # two owners under one key
    many = c.read_many(RecordKind.CKPT, shards)
    assert list(many) == shards and many[shards[4]] == []  # nothing under the last key
    assert {s: [e.record for e in es] for s, es in many.items()} == {s: c.checkpoints(s) for s in shards}
    assert len(many[shards[1]]) == 2 and c.read_many(RecordKind.CKPT, []) == {}
    with pytest.raises(DDMError):
        c.read_many("nonsense", shards)


@pytest.mark.multiproc
def test_records_visible_across_peers(trio):
    a, b, c = trio
    shard = next(_shards)
    assert b.checkpoints(shard) == [] and b.routers() == []  # get() returns None: empty list
    maddrs = tuple(a.visible_maddrs())
    peer = PeerRecord(a.peer_id, a.public_key, "127.0.0.1:50051", maddrs, "0.1.0", a.now(), "idle", -1)
    written = [
        a.announce(peer, ttl=30),
        a.announce(_ckpt(a, shard, 10), ttl=30),
        a.announce(ReplicaRecord(shard, 10, H, H2, H2, a.public_key, "127.0.0.1:1"), ttl=30),
        a.announce(StatsRecord(shard, H, "127.0.0.1:1"), ttl=30),
        a.announce(RouterRecord(H, 3, "127.0.0.1:1", a.public_key), ttl=30),
        a.announce(PlanRecord(a.run_id, "127.0.0.1:1"), ttl=30),
    ]
    assert all(written)
    assert [p.peer_id for p in b.peers()] == [a.peer_id]
    assert b.checkpoints(shard) == [_ckpt(a, shard, 10)]
    assert [r.holder_key for r in c.replicas(shard)] == [a.public_key]
    assert [s.manifest for s in c.stats(shard)] == [H]
    assert [r.step for r in b.routers()] == [3]
    assert [p.run_id for p in c.plan_holders(a.run_id)] == [a.run_id]
    assert c.plan_holders(H) == []  # another run's plan key
    # a node's newer record replaces its own older one; B's record sits next to A's
    assert a.announce(_ckpt(a, shard, 20), ttl=30)
    assert b.announce(_ckpt(b, shard, 5), ttl=30)
    got = {r.publisher: r.step for r in c.checkpoints(shard)}
    assert got == {a.public_key: 20, b.public_key: 5}


@pytest.mark.multiproc
def test_peer_cannot_overwrite_anothers_subkey(trio):
    a, b, _ = trio
    shard = next(_shards)
    assert a.announce(_ckpt(a, shard, 7), ttl=30)
    forged = _ckpt(a, shard, 999).to_value()
    key = a.key("ckpt", shard)
    stored = b.dht.store(key, forged, get_dht_time() + 60, subkey=a.marker)  # B has no right to A's subkey
    assert stored is False
    for reader in (a, b):
        assert [r.step for r in reader.checkpoints(shard)] == [7]


@pytest.mark.multiproc
def test_forged_and_garbage_records_are_skipped(trio, caplog):
    a, b, c = trio
    shard = next(_shards)
    assert a.announce(_ckpt(a, shard, 1), ttl=30)
    import hivemind

    raw = None
    try:
        # a peer without our validator: it stores whatever it likes locally and offers it to readers
        raw = hivemind.DHT(
            initial_peers=a.visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True, nat_port_map=False
        )
        key = a.key("ckpt", shard)
        # C signs garbage under its own marker (a record of another kind, and a value that is no record at
        # all, which every validator refuses), and a claim that pretends to be A's
        assert c.dht.store(key, StatsRecord(shard, H, "127.0.0.1:1").to_value(), get_dht_time() + 30, subkey=c.marker)
        c.dht.store(key, {"shard": "x"}, get_dht_time() + 31, subkey=c.marker)  # True if only `raw` took it
        fake = Claim(shard, a.peer_id, a.public_key, "", 1.0, expires_at=get_dht_time() + 30)
        assert c.dht.store(a.key("claim", shard), fake.to_value(), get_dht_time() + 30, subkey=c.marker)
        far = get_dht_time() + 3600
        raw.store(key, _ckpt(a, shard, 999).to_value(), far, subkey=a.marker)  # unsigned, A's marker
        raw.store(key, {"junk": 1}, far, subkey="[owner:" + "e" * 64 + "]")  # unsigned, invented owner
        raw.store(key, "plain value replacing the dictionary", far + 10)  # no subkey at all
        with caplog.at_level(logging.WARNING, logger="ddm_node.swarm.dht"):
            for reader in (a, b):
                assert [(r.publisher, r.step) for r in reader.checkpoints(shard)] == [(a.public_key, 1)]
                assert reader.claims(shard) == []
        assert "garbage record" in caplog.text and "is not its owner" in caplog.text
        # what our nodes store under the key: A's record and C's record of another kind (C's newer value, no
        # record at all, was refused by every validator, so C's older record stays)
        assert [s.storage_stats("ckpt", shard)["key_records"] for s in (a, b, c)] == [2, 2, 2]
    finally:
        if raw is not None:
            raw.shutdown()


@pytest.mark.multiproc
def test_put_refuses_records_readers_would_skip(trio):
    a, b, _ = trio
    shard = next(_shards)
    with pytest.raises(DDMError, match="not this node's key"):
        a.announce(_ckpt(b, shard, 1))
    with pytest.raises(DDMError, match="written under shard"):
        a.put("ckpt", shard + 1, _ckpt(a, shard, 1))
    with pytest.raises(DDMError, match="takes a CheckpointRecord"):
        a.put("ckpt", shard, StatsRecord(shard, H, "127.0.0.1:1"))
    long_name = ".".join("m" * 60 for _ in range(3))  # valid multiaddrs of our own peer id, 16 of ~250 characters
    big = PeerRecord(a.peer_id, a.public_key, "", tuple(f"/dns/{long_name}/tcp/1/p2p/{a.peer_id}" for _ in range(16)),
                     "v", 1.0, "s", -1)
    with pytest.raises(DDMError, match="over the 4096-byte"):
        a.announce(big)
    with pytest.raises(DDMError, match="bad checkpoint record"):
        a.announce(dataclasses.replace(_ckpt(a, shard, 1), step=-5))


@pytest.mark.multiproc
def test_concurrent_claims_have_one_winner(trio):
    managers = [ClaimManager(s, ttl=3.0, settle=0.5) for s in trio]
    for _ in range(3):
        shard = next(_shards)
        barrier = threading.Barrier(len(managers))
        results: dict[int, bool] = {}

        def race(i: int, m: ClaimManager) -> None:
            barrier.wait()
            results[i] = m.try_claim(shard)

        threads = [threading.Thread(target=race, args=(i, m)) for i, m in enumerate(managers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert sorted(results.values()) == [False, False, True], results
        won = next(i for i, ok in results.items() if ok)
        for m in managers:  # every peer agrees on the owner
            assert m.owner(shard).public_key == trio[won].public_key
        assert managers[won].held() == [shard]
        managers[won].release(shard)


@pytest.mark.multiproc
def test_expired_claim_is_taken_over(trio):
    a, b, _ = trio
    shard = next(_shards)
    ma, mb = ClaimManager(a, ttl=2.0, settle=0.3), ClaimManager(b, ttl=2.0, settle=0.3)
    assert ma.try_claim(shard)
    assert not mb.try_claim(shard)
    time.sleep(2.3)  # A does not renew; its lease runs out
    assert mb.owner(shard) is None
    assert mb.try_claim(shard)
    assert not ma.renew(shard)  # A's lease expired: it must not come back
    assert ma.owner(shard).public_key == b.public_key
    mb.release(shard)


@pytest.mark.multiproc
def test_release_frees_immediately_and_renew_extends(trio):
    a, b, _ = trio
    shard = next(_shards)
    ma, mb = ClaimManager(a, ttl=3.0, settle=0.3), ClaimManager(b, ttl=3.0, settle=0.3)
    assert ma.try_claim(shard)
    first = ma.owner(shard)
    time.sleep(0.2)
    assert ma.renew(shard)
    renewed = mb.owner(shard)
    assert renewed.public_key == a.public_key and renewed.claimed_at == first.claimed_at
    assert renewed.expires_at > first.expires_at
    assert not mb.try_claim(shard)
    ma.release(shard)
    assert mb.owner(shard) is None
    assert mb.try_claim(shard)  # no waiting for A's old expiration
    assert ma.owner(shard).public_key == b.public_key
    mb.release(shard)


@pytest.mark.multiproc
def test_renew_retreats_when_an_older_claim_appears(trio):
    a, b, _ = trio
    shard = next(_shards)
    ma = ClaimManager(a, ttl=3.0, settle=0.3)
    assert ma.try_claim(shard)
    mine = ma.owner(shard)
    # B claimed earlier on the other side of a partition; now its claim becomes visible
    now = get_dht_time()
    older = Claim(shard, b.peer_id, b.public_key, "", mine.claimed_at - 5.0, expires_at=now + 3.0)
    assert b.put("claim", shard, older, expiration=older.expires_at)
    assert not ma.renew(shard)
    assert ma.held() == []
    assert a.claims(shard) and all(c.released for c in a.claims(shard) if c.public_key == a.public_key)
    assert ma.owner(shard).public_key == b.public_key


@pytest.mark.multiproc
def test_shutdown_stops_dht_and_p2pd_and_is_idempotent():
    swarm = Swarm(Identity.generate(), secrets.token_hex(32))
    try:
        procs = psutil.Process(swarm.dht_pid).children(recursive=True) + [psutil.Process(swarm.dht_pid)]
        assert any("p2pd" in p.name() for p in procs)
    finally:
        swarm.shutdown()
    swarm.shutdown()
    assert swarm.closed
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    with pytest.raises(DDMError, match="shut down"):
        swarm.peers()


@pytest.mark.multiproc
def test_failed_start_is_a_one_line_error():
    before = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    with pytest.raises(DDMError, match="initial peer: 'garbage' is not a peer multiaddr; expected the form /ip4/"):
        Swarm(Identity.generate(), secrets.token_hex(32), initial_peers=["garbage"])
    with pytest.raises(DDMError, match="initial peers"):
        Swarm(Identity.generate(), secrets.token_hex(32), initial_peers="/ip4/127.0.0.1/tcp/1")
    with pytest.raises(DDMError, match="run id"):
        Swarm(Identity.generate(), "not-a-run-id")
    time.sleep(0.2)
    new = [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.pid not in before]
    assert [p for p in new if p.status() != psutil.STATUS_ZOMBIE] == [], "a failed start left processes"


@pytest.mark.multiproc
def test_shutdown_after_the_dht_child_died():
    swarm = Swarm(Identity.generate(), secrets.token_hex(32))
    try:
        tree = [psutil.Process(swarm.dht_pid), *psutil.Process(swarm.dht_pid).children(recursive=True)]
        assert any("p2pd" in p.name() for p in tree)
        tree[0].kill()  # the DHT child dies (left unreaped: multiprocessing reaps it in shutdown)
        deadline = time.time() + 5
        while tree[0].status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
            time.sleep(0.05)
        started = time.time()
    finally:
        swarm.shutdown()
    assert time.time() - started < 2.5  # no grace-period wait for a dead child
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)


@pytest.mark.multiproc
def test_a_dht_child_dying_mid_call_fails_that_call_and_the_next_at_once():
    """A call in flight when the DHT child dies (here: stopped, then killed) ends with a DDMError within a second,
    and the calls queued behind its pipe lock too: `visible_maddrs` once blocked forever and, holding the lock,
    hung the stop of an island whose every process got SIGTERM (CI, 2026-12-03)."""
    swarm = Swarm(Identity.generate(), secrets.token_hex(32))
    child = psutil.Process(swarm.dht_pid)
    outcomes: dict[str, str] = {}

    def call(name, fn):
        try:
            fn()
            outcomes[name] = "answered"
        except DDMError as exc:
            outcomes[name] = str(exc)

    try:
        child.suspend()  # alive, but answers nothing: the calls below wait in flight
        threads = [threading.Thread(target=call, args=item, daemon=True)
                   for item in (("maddrs", swarm.visible_maddrs), ("claims", lambda: swarm.claims(0)))]
        for t in threads:
            t.start()
            time.sleep(0.3)
        child.kill()
        started = time.monotonic()
        for t in threads:
            t.join(timeout=10)
        assert not any(t.is_alive() for t in threads), "a DHT call still waits on a dead child"
        assert time.monotonic() - started < 5
        assert "died" in outcomes["maddrs"] and "claims" in outcomes, outcomes  # a read answers [] at once
    finally:
        swarm.shutdown()


_REAL_DHT = hivemind.DHT


class _DiesBeforeReady(hivemind.DHT):
    """A DHT child that exits before it reports ready, as one killed by a fork-time lock does."""

    def run(self) -> None:
        os._exit(3)


class _HangsBeforeReady(hivemind.DHT):
    """A DHT child that never starts p2pd nor reports, as one deadlocked on a fork-time lock does."""

    def run(self) -> None:
        time.sleep(3600)


def _dht_factory(monkeypatch, dying: int, bad: type = _DiesBeforeReady) -> list[str]:
    """Make Swarm's DHT children fail (`bad`) `dying` times before real ones start; returns the kinds made."""
    made: list[str] = []

    def make(**kwargs):
        made.append("dead" if len(made) < dying else "real")
        return (bad if made[-1] == "dead" else _REAL_DHT)(**kwargs)

    monkeypatch.setattr(dht_process.hivemind, "DHT", make)
    return made


@pytest.mark.multiproc
def test_a_dht_child_that_dies_during_start_is_started_again(monkeypatch):
    made = _dht_factory(monkeypatch, dying=2)
    swarm = Swarm(Identity.generate(), secrets.token_hex(32))
    try:
        assert made == ["dead", "dead", "real"]
        assert type(swarm.dht) is _REAL_DHT and swarm.dht.is_alive() and swarm.peer_id  # the third answers
        assert any("p2pd" in p.name() for p in psutil.Process(swarm.dht_pid).children(recursive=True))
    finally:
        swarm.shutdown()


@pytest.mark.multiproc
def test_a_dht_child_that_always_dies_is_a_one_line_error(monkeypatch):
    before = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    made = _dht_factory(monkeypatch, dying=99)
    with pytest.raises(DDMError, match=r"failed before it was ready, 3 times \(last: died \(exit code 3\)\)"):
        Swarm(Identity.generate(), secrets.token_hex(32))
    assert made == ["dead"] * 3
    new = [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.pid not in before]
    assert [p for p in new if p.status() != psutil.STATUS_ZOMBIE] == [], "a failed start left processes"


@pytest.mark.multiproc
def test_a_dht_child_that_hangs_during_start_is_started_again(monkeypatch):
    monkeypatch.setattr(dht_process, "START_STUCK", 1.0)
    before = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    made = _dht_factory(monkeypatch, dying=1, bad=_HangsBeforeReady)
    swarm = Swarm(Identity.generate(), secrets.token_hex(32))
    try:
        assert made == ["dead", "real"] and type(swarm.dht) is _REAL_DHT and swarm.dht.is_alive()
        new = [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.pid not in before]
        live = {p.pid for p in new if p.status() != psutil.STATUS_ZOMBIE}
        assert live == {p.pid for p in dht_process.descendants(swarm.dht_pid)}  # the hung child is gone
    finally:
        swarm.shutdown()


# ---------------------------------------------------------------------------------------------
# joining as a client (assemble, status)


def test_a_join_with_a_wait_outlasts_a_bootstrap_restart(tmp_path):
    """`assemble --wait` while its only initial peer restarts (as in `docker compose restart`, where one docker test
    run saw the assembler exit non-zero once and be restarted; a join that fails exits 1 at once): without a wait
    the join fails at once with one line; with one it is tried again until the peer is back on the same address
    (its libp2p key file and port)."""
    from ddm_node.exchange.peers import join_swarm

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = tmp_path / "p2p.key"
    boot = Swarm(Identity.generate(), H, port=port, identity_path=key)
    maddr = boot.visible_maddrs()[0]
    boot.shutdown()
    with pytest.raises(DDMError, match="^cannot start the DHT") as err:
        join_swarm([maddr], H)
    assert "\n" not in str(err.value)
    t0 = time.monotonic()
    with pytest.raises(DDMError, match="^run id must be 64"):  # bad input is not retried, whatever the wait
        join_swarm([maddr], "nothex", wait=60)
    assert time.monotonic() - t0 < 5

    back: list[Swarm] = []
    restart = threading.Timer(4.0, lambda: back.append(Swarm(Identity.generate(), H, port=port, identity_path=key)))
    t0 = time.monotonic()
    restart.start()
    try:
        joined = join_swarm([maddr], H, wait=60)
        joined_s = time.monotonic() - t0
        try:
            assert back and back[0].visible_maddrs()[0] == maddr
            assert joined_s >= 4.0, f"joined after {joined_s:.1f}s, before the peer was back"
        finally:
            joined.shutdown()
    finally:
        restart.join()
        for swarm in back:
            swarm.shutdown()
