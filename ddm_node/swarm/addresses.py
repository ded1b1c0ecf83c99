"""Addresses in peers' records: their form (checked when a record is validated) and which of them a node dials.

Form. A gRPC address is `host:port`: an IPv4 address, a bracketed IPv6 address or a DNS name (labels of letters,
digits and inner hyphens), never an unspecified (0.0.0.0, ::), multicast or broadcast address, port 1-65535. A
peer record's multiaddrs are `/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>/p2p/<the record's own peer id>`: a record
speaks for its own peer only.

Dialing (`SwarmHosts`). Records are signed by their owner, but an owner can write any address into them, and every
node that reads a record would dial it: without a rule, one peer could send every island and `assemble` to any
host:port (a port scan or a flood from the whole swarm, against anything the islands can reach). A node therefore
dials a record's address only when its host is a host of the swarm:
- a host its own libp2p daemon holds (or held) a connection with: the remote address of a connection, which the
  TCP and libp2p handshakes prove a swarm peer answered at;
- a host of its initial peers (the operator named them) or one of its own addresses.
Host names are resolved (cached) and compared by IP address. What this does not stop: a swarm member can still
name any port of any swarm host (its own, or another island's); on one machine (a 127.0.0.1 test swarm) every
local port is a swarm host. A reader that never connected to a holder's host skips its records until it does.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_PORT = re.compile(r"^[0-9]{1,5}$")
HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
RESOLVE_TTL = 60.0  # seconds a host name's addresses are cached
REFRESH = 1.0  # seconds between looks at the libp2p connections when an unknown host comes up
MAX_HOSTS = 4096  # hosts remembered (a bound on memory: connections come and go)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip  # ::ffff:1.2.3.4 is 1.2.3.4


def host_problem(host: str, ip_version: int | None = None) -> str | None:
    """Why `host` is not a host a peer could be dialed at (None when it is). `ip_version`: it must be an IP of
    that version (a /ip4 or /ip6 multiaddr); None: an IP or a DNS name."""
    ip = _ip(host)
    if ip is None:
        if ip_version is not None:
            return f"{host[:64]!r} is not an IPv{ip_version} address"
        if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
            return f"{host[:64]!r} is not an IP address or a DNS name"
        if host.replace(".", "").isdigit():
            return f"{host[:64]!r} is not an IP address"
        return None
    if ip_version is not None and ip.version != ip_version:
        return f"{host[:64]!r} is not an IPv{ip_version} address"
    if ip.is_unspecified or ip.is_multicast or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255")):
        return f"{host[:64]} is not an address a peer listens at"
    return None


def split_grpc(address: str) -> tuple[str, int] | None:
    """(host, port) of a well-formed `host:port` (IPv6 without its brackets), or None."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep or ":" not in host or _ip(host) is None:
            return None
    else:
        host, sep, port = address.rpartition(":")
        if not sep or ":" in host:
            return None
    if not _PORT.match(port) or not 1 <= int(port) <= 65535 or host_problem(host) is not None:
        return None
    return host, int(port)


def maddr_problem(maddr: str, peer_id: str) -> str | None:
    """Why `maddr` is not `/<ip4|ip6|dns*>/<host>/tcp/<port>/p2p/<peer_id>` (None when it is)."""
    parts = maddr.split("/")
    if len(parts) != 7 or parts[0] or parts[1] not in HOST_PROTOCOLS or parts[3] != "tcp" or parts[5] != "p2p":
        return f"{maddr[:80]!r} is not /<ip4|ip6|dns>/<host>/tcp/<port>/p2p/<peer id>"
    version = {"ip4": 4, "ip6": 6}.get(parts[1])
    problem = host_problem(parts[2], version)
    if problem is not None:
        return problem
    if not _PORT.match(parts[4]) or not 1 <= int(parts[4]) <= 65535:
        return f"{maddr[:80]!r} has no valid TCP port"
    if parts[6] != peer_id:
        return f"{maddr[:80]!r} names another peer than the record's own"
    return None


def record_maddrs(maddrs: Iterable[str], peer_id: str, limit: int = 8) -> tuple[str, ...]:
    """A node's own multiaddrs in the form its peer record may carry (`maddr_problem`), at most `limit`."""
    return tuple([m for m in maddrs if maddr_problem(m, peer_id) is None][:limit])


def maddr_host(maddr: str) -> str | None:
    """The host of a multiaddr that starts with a host protocol (`/ip4/1.2.3.4/...` -> "1.2.3.4"), else None."""
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 and not parts[0] and parts[1] in HOST_PROTOCOLS else None


class SwarmHosts:
    """Which hosts this node dials for addresses read from records (see the module docstring). Thread-safe.

    `connected()` returns the hosts of the node's current libp2p connections (asked only when an address names a
    host not yet known, at most every REFRESH seconds); `fixed` are the initial peers' and the node's own hosts."""

    def __init__(self, connected: Callable[[], Iterable[str]], fixed: Iterable[str] = (),
                 resolve: Callable[[str], set[str]] | None = None):
        self._connected = connected
        self._resolve_fn = resolve or _getaddrinfo
        self._lock = threading.Lock()
        self._known: dict[str, None] = {}  # IP addresses (normalized text), oldest first
        self._names: dict[str, tuple[float, frozenset[str]]] = {}  # host name -> (until, its addresses)
        self._refreshed = 0.0
        self._fixed = [h for h in fixed if h and h.strip("[]") not in ("0.0.0.0", "::")]  # wildcards are no host

    def allows(self, address: str) -> bool:
        """Whether a record's gRPC `address` (host:port) may be dialed."""
        parsed = split_grpc(address)
        return parsed is not None and self.allows_host(parsed[0])

    def allows_host(self, host: str) -> bool:
        ips = self._addresses(host)
        if not ips:
            return False
        with self._lock:
            if any(ip in self._known for ip in ips):
                return True
            stale = time.monotonic() - self._refreshed >= REFRESH
        if stale:
            self.refresh()
            with self._lock:
                return any(ip in self._known for ip in ips)
        return False

    def refresh(self) -> None:
        """Learn the hosts of the current libp2p connections (and of the fixed hosts)."""
        try:
            hosts = list(self._connected())
        except Exception as exc:  # a DHT that is shutting down: keep what is known
            log.debug("listing libp2p connections failed: %s", exc)
            hosts = []
        hosts += self._fixed  # names resolved again once their cache runs out (a DNS not ready at start)
        with self._lock:
            self._refreshed = time.monotonic()
        for host in hosts:
            for ip in self._addresses(host):
                with self._lock:
                    self._known.pop(ip, None)
                    self._known[ip] = None
                    while len(self._known) > MAX_HOSTS:
                        del self._known[next(iter(self._known))]

    def _addresses(self, host: str) -> frozenset[str]:
        ip = _ip(host.strip("[]"))
        if ip is not None:
            return frozenset({str(ip)})
        if host_problem(host) is not None:
            return frozenset()
        now = time.monotonic()
        with self._lock:
            cached = self._names.get(host.lower())
        if cached is not None and cached[0] > now:
            return cached[1]
        ips = frozenset(str(_ip(a)) for a in self._resolve_fn(host) if _ip(a) is not None)
        with self._lock:
            self._names[host.lower()] = (now + RESOLVE_TTL, ips)
            while len(self._names) > MAX_HOSTS:
                del self._names[next(iter(self._names))]
        return ips


def _getaddrinfo(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()
