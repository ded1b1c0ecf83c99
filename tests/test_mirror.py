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
    swarm = SimpleNamespace(peers=lambda: peers,
                            checkpoints=lambda s: [SimpleNamespace(publisher=publishers[s])] if s in publishers else [])
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
