"""Swarm size: how long islands take to join, claim and train, and how long assembly takes, for 4, 8, 16 islands.

For each size n, a LocalNet of n islands (real `ddm-node start` processes on 127.0.0.1, one torch thread
each) works on a plan of K = n shards of digits with a tiny DiT and a budget so large that no shard
finishes: every island ends up training exactly one shard. Island 1 starts from the plan file; once it
is ready, islands 2..n are launched at the same moment and join through it by run id.

Per island, from its events.jsonl (times on one machine):
- start-up: process launch -> `start` event (imports, gRPC server, DHT join, plan fetched and checked);
- to claim: `start` -> first `claim` event (reading every shard's state from the DHT, the claim write,
  `settle`, the confirming re-read; plus any lost races, counted from the island log);
- to training ("claim-to-training" in issue 5): `start` -> first `train` event (claimed, resumed or
  started fresh, shard data loaded, trainer built: the first step is about to run);
- to checkpoint: `start` -> first `checkpoint` event (`checkpoint_every` steps later, signed and announced).
Then this process joins the swarm as a DHT client and measures the DHT read latency (one `claims(k)`
get per shard) and the assembly of all K experts (`ddm_node.clients.assemble.assemble`: newest verified
checkpoint of every shard fetched over gRPC, bundle written).

CPU use (all cores, sampled every second) and the islands' resident memory are recorded per phase, to
say what saturates. The printed ratio is median to-training at the largest n over the smallest n
(1.0 would be perfect scaling of the join-and-claim path; on 2 shared cores the CPU cannot give that).

Run: `python -m bench.scale` (n = 4, 8, 16; about 10-15 minutes) or `--quick` (n = 2, 4; about 2-3
minutes; prints its section, writes it only with `--doc`).
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.common import BENCHMARKS_MD, load_str, markdown_table, median, print_ratio, section_header, write_section
from ddm_node.cli.localnet import LocalNet
from ddm_node.core.events import Event, EventKind

NAME = "bench.scale"
GIB = float(1 << 30)
RSS_PER_ISLAND_GIB = 0.8  # island + DHT child + p2pd, measured here; sizes that do not fit are skipped

CONFIG = """
partition: {{experts: {k}}}
model: {{hidden: 32, depth: 2, heads: 2}}
train: {{steps: 10000000, batch_size: 32, checkpoint_every: {every}, warmup_steps: 5}}
swarm: {{lease_ttl: 30, settle: {settle}, mirror_interval: 5, heartbeat: 5, announce_ttl: 120, router_job: false}}
"""


class CpuSampler:
    """Average machine-wide CPU use per named phase (psutil, sampled every second in a thread)."""

    def __init__(self) -> None:
        self.phase = "idle"
        self.samples: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        psutil.cpu_percent(interval=None)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.setdefault(self.phase, []).append(psutil.cpu_percent(interval=None))

    def mean(self, phase: str) -> float | None:
        vals = self.samples.get(phase)
        return sum(vals) / len(vals) if vals else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class IslandTimes:
    name: str
    startup: float
    to_claim: float | None
    to_train: float | None
    to_ckpt: float | None
    lost_races: int


@dataclass
class SizeResult:
    n: int
    islands: list[IslandTimes] = field(default_factory=list)
    all_training_s: float = 0.0  # first launch -> every shard has a checkpoint
    dht_get_ms: list[float] = field(default_factory=list)
    join_s: float = 0.0
    assemble_s: float = 0.0
    bundle_mib: float = 0.0
    cpu: dict[str, float | None] = field(default_factory=dict)
    rss_gib: float = 0.0
    load: str = ""
    skipped: str = ""

    def med(self, attr: str) -> float | None:
        vals = [getattr(i, attr) for i in self.islands if getattr(i, attr) is not None]
        return median(vals) if vals else None

    def worst(self, attr: str) -> float | None:
        vals = [getattr(i, attr) for i in self.islands if getattr(i, attr) is not None]
        return max(vals) if vals else None


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (island, DHT child, p2pd)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def first(events: list[Event], name: str, kind: EventKind) -> Event | None:
    return next((e for e in events if e.name == name and e.kind is kind), None)


def every_shard_checkpointed(k: int):
    def check(events: list[Event]):
        shards = {e.shard for e in events if e.kind is EventKind.CHECKPOINT}
        trainers = {e.name for e in events if e.kind is EventKind.TRAIN}
        return events if len(shards) >= k and len(trainers) >= k else None

    return check


def run_size(n: int, every: int, settle: float, root: Path, cpu: CpuSampler, log) -> SizeResult:
    res = SizeResult(n)
    need = n * RSS_PER_ISLAND_GIB + 1.0
    avail = psutil.virtual_memory().available / GIB
    if avail < need:
        res.skipped = f"skipped: {avail:.1f} GiB available, about {need:.1f} GiB needed"
        log(f"n={n}: {res.skipped}")
        return res
    net = LocalNet(root / f"n{n}", threads=1)
    launched: dict[str, float] = {}
    try:
        run_id = net.partition(CONFIG.format(k=n, every=every, settle=settle))
        cpu.phase = f"{n}:startup"
        t0 = time.time()
        launched["island1"] = time.time()
        island1 = net.start("island1", "--plan", str(net.root / "plan"))
        maddr = net.wait_ready(island1, timeout=300)["maddrs"][0]
        rest = []
        for i in range(2, n + 1):
            launched[f"island{i}"] = time.time()
            rest.append(net.start(f"island{i}", "--run", run_id, "--initial-peers", maddr))
        for p in rest:
            net.wait_ready(p, timeout=600)
        log(f"n={n}: all islands ready after {time.time() - t0:.0f}s")
        cpu.phase = f"{n}:claim+train"
        events = net.wait_for(every_shard_checkpointed(n), 900, f"all {n} shards to train and checkpoint")
        res.all_training_s = time.time() - t0
        log(f"n={n}: every shard checkpointed after {res.all_training_s:.0f}s")
        res.rss_gib = sum(tree_rss(p.popen.pid) for p in net.procs) / GIB
        for p in net.procs:
            start = first(events, p.name, EventKind.START)
            if start is None:
                continue
            def rel(kind, name=p.name, start=start):
                e = first(events, name, kind)
                return None if e is None else e.t - start.t

            lost = p.log.read_text(errors="replace").count("lost the race") if p.log.exists() else 0
            res.islands.append(IslandTimes(p.name, start.t - launched[p.name], rel(EventKind.CLAIM),
                                           rel(EventKind.TRAIN), rel(EventKind.CHECKPOINT), lost))
        cpu.phase = f"{n}:assemble"
        res.load = load_str().split(" (")[0]
        measure_assembly(res, net, maddr, run_id, n)
        log(f"n={n}: DHT get median {median(res.dht_get_ms):.0f} ms, assembly {res.assemble_s:.1f}s")
        cpu.phase = "idle"
    finally:
        net.stop_all()
    res.cpu = {ph: cpu.mean(f"{n}:{ph}") for ph in ("startup", "claim+train", "assemble")}
    return res


def measure_assembly(res: SizeResult, net: LocalNet, maddr: str, run_id: str, k: int) -> None:
    """Join as a DHT client, time one claims(k) get per shard, then assemble every expert."""
    from rich.console import Console

    from ddm_node.clients.assemble import assemble
    from ddm_node.data.plan import Plan
    from ddm_node.exchange.peers import join_swarm

    t = time.perf_counter()
    swarm = join_swarm([maddr], run_id)
    res.join_s = time.perf_counter() - t
    try:
        for shard in range(k):
            t = time.perf_counter()
            swarm.claims(shard)
            res.dht_get_ms.append((time.perf_counter() - t) * 1000)
        plan = Plan.load(net.root / "plan", expected_run_id=run_id)
        out = net.root / "bundle"
        t = time.perf_counter()
        assemble(swarm, plan, out, min_experts=k, console=Console(file=io.StringIO()))
        res.assemble_s = time.perf_counter() - t
        res.bundle_mib = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / (1 << 20)
    finally:
        swarm.shutdown()


def _gap(r: SizeResult, a: str, b: str) -> float | None:
    """Median over islands of (b - a), e.g. claim -> training."""
    vals = [getattr(i, b) - getattr(i, a) for i in r.islands if getattr(i, a) is not None and getattr(i, b) is not None]
    return median(vals) if vals else None


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(results: list[SizeResult], every: int, settle: float, quick: bool, seconds: float) -> tuple[str, float]:
    done = [r for r in results if not r.skipped]
    rows = []
    for r in done:
        rows.append([r.n, f"{fmt(r.med('startup'))} / {fmt(r.worst('startup'))}",
                     f"{fmt(r.med('to_claim'))} / {fmt(r.worst('to_claim'))}",
                     f"{fmt(r.med('to_train'))} / {fmt(r.worst('to_train'))}",
                     f"{fmt(r.med('to_ckpt'))} / {fmt(r.worst('to_ckpt'))}",
                     sum(i.lost_races for i in r.islands), fmt(r.all_training_s, 0)])
    islands_table = markdown_table(["islands = shards", "start-up (s) med / max", "start -> claim (s) med / max",
                                    "start -> training (s) med / max", "start -> 1st ckpt (s) med / max",
                                    "lost claim races", "launch -> all shards checkpointed (s)"], rows)
    rows2 = [[r.n, fmt(median(r.dht_get_ms), 0) if r.dht_get_ms else "-", fmt(r.join_s), fmt(r.assemble_s),
              fmt(r.assemble_s / r.n, 2), fmt(r.bundle_mib, 2)] for r in done]
    asm_table = markdown_table(["K (shards)", "DHT get median (ms)", "client join (s)", "assembly (s)",
                                "assembly per expert (s)", "bundle (MiB)"], rows2)
    rows3 = [[r.n, fmt(r.cpu.get("startup"), 0), fmt(r.cpu.get("claim+train"), 0), fmt(r.cpu.get("assemble"), 0),
              fmt(r.rss_gib, 1), fmt(r.rss_gib / r.n, 2), r.load] for r in done]
    res_table = markdown_table(["islands", "CPU % start-up", "CPU % claim+train", "CPU % assembly",
                                "islands' RSS (GiB)", "RSS per island (GiB)", "load 1/5/15 at assembly"], rows3)
    skipped = [f"- n={r.n}: {r.skipped}" for r in results if r.skipped]
    ratio = float("nan")
    if len(done) >= 2 and done[0].med("to_train") and done[-1].med("to_train"):
        ratio = done[-1].med("to_train") / done[0].med("to_train")
    reading = [f"- Ratio printed: median start -> training at n={done[-1].n if done else '-'} over "
               f"n={done[0].n if done else '-'} = **{ratio:.2f}** (1.0 would be flat)."]
    if len(done) >= 2:
        lo, hi = done[0], done[-1]
        cpu_vals = [v for r in done for v in r.cpu.values() if v is not None]
        cpu_mean = sum(cpu_vals) / len(cpu_vals) if cpu_vals else float("nan")
        dht_lo = median(lo.dht_get_ms) if lo.dht_get_ms else float("nan")
        dht_hi = median(hi.dht_get_ms) if hi.dht_get_ms else float("nan")
        reading += [
            f"- From n={lo.n} to n={hi.n}: start-up median {fmt(lo.med('startup'))} -> {fmt(hi.med('startup'))} s, "
            f"start -> claim {fmt(lo.med('to_claim'))} -> {fmt(hi.med('to_claim'))} s (its floor is `settle` = "
            f"{settle:g} s plus the DHT reads), claim -> training "
            f"{fmt(_gap(lo, 'to_claim', 'to_train'))} -> {fmt(_gap(hi, 'to_claim', 'to_train'))} s, one DHT get "
            f"{dht_lo:.0f} -> {dht_hi:.0f} ms, assembly per expert {fmt(lo.assemble_s / lo.n, 2)} -> "
            f"{fmt(hi.assemble_s / hi.n, 2)} s.",
            f"- CPU use averaged {cpu_mean:.0f}% of both cores over all phases"
            + (" (the machine is also shared with other work; see the load column): the CPU is what saturates. "
               if cpu_mean >= 90 else ". ")
            + "Every island is a Python process that imports torch and hivemind (several CPU-seconds), then trains "
            "on one thread, with a DHT child process and p2pd beside it; start-up, the claim path (DHT calls and "
            "the `settle` sleep on a starved scheduler) and training all stretch with the number of processes per "
            "core. Before claiming, an island reads every shard's checkpoint record (O(K) DHT gets), so the claim "
            "path also grows with K; the DHT get latency above says how much of that is the DHT itself (a get "
            "costs about 7 ms on this machine when it is idle).",
        ]
    reading += [
        "- Assembly fetches the newest verified checkpoint of every shard (manifests, then files, each hashed and "
        "its signature checked) while the islands keep training; for these tiny experts it is DHT reads and gRPC "
        "round trips, not bytes.",
        f"- Setup: K = n shards, tiny DiT (hidden 32, depth 2), batch 32, `checkpoint_every` {every}, lease ttl 30 s, "
        f"settle {settle:g} s, mirror interval 5 s, one torch thread per island, loopback only; island 1 starts "
        "first, the others together once it is ready. Start-up includes importing torch._dynamo, which the daemon "
        f"does before it claims (see `bench.recovery`). Total wall time {seconds:.0f} s.",
        "- To separate the protocol from the CPU, run the islands on separate machines; on one 2-core box these "
        "numbers are an upper bound for the protocol.",
    ]
    if quick:
        reading.append("- **Quick run**: small sizes only, a smoke test, not the recorded numbers.")
    md = (section_header(NAME, "Swarm size: join, claim, train, assemble") + islands_table
          + "\nDHT and assembly (this process joins as a DHT client while the islands train):\n\n" + asm_table
          + "\nResources:\n\n" + res_table + "\n" + "\n".join(skipped + reading) + "\n")
    return md, ratio


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--protocol" in argv:  # the protocol alone, simulated islands without torch (bench/protocol/main.py)
        from bench.protocol.main import main as protocol_main

        return protocol_main([a for a in argv if a != "--protocol"])
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", action="store_true", help="the swarm protocol alone at 8-128+ islands, no torch "
                    "(`--protocol --help` for its options)")
    ap.add_argument("--quick", action="store_true", help="smoke run: n = 2, 4")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="islands = shards (default 4 8 16)")
    ap.add_argument("--every", type=int, default=10, help="checkpoint interval in steps")
    ap.add_argument("--settle", type=float, default=2.0, help="claim settle time (s), the default config's")
    ap.add_argument("--doc", type=Path, default=None,
                    help=f"markdown file for the section (default {BENCHMARKS_MD.name}; quick runs only print)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (island logs, events)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = sorted(args.sizes or ([2, 4] if args.quick else [4, 8, 16]))
    if sizes[0] < 1:
        ap.error("sizes must be >= 1")
    doc = args.doc if args.doc is not None else (None if args.quick else BENCHMARKS_MD)
    root = Path(tempfile.mkdtemp(prefix="ddm-bench-scale-"))
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    cpu = CpuSampler()
    try:
        results = [run_size(n, args.every, args.settle, root, cpu, log) for n in sizes]
        md, ratio = report(results, args.every, args.settle, args.quick, time.time() - t0)
        if doc is not None:
            write_section(doc, NAME, md)
        print(md)
        print_ratio(f"scale start->training n={sizes[-1]}/n={sizes[0]}", ratio)
    finally:
        cpu.close()
        if args.keep:
            print(f"run directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
