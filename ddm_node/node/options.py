"""What `ddm-node start` decides before an island runs, checked, and how a node's swarm settings meet the plan's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ddm_node.core.config import Config, SwarmConfig, from_dict, to_dict
from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.data.plan import Plan
from ddm_node.swarm.own_addresses import announce_maddrs, check_host, check_initial_peers

WILDCARD_HOSTS = ("0.0.0.0", "::")


@dataclass
class IslandOptions:
    """Everything `ddm-node start` decides before the island runs."""

    identity: Identity
    work_dir: Path
    plan_path: Path | None = None
    run_id: str | None = None
    initial_peers: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    grpc_port: int = 0
    dht_port: int = 0
    announce_file: Path | None = None
    announce_host: str | None = None  # the address peers dial (a wildcard host, NAT): IP or DNS name
    announce_port: int | None = None  # the DHT port peers dial, when a port mapping changes it (default dht_port)
    announce_grpc_port: int | None = None  # the gRPC port peers dial, likewise (default grpc_port)
    join_wait: float | None = None  # restart wait for work nobody visibly started (None: one lease TTL)
    leave_timeout: float = 30.0  # after a stop, serve up to this long until a peer holds our checkpoints
    swarm_overrides: dict = field(default_factory=dict)  # a --config file's swarm section (timing only)
    config_source: str = "swarm config"  # where swarm_overrides came from, named in errors
    device: str | None = None
    exit_when_done: bool = False
    plan_timeout: float = 60.0
    nproc_per_node: int | None = None  # None: the plan's train.nproc_per_node (default 1)
    identity_path: Path | None = None  # the key file, for worker processes that sign checkpoints

    def dht_announce(self) -> list[str] | None:
        """The DHT multiaddrs to announce (None: the addresses p2pd listens on)."""
        if self.announce_host is None and self.announce_port is None:
            return None
        return announce_maddrs(self.announce_host or self.host, self.announce_port or self.dht_port)

    def grpc_announce(self, bound: str) -> str:
        """The gRPC address to announce, given the `host:port` the server bound."""
        host, _, port = bound.rpartition(":")
        return f"{self.announce_host or host}:{self.announce_grpc_port or port}"


def check_flags(opts: IslandOptions) -> None:
    """The network and run flags of `ddm-node start`; bad input -> DDMError naming the flag."""
    check_initial_peers(opts.initial_peers, "--initial-peers")
    if opts.host in WILDCARD_HOSTS and not opts.announce_host:
        raise DDMError(f"--host {opts.host} listens everywhere but peers need one address to dial: "
                       "give --announce-host ADDRESS (and --dht-port)")
    if opts.announce_host is not None:
        check_host(opts.announce_host, "--announce-host")
    for flag, port in (("--announce-port", opts.announce_port), ("--announce-grpc-port", opts.announce_grpc_port)):
        if port is not None and not 0 < port < 65536:
            raise DDMError(f"{flag} {port}: a TCP port is 1..65535")
    if opts.announce_port is None and opts.announce_host is not None and not opts.dht_port:
        raise DDMError("--announce-host needs a fixed DHT port for peers to dial: give --dht-port "
                       "(or --announce-port)")
    for flag, seconds in (("--join-wait", opts.join_wait), ("--leave-timeout", opts.leave_timeout)):
        if seconds is not None and not 0 <= seconds <= 3600:
            raise DDMError(f"{flag} {seconds:g}: seconds must be in [0, 3600]")
    run_id = opts.run_id
    if run_id is not None and (len(run_id) != 64 or any(c not in "0123456789abcdef" for c in run_id)):
        raise DDMError(f"--run: {run_id!r} is not a run id (64 hex characters printed by ddm-node partition)")


def swarm_config(plan: Plan, overrides: dict, source: str) -> SwarmConfig:
    """The plan's swarm settings with a node config's timing overrides, validated as a whole run config (so
    ranges that relate fields, like settle < lease_ttl, see the plan's values). The trusted keys are the plan's."""
    values = to_dict(plan.cfg.swarm)
    if "trusted_keys" in overrides and overrides["trusted_keys"] != values["trusted_keys"]:
        raise DDMError(f"{source}: swarm.trusted_keys comes from the plan; a node config may not change it")
    return from_dict({**to_dict(plan.cfg), "swarm": {**values, **overrides}}, Config, source=source).swarm
