"""The restart and leave rules of an island, on fakes (no processes): node/gate.py, node/progress.py and
node/handoff.py. The live proofs are tests/test_restart.py and tests/test_stop.py.

- `ClaimGate`: an island returning to a run claims only work with visible state until the peers it saw up when
  it stopped are back (bounded; one lease TTL when it does not know them); a new one, or one that was alone,
  claims at once.
- `PeerMemory` and the keeper: the peers seen are written to WORK/peers.json and read back at the next start;
  a damaged file is ignored.
- `Progress.shard_done`: a final checkpoint announced as a replica counts (its trainer may still be down after a
  whole-swarm restart), if the holder's server confirms it and it is a copy of another's work (a node announces
  its own checkpoints as checkpoint records); a record alone does not.
- `Handoff.wait`: serves until another peer holds our newest checkpoint (confirmed), gives up when no live peer
  could take it, when the timeout passes or on a second signal, and never raises over a dead DHT.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddm_node.core.errors import DDMError
from ddm_node.core.events import EventKind, EventLog, read_events
from ddm_node.core.workdir import WorkDir
from ddm_node.exchange.done import DoneCheck
from ddm_node.node import handoff as handoff_mod
from ddm_node.node.gate import ClaimGate
from ddm_node.node.handoff import Handoff
from ddm_node.node.progress import Progress
from ddm_node.swarm.records import CheckpointRecord, PeerRecord, RecordKind, ReplicaRecord

ME, PEER, OTHER = "a" * 64, "b" * 64, "c" * 64
M1, M2, S1 = "1" * 64, "2" * 64, "5" * 64


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_returning_island_claims_only_visible_work_until_the_peers_it_saw_are_back():
    clock = Clock()
    up: set[str] = set()
    gate = ClaimGate(True, frozenset({PEER, OTHER}), lambda: up, max_wait=120.0, blind_wait=30.0, clock=clock)
    asked = []
    assert not gate.may_claim(lambda: asked.append(1) or False)  # nobody holds it: wait
    assert gate.may_claim(lambda: True)  # someone holds state: claim (and resume from it) now
    up.add(PEER)
    clock.t += 60.0
    assert not gate.open and not gate.may_claim(lambda: False)  # OTHER is not back yet
    up.add(OTHER)
    assert gate.open and gate.may_claim(lambda: pytest.fail("not asked once the gate is open"))
    up.clear()
    assert gate.open  # once open, it stays open
    assert asked == [1]


def test_the_restart_wait_is_bounded_and_skipped_when_nobody_was_there():
    clock = Clock()
    never = ClaimGate(True, frozenset({PEER}), set, max_wait=120.0, blind_wait=30.0, clock=clock)
    blind = ClaimGate(True, None, set, max_wait=120.0, blind_wait=30.0, clock=clock)  # no peers file: one TTL
    alone = ClaimGate(True, frozenset(), lambda: pytest.fail("nobody to wait for"), 120.0, 30.0, clock=clock)
    fresh = ClaimGate(False, frozenset({PEER}), lambda: pytest.fail("a new island waits for nobody"), 120.0, 30.0,
                      clock=clock)
    assert alone.open and fresh.open and fresh.may_claim(lambda: False)
    assert not never.open and not blind.open
    clock.t += 30.0
    assert blind.open and not never.open
    clock.t += 90.0
    assert never.open


class FakeSwarm:
    def __init__(self):
        self.ckpts: dict[int, list] = {}
        self.reps: dict[int, list] = {}
        self.peer_records: list[PeerRecord] = []
        self.dead = False
        self.announced = []

    def _alive(self):
        if self.dead:
            raise DDMError("the swarm's DHT process died")

    def checkpoints(self, shard):
        self._alive()
        return list(self.ckpts.get(shard, []))

    def replicas(self, shard):
        self._alive()
        return list(self.reps.get(shard, []))

    def peers(self):
        self._alive()
        return list(self.peer_records)

    def announce(self, record, ttl=0.0):
        self._alive()
        self.announced.append(record)
        return True


class FakeChecks(DoneCheck):
    """The real choice of which records count (`DoneCheck.shard`); what a holder's server would confirm, and the
    download-and-load of a final expert, faked: true for the manifests in `good`."""

    def __init__(self, good: set[str]):
        super().__init__(SimpleNamespace(steps=100), None, Path("/nonexistent"))
        self.good, self.asked = good, []

    def announced(self, manifest_id, holder, expected):
        self.asked.append((manifest_id, holder, expected.step))
        return manifest_id in self.good

    def _final(self, shard, step, expert_id, state_id, holders):
        if expert_id not in self.good:
            raise DDMError(f"{expert_id[:8]} does not verify")


def peer(key: str, state: str) -> PeerRecord:
    return PeerRecord("12D3KooWQkeQTmYJoQ1PLcUrL1VJuRM7WSSNFZH9CfgGARWC3sBx", key, "10.0.0.9:50051", (), "0", 0.0,
                      state, -1)


def test_a_replica_of_a_final_checkpoint_makes_the_shard_done(tmp_path):
    plan = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(steps=100)), shards=[0, 1], run_id="r" * 64)
    swarm = FakeSwarm()
    checks = FakeChecks({M1})
    progress = Progress(plan, WorkDir(tmp_path), swarm, checks, router_job=False)
    assert progress.pending() == [0, 1] and not progress.has_state(0)
    swarm.reps[0] = [ReplicaRecord(0, 100, M2, S1, OTHER, PEER, "10.0.0.9:50051"),  # not confirmed by its holder
                     ReplicaRecord(0, 100, M1, S1, PEER, PEER, "10.0.0.9:50051")]  # a "copy" of its own: malformed
    assert not progress.shard_done(0) and progress.has_state(0)
    swarm.reps[0].append(ReplicaRecord(0, 100, M1, S1, OTHER, PEER, "10.0.0.9:50051"))
    swarm.reps[1] = [ReplicaRecord(1, 99, M1, S1, OTHER, PEER, "10.0.0.9:50051")]  # not final
    assert progress.pending() == [1]


@pytest.fixture
def fast_poll(monkeypatch):
    monkeypatch.setattr(handoff_mod, "POLL", 0.02)


STOP_CHECKPOINT = CheckpointRecord(0, 333, M1, S1, ME, "10.0.0.5:50051", False)  # ours, announced at the stop


def handoff(tmp_path, swarm, checks, ours=(STOP_CHECKPOINT,)):
    announcer = SimpleNamespace(current=lambda kind, shard: next(
        (r for r in ours if kind is RecordKind.CKPT and r.shard == shard), None))
    left = []
    h = Handoff(swarm, announcer, checks, ME, "r" * 64, 2, EventLog(tmp_path / "events.jsonl", "me"),
                lambda: left.append(1))
    return h, left


def test_handoff_waits_until_a_peer_holds_our_stop_checkpoint(tmp_path, fast_poll):
    swarm = FakeSwarm()
    swarm.peer_records = [peer(PEER, "waiting"), peer(OTHER, "leaving")]
    h, left = handoff(tmp_path, swarm, FakeChecks({M1}))

    def mirror_later():
        time.sleep(0.3)
        swarm.reps[0] = [ReplicaRecord(0, 333, M1, S1, ME, PEER, "10.0.0.9:50051")]

    threading.Thread(target=mirror_later).start()
    t0 = time.monotonic()
    assert h.wait(timeout=10.0)
    assert 0.25 < time.monotonic() - t0 < 5.0 and left == [1]
    assert [(e.kind, e.shard, e.step, e.reason) for e in read_events(tmp_path / "events.jsonl")] == [
        (EventKind.HANDOFF, 0, 333, None)]


def test_handoff_counts_only_confirmed_copies_and_newer_checkpoints_of_others(tmp_path, fast_poll):
    swarm = FakeSwarm()
    swarm.peer_records = [peer(PEER, "idle")]
    swarm.reps[0] = [ReplicaRecord(0, 333, M2, S1, ME, PEER, "10.0.0.9:50051"),  # another manifest, same step
                     ReplicaRecord(0, 333, M1, S1, ME, ME, "10.0.0.5:50051")]  # our own copy
    h, _ = handoff(tmp_path, swarm, FakeChecks({M1, M2}))
    assert not h.wait(timeout=0.3)
    swarm.ckpts[0] = [CheckpointRecord(0, 400, M2, S1, PEER, "10.0.0.9:50051", False)]  # the taker trained on
    assert h.wait(timeout=0.3)
    swarm.ckpts[0] = [CheckpointRecord(0, 400, "9" * 64, S1, PEER, "10.0.0.9:50051", False)]  # a lie
    assert not h.wait(timeout=0.3)


def test_handoff_gives_up_without_takers_on_a_second_signal_and_over_a_dead_dht(tmp_path, fast_poll):
    swarm = FakeSwarm()
    swarm.peer_records = [peer(PEER, "leaving"), peer(OTHER, "disk_full"), peer(ME, "leaving")]
    h, _ = handoff(tmp_path, swarm, FakeChecks(set()))
    t0 = time.monotonic()
    assert not h.wait(timeout=30.0) and time.monotonic() - t0 < 2.0  # a whole-swarm stop: nobody waits
    swarm.peer_records = [peer(PEER, "serving")]
    now = threading.Event()
    now.set()
    t0 = time.monotonic()
    assert not h.wait(timeout=30.0, abort=now) and time.monotonic() - t0 < 2.0
    swarm.dead = True
    assert not h.wait(timeout=30.0)
    reasons = [e.reason for e in read_events(tmp_path / "events.jsonl")]
    assert reasons == ["no live peer could take it", "asked to leave at once"], reasons
    nothing, left = handoff(tmp_path, swarm, FakeChecks(set()), ours=())
    assert nothing.wait(timeout=30.0)  # nothing of ours announced: nothing to hand over
    # but the leaving heartbeat goes out all the same: in a whole-swarm stop the trainers handing over must not
    # wait for idle islands that already left (they waited out the heartbeat TTL, 10 s, before this)
    assert left == [1]


def test_the_peers_seen_are_remembered_for_the_next_start(tmp_path):
    from ddm_node.node.lease import LeaseKeeper, Timing
    from ddm_node.node.peer_memory import PeerMemory, Seen

    memory = PeerMemory(tmp_path / "peers.json")
    assert not memory.loaded and memory.alive_at_exit() == set()
    swarm = FakeSwarm()
    swarm.peer_records = [peer(PEER, "training"), peer(ME, "training")]
    cfg = SimpleNamespace(lease_ttl=30.0, heartbeat=5.0, announce_ttl=120.0)
    keeper = LeaseKeeper(swarm, None, None, Timing(cfg), None, None, ME, None, ["/ip4/1.2.3.4/tcp/1/p2p/x"], memory)
    keeper._known_maddrs()
    again = PeerMemory(tmp_path / "peers.json")
    assert again.loaded and again.alive_at_exit() == {PEER}  # not ourselves
    # a peer last seen long before the last save was not up when we stopped
    again.save({PEER: Seen(time.time(), ()), OTHER: Seen(time.time() - 3600, ())})
    assert PeerMemory(tmp_path / "peers.json").alive_at_exit() == {PEER}
    (tmp_path / "peers.json").write_text('{"saved_at": "yesterday", "peers": []}')
    broken = PeerMemory(tmp_path / "peers.json")
    assert not broken.loaded and broken.alive_at_exit() == set()
