"""Live training progress from a DDP worker group to its supervisor: rank 0 writes the step and the losses read
since its last write to WORK/workers/shard_K/progress.json (atomically, at most once per `every` seconds); the
supervisor reads it at each poll and hands the values to the daemon's `on_losses` (live stats, heartbeat)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ddm_node.core.errors import DDMError
from ddm_node.core.jsonsafe import load_file
from ddm_node.core.manifest import write_atomic

PROGRESS_FILE = "progress.json"
MAX_LOSSES = 64  # losses kept per write (the newest)
MAX_BYTES = 16 * 1024


class ProgressWriter:
    """Rank 0's `on_losses` hook (see the module docstring). A write that fails is skipped, never fatal."""

    def __init__(self, path: Path, every: float = 1.0):
        self.path, self.every = Path(path), every
        self._losses: list[float] = []
        self._last = 0.0

    def __call__(self, step: int, losses: list[float]) -> None:
        self._losses = (self._losses + [v for v in losses if math.isfinite(v)])[-MAX_LOSSES:]
        if time.monotonic() - self._last < self.every:
            return
        try:
            write_atomic(self.path, json.dumps({"step": step, "losses": self._losses}).encode())
        except OSError:
            return
        self._losses, self._last = [], time.monotonic()


class ProgressReader:
    """The supervisor's side: `read()` gives (step, losses) when the file changed since the last read, else None."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._seen: int | None = None

    def read(self) -> tuple[int, list[float]] | None:
        try:
            stamp = self.path.stat().st_mtime_ns
            if stamp == self._seen:
                return None
            self._seen = stamp
            data = load_file(self.path, max_bytes=MAX_BYTES)
        except (OSError, DDMError):
            return None
        if not isinstance(data, dict):
            return None
        step, losses = data.get("step"), data.get("losses", [])
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(losses, list):
            return None
        return step, [float(v) for v in losses if isinstance(v, (int, float)) and not isinstance(v, bool)]
