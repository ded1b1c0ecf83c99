"""Scenario 2: an island in its own network namespace is cut off, trains alone, and rejoins.

Topology: a bridge in the root namespace (islands A and C listen on its address) and island P, the
bootstrap peer started from the plan file, in a namespace behind a veth. P trains shard s, one of A/C
trains the other shard and the other one (B) idles. P's link goes down (`ip link set ... down`): P
keeps training and checkpointing alone; after the lease ttl, B claims s on the majority side and
resumes from a mirror copy, so two islands train s at once (a double claim). On heal, P's keeper
rejoins the DHT (`Swarm.rejoin`), both claims become visible, `winner` picks P (the older claim), B's
keeper retreats (`lease_lost`), P's checkpoints are announced and assembly uses them.
"""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from ddm_node.clients.assemble import assemble
from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.data.plan import Plan
from ddm_node.ensemble.bundle import read_index
from ddm_node.swarm.claims import winner
from ddm_node.swarm.dht import Swarm, dht_time

from .harness import checkpoint_steps, island_log_tail, maddr, netlab, verified_copy

pytestmark = [pytest.mark.multiproc, pytest.mark.islands, pytest.mark.slow, pytest.mark.usefixtures("need_netns")]  # -m slow

TTL, EVERY = 10.0, 20  # ttl >= 10 s: see docs/CHAOS.md (a partitioned renewal waits out 3 s DHT timeouts)
CONFIG = f"""
partition: {{experts: 2}}
model: {{hidden: 32, depth: 2, heads: 2}}
train: {{steps: 20000, batch_size: 32, checkpoint_every: {EVERY}, warmup_steps: 5}}
swarm: {{lease_ttl: {TTL}, settle: 1, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60, router_job: false}}
"""


def first(events, pred):
    return next((e for e in events if pred(e)), None)


def test_partitioned_island_trains_alone_and_wins_the_double_claim_after_heal(net, report, rng):
    with netlab() as lab:
        run_id = net.partition(CONFIG)
        p_node = lab.add("P")
        # P (in its namespace) starts the run and claims first; A and C join through it from the root namespace.
        p = net.start("P", "--plan", str(net.root / "plan"), "--host", p_node.ip, wrap=p_node.wrap)
        p_info = net.wait_ready(p)
        boot = maddr(p_info, p_node.ip)
        majority = {n: net.start(n, "--run", run_id, "--initial-peers", boot, "--host", lab.gateway) for n in "AC"}
        claims = net.wait_for(lambda ev: (lambda c: c if len(c) == 2 else None)(
            {e.shard: e.name for e in ev if e.kind is EventKind.CLAIM}), 120, "both shards claimed")
        shard = next(s for s, n in claims.items() if n == "P")
        for proc in majority.values():
            net.wait_ready(proc)
        b_name = next(n for n in majority if n not in claims.values())  # the idle one: it will double-claim

        # Cut when a checkpoint of P is mirrored on the majority side (so the takeover can resume from it).
        def mirrored_ckpt(ev):
            steps = [s for _, s in checkpoint_steps(ev, "P", shard)]
            return next((s for s in reversed(steps) if any(verified_copy(m.work, shard, s) for m in majority.values())),
                        None)

        net.wait_for(mirrored_ckpt, 90, "a mirrored checkpoint of P's shard")
        t_cut = time.time()
        lab.cut("P")
        step_at_cut = max(s for _, s in checkpoint_steps(net.events(), "P", shard))
        report.note(f"P ({p_node.ip}, the bootstrap peer) trains shard {shard}; {b_name} idles; "
                    f"cut at P's step {step_at_cut}")

        # Majority side: B (the idle island) claims the orphaned shard after the ttl and trains it (a double claim).
        claim_b = net.wait_for(lambda ev: first(ev, lambda e: e.kind is EventKind.CLAIM and e.shard == shard
                                                and e.name == b_name and e.t > t_cut), 3 * TTL,
                               f"{b_name} to claim P's shard during the partition")
        net.wait_for(lambda ev: first(ev, lambda e: e.kind is EventKind.CHECKPOINT and e.name == b_name
                                      and e.shard == shard and e.t > claim_b.t), 60,
                     f"{b_name} to checkpoint P's shard")
        time.sleep(rng.uniform(0, 2))  # seeded jitter of the partition's length
        # Meanwhile P trained alone: new checkpoints, and it never lost its lease.
        ev = net.events()
        alone = [s for t, s in checkpoint_steps(ev, "P", shard) if t > t_cut]
        assert alone and max(alone) > step_at_cut, "P stopped checkpointing while partitioned"
        assert not first(ev, lambda e: e.kind is EventKind.LEASE_LOST and e.name == "P"), "P lost its lease alone"
        t_heal = time.time()
        lab.heal("P")
        report.note(f"{b_name} claimed shard {shard} {claim_b.t - t_cut:.1f} s after the cut; healed after "
                    f"{t_heal - t_cut:.1f} s; P checkpointed {len(alone)} times alone (up to step {max(alone)})")

        # After the heal: B retreats (its keeper's renew sees P's older claim), P keeps the shard.
        lost = net.wait_for(lambda ev: first(ev, lambda e: e.kind is EventKind.LEASE_LOST and e.name == b_name
                                             and e.shard == shard), 60, f"{b_name} to retreat after the heal")
        assert lost.t >= t_heal
        via = maddr(majority["A" if b_name != "A" else "C"].announce(), lab.gateway)
        with Swarm(Identity.generate(), run_id, initial_peers=[via], host=lab.gateway, client_mode=True) as reader:
            deadline = time.time() + 30
            while True:
                claims_now = reader.claims(shard)
                live = {c.public_key for c in claims_now if c.live(dht_time())}
                ckpts = [r for r in reader.checkpoints(shard) if r.publisher == p_info["public_key"]]
                if live == {p_info["public_key"]} and ckpts and ckpts[0].step >= max(alone):
                    break
                assert time.time() < deadline, f"after heal: live claims {live}, P's records {ckpts}"
                time.sleep(0.5)
            owner = winner(claims_now, dht_time())
            assert owner is not None and owner.public_key == p_info["public_key"]
            report.note(f"after heal: {b_name} retreated {lost.t - t_heal:.1f} s after the heal; one live claim "
                        f"(P's); P's checkpoint record at step {ckpts[0].step} visible on the majority side")

            # Assembly uses P's checkpoints once P's newest step passes B's last one.
            b_last = max(s for _, s in checkpoint_steps(net.events(), b_name, shard))
            net.wait_for(lambda ev: any(s > b_last for _, s in checkpoint_steps(ev, "P", shard)), 90,
                         "P to pass B's last step")
            out = net.root / "bundle"
            assemble(reader, Plan.load(net.root / "plan"), out, min_experts=2, console=Console(file=io.StringIO()))
        expert = next(e for e in read_index(out)["experts"] if e["shard"] == shard)
        assert expert["publisher"] == p_info["public_key"], "assembly did not use P's checkpoint"
        assert expert["step"] > b_last
        ev = net.events()
        b_ckpts = checkpoint_steps(ev, b_name, shard)
        resume_b = first(ev, lambda e: e.kind in (EventKind.TRAIN, EventKind.RESUME) and e.name == b_name
                         and e.shard == shard and e.t >= claim_b.t)
        b_from = resume_b.step if resume_b else 0
        rejoined = [e for e in ev if e.kind is EventKind.REJOINED and e.t >= t_heal]
        report.add(partition_s=round(t_heal - t_cut, 1), ttl=TTL, p_alone_checkpoints=len(alone),
                   b_double_claim_checkpoints=len(b_ckpts), b_retreat_s=round(lost.t - t_heal, 1),
                   b_resumed_from=b_from, b_last_step=b_last, wasted_steps_by_b=b_last - b_from,
                   rejoin_events=len(rejoined), assembled_step=expert["step"], assembled_publisher="P")
        assert len(checkpoint_steps(ev, "P", shard)) > len(alone)
        for proc in (p, *majority.values()):
            assert proc.alive, island_log_tail(proc)
