"""A small real swarm for hostile-data tests: an honest publisher H and an evil peer E on 127.0.0.1.

`train_world` trains H's checkpoints once (shards 0 and 1 at steps 2 and 4 of a 6-step budget, tiny model);
`open_world` serves them from a real `TransferServer` and a real DHT (H announces its step-4 checkpoints, stats
and the plan), and joins E (`evil_peer.EvilPeer`: its own valid key sorting first, real signed records, and a
gRPC servicer that serves whatever bytes it is given). The run is open (no trusted_keys), so only the defences
under test are in play.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.identity import Identity
from ddm_node.train import checkpoint as ckpt

TTL = 900.0


def config():
    from ddm_node.core.config import load_config

    return load_config(overrides={
        "model.hidden": 32, "model.depth": 2, "model.heads": 2,
        "train.steps": 6, "train.batch_size": 16, "train.checkpoint_every": 2, "train.warmup_steps": 1,
        "router.steps": 2, "router.batch_size": 16, "partition.experts": 2,
        "swarm.settle": 0.3, "swarm.mirror_interval": 3600.0, "swarm.replicas": 2, "swarm.heartbeat": 1.0,
        "swarm.announce_ttl": 600.0,
    })


@dataclass(frozen=True)
class Trained:
    plan: object
    honest: Identity
    work: Path  # H's work dir: shards 0 and 1 at steps 2 and 4, and their stats


def train_world(root: Path) -> Trained:
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.train.expert import train_shard

    from .evil_peer import key_after

    ds = load_dataset("digits")
    plan = make_plan(config(), ds)
    honest = key_after("c")
    for shard in (0, 1):
        train_shard(plan, shard, root / "H", steps=4, identity=honest, dataset=ds)
    return Trained(plan, honest, root / "H")


@dataclass
class World:
    plan: object
    honest: Identity
    work: Path  # H's work dir (a copy per world)
    maddrs: list[str]
    evil: object  # an EvilPeer: own valid key, real DHT records, serves whatever bytes it is given
    ids: dict  # (shard, step) -> (expert id, state id) of H's checkpoints

    @property
    def run_id(self) -> str:
        return self.plan.run_id


@contextmanager
def open_world(trained: Trained, tmp_path: Path) -> Iterator[World]:
    """H serves its step-4 checkpoints, stats and the plan on a fresh DHT; E (keys sorting first) joins it."""
    from ddm_node.swarm.dht import Swarm
    from ddm_node.swarm.records import CheckpointRecord, PlanRecord, StatsRecord
    from ddm_node.transfer.server import TransferServer
    from ddm_node.transfer.store import ArtifactStore, NodeInfoData

    from .evil_peer import EvilPeer, keys_before

    plan, honest = trained.plan, trained.honest
    work = tmp_path / "H"
    shutil.copytree(trained.work, work)
    store = ArtifactStore()
    store.register_plan(plan.to_bytes())
    ids, stats = {}, {}
    for shard in (0, 1):
        for step in (2, 4):
            d = ckpt.checkpoint_dir(work, shard, step)
            ids[(shard, step)] = (store.register(d / ckpt.EXPERT).id, store.register(d / ckpt.STATE).id)
        stats[shard] = store.register(ckpt.stats_dir(work, shard)).id
    server = TransferServer(store, NodeInfoData("H", honest.public_hex))
    h_swarm = evil = None
    try:
        address = server.start()
        h_swarm = Swarm(honest, plan.run_id)
        maddrs = h_swarm.visible_maddrs()
        h_swarm.announce(PlanRecord(plan.run_id, address), ttl=TTL)
        for shard in (0, 1):
            e, s = ids[(shard, 4)]
            h_swarm.announce(CheckpointRecord(shard, 4, e, s, honest.public_hex, address, False), ttl=TTL)
            h_swarm.announce(StatsRecord(shard, stats[shard], address), ttl=TTL)
        evil = EvilPeer(keys_before(1, "8")[0], plan.run_id, maddrs)
        yield World(plan, honest, work, maddrs, evil, ids)
    finally:
        if evil is not None:
            evil.close()
        server.stop(0)
        if h_swarm is not None:
            h_swarm.shutdown()


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def has(found: list[str], *needles: str) -> bool:
    return any(all(n in m for n in needles) for m in found)


def island(w: World, work_dir: Path, me: Identity):
    from ddm_node.node.island import Island, IslandOptions

    return Island(IslandOptions(identity=me, work_dir=work_dir, run_id=w.run_id, initial_peers=w.maddrs,
                                device="cpu", plan_timeout=60))


def events(work_dir: Path):
    from ddm_node.core.events import read_events
    from ddm_node.core.workdir import WorkDir

    return read_events(WorkDir(work_dir).events)
