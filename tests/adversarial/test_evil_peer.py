"""An honest publisher, two lying peers and a garbage DHT peer on 127.0.0.1; assembly and an island get
through all of it, each lie rejected with a logged reason, the honest copy used.

The network (module fixture `world`), all real: hivemind DHTs, gRPC servers, artifacts made by the
real trainer and checkpoint writer, and a run with an EMPTY trusted_keys list (any valid signature
counts, so the defences below are the only ones in play; tests/adversarial/test_trusted_keys.py covers
the other mode).

- H (honest) trained shards 0 and 1 to step 4 of a 6-step budget (checkpoints at 2 and 4), serves
  them, their stats and the plan, and holds a claim on shard 7.
- E1 (own valid key, keys sort before H's so its records are read first) lies:
  plan: answers GetPlan with bytes that are not the plan;
  shard 0: announces H's genuine step-2 checkpoint as a final step 999 (replay of an old manifest),
           and a step-5 checkpoint it signed itself whose tensors fit no model (well-formed safetensors);
  shard 1: announces a final step 6 whose manifests say publisher H but are signed by E1, and a step-8
           checkpoint it signed whose *.safetensors files are pickles;
  stats 0: a signed stats artifact that is a pickle;
  router:  announces an expert manifest as the learned router.
- E2 (own valid key) re-announces H's genuine step-4 checkpoints and serves them badly: shard 0's weights
  as an endless stream and its state as an oversized chunk, shard 1's weights with a flipped byte and its
  state as one 9 MiB message; it also lists the pickle stats.
- G (raw hivemind DHT, no validator) stores unsigned records under H's owner marker, a huge record,
  a plain value over a dictionary key, a bytes subkey, and a release of H's claim.

Tests run in any order (the suite shuffles them): every world is built whole, G's and the signed garbage
included, and the island test gets a world of its own (`island_world`), since its island announces a plan,
checkpoints, replicas, stats and a router that would change what the other tests read from the DHT.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.cli import main
from ddm_node.core.config import load_config
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import read_manifest
from ddm_node.ensemble.bundle import load_bundle, read_index
from ddm_node.swarm.records import CheckpointRecord, Claim, PlanRecord, ReplicaRecord, RouterRecord, StatsRecord
from ddm_node.train import checkpoint as ckpt

from .evil_peer import (
    BIG_RECORD,
    EvilPeer,
    GarbagePeer,
    forge_publisher,
    key_after,
    keys_before,
    pickle_payload,
    seal_copy,
    write_wrong_tensors,
)

pytestmark = pytest.mark.multiproc
TTL = 900.0


@dataclass
class World:
    plan: object
    root: Path
    honest: Identity
    work: Path  # H's work dir
    h_address: str
    h_swarm: object
    maddrs: list[str]
    e1: EvilPeer
    e2: EvilPeer
    garbage: GarbagePeer
    marker: Path  # created if anything ever unpickles peer data
    validator_log: Path  # DEBUG lines of every DHT child's record validator
    ids: dict = field(default_factory=dict)  # (shard, step) -> (expert id, state id) of H's checkpoints
    stats: dict = field(default_factory=dict)  # shard -> H's stats manifest id
    h_claim: object = None
    stored: dict = field(default_factory=dict)  # what each signed garbage write returned (see _arm_garbage)

    @property
    def run_id(self) -> str:
        return self.plan.run_id


def _config():
    return load_config(overrides={
        "model.hidden": 32, "model.depth": 2, "model.heads": 2,
        "train.steps": 6, "train.batch_size": 16, "train.checkpoint_every": 2, "train.warmup_steps": 1,
        "router.steps": 2, "router.batch_size": 16, "partition.experts": 2,
        "swarm.settle": 0.3, "swarm.mirror_interval": 3600.0, "swarm.replicas": 2, "swarm.heartbeat": 1.0,
        "swarm.announce_ttl": 600.0,
    })


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The network of the module docstring, shared by the tests that only read from it."""
    yield from _make_world(tmp_path_factory.mktemp("evil"))


@pytest.fixture
def island_world(tmp_path_factory):
    """The same network, for the island test alone (its island's records would be read by the others)."""
    yield from _make_world(tmp_path_factory.mktemp("evil-island"))


def _make_world(root: Path):
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.swarm.claims import ClaimManager
    from ddm_node.swarm.dht import Swarm
    from ddm_node.train.expert import train_shard
    from ddm_node.transfer.server import TransferServer
    from ddm_node.transfer.store import ArtifactStore, NodeInfoData

    # Record validation happens in each DHT's forked child process; a file handler installed before
    # the forks records the validators' reasons where the test can read them.
    vlog = root / "validator.log"
    handler = logging.FileHandler(vlog)
    handler.setLevel(logging.DEBUG)
    vlogger = logging.getLogger("ddm_node.swarm.validator")
    old_level = vlogger.level
    vlogger.setLevel(logging.DEBUG)
    vlogger.addHandler(handler)

    ds = load_dataset("digits")
    plan = make_plan(_config(), ds)
    honest = key_after("c")
    id1, id2 = keys_before(2, "8")
    work = root / "H"
    for shard in (0, 1):
        train_shard(plan, shard, work, steps=4, identity=honest, dataset=ds)
    store = ArtifactStore()
    store.register_plan(plan.to_bytes())
    ids, stats = {}, {}
    for shard in (0, 1):
        for step in (2, 4):
            d = ckpt.checkpoint_dir(work, shard, step)
            ids[(shard, step)] = (store.register(d / ckpt.EXPERT).id, store.register(d / ckpt.STATE).id)
        stats[shard] = store.register(ckpt.stats_dir(work, shard)).id
    server = TransferServer(store, NodeInfoData("H", honest.public_hex))
    peers: list = []
    h_swarm = None
    try:
        address = server.start()
        h_swarm = Swarm(honest, plan.run_id)
        maddrs = h_swarm.visible_maddrs()
        h_swarm.announce(PlanRecord(plan.run_id, address), ttl=TTL)
        for shard in (0, 1):
            e, s = ids[(shard, 4)]
            h_swarm.announce(CheckpointRecord(shard, 4, e, s, honest.public_hex, address, False), ttl=TTL)
            h_swarm.announce(StatsRecord(shard, stats[shard], address), ttl=TTL)
        claims = ClaimManager(h_swarm, ttl=TTL, settle=0.3)
        assert claims.try_claim(7)
        h_claim = claims.owner(7)

        e1 = EvilPeer(id1, plan.run_id, maddrs)
        peers.append(e1)
        e2 = EvilPeer(id2, plan.run_id, maddrs)
        peers.append(e2)
        garbage = GarbagePeer(maddrs)
        peers.append(garbage)
        w = World(plan, root, honest, work, address, h_swarm, maddrs, e1, e2, garbage, root / "UNPICKLED", vlog,
                  ids, stats, h_claim)
        _arm_e1(w)
        _arm_e2(w)
        _arm_garbage(w)
        yield w
    finally:
        for p in reversed(peers):
            p.close()
        server.stop(0)
        if h_swarm is not None:
            h_swarm.shutdown()
        vlogger.removeHandler(handler)
        vlogger.setLevel(old_level)
        handler.close()


def _step_dir(w: World, shard: int, step: int) -> Path:
    return ckpt.checkpoint_dir(w.work, shard, step)


def _arm_e1(w: World) -> None:
    e1, key, run = w.e1, w.e1.key, w.run_id
    evil = w.root / "E1"
    sv = e1.servicer
    # plan: bytes that are not the plan (another budget): sha256 != run id
    sv.plans[run] = w.plan.to_bytes().replace(b'"steps":6', b'"steps":7')
    e1.swarm.announce(PlanRecord(run, e1.address), ttl=TTL)
    # shard 0: H's genuine step-2 checkpoint replayed as the newest, final, step 999
    for part in (ckpt.EXPERT, ckpt.STATE):
        sv.hold(_step_dir(w, 0, 2) / part)
    e, s = w.ids[(0, 2)]
    e1.swarm.announce(CheckpointRecord(0, 999, e, s, key, e1.address, True), ttl=TTL)
    # shard 0: a step-5 checkpoint E1 signed itself, well-formed safetensors that fit no model
    evil.mkdir(parents=True)
    write_wrong_tensors(evil / "wrong.safetensors")
    wrong = (evil / "wrong.safetensors").read_bytes()
    src = _step_dir(w, 0, 4)
    extra5 = dict(read_manifest(src / ckpt.STATE).extra, step=5)
    we = seal_copy(src / ckpt.EXPERT, evil / "w5" / "expert", e1.identity, {ckpt.MODEL_FILE: wrong}, step=5,
                   extra={"step": 5})
    ws = seal_copy(src / ckpt.STATE, evil / "w5" / "state", e1.identity, {ckpt.STATE_FILE: wrong}, step=5,
                   extra=extra5)
    sv.hold(evil / "w5" / "expert")
    sv.hold(evil / "w5" / "state")
    e1.swarm.announce(ReplicaRecord(0, 5, we.id, ws.id, key, key, e1.address), ttl=TTL)
    # shard 1: a final step 6 whose manifests say "publisher H" but carry E1's signature
    src = _step_dir(w, 1, 4)
    forged = {}
    for part in (ckpt.EXPERT, ckpt.STATE):
        m, raw, sig = forge_publisher(src / part, w.honest.public_hex, e1.identity, step=6)
        sv.manifests[m.id] = (raw, sig)
        for name, entry in m.files.items():
            sv.files[entry.sha256] = (src / part / name).read_bytes()
        forged[part] = m.id
    e1.swarm.announce(CheckpointRecord(1, 6, forged[ckpt.EXPERT], forged[ckpt.STATE], key, e1.address,
                                                  True), ttl=TTL)
    # shard 1: a step-8 checkpoint E1 signed correctly, whose tensor files are pickles
    payload = pickle_payload(w.marker)
    extra8 = dict(read_manifest(src / ckpt.STATE).extra, step=8)
    pe = seal_copy(src / ckpt.EXPERT, evil / "p8" / "expert", e1.identity, {ckpt.MODEL_FILE: payload}, step=8,
                   extra={"step": 8})
    ps = seal_copy(src / ckpt.STATE, evil / "p8" / "state", e1.identity, {ckpt.STATE_FILE: payload}, step=8,
                   extra=extra8)
    sv.hold(evil / "p8" / "expert")
    sv.hold(evil / "p8" / "state")
    e1.swarm.announce(ReplicaRecord(1, 8, pe.id, ps.id, key, key, e1.address), ttl=TTL)
    # stats 0: a signed stats artifact that is a pickle (E2 holds and lists it too)
    pst = seal_copy(ckpt.stats_dir(w.work, 0), evil / "pstats", e1.identity, {ckpt.STATS_FILE: payload})
    sv.hold(evil / "pstats")
    e1.swarm.announce(StatsRecord(0, pst.id, e1.address), ttl=TTL)
    w.e2.servicer.hold(evil / "pstats", list_it=True)
    # router: an expert manifest announced as the learned router
    sv.hold(_step_dir(w, 0, 4) / ckpt.EXPERT)
    e1.swarm.announce(RouterRecord(w.ids[(0, 4)][0], 2, e1.address, key), ttl=TTL)


def _arm_e2(w: World) -> None:
    e2, key = w.e2, w.e2.key
    modes = {(0, ckpt.EXPERT): "endless", (0, ckpt.STATE): "oversized", (1, ckpt.EXPERT): "flip",
             (1, ckpt.STATE): "huge"}
    for (shard, part), mode in modes.items():
        m = e2.servicer.hold(_step_dir(w, shard, 4) / part)
        weights = ckpt.MODEL_FILE if part == ckpt.EXPERT else ckpt.STATE_FILE
        e2.servicer.mode[m.files[weights].sha256] = mode
    for shard in (0, 1):
        e, s = w.ids[(shard, 4)]
        e2.swarm.announce(CheckpointRecord(shard, 4, e, s, key, e2.address, False), ttl=TTL)


def _arm_garbage(w: World) -> None:
    from ddm_node.swarm.dht import dht_key
    from ddm_node.swarm.validator import owner_marker

    run, g = w.run_id, w.garbage
    h_marker = owner_marker(w.honest.public_hex)
    ck0, claim7 = dht_key(run, "ckpt", 0), dht_key(run, "claim", 7)
    # unsigned: a false record "by H", a 12 KiB record under an invented owner, a plain value over the
    # dictionary, a bytes subkey, H's claim "released", a plan record nobody signed
    g.store(ck0, CheckpointRecord(0, 10**6, "ab" * 32, "cd" * 32, w.honest.public_hex, "127.0.0.1:1", True).to_value(),
            subkey=h_marker)
    g.store(ck0, {"junk": "x" * BIG_RECORD}, subkey=owner_marker("e" * 64))
    g.store(ck0, "a plain value replacing the whole dictionary", ttl=7200.0)
    g.store(ck0, {"junk": 1}, subkey=b"bytes subkey")
    g.store(claim7, replace(w.h_claim, released=True).to_value(), subkey=h_marker, ttl=7200.0)
    g.store(dht_key(run, "plan"), PlanRecord(run, "127.0.0.1:1").to_value(), subkey=owner_marker("f" * 64))
    # signed by their owners but wrong: wrong types, over the size cap, a claim "by H" under E2's key,
    # and E1 writing under H's subkey (its validator will not sign that: every peer refuses it)
    e1, e2 = w.e1, w.e2
    # a well-formed record of another kind under the peers key (ill-typed values are refused by every validator)
    w.stored["e1 peers"] = e1.store_owned("peers", None, StatsRecord(1, "ab" * 32, e1.address).to_value())
    e1.store_owned("stats", 1, {"shard": 1, "manifest": "ab" * 32, "grpc": e1.address, "pad": "z" * BIG_RECORD})
    w.stored["e2 claim as H"] = e2.store_owned("claim", 7, replace(w.h_claim, claimed_at=1.0).to_value())
    w.stored["e1 under H's subkey"] = e1.store_as("claim", 7, Claim(7, e1.swarm.peer_id, e1.key, e1.address,
                                                                    1.0).to_value(), subkey=h_marker)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def _has(messages: list[str], *needles: str) -> bool:
    return any(all(n in m for n in needles) for m in messages)


# ------------------------------------------------------------------------------------------ the DHT


def test_dht_garbage_forgeries_and_overwrites_are_rejected(world, caplog):
    from ddm_node.swarm.claims import ClaimManager
    from ddm_node.swarm.dht import Swarm

    # the garbage is stored by the world (_arm_garbage), so every test reads a DHT holding it
    w, run, e1, e2 = world, world.run_id, world.e1, world.e2
    caplog.set_level(logging.WARNING, logger="ddm_node.swarm.dht")
    assert w.stored == {"e1 peers": True, "e2 claim as H": True, "e1 under H's subkey": False}

    with Swarm(Identity.generate(), run, initial_peers=w.maddrs) as reader:
        for r in (w.h_swarm, reader):
            got = {(c.publisher, c.step) for c in r.checkpoints(0)}
            assert got == {(w.honest.public_hex, 4), (e1.key, 999), (e2.key, 4)}, got
            claims = r.claims(7)
            assert [(c.public_key, c.claimed_at, c.released) for c in claims] == [
                (w.honest.public_hex, w.h_claim.claimed_at, False)]
            assert e1.key not in {p.public_key for p in r.peers()}
            assert [s.manifest for s in r.stats(1)] == [w.stats[1]]
            assert {p.grpc for p in r.plan_holders()} == {w.h_address, e1.address}
        assert ClaimManager(reader).owner(7).public_key == w.honest.public_hex
    text = "\n".join(_messages(caplog))
    assert "skipping a garbage record of " + e1.key[:12] in text  # E1's wrong types
    assert "is not its owner " + e2.key[:12] in text  # E2's claim "by H"
    vlog = w.validator_log.read_text()
    for reason in ("rejecting an unsigned DHT record of " + w.honest.public_hex[:12],  # G's record "by H"
                   "rejecting an oversized DHT record of " + e1.key[:12],
                   "rejecting a DHT record without an owner subkey"):  # plain value, bytes subkey
        assert reason in vlog, reason


def test_claim_fairness_is_not_protected(world):
    """Documented limit (docs/THREAT_MODEL.md): claimed_at is the claimant's word, so a validly signed claim
    with a back-dated time wins every race and makes an honest holder retreat. Wasted work, not corruption."""
    from ddm_node.swarm.claims import ClaimManager
    from ddm_node.swarm.dht import dht_time

    w, e1 = world, world.e1
    honest = ClaimManager(w.h_swarm, ttl=60.0, settle=0.3)
    assert honest.try_claim(9)
    back_dated = Claim(9, e1.swarm.peer_id, e1.key, e1.address, claimed_at=dht_time() - 3600)
    assert e1.swarm.put("claim", 9, back_dated, ttl=60.0)
    assert honest.renew(9) is False and honest.owner(9).public_key == e1.key


# ------------------------------------------------------------------------------------------ assembly


def test_assemble_takes_every_honest_copy_past_the_lies(world, tmp_path, caplog, capsys):
    w = world
    caplog.set_level(logging.WARNING, logger="ddm_node")
    out = tmp_path / "bundle"
    rc = main(["assemble", "--initial-peers", *w.maddrs, "--run", w.run_id, "--out", str(out), "--min-experts", "2",
               "--wait", "0"])
    assert rc == 0, capsys.readouterr().err
    index = read_index(out)
    got = {e["shard"]: (e["manifest_id"], e["stats_manifest_id"], e["step"], e["publisher"]) for e in index["experts"]}
    assert got == {k: (w.ids[(k, 4)][0], w.stats[k], 4, w.honest.public_hex) for k in (0, 1)}
    assert index["router"]["kind"] == "centroid"
    assert {p.name for p in tmp_path.iterdir()} == {"bundle"}, "staging left behind"
    assert main(["verify", str(out), "--trusted-key", w.honest.public_hex]) == 0
    assert sorted(load_bundle(out).models) == [0, 1]

    m, e1, e2 = _messages(caplog), w.e1, w.e2
    assert _has(m, "plan from " + e1.address)  # E1's plan bytes fail the run id check
    assert _has(m, "shard 0 expert step 999", e1.key[:12], "step is 2, expected 999")  # the replay
    assert _has(m, "shard 0 expert step 5", "verifies but does not load", "weights do not match")
    assert _has(m, "shard 1 expert step 8", "verifies but does not load", "not a readable safetensors file")
    assert _has(m, "shard 1 expert step 6", "bad signature for publisher " + w.honest.public_hex[:16])
    assert _has(m, "shard 0 stats", "verifies but does not load", "not a readable safetensors file")
    assert _has(m, "router step 2", "kind is expert, expected router")
    # E2 re-announces H's manifests under its own key: H, the signed publisher, is asked first, so E2's
    # spoiled streams are never needed (those defences: test_transfer's malicious-stream tests)
    fetched = {sha for rpc, sha in e2.servicer.calls if rpc == "Fetch"}
    for shard in (0, 1):
        entry = read_manifest(_step_dir(w, shard, 4) / ckpt.EXPERT).files[ckpt.MODEL_FILE]
        assert entry.sha256 not in fetched
    assert not w.marker.exists(), "something unpickled peer data"
    capsys.readouterr()
    assert main(["status", "--initial-peers", *w.maddrs, "--run", w.run_id, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [s["shard"] for s in status["shards"]] == [0, 1]  # status shows claims; it survives the garbage too


# ------------------------------------------------------------------------------------------ an island


def test_island_mirrors_resumes_and_finishes_past_the_lies(island_world, tmp_path, caplog):
    from ddm_node.node.island import Island, IslandOptions

    w, e1 = island_world, island_world.e1
    caplog.set_level(logging.INFO, logger="ddm_node")
    me = Identity.generate()
    island = Island(IslandOptions(identity=me, work_dir=tmp_path / "island", run_id=w.run_id,
                                  initial_peers=w.maddrs, device="cpu", plan_timeout=60))
    try:
        island.start()  # the plan comes from H after E1's is rejected
        assert island.plan.run_id == w.run_id
        assert _has(_messages(caplog), "plan from " + e1.address, "rejected")
        # Final "done" records whose manifests say otherwise do not end the work
        assert not island.progress.shard_done(0) and not island.progress.shard_done(1) and not island.progress.router_done()

        island.mirror.sweep()  # the mirror path: newest verified copy of each shard
        shard1 = ckpt.latest_checkpoint(island.work_dir, 1, require_signature=True)
        assert shard1 is not None and shard1.name == "step_00000004"
        assert read_manifest(shard1 / ckpt.EXPERT).id == w.ids[(1, 4)][0]
        # E1's step 5 is signed, intact and well-formed: a mirror keeps it (it is not the mirror's to judge)
        assert ckpt.latest_checkpoint(island.work_dir, 0).name == "step_00000005"

        island.work_loop()  # the daemon's loop: claim, resume, train, publish, then the router job
        from ddm_node.core.events import EventKind, read_events
        from ddm_node.core.workdir import WorkDir

        ev = read_events(WorkDir(island.work_dir).events)
        kinds = [(e.kind, e.shard) for e in ev]
        assert (EventKind.DONE, 0) in kinds and (EventKind.DONE, 1) in kinds and (EventKind.ROUTER, None) in kinds
        rejected = [e for e in ev if e.kind is EventKind.REJECTED]
        assert [(e.shard, e.step, e.publisher) for e in rejected] == [(0, 5, e1.key[:12])]
        resumes = {(e.shard, e.step, e.source, e.publisher) for e in ev if e.kind is EventKind.RESUME}
        assert (0, 4, "swarm", w.honest.public_hex[:12]) in resumes
        assert (1, 4, "local mirror", w.honest.public_hex[:12]) in resumes
        for shard in (0, 1):
            sd = ckpt.shard_dir(island.work_dir, shard)
            assert sorted(p.name for p in sd.iterdir()) == ["stats", "step_00000004", "step_00000006"]
            assert read_manifest(sd / "step_00000004" / ckpt.EXPERT).id == w.ids[(shard, 4)][0]
            expert, _ = ckpt.verify_checkpoint(sd / "step_00000006", require_signature=True)
            assert expert.publisher == me.public_hex
            assert read_manifest(sd / "stats").id == w.stats[shard]
    finally:
        island.shutdown()
    m = _messages(caplog)
    assert _has(m, "not counting expert", "shard 0 step 999", "step 2")
    assert _has(m, "not counting expert", "shard 1 step 6", "bad signature")
    assert _has(m, "not counting router", "it is a expert")
    assert _has(m, "mirror of shard 0 step 999 failed", "step 2")
    assert _has(m, "mirror of shard 1 step 8 failed", "not a safetensors file")
    assert _has(m, "mirror of shard 1 step 6 failed", "bad signature")
    assert _has(m, "stats of shard 0 from " + e1.address, "not a safetensors file")
    assert _has(m, "shard 0: checkpoint step 5 by " + e1.key[:12], "verified but does not load")
    assert not w.marker.exists(), "something unpickled peer data"
