"""Scenario 5: the bootstrap peer (the island everyone joined through, and the only one started from the
plan file) dies. The swarm goes on: training continues, checkpoints keep being announced, and a new
island joins through another peer's multiaddr, gets the plan from a peer and gets work or mirrors."""

from __future__ import annotations

import time

import pytest

from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.swarm.dht import Swarm

from .harness import island_log_tail, training_now, verified_copy

pytestmark = [pytest.mark.multiproc, pytest.mark.islands, pytest.mark.slow]  # ~75 s: run with -m slow

TTL, EVERY = 4.0, 20
CONFIG = f"""
partition: {{experts: 2}}
model: {{hidden: 32, depth: 2, heads: 2}}
train: {{steps: 20000, batch_size: 32, checkpoint_every: {EVERY}, warmup_steps: 5}}
swarm: {{lease_ttl: {TTL}, settle: 1, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60, router_job: false}}
"""


def test_swarm_survives_its_bootstrap_peer_and_a_newcomer_joins_through_another(net, report, rng):
    run_id = net.partition(CONFIG)
    boot = net.start("boot", "--plan", str(net.root / "plan"))
    boot_maddr = net.wait_ready(boot)["maddrs"][0]
    others = [net.start(f"i{i}", "--run", run_id, "--initial-peers", boot_maddr) for i in (2, 3)]
    for p in others:
        net.wait_ready(p)
    # The bootstrap peer trains a shard and has checkpointed it; the others are up.
    def boot_checkpointed(ev):
        shard = training_now(ev, {"boot"}).get("boot")
        return shard is not None and any(e.kind is EventKind.CHECKPOINT and e.name == "boot" for e in ev)

    net.wait_for(boot_checkpointed, 120, "boot to train and checkpoint")
    time.sleep(rng.uniform(0, 2))
    ev = net.events()
    boot_shard = training_now(ev, {"boot"})["boot"]
    before = {s: max((e.step for e in ev if e.kind is EventKind.CHECKPOINT and e.shard == s), default=0)
              for s in (0, 1)}
    t_kill = time.time()
    net.kill(boot)
    report.note(f"killed the bootstrap peer while it trained shard {boot_shard}; newest steps {before}")
    # A newcomer joins at once through the last survivor's multiaddr (not boot's) and gets the plan from a peer.
    newcomer = net.start("newcomer", "--run", run_id, "--initial-peers", others[-1].announce()["maddrs"][0])

    # The orphaned shard is taken over and both shards keep checkpointing after the kill.
    takeover = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.CLAIM and e.shard == boot_shard
                                             and e.t > t_kill), None), 6 * TTL, "a takeover of boot's shard")
    net.wait_for(lambda ev: all(any(e.kind is EventKind.CHECKPOINT and e.shard == s and e.t > t_kill
                                    and e.step > before[s] for e in ev) for s in (0, 1)), 90,
                 "new checkpoints of both shards after the kill")

    # A reader joining through a surviving peer sees the new checkpoints announced.
    via = others[0].announce()["maddrs"][0]
    with Swarm(Identity.generate(), run_id, initial_peers=[via], client_mode=True) as reader:
        deadline = time.time() + 30
        while not all(any(r.step > before[s] for r in reader.checkpoints(s)) for s in (0, 1)):
            assert time.time() < deadline, "checkpoints after the kill are not announced"
            time.sleep(0.5)
        announced = {s: max(r.step for r in reader.checkpoints(s)) for s in (0, 1)}

    net.wait_ready(newcomer)
    ready_s = time.time() - t_kill

    def working_or_mirroring(ev):
        if any(e.kind is EventKind.CLAIM and e.name == "newcomer" for e in ev):
            return "claimed a shard"
        for s in (0, 1):
            if any(verified_copy(newcomer.work, s, e.step) for e in ev if e.kind is EventKind.CHECKPOINT
                   and e.shard == s):
                return f"mirrors shard {s}"
        return None

    what = net.wait_for(working_or_mirroring, 60, "the newcomer to get work or mirror")
    report.note(f"takeover of shard {boot_shard} by {takeover.name} {takeover.t - t_kill:.1f} s after the kill; "
                f"newcomer ready {ready_s:.1f} s after the kill and {what}")
    report.add(kills=1, takeover_s=round(takeover.t - t_kill, 1), steps_before=before, announced_after=announced,
               newcomer=what)
    for p in [*others, newcomer]:
        assert p.alive, island_log_tail(p)
