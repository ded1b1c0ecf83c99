"""Logging for every `ddm-node` command, set up in one place: level, console format, file, JSON lines.

`start` and `dashboard` log at INFO by default (a node that talks), other commands at WARNING; each `-v`
lowers the level one step, each `-q` raises it. The flags are accepted before and after the subcommand.
On a terminal the console handler is rich's (log lines and progress bars share one console); otherwise
plain lines. `--log-format json` writes one JSON object per line (to the console and the file);
`--log-file PATH` adds a size-rotated file.

A failing start-up must still end in one error line (a clear one-line error for bad input), so `start`
holds its INFO lines back from the console until the island is ready (`release_held`, called on its ready
event) and drops them when it fails before that; warnings pass at once, and the log file gets everything.
With -v nothing is held.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import sys
import time
from collections import deque

CHATTY = ("start", "dashboard")  # commands that log at INFO by default
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE_BYTES = 10 << 20  # per file, then rotated
LOG_FILE_BACKUPS = 5
HOLD_MAX = 500  # INFO records held back until ready (the oldest are dropped past this)
_console = None  # the stderr Console shared with progress bars, once made
_hold: HoldUntilReady | None = None


def add_log_flags(parser: argparse.ArgumentParser, in_subcommand: bool) -> None:
    """-v/-q, --log-file, --log-format. In a subcommand the defaults are suppressed, so a flag given before the
    subcommand is not reset by the subcommand's own default."""
    default = (lambda value: argparse.SUPPRESS) if in_subcommand else (lambda value: value)
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="count", default=default(0), help="more logging (repeatable)")
    group.add_argument("-q", "--quiet", action="count", default=default(0), help="less logging (repeatable)")
    group.add_argument("--log-file", default=default(None), metavar="PATH",
                       help=f"also log to PATH, rotated at {LOG_FILE_BYTES >> 20} MiB ({LOG_FILE_BACKUPS} kept)")
    group.add_argument("--log-format", choices=("text", "json"), default=default("text"),
                       help="json: one JSON object per line")


def level_for(command: str | None, verbose: int, quiet: int) -> int:
    base = logging.INFO if command in CHATTY else logging.WARNING
    return min(max(base + 10 * (quiet - verbose), logging.DEBUG), logging.CRITICAL)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"t": round(record.created, 3),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{record.msecs:03.0f}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


class HoldUntilReady(logging.Filter):
    """A console handler's filter: records below WARNING wait until `release()`, then go out in order."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler
        self.held: deque[logging.LogRecord] | None = deque(maxlen=HOLD_MAX)

    def filter(self, record: logging.LogRecord) -> bool:
        held = self.held
        if held is None or record.levelno >= logging.WARNING:
            return True
        held.append(record)
        return False

    def release(self) -> None:
        held, self.held = self.held, None
        for record in held or ():
            self.handler.handle(record)


def release_held() -> None:
    """The node is ready: print the INFO lines held back since start-up, and print them as they come from now."""
    if _hold is not None:
        _hold.release()


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a redirected stream, a test's capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it once; the property always answers sys.stderr
        pass


class ConsoleHandler(logging.Handler):
    """On a terminal: lines through the rich console that progress bars use (they scroll above the bars), never cut
    into columns (a multiaddr stays one piece to copy), warnings and errors in colour."""

    STYLES = {logging.WARNING: "yellow", logging.ERROR: "bold red", logging.CRITICAL: "bold red"}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stderr_console().print(self.format(record), markup=False, highlight=False, soft_wrap=True,
                                   style=self.STYLES.get(record.levelno))
        except Exception:
            self.handleError(record)


def stderr_console():
    """The rich Console on stderr that log lines and progress bars share."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())  # a log file's lines are not cut at 80
    return _console


def setup_logging(command: str | None, verbose: int = 0, quiet: int = 0, log_file: str | None = None,
                  log_format: str = "text") -> int:
    """Configure the root logger (replacing the handlers an earlier call added, and only those); returns the level."""
    global _hold
    level = level_for(command, verbose, quiet)
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "ddm_node", False)]:
        root.removeHandler(h)
        h.close()
    if log_format == "json":
        console: logging.Handler = StderrHandler()
        console.setFormatter(JsonFormatter())
    elif sys.stderr.isatty():
        console = ConsoleHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    else:
        console = StderrHandler()
        console.setFormatter(logging.Formatter(FORMAT))
    _hold = HoldUntilReady(console) if command == "start" and verbose == 0 else None
    if _hold is not None:
        console.addFilter(_hold)
    handlers = [console]
    if log_file:
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT))
        handlers.append(handler)
    for h in handlers:
        h.ddm_node = True  # ours: a later call replaces it; others' (a test's capture) stay
        root.addHandler(h)
    root.setLevel(level)
    return level
