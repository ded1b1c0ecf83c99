"""Optional TensorBoard scalars of an island's training (`--tensorboard DIR`, extra `ddm-node[tensorboard]`).

A thread writes the live loss, images/s and ETA of the shard being trained every `period` seconds, at the
trainer's step, under `shard_K/...`. Without the `tensorboard` package the flag is skipped with one warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from ddm_node.core.live import LiveProgress

log = logging.getLogger(__name__)


def summary_writer(log_dir: Path):
    """torch's SummaryWriter on `log_dir`, or None (with a warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("--tensorboard: the tensorboard package is not installed (pip install 'ddm-node[tensorboard]'); "
                    "skipping TensorBoard scalars")
        return None
    return SummaryWriter(log_dir=str(log_dir))


class ScalarWriter:
    """Writes the live training scalars to `writer` every `period` seconds (see the module docstring)."""

    def __init__(self, writer, live: Callable[[], LiveProgress | None], period: float = 10.0):
        self.writer, self.live, self.period = writer, live, period
        self._last: tuple[int, int] | None = None  # (shard, step) last written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tensorboard", daemon=True)

    def start(self) -> ScalarWriter:
        self._thread.start()
        return self

    def write(self) -> bool:
        """Write the current scalars once (unless nothing moved since the last write); True when written."""
        live = self.live()
        if live is None:
            return False
        s = live.stats()
        if self._last == (s.shard, s.step):
            return False
        for name, value in (("loss", s.loss), ("images_per_s", s.images_per_s), ("eta_s", s.eta_s)):
            if value is not None:
                self.writer.add_scalar(f"shard_{s.shard}/{name}", value, s.step)
        self.writer.flush()
        self._last = (s.shard, s.step)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.write()
            except Exception as exc:  # a full disk or a writer bug must not end the node
                log.warning("tensorboard: %s", exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.write()
            self.writer.close()
        except Exception as exc:
            log.warning("tensorboard: %s", exc)
