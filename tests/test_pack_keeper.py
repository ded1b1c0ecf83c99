"""The island's pack keeper (node/packs.py) in one process, over real gRPC and a stand-in for the DHT: the data box
imports partition's packs and announces them; an island without the dataset fetches its shard's pack (a tampered
copy announced first is refused with a one-line reason), serves it on, and trains from it; mirror placement gives
every pack R holders besides its publisher. The three-island run is tests/test_packs_swarm.py (slow)."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import pytest

from ddm_node.core.events import EventKind, EventLog, read_events
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import read_manifest
from ddm_node.core.placement import rendezvous
from ddm_node.core.workdir import WorkDir
from ddm_node.data.pack import read_pack, seal_pack
from ddm_node.data.packing import pack_path, pack_slots, spec
from ddm_node.exchange.announcer import Announcer
from ddm_node.exchange.candidates import FAILED_LISTINGS
from ddm_node.exchange.fetch import RejectList
from ddm_node.node import packs as keeper_mod
from ddm_node.node.packs import PackKeeper, pack_sources
from ddm_node.node.publisher import Publisher
from ddm_node.node.state import NodeState
from ddm_node.swarm.keys import Entry
from ddm_node.swarm.records import RecordKind
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.expert import train_shard
from ddm_node.transfer.server import TransferServer
from ddm_node.transfer.store import ArtifactStore, NodeInfoData
from tests.pack_data import flip, make_packed


class FakeSwarm:
    """What the keeper reads and writes of the DHT: pack records by slot (one per holder) and live peers."""

    def __init__(self) -> None:
        self.records: dict[tuple, dict[str, object]] = {}
        self.live: list[str] = []

    def announce(self, record, ttl: float = 0.0) -> bool:
        self.records.setdefault((type(record).KIND, record.shard), {})[record.holder] = record
        return True

    def read(self, kind, shard=None) -> list[Entry]:
        return [Entry(owner, r, 0.0) for owner, r in self.records.get((kind, shard), {}).items()]

    def peers(self) -> list:
        return [SimpleNamespace(public_key=k) for k in self.live]


class Node:
    """One keeper with its own work dir, store, gRPC server and key."""

    def __init__(self, root, name, plan, swarm, servers, replicas=2, identity=None):
        self.identity, self.work = identity or Identity.generate(), WorkDir(root / name)
        self.work.root.mkdir(parents=True)
        self.store = ArtifactStore()
        server = TransferServer(self.store, NodeInfoData(name, self.identity.public_hex))
        servers.append(server)
        self.events = EventLog(self.work.events, name)
        publisher = Publisher(self.store, Announcer(swarm, 60.0), self.work, self.identity.public_hex, server.start(),
                              plan.cfg.train.steps, None, self.events)
        cfg = dataclasses.replace(plan.cfg.swarm, replicas=replicas)
        self.keeper = PackKeeper(plan, publisher, swarm, self.identity, cfg, NodeState(), RejectList())
        swarm.live.append(self.identity.public_hex)

    def pack_events(self):
        return [e for e in read_events(self.work.events) if e.kind is EventKind.PACK]


@pytest.fixture
def packed(tmp_path, monkeypatch):
    return make_packed(tmp_path, monkeypatch)


@pytest.fixture
def servers():
    out: list[TransferServer] = []
    FAILED_LISTINGS.clear()
    try:
        yield out
    finally:
        for s in out:
            s.stop(0)


def test_an_island_without_the_dataset_fetches_verifies_serves_and_trains_from_its_pack(packed, tmp_path, servers):
    plan, _, root, data = packed
    swarm = FakeSwarm()
    box, island, evil = (Node(tmp_path, n, plan, swarm, servers) for n in ("box", "island", "evil"))
    box.keeper.start(None, pack_sources(root / "plan.json"))  # partition's copies beside the plan
    assert box.keeper.held() == set(pack_slots(plan)) and {e.source for e in box.pack_events()} == {"imported"}
    data.rename(data.with_suffix(".gone"))  # from here on no box has the dataset
    # an evil peer serves shard 1's pack with one chunk altered (and re-signed): announced, the only holder
    honest = swarm.records[(RecordKind.PACK, 1)].pop(box.identity.public_hex)
    stolen = pack_path(evil.work.root, plan.packs.shards[1])
    shutil.copytree(pack_path(box.work.root, plan.packs.shards[1]), stolen)
    (stolen / "manifest.json").unlink()
    flip(stolen / "rows_00000.safetensors", -3)
    seal_pack(stolen, plan.run_id, 1, plan.packs.shards[1], evil.identity)
    evil.keeper.publisher.pack(stolen, 1, plan.packs.shards[1].sha256)
    island.keeper.start(None)
    assert island.keeper.held() == set()
    assert not island.keeper.ensure([1])  # only the tampered copy: refused, nothing kept, nothing to train on
    missing = island.pack_events()[-1]
    assert missing.source == "missing" and "does not match its sha256" in missing.reason and "\n" not in missing.reason
    assert not pack_path(island.work.root, plan.packs.shards[1]).exists()
    swarm.announce(honest)
    assert island.keeper.ensure([1])
    got = island.pack_events()[-1]
    assert got.source == "fetched" and got.publisher == box.identity.public_hex[:12]
    # it serves the pack on, under its own record (the publisher's signature kept)
    mine = swarm.records[(RecordKind.PACK, 1)][island.identity.public_hex]
    assert mine.publisher == box.identity.public_hex and island.store.manifest(mine.manifest) is not None
    assert train_shard(plan, 1, island.work.root, identity=island.identity) is not None
    assert ckpt.latest_checkpoint(island.work.root, 1) is not None


def test_a_work_dir_that_is_the_plan_directory_keeps_partitions_packs(packed, tmp_path, servers):
    plan, _, root, _ = packed
    swarm = FakeSwarm()
    box = Node(tmp_path, "box", plan, swarm, servers)
    box.keeper.publisher.work = box.keeper.work = WorkDir(root)  # started with --plan DIR --work-dir DIR
    box.keeper.start(None, pack_sources(root))
    assert box.keeper.held() == set(pack_slots(plan))
    for slot in pack_slots(plan):  # sealed where they are, nothing removed
        read_pack(pack_path(root, spec(plan, slot).ref), spec(plan, slot), keep=False)


def test_an_island_with_the_dataset_rebuilds_its_shards_pack_and_checks_it_against_the_plan(packed, tmp_path,
                                                                                           servers, monkeypatch):
    plan, ds, _, _ = packed
    swarm = FakeSwarm()
    island = Node(tmp_path, "island", plan, swarm, servers)
    island.keeper.start(ds)  # no packs beside a plan here: nothing is served until a shard needs one
    assert island.keeper.held() == set() and not swarm.records
    assert island.keeper.ensure([2])
    assert [(e.shard, e.source) for e in island.pack_events()] == [(2, "built")]
    mine = swarm.records[(RecordKind.PACK, 2)][island.identity.public_hex]
    assert mine.publisher == island.identity.public_hex and mine.pack == plan.packs.shards[2].sha256
    assert read_manifest(pack_path(island.work.root, plan.packs.shards[2])).config_hash == mine.pack
    # rows that do not make the plan's pack (here: another shard's) are not served or trained on
    real = keeper_mod.build_pack
    monkeypatch.setattr(keeper_mod, "build_pack", lambda plan, ds, slot, dest: real(plan, ds, (slot + 1) % 3, dest))
    assert not island.keeper.ensure([0])
    assert not pack_path(island.work.root, plan.packs.shards[0]).exists() and 0 not in island.keeper.held()


def test_pack_mirrors_are_the_first_r_peers_that_did_not_publish(packed, tmp_path, servers):
    plan, _, root, _ = packed
    swarm = FakeSwarm()
    nodes = [Node(tmp_path, f"n{i}", plan, swarm, servers, replicas=1) for i in range(3)]
    keys = [n.identity.public_hex for n in nodes]
    while True:  # a data box that would rank first for some pack if publishers were not left out
        key = Identity.generate()
        if any(rendezvous(f"pack/{s}", sorted([*keys, key.public_hex]))[0] == key.public_hex for s in pack_slots(plan)):
            break
    box = Node(tmp_path, "box", plan, swarm, servers, replicas=1, identity=key)
    box.keeper.start(None, pack_sources(root))
    assert box.keeper.targets() == []  # it holds every pack
    chosen = {slot: [n for n in nodes if slot in n.keeper.targets()] for slot in pack_slots(plan)}
    assert all(len(c) == 1 for c in chosen.values()), chosen  # R = 1: exactly one mirror per pack, never the box
    for slot, (n,) in chosen.items():
        assert n.keeper.ensure([slot]) and slot not in n.keeper.targets()
    assert {s for n in nodes for s in n.keeper.held()} == set(pack_slots(plan))
    # once held, the mirror's own record does not move the placement: the same peers stay chosen
    assert {slot: [n for n in nodes if slot in n.keeper.targets() or slot in n.keeper.held()]
            for slot in pack_slots(plan)} == chosen
