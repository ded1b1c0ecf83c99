"""One size of the protocol-only swarm: start the hosts (DHT peers and gRPC servers), start every island at once, wait
until every shard is claimed, measure a steady window, then probe the DHT, check the placement, assemble, and stop."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.protocol.artifacts import SimPlan
from bench.protocol.assembly import AssemblyResult, assemble_once
from bench.protocol.island import Host, SimIsland, SimSettings
from bench.protocol.shared import KINDS_SHOWN, KindTraffic, MeteredSwarm, record_bytes
from ddm_node.core.events import EventKind, read_events
from ddm_node.core.identity import Identity
from ddm_node.core.placement import rendezvous
from ddm_node.node.state import Phase
from ddm_node.swarm.records import RecordKind

GIB = float(1 << 30)


@dataclass(frozen=True)
class KeyStats:
    """One record kind's keys as a reader finds them: records and bytes per key (mean and max over its keys)."""

    keys: int
    records_mean: float
    records_max: int
    bytes_mean: float
    bytes_max: int


@dataclass
class SizeResult:
    n: int
    hosts: int = 0
    hosts_s: float = 0.0  # starting every DHT peer and gRPC server
    claim_s: list[float] = field(default_factory=list)  # per island: start -> claim won
    all_claimed_s: float = 0.0
    lost_races: int = 0
    unclaimed: int = 0  # shards nobody held when the window began
    double_held: int = 0  # shards two islands held at once when the window began
    window_s: float = 0.0
    traffic: dict[str, KindTraffic] = field(default_factory=dict)  # all islands' DHT calls in the window
    probe_get_ms: list[float] = field(default_factory=list)
    keys: dict[str, KeyStats] = field(default_factory=dict)
    copies: list[int] = field(default_factory=list)  # per shard: current mirror copies (see `placement`)
    stale: list[int] = field(default_factory=list)  # per shard: older copies still announced
    held: list[int] = field(default_factory=list)  # per island: shards it mirrors
    placement_exact: int = 0  # shards whose mirrors are exactly the rule's top R
    assembly: AssemblyResult | None = None
    cpu: float = 0.0
    rss_gib: float = 0.0
    load: str = ""
    error: str = ""
    note: str = ""


class RaceCounter(logging.Handler):
    """Counts `ClaimManager`'s "lost the race" lines (one per claim written and lost)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("lost the race"):
            self.count += 1


def start_hosts(ids: list[Identity], per_host: int, run_id: str, log) -> list[Host]:
    """One DHT peer per `per_host` islands, each joining through the first and the previous one."""
    hosts: list[Host] = []
    try:
        for i in range(0, len(ids), per_host):
            peers = hosts[0].maddrs + hosts[-1].maddrs if hosts else []
            hosts.append(Host(ids[i:i + per_host], run_id, list(dict.fromkeys(peers))))
            if len(hosts) % 8 == 0:
                log(f"  {len(hosts)} DHT peers up")
    except BaseException:
        for h in hosts:
            h.close()
        raise
    return hosts


def tree_rss() -> float:
    me = psutil.Process(os.getpid())
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / GIB


def traffic_diff(before: list[dict[str, KindTraffic]], after: list[dict[str, KindTraffic]]) -> dict[str, KindTraffic]:
    """All islands' DHT calls between two snapshots, per kind."""
    out: dict[str, KindTraffic] = {}
    for b, a in zip(before, after):
        for kind, t in a.items():
            s = b.get(kind, KindTraffic())
            o = out.setdefault(kind, KindTraffic())
            o.puts += t.puts - s.puts
            o.put_bytes += t.put_bytes - s.put_bytes
            o.gets += t.gets - s.gets
            o.get_bytes += t.get_bytes - s.get_bytes
            o.get_records += t.get_records - s.get_records
            o.put_s += t.put_s[len(s.put_s):]
            o.get_s += t.get_s[len(s.get_s):]
    return out


def key_stats(client: MeteredSwarm, shards: int, peers: list) -> dict[str, KeyStats]:
    """Records and bytes under each kind's keys, as one reader finds them (`peers`: the peers key read while the
    islands ran: heartbeats expire soon after)."""
    out = {}
    for kind in KINDS_SHOWN:
        if kind is RecordKind.PEERS:
            per_key = [peers]
        else:
            per_key = [[e.record for e in client.read(kind, k)] for k in range(shards)]
        records = [len(rs) for rs in per_key]
        sizes = [sum(record_bytes(r) for r in rs) for rs in per_key]
        out[kind.value] = KeyStats(len(per_key), sum(records) / len(records), max(records),
                                   sum(sizes) / len(sizes), max(sizes))
    return out


def placement(client: MeteredSwarm, peers: list, shards: int, settings: SimSettings,
              islands: list[SimIsland]) -> tuple[list, list, list, int]:
    """Mirror copies per shard: (current copies: mirrors holding one of the shard's two newest checkpoints; stale
    copies: older replicas still announced, of mirrors the shard's order has since passed by; shards mirrored per
    island, current copies; shards whose current mirrors are exactly the rule's top R). `peers`: the heartbeats read
    while the islands ran."""
    live = {p.public_key for p in peers if p.state != Phase.LEAVING.value}
    training: dict[int, set[str]] = {}
    for p in peers:
        training.setdefault(p.shard, set()).add(p.public_key)
    current, stale, exact, held = [], [], 0, Counter()
    for k in range(shards):
        checkpoints = client.checkpoints(k)
        newest = max((c.step for c in checkpoints), default=0)
        holders = training.get(k, set()) | {c.publisher for c in checkpoints}
        want = set(rendezvous(f"mirror/{k}", sorted(live - holders))[:settings.swarm.replicas])
        replicas = client.replicas(k)
        have = {r.holder_key for r in replicas if r.step >= newest - settings.steps_per_checkpoint}
        current.append(len(have))
        stale.append(len({r.holder_key for r in replicas} - have))
        exact += have == want
        held.update(have)
    return current, stale, [held[i.me] for i in islands], exact


@dataclass
class Sizing:
    per_host: int
    window_s: float
    claim_timeout: float


def run_size(n: int, settings: SimSettings, sizing: Sizing, root: Path, log) -> SizeResult:
    res = SizeResult(n)
    run_id = secrets.token_hex(32)
    plan = SimPlan(run_id, n, settings.swarm)
    ids = [Identity.generate() for _ in range(n)]
    races = RaceCounter()
    logging.getLogger("ddm_node.swarm.claims").addHandler(races)
    t = time.monotonic()
    hosts = start_hosts(ids, sizing.per_host, run_id, log)
    client = islands = None
    try:
        client = MeteredSwarm(Identity.generate(), run_id, initial_peers=hosts[0].maddrs, client_mode=True)
        for h in hosts:
            h.serve()
        res.hosts, res.hosts_s = len(hosts), time.monotonic() - t
        log(f"n={n}: {len(hosts)} DHT peers and gRPC servers up after {res.hosts_s:.0f} s")
        islands = [SimIsland(f"island{i:04d}", ident, hosts[i // sizing.per_host], plan, settings, root)
                   for i, ident in enumerate(ids)]
        measure(res, islands, client, plan, settings, sizing, races, root, log)
    except Exception as exc:  # a size that breaks is reported, the next one still runs
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        log(f"n={n}: failed: {res.error}")
    finally:
        stop_all(islands or [], client, hosts)
        logging.getLogger("ddm_node.swarm.claims").removeHandler(races)
    return res


def measure(res: SizeResult, islands: list[SimIsland], client: MeteredSwarm, plan: SimPlan, settings: SimSettings,
            sizing: Sizing, races: RaceCounter, root: Path, log) -> None:
    n = res.n
    t0 = time.time()
    for isl in islands:
        isl.start()
    deadline = time.monotonic() + sizing.claim_timeout
    while time.monotonic() < deadline and any(i.state.active is None for i in islands):
        time.sleep(0.5)
    res.all_claimed_s = time.time() - t0
    active = Counter(i.state.active for i in islands if i.state.active is not None)
    res.unclaimed, res.double_held = n - len(active), sum(1 for c in active.values() if c > 1)
    for isl in islands:
        claim = next((e for e in read_events(isl.work.events) if e.kind is EventKind.CLAIM), None)
        if claim is not None:
            res.claim_s.append(claim.t - t0)
    res.lost_races = races.count
    log(f"n={n}: {len(active)} of {n} shards claimed after {res.all_claimed_s:.0f} s, {res.lost_races} lost races")
    before = [i.swarm.traffic.snapshot() for i in islands]
    psutil.cpu_percent(interval=None)
    t = time.monotonic()
    time.sleep(sizing.window_s)
    res.cpu = psutil.cpu_percent(interval=None)
    res.window_s = time.monotonic() - t
    res.traffic = traffic_diff(before, [i.swarm.traffic.snapshot() for i in islands])
    res.rss_gib, res.load = tree_rss(), " / ".join(f"{v:.1f}" for v in os.getloadavg())
    peers = client.peers()
    stop_all(islands, None, [])  # the client's reads below, in a swarm whose records stay but whose islands rest
    for k in range(n):
        t = time.perf_counter()
        client.claims(k)
        res.probe_get_ms.append((time.perf_counter() - t) * 1000)
    res.keys = key_stats(client, n, peers)
    res.copies, res.stale, res.held, res.placement_exact = placement(client, peers, n, settings, islands)
    res.assembly = assemble_once(client, plan, root / "assembly")
    log(f"n={n}: window {res.window_s:.0f} s, CPU {res.cpu:.0f}%, assembly {res.assembly.seconds:.1f} s "
        f"({res.assembly.experts} of {n} experts, {res.assembly.manifest_fetches} manifest fetches)")


def stop_all(islands: list[SimIsland], client, hosts: list[Host]) -> None:
    """Stop every island at once (each joins its threads), then the client and the hosts."""
    if islands:
        with ThreadPoolExecutor(max_workers=min(32, len(islands))) as pool:
            list(pool.map(lambda i: i.stop(), islands))
    if client is not None:
        client.shutdown()
    threads = [threading.Thread(target=h.close) for h in hosts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
