"""Peer records cannot send a node to dial addresses outside the swarm.

A record's owner can write any address into it, and every reader dials what records say: the plan holders, the
checkpoint, replica, stats and router holders (mirror, resume, done checks, assembly) and, after a partition, the
multiaddrs of peer records (rejoin). Here E, a peer with a valid key, points all of them at a "victim" service
on 127.0.0.2 (a loopback address no swarm peer uses), and stores peer records whose multiaddrs name other peers
or that are malformed. A reader that does everything an island and `assemble` do opens no connection to the
victim, and the malformed records are refused by the validators of every peer. Before the fix the plan fetch,
the fetches and the done check all dialed the victim, and rejoin dialed it through libp2p.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import threading

import multihash
import pytest
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.errors import DDMError
from ddm_node.train import checkpoint as ckpt

from .hostile_world import TTL, has, messages, open_world, train_world


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_world(tmp_path_factory.mktemp("dial"))


@pytest.fixture
def world(trained, tmp_path):
    with open_world(trained, tmp_path) as w:
        yield w


class Victim:
    """A TCP service on 127.0.0.2 that counts the connections it is sent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.2", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


def _ghost_peer_id() -> str:
    """A well-formed libp2p peer id nobody holds."""
    return PeerID(multihash.encode(hashlib.sha256(b"ghost").digest(), multihash.coerce_code("sha2-256"))).to_base58()


def test_addresses_in_records_must_be_dialable_forms():
    from ddm_node.swarm.records import CheckpointRecord, PeerRecord

    peer = "12D3KooWHPmjMnsMBwLTJvWNnh7qgUvkjVeHuGniGo9tQ1ygBwoM"
    good = CheckpointRecord(0, 1, "ab" * 32, "cd" * 32, "ef" * 32, "island-1:50051", False)
    for grpc in ("island-1:50051", "10.0.0.5:1", "[::1]:50051", "a.b-c.example:65535"):
        CheckpointRecord.from_value({**good.to_value(), "grpc": grpc})
    for grpc in ("0.0.0.0:50051", "[::]:1", "224.0.0.1:80", "255.255.255.255:1", "999.1.1.1:80", "-x:1", "a..b:1",
                 "host:0", "host:65536", "x" * 64 + ":1", "[zz]:1", "::1:80", "h:1/p"):
        with pytest.raises(DDMError, match="grpc is not host:port of a peer"):
            CheckpointRecord.from_value({**good.to_value(), "grpc": grpc})
    base = PeerRecord(peer, "ab" * 32, "", (f"/ip4/127.0.0.1/tcp/1/p2p/{peer}", f"/dns4/island-1/tcp/9/p2p/{peer}"),
                      "v", 1.0, "idle", -1)
    assert PeerRecord.from_value(base.to_value()) == base
    for maddr, why in ((f"/ip4/127.0.0.2/tcp/1/p2p/{_ghost_peer_id()}", "names another peer"),
                       (f"/ip4/not-an-ip/tcp/1/p2p/{peer}", "is not an IPv4 address"),
                       (f"/ip4/0.0.0.0/tcp/1/p2p/{peer}", "not an address a peer listens at"),
                       (f"/ip4/127.0.0.1/tcp/0/p2p/{peer}", "no valid TCP port"),
                       ("/ip4/127.0.0.1/tcp/1", "is not /<ip4|ip6|dns>/<host>/tcp/<port>/p2p/<peer id>"),
                       (f"/unix/x/tcp/1/p2p/{peer}", "is not /<ip4|ip6|dns>")):
        with pytest.raises(DDMError, match=re.escape(why)):
            PeerRecord.from_value({**base.to_value(), "maddrs": [maddr]})


@pytest.mark.multiproc
def test_records_cannot_send_a_node_to_dial_outside_the_swarm(world, tmp_path, capsys, caplog):
    from ddm_node.cli import main
    from ddm_node.core.workdir import WorkDir
    from ddm_node.exchange.candidates import checkpoint_candidates
    from ddm_node.exchange.done import DoneCheck
    from ddm_node.exchange.fetch import fetch_checkpoint
    from ddm_node.exchange.peers import fetch_plan, join_swarm
    from ddm_node.node.progress import Progress
    from ddm_node.swarm.records import (
        CheckpointRecord,
        PeerRecord,
        PlanRecord,
        ReplicaRecord,
        RouterRecord,
        StatsRecord,
    )
    from ddm_node.train.limits import ArtifactRules

    from .evil_peer import seal_copy

    w, e = world, world.evil
    victim = Victim()
    try:
        there = f"127.0.0.2:{victim.port}"
        # E's own genuine-looking artifacts (H's step 4 re-sealed by E at steps 5 and 6), served by E, announced
        # at the victim's address; and everything else a reader dials, pointed there too
        signed = {}
        for step in (5, 6):
            for part in (ckpt.EXPERT, ckpt.STATE):
                src = ckpt.checkpoint_dir(w.work, 0, 4) / part
                d = tmp_path / f"E{step}" / part
                m = seal_copy(src, d, e.identity, step=step, extra={"step": step})
                e.servicer.hold(d)
                signed[(step, part)] = m.id
        records = [PlanRecord(w.run_id, there),
                   CheckpointRecord(0, 5, signed[(5, ckpt.EXPERT)], signed[(5, ckpt.STATE)], e.key, there, False),
                   CheckpointRecord(1, 6, signed[(6, ckpt.EXPERT)], signed[(6, ckpt.STATE)], e.key, there, True),
                   ReplicaRecord(1, 5, *w.ids[(1, 4)], w.honest.public_hex, e.key, there),
                   StatsRecord(0, "ab" * 32, there), RouterRecord("cd" * 32, 2, there, e.key)]
        for r in records:
            assert e.swarm.announce(r, ttl=TTL), r
        bad_stats = StatsRecord(1, "ab" * 32, "0.0.0.0:1").to_value()
        assert not e.store_owned("stats", 1, bad_stats, ttl=60)  # malformed: refused by every validator
        own = f"/ip4/127.0.0.2/tcp/{victim.port}/p2p/{e.swarm.peer_id}"  # well-formed, E's own id, not a swarm host
        assert e.swarm.announce(PeerRecord(e.swarm.peer_id, e.key, e.address, (own,), "v", e.swarm.now(), "idle", -1),
                                ttl=60)

        caplog.set_level(logging.INFO, logger="ddm_node")
        reader = join_swarm(w.maddrs, w.run_id)
        try:
            plan = fetch_plan(reader, w.run_id, timeout=30)  # from H: E's plan record is read first
            assert plan.run_id == w.run_id
            rules = ArtifactRules.for_plan(plan)
            for shard in (0, 1):  # the mirror's and resume's fetch: H's step 4
                for c in checkpoint_candidates(reader.checkpoints(shard), reader.replicas(shard)):
                    got = fetch_checkpoint(tmp_path / "r", shard, c, rules, None,
                                           [(r.manifest, r.grpc) for r in reader.stats(shard)])
                    assert c.step == 4 and got.name == "step_00000004"
                    break
            work = WorkDir(tmp_path / "r")
            progress = Progress(plan, work, reader, DoneCheck(rules, None, work.root), router_job=True)
            assert not progress.shard_done(1) and not progress.router_done()
            assert [p.maddrs for p in reader.peers() if p.public_key == e.key] == [()]  # the victim's is dropped
            # a peer record naming another peer's id at the victim (rejoin would dial it: that id is in no routing
            # table) replaces E's; every validator refuses it
            ghost = f"/ip4/127.0.0.2/tcp/{victim.port}/p2p/{_ghost_peer_id()}"
            forged = PeerRecord(e.swarm.peer_id, e.key, e.address, (ghost,), "v", e.swarm.now(), "idle", -1)
            assert not e.store_owned("peers", None, forged.to_value(), ttl=TTL)
            rejoin = reader.rejoin([m for p in reader.peers() for m in p.maddrs])  # what the lease keeper does
            if rejoin is not None:
                rejoin.result(timeout=60)
        finally:
            reader.shutdown()
        out = tmp_path / "bundle"
        assert main(["assemble", "--initial-peers", *w.maddrs, "--run", w.run_id, "--out", str(out),
                     "--min-experts", "2", "--wait", "0"]) == 0, capsys.readouterr().err
        assert victim.accepted == 0, f"the victim was dialed {victim.accepted} times"
    finally:
        victim.close()
    assert has(messages(caplog), "not dialing " + there, e.key[:12])
