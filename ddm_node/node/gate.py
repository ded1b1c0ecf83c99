"""When an island may claim work that nobody visibly started: the restart rule.

DHT records live in memory only; the training state lives in the islands' work dirs. After a whole-swarm
restart (`docker compose down` / `up` with the volumes kept, a power cut) the first island up is alone on an
empty DHT: every shard it holds nothing of looks untouched, and it used to claim one another island had
already finished and train it again from step 0 (and the router too).

The rule: an island that returns to a run (its work dir already holds the run's plan) announces what it holds
before it claims anything (`Island.start`), and during its first `wait` seconds claims only work whose state
it can see, here or announced in the swarm: a shard with a checkpoint or replica record, or one it holds
itself. Work with no visible state waits until the islands that may hold it had one lease TTL to come back
and announce it. A shard whose final checkpoint is visible is never claimed at all (`Progress`). An island
new to the run has nothing to come back for and claims at once (the first island of a fresh run must not
wait for peers that do not exist yet).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class ClaimGate:
    """`may_claim(has_state)`: see the module docstring. `clock` is injectable for tests."""

    def __init__(self, returning: bool, wait: float, clock: Callable[[], float] = time.monotonic):
        self.returning, self.wait, self.clock = returning, wait, clock
        self.opens_at = clock() + wait if returning else clock()
        self._told = False

    @property
    def open(self) -> bool:
        """Work with no visible state may be claimed now."""
        return self.clock() >= self.opens_at

    def may_claim(self, has_state: Callable[[], bool]) -> bool:
        """True when the work may be claimed now: the gate is open, or `has_state()` (asked only while closed)."""
        if self.open or has_state():
            return True
        if not self._told:
            self._told = True
            log.info("returning to the run: work nobody visibly started waits %.0f s for the islands that may "
                     "hold it to come back and announce it", self.opens_at - self.clock())
        return False
