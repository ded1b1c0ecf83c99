"""What a holder may cost a download, and the process's memory of holders that cost too much.

A holder that stalls (sends nothing) or trickles (a burst, then silence) must not hold a download:
- `Budget`: per holder and per file, over ALL of that holder's attempts: its first bytes within
  `connect` seconds, then on average at least `min_rate` bytes/s, and at most `max_time` seconds in all.
  A holder over budget is dropped for that file. When no running holder has delivered anything for
  `connect` seconds, the download races the other holders (`race` at once; see download.fetch_file).
- `SLOW`: holders dropped as slow, remembered for `remember` seconds within the process; they are tried
  after every other holder (never skipped: a slow copy beats none).

The defaults are module constants read when a `Budget` is made (`Budget.default()`), so a test or a
deployment can change them in one place. Reasoning for each value: docs/TRANSFER.md ("Budgets").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

CONNECT_TIMEOUT = 10.0  # seconds: a holder's first bytes, and the longest silence before other holders are raced
MIN_RATE = 128 * 1024  # bytes/s a holder must average over all its attempts on one file, after CONNECT_TIMEOUT
MAX_TIME = 3600.0  # seconds one holder may spend on one file in one call, whatever its rate
REMEMBER = 600.0  # seconds a holder dropped as slow is tried last
RACE = 8  # holders streaming one file at once, at most
KEEP = 2  # lanes kept once more than this many deliver (the others are paused, not blamed)
SLOW_MEMORY = 4096  # holders remembered at most (the oldest entries go first)


@dataclass(frozen=True)
class Budget:
    connect: float = CONNECT_TIMEOUT
    min_rate: float = MIN_RATE
    max_time: float = MAX_TIME
    remember: float = REMEMBER
    race: int = RACE
    keep: int = KEEP

    @classmethod
    def default(cls) -> Budget:
        """A budget from the module constants as they are now (not as they were at import)."""
        return cls(CONNECT_TIMEOUT, MIN_RATE, MAX_TIME, REMEMBER, max(1, RACE), max(1, KEEP))

    def over(self, received: int, spent: float) -> str | None:
        """Why a holder that delivered `received` bytes in `spent` seconds of attempts is over budget, or None."""
        if spent > self.max_time:
            return f"too slow: {received} bytes in {spent:.1f} s, over the {self.max_time:g} s a holder may take"
        if spent > self.connect and received < self.min_rate * (spent - self.connect):
            return (f"too slow: {received} bytes in {spent:.1f} s of attempts (at least {self.min_rate:.0f} bytes/s "
                    f"after the first {self.connect:g} s)")
        return None


class Clock:
    """One holder's account in one download: bytes and seconds over all its attempts (running or not)."""

    def __init__(self) -> None:
        self.received = 0
        self._spent = 0.0
        self._since: float | None = None

    def start(self, now: float) -> None:
        if self._since is None:
            self._since = now

    def stop(self, now: float) -> None:
        if self._since is not None:
            self._spent += now - self._since
            self._since = None

    def spent(self, now: float) -> float:
        return self._spent + (now - self._since if self._since is not None else 0.0)


class SlowHolders:
    """Holders dropped as slow, each until its entry expires. Thread-safe and bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, tuple[float, str]] = {}

    def add(self, holder: str, reason: str, seconds: float | None = None) -> None:
        seconds = REMEMBER if seconds is None else seconds
        with self._lock:
            self._until.pop(holder, None)
            self._until[holder] = (time.monotonic() + seconds, reason)
            while len(self._until) > SLOW_MEMORY:
                self._until.pop(next(iter(self._until)))

    def __contains__(self, holder: str) -> bool:
        with self._lock:
            entry = self._until.get(holder)
            if entry is not None and entry[0] <= time.monotonic():
                del self._until[holder]
                entry = None
            return entry is not None

    def reason(self, holder: str) -> str | None:
        with self._lock:
            entry = self._until.get(holder)
            return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def order(self, holders: Iterable[str]) -> list[str]:
        """`holders` without duplicates, the remembered slow ones last (each group in its given order)."""
        unique = list(dict.fromkeys(holders))
        return [h for h in unique if h not in self] + [h for h in unique if h in self]

    def clear(self) -> None:
        with self._lock:
            self._until.clear()


SLOW = SlowHolders()
