"""Tools for the chaos suite: network namespaces (bench/netlab.py, shared with bench.transfer), tmpfs disks,
event-log analysis and the figure reporter.

Everything here that changes the machine (namespaces, veth pairs, a bridge, qdiscs, mounts) is
created under a unique tag and removed by `close()` / a context manager's exit, which the tests
call in `finally` blocks; nothing is left behind even when a test fails.
"""

from __future__ import annotations

import os
import sys
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
if str(REPO) not in sys.path:  # bench/ is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from bench.netlab import NetLab, Node, netlab, netns_list, privileges, sh  # noqa: E402

__all__ = ["NetLab", "Node", "netlab", "netns_list", "privileges", "sh"]  # the namespace tools, for the suite

CHAOS_DOC = REPO / "docs" / "CHAOS.md"
DEFAULT_SEED = 20261127


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
