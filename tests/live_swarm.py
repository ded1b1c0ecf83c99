"""Shared pieces of the live-swarm tests: islands as `ddm-node start` processes on 127.0.0.1 (LocalNet), read
back through their own event logs and work dirs.

- `net`: a LocalNet whose islands are always stopped (SIGTERM, then SIGKILL of each process group) when the
  test ends, pass or fail; the session fixture in conftest.py then checks that nothing tagged survived.
- `start_swarm`: island1 from the plan file, the others joining it by run id; `swarm_together`: all at once,
  through a bootstrap DHT peer of the test process.
- `timeline` / `wait_until`: every island's events.jsonl as typed `Event`s, merged by time.
- `training_pair`: two islands, one run of one shard: the trainer is mid-shard (a periodic checkpoint
  published, training on past it) and the waiter idles and mirrors. Used by the stop tests and by any case
  that signals a training island (`signal_island(..., group=True)` signals its whole process group).
- `signal_island`: send a signal to an island's daemon (or its process group) and wait for its exit.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from chaos.harness import verified_copy
from ddm_node.cli.localnet import IslandProc, LocalNet
from ddm_node.core.events import Event, EventKind, read_events
from ddm_node.core.identity import Identity
from ddm_node.core.workdir import WorkDir, step_of
from ddm_node.swarm.dht import Swarm
from ddm_node.train import checkpoint as ckpt

T = TypeVar("T")

CONFIG = """
partition: {{experts: {k}}}
model: {{hidden: 32, depth: 2, heads: 2}}
train: {{steps: {steps}, batch_size: 32, checkpoint_every: {every}, warmup_steps: 5}}
swarm: {{lease_ttl: {ttl}, settle: 1, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60, replicas: {replicas},
        router_job: false}}
"""


def config(k: int = 1, steps: int = 100000, every: int = 50, ttl: float = 30.0, replicas: int = 2) -> str:
    """A run small enough for a 2-core box: a tiny DiT on digits, no router job."""
    return CONFIG.format(k=k, steps=steps, every=every, ttl=ttl, replicas=replicas)


@pytest.fixture
def net(tmp_path):
    n = LocalNet(tmp_path)
    try:
        yield n
    finally:
        n.stop_all(timeout=30)


def start_swarm(net: LocalNet, run_id: str, count: int, first: str = "island1") -> list[IslandProc]:
    """`first` from the plan file, then `count - 1` islands joining it by run id; all ready."""
    head = net.start(first, "--plan", str(net.root / "plan"))
    maddr = net.wait_ready(head)["maddrs"][0]
    rest = [net.start(f"island{i}", "--run", run_id, "--initial-peers", maddr) for i in range(2, count + 1)]
    for p in rest:
        net.wait_ready(p)
    return [head, *rest]


@contextmanager
def swarm_together(net: LocalNet, run_id: str, count: int) -> Iterator[tuple[list[IslandProc], str]]:
    """`count` islands started at once (island1 from the plan file, the others by run id), all joining through a
    DHT peer of this process, so none waits for another to be up; yields the ready islands and the bootstrap
    multiaddr (for readers). Use it when every island must be live before the first shard finishes."""
    with Swarm(Identity.generate(), run_id) as boot:
        maddr = boot.visible_maddrs()[0]
        procs = [net.start("island1", "--plan", str(net.root / "plan"), "--initial-peers", maddr)]
        procs += [net.start(f"island{i}", "--run", run_id, "--initial-peers", maddr) for i in range(2, count + 1)]
        for p in procs:
            net.wait_ready(p, timeout=180)
        yield procs, maddr


def timeline(net: LocalNet) -> list[Event]:
    """Every island's events (the newest process of each name), merged by time, each named after its island."""
    out: list[Event] = []
    for p in {p.name: p for p in net.procs}.values():
        out += read_events(WorkDir(p.work).events, name=p.name)
    return sorted(out, key=lambda e: e.t)


def wait_until(net: LocalNet, predicate: Callable[[list[Event]], T], timeout: float, what: str) -> T:
    """Poll the timeline until `predicate(events)` is truthy and return that value; fail with the islands' log
    tails otherwise."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate(timeline(net))
        if value:
            return value
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name}\n{log_tail(p)}" for p in net.procs)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def log_tail(proc: IslandProc, n: int = 15) -> str:
    try:
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def of(events: list[Event], kind: EventKind, name: str | None = None, shard: int | None = None,
       after: float = 0.0) -> list[Event]:
    return [e for e in events if e.kind is kind and (name is None or e.name == name)
            and (shard is None or e.shard == shard) and e.t >= after]


def newest_step(work: Path, shard: int) -> int:
    """The newest step dir of a shard in a work dir that verifies with its signature (-1: none)."""
    return step_of(ckpt.latest_checkpoint(work, shard, require_signature=True))


def holds(work: Path, shard: int, step: int) -> bool:
    """The work dir holds a signed, verified checkpoint of the shard at exactly `step`."""
    return verified_copy(work, shard, step)


def family(pid: int) -> list[psutil.Process]:
    """A process and its live descendants (DHT child, p2pd)."""
    try:
        root = psutil.Process(pid)
        return [p for p in [root, *root.children(recursive=True)] if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


@dataclass
class Stopped:
    code: int | None  # exit code (None: still running after the bound; it was then SIGKILLed)
    seconds: float  # from the signal to the exit
    t_signal: float  # wall clock of the signal (comparable with event times)
    group_left: list[str]  # members of the island's process group alive after it exited


def signal_island(net: LocalNet, proc: IslandProc, sig: int, bound: float, group: bool = False) -> Stopped:
    """Send `sig` to the island's daemon process (or, with `group`, to its whole process group, as a terminal's
    Ctrl-C or a supervisor does) and wait up to `bound` seconds for the daemon to exit."""
    t_signal = time.time()
    t0 = time.monotonic()
    if group:
        os.killpg(proc.popen.pid, sig)
    else:
        proc.popen.send_signal(sig)
    try:
        code = proc.popen.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - t0
    left = []
    if code is not None:
        time.sleep(0.5)  # a DHT child or p2pd the daemon stopped may take a moment to be reaped
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == proc.popen.pid and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid}:{' '.join(p.cmdline()[:3])}")
            except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    if code is None:
        net.kill(proc)
    return Stopped(code, seconds, t_signal, left)


@dataclass
class TrainingPair:
    """Two islands of a one-shard run: `trainer` trains shard 0 past a published periodic checkpoint, `waiter`
    waits for the shard (mirroring it). `run_id`, `ttl` and `every` are the run's."""

    net: LocalNet
    run_id: str
    trainer: IslandProc
    waiter: IslandProc
    ttl: float
    every: int
    last_periodic: int  # the trainer's newest periodic checkpoint step when the pair was handed out
    t_last_periodic: float


@pytest.fixture
def training_pair(net) -> Iterator[TrainingPair]:
    """See TrainingPair. Checkpoints every 200 steps of a 100000-step budget: a signal sent now lands well
    inside an interval, so the step reached is not a periodic checkpoint. The islands start together through
    a bootstrap DHT peer of the test process, which stays up until the test ends."""
    ttl, every = 30.0, 200
    run_id = net.partition(config(k=1, steps=100000, every=every, ttl=ttl))
    with swarm_together(net, run_id, 2) as (procs, _):
        yield _pair(net, run_id, procs, ttl, every)


def _pair(net: LocalNet, run_id: str, procs: list[IslandProc], ttl: float, every: int) -> TrainingPair:
    trainer, waiter = procs
    # whichever island wins the claim of the only shard trains it; the other finds it claimed and waits
    first = wait_until(net, lambda ev: of(ev, EventKind.CHECKPOINT, shard=0) and of(ev, EventKind.CHECKPOINT,
                                                                                   shard=0)[0], 180,
                       "a first periodic checkpoint of shard 0")
    if first.name != trainer.name:
        trainer, waiter = waiter, trainer
    assert not of(timeline(net), EventKind.CLAIM, name=waiter.name), "both islands claimed the only shard"
    # the waiter mirrors it (it ranks first for shard 0 among the live islands that do not hold it)
    wait_until(net, lambda ev: holds(waiter.work, 0, first.step), 60, f"{waiter.name} to mirror step {first.step}")
    time.sleep(1.5)  # train on past the checkpoint, so the step reached at a signal is past it
    return TrainingPair(net, run_id, trainer, waiter, ttl, every, first.step, first.t)
