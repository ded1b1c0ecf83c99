"""An island's training progress on the console while `ddm-node start` runs.

On a terminal: a rich progress bar per shard being trained (step, images/s, loss, ETA), on the console that
log lines share (so lines scroll above the bars). Otherwise: one log line per shard every `LINE_EVERY`
seconds while it trains. Read from the island's `NodeState.live`; never touches the training thread.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from ddm_node.cli.logs import stderr_console
from ddm_node.clients.status import human_duration
from ddm_node.core.live import LiveStats
from ddm_node.node.state import NodeState

log = logging.getLogger("ddm_node.progress")
LINE_EVERY = 15.0  # seconds between progress lines when stderr is not a terminal
BAR_EVERY = 0.5  # seconds between bar refreshes


def progress_line(s: LiveStats) -> str:
    pct = 100.0 * s.step / s.target if s.target else 0.0
    rate = "-" if s.images_per_s is None else f"{s.images_per_s:.0f}"
    loss = "-" if s.loss is None else f"{s.loss:.4f}"
    return (f"shard {s.shard}: step {s.step}/{s.target} ({pct:.0f}%), {rate} img/s, loss {loss}, "
            f"ETA {human_duration(s.eta_s)}")


class ConsoleProgress:
    """See the module docstring; `start()` a daemon thread, `close()` it."""

    def __init__(self, state: NodeState, tty: bool | None = None):
        self.state = state
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._bars if self.tty else self._lines, name="progress", daemon=True)

    def start(self) -> ConsoleProgress:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _lines(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(1.0):
            live = self.state.live
            if live is None or time.monotonic() - last < LINE_EVERY:
                continue
            last = time.monotonic()
            log.info("%s", progress_line(live.stats()))

    def _bars(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        columns = (TextColumn("shard {task.fields[shard]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"))
        tasks: dict[int, int] = {}
        with Progress(*columns, console=stderr_console(), transient=True) as bars:
            while not self._stop.wait(BAR_EVERY):
                live = self.state.live
                current = None if live is None else live.stats()
                for shard, task in list(tasks.items()):
                    if current is None or current.shard != shard:
                        bars.remove_task(task)
                        del tasks[shard]
                if current is None:
                    continue
                if current.shard not in tasks:
                    tasks[current.shard] = bars.add_task("", total=current.target, shard=current.shard, info="")
                rate = "-" if current.images_per_s is None else f"{current.images_per_s:.0f}"
                loss = "-" if current.loss is None else f"{current.loss:.4f}"
                bars.update(tasks[current.shard], completed=current.step,
                            info=f"{rate} img/s  loss {loss}  ETA {human_duration(current.eta_s)}")
