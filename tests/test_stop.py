"""Stopping a training island with SIGINT or SIGTERM (README / ARCHITECTURE: "the trainer stops after the
current step, writes and announces a checkpoint, releases the claim; then gRPC, DHT and p2pd shut down;
exit 0").

Two islands, one shard (tests/live_swarm.py `training_pair`): the trainer is mid-interval between periodic
checkpoints, the waiter idles and mirrors. The trainer's daemon process gets the signal; then:
- it exits 0 within STOP_BOUND seconds, leaving no DHT child or p2pd in its process group;
- its last checkpoint is at the step it reached (past the newest periodic one), written after the signal,
  newest in its work dir, signed and verifying, and its state holds that step;
- that checkpoint was announced: a reader joining the DHT later finds the record; the waiter, which
  claims the shard next, resumes from the trainer's work: from exactly that step, or (a known gap, reported
  as xfail) from the periodic checkpoint it had mirrored, since the stopping island stops serving its final
  checkpoint about 0.1 s after announcing it;
- the claim was released: the waiter claims the shard within CLAIM_BOUND seconds of the signal, where
  waiting for the lease to expire would take at least 2/3 of its TTL (30 s).
"""

from __future__ import annotations

import re
import signal

import pytest
from live_swarm import net, newest_step, of, signal_island, timeline, training_pair, wait_until  # noqa: F401

from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import read_manifest
from ddm_node.core.workdir import WorkDir
from ddm_node.swarm.dht import Swarm
from ddm_node.train import checkpoint as ckpt

pytestmark = pytest.mark.multiproc

STOP_BOUND = 45.0  # seconds from the signal to exit 0 (one training step, a checkpoint, release, shutdown)
CLAIM_BOUND = 15.0  # seconds from the signal to the waiter's claim; a lease left to expire takes >= 20 s


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_training_with_a_checkpoint_announced_and_the_claim_released(training_pair, sig):  # noqa: F811
    pair = training_pair
    lnet, trainer, waiter = pair.net, pair.trainer, pair.waiter
    trainer_key = read_manifest(WorkDir(trainer.work).step(0, pair.last_periodic) / ckpt.EXPERT).publisher

    stopped = signal_island(lnet, trainer, sig, STOP_BOUND)
    assert stopped.code == 0, f"{trainer.name} exit {stopped.code} after {stopped.seconds:.1f}s (bound {STOP_BOUND})"
    assert stopped.group_left == [], f"left running in {trainer.name}'s process group: {stopped.group_left}"

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
    assert [e.step for e in after] == ([] if reached in periodic else [reached]), (reached, periodic, after)
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

    # The takeover resumes from the trainer's work, at worst from the periodic checkpoint it had mirrored.
    resume = wait_until(lnet, lambda ev: next(iter(of(ev, EventKind.RESUME, name=waiter.name, shard=0)), None), 30,
                        f"{waiter.name} to resume shard 0")
    assert resume.publisher == trainer_key[:12] and pair.last_periodic <= resume.step <= reached, resume
    if resume.step != reached:
        pytest.xfail(f"known gap: the stop checkpoint (step {reached}) is announced but the island stops serving "
                     f"it within ~0.1 s, before any mirror can fetch it; {waiter.name} resumed at {resume.step} "
                     f"({resume.source}), losing {reached - resume.step} steps")
