"""What `ddm-node start` decides before an island runs, checked, and how a node's swarm settings meet the plan's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ddm_node.core.config import Config, SwarmConfig, from_dict, to_dict
from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.data.plan import Plan

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
    announce_host: str | None = None  # the address peers dial when host is a wildcard like 0.0.0.0
    swarm_overrides: dict = field(default_factory=dict)  # a --config file's swarm section (timing only)
    config_source: str = "swarm config"  # where swarm_overrides came from, named in errors
    device: str | None = None
    exit_when_done: bool = False
    plan_timeout: float = 60.0
    nproc_per_node: int | None = None  # None: the plan's train.nproc_per_node (default 1)
    identity_path: Path | None = None  # the key file, for worker processes that sign checkpoints


def check_flags(initial_peers: list[str], host: str, announce_host: str | None, run_id: str | None) -> None:
    """The network and run flags of `ddm-node start`; bad input -> DDMError naming the flag."""
    for maddr in initial_peers:
        if not maddr.startswith("/") or "/p2p/" not in maddr:
            raise DDMError(f"--initial-peers: {maddr!r} is not a multiaddr like /ip4/1.2.3.4/tcp/31337/p2p/PEER_ID")
    if host in WILDCARD_HOSTS and not announce_host:
        raise DDMError(f"--host {host} listens everywhere but peers need one address to dial: "
                       "give --announce-host ADDRESS (and --dht-port)")
    if run_id is not None and (len(run_id) != 64 or any(c not in "0123456789abcdef" for c in run_id)):
        raise DDMError(f"--run: {run_id!r} is not a run id (64 hex characters printed by ddm-node partition)")


def swarm_config(plan: Plan, overrides: dict, source: str) -> SwarmConfig:
    """The plan's swarm settings with a node config's timing overrides, validated as a whole run config (so
    ranges that relate fields, like settle < lease_ttl, see the plan's values). The trusted keys are the plan's."""
    values = to_dict(plan.cfg.swarm)
    if "trusted_keys" in overrides and overrides["trusted_keys"] != values["trusted_keys"]:
        raise DDMError(f"{source}: swarm.trusted_keys comes from the plan; a node config may not change it")
    return from_dict({**to_dict(plan.cfg), "swarm": {**values, **overrides}}, Config, source=source).swarm
