"""Restarts on real boxes: a node keeps its address, and a whole swarm that comes back trains nothing again.

- A node's libp2p key lives in its work dir (WORK/p2p.key, mode 0600), so its peer id, and with a fixed
  `--dht-port` its whole multiaddr, is the same after a restart: the address handed to every other box (the
  bootstrap's, in particular) stays valid. Checked by restarting a node and joining a new one through the
  address it had before, and by `ddm-node status`, which lists that address.
- A whole-swarm restart (`docker compose down` / `up` with the volumes kept, a power cut): the DHT records died
  with the nodes, the state is in the work dirs. Every island re-announces what it holds before it claims
  anything; the first one back, alone, holds back the shards it has no state of (node/gate.py) until the others
  are back and announced them; nobody claims a shard whose final checkpoint it can see. So after a run trained
  to the end and every island restarted, no island claims, trains or resumes anything, the router included,
  and `assemble` builds the bundle from what they serve.
"""

from __future__ import annotations

import json
import socket
import stat
import time

import pytest
from live_swarm import net, newest_step, of, timeline, wait_until  # noqa: F401

from ddm_node.cli import main
from ddm_node.cli.localnet import all_done
from ddm_node.core.events import EventKind
from ddm_node.core.identity import Identity
from ddm_node.ensemble.bundle import read_index
from ddm_node.swarm.dht import Swarm

pytestmark = [pytest.mark.multiproc, pytest.mark.islands]

CONFIG = """
partition: {{experts: {k}}}
model: {{hidden: 32, depth: 2, heads: 2}}
train: {{steps: {steps}, batch_size: 32, checkpoint_every: {every}, warmup_steps: 5}}
router: {{steps: 30, batch_size: 32}}
swarm: {{lease_ttl: {ttl}, settle: 1, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60, replicas: 1,
        router_job: {router}}}
"""
WORK_KINDS = (EventKind.CLAIM, EventKind.TRAIN, EventKind.RESUME, EventKind.ROUTER, EventKind.DONE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_restarted_node_keeps_its_multiaddr_and_is_joined_through_it(net, tmp_path, capsys):  # noqa: F811
    run_id = net.partition(CONFIG.format(k=1, steps=40, every=20, ttl=6, router="false"))
    port = free_port()
    first = net.start("island1", "--plan", str(net.root / "plan"), "--dht-port", str(port))
    before = net.wait_ready(first)
    key = first.work / "p2p.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, oct(key.stat().st_mode)
    old = before["maddrs"][0]
    assert old == f"/ip4/127.0.0.1/tcp/{port}/p2p/{before['peer_id']}", before

    net.stop_all()
    again = net.start("island1", "--plan", str(net.root / "plan"), "--dht-port", str(port))
    after = net.wait_ready(again)
    assert (after["peer_id"], after["maddrs"]) == (before["peer_id"], before["maddrs"])
    assert after["pid"] != before["pid"]

    # a newcomer joins through the address from before the restart (and gets the plan through it)
    newcomer = net.start("island2", "--run", run_id, "--initial-peers", old)
    net.wait_ready(newcomer)
    # `status` lists the address, the same for anyone who asks later
    capsys.readouterr()
    assert main(["status", "--initial-peers", old, "--run", run_id, "--json"]) == 0
    peers = json.loads(capsys.readouterr().out)["peers"]
    assert [p["maddrs"][0] for p in peers if p["peer_id"] == before["peer_id"]] == [old], peers


@pytest.mark.slow
def test_a_whole_swarm_restart_trains_nothing_again(net, tmp_path):  # noqa: F811
    """Three islands train three shards and the router to the end (started together, so each trains about one
    shard), all stop, all start again: no claim, no training, no resume, no router; then assemble. On the restart
    island1 (a fixed DHT port, so a stable address) comes back first and alone, holding the state of some shards
    only: the case that used to retrain other islands' finished shards from step 0."""
    ttl = 30.0  # the default: the restart wait is one lease TTL (the others took up to 24 s to come back here)
    run_id = net.partition(CONFIG.format(k=3, steps=120, every=40, ttl=ttl, router="true"))
    port = free_port()
    with Swarm(Identity.generate(), run_id) as boot:  # phase 1 only: nothing of it survives into the restart
        first = boot.visible_maddrs()[0]
        procs = [net.start("island1", "--plan", str(net.root / "plan"), "--dht-port", str(port),
                           "--initial-peers", first)]
        procs += [net.start(f"island{i}", "--run", run_id, "--initial-peers", first) for i in (2, 3)]
        for p in procs:
            net.wait_ready(p, timeout=180)
        events = wait_until(net, all_done(3), 300, "three shards and the router done")
        time.sleep(2.0)  # the last checkpoints mirrored (replicas: 1), as in a run that went on a while
        codes = net.stop_all()
    assert set(codes.values()) == {0}, codes
    held = {s for s in range(3) if newest_step(procs[0].work, s) == 120}
    print(f"island1 trained {sorted(e.shard for e in of(events, EventKind.DONE, name='island1'))}, holds finals of "
          f"{sorted(held)}, router {'here' if (procs[0].work / 'router').is_dir() else 'elsewhere'}")
    assert held != {0, 1, 2} or not (procs[0].work / "router").is_dir(), "island1 holds everything: nothing to test"

    t_restart = time.time()
    bootstrap = net.start("island1", "--plan", str(net.root / "plan"), "--dht-port", str(port))
    maddr = net.wait_ready(bootstrap)["maddrs"][0]
    rest = [net.start(f"island{i}", "--run", run_id, "--initial-peers", maddr) for i in (2, 3)]
    for p in rest:
        net.wait_ready(p, timeout=180)
    # every island finds nothing left to do (it serves: no shard pending, the router done), so it never claims
    with Swarm(Identity.generate(), run_id, initial_peers=[maddr], client_mode=True) as reader:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and sorted(p.state for p in reader.peers()) != ["serving"] * 3:
            time.sleep(1.0)
        states = sorted(p.state for p in reader.peers())
    again = [(e.name, e.kind.value, e.shard, e.step) for e in timeline(net) if e.kind in WORK_KINDS and e.t > t_restart]
    assert again == [], f"work done again after the restart: {again}"
    assert states == ["serving"] * 3, states
    assert all(p.alive for p in [bootstrap, *rest]), "an island exited after the restart"

    out = tmp_path / "bundle"
    assert main(["assemble", "--initial-peers", maddr, "--run", run_id, "--out", str(out), "--min-experts", "3"]) == 0
    assert main(["verify", str(out)]) == 0
    index = read_index(out)
    assert [e["step"] for e in index["experts"]] == [120, 120, 120] and index["router"]["kind"] == "learned"
