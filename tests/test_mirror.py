"""Mirror placement: every shard gets R mirrors among the live peers that do not already hold it."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from ddm_node.node.mirror import Mirror
from ddm_node.node.state import NodeState


def island(me: str, peers: list[SimpleNamespace], publishers: dict[int, str], shards: int, replicas: int,
           trained: set[int] = frozenset(), active: int | None = None) -> dict:
    """What Mirror.targets reads (a fake swarm, the island's state), as Mirror's keyword arguments."""
    def checkpoints(shard: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(publisher=publishers[shard])] if shard in publishers else []

    swarm = SimpleNamespace(peers=lambda: peers, checkpoints=checkpoints)
    swarm.read_many = lambda kind, shards: {s: [SimpleNamespace(record=c) for c in swarm.checkpoints(s)] for s in shards}
    return dict(swarm=swarm, me=me, num_shards=shards, rules=None, cfg=SimpleNamespace(replicas=replicas), work=None,
                state=NodeState(active=active, trained=set(trained)), publisher=None, rejects=None, events=None)


def peer(key: str, shard: int = -1) -> SimpleNamespace:
    return SimpleNamespace(public_key=key, shard=shard, state="training" if shard >= 0 else "idle")


@pytest.mark.parametrize("shards,replicas,seed", list(itertools.product((3, 5, 8), (1, 2), range(5))))
def test_every_shard_gets_r_mirrors_when_one_island_trained_all(shards, replicas, seed):
    # The failure this replaces: per-peer rendezvous let two idle islands both skip shard 0.
    keys = [f"{seed}-{i}" for i in range(4)]
    peers = [peer(k) for k in keys]
    publishers = {s: keys[0] for s in range(shards)}
    placed = {k: list(Mirror(**island(k, peers, publishers, shards, replicas, trained=set(range(shards)) if k == keys[0]
                                    else set())).targets()) for k in keys}
    assert placed[keys[0]] == []  # the trainer holds them already
    for s in range(shards):
        assert sum(s in t for t in placed.values()) == replicas, (s, placed)


def test_trainers_and_publishers_are_not_counted_as_mirrors():
    peers = [peer("a", shard=0), peer("b"), peer("c"), peer("d")]
    publishers = {1: "b"}  # b published shard 1 once and lost it: the others mirror it, b does not
    placed = {p.public_key: list(Mirror(**island(p.public_key, peers, publishers, 2, 2,
                                               active=0 if p.public_key == "a" else None)).targets()) for p in peers}
    assert 0 not in placed["a"] and sum(0 in t for t in placed.values()) == 2
    assert 1 not in placed["b"] and sum(1 in t for t in placed.values()) == 2


def test_a_lone_island_mirrors_what_it_did_not_train():
    targets = Mirror(**island("a", [], {0: "x", 1: "y", 2: "a"}, 3, 2, trained={2})).targets()
    assert list(targets) == [0, 1] and [c.publisher for c in targets[1]] == ["y"]  # records passed on, not re-read


@pytest.mark.parametrize("seed", range(20))
def test_sweeps_between_full_ones_read_few_keys_and_place_as_a_full_read(seed):
    """After a full sweep, a sweep reads the checkpoint records of only the shards where the island may rank in the
    top R (every holder it has seen left out), and places exactly as reading every shard would."""
    import random

    rng = random.Random(seed)
    shards, keys = 24, [f"{seed}-{i}" for i in range(24)]
    trainers = dict(zip(keys, rng.sample(range(shards), shards)))  # everyone trains one shard
    peers = [peer(k, trainers[k]) for k in keys]
    publishers = {s: k for k, s in trainers.items()}
    for k in keys:
        reads = []
        args = island(k, peers, publishers, shards, 2, active=trainers[k], trained={trainers[k]})
        counted = args["swarm"].checkpoints
        args["swarm"].checkpoints = lambda s, counted=counted: reads.append(s) or counted(s)
        mirror = Mirror(**args)
        first = mirror.targets()
        assert len(reads) == shards - 1  # the first sweep is a full one
        reads.clear()
        assert mirror.targets() == first
        if len(reads) == shards - 1:  # this island's periodic full sweep: the next one is not
            reads.clear()
            assert mirror.targets() == first
        assert set(first) <= set(reads) and len(reads) <= 2 * len(first) + 2, (reads, first)


def test_a_publisher_never_seen_training_is_found_by_the_full_sweep():
    from ddm_node.node.mirror import FULL_SWEEP_EVERY

    peers = [peer(k) for k in "abcd"]
    publishers: dict[int, str] = {}
    mirrors = {k: Mirror(**island(k, peers, publishers, 1, 2)) for k in "abcd"}
    before = {k for k, m in mirrors.items() if 0 in m.targets()}
    publisher = sorted(before)[0]
    publishers[0] = publisher  # it published shard 0 without ever being seen training it
    after = [{k for k, m in mirrors.items() if 0 in m.targets()} for _ in range(FULL_SWEEP_EVERY)]
    assert len(after[0]) == 1  # the island ranked next has not seen the new publisher: one mirror short, for now
    assert publisher not in after[-1] and len(after[-1]) == 2  # by the next full sweep: R mirrors, none the publisher
