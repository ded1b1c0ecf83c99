"""Hostile DHT peers with free identities (no trusted key), on the real protocol over 127.0.0.1.

Each test builds its own small world: honest `Swarm` nodes (each a hivemind DHT child with its p2pd)
and a `DHTAttacker` (a raw hivemind DHT that writes validly signed records of fresh identities straight
into the honest nodes' storage through their `rpc_store`). What each test shows:

- one signed value that is not msgpack (or no record at all) is refused by every validator: the key's
  claim and checkpoint stay readable, the holder renews, a new claim on a poisoned key succeeds
  (before: every get of the key hung 30 s and returned nothing, and the holder's renewal raised);
- 1,100 identities each storing one valid 4 KiB record under a key cannot push it past p2pd's 4 MiB
  message limit: each node keeps at most 256 records per key, a reader that does not hold the key
  still reads the honest records, the holder renews (before: such readers saw nothing);
- a node's storage is bounded (16,384 records) whatever one identity stores under arbitrary keys,
  and records already stored stay readable and renewable;
- a reader that meets an undecodable value anyway (here put straight into its own storage) skips it
  and reads the rest (before: the whole key was lost);
- one peer storing its own record into every node's cache cannot replace, as those nodes answer
  lookups, the key's records with it (before: readers that hold no copy saw only that record);
- one peer answering lookups first, with an answer that claims to expire never, cannot end them with
  only its own records (before: readers that hold no copy of the key saw only that peer's answer about
  half the time);
- a renewal takes its expiration after its read and never raises (before: a read slower than the
  lease raised "DHT expiration must be in the future" out of renew);
- the run's trusted keys are admitted to a full key (`Swarm.protect`); an untrusted newcomer is not.
"""

from __future__ import annotations

import secrets
import time
from contextlib import ExitStack, contextmanager

import pytest

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)

# isort: split
from hivemind.utils import MSGPackSerializer

from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.swarm.claims import ClaimManager
from ddm_node.swarm.dht import Swarm, dht_time
from ddm_node.swarm.records import CheckpointRecord

from .dht_attacker import DHTAttacker, count_records, inject, signed_record

pytestmark = pytest.mark.multiproc

PER_KEY = 256  # records a node keeps per key (ddm_node/swarm/storage.py MAX_SUBKEYS)
PER_NODE = 16384  # records a node keeps in all (ddm_node/swarm/storage.py MAX_ENTRIES)
FAST = 20.0  # seconds a read, a renewal or a claim may take here (the DHT's own timeout is 30 s)
H1, H2 = "ab" * 32, "cd" * 32


@contextmanager
def world(storage_nodes: int = 2, attacker: bool = True):
    """`storage_nodes` honest full nodes of one fresh run, and an attacker that knows all of them."""
    run_id = secrets.token_hex(32)
    with ExitStack() as stack:
        nodes = [stack.enter_context(Swarm(Identity.generate(), run_id))]
        for _ in range(storage_nodes - 1):
            peers = nodes[0].visible_maddrs()
            nodes.append(stack.enter_context(Swarm(Identity.generate(), run_id, initial_peers=peers)))
        atk = None
        if attacker:
            atk = DHTAttacker(nodes[0].visible_maddrs())
            stack.callback(atk.close)
            deadline = time.monotonic() + 20
            while atk.known_peers() < storage_nodes and time.monotonic() < deadline:
                time.sleep(0.2)
            assert atk.known_peers() == storage_nodes
        yield nodes, atk, stack


def _reader(nodes: list[Swarm], stack: ExitStack) -> Swarm:
    """A fresh client-mode node (how `status` and `assemble` read): it holds no copy of any key."""
    return stack.enter_context(Swarm(Identity.generate(), nodes[0].run_id, initial_peers=nodes[0].visible_maddrs(),
                                     client_mode=True))


def _ckpt(swarm: Swarm, shard: int, step: int) -> CheckpointRecord:
    return CheckpointRecord(shard, step, H1, H2, swarm.public_key, "127.0.0.1:50051", False)


def _timed(fn, *args):
    t = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t


def test_a_signed_value_that_is_not_msgpack_cannot_blind_a_key():
    with world() as (nodes, atk, _):
        h, s = nodes
        holder = ClaimManager(h, ttl=20.0, settle=0.3)
        assert holder.try_claim(0)
        assert h.announce(_ckpt(h, 0, 10), ttl=120)
        exp = dht_time() + 600
        taken = {}
        for key in (h.key("claim", 0), h.key("ckpt", 0), h.key("claim", 1)):
            bad = [signed_record(Identity.generate(), key, b"\xc1 not msgpack", exp),  # not msgpack at all
                   signed_record(Identity.generate(), key, b"\x81\xa1x\x01", exp)]  # msgpack {"x": 1}: no record
            taken[key] = atk.push(key, bad, exp)

        for reader in (s, h):
            claims, took = _timed(reader.claims, 0)
            assert [c.public_key for c in claims] == [h.public_key] and took < FAST, (claims, took)
            ckpts, took = _timed(reader.checkpoints, 0)
            assert [(c.publisher, c.step) for c in ckpts] == [(h.public_key, 10)] and took < FAST, (ckpts, took)
        renewed, took = _timed(holder.renew, 0)
        assert renewed and took < FAST
        claimed, took = _timed(ClaimManager(s, ttl=20.0, settle=0.3).try_claim, 1)  # a new claim on a poisoned key
        assert claimed and took < FAST
        assert [c.public_key for c in h.claims(1)] == [s.public_key]
        # every honest validator refused both values
        assert all(n == 0 for per_peer in taken.values() for n in per_peer.values()), taken


def test_a_flood_of_free_identities_cannot_blind_a_key():
    with world() as (nodes, atk, stack):
        h, s = nodes
        holder = ClaimManager(h, ttl=30.0, settle=0.3)
        assert holder.try_claim(0)
        assert h.announce(_ckpt(h, 0, 10), ttl=120)
        exp = dht_time() + 600
        # 1,100 identities x one valid ~4 KiB record (a PeerRecord: every validator admits it) per key:
        # 4.6 MB under one key, past p2pd's 4 MiB message limit if all were kept
        took_claims = atk.flood(h.key("claim", 0), 1100, exp, seed=b"claim")
        took_ckpts = atk.flood(h.key("ckpt", 0), 1100, exp, seed=b"ckpt")

        reader = _reader(nodes, stack)  # holds no copy: it must read the key from the flooded nodes
        for r in (reader, s, h):
            claims, took = _timed(r.claims, 0)
            assert [c.public_key for c in claims] == [h.public_key] and took < FAST, (len(claims), took)
            ckpts, took = _timed(r.checkpoints, 0)
            assert [(c.publisher, c.step) for c in ckpts] == [(h.public_key, 10)] and took < FAST, (len(ckpts), took)
        before = reader.claims(0)[0].expires_at
        renewed, took = _timed(holder.renew, 0)
        assert renewed and took < FAST
        assert reader.claims(0)[0].expires_at > before  # the renewal reached the flooded key
        for node in (h, s):
            for key in (h.key("claim", 0), h.key("ckpt", 0)):
                held = count_records(node.dht, key)["key"]
                assert held <= PER_KEY, (key, held)
        assert all(n < PER_KEY for n in [*took_claims.values(), *took_ckpts.values()]), (took_claims, took_ckpts)


def test_node_storage_is_bounded_whatever_one_identity_stores():
    with world() as (nodes, atk, stack):
        h, s = nodes
        holder = ClaimManager(h, ttl=300.0, settle=0.3)  # the flood takes a while on a loaded machine
        assert holder.try_claim(0)
        assert h.announce(_ckpt(h, 0, 10), ttl=300)
        # one identity, one small valid record under each of 17,000 arbitrary keys (hashed: no node can
        # tell them from the run's), sent to H (to one node only: 17,000 signatures cost seconds per node)
        count = PER_NODE + 616
        took = atk.flood("junk", count, dht_time() + 600, seed=b"junk", size=200, spread=count, identities=1,
                         only=h.peer_id)
        held = count_records(h.dht)
        assert held["storage"] <= PER_NODE and held["cache"] == 0, held
        assert list(took) == [h.peer_id] and PER_NODE - 10 <= took[h.peer_id] < count, took
        # what was stored before the flood is still there, readable and renewable
        reader = _reader(nodes, stack)
        assert [c.public_key for c in reader.claims(0)] == [h.public_key]
        assert [c.step for c in reader.checkpoints(0)] == [10]
        assert holder.renew(0)
        assert h.announce(_ckpt(h, 0, 20), ttl=300)  # a newer record of ours replaces the old one
        assert [c.step for c in reader.checkpoints(0)] == [20]


def test_a_reader_skips_an_undecodable_value_and_reads_the_rest():
    with world(attacker=False) as (nodes, _, _stack):
        h, s = nodes
        assert h.announce(_ckpt(h, 0, 10), ttl=120)
        assert s.announce(_ckpt(s, 0, 12), ttl=120)
        # a value no validator admits, sitting in the reader's own storage (as a node that ran an older,
        # laxer validator would still hold it): hivemind decodes every value of the key it returns
        exp = dht_time() + 600
        key = h.key("ckpt", 0)
        subkey, value = signed_record(Identity.generate(), key, b"\xc1 not msgpack", exp)
        assert inject(s.dht, key, subkey, value, exp)
        got, took = _timed(s.checkpoints, 0)
        assert sorted((c.publisher, c.step) for c in got) == sorted([(h.public_key, 10), (s.public_key, 12)])
        assert took < FAST, took


def test_one_peer_cannot_mask_a_key_through_the_nodes_caches():
    with world() as (nodes, atk, stack):
        h, s = nodes
        assert h.announce(_ckpt(h, 0, 10), ttl=120)
        evil = Identity.generate()
        key, exp = h.key("ckpt", 0), dht_time() + 600
        lie = CheckpointRecord(0, 99, H1, H2, evil.public_hex, "127.0.0.1:1", True)
        # one valid record of its own, stored into every node's CACHE with a later expiration than the
        # honest records: hivemind nodes answered lookups from such a cache entry instead of their storage
        cached = atk.push(key, [signed_record(evil, key, MSGPackSerializer.dumps(lie.to_value()), exp)], exp,
                          in_cache=True)
        seen = [sorted(c.step for c in _reader(nodes, stack).checkpoints(0)) for _ in range(2)]  # fresh readers
        assert seen == [[10]] * 2, seen
        assert all(n == 0 for n in cached.values()), cached
        assert all(count_records(node.dht)["cache"] == 0 for node in (h, s))


def test_one_peer_cannot_end_a_lookup_with_its_own_answer():
    with world(attacker=False) as (nodes, _, stack):
        h, s = nodes
        assert h.announce(_ckpt(h, 0, 10), ttl=300)
        atk = DHTAttacker(h.visible_maddrs(), serve=True)  # a full node: lookups ask it too
        stack.callback(atk.close)
        evil = Identity.generate()
        key, exp = h.key("ckpt", 0), dht_time() + 600
        lie = CheckpointRecord(0, 99, H1, H2, evil.public_hex, "127.0.0.1:1", True)
        # its own valid record, in an answer whose dictionary claims to expire never: hivemind ended a
        # `latest` lookup at the first such answer, so whoever answered first decided what readers saw
        assert atk.answer(key, [signed_record(evil, key, MSGPackSerializer.dumps(lie.to_value()), exp)], exp,
                          outer=float("inf"))
        seen = [sorted(c.step for c in _reader(nodes, stack).checkpoints(0)) for _ in range(6)]  # fresh readers
        assert seen == [[10, 99]] * 6, seen


def test_renew_takes_its_expiration_after_a_slow_read_and_never_raises(monkeypatch):
    with world(attacker=False) as (nodes, _, _stack):
        h, s = nodes
        ttl = 4.0
        holder = ClaimManager(h, ttl=ttl, settle=0.2)
        assert holder.try_claim(0)
        real, delays = h.claims, []

        def slow(shard: int):  # reads that take long (a poisoned key used to take the DHT's whole 30 s)
            time.sleep(delays.pop(0) if delays else 0.0)
            return real(shard)

        monkeypatch.setattr(h, "claims", slow)
        delays[:] = [2.0]
        assert holder.renew(0)
        done = dht_time()
        # the new lease runs ttl from after the read, not from before it
        assert s.claims(0)[0].expires_at >= done + ttl - 0.5
        # a read longer than the whole lease: the lease is lost (it ran out meanwhile), and renew does not raise
        delays[:] = [ttl + 1.0]
        try:
            assert holder.renew(0) is False
        except DDMError as exc:
            pytest.fail(f"renew raised: {exc}")
        # a claim whose first read outlasts its ttl still writes a lease that runs ttl from then
        delays[:] = [ttl + 0.5]
        try:
            assert ClaimManager(h, ttl=ttl, settle=0.2).try_claim(1)
        except DDMError as exc:
            pytest.fail(f"try_claim raised: {exc}")


def test_trusted_keys_are_admitted_to_a_flooded_key():
    with world() as (nodes, atk, stack):
        h, s = nodes
        run_id = h.run_id
        trusted = stack.enter_context(Swarm(Identity.generate(), run_id, initial_peers=h.visible_maddrs(),
                                            client_mode=True))
        untrusted = stack.enter_context(Swarm(Identity.generate(), run_id, initial_peers=h.visible_maddrs(),
                                              client_mode=True))
        for node in (h, s):  # as every island of a run with swarm.trusted_keys does (ClaimManager)
            ClaimManager(node, trusted_keys=[trusted.public_key, node.public_key])
        key = h.key("claim", 0)
        atk.flood(key, 600, dht_time() + 600, seed=b"full")
        assert [count_records(node.dht, key)["key"] for node in (h, s)] == [PER_KEY, PER_KEY]
        # the key is full on the honest nodes that store it: a newcomer's claim is refused there (a documented
        # limit; it lands only on nodes that are not full, here the newcomer itself and the attacker's node)...
        ClaimManager(untrusted, ttl=30.0, settle=0.3).try_claim(0)
        assert [count_records(node.dht, key)["key"] for node in (h, s)] == [PER_KEY, PER_KEY]
        # ... while a listed key's claim is admitted past the cap
        assert ClaimManager(trusted, ttl=30.0, settle=0.3, trusted_keys=[trusted.public_key]).try_claim(0)
        assert [count_records(node.dht, key)["key"] for node in (h, s)] == [PER_KEY + 1, PER_KEY + 1]
        reader = _reader(nodes, stack)
        assert trusted.public_key in [c.public_key for c in reader.claims(0)]
