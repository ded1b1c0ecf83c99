"""Tools for the chaos suite: network namespaces, tmpfs disks, event-log analysis and the figure reporter.

Everything here that changes the machine (namespaces, veth pairs, a bridge, qdiscs, mounts) is
created under a unique tag and removed by `close()` / a context manager's exit, which the tests
call in `finally` blocks; nothing is left behind even when a test fails.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ddm_node.cli.localnet import IslandProc, LocalNet
from ddm_node.core.events import Event, EventKind
from ddm_node.core.workdir import WorkDir
from ddm_node.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
CHAOS_DOC = REPO / "docs" / "CHAOS.md"
DEFAULT_SEED = 20261127


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


def mount_permitted() -> str | None:
    """None when a tmpfs can be mounted here, else why not."""
    if os.geteuid() != 0:
        return "not root: mounting a tmpfs needs CAP_SYS_ADMIN"
    probe = Path(f"/tmp/ddmprobe-mnt-{uuid.uuid4().hex[:6]}")
    probe.mkdir()
    try:
        res = sh("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe), check=False)
        if res.returncode != 0:
            return f"mount -t tmpfs not permitted: {res.stderr.strip()[:120]}"
        sh("umount", str(probe), check=False)
        return None
    finally:
        probe.rmdir()


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

    def limit(self, name: str, rate: str = "20mbit") -> None:
        """tbf on both directions of a namespace's link (ENVIRONMENT.md: tbf works, netem does not)."""
        node = self.nodes[name]
        tbf = ["root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"]
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


@contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` (rounded up to 4 KiB pages) mounted at `path`; unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    pages = -(-size_bytes // 4096)
    sh("mount", "-t", "tmpfs", "-o", f"size={pages * 4}k,mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        for _ in range(20):  # a killed island's files may still be open for a moment
            if sh("umount", str(path), check=False).returncode == 0:
                break
            time.sleep(0.25)
        else:
            sh("umount", "-l", str(path), check=False)


# --------------------------------------------------------------------------------- island state


def maddr(info: dict, prefer: str | None = None) -> str:
    """A multiaddr from an announce file, the one on `prefer` (an IP) when given."""
    addrs = info["maddrs"]
    if prefer:
        addrs = [a for a in addrs if f"/ip4/{prefer}/" in a] or addrs
    return addrs[0]


def live_maddr(net: LocalNet, exclude: tuple[str, ...] = (), timeout: float = 90) -> str:
    """The multiaddr of any live, ready island (not in `exclude`), waiting for one if needed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in reversed(net.procs):
            if p.alive and p.name not in exclude and p.announce():
                return maddr(p.announce())
        time.sleep(0.3)
    raise AssertionError("no live island to join through")


ENDS_TRAINING = (EventKind.DONE, EventKind.LEASE_LOST, EventKind.START, EventKind.DISK_FULL)


def training_now(events: list[Event], alive: set[str]) -> dict[str, int]:
    """island name -> shard it trains now (last claim not followed by done/lease_lost/start), live islands only."""
    current: dict[str, int | None] = {}
    for e in events:
        if e.kind is EventKind.CLAIM:
            current[e.name] = e.shard
        elif e.kind in ENDS_TRAINING and e.name in current:
            if e.kind is EventKind.START or e.shard == current[e.name]:
                current[e.name] = None
    return {n: s for n, s in current.items() if s is not None and n in alive}


def checkpoint_steps(events: list[Event], name: str, shard: int, before: float | None = None) -> list[tuple[float, int]]:
    return [(e.t, e.step) for e in events if e.kind is EventKind.CHECKPOINT and e.name == name
            and e.shard == shard and (before is None or e.t <= before)]


def verified_copy(work: Path, shard: int, step: int) -> bool:
    d = ckpt.checkpoint_dir(work, shard, step)
    if not d.is_dir():
        return False
    try:
        ckpt.verify_checkpoint(d, require_signature=True)
        return True
    except Exception:
        return False


@dataclass
class ScanResult:
    step_dirs: int = 0
    staging_left: int = 0  # dot-named temporary dirs (crash leftovers), ignored by every reader
    part_files: int = 0  # .part files of interrupted downloads
    bad: list[str] = field(default_factory=list)


def scan_work_dirs(works: list[Path]) -> ScanResult:
    """Every step dir in every work dir must verify; count staging leftovers and .part files."""
    res = ScanResult()
    for work in works:
        for shard in WorkDir(work).shards():
            shard_dir = WorkDir(work).shard(shard)
            for p in shard_dir.iterdir():
                if p.name.startswith("."):
                    res.staging_left += 1
                    res.part_files += sum(1 for _ in p.rglob("*.part"))
                    continue
                if not p.name.startswith("step_"):
                    continue
                res.step_dirs += 1
                try:
                    ckpt.verify_checkpoint(p, require_signature=True)
                except Exception as exc:
                    res.bad.append(f"{p}: {exc}")
            steps = ckpt.list_checkpoints(work, shard)
            if steps and ckpt.latest_checkpoint(work, shard, require_signature=True) != steps[0]:
                res.bad.append(f"{shard_dir}: newest step dir {steps[0].name} is not the newest valid one")
    return res


# ------------------------------------------------------------------------------------------ reporting


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class ChaosReport:
    """Figures of one scenario: printed (run pytest with -s), and appended to docs/CHAOS.md when
    DDM_CHAOS_REPORT=1."""

    scenario: str
    seed: int
    figures: dict = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, **figures) -> None:
        self.figures.update(figures)

    def note(self, line: str) -> None:
        self.lines.append(line)
        print(f"[chaos {self.scenario}] {line}", flush=True)

    def emit(self, outcome: str) -> str:
        head = (f"{time.strftime('%Y-%m-%d %H:%M')} | {self.scenario} | seed {self.seed} | {outcome} | "
                f"{time.time() - self.started:.0f} s | load {load_average()}")
        body = ", ".join(f"{k} {v}" for k, v in self.figures.items())
        text = f"{head} | {body}"
        print(f"\n[chaos] {text}", flush=True)
        for line in self.lines:
            print(f"[chaos]     {line}", flush=True)
        if os.environ.get("DDM_CHAOS_REPORT") == "1":
            with open(CHAOS_DOC, "a") as f:
                f.write(f"- {text}\n" + "".join(f"    - {line}\n" for line in self.lines))
        return text


def island_log_tail(proc: IslandProc, n: int = 30) -> str:
    try:
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def events_json(events: list[Event]) -> str:
    return "\n".join(e.to_json() for e in events)
