"""Live R-copy placement (ARCHITECTURE, mirror thread): with enough idle islands, every shard's newest training
state is held by exactly R = swarm.replicas islands besides its publisher, namely the first R of the shard's
rendezvous order of the live peers that do not hold it, each announcing a replica record.

tests/test_mirror.py checks the rule against a fake swarm; this runs it: four `ddm-node start` processes, two
shards, R = 2. The islands join through a DHT peer of the test itself, all at once, so every island is live
before any shard reaches its final step (the copies of that step are then placed by the final live set).
At the end each shard's final checkpoint must be held by its rendezvous top-2, by no one else, within a bound,
and the DHT must list exactly those replicas.
"""

from __future__ import annotations

import json
import time

import pytest
from live_swarm import config, holds, net, of, swarm_together, timeline, wait_until  # noqa: F401

from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.core.placement import rendezvous
from ddm_node.swarm.dht import Swarm

pytestmark = [pytest.mark.multiproc, pytest.mark.islands]

K, R, STEPS, EVERY, ISLANDS = 2, 2, 600, 200, 4
COPY_BOUND = 30.0  # seconds from the last shard's final checkpoint to R copies of every shard


def test_every_shard_gets_exactly_r_live_copies_on_its_rendezvous_top_r(net):  # noqa: F811
    run_id = net.partition(config(k=K, steps=STEPS, every=EVERY, ttl=8.0, replicas=R))
    with swarm_together(net, run_id, ISLANDS) as (procs, maddr):
        keys = {p.name: p.announce()["public_key"] for p in procs}
        name_of = {v: k for k, v in keys.items()}

        ev = wait_until(net, lambda ev: len({e.shard for e in of(ev, EventKind.DONE)}) == K and ev, 300,
                        "both shards to finish")
        starts = [e.t for e in of(ev, EventKind.START)]
        finals = [e.t for e in of(ev, EventKind.CHECKPOINT) if e.step == STEPS]
        assert len(starts) == ISLANDS and max(starts) < min(finals), (
            "an island joined after a shard's final checkpoint; the swarm took too long to start for this check")
        publishers = {k: {e.name for e in of(ev, EventKind.CHECKPOINT, shard=k)} for k in range(K)}
        expected = {}
        for k in range(K):
            candidates = sorted(keys[n] for n in keys if n not in publishers[k])
            expected[k] = {name_of[key] for key in rendezvous(f"mirror/{k}", candidates)[:R]}

        def copies() -> dict[int, set[str]]:
            return {k: {p.name for p in procs if p.name not in publishers[k] and holds(p.work, k, STEPS)}
                    for k in range(K)}

        t_done, deadline = max(finals), time.time() + COPY_BOUND
        held = copies()
        while any(len(c) < R for c in held.values()) and time.time() < deadline:
            time.sleep(0.25)
            held = copies()
        assert all(len(c) >= R for c in held.values()), (
            f"{COPY_BOUND:.0f}s after both shards were done, copies of the final steps {held} (besides the publishers "
            f"{publishers}), not {R} each; rendezvous top-{R}: {expected}")
        took = time.time() - t_done
        time.sleep(3.0)  # six mirror intervals: nobody else copies it
        placed = copies()
        print(f"placement: {json.dumps({k: sorted(v) for k, v in placed.items()})}, publishers "
              f"{json.dumps({k: sorted(v) for k, v in publishers.items()})}, {took:.1f}s after the last final step; "
              f"last island up {min(finals) - max(starts):.1f}s before the first final step")
        assert placed == expected, f"copies {placed}, rendezvous top-{R} {expected}, publishers {publishers}"
        assert all(len(c) == R for c in placed.values())
        mirrored = {(e.name, e.shard) for e in of(timeline(net), EventKind.MIRROR) if e.step == STEPS}
        assert mirrored == {(n, k) for k in range(K) for n in expected[k]}, mirrored

        # every copy is announced: the DHT lists exactly these replicas of the final step
        with Swarm(Identity.generate(), run_id, initial_peers=[maddr]) as reader:
            for k in range(K):
                replicas = {name_of.get(r.holder_key, r.holder_key[:12]) for r in reader.replicas(k) if r.step == STEPS}
                assert replicas == expected[k], (k, replicas)
