"""`ddm-node assemble` and `ddm-node status` against a small fake network built in this process.

The network (module fixture `world`): three peers A, B, C, each with its own identity, a real hivemind
DHT (`Swarm`) and a real gRPC `TransferServer` on 127.0.0.1 serving real artifacts made by the trainer
and the checkpoint writer. A trains shard 0 and a learned router, B trains shard 1, C mirrors shard 0
(a replica record; its stats copy is served but not announced) and also lies: it announces shard 0's
expert as a step-99 checkpoint of shard 1. No daemon is involved. Tests run in any order (the suite
shuffles them): a test that needs a dead publisher takes its servers down with `world.down(...)`, which
serves them again on the same addresses when the test ends, so every test starts from the whole network.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.cli import main
from ddm_node.core.config import load_config
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import copy_artifact, read_manifest
from ddm_node.exchange.candidates import expert_candidates
from ddm_node.swarm.records import (
    CheckpointRecord,
    Claim,
    PeerRecord,
    PlanRecord,
    ReplicaRecord,
    RouterRecord,
    StatsRecord,
)

H = "ab" * 32
H2 = "cd" * 32
TTL = 900.0  # announcements outlive the module


def test_candidates_group_by_manifest_and_step_newest_first():
    ckpts = [CheckpointRecord(0, 10, H, H2, "1" * 64, "a:1", False), CheckpointRecord(0, 20, H2, H, "2" * 64, "b:1", True)]
    reps = [ReplicaRecord(0, 10, H, H2, "1" * 64, "3" * 64, "c:1"), ReplicaRecord(0, 10, H, H2, "1" * 64, "4" * 64, "a:1")]
    cands = expert_candidates(ckpts, reps)
    assert [(c.manifest, c.step) for c in cands] == [(H2, 20), (H, 10)]
    assert cands[1].holders == ["a:1", "c:1"]  # publisher first, duplicates dropped
    # A wrong step forms its own group (tried, found false, skipped) but shares the manifest's holders.
    lie = CheckpointRecord(0, 99, H, H2, "5" * 64, "d:1", True)
    cands = expert_candidates(ckpts + [lie], reps)
    assert [(c.manifest, c.step) for c in cands] == [(H, 99), (H2, 20), (H, 10)]
    assert cands[0].holders == cands[2].holders == ["a:1", "d:1", "c:1"]


class _FakeSwarm:
    """The read side of a Swarm, from lists (status rules without a DHT)."""

    def __init__(self, claims=(), ckpts=(), reps=()):
        self._claims, self._ckpts, self._reps = list(claims), list(ckpts), list(reps)

    def claims(self, shard):
        return self._claims

    def checkpoints(self, shard):
        return self._ckpts

    def replicas(self, shard):
        return self._reps


def test_status_shard_states():
    from ddm_node.clients.status import shard_status

    now = 1.8e9
    peer = "12D3KooWHPmjMnsMBwLTJvWNnh7qgUvkjVeHuGniGo9tQ1ygBwoM"
    k1, k2 = "1" * 64, "2" * 64
    live = Claim(0, peer, k1, "", now - 50, expires_at=now + 10)
    dead = Claim(0, peer, k2, "", now - 90, expires_at=now - 1)
    ck = [CheckpointRecord(0, 30, H, H2, k1, "a:1", False), CheckpointRecord(0, 60, H2, H, k2, "b:1", False)]
    hb = {k1: PeerRecord(peer, k1, "a:1", (), "v", now - 4.0, "training", 0)}

    def row(**kw):
        return shard_status(_FakeSwarm(**kw), 0, 100, hb, now)

    assert row().state == "pending" and row().step is None and row().newest_step is None
    assert row(claims=[dead]).state == "orphaned"
    r = row(claims=[dead], ckpts=ck)
    assert (r.state, r.owner, r.step, r.newest_step, r.heartbeat_age) == ("orphaned", None, 60, 60, None)
    r = row(claims=[live, dead], ckpts=ck, reps=[ReplicaRecord(0, 70, H, H2, k1, k2, "c:1")])
    assert (r.state, r.owner.public_key, r.step, r.newest_step, r.replicas) == ("training", k1, 30, 70, 1)
    assert r.heartbeat_age == pytest.approx(4.0)
    done = CheckpointRecord(0, 100, H, H2, k2, "b:1", True)
    assert row(claims=[live], ckpts=[ck[0], done]).state == "done"
    # "final" below the budget does not count (the daemon's rule too)
    assert row(ckpts=[CheckpointRecord(0, 99, H, H2, k2, "b:1", True)]).state == "orphaned"


# ------------------------------------------------------------------------------------------ the network


@dataclass
class Node:
    name: str
    identity: Identity
    work: Path
    store: object = None
    server: object = None
    swarm: object = None
    address: str = ""


@dataclass
class World:
    plan: object
    nodes: dict[str, Node]
    expert: dict[int, str] = field(default_factory=dict)  # shard -> expert manifest id
    expert_file: dict[int, Path] = field(default_factory=dict)  # shard -> publisher's model.safetensors
    router: str = ""

    @property
    def run_id(self) -> str:
        return self.plan.run_id

    @property
    def maddrs(self) -> list[str]:
        return self.nodes["C"].swarm.visible_maddrs()  # C never stops serving

    @contextmanager
    def down(self, *names: str):
        """These nodes' gRPC servers are gone for the block (their DHT records stay, like a dead node's), then
        serve again on the same addresses."""
        for name in names:
            self.nodes[name].server.stop(0)
        try:
            yield
        finally:
            for name in names:
                node = self.nodes[name]
                assert node.server.start() == node.address, f"{name} could not serve again on {node.address}"


def _tiny_config():
    return load_config(overrides={
        "model.hidden": 32, "model.depth": 2, "model.heads": 2,
        "train.steps": 4, "train.batch_size": 16, "train.checkpoint_every": 2, "train.warmup_steps": 1,
        "router.steps": 2, "router.batch_size": 16, "partition.experts": 2,
    })


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.swarm.claims import ClaimManager
    from ddm_node.swarm.dht import Swarm, dht_time
    from ddm_node.train import checkpoint as ckpt
    from ddm_node.train.expert import train_shard
    from ddm_node.train.router_job import train_plan_router
    from ddm_node.transfer.server import TransferServer
    from ddm_node.transfer.store import ArtifactStore, NodeInfoData

    root = tmp_path_factory.mktemp("net")
    ds = load_dataset("digits")
    plan = make_plan(_tiny_config(), ds)
    nodes = {n: Node(n, Identity.generate(), root / n) for n in "ABC"}
    A, B, C = nodes["A"], nodes["B"], nodes["C"]
    w = World(plan, nodes)
    step0 = train_shard(plan, 0, A.work, identity=A.identity, dataset=ds)
    step1 = train_shard(plan, 1, B.work, identity=B.identity, dataset=ds)
    router = train_plan_router(plan, A.work / "router", identity=A.identity, dataset=ds)
    assert step0.name == step1.name == "step_00000004"
    mirror = ckpt.checkpoint_dir(C.work, 0, 4)
    for part in (ckpt.EXPERT, ckpt.STATE):
        copy_artifact(step0 / part, mirror / part)
    copy_artifact(ckpt.stats_dir(A.work, 0), ckpt.stats_dir(C.work, 0))
    w.expert = {0: read_manifest(step0 / ckpt.EXPERT).id, 1: read_manifest(step1 / ckpt.EXPERT).id}
    w.expert_file = {0: step0 / ckpt.EXPERT / ckpt.MODEL_FILE, 1: step1 / ckpt.EXPERT / ckpt.MODEL_FILE}
    try:
        for node in nodes.values():
            node.store = ArtifactStore()
            node.store.register_plan(plan.to_bytes())
            node.server = TransferServer(node.store, NodeInfoData(node.name, node.identity.public_hex))
            node.address = node.server.start()
            peers = [] if node is A else A.swarm.visible_maddrs()
            node.swarm = Swarm(node.identity, plan.run_id, initial_peers=peers)
            node.swarm.announce(PlanRecord(plan.run_id, node.address), ttl=TTL)
            node.swarm.announce(PeerRecord(node.swarm.peer_id, node.identity.public_hex, node.address,
                                            tuple(node.swarm.visible_maddrs()[:2]), "test", dht_time(), "idle", -1),
                                 ttl=TTL)
        for node, shard, step_dir in ((A, 0, step0), (B, 1, step1)):
            e = node.store.register(step_dir / ckpt.EXPERT)
            s = node.store.register(step_dir / ckpt.STATE)
            st = node.store.register(ckpt.stats_dir(node.work, shard))
            node.swarm.announce(CheckpointRecord(shard, 4, e.id, s.id, node.identity.public_hex,
                                                            node.address, True), ttl=TTL)
            node.swarm.announce(StatsRecord(shard, st.id, node.address), ttl=TTL)
        r = A.store.register(router)
        w.router = r.id
        A.swarm.announce(RouterRecord(r.id, r.step, A.address, A.identity.public_hex), ttl=TTL)
        e = C.store.register(mirror / ckpt.EXPERT)
        s = C.store.register(mirror / ckpt.STATE)
        C.store.register(ckpt.stats_dir(C.work, 0))  # served, listed, not announced
        C.swarm.announce(ReplicaRecord(0, 4, e.id, s.id, A.identity.public_hex, C.identity.public_hex,
                                               C.address), ttl=TTL)
        # The lie: shard 0's expert announced as the newest (final) checkpoint of shard 1.
        C.swarm.announce(CheckpointRecord(1, 99, e.id, s.id, C.identity.public_hex, C.address, True),
                                    ttl=TTL)
        assert ClaimManager(B.swarm, ttl=TTL, settle=0.3).try_claim(1)
        yield w
    finally:
        for node in nodes.values():
            if node.server is not None:
                node.server.stop(0)
            if node.swarm is not None:
                node.swarm.shutdown()


def _assemble(world: World, out: Path, *extra: str) -> int:
    return main(["assemble", "--initial-peers", *world.maddrs, "--run", world.run_id, "--out", str(out), *extra])


def _index(out: Path) -> dict:
    return json.loads((out / "model_index.json").read_text())


def _no_leftovers(parent: Path, keep: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == keep, "staging area or half bundle left behind"


def _flip(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.multiproc
def test_status_reports_shards_owner_and_router(world, capsys):
    assert main(["status", "--initial-peers", *world.maddrs, "--run", world.run_id, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["run_id"] == world.run_id and status["target"] == 4
    s0, s1 = status["shards"]
    assert (s0["shard"], s0["state"], s0["step"], s0["newest_step"]) == (0, "done", 4, 4)
    assert (s0["checkpoints"], s0["replicas"], s0["owner"]) == (1, 1, None)
    # Shard 1: B holds a live claim; its own step counts, the liar's 99 shows only as the newest record.
    B = world.nodes["B"]
    assert (s1["state"], s1["step"], s1["newest_step"], s1["replicas"]) == ("done", 4, 99, 0)
    assert (s1["checkpoints"], s1["distinct_checkpoints"]) == (2, 2)
    assert s1["owner"] == {"peer_id": B.swarm.peer_id, "public_key": B.identity.public_hex}
    assert 0 <= s1["heartbeat_age"] < 120
    assert status["router"]["state"] == "done" and status["router"]["step"] == 2
    assert len(status["peers"]) == 3 and all(p["state"] == "idle" for p in status["peers"])
    assert main(["status", "--initial-peers", *world.maddrs, "--run", world.run_id]) == 0
    table = capsys.readouterr().out
    assert "router" in table and "done" in table and "99" in table and B.swarm.peer_id[-8:] in table


@pytest.mark.multiproc
def test_status_unknown_run_is_one_line_error(world, capsys):
    rc = main(["status", "--initial-peers", *world.maddrs, "--run", "ef" * 32, "--timeout", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "ef" * 32 in err and "no peer announces the plan" in err and len(err.splitlines()) == 1


@pytest.mark.multiproc
def test_assemble_verifies_skips_lie_and_verify_catches_a_flipped_byte(world, tmp_path, capsys, caplog):
    caplog.set_level(logging.WARNING, logger="ddm_node.clients.assemble")
    key = tmp_path / "key.pem"
    Identity.generate().save(key)
    out = tmp_path / "bundle"
    t0 = time.monotonic()
    # Everything is final and the router is there: the first pass completes, --wait is not spent.
    assert _assemble(world, out, "--min-experts", "2", "--identity", str(key), "--wait", "120") == 0
    assert time.monotonic() - t0 < 60
    index = _index(out)
    assert [e["shard"] for e in index["experts"]] == [0, 1] and index["missing"] == []
    # Shard 1 is B's real expert, not the lie (shard 0's expert announced as shard 1 step 99).
    assert {e["shard"]: e["manifest_id"] for e in index["experts"]} == world.expert
    assert all(e["step"] == 4 for e in index["experts"])
    assert index["router"]["kind"] == "learned" and index["router"]["manifest_id"] == world.router
    assert any("announced manifest" in r.message and "shard is 0, expected 1" in r.message for r in caplog.records)
    _no_leftovers(tmp_path, {"key.pem", "bundle"})
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    _flip(out / "expert_1" / "model.safetensors")
    assert main(["verify", str(out)]) != 0
    assert "expert_1/model.safetensors" in capsys.readouterr().err


@pytest.mark.multiproc
def test_assemble_fetches_bf16_experts_packed_on_the_wire(world, tmp_path, monkeypatch):
    """Experts travel zstd-packed (after a byte shuffle) and stay bf16 on disk; stats and the router go raw."""
    import torch
    from safetensors.torch import load_file

    from ddm_node.exchange import fetch as exchange_fetch
    from ddm_node.train import checkpoint as ckpt

    asked: dict[str, bool] = {}
    real = exchange_fetch.fetch_artifact

    def spy(holders, manifest_id, dest, **kw):
        asked[manifest_id] = kw.get("compress", False)
        return real(holders, manifest_id, dest, **kw)

    monkeypatch.setattr(exchange_fetch, "fetch_artifact", spy)
    out = tmp_path / "bundle"
    assert _assemble(world, out, "--min-experts", "2") == 0
    assert {asked[m] for m in world.expert.values()} == {True} and asked[world.router] is False
    assert sum(asked.values()) == len(world.expert)  # stats: raw too
    for e in _index(out)["experts"]:
        weights = load_file(str(out / f"expert_{e['shard']}" / ckpt.MODEL_FILE))
        assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert main(["verify", str(out)]) == 0


@pytest.mark.multiproc
def test_assemble_drops_a_tampered_copy(world, tmp_path, caplog):
    """A (tried first: publisher) serves shard 0's weights with one flipped byte; C's copy is good."""
    caplog.set_level(logging.WARNING, logger="ddm_node.transfer.client")
    _flip(world.expert_file[0])
    try:
        out = tmp_path / "bundle"
        assert _assemble(world, out, "--min-experts", "2") == 0
    finally:
        _flip(world.expert_file[0])
    assert any("sha256 mismatch" in r.message and world.nodes["A"].address in r.message for r in caplog.records)
    assert {e["shard"]: e["manifest_id"] for e in _index(out)["experts"]} == world.expert
    assert main(["verify", str(out)]) == 0
    _no_leftovers(tmp_path, {"bundle"})


@pytest.mark.multiproc
def test_assemble_survives_a_dead_publisher(world, tmp_path):
    """A's gRPC server is gone: shard 0 and its (unannounced) stats come from C's mirror; no learned router."""
    out = tmp_path / "bundle"
    t0 = time.monotonic()
    # The plan wants a router and none verifies: passes repeat until --wait runs out, then centroid.
    with world.down("A"):
        assert _assemble(world, out, "--min-experts", "2", "--wait", "3") == 0
    assert time.monotonic() - t0 >= 3
    index = _index(out)
    assert {e["shard"]: e["manifest_id"] for e in index["experts"]} == world.expert
    assert index["router"]["kind"] == "centroid"
    assert main(["verify", str(out)]) == 0


@pytest.mark.multiproc
def test_assemble_missing_shard_and_min_experts(world, tmp_path, capsys):
    """A and B are gone: shard 1 has no live holder (only the liar); shard 0 comes from C."""
    out = tmp_path / "bundle"
    with world.down("A", "B"):
        assert _assemble(world, out, "--min-experts", "2") == 2
        err = capsys.readouterr().err
        assert "only 1 of 2 experts" in err and "shard 1: missing" in err
        assert not out.exists()
        _no_leftovers(tmp_path, set())
        assert _assemble(world, out, "--min-experts", "1") == 0
    index = _index(out)
    assert index["missing"] == [1] and [e["shard"] for e in index["experts"]] == [0]
    assert main(["verify", str(out)]) == 0


def test_assemble_refuses_to_replace_a_non_bundle(tmp_path, capsys):
    target = tmp_path / "home"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    rc = main(["assemble", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--run", H, "--out", str(target)])
    assert rc == 2 and "not a bundle" in capsys.readouterr().err
    assert (target / "precious.txt").read_text() == "keep me"
