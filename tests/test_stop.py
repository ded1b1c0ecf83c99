"""Stopping a training island with SIGINT or SIGTERM (README / ARCHITECTURE: "the trainer stops after the
current step, writes and announces a checkpoint, releases the claim, serves until a peer holds that checkpoint;
then gRPC, DHT and p2pd shut down; exit 0").

Two islands, one shard (tests/live_swarm.py `training_pair`): the trainer is mid-interval between periodic
checkpoints, the waiter idles and mirrors. The trainer's daemon process gets the signal, or (as systemd's stop
and `kill -TERM -- -PGID` do) its whole process group, which its DHT child and p2pd must survive until the
daemon has published and released; then:
- it exits 0 within STOP_BOUND seconds (GROUP_BOUND for the group signal, the issue's bound), leaving no
  process behind: nothing in its process group, and none of the DHT child and p2pd it ran (which live in a
  group of their own);
- its last checkpoint is at the step it reached (past the newest periodic one), written after the signal,
  newest in its work dir, signed and verifying, and its state holds that step;
- that checkpoint was announced: a reader joining the DHT later finds the record, and it was handed over: the
  waiter, which claims the shard next, resumes from exactly that step (the stopping island serves it until a
  peer holds it);
- the claim was released: the waiter claims the shard within CLAIM_BOUND seconds of the signal, where
  waiting for the lease to expire would take at least 2/3 of its TTL (30 s).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import psutil
import pytest
from live_swarm import family, net, newest_step, of, signal_island, timeline, training_pair, wait_until  # noqa: F401

from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import read_manifest
from ddm_node.core.workdir import WorkDir
from ddm_node.swarm.dht import Swarm
from ddm_node.train import checkpoint as ckpt

pytestmark = [pytest.mark.multiproc, pytest.mark.islands]

STOP_BOUND = 45.0  # seconds from the signal to exit 0 (one training step, a checkpoint, release, hand-off, shutdown)
GROUP_BOUND = 15.0  # the same for a signal to the whole process group (measured 4-7 s on a loaded 2-core box)
CLAIM_BOUND = 15.0  # seconds from the signal to the waiter's claim; a lease left to expire takes >= 20 s


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True)],
                         ids=["SIGINT", "SIGTERM", "SIGTERM-to-group"])
def test_a_signal_stops_training_with_a_checkpoint_announced_and_the_claim_released(training_pair, sig,  # noqa: F811
                                                                                    group):
    pair = training_pair
    lnet, trainer, waiter = pair.net, pair.trainer, pair.waiter
    trainer_key = read_manifest(WorkDir(trainer.work).step(0, pair.last_periodic) / ckpt.EXPERT).publisher
    helpers = family(trainer.popen.pid)[1:]  # the DHT child and its p2pd
    assert len(helpers) >= 2, f"{trainer.name} runs no DHT child and p2pd: {helpers}"

    bound = GROUP_BOUND if group else STOP_BOUND
    stopped = signal_island(lnet, trainer, sig, bound, group=group)
    print(f"{trainer.name} exited {stopped.code} {stopped.seconds:.1f}s after the signal")  # -s shows it
    assert stopped.code == 0, f"{trainer.name} exit {stopped.code} after {stopped.seconds:.1f}s (bound {bound})"
    assert stopped.group_left == [], f"left running in {trainer.name}'s process group: {stopped.group_left}"
    assert not [p.pid for p in helpers if alive_after(p, 5.0)], f"{trainer.name}'s DHT child or p2pd outlived it"

    # The final checkpoint: written after the signal, past every periodic one, the newest on disk.
    ev = timeline(lnet)
    periodic = [e.step for e in of(ev, EventKind.CHECKPOINT, name=trainer.name, shard=0) if e.t < stopped.t_signal]
    after = of(ev, EventKind.CHECKPOINT, name=trainer.name, shard=0, after=stopped.t_signal)
    # One checkpoint after the signal; none when the signal landed just after a periodic one (the step reached
    # is then already on disk: seen once in a full run, signal 12 ms after step 400 was written).
    assert len(after) <= 1, f"expected at most one checkpoint after the signal, got {[e.step for e in after]}"
    stops = re.findall(r"stopping at step (\d+) on request", trainer.log.read_text(errors="replace"))
    assert stops, f"{trainer.name} never stopped its training on the signal"
    reached = int(stops[-1])  # the step training reached, from the trainer itself
    assert [e.step for e in after] == ([] if reached in periodic else [reached]), (
        f"stopped at step {reached}: checkpoints after the signal {[e.step for e in after]}, periodic {periodic}")
    assert reached >= max(periodic) >= pair.last_periodic, (reached, periodic)
    assert newest_step(trainer.work, 0) == reached
    expert, state = ckpt.verify_checkpoint(WorkDir(trainer.work).step(0, reached), require_signature=True)
    assert expert.step == state.step == state.extra["step"] == reached and expert.publisher == trainer_key
    assert not of(ev, EventKind.DONE, shard=0)

    # Released: the waiter claims the shard long before the trainer's lease could have expired.
    claim = wait_until(lnet, lambda ev: next(iter(of(ev, EventKind.CLAIM, name=waiter.name, shard=0)), None),
                       CLAIM_BOUND + 30, f"{waiter.name} to claim shard 0")
    assert claim.t - stopped.t_signal < CLAIM_BOUND, (
        f"{waiter.name} claimed shard 0 {claim.t - stopped.t_signal:.1f}s after the signal: the claim was not "
        f"released (lease ttl {pair.ttl:.0f}s)")

    # Announced: a reader joining the DHT now (the trainer is gone) finds the record of the step reached.
    maddr = lnet.wait_ready(waiter)["maddrs"][0]
    with Swarm(Identity.generate(), pair.run_id, initial_peers=[maddr]) as reader:
        records = [(r.publisher, r.step, r.final) for r in reader.checkpoints(0)]
    assert (trainer_key, reached, False) in records, records

    # Handed over: the takeover resumes from the trainer's work at exactly the step it reached.
    resume = wait_until(lnet, lambda ev: next(iter(of(ev, EventKind.RESUME, name=waiter.name, shard=0)), None), 30,
                        f"{waiter.name} to resume shard 0")
    assert resume.publisher == trainer_key[:12] and resume.step == reached, (
        f"{waiter.name} resumed at {resume.step} ({resume.source}), not at the stop checkpoint {reached}")
    assert [e.step for e in of(ev, EventKind.HANDOFF, name=trainer.name) if e.reason is None] == [reached]


def alive_after(proc: psutil.Process, grace: float) -> bool:
    """The process still runs (not a zombie) after up to `grace` seconds."""
    try:
        proc.wait(timeout=grace)
        return False
    except psutil.TimeoutExpired:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow  # ~35 s; the group signal above stays in the default suite
def test_sigterm_to_every_process_of_the_island_exits_at_once_with_the_checkpoint_on_disk(training_pair):  # noqa: F811
    """systemd's KillMode=control-group (docs/DEPLOY.md ships KillMode=mixed instead) signals every process of the
    unit at once: p2pd exits on SIGTERM whatever it inherits, so the DHT is gone before the daemon can announce.
    The daemon must notice instead of waiting out a 30 s timeout per DHT call (about 100 s in all before this
    was fixed): exit 0 within GROUP_BOUND seconds, the step reached written, signed and verifying, on disk, where
    the next start announces it."""
    pair = training_pair
    trainer = pair.trainer
    procs = family(trainer.popen.pid)
    t0 = time.monotonic()
    for p in procs:  # the daemon, its DHT child and p2pd, as a cgroup-wide kill does
        p.send_signal(signal.SIGTERM)
    try:
        code = trainer.popen.wait(timeout=GROUP_BOUND + 30)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - t0
    assert code == 0 and seconds < GROUP_BOUND, f"exit {code} after {seconds:.1f}s (bound {GROUP_BOUND})"
    assert not [p.pid for p in procs if alive_after(p, 5.0)]
    stops = re.findall(r"stopping at step (\d+) on request", trainer.log.read_text(errors="replace"))
    assert stops and newest_step(trainer.work, 0) == int(stops[-1]) > pair.last_periodic
    ckpt.verify_checkpoint(WorkDir(trainer.work).step(0, int(stops[-1])), require_signature=True)
