"""A hivemind DHT child process (and its p2pd), started and stopped robustly: `DHTChild`, used by `Swarm`.

hivemind forks its DHT child. A fork while this process's gRPC threads hold a lock (the daemon's
server, a test's in-process peers) can leave the child to crash or hang before it reports ready;
hivemind's own wait then blocks forever. `start_dht` therefore polls the child while it waits and
starts it again when it died or started no p2pd within START_STUCK seconds. `stop` is the safety
net after a shutdown: whatever of a captured process tree still runs is terminated, then killed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import hivemind
import psutil

from ddm_node.core.errors import DDMError

logger = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # seconds for the DHT child to join the swarm (hivemind bounds its own dials well below)
START_ATTEMPTS = 3  # a DHT child that dies before it is ready is started again this many times in all
START_STUCK = 20.0  # a child with no p2pd after this many seconds hangs (its first act is to start p2pd)


class DHTChild:
    """A started, ready hivemind DHT child and its process tree; `shutdown` stops all of it.

    `options` are hivemind.DHT's (initial_peers, host_maddrs, record_validators, ...). Raises whatever
    hivemind raises for bad options, or DDMError when no child became ready (see `start_dht`).
    """

    def __init__(self, **options: Any) -> None:
        make = partial(
            hivemind.DHT,
            **options,
            start=False,  # started in start_dht, which can tell a dead child from a slow one
            nat_port_map=False,  # the default sends UPnP/NAT-PMP packets off the machine
        )
        self.dht = start_dht(make)
        # Remember the process tree now: once the DHT child is gone, its pid no longer leads to p2pd.
        self.procs = descendants(self.dht.pid)

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
