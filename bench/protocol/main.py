"""`python -m bench.scale --protocol`: the swarm protocol alone at 8, 16, 32, 64 islands (and more while this box can
carry them within the time budget), without torch: simulated islands run the real node parts (claims and leases,
heartbeats, announcements, mirror placement, assembly's discovery and manifest fetches over gRPC) on tiny artifacts,
`--per-host` islands per hivemind DHT peer, all on 127.0.0.1 (bench/protocol/).

Per size n (islands = shards, R = 2): every island starts at once; claim latency and lost races until every shard is
claimed; then a steady window in which every island's DHT calls are counted by kind (count, bytes, latency); then the
islands stop (their records stay) and a client outside them reads every key (records and bytes per key, one get per
claim key), checks where the mirrors are against the placement rule, and assembles once (discovery, one signed
manifest per expert and per statistics artifact, tiny downloads). Growth exponents: log-log least squares over n.

Time runs `--time-scale` times slower than the product's defaults (heartbeat, mirror interval, lease TTL, announcement
TTL and the simulated checkpoint interval; not the claim's settle): one box's two cores carry every island's DHT work,
which a real swarm spreads over N machines. Rates are reported per island per minute of product time.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import BENCHMARKS_MD, print_ratio, write_section
from bench.protocol.island import SimSettings
from bench.protocol.report import NAME, View, exponent, exponents, render
from bench.protocol.run import SizeResult, Sizing, run_size
from ddm_node.core.config import SwarmConfig

BUDGET_S = 20 * 60  # the whole run, as issue 16 asks
GROWTH = 2.0  # a size twice as large is assumed to take this many times as long (for the budget)
CPU_GROWTH = 3.5  # ... and at least this many times the CPU (32 -> 64 islands measured 4.1x: 16% -> 65%)
CPU_LIMIT = 90.0  # % of both cores in the window past which latencies measure the CPU queue, not the protocol


def sim_settings(scale: float, checkpoint_every: float | None) -> SimSettings:
    """The product's swarm timing stretched by `scale` (the settle stays: it only has to outlast a DHT write). The
    simulated checkpoint interval is not stretched (60 s of wall time, so that the steady window sees some): it is a
    run's choice, not the protocol's."""
    d = SwarmConfig()
    swarm = SwarmConfig(lease_ttl=d.lease_ttl * scale, settle=d.settle, replicas=d.replicas,
                        mirror_interval=d.mirror_interval * scale, heartbeat=d.heartbeat * scale,
                        announce_ttl=d.announce_ttl * scale, router_job=False)
    return SimSettings(swarm, checkpoint_every=checkpoint_every or 60.0)


def sizes_within_budget(sizes: list[int], extend: bool, budget: float, started: float, run, log) -> list[SizeResult]:
    """Run the sizes; with `extend`, keep doubling past the last while this box can carry it: the projected CPU
    (the last size's x CPU_GROWTH) under CPU_LIMIT and the projected time within the budget."""
    results: list[SizeResult] = []
    queue = list(sizes)
    while queue:
        n = queue.pop(0)
        t = time.monotonic()
        results.append(run(n))
        took, last = time.monotonic() - t, results[-1]
        left = budget - (time.monotonic() - started)
        if queue or not extend or last.error:
            continue
        why = []
        if last.cpu * CPU_GROWTH >= CPU_LIMIT:
            why.append(f"n={n} used {last.cpu:.0f}% of both cores in its window, and {2 * n} islands make about "
                       f"{CPU_GROWTH:g}x the DHT work (twice the islands, each peers read twice as large, more DHT "
                       "peers per lookup)")
        if took * GROWTH >= left:
            why.append(f"n={n} took {took:.0f} s, about {took * GROWTH:.0f} s projected, {left:.0f} s of the "
                       f"{budget:.0f} s budget left")
        if why:
            last.note = f"n={2 * n} not tried: " + "; ".join(why) + "."
            log(last.note)
        else:
            queue.append(2 * n)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale --protocol", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: n = 4, 8, short windows (prints, no doc)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="islands = shards (default 8 16 32 64, then "
                    "doubling while this box can carry it within the 20-minute budget)")
    ap.add_argument("--per-host", type=int, default=4, help="islands sharing one DHT peer and gRPC server")
    ap.add_argument("--time-scale", type=float, default=None, help="product timing x this (default 8; quick 0.4)")
    ap.add_argument("--window", type=float, default=None, help="steady window in seconds (default 150; quick 8)")
    ap.add_argument("--checkpoint-every", type=float, default=None, help="simulated checkpoint interval, wall-clock "
                    "seconds (default 60; quick 4)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    ap.add_argument("--doc", type=Path, default=None, help=f"markdown file (default {BENCHMARKS_MD.name}; quick: none)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures per size and the exponents here")
    args = ap.parse_args(argv)
    if args.per_host < 1:
        ap.error("--per-host must be >= 1")
    q = args.quick
    scale = args.time_scale or (0.4 if q else 8.0)
    settings = sim_settings(scale, args.checkpoint_every or (4.0 if q else None))
    sizing = Sizing(args.per_host, args.window or (8.0 if q else 150.0), 60.0 if q else 600.0)
    sizes = sorted(args.sizes or ([4, 8] if q else [8, 16, 32, 64]))
    if sizes[0] < 2:
        ap.error("sizes must be >= 2")
    doc = args.doc if args.doc is not None else (None if q else BENCHMARKS_MD)
    setup_logging()
    root = Path(tempfile.mkdtemp(prefix="ddm-bench-protocol-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    try:
        results = sizes_within_budget(sizes, args.sizes is None and not q, args.budget, t0,
                                      lambda n: run_size(n, settings, sizing, root / f"n{n}", log), log)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    md = render(results, scale, setup(settings, sizing, scale, time.monotonic() - t0), reading(results, scale),
                "Swarm protocol at scale, simulated islands without torch")
    if doc is not None:
        write_section(doc, NAME, md)
    if args.json is not None:
        args.json.write_text(json.dumps(summary(results, scale), indent=1))
    print(md)
    done = [View(r, scale) for r in results if not r.error]
    e = exponent([v.r.n for v in done], [v.claim for v in done])
    print_ratio("protocol claim latency growth exponent", float("nan") if e is None else e)
    return 0


def setup_logging() -> None:
    """Warnings on the console; the claim manager's info lines reach the race counter only."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for h in logging.getLogger().handlers:
        h.setLevel(logging.WARNING)
    logging.getLogger("ddm_node.swarm.claims").setLevel(logging.INFO)


def setup(settings: SimSettings, sizing: Sizing, scale: float, seconds: float) -> str:
    s = settings.swarm
    return (f"- Setup: islands = shards, R = {s.replicas}, {sizing.per_host} islands per DHT peer and gRPC server, "
            f"time x{scale:g}: heartbeat {s.heartbeat:g} s, mirror interval {s.mirror_interval:g} s, lease TTL "
            f"{s.lease_ttl:g} s, announcement TTL {s.announce_ttl:g} s, settle {s.settle:g} s, a checkpoint every "
            f"{settings.checkpoint_every:g} s per training island ({settings.artifact_bytes} B per artifact); steady "
            f"window {sizing.window_s:g} s. Total wall time {seconds:.0f} s.")


def reading(results: list[SizeResult], scale: float) -> list[str]:
    """What the tables say, in numbers from this run."""
    views = [View(r, scale) for r in results if not r.error]
    if not views:
        return []
    lo, hi = views[0], views[-1]
    once = all(v.r.unclaimed == 0 and v.r.double_held == 0 for v in views)
    placed = all(v.r.placement_exact == v.r.n and set(v.r.copies) == {2} for v in views)
    per_record = hi.peers_bytes / hi.r.n if hi.peers_bytes else 0.0
    lines = [
        f"- Claims: every shard was won by exactly one island at every size: **{'yes' if once else 'no'}** "
        f"({', '.join(f'n={v.r.n}: {v.r.lost_races} lost races' for v in views)}; a lost race is a claim written, "
        "then given up to an earlier one after the settle).",
        f"- Placement: every shard had exactly R = 2 current mirror copies, on the islands the rendezvous rule names: "
        f"**{'yes' if placed else 'no'}**; the busiest island mirrored {max(hi.r.held, default=0)} shards at "
        f"n={hi.r.n} (mean 2).",
        f"- The peers key holds one heartbeat per island ({per_record:.0f} bytes each): {fmt_kib(hi.peers_bytes)} per "
        f"read at n={hi.r.n}, and every island reads it at each heartbeat and mirror sweep. A storing node keeps at "
        "most 256 records per key (swarm/storage.py, the hostile-peer cap), so past 256 islands heartbeats are "
        "refused: the first limit at 512 islands (docs/SCALE.md).",
        f"- DHT gets per island per minute of product time: {lo.gets_per_min:.0f} at n={lo.r.n}, {hi.gets_per_min:.0f} "
        f"at n={hi.r.n}: the keeper's renewals and peer reads are flat; the mirror's full sweep (every 12th, each "
        "island at its own phase) reads all K checkpoint keys in one traversal; bytes read grow with the peers key.",
        f"- Assembly from a client: {hi.manifests:.0f} manifest fetches for K = {hi.r.n} (an expert and its statistics "
        f"per shard, O(K)), {hi.assembly_s / hi.r.n:.2f} s per shard at n={hi.r.n}, one shard after another.",
        "- Latencies are this box's: every island's DHT work (a hivemind get with latest=True asks up to a bucket "
        "(20) of peers, and each answer's records are signature-checked) runs on its two cores; see the CPU column. "
        "Where it nears 100% the latencies measure the CPU queue, not the protocol; counts, records, bytes and "
        "placement do not depend on it.",
    ]
    return lines + [f"- {r.note}" for r in results if r.note]


def fmt_kib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1024:.1f} KiB"

def summary(results: list[SizeResult], scale: float) -> dict:
    """What the tests check: per size the claim, placement and assembly figures; the growth exponents."""
    views = [View(r, scale) for r in results if not r.error]
    sizes = [{"n": r.n, "error": r.error, "unclaimed": r.unclaimed, "double_held": r.double_held,
              "claimed": len(r.claim_s), "lost_races": r.lost_races, "copies": r.copies, "stale": r.stale,
              "held": r.held, "placement_exact": r.placement_exact, "peers_records": r.keys["peers"].records_mean
              if "peers" in r.keys else None, "heartbeats_per_min": View(r, scale).heartbeat[0],
              "experts": r.assembly.experts if r.assembly else 0,
              "manifest_fetches": r.assembly.manifest_fetches if r.assembly else 0} for r in results]
    return {"sizes": sizes, "exponents": {name: e for name, e, _ in exponents(views)}}
