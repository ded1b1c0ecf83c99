"""Live training progress of one shard: step, smoothed loss, images/s and ETA, as the trainer reports losses.

Fed by the training loop (`update`, from the training thread), read by the heartbeat (the island's peer
record on the DHT), the metrics exporter, the dashboard and the console (other threads): every method
takes one lock. The loss curve is kept bounded (`MAX_POINTS`, thinned by halves), so a long run costs
the same memory as a short one.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

LOSS_SMOOTHING = 0.98  # per-step EMA factor of the smoothed loss
RATE_WINDOW = 30.0  # seconds of (time, step) samples the rate is measured over
MIN_RATE_SPAN = 0.5  # seconds: no rate before the window spans this much
MAX_POINTS = 240  # points of the loss curve kept


@dataclass(frozen=True)
class LiveStats:
    """One shard's progress as of `t` (wall clock). None: not known yet (no step timed, no loss read)."""

    shard: int
    step: int
    target: int
    images_per_s: float | None
    loss: float | None
    eta_s: float | None
    t: float


class LiveProgress:
    """See the module docstring. `images_per_step`: samples one optimizer step consumes (batch x grad_accum)."""

    def __init__(self, shard: int, target: int, images_per_step: int, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.shard, self.target, self.images_per_step = shard, target, images_per_step
        self._clock, self._wall = clock, wall
        self._lock = threading.Lock()
        self._step = 0
        self._loss: float | None = None
        self._debias = 0.0  # 1 - LOSS_SMOOTHING**n: the EMA's weight so far (bias correction)
        self._samples: deque[tuple[float, int]] = deque(maxlen=256)
        self._curve: list[tuple[int, float]] = []
        self._curve_every = 1
        self._t = wall()

    def start(self, step: int) -> None:
        """Training (re)starts at `step`: the rate is measured from here."""
        with self._lock:
            self._step = step
            self._samples.clear()
            self._samples.append((self._clock(), step))
            self._t = self._wall()

    def update(self, step: int, losses: Iterable[float]) -> None:
        """The trainer reached `step`; `losses` are the per-step losses read since the last call (finite ones kept)."""
        now = self._clock()
        with self._lock:
            for value in losses:
                if math.isfinite(value):
                    prev = 0.0 if self._loss is None else self._loss * self._debias
                    self._debias = LOSS_SMOOTHING * self._debias + (1 - LOSS_SMOOTHING)
                    self._loss = (LOSS_SMOOTHING * prev + (1 - LOSS_SMOOTHING) * value) / self._debias
            self._step = step
            self._samples.append((now, step))
            while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW:
                self._samples.popleft()
            self._t = self._wall()
            if self._loss is not None and (not self._curve or step - self._curve[-1][0] >= self._curve_every):
                self._curve.append((step, self._loss))
                if len(self._curve) > MAX_POINTS:
                    self._curve = self._curve[::2]
                    self._curve_every *= 2

    def _steps_per_s(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if t1 - t0 < MIN_RATE_SPAN or s1 < s0:
            return None
        return (s1 - s0) / (t1 - t0)

    def stats(self) -> LiveStats:
        with self._lock:
            rate = self._steps_per_s()
            eta = None if not rate else max(0, self.target - self._step) / rate
            return LiveStats(self.shard, self._step, self.target,
                             None if rate is None else rate * self.images_per_step, self._loss, eta, self._t)

    def curve(self) -> list[tuple[int, float]]:
        """(step, smoothed loss) points, oldest first, at most MAX_POINTS."""
        with self._lock:
            return list(self._curve)
