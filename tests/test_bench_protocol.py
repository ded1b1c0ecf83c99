"""`python -m bench.scale --protocol --quick`: simulated islands on shared DHT peers claim every shard once, mirror
each shard R times as the placement rule says, and a client assembles every expert; the section and its growth
exponents are written. Also the pieces: the exponent fit, and a DHT peer that signs for several island keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.common import read_section  # noqa: E402
from bench.protocol.report import NAME, exponent  # noqa: E402


def test_exponent_is_the_log_log_slope():
    assert exponent([8, 32, 128], [1.0, 4.0, 16.0]) == pytest.approx(1.0)
    assert exponent([8, 32, 128], [5.0, 5.0, 5.0]) == pytest.approx(0.0)
    assert exponent([8, 32], [1.0, 8.0]) == pytest.approx(1.5)
    assert exponent([8], [1.0]) is None and exponent([8, 32], [None, 2.0]) is None


@pytest.mark.multiproc
def test_shared_dht_peer_signs_each_islands_records_with_its_own_key():
    """Two islands on one DHT peer: each record is owned and signed by its island's key, readers see both."""
    import secrets

    from bench.protocol.shared import IslandSwarm, SharedKeysValidator
    from ddm_node.core.identity import Identity
    from ddm_node.swarm.dht import Swarm
    from ddm_node.swarm.records import PeerRecord

    ids = [Identity.generate(), Identity.generate()]
    run_id = secrets.token_hex(32)
    host = Swarm(ids[0], run_id, validator=SharedKeysValidator(ids))
    try:
        views = [IslandSwarm(host, i) for i in ids]
        for v in views:
            assert v.announce(PeerRecord(v.peer_id, v.public_key, "127.0.0.1:1", (), "v", v.now(), "idle", -1))
        assert sorted(p.public_key for p in views[0].peers()) == sorted(i.public_hex for i in ids)
        stranger = IslandSwarm(host, Identity.generate())  # a key the peer does not sign for: refused
        assert not stranger.announce(PeerRecord(stranger.peer_id, stranger.public_key, "127.0.0.1:1", (), "v",
                                                stranger.now(), "idle", -1))
        assert views[0].traffic.snapshot()["peers"].puts == 1 and views[0].traffic.snapshot()["peers"].gets == 1
    finally:
        host.shutdown()


@pytest.mark.multiproc
@pytest.mark.slow  # about 45 s of simulated islands at full CPU: beside the island tests it would load their bounds
def test_protocol_quick_run(tmp_path):
    from tests.test_bench import run_script

    doc, out = tmp_path / "BENCHMARKS.md", tmp_path / "figures.json"
    lines = run_script("bench.scale", "--protocol", "--quick", "--doc", str(doc), "--json", str(out), timeout=150)
    assert lines[-1].startswith("protocol claim latency growth exponent ratio: ")
    figures = json.loads(out.read_text())
    assert [s["n"] for s in figures["sizes"]] == [4, 8]
    for s in figures["sizes"]:
        n = s["n"]
        assert not s["error"], s
        assert s["unclaimed"] == 0 and s["double_held"] == 0 and s["claimed"] == n  # each shard won by one island
        assert s["copies"] == [2] * n, s  # R = 2 current mirror copies of every shard
        assert s["placement_exact"] == n  # exactly the islands the rendezvous rule names
        assert sum(s["held"]) == 2 * n
        assert s["peers_records"] == n  # one heartbeat record per island
        assert s["experts"] == n and s["manifest_fetches"] == 2 * n  # an expert and its statistics per shard
        assert 5 < s["heartbeats_per_min"] < 20  # every 5 s of product time, within the window's edges
    exps = figures["exponents"]
    assert exps["peers-key bytes (one read)"] == pytest.approx(1.0, abs=0.1)
    assert exps["manifest fetches per assembly"] == pytest.approx(1.0, abs=0.01)
    section = read_section(doc, NAME)
    assert section is not None and "Growth exponents" in section and "| 8 | 2 |" in section
