"""`ddm-node status`: what the swarm says about a run, one row per shard plus the router job.

Everything shown is read from the DHT (records are owner-signed but their claims are not verified
here: `assemble` verifies artifacts). Rules per shard:
- done: some peer announces a final checkpoint at or past the plan's step budget;
- training: a live claim holds the shard (the owner is the claim winner, see swarm/claims.py);
- orphaned: not done, no live claim, but checkpoints, replicas or stale claims exist;
- pending: nothing about the shard is in the DHT.
The router job uses claim slot K (the number of shards), as the daemon does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field

from ddm_node.data.plan import Plan
from ddm_node.exchange.peers import fetch_plan, join_swarm
from ddm_node.swarm.claims import winner
from ddm_node.swarm.dht import Swarm, dht_time
from ddm_node.swarm.records import PeerRecord

log = logging.getLogger(__name__)


@dataclass
class Owner:
    """The live claim holder of a shard (or of the router job)."""

    peer_id: str
    public_key: str


@dataclass
class ShardStatus:
    shard: int
    state: str  # done | training | orphaned | pending
    owner: Owner | None
    step: int | None  # the owner's newest announced step (else the newest checkpoint record's)
    target: int
    heartbeat_age: float | None  # seconds since the owner's last heartbeat (DHT time)
    checkpoints: int  # checkpoint records (one per publisher)
    distinct_checkpoints: int  # distinct expert manifests among them
    replicas: int  # replica records (one per mirror)
    newest_step: int | None  # newest step in any checkpoint or replica record


@dataclass
class RouterStatus:
    state: str  # done | training | pending | disabled
    owner: Owner | None
    heartbeat_age: float | None
    records: int
    step: int | None
    publisher: str | None  # of the newest router record


@dataclass
class PeerStatus:
    peer_id: str
    public_key: str
    grpc: str
    version: str
    state: str
    shard: int
    heartbeat_age: float
    maddrs: list[str] = field(default_factory=list)  # where to dial it: any one is an --initial-peers value


@dataclass
class RunStatus:
    run_id: str
    dataset: str
    num_shards: int
    target: int
    router_job: bool
    shards: list[ShardStatus]
    router: RouterStatus
    peers: list[PeerStatus] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _age(peers: dict[str, PeerRecord], key: str | None, now: float) -> float | None:
    rec = peers.get(key) if key else None
    return None if rec is None else max(0.0, now - rec.heartbeat)


def shard_status(swarm: Swarm, k: int, target: int, peers: dict[str, PeerRecord], now: float) -> ShardStatus:
    """One shard's row from its claims, checkpoint and replica records."""
    claims = swarm.claims(k)
    ckpts = swarm.checkpoints(k)
    reps = swarm.replicas(k)
    best = winner(claims, now)
    owner = Owner(best.peer_id, best.public_key) if best else None
    steps = [r.step for r in ckpts] + [r.step for r in reps]
    own = [r.step for r in ckpts if owner and r.publisher == owner.public_key]
    step = max(own) if own else (max(r.step for r in ckpts) if ckpts else None)
    if any(r.final and r.step >= target for r in ckpts):
        state = "done"
    elif owner is not None:
        state = "training"
    elif ckpts or reps or claims:
        state = "orphaned"
    else:
        state = "pending"
    return ShardStatus(shard=k, state=state, owner=owner, step=step, target=target,
                       heartbeat_age=_age(peers, owner.public_key if owner else None, now),
                       checkpoints=len(ckpts), distinct_checkpoints=len({r.expert_manifest for r in ckpts}),
                       replicas=len(reps), newest_step=max(steps) if steps else None)


def router_status(swarm: Swarm, slot: int, enabled: bool, peers: dict[str, PeerRecord], now: float) -> RouterStatus:
    """The router job's row: its claim (slot K) and the router records."""
    routers = sorted(swarm.routers(), key=lambda r: r.step, reverse=True)
    best = winner(swarm.claims(slot), now)
    owner = Owner(best.peer_id, best.public_key) if best else None
    if routers:
        state = "done"
    elif owner is not None:
        state = "training"
    else:
        state = "pending" if enabled else "disabled"
    return RouterStatus(state=state, owner=owner, heartbeat_age=_age(peers, owner.public_key if owner else None, now),
                        records=len(routers), step=routers[0].step if routers else None,
                        publisher=routers[0].publisher if routers else None)


def collect_status(swarm: Swarm, plan: Plan) -> RunStatus:
    """Read every record of the run and summarize it."""
    cfg = plan.cfg
    target = cfg.train.steps
    now = dht_time()
    peer_records = {p.public_key: p for p in swarm.peers()}
    shards = [shard_status(swarm, s.index, target, peer_records, now) for s in plan.shards]
    router = router_status(swarm, len(plan.shards), cfg.swarm.router_job, peer_records, now)
    peers = [PeerStatus(p.peer_id, p.public_key, p.grpc, p.version, p.state, p.shard, max(0.0, now - p.heartbeat),
                        list(p.maddrs)) for p in sorted(peer_records.values(), key=lambda p: p.peer_id)]
    return RunStatus(run_id=plan.run_id, dataset=plan.dataset, num_shards=len(plan.shards), target=target,
                     router_job=cfg.swarm.router_job, shards=shards, router=router, peers=peers)


# ------------------------------------------------------------------------------------------- rendering

_STATE_STYLE = {"done": "green", "training": "cyan", "orphaned": "yellow", "pending": "dim", "disabled": "dim"}


def _short_owner(owner: Owner | None) -> str:
    return "-" if owner is None else f"{owner.peer_id[-8:]} ({owner.public_key[:8]})"


def _opt(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render(status: RunStatus):
    """Rich tables: the shards (plus the router row) and the peers."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"run {status.run_id[:16]} ({status.dataset}, {status.num_shards} shards, "
                        f"{status.target} steps each)")
    for name, justify in (("shard", "right"), ("state", "left"), ("owner", "left"), ("step / target", "right"),
                          ("heartbeat", "right"), ("checkpoints", "right"), ("replicas", "right"),
                          ("newest step", "right")):
        table.add_column(name, justify=justify)
    for s in status.shards:
        ckpts = f"{s.checkpoints}" + (f" ({s.distinct_checkpoints} distinct)" if s.distinct_checkpoints != s.checkpoints
                                      else "")
        table.add_row(str(s.shard), f"[{_STATE_STYLE[s.state]}]{s.state}[/]", _short_owner(s.owner),
                      f"{_opt(s.step)} / {s.target}", _opt(s.heartbeat_age, "{:.1f}s ago"), ckpts, str(s.replicas),
                      _opt(s.newest_step))
    r = status.router
    table.add_row("router", f"[{_STATE_STYLE[r.state]}]{r.state}[/]", _short_owner(r.owner), _opt(r.step),
                  _opt(r.heartbeat_age, "{:.1f}s ago"), str(r.records), "-", _opt(r.step))
    peers = Table(title=f"{len(status.peers)} peers")
    for name in ("peer", "key", "state", "shard", "grpc", "version", "heartbeat", "DHT address"):
        peers.add_column(name)
    for p in status.peers:
        peers.add_row(p.peer_id[-8:], p.public_key[:8], p.state, "-" if p.shard < 0 else str(p.shard), p.grpc or "-",
                      p.version, f"{p.heartbeat_age:.1f}s ago", p.maddrs[0] if p.maddrs else "-")
    return Group(table, peers)


def run_status(initial_peers: list[str], run_id: str, as_json: bool = False, timeout: float = 20.0) -> int:
    """`ddm-node status`: a table (or JSON) of the run's shards, router job and peers on stdout."""
    swarm = join_swarm(initial_peers, run_id)
    try:
        plan = fetch_plan(swarm, run_id, timeout=timeout)
        status = collect_status(swarm, plan)
    finally:
        swarm.shutdown()
    if as_json:
        print(json.dumps(status.to_json(), sort_keys=True))
    else:
        from rich.console import Console

        Console(file=sys.stdout).print(render(status))
    return 0
