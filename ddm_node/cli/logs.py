"""Logging for every `ddm-node` command, set up in one place: level, console format, file, JSON lines.

`start` and `dashboard` log at INFO by default (a node that talks), other commands at WARNING; each `-v`
lowers the level one step, each `-q` raises it. The flags are accepted before and after the subcommand.
On a terminal the console handler is rich's (log lines and progress bars share one console); otherwise
plain lines. `--log-format json` writes one JSON object per line (to the console and the file);
`--log-file PATH` adds a size-rotated file.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import sys
import time

CHATTY = ("start", "dashboard")  # commands that log at INFO by default
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE_BYTES = 10 << 20  # per file, then rotated
LOG_FILE_BACKUPS = 5
_console = None  # the stderr Console shared with progress bars, once made


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


def stderr_console():
    """The rich Console on stderr that log lines and progress bars share."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())  # a log file's lines are not cut at 80
    return _console


def setup_logging(command: str | None, verbose: int = 0, quiet: int = 0, log_file: str | None = None,
                  log_format: str = "text") -> int:
    """Configure the root logger (replacing handlers set before); returns the level."""
    level = level_for(command, verbose, quiet)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if log_format == "json":
        console: logging.Handler = logging.StreamHandler(sys.stderr)
        console.setFormatter(JsonFormatter())
    elif sys.stderr.isatty():
        from rich.logging import RichHandler

        console = RichHandler(console=stderr_console(), show_path=False, rich_tracebacks=False, markup=False)
        console.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(console)
    if log_file:
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    return level
