"""This node's own addresses (peers' record addresses and the dial rule: swarm/addresses.py): the ones a node is
given and the ones it tells others, checked, built and judged in one place.

- `check_peer_maddr`: an `--initial-peers` value must be a libp2p multiaddr ending in the peer's id; anything
  else is a one-line error that shows the expected form (and, for a bare `host:port`, the form to use).
- `announce_maddrs`: the DHT multiaddrs to announce for an address peers dial (IP or DNS name) and port, for
  hosts that listen on a wildcard or behind a port mapping (cloud GPU rentals, Kubernetes NodePorts).
- `reachability`: after joining, one line on whether peers could dial the addresses we announce, and what to
  open or set when not (a node has no outside observer, so this judges the addresses and dials them from here).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from ddm_node.core.errors import DDMError

EXPECTED = "/ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."
WHERE_IDS = "the peer id is in the peer's announce file and in `ddm-node status`"
_MADDR = re.compile(r"^/(?P<proto>ip4|ip6|dns|dns4|dns6)/(?P<host>[^/]+)/tcp/(?P<port>\d{1,5})"
                    r"/p2p/(?P<peer>[1-9A-HJ-NP-Za-km-z]{46,64})$")
_HOST_PORT = re.compile(r"^\[?(?P<host>[^\[\]/]+?)\]?:(?P<port>\d{1,5})$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*$")
PROBE_TIMEOUT = 2.0  # seconds for one TCP dial of our own announced address


def check_peer_maddr(text: str, flag: str = "--initial-peers") -> str:
    """`text` if it is a multiaddr like EXPECTED; else DDMError with one line naming the flag and the form."""
    if not isinstance(text, str):
        raise DDMError(f"{flag}: {text!r} is not a multiaddr; expected the form {EXPECTED}")
    m = _MADDR.match(text)
    if m is None:
        raise DDMError(f"{flag}: {text!r} is not a peer multiaddr; {_hint(text)}")
    host, port = m["host"], int(m["port"])
    if m["proto"] in ("ip4", "ip6"):
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise DDMError(f"{flag}: {text!r}: {host!r} is not an IP address; expected the form {EXPECTED}") from None
        if addr.version != int(m["proto"][-1]):
            raise DDMError(f"{flag}: {text!r}: {host} is not an IPv{m['proto'][-1]} address (use /ip{addr.version}/)")
    elif not _DNS_NAME.match(host):
        raise DDMError(f"{flag}: {text!r}: {host!r} is not a host name; expected the form {EXPECTED}")
    if not 0 < port < 65536:
        raise DDMError(f"{flag}: {text!r}: port {port} is out of range; expected the form {EXPECTED}")
    return text


def check_initial_peers(peers: Sequence[str], flag: str = "initial peer") -> list[str]:
    """A list of peer multiaddrs (`check_peer_maddr` each); DDMError for anything else."""
    if isinstance(peers, str) or not all(isinstance(p, str) for p in peers):
        raise DDMError(f"initial peers must be a list of multiaddr strings, got {peers!r}")
    return [check_peer_maddr(p, flag) for p in peers]


def _hint(text: str) -> str:
    """What to write instead of a malformed peer address."""
    m = _HOST_PORT.match(text.strip())
    if m:
        proto = _proto(m["host"])
        return (f"write it as /{proto}/{m['host']}/tcp/{m['port']}/p2p/PEER_ID (the form {EXPECTED}; "
                f"{WHERE_IDS})")
    if text.startswith("/") and "/p2p/" not in text:
        return f"it lacks the peer id: expected the form {EXPECTED} ({WHERE_IDS})"
    return f"expected the form {EXPECTED} ({WHERE_IDS})"


def _proto(host: str) -> str:
    """The multiaddr protocol for an address: ip4, ip6 or dns4 (a name)."""
    try:
        return f"ip{ipaddress.ip_address(host).version}"
    except ValueError:
        return "dns4"


def check_host(host: str, flag: str) -> str:
    """An IP address or DNS name a peer could dial; DDMError otherwise."""
    if _proto(host) == "dns4" and not _DNS_NAME.match(host):
        raise DDMError(f"{flag}: {host!r} is neither an IP address nor a host name")
    return host


def announce_maddrs(host: str | None, port: int) -> list[str] | None:
    """The DHT multiaddrs to announce for peers dialing `host`:`port` (None: announce what we listen on)."""
    if host is None:
        return None
    if not 0 < port < 65536:
        raise DDMError("announcing an address needs a fixed DHT port (--dht-port, or --announce-port)")
    return [f"/{_proto(host)}/{host}/tcp/{port}"]


class Scope(str, Enum):
    """Who can dial an address."""

    LOOPBACK = "loopback"  # this box only
    PRIVATE = "private"  # the same LAN, VPC, overlay or container network
    PUBLIC = "public"  # anyone on the internet
    NAME = "name"  # a DNS name: whoever resolves it

    def __str__(self) -> str:
        return self.value


def scope(host: str) -> Scope:
    if host == "localhost":
        return Scope.LOOPBACK
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return Scope.NAME
    if addr.is_loopback or addr.is_unspecified:
        return Scope.LOOPBACK
    return Scope.PRIVATE if addr.is_private or addr.is_link_local or addr in _CGNAT else Scope.PUBLIC


_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT and Tailscale: reachable within, not beyond


def host_port_of(maddr: str) -> tuple[str, int] | None:
    """(host, tcp port) of a multiaddr, or None when it has no host and TCP port."""
    parts = maddr.split("/")
    try:
        i = parts.index("tcp")
        return parts[i - 1], int(parts[i + 1])
    except (ValueError, IndexError):
        return None


def tcp_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """Something accepts TCP connections at host:port, dialed from this box."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Reachability:
    """The verdict of `reachability`: `ok` false means peers probably cannot dial us; `line` says why and what to do."""

    ok: bool
    line: str


def reachability(dht: Sequence[str], grpc: str, initial_peers: Sequence[str],
                 dial: Callable[[str, int], bool] = tcp_answers) -> Reachability:
    """Judge the DHT multiaddrs and gRPC address we announce against the peers we joined through, then dial them.

    Loopback addresses are useless to peers on other machines, private ones to peers on the internet, and an
    address that does not answer from this box is wrong, unforwarded or firewalled (or behind a NAT that does
    not loop back, which only a peer outside can tell)."""
    ours = [hp for hp in (host_port_of(m) for m in dht) if hp is not None]
    grpc_host, _, grpc_port = grpc.rpartition(":")
    grpc_hp = (grpc_host.strip("[]"), int(grpc_port)) if grpc_port.isdigit() else None
    theirs = {scope(hp[0]) for hp in (host_port_of(m) for m in initial_peers) if hp is not None}
    scopes = {scope(h) for h, _ in ours} | ({scope(grpc_hp[0])} if grpc_hp else set())
    where = f"{', '.join(dht[:2]) or 'nothing'} (DHT) and {grpc or 'nothing'} (gRPC)"
    ports = sorted({p for _, p in ours} | ({grpc_hp[1]} if grpc_hp else set()))
    opening = f"inbound TCP {' and '.join(map(str, ports))}"
    if not ours or grpc_hp is None:
        return Reachability(False, f"reachability: we announce {where}: peers have no address to dial us")
    if scopes == {Scope.LOOPBACK} and theirs - {Scope.LOOPBACK}:
        return Reachability(False, f"reachability: peers on other machines cannot dial us: we announce only "
                                   f"loopback addresses, {where}; start with --host (or --announce-host) set to the "
                                   f"address they reach, and open {opening}")
    if Scope.PUBLIC in theirs and scopes <= {Scope.LOOPBACK, Scope.PRIVATE}:
        return Reachability(False, f"reachability: peers on the internet cannot dial the private addresses we "
                                   f"announce, {where}; give --announce-host <public address> (with --announce-port "
                                   f"and --announce-grpc-port when the router forwards other port numbers), forward "
                                   f"{opening} to this box, or join over a VPN (docs/DEPLOY.md)")
    dead = [f"{h}:{p}" for h, p in dict.fromkeys([*ours, grpc_hp]) if not dial(h, p)]
    if dead:
        return Reachability(False, f"reachability: nothing answers at {', '.join(dead)} dialed from this box: check "
                                   f"that --announce-host is this box's address (or forwards to it) and that the "
                                   f"firewall allows {opening} (a NAT without hairpinning also fails this test)")
    return Reachability(True, f"reachability: peers can dial us at {where} if the network lets {opening} through "
                              f"to this box")
