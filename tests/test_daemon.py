"""Real islands: `ddm-node start` processes with real DHT peers and gRPC servers on 127.0.0.1.

Every island runs in its own process group; each test stops its islands in a finally, and the
session fixture in conftest.py fails the run if any daemon, DHT child or p2pd outlives the tests.
"""

from __future__ import annotations

import time

import pytest

from ddm_node.cli import main
from ddm_node.cli.localnet import LocalNet, all_done
from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.ensemble.bundle import read_index
from ddm_node.swarm.dht import Swarm, dht_time
from ddm_node.train import checkpoint as ckpt

pytestmark = [pytest.mark.multiproc, pytest.mark.islands]

BASE = """
partition: {{experts: {k}}}
model: {{hidden: 32, depth: 2, heads: 2}}
train: {{steps: {steps}, batch_size: 32, checkpoint_every: {every}, warmup_steps: 5}}
router: {{steps: 20, batch_size: 32}}
swarm: {{lease_ttl: {ttl}, settle: 1, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60}}
"""


@pytest.fixture
def net(tmp_path):
    n = LocalNet(tmp_path)
    try:
        yield n
    finally:
        n.stop_all()


def start_swarm(net: LocalNet, run_id: str, count: int, together: bool = False):
    """Island 1 from the plan file, the others join it by run id."""
    first = net.start("island1", "--plan", str(net.root / "plan"))
    maddr = net.wait_ready(first)["maddrs"][0]
    rest = [net.start(f"island{i}", "--run", run_id, "--initial-peers", maddr) for i in range(2, count + 1)]
    for p in rest:
        net.wait_ready(p)
    return [first, *rest], maddr


def flip_byte(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_three_islands_train_assemble_verify_and_survive_a_dead_and_a_lying_publisher(net, tmp_path, capsys,
                                                                                     caplog):
    run_id = net.partition(BASE.format(k=3, steps=60, every=20, ttl=6))
    islands, maddr = start_swarm(net, run_id, 3)
    ev = net.wait_for(all_done(3), 240, "3 shards and the router")
    done = {e.shard: e for e in ev if e.kind is EventKind.DONE}
    assert sorted(done) == [0, 1, 2] and all(e.step == 60 for e in done.values())

    assert main(["assemble", "--initial-peers", maddr, "--run", run_id, "--out", str(tmp_path / "b1"),
                 "--min-experts", "3"]) == 0
    assert main(["verify", str(tmp_path / "b1")]) == 0
    index = read_index(tmp_path / "b1")
    assert [e["step"] for e in index["experts"]] == [60, 60, 60] and index["router"]["kind"] == "learned"

    # verify names the first bad file of a bundle with one flipped byte
    flip_byte(tmp_path / "b1" / "expert_1" / "model.safetensors")
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "b1")]) != 0
    assert "expert_1/model.safetensors" in capsys.readouterr().err

    # Once the mirrors caught up, shard 0's publisher serves altered bytes under the registered hash (it is tried
    # first, as the manifest's publisher), then dies: assembly gets the shard from a mirror both times, verified.
    publisher = next(p for p in islands if p.name == done[0].name)
    net.wait_for(lambda _ev: mirrored(net, publisher.name, 0, 60), 60, "a mirror of shard 0 at step 60")
    flip_byte(ckpt.checkpoint_dir(publisher.work, 0, 60) / "expert" / "model.safetensors")
    caplog.clear()
    assert main(["assemble", "--initial-peers", maddr, "--run", run_id, "--out", str(tmp_path / "b2"),
                 "--min-experts", "3"]) == 0
    assert main(["verify", str(tmp_path / "b2")]) == 0
    assert "sha256 mismatch" in caplog.text, "the altered copy was not noticed"
    net.kill(publisher)
    assert main(["assemble", "--initial-peers", net.wait_ready(next(p for p in islands if p.alive))["maddrs"][0],
                 "--run", run_id, "--out", str(tmp_path / "b3"), "--min-experts", "3"]) == 0
    assert main(["verify", str(tmp_path / "b3")]) == 0
    assert [e["step"] for e in read_index(tmp_path / "b3")["experts"]] == [60, 60, 60]

    # SIGTERM: every remaining island exits 0.
    codes = net.stop_all()
    assert all(code == 0 for name, code in codes.items() if name != publisher.name), codes


def mirrored(net: LocalNet, publisher: str, shard: int, step: int) -> bool:
    """Some other island holds a verified copy of the shard at `step`."""
    for p in net.procs:
        if p.name == publisher:
            continue
        d = ckpt.checkpoint_dir(p.work, shard, step)
        if d.is_dir():
            try:
                ckpt.verify_checkpoint(d, require_signature=True)
                return True
            except Exception:
                pass
    return False


def test_claim_race_has_one_winner_per_shard(net):
    run_id = net.partition(BASE.format(k=2, steps=5000, every=50, ttl=8))  # nobody finishes during the test
    first = net.start("island1", "--plan", str(net.root / "plan"))
    maddr = net.wait_ready(first)["maddrs"][0]
    # the other three start together
    rest = [net.start(f"island{i}", "--run", run_id, "--initial-peers", maddr) for i in (2, 3, 4)]
    for p in rest:
        net.wait_ready(p)
    ev = net.wait_for(lambda ev: len({e.shard for e in ev if e.kind is EventKind.CLAIM}) == 2 and ev, 120,
                      "both shards claimed")
    time.sleep(4)  # > settle: any loser has retreated by now
    with Swarm(Identity.generate(), run_id, initial_peers=[maddr]) as reader:
        for shard in (0, 1):
            live = {c.public_key for c in reader.claims(shard) if c.live(dht_time())}
            assert len(live) == 1, f"shard {shard} has {len(live)} live claims"
    ev = net.events()
    for shard in (0, 1):
        owners = {e.name for e in ev if e.kind is EventKind.CLAIM and e.shard == shard}
        assert len(owners) == 1, f"shard {shard} claimed by {owners}"
    trainers = {e.name for e in ev if e.kind is EventKind.CLAIM}
    idle = [p for p in net.procs if p.name not in trainers]
    assert len(idle) == 2
    # Where the idle islands' mirror copies go (R per shard, on the rendezvous top R) is tests/test_placement.py.


@pytest.mark.slow  # ~45 s; the default suite's takeover, demo and short kill rounds cover a loss and its resume
def test_node_loss_waiting_island_reclaims_within_two_ttl_and_resumes_from_mirror(net):
    ttl, every = 6.0, 40
    run_id = net.partition(BASE.format(k=2, steps=600, every=every, ttl=ttl))
    islands, maddr = start_swarm(net, run_id, 3)
    # Wait for a trainer whose newest published checkpoint (>= 120) is already held by a mirror.
    def ready(ev):
        for e in reversed(ev):
            if e.kind is EventKind.CHECKPOINT and e.step >= 120:
                newest = max(x.step for x in ev if x.kind is EventKind.CHECKPOINT and x.name == e.name
                             and x.shard == e.shard)
                if mirrored(net, e.name, e.shard, newest):
                    return e.name, e.shard
        return None

    name, shard = net.wait_for(ready, 240, "a mirrored checkpoint at >= 120 steps")
    victim = next(p for p in islands if p.name == name)
    t_kill = time.time()
    net.kill(victim)
    published = sorted(e.step for e in net.events() if e.kind is EventKind.CHECKPOINT and e.name == name
                       and e.shard == shard)
    # The newest checkpoint another island held when the victim died: the takeover must resume from it. One more
    # may have been published between the check above and the kill (every 40 steps is ~0.5 s here) and never
    # fetched: at most that interval is lost, which is the bound.
    last = max((s for s in published if mirrored(net, name, shard, s)), default=0)
    takeover = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.CLAIM and e.shard == shard
                                             and e.name != name and e.t > t_kill), None), 4 * ttl,
                            "another island to claim the orphaned shard")
    assert takeover.t - t_kill <= 2 * ttl, f"reclaimed after {takeover.t - t_kill:.1f}s (ttl {ttl})"
    resume = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.RESUME and e.shard == shard
                                           and e.name == takeover.name and e.t >= takeover.t), None),
                          30, "the takeover to resume")
    assert resume.step >= last, f"resumed at {resume.step}, a mirror held {last}"
    assert published[-1] - resume.step <= every, f"resumed at {resume.step}, the victim had published {published}"
    net.wait_for(lambda ev: any(e.kind is EventKind.DONE and e.shard == shard for e in ev), 300, "the shard to finish")
    assert not victim.alive and victim.killed
