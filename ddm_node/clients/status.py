"""`ddm-node status`: what the swarm says about a run, one row per shard plus the router job.

Everything shown is read from the DHT (records are owner-signed but their claims are not verified
here: `assemble` verifies artifacts). Rules per shard:
- done: some peer announces a final checkpoint at or past the plan's step budget;
- training: a live claim holds the shard (the owner is the claim winner, see swarm/claims.py);
- orphaned: not done, no live claim, but checkpoints, replicas or stale claims exist;
- pending: nothing about the shard is in the DHT.
The router job uses claim slot K (the number of shards), as the daemon does. A training shard's step, loss,
images/s and ETA are live: its owner publishes them in its peer record at every heartbeat, so they show
before its first checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
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
    step: int | None  # the owner's live step, else its newest announced step, else the newest checkpoint record's
    target: int
    heartbeat_age: float | None  # seconds since the owner's last heartbeat (DHT time)
    checkpoints: int  # checkpoint records (one per publisher)
    distinct_checkpoints: int  # distinct expert manifests among them
    replicas: int  # replica records (one per mirror)
    newest_step: int | None  # newest step in any checkpoint or replica record
    live_step: int | None = None  # the owner's heartbeat: the step it is training now
    loss: float | None = None  # ... its smoothed training loss
    images_per_s: float | None = None
    eta_s: float | None = None  # ... seconds to the step budget at its current rate
    newest_publisher: str | None = None  # publisher key of the newest checkpoint record


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
    step: int | None = None  # live training fields of its peer record (None: not training)
    loss: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
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
    rec = peers.get(owner.public_key) if owner else None
    live = rec if rec is not None and rec.shard == k and rec.step is not None else None
    if live is not None:
        step = max(live.step, step or 0)
    newest = max(ckpts, key=lambda r: r.step, default=None)
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
                       replicas=len(reps), newest_step=max(steps) if steps else None,
                       live_step=live and live.step, loss=live and live.loss, images_per_s=live and live.images_per_s,
                       eta_s=live and live.eta, newest_publisher=newest.publisher if newest else None)


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
                        p.step, p.loss, p.images_per_s, p.eta, list(p.maddrs))
             for p in sorted(peer_records.values(), key=lambda p: p.peer_id)]
    return RunStatus(run_id=plan.run_id, dataset=plan.dataset, num_shards=len(plan.shards), target=target,
                     router_job=cfg.swarm.router_job, shards=shards, router=router, peers=peers)


# ------------------------------------------------------------------------------------------- rendering

_STATE_STYLE = {"done": "green", "training": "cyan", "orphaned": "yellow", "pending": "dim", "disabled": "dim"}
WIDE_DEFAULT = 160  # columns when stdout is not a terminal and COLUMNS is unset (no squeeze to 80)
# The shard table's columns: (name, justify, width it needs, priority). Narrow terminals drop priority 3, then 2.
_COLUMNS = (("shard", "right", 6, 1), ("state", "left", 9, 1), ("owner", "left", 21, 2), ("step / target", "right", 15, 1),
            ("loss", "right", 7, 1), ("img/s", "right", 7, 1), ("ETA", "right", 7, 1), ("heartbeat", "right", 10, 2),
            ("checkpoints", "right", 11, 3), ("replicas", "right", 8, 3), ("newest step", "right", 11, 3))


def human_duration(seconds: float | None) -> str:
    """42s, 3m10s, 2h05m, 3d04h; '-' when unknown."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _short_owner(owner: Owner | None) -> str:
    return "-" if owner is None else f"{owner.peer_id[-8:]} ({owner.public_key[:8]})"


def _opt(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def columns_for(width: int) -> list[tuple[str, str]]:
    """The shard table's columns that fit `width` characters (the most important ones always)."""
    for level in (3, 2, 1):
        chosen = [(name, justify, need) for name, justify, need, prio in _COLUMNS if prio <= level]
        if sum(need + 3 for _, _, need in chosen) + 1 <= width or level == 1:
            return [(name, justify) for name, justify, _ in chosen]
    raise AssertionError("unreachable")


def _shard_cells(s: ShardStatus) -> dict[str, str]:
    ckpts = f"{s.checkpoints}" + (f" ({s.distinct_checkpoints} distinct)" if s.distinct_checkpoints != s.checkpoints
                                  else "")
    return {"shard": str(s.shard), "state": f"[{_STATE_STYLE[s.state]}]{s.state}[/]", "owner": _short_owner(s.owner),
            "step / target": f"{_opt(s.step)} / {s.target}", "loss": _opt(s.loss, "{:.4f}"),
            "img/s": _opt(s.images_per_s, "{:.0f}"), "ETA": human_duration(s.eta_s),
            "heartbeat": _opt(s.heartbeat_age, "{:.1f}s ago"), "checkpoints": ckpts, "replicas": str(s.replicas),
            "newest step": _opt(s.newest_step)}


def render(status: RunStatus, width: int = WIDE_DEFAULT):
    """Rich tables: the shards (plus the router row) and the peers, with the columns that fit `width`."""
    from rich.console import Group
    from rich.table import Table

    cols = columns_for(width)
    table = Table(title=f"run {status.run_id[:16]} ({status.dataset}, {status.num_shards} shards, "
                        f"{status.target} steps each)")
    for name, justify in cols:
        table.add_column(name, justify=justify, no_wrap=name != "owner")
    for s in status.shards:
        cells = _shard_cells(s)
        table.add_row(*(cells[name] for name, _ in cols))
    r = status.router
    router = {"shard": "router", "state": f"[{_STATE_STYLE[r.state]}]{r.state}[/]", "owner": _short_owner(r.owner),
              "step / target": _opt(r.step), "heartbeat": _opt(r.heartbeat_age, "{:.1f}s ago"),
              "checkpoints": str(r.records), "newest step": _opt(r.step)}
    table.add_row(*(router.get(name, "-") for name, _ in cols))
    peers = Table(title=f"{len(status.peers)} peers")
    wide = width >= 100
    for name in ("peer", "key", "state", "shard", *(("grpc", "version") if wide else ()), "heartbeat",
                 *(("DHT address",) if width >= 140 else ())):
        peers.add_column(name)
    for p in status.peers:
        peers.add_row(p.peer_id[-8:], p.public_key[:8], p.state, "-" if p.shard < 0 else str(p.shard),
                      *((p.grpc or "-", p.version) if wide else ()), f"{p.heartbeat_age:.1f}s ago",
                      *((p.maddrs[0] if p.maddrs else "-",) if width >= 140 else ()))
    return Group(table, peers)


def output_console():
    """stdout as a rich Console: the terminal's width, else COLUMNS, else WIDE_DEFAULT (never squeezed to 80)."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "") or WIDE_DEFAULT)
    return Console(file=sys.stdout, width=width)


def run_status(initial_peers: list[str], run_id: str, as_json: bool = False, timeout: float = 20.0,
               watch: float | None = None) -> int:
    """`ddm-node status`: a table (or JSON) of the run's shards, router job and peers on stdout; with `watch`
    (seconds), refreshed until Ctrl-C (JSON: one document per line)."""
    swarm = join_swarm(initial_peers, run_id)
    try:
        plan = fetch_plan(swarm, run_id, timeout=timeout)
        status = collect_status(swarm, plan)
        if watch is None:
            _show(status, as_json)
        else:
            _watch(swarm, plan, status, as_json, watch)
    except KeyboardInterrupt:
        pass
    finally:
        swarm.shutdown()
    return 0


def _show(status: RunStatus, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status.to_json(), sort_keys=True), flush=True)
    else:
        console = output_console()
        console.print(render(status, console.width))


def _watch(swarm: Swarm, plan: Plan, status: RunStatus, as_json: bool, every: float) -> None:
    if as_json:
        while True:
            _show(status, True)
            time.sleep(every)
            status = collect_status(swarm, plan)
    from rich.live import Live

    console = output_console()
    with Live(render(status, console.width), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(every)
            status = collect_status(swarm, plan)
            live.update(render(status, console.width), refresh=True)
