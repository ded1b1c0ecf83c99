"""Network namespaces for the chaos suite and bench.transfer: a bridge, namespaces hanging off it by veth pairs,
partitions (link down) and rate limits (`tc qdisc ... tbf`).

Everything here that changes the machine is created under a unique tag and removed by `close()` / the context
manager's exit, which callers use in `finally` blocks; nothing is left behind even when a run fails. Needs root
(CAP_NET_ADMIN): `privileges()` says why not where it is missing.
"""

from __future__ import annotations

import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------- shell


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (no shell); raise with its stderr when `check` and it fails."""
    res = subprocess.run(list(args), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def privileges() -> str | None:
    """None when network namespaces, veth pairs, tc and tmpfs mounts work here, else why not."""
    if os.geteuid() != 0:
        return "not root: network namespaces, tc and mounts need CAP_NET_ADMIN/CAP_SYS_ADMIN"
    tag = uuid.uuid4().hex[:6]
    ns, host, peer = f"ddmprobe-{tag}", f"dp{tag}h", f"dp{tag}n"
    try:
        for cmd in (["ip", "netns", "add", ns], ["ip", "link", "add", host, "type", "veth", "peer", "name", peer],
                    ["ip", "link", "set", peer, "netns", ns],
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", peer, "root", "tbf", "rate", "20mbit",
                     "burst", "32kbit", "latency", "400ms"]):
            res = sh(*cmd, check=False)
            if res.returncode != 0:
                return f"`{' '.join(cmd[:4])} ...` not permitted: {res.stderr.strip()[:120]}"
    except FileNotFoundError as exc:
        return f"missing tool: {exc.filename}"
    finally:
        sh("ip", "link", "del", host, check=False)
        sh("ip", "netns", "del", ns, check=False)
    return None



# ------------------------------------------------------------------------------------ namespaces


@dataclass
class Node:
    """One network namespace hanging off the lab's bridge by a veth pair."""

    name: str
    ns: str
    veth_host: str  # root-namespace end, enslaved to the bridge
    veth_ns: str  # the namespace's end, holding `ip`
    ip: str

    @property
    def wrap(self) -> list[str]:
        """Command prefix that runs a program inside this namespace (exec: the pid stays the same)."""
        return ["ip", "netns", "exec", self.ns]


@dataclass
class NetLab:
    """A bridge in the root namespace (address .1, for islands and readers there) and namespaces on it.

    `cut`/`heal` take a namespace's link down/up (a partition); `limit` puts a tbf qdisc on the
    namespace's egress (what it sends: uploads to everyone else) and on the bridge port's egress
    (what it receives). `close()` removes every qdisc, veth, namespace and the bridge.
    """

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    octet: int = field(default_factory=lambda: random.SystemRandom().randint(16, 250))
    nodes: dict[str, Node] = field(default_factory=dict)
    up: bool = False

    @property
    def bridge(self) -> str:
        return f"dcb{self.tag}"

    @property
    def gateway(self) -> str:
        """The bridge's address: islands and test readers in the root namespace listen here."""
        return f"10.213.{self.octet}.1"

    def start(self) -> NetLab:
        taken = sh("ip", "-o", "addr", check=False).stdout
        while f"10.213.{self.octet}." in taken:
            self.octet = self.octet % 250 + 1
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.up = True
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        return self

    def add(self, name: str) -> Node:
        i = len(self.nodes) + 2
        node = Node(name, f"ddmchaos-{self.tag}-{i}", f"dc{self.tag}h{i}", f"dc{self.tag}n{i}", f"10.213.{self.octet}.{i}")
        self.nodes[name] = node
        sh("ip", "netns", "add", node.ns)
        sh("ip", "link", "add", node.veth_host, "type", "veth", "peer", "name", node.veth_ns)
        sh("ip", "link", "set", node.veth_ns, "netns", node.ns)
        sh("ip", "link", "set", node.veth_host, "master", self.bridge)
        sh("ip", "link", "set", node.veth_host, "up")
        sh(*node.wrap, "ip", "link", "set", "lo", "up")
        sh(*node.wrap, "ip", "addr", "add", f"{node.ip}/24", "dev", node.veth_ns)
        sh(*node.wrap, "ip", "link", "set", node.veth_ns, "up")
        return node

    def cut(self, name: str) -> None:
        """Partition: the namespace's link goes down; packets in either direction are dropped."""
        sh("ip", "link", "set", self.nodes[name].veth_host, "down")

    def heal(self, name: str) -> None:
        sh("ip", "link", "set", self.nodes[name].veth_host, "up")

    def limit(self, name: str, rate: str = "20mbit", burst: str = "32kbit") -> None:
        """tbf on both directions of a namespace's link (ENVIRONMENT.md: tbf works, netem does not). Fast links need
        a bigger `burst` (the bytes sent at once per timer tick): 32 kbit caps a 1 Gbit/s tbf well below its rate."""
        node = self.nodes[name]
        tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", "400ms"]
        sh(*node.wrap, "tc", "qdisc", "replace", "dev", node.veth_ns, *tbf)
        sh("tc", "qdisc", "replace", "dev", node.veth_host, *tbf)

    def unlimit(self, name: str) -> None:
        node = self.nodes[name]
        sh(*node.wrap, "tc", "qdisc", "del", "dev", node.veth_ns, "root", check=False)
        sh("tc", "qdisc", "del", "dev", node.veth_host, "root", check=False)

    def tx_bytes(self, name: str) -> int:
        """Bytes the namespace has sent on its link (kernel counter of its veth end)."""
        node = self.nodes[name]
        out = sh(*node.wrap, "cat", f"/sys/class/net/{node.veth_ns}/statistics/tx_bytes").stdout
        return int(out.strip())

    def close(self) -> list[str]:
        """Remove qdiscs, veths, namespaces and the bridge; returns what could not be removed."""
        left = []
        for node in self.nodes.values():
            self.unlimit(node.name)
            sh("ip", "link", "del", node.veth_host, check=False)
            if sh("ip", "netns", "del", node.ns, check=False).returncode != 0 and node.ns in netns_list():
                left.append(node.ns)
        if self.up:
            sh("ip", "link", "del", self.bridge, check=False)
            if sh("ip", "link", "show", self.bridge, check=False).returncode == 0:
                left.append(self.bridge)
        left += [n for n in netns_list() if n.startswith(f"ddmchaos-{self.tag}-")]
        return left


def netns_list() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]


@contextmanager
def netlab() -> Iterator[NetLab]:
    lab = NetLab()
    try:
        yield lab.start()
    finally:
        left = lab.close()
        assert not left, f"could not remove {left}"
