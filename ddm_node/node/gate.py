"""When an island may claim work that nobody visibly started: the restart rule.

DHT records live in memory only; the training state lives in the islands' work dirs. After a whole-swarm
restart (`docker compose down` / `up` with the volumes kept, a power cut) the first island up is alone on an
empty DHT: every shard it holds nothing of looks untouched, and it used to claim one another island had
already finished and train it again from step 0 (and the router too).

The rule: an island that returns to a run (its work dir already holds the run's plan) announces what it holds
before it claims anything (`Island.start`), and claims only work whose state it can see, here or announced in
the swarm (a shard with a checkpoint or replica record, or one it holds itself), until the islands it saw up
when it stopped (WORK/peers.json, node/peer_memory.py) are all back: each announces its state before its first
heartbeat, so once they are back, work that still shows no state has none. The wait is bounded (`max_wait`,
for islands that never come back); without a peers file (a work dir from an older version) it is one lease TTL
(`blind_wait`). An island new to the run, or one that was alone, claims at once. A shard whose final
checkpoint is visible is never claimed at all (`Progress`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class ClaimGate:
    """`may_claim(has_state)`: see the module docstring. `expected`: keys of the peers to wait for (None: not
    known); `peers()`: keys of the peers up now. `clock` is injectable for tests."""

    def __init__(self, returning: bool, expected: frozenset[str] | None, peers: Callable[[], set[str]],
                 max_wait: float, blind_wait: float, clock: Callable[[], float] = time.monotonic):
        self.expected, self.peers, self.clock = expected, peers, clock
        wait = 0.0 if not returning or expected == frozenset() else max_wait if expected else blind_wait
        self.opens_at = clock() + wait
        self._open = wait == 0.0
        self._told = False

    @property
    def open(self) -> bool:
        """Work with no visible state may be claimed now (and from now on)."""
        if not self._open and self.clock() >= self.opens_at:
            self._open = True
            log.info("claiming work nobody visibly started: the restart wait is over%s", self._missing())
        elif not self._open and self.expected and self.expected <= self.peers():
            self._open = True
            log.info("the %d islands seen before the restart are back", len(self.expected))
        return self._open

    def may_claim(self, has_state: Callable[[], bool]) -> bool:
        """True when the work may be claimed now: the gate is open, or `has_state()` (asked only while closed)."""
        if self.open or has_state():
            return True
        if not self._told:
            self._told = True
            who = (f"the {len(self.expected)} islands seen before the restart are back" if self.expected
                   else "the islands that may hold it had time to come back")
            log.info("returning to the run: work nobody visibly started waits until %s (at most %.0f s)", who,
                     self.opens_at - self.clock())
        return False

    def _missing(self) -> str:
        if not self.expected:
            return ""
        missing = self.expected - self.peers()
        return f" ({len(missing)} of the islands seen before did not come back)" if missing else ""
