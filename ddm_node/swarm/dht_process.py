"""A hivemind DHT child process (and its p2pd), started and stopped robustly: `DHTChild`, used by `Swarm`.

hivemind forks its DHT child. A fork while this process's gRPC threads hold a lock (the daemon's
server, a test's in-process peers) can leave the child to crash or hang before it reports ready;
hivemind's own wait then blocks forever. `start_dht` therefore polls the child while it waits and
starts it again when it died or started no p2pd within START_STUCK seconds. `stop` is the safety
net after a shutdown: whatever of a captured process tree still runs is terminated, then killed.

A daemon's child is `shielded` (`ShieldedDHT`): it moves to a process group of its own before it starts
p2pd, so a signal to the daemon's whole group (a supervisor's `kill -TERM -- -PGID`, a terminal's Ctrl+C)
reaches the daemon alone, which still needs the DHT to announce its last checkpoint and release its claim,
and then stops the DHT itself. Out of the group, the child must not outlive the daemon: the kernel kills it
when its parent dies (PR_SET_PDEATHSIG), and p2pd exits by itself when the child is gone (measured: within
3 s of a SIGKILL of the child).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin on Python 3.10
from functools import partial
from pathlib import Path
from typing import Any

import hivemind
import psutil

from ddm_node.core.errors import DDMError
from ddm_node.swarm.p2p_identity import ensure_p2p_identity

logger = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # seconds for the DHT child to join the swarm (hivemind bounds its own dials well below)
START_ATTEMPTS = 3  # a DHT child that dies before it is ready is started again this many times in all
LIVENESS_POLL = 0.5  # seconds between looks at the DHT child and p2pd while a call waits
START_STUCK = 20.0  # a child with no p2pd after this many seconds hangs (its first act is to start p2pd)


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent (thread) exits


class ShieldedDHT(hivemind.DHT):
    """A hivemind DHT child in a process group of its own that dies with its parent (see the module docstring).

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so only a process's main thread (the
    daemon's) may start one; elsewhere use plain `hivemind.DHT`."""

    def run(self) -> None:
        os.setpgid(0, 0)  # before p2pd starts: p2pd inherits the group
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self._parent_pid:  # the parent died before the prctl took effect
            os._exit(1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the daemon's handler, inherited by the fork
        super().run()


class DHTChild:
    """A started, ready hivemind DHT child and its process tree; `shutdown` stops all of it.

    `options` are hivemind.DHT's (initial_peers, host_maddrs, record_validators, ...). `shielded`: start a
    `ShieldedDHT` (the daemon, from its main thread). `identity_path`: the libp2p key file (swarm/p2p_identity.py),
    made on first use. Raises whatever hivemind raises for bad options, or
    DDMError when no child became ready (see `start_dht`).
    """

    def __init__(self, shielded: bool = False, identity_path: Path | None = None, **options: Any) -> None:
        if identity_path is not None:
            ensure_p2p_identity(identity_path)
            # hivemind would first dial the swarm to see whether the id is taken; after a restart the swarm may
            # still hold our old address, and that dial can cost a connect timeout for nothing
            options.update(identity_path=str(identity_path), check_if_identity_free=False)
        make = partial(
            ShieldedDHT if shielded else hivemind.DHT,
            **options,
            start=False,  # started in start_dht, which can tell a dead child from a slow one
            nat_port_map=False,  # the default sends UPnP/NAT-PMP packets off the machine
        )
        self.dht = start_dht(make)
        # Remember the process tree now: once the DHT child is gone, its pid no longer leads to p2pd.
        self.procs = descendants(self.dht.pid)
        self.dead = False  # the child or p2pd died under us (see `check`)

    def alive(self) -> bool:
        """The DHT child and its p2pd still run (a signal to the whole process group or cgroup, the OOM killer,
        or a crash can end them under a live daemon)."""
        return self.dht.is_alive() and all(_running(p) for p in self.procs)

    def check(self) -> None:
        """DDMError when the DHT child or p2pd died (logged once): calls then fail at once, not after timeouts."""
        if not self.dead and not self.alive():
            self.dead = True
            logger.error("the DHT process or its p2pd died (a signal to the whole process group or cgroup? see "
                         "docs/DEPLOY.md); this node is off the swarm until it restarts")
        if self.dead:
            raise DDMError("the swarm's DHT process died")

    def result(self, future: Any, timeout: float) -> Any:
        """`future.result()` within `timeout` seconds, looking at the DHT child every LIVENESS_POLL seconds:
        DDMError at once when it died (a dead child never answers, and each call would wait out its timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return future.result(timeout=min(LIVENESS_POLL, max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                if time.monotonic() >= deadline:
                    raise
                self.check()

    def shutdown(self) -> None:
        """Stop the DHT child and its p2pd (the caller makes sure this runs once)."""
        known = {p.pid for p in self.procs}
        procs = self.procs + [p for p in descendants(self.dht.pid) if p.pid not in known]
        try:
            self.dht.shutdown()
        except Exception:
            logger.warning("DHT shutdown raised; terminating its processes", exc_info=True)
        self.dht.join(timeout=5)
        # Safety net: anything of the tree still running after hivemind's stop (measured here:
        # p2pd exits with its parent, so this normally finds nothing) is terminated, then killed.
        stop(procs)


def start_dht(make: Callable[[], hivemind.DHT]) -> hivemind.DHT:
    """Start a DHT child from `make()` and wait until it is ready; a child that dies first is retried.

    The wait polls, and a child that died, or that started no p2pd within START_STUCK seconds, is
    stopped and started again (START_ATTEMPTS in all); DDMError when none became ready.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        dht = make()
        dht.start()
        started = time.monotonic()
        try:
            while True:
                try:
                    dht.wait_until_ready(timeout=0.25)
                    return dht
                except TimeoutError:
                    waited = time.monotonic() - started
                    if not dht.is_alive():
                        why = f"died (exit code {dht.exitcode})"
                        break
                    if waited > START_STUCK and len(descendants(dht.pid)) == 1:
                        why = f"started no p2pd in {START_STUCK:.0f} s"
                        break
                    if waited > START_TIMEOUT:
                        raise DDMError(f"the DHT child was not ready within {START_TIMEOUT:.0f} s") from None
        except BaseException:
            reap(dht)
            raise
        logger.warning("the DHT child %d %s before it was ready, attempt %d of %d",
                       dht.pid, why, attempt, START_ATTEMPTS)
        reap(dht, grace=0.0)
    raise DDMError(f"the DHT child failed before it was ready, {START_ATTEMPTS} times (last: {why})")


def reap(dht: hivemind.DHT, grace: float = 5.0) -> None:
    """Stop a DHT child that never became ready, and its p2pd, after `grace` seconds to exit by itself."""
    procs = descendants(dht.pid)
    dht.join(timeout=grace)  # after a failed start the child exits by itself
    stop(procs)


def descendants(pid: int | None) -> list[psutil.Process]:
    """The DHT process and everything under it (p2pd), captured while they run."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def stop(procs: Iterable[psutil.Process]) -> None:
    """Terminate, then kill, whichever of `procs` (captured before shutdown) still runs."""
    alive = [p for p in procs if _running(p)]
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=3)
    for p in alive:
        try:
            logger.warning("killing leftover DHT process %d (%s)", p.pid, p.name())
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=3)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
