"""A run that lists its publishers (`swarm.trusted_keys`): a perfectly valid checkpoint signed by any other
key is ignored by assembly, by "is this shard done?", by resume and by the mirror; the trusted copy is used.
Claims by unlisted keys do not keep listed islands off a shard.

World: H (trusted) trained shard 0 to step 4 of 6. E (valid key, not listed) serves the same weights
re-sealed under its own key as a final step 6: signature, hashes, run, shard, step and config hash all
check out; only the key is wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.cli import main
from ddm_node.core.config import load_config
from ddm_node.core.errors import IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import read_manifest
from ddm_node.ensemble.bundle import read_index
from ddm_node.swarm.claims import ClaimManager
from ddm_node.swarm.dht import dht_time
from ddm_node.swarm.records import CheckpointRecord, Claim, PlanRecord, StatsRecord
from ddm_node.train import checkpoint as ckpt
from ddm_node.transfer.client import NodeClient

from .evil_peer import EvilPeer, seal_copy

pytestmark = pytest.mark.multiproc
TTL = 900.0


@dataclass
class World:
    plan: object
    plan_dir: Path
    honest: Identity
    maddrs: list[str]
    evil: EvilPeer
    good: tuple[str, str]  # H's step-4 (expert, state) manifest ids
    bad: tuple[str, str]  # E's step-6 re-seal


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.swarm.dht import Swarm
    from ddm_node.train.expert import train_shard
    from ddm_node.transfer.server import TransferServer
    from ddm_node.transfer.store import ArtifactStore, NodeInfoData

    root = tmp_path_factory.mktemp("trusted")
    honest, evil_id = Identity.generate(), Identity.generate()
    cfg = load_config(overrides={
        "model.hidden": 32, "model.depth": 2, "model.heads": 2, "train.steps": 6, "train.batch_size": 16,
        "train.checkpoint_every": 4, "train.warmup_steps": 1, "partition.experts": 2, "swarm.settle": 0.3,
        "swarm.mirror_interval": 3600.0, "swarm.replicas": 2, "swarm.router_job": False,
        "swarm.trusted_keys": [honest.public_hex]})
    ds = load_dataset("digits")
    plan = make_plan(cfg, ds)
    plan.save(root / "plan")
    step = train_shard(plan, 0, root / "H", steps=4, identity=honest, dataset=ds)
    store = ArtifactStore()
    store.register_plan(plan.to_bytes())
    good = (store.register(step / ckpt.EXPERT, [honest.public_hex]).id,
            store.register(step / ckpt.STATE, [honest.public_hex]).id)
    stats = store.register(ckpt.stats_dir(root / "H", 0)).id
    server = TransferServer(store, NodeInfoData("H", honest.public_hex))
    swarm = evil = None
    try:
        address = server.start()
        swarm = Swarm(honest, plan.run_id)
        maddrs = swarm.visible_maddrs()
        swarm.announce(PlanRecord(plan.run_id, address), ttl=TTL)
        swarm.announce(CheckpointRecord(0, 4, *good, honest.public_hex, address, False), ttl=TTL)
        swarm.announce(StatsRecord(0, stats, address), ttl=TTL)
        evil = EvilPeer(evil_id, plan.run_id, maddrs)
        extra = dict(read_manifest(step / ckpt.STATE).extra, step=6)
        be = seal_copy(step / ckpt.EXPERT, root / "E" / "expert", evil_id, step=6, extra={"step": 6})
        bs = seal_copy(step / ckpt.STATE, root / "E" / "state", evil_id, step=6, extra=extra)
        for part in ("expert", "state"):
            evil.servicer.hold(root / "E" / part)
        evil.swarm.announce(CheckpointRecord(0, 6, be.id, bs.id, evil.key, evil.address, True), ttl=TTL)
        yield World(plan, root / "plan", honest, maddrs, evil, good, (be.id, bs.id))
    finally:
        if evil is not None:
            evil.close()
        server.stop(0)
        if swarm is not None:
            swarm.shutdown()


def test_the_untrusted_checkpoint_is_otherwise_valid(world):
    """Control: E's manifest verifies without a key list; only the list rejects it."""
    with NodeClient(world.evil.address) as client:
        m, _, _ = client.get_manifest(world.bad[0])
        assert (m.kind, m.run_id, m.shard, m.step, m.publisher) == ("expert", world.plan.run_id, 0, 6, world.evil.key)
        with pytest.raises(IntegrityError, match="not in trusted_keys"):
            client.get_manifest(world.bad[0], [world.honest.public_hex])


def test_assemble_uses_only_listed_publishers(world, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ddm_node")
    out = tmp_path / "bundle"
    assert main(["assemble", "--initial-peers", *world.maddrs, "--run", world.plan.run_id, "--out", str(out),
                 "--min-experts", "1", "--wait", "0"]) == 0
    experts = read_index(out)["experts"]
    assert [(e["shard"], e["manifest_id"], e["step"], e["publisher"]) for e in experts] == [
        (0, world.good[0], 4, world.honest.public_hex)]
    assert any("shard 0 expert step 6" in m and "not in trusted_keys" in m for m in caplog.messages)
    assert main(["verify", str(out), "--trusted-key", world.honest.public_hex]) == 0


def test_island_ignores_unlisted_publishers(world, tmp_path, caplog):
    from ddm_node.node.island import Island, IslandOptions

    caplog.set_level(logging.WARNING, logger="ddm_node")
    island = Island(IslandOptions(identity=Identity.generate(), work_dir=tmp_path / "island",
                                  plan_path=world.plan_dir, initial_peers=world.maddrs, device="cpu"))
    try:
        island.start()
        assert island.cfg.trusted_keys == [world.honest.public_hex]
        assert not island.progress.shard_done(0)  # E's final step 6 does not count
        # E squats shard 0 with a back-dated claim: it would win anywhere (see test_evil_peer), but a run
        # with trusted keys ignores claims by unlisted keys, so E cannot keep the listed islands off it
        squat = Claim(0, world.evil.swarm.peer_id, world.evil.key, world.evil.address, dht_time() - 3600)
        assert world.evil.swarm.put("claim", 0, squat, ttl=120.0)
        assert ClaimManager(island.swarm).owner(0).public_key == world.evil.key  # what an untrusting peer sees
        assert island.claims.owner(0) is None and island.claims.try_claim(0)
        island.mirror.sweep()
        island.job.resume_from_swarm(0)
        sd = ckpt.shard_dir(island.work_dir, 0)
        assert sorted(p.name for p in sd.iterdir()) == ["stats", "step_00000004"]
        expert, state = ckpt.verify_checkpoint(sd / "step_00000004", trusted_keys=[world.honest.public_hex])
        assert (expert.id, state.id) == world.good
    finally:
        island.shutdown()
    m = caplog.messages
    assert any("not counting expert" in x and "not in trusted_keys" in x for x in m)
    assert any("mirror of shard 0 step 6 failed" in x and "not in trusted_keys" in x for x in m)
    assert any("shard 0: checkpoint at step 6 unusable" in x and "not in trusted_keys" in x for x in m)
