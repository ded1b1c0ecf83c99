"""The command line of watching a run: `start`'s metrics, dashboard and TensorBoard flags, the console progress
it attaches to the island, and `ddm-node dashboard`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def add_monitor_flags(p: argparse.ArgumentParser, required_port: bool = False) -> None:
    """--metrics-port (and host), --samples; on `start` also --tensorboard."""
    g = p.add_argument_group("watching")
    g.add_argument("--metrics-port", type=port, default=0 if required_port else None, metavar="PORT",
                   help="serve Prometheus /metrics and the dashboard at / on PORT (0: a free port, logged)"
                   + ("" if required_port else "; off by default"))
    g.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics and dashboard server listens on (default 127.0.0.1)")
    g.add_argument("--samples", metavar="PATH",
                   help="a sample grid PNG (or a folder: its newest PNG) for the dashboard, e.g. the output of "
                        "`ddm-node sample` on the assembled ensemble")
    if not required_port:
        g.add_argument("--tensorboard", metavar="DIR",
                       help="write TensorBoard scalars (loss, images/s, ETA) to DIR (extra: ddm-node[tensorboard])")


def settings(args):
    from ddm_node.observe.watch import MonitorSettings

    return MonitorSettings(port=args.metrics_port, host=args.metrics_host,
                           tensorboard=Path(args.tensorboard) if getattr(args, "tensorboard", None) else None,
                           samples=Path(args.samples) if args.samples else None)


@contextmanager
def island_observers(args) -> Iterator[Callable]:
    """An `attach(island)` for run_island: the monitor (when asked for) and the console progress, both closed when
    the island's run ends."""
    with ExitStack() as stack:
        def attach(island) -> None:
            from ddm_node.cli.logs import release_held
            from ddm_node.cli.progress import ConsoleProgress
            from ddm_node.core.events import EventKind
            from ddm_node.observe.watch import IslandMonitor

            island.events.subscribe(lambda event: event.kind is EventKind.START and release_held())
            monitor = IslandMonitor(island, settings(args))
            stack.callback(monitor.close)
            monitor.start()
            progress = ConsoleProgress(island.state)
            stack.callback(progress.close)
            progress.start()

        yield attach


def add_dashboard_parser(sub) -> None:
    p = sub.add_parser("dashboard", help="serve the swarm dashboard from a DHT client (no training)")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    p.add_argument("--run", dest="run_id", required=True, metavar="RUN_ID")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the plan")
    add_monitor_flags(p, required_port=True)
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args) -> int:
    import signal
    import threading

    from ddm_node.observe.watch import run_dashboard
    from ddm_node.swarm.keys import check_run_id
    from ddm_node.swarm.own_addresses import check_initial_peers

    check_initial_peers(args.initial_peers, "--initial-peers")
    check_run_id(args.run_id)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return run_dashboard(args.initial_peers, args.run_id, settings(args), stop, timeout=args.timeout)
