"""Addresses and the libp2p key, without a network: swarm/own_addresses.py and swarm/p2p_identity.py.

- `check_peer_maddr` accepts the peer multiaddrs hivemind dials and explains every other form in one line,
  showing the expected form (and, for a bare host:port, the multiaddr to write instead).
- `announce_maddrs` / `IslandOptions.dht_announce` / `grpc_announce` build what a node behind a port mapping
  announces.
- `reachability` judges the announced addresses against the peers we joined through, then dials them.
- The libp2p key file: made once (mode 0600), the same peer id after, p2pd's format (an Ed25519 key: 12D3KooW
  ids); hivemind's own RSA key files are read too; a corrupt file is a one-line error.
"""

from __future__ import annotations

import socket
import stat

import pytest

from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.node.options import IslandOptions
from ddm_node.swarm.own_addresses import EXPECTED, Scope, announce_maddrs, check_peer_maddr, reachability, scope
from ddm_node.swarm.p2p_identity import ensure_p2p_identity, peer_id_of

PEER = "12D3KooWQkeQTmYJoQ1PLcUrL1VJuRM7WSSNFZH9CfgGARWC3sBx"
RSA_PEER = "QmPnKSXXbZz1R8mCTaLBRUJ8Thw3dU8qgPBx7jEkg4XNWP"


@pytest.mark.parametrize("maddr", [f"/ip4/1.2.3.4/tcp/31337/p2p/{PEER}", f"/ip6/::1/tcp/1/p2p/{PEER}",
                                   f"/dns4/bootstrap/tcp/31337/p2p/{PEER}", f"/dns/gpu-3.example.org/tcp/40001/p2p/{PEER}",
                                   f"/ip4/10.0.0.5/tcp/65535/p2p/{RSA_PEER}"])
def test_peer_multiaddrs_hivemind_dials_are_accepted(maddr):
    assert check_peer_maddr(maddr) == maddr


@pytest.mark.parametrize("text,needle", [
    ("1.2.3.4:31337", "write it as /ip4/1.2.3.4/tcp/31337/p2p/PEER_ID"),
    ("bootstrap:31337", "write it as /dns4/bootstrap/tcp/31337/p2p/PEER_ID"),
    ("[::1]:31337", "write it as /ip6/::1/tcp/31337/p2p/PEER_ID"),
    ("/ip4/1.2.3.4/tcp/31337", "it lacks the peer id"),
    (f"/ip4/1.2.3.4/udp/31337/p2p/{PEER}", f"expected the form {EXPECTED}"),
    (f"/ip4/1.2.3.999/tcp/31337/p2p/{PEER}", "'1.2.3.999' is not an IP address"),
    (f"/ip6/1.2.3.4/tcp/31337/p2p/{PEER}", "1.2.3.4 is not an IPv6 address (use /ip4/)"),
    (f"/ip4/1.2.3.4/tcp/70000/p2p/{PEER}", "port 70000 is out of range"),
    ("/ip4/1.2.3.4/tcp/31337/p2p/not-an-id", "is not a peer multiaddr"),
    ("", f"expected the form {EXPECTED}"),
])
def test_bad_peer_addresses_get_one_line_with_the_expected_form(text, needle):
    with pytest.raises(DDMError) as err:
        check_peer_maddr(text, "--initial-peers")
    msg = str(err.value)
    assert msg.startswith("--initial-peers: ") and needle in msg and "\n" not in msg, msg
    assert EXPECTED in msg or "(use /ip4/)" in msg, msg


def test_announced_addresses_follow_host_and_port_mappings():
    assert announce_maddrs(None, 31337) is None
    assert announce_maddrs("203.0.113.7", 40001) == ["/ip4/203.0.113.7/tcp/40001"]
    assert announce_maddrs("gpu-3.example.org", 40001) == ["/dns4/gpu-3.example.org/tcp/40001"]
    with pytest.raises(DDMError, match="fixed DHT port"):
        announce_maddrs("203.0.113.7", 0)
    base = dict(identity=Identity.generate(), work_dir="w", host="0.0.0.0", dht_port=31337, grpc_port=50051)
    plain = IslandOptions(**{**base, "host": "10.0.0.5"})
    assert plain.dht_announce() is None and plain.grpc_announce("10.0.0.5:50051") == "10.0.0.5:50051"
    mapped = IslandOptions(**base, announce_host="203.0.113.7", announce_port=40001, announce_grpc_port=40002)
    assert mapped.dht_announce() == ["/ip4/203.0.113.7/tcp/40001"]
    assert mapped.grpc_announce("0.0.0.0:50051") == "203.0.113.7:40002"
    same_ports = IslandOptions(**base, announce_host="203.0.113.7")
    assert same_ports.dht_announce() == ["/ip4/203.0.113.7/tcp/31337"]
    assert same_ports.grpc_announce("0.0.0.0:50051") == "203.0.113.7:50051"


def test_address_scopes():
    assert [scope(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.1.2.3", "192.168.0.9", "172.29.0.4",
                               "100.101.102.103", "fd00::1", "8.8.8.8", "2001:4860::8888", "bootstrap")] == [
        Scope.LOOPBACK, Scope.LOOPBACK, Scope.LOOPBACK, Scope.LOOPBACK, Scope.PRIVATE, Scope.PRIVATE, Scope.PRIVATE,
        Scope.PRIVATE, Scope.PRIVATE, Scope.PUBLIC, Scope.PUBLIC, Scope.NAME]


def test_reachability_verdicts():
    answers = lambda h, p: True  # noqa: E731
    dht = [f"/ip4/10.0.0.5/tcp/31337/p2p/{PEER}"]
    # private addresses, peers on the same private network: fine, if the ports are open
    ok = reachability(dht, "10.0.0.5:50051", [f"/ip4/10.0.0.9/tcp/31337/p2p/{PEER}"], answers)
    assert ok.ok and "inbound TCP 31337 and 50051" in ok.line, ok
    # the same addresses, a peer on the internet: it cannot dial them; say what to set and open
    far = reachability(dht, "10.0.0.5:50051", [f"/ip4/8.8.4.4/tcp/31337/p2p/{PEER}"], answers)
    assert not far.ok and "peers on the internet cannot dial" in far.line and "--announce-host" in far.line, far
    # loopback announced, peers elsewhere
    lo = reachability([f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER}"], "127.0.0.1:50051",
                      [f"/dns4/bootstrap/tcp/31337/p2p/{PEER}"], answers)
    assert not lo.ok and "only loopback addresses" in lo.line, lo
    # loopback everywhere (one machine): fine
    assert reachability([f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER}"], "127.0.0.1:50051", [], answers).ok
    # nothing answers where we said: name the address and the ports
    dead = reachability(dht, "10.0.0.5:50051", [], lambda h, p: p != 50051)
    assert not dead.ok and "nothing answers at 10.0.0.5:50051" in dead.line, dead


def test_reachability_dials_for_real():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            shut = closed.getsockname()[1]
        dht = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER}"]
        assert reachability(dht, f"127.0.0.1:{port}", []).ok
        verdict = reachability(dht, f"127.0.0.1:{shut}", [])
        assert not verdict.ok and f"127.0.0.1:{shut}" in verdict.line


def test_the_libp2p_key_is_made_once_private_and_kept(tmp_path):
    key = tmp_path / "work" / "p2p.key"
    first = ensure_p2p_identity(key)
    assert first.startswith("12D3KooW") and stat.S_IMODE(key.stat().st_mode) == 0o600
    raw = key.read_bytes()
    assert ensure_p2p_identity(key) == first == peer_id_of(key) and key.read_bytes() == raw
    assert ensure_p2p_identity(tmp_path / "other.key") != first
    assert not [p for p in key.parent.iterdir() if p.name != "p2p.key"]  # no temporary file left


def test_hivemind_rsa_key_files_are_read_and_garbage_is_one_line(tmp_path):
    from hivemind.p2p import P2P

    rsa = tmp_path / "rsa.key"
    P2P.generate_identity(str(rsa))
    assert peer_id_of(rsa).startswith("Qm")
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"\x08\x01\x12\x40" + b"\x00" * 64)  # an Ed25519 key whose public half does not match
    for path in (bad, tmp_path / "missing.key"):
        with pytest.raises(DDMError) as err:
            peer_id_of(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
