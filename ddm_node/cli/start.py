"""`ddm-node start`: its flags, and the island options they make (bad input -> one-line DDMError)."""

from __future__ import annotations

from pathlib import Path

from ddm_node.cli.flags import add_set_flag, positive
from ddm_node.cli.observing import add_monitor_flags, island_observers
from ddm_node.core.errors import DDMError


def add_start_parser(sub) -> None:
    """The `start` subcommand's parser."""
    p = sub.add_parser("start", help="run an island: claim shards, train, publish, mirror, serve")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan directory or plan.json (starts or joins the run it defines)")
    src.add_argument("--run", dest="run_id", metavar="RUN_ID", help="join a run; the plan is fetched from a peer")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                   help="DHT multiaddrs of any running peers (none: start a new swarm)")
    p.add_argument("--identity", required=True, help="Ed25519 key file (ddm-node keygen)")
    p.add_argument("--work-dir", required=True, help="where checkpoints, mirrors and the plan live")
    p.add_argument("--config", help="YAML whose swarm section (timing) and train.nproc_per_node apply to this node")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (DHT and gRPC)")
    p.add_argument("--announce-host", help="address (IP or DNS name) peers dial, when not --host: a wildcard "
                                           "--host such as 0.0.0.0, or a NAT's public address")
    p.add_argument("--grpc-port", type=positive("--grpc-port"), default=0)
    p.add_argument("--dht-port", type=positive("--dht-port"), default=0)
    p.add_argument("--announce-port", type=positive("--announce-port"), default=None, metavar="PORT",
                   help="DHT port peers dial, when a port mapping differs from --dht-port (default: --dht-port)")
    p.add_argument("--announce-grpc-port", type=positive("--announce-grpc-port"), default=None, metavar="PORT",
                   help="gRPC port peers dial, when a port mapping differs from --grpc-port (default: --grpc-port)")
    p.add_argument("--join-wait", type=float, default=None, metavar="SECONDS",
                   help="after a restart, hold back shards nobody visibly started this long, so the islands "
                        "holding them can come back first (default: the run's lease TTL)")
    p.add_argument("--leave-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, keep serving up to this long until a peer holds our newest "
                        "checkpoints (default 30; a second signal leaves at once)")
    p.add_argument("--announce-file", help="write peer id, DHT multiaddrs and gRPC address here when ready")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=positive("--threads"), default=0, help="torch threads (0: torch default)")
    add_set_flag(p, "this node's swarm.* timing and train.nproc_per_node")
    p.add_argument("--exit-when-done", action="store_true", help="exit once every shard and the router are done")
    p.add_argument("--nproc-per-node", type=positive("--nproc-per-node"), default=None, metavar="N",
                   help="train with N DDP processes (one per GPU) under torchrun; default: the config's "
                        "train.nproc_per_node (1)")
    add_monitor_flags(p)
    p.set_defaults(func=cmd_start)


def cmd_start(args) -> int:
    import signal
    import threading

    # A SIGTERM during the seconds of imports below must still mean "leave cleanly", not a killed process.
    early = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: early.set())
    signal.signal(signal.SIGINT, lambda *_: early.set())
    from ddm_node.node.island import run_island

    opts = island_options(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with island_observers(args) as attach:
        return run_island(opts, early, attach)


def island_options(args):
    """IslandOptions from parsed `ddm-node start` arguments (bad input -> DDMError)."""
    from ddm_node.core.config import load_config, parse_set
    from ddm_node.core.identity import Identity
    from ddm_node.node.options import IslandOptions, check_flags
    from ddm_node.train.supervisor import resolve_nproc

    overrides = {}
    if args.config:
        import yaml

        load_config(args.config)  # full validation with file-named errors
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        overrides = raw.get("swarm", {}) or {}
    sets = dict(parse_set(text) for text in args.sets)  # a node may change its timing and process count only
    nproc = sets.pop("train.nproc_per_node", None) if args.nproc_per_node is None else args.nproc_per_node
    sets.pop("train.nproc_per_node", None)  # the flag wins over --set
    if any(not key.startswith("swarm.") for key in sets):
        raise DDMError(f"--set {next(k for k in sets if not k.startswith('swarm.'))}: start applies swarm.* and "
                       "train.nproc_per_node only; the run's other settings are fixed by partition")
    overrides = {**overrides, **{key.removeprefix("swarm."): value for key, value in sets.items()}}
    opts = IslandOptions(
        identity=Identity.load(args.identity), work_dir=Path(args.work_dir),
        plan_path=Path(args.plan) if args.plan else None, run_id=args.run_id, initial_peers=list(args.initial_peers),
        host=args.host, grpc_port=args.grpc_port, dht_port=args.dht_port,
        announce_file=Path(args.announce_file) if args.announce_file else None,
        announce_host=args.announce_host, announce_port=args.announce_port,
        announce_grpc_port=args.announce_grpc_port, join_wait=args.join_wait, leave_timeout=args.leave_timeout,
        swarm_overrides=overrides, config_source=(args.config or "swarm config") + (" with --set" if args.sets else ""),
        device=args.device, exit_when_done=args.exit_when_done, identity_path=Path(args.identity),
        nproc_per_node=resolve_nproc(nproc, args.config))
    check_flags(opts)
    return opts
