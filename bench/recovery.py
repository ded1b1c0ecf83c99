"""Recovery after node loss: SIGKILL an island's process group mid-shard; how long until the shard trains again?

A LocalNet of islands (real `ddm-node start` processes, one torch thread each, loopback DHT and gRPC)
trains a plan of K shards with a budget so large that no shard finishes; the islands beyond K wait and
mirror. Then, `--kills` times, one training island is chosen (it has published at least two checkpoints
of its shard since claiming it, and another island has mirrored the shard since: a kill before any
replica exists loses the shard's progress by design, which is not what this bench measures), we wait a
seeded random fraction of its checkpoint interval (so the kill lands anywhere between two checkpoints, as
a real crash would), and SIGKILL its whole process group.

Measured from the islands' own events.jsonl (wall-clock timestamps on one machine):
- t_kill: just before `killpg(SIGKILL)` in this process;
- claim: the first `claim` event of the orphaned shard by another island after t_kill;
- resume: the takeover's `resume` event (checkpoint fetched from the swarm or found in its local
  mirror, verified);
- recovery: the takeover's `train` event (data loaded, trainer built, state loaded, the first step
  about to run) minus t_kill: the shard is "training again". Islands without that event (older
  versions) fall back to the `resume` event;
- steps lost: the victim's step at t_kill minus the resumed step. The victim's step at t_kill is
  estimated from its last two checkpoint events (last step + rate x time since), so it is approximate.

Goal (issue 5): recovery <= lease_ttl + settle + 5 s. The printed ratio is the worst (max) recovery
over all kills divided by that goal, taking each kill's own ttl; below 1.0 meets it.

Run: `python -m bench.recovery` (ttl 6 s and 12 s, 3 kills each, about 6-10 minutes) or `--quick`
(ttl 4 s, one shard, one kill, about 1-2 minutes; prints its section, writes it only with `--doc`).
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import BENCHMARKS_MD, load_str, markdown_table, median, print_ratio, section_header, write_section
from ddm_node.cli.localnet import IslandProc, LocalNet
from ddm_node.core.errors import DDMError
from ddm_node.core.events import Event, EventKind

NAME = "bench.recovery"
SLACK = 5.0  # seconds allowed on top of ttl + settle by the goal

CONFIG = """
partition: {{experts: {k}}}
model: {{hidden: 32, depth: 2, heads: 2}}
train: {{steps: 10000000, batch_size: 32, checkpoint_every: {every}, warmup_steps: 5}}
swarm: {{lease_ttl: {ttl}, settle: {settle}, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60, router_job: false}}
"""


@dataclass
class Settings:
    ttls: list[float]
    settle: float
    shards: int
    kills: int
    every: int
    seed: int


@dataclass
class Kill:
    """One SIGKILL and what followed, all times in seconds after the kill."""

    ttl: float
    n: int
    shard: int
    victim: str
    takeover: str
    claim_s: float
    resume_s: float
    recovery_s: float
    first_ckpt_s: float | None
    victim_last_ckpt: int
    victim_step_est: float
    resumed_step: int
    source: str
    load: str
    settle: float

    @property
    def goal(self) -> float:
        return self.ttl + self.settle + SLACK

    @property
    def steps_lost(self) -> float:
        return max(0.0, self.victim_step_est - self.resumed_step)


def current_trainers(net: LocalNet, events: list[Event]) -> dict[int, str]:
    """shard -> the island whose latest claim it is, when that island is alive."""
    owner: dict[int, str] = {}
    for e in events:
        if e.kind is EventKind.CLAIM:
            owner[e.shard] = e.name
    alive = {p.name for p in net.procs if p.alive}
    return {s: n for s, n in owner.items() if n in alive}


def claim_time(events: list[Event], name: str, shard: int) -> float:
    """When `name` last claimed `shard`."""
    return max(e.t for e in events if e.kind is EventKind.CLAIM and e.name == name and e.shard == shard)


def checkpoints_since_claim(events: list[Event], name: str, shard: int) -> list[Event]:
    claim_t = claim_time(events, name, shard)
    return [e for e in events if e.kind is EventKind.CHECKPOINT and e.name == name and e.shard == shard
            and e.t >= claim_t]


def mirrored_since_claim(events: list[Event], name: str, shard: int) -> bool:
    """Whether any other island mirrored `shard` after `name` claimed it: only then can a kill of
    `name` be survived (a kill before any replica exists loses the shard's progress, which this bench does
    not measure)."""
    claim_t = claim_time(events, name, shard)
    return any(e.kind is EventKind.MIRROR and e.shard == shard and e.name != name and e.t >= claim_t
               for e in events)


def pick_victim(net: LocalNet, min_ckpts: int = 2):
    """Predicate: a live trainer with >= min_ckpts checkpoints of its shard since its claim, mirrored by another
    island since then, and a live idle island."""

    def check(events: list[Event]):
        trainers = current_trainers(net, events)
        busy = set(trainers.values())
        if not any(p.alive and p.name not in busy for p in net.procs):
            return None
        for shard, name in sorted(trainers.items()):
            cps = checkpoints_since_claim(events, name, shard)
            if len(cps) >= min_ckpts and mirrored_since_claim(events, name, shard):
                return name, shard, cps
        return None

    return check


def estimate_step(cps: list[Event], t: float) -> float:
    """The victim's step at time t from its last two checkpoint events (constant rate in between)."""
    a, b = cps[-2], cps[-1]
    rate = (b.step - a.step) / max(b.t - a.t, 1e-6)
    return b.step + rate * max(0.0, t - b.t)


def one_run(s: Settings, ttl: float, root: Path, rng: random.Random, log) -> list[Kill]:
    """A fresh LocalNet with K + kills islands; `kills` sequential SIGKILLs of a training island."""
    net = LocalNet(root / f"ttl{ttl:g}", threads=1)
    kills: list[Kill] = []
    try:
        run_id = net.partition(CONFIG.format(k=s.shards, every=s.every, ttl=ttl, settle=s.settle))
        first = net.start("island1", "--plan", str(net.root / "plan"))
        maddr = net.wait_ready(first, timeout=180)["maddrs"][0]
        rest = [net.start(f"island{i}", "--run", run_id, "--initial-peers", maddr)
                for i in range(2, s.shards + s.kills + 1)]
        for p in rest:
            net.wait_ready(p, timeout=240)
        log(f"ttl {ttl:g}: {len(net.procs)} islands up")
        for n in range(1, s.kills + 1):
            name, shard, cps = net.wait_for(pick_victim(net), 240,
                                            "a training island with two checkpoints and a mirror")
            interval = max(cps[-1].t - cps[-2].t, 0.1)
            time.sleep(rng.uniform(0.0, interval))
            victim = next(p for p in net.procs if p.name == name)
            kills.append(kill_and_measure(net, s, ttl, n, victim, shard))
            k = kills[-1]
            log(f"ttl {ttl:g} kill {n}: shard {shard} {k.victim} -> {k.takeover}: claim +{k.claim_s:.1f}s, "
                f"training again +{k.recovery_s:.1f}s (goal {k.goal:.1f}s), ~{k.steps_lost:.0f} steps lost")
    finally:
        net.stop_all()
    return kills


def kill_and_measure(net: LocalNet, s: Settings, ttl: float, n: int, victim: IslandProc, shard: int) -> Kill:
    load = load_str().split(" (")[0]
    t_kill = time.time()
    net.kill(victim)
    events = net.events()
    cps = checkpoints_since_claim(events, victim.name, shard)
    step_est = estimate_step(cps, t_kill)
    claim = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.CLAIM and e.shard == shard
                                          and e.name != victim.name and e.t > t_kill), None),
                         6 * ttl + 60, f"another island to claim shard {shard}")
    resume = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.RESUME and e.shard == shard
                                           and e.name == claim.name and e.t >= claim.t), None),
                          120, f"{claim.name} to resume shard {shard}")
    try:
        train = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.TRAIN and e.shard == shard
                                              and e.name == claim.name and e.t >= resume.t), None),
                             120, f"{claim.name} to train shard {shard}")
    except DDMError:
        train = resume  # an island without `train` events
    # its first checkpoint after resuming (also: the next victim needs checkpoints anyway)
    try:
        ck = net.wait_for(lambda ev: next((e for e in ev if e.kind is EventKind.CHECKPOINT and e.shard == shard
                                           and e.name == claim.name and e.t > resume.t), None),
                          120, f"{claim.name} to checkpoint shard {shard}")
        first_ckpt = ck.t - t_kill
    except DDMError:
        first_ckpt = None
    return Kill(ttl=ttl, n=n, shard=shard, victim=victim.name, takeover=claim.name, claim_s=claim.t - t_kill,
                resume_s=resume.t - t_kill, recovery_s=train.t - t_kill, first_ckpt_s=first_ckpt,
                victim_last_ckpt=cps[-1].step, victim_step_est=step_est, resumed_step=int(resume.step),
                source="?" if resume.source is None else resume.source,
                load=load, settle=s.settle)


def report(s: Settings, kills: list[Kill], quick: bool, seconds: float) -> tuple[str, float]:
    rows = [[f"{k.ttl:g}", k.n, k.shard, f"{k.victim} -> {k.takeover}", k.claim_s, k.resume_s, k.recovery_s,
             "-" if k.first_ckpt_s is None else k.first_ckpt_s, k.goal, k.victim_last_ckpt, f"~{k.victim_step_est:.0f}",
             k.resumed_step, f"~{k.steps_lost:.0f}", k.source, k.load] for k in kills]
    per_kill = markdown_table(["ttl (s)", "kill", "shard", "victim -> takeover", "claim (s)", "resume (s)",
                               "training again (s)",
                               "1st new ckpt (s)", "goal (s)", "victim's last ckpt", "victim step at kill",
                               "resumed at", "steps lost", "resumed from", "load 1/5/15"], rows)
    summary, worst = [], 0.0
    for ttl in s.ttls:
        ks = [k for k in kills if k.ttl == ttl]
        if not ks:
            continue
        rec = [k.recovery_s for k in ks]
        lost = [k.steps_lost for k in ks]
        goal = ks[0].goal
        worst = max(worst, max(rec) / goal)
        summary.append([f"{ttl:g}", f"{s.settle:g}", len(ks), median([k.claim_s for k in ks]), median(rec), max(rec),
                        goal, max(rec) / goal, f"{median(lost):.0f} / {max(lost):.0f}"])
    table = markdown_table(["ttl (s)", "settle (s)", "kills", "claim median (s)", "training again median (s)",
                            "max (s)", "goal ttl+settle+5 (s)", "max / goal", "steps lost median / max"], summary)
    renew = min(min(s.ttls) / 3, 1.0)
    # the takeover read the claims (and saw the lease gone) about `settle` before its claim event
    early = [(k.ttl - renew) - (k.claim_s - k.settle) for k in kills if k.claim_s - k.settle < k.ttl - renew]
    reading = [
        f"- Goal: the orphaned shard trains again within lease_ttl + settle + {SLACK:g} s. Worst case measured: "
        f"**{worst:.3f}** of the goal ({'met' if worst <= 1 else 'missed'}).",
        "- Where the time goes: the victim's lease was renewed every min(ttl/3, heartbeat) = "
        f"{renew:g} s, so it expires ttl minus up to {renew:g} s after the kill; a waiting island polls the claims "
        "every min(2 s, ttl/4), then writes its claim and waits `settle` before the re-read that confirms it "
        "(`claim` column); then it fetches the newest verified checkpoint or finds it in its own mirror "
        "(`resume`), loads the shard's data, builds the trainer and loads the training state (`training again`: "
        "the first step is about to run). The lease ttl dominates; claim -> training took "
        f"{median([k.recovery_s - k.claim_s for k in kills]):.2f} s (median; max "
        f"{max(k.recovery_s - k.claim_s for k in kills):.2f} s). A shorter ttl buys faster recovery at the cost of "
        "more renewal traffic and a higher risk of a slow-but-alive island losing its shard.",
        *([f"- In {len(early)} of {len(kills)} kills the takeover found the lease expired earlier than ttl - "
            f"{renew:g} s after the kill (by up to {max(early):.1f} s; the claim event comes `settle` after that "
            "read): the victim's last renewal had been late, its keeper thread starved by the loaded CPU. A live "
            "island on a starved machine can lose its lease the same way; it then stops at its next renewal and "
            "the newest checkpoint wins, so the cost is work, not correctness."] if early else []),
        "- A finding of this benchmark, fixed: the first optimizer an island builds imports torch._dynamo (1.5 s "
        "of CPU on an idle core, 4-10 s on this loaded box), and islands used to pay that after claiming the "
        "orphaned shard. The first recorded run (2026-11-27, load average about 10) measured 14.6-18.6 s to "
        "training again at ttl 6 s (1.55x the goal) and 16.7-18.1 s at ttl 12 s (1.01x). The daemon now imports "
        "it at start-up, before it can claim anything.",
        f"- Steps lost: what the victim trained after its newest checkpoint that a survivor held; with "
        f"checkpoints every {s.every} steps and mirrors polling every 0.5 s it is below one checkpoint interval "
        "plus the mirror lag. The victim's step at the kill is interpolated from its last two checkpoint events "
        "(approximate); `resumed at` is exact.",
        f"- Setup: K={s.shards} shards, {s.shards + s.kills} islands (K training, the rest waiting and mirroring), "
        f"tiny DiT (hidden 32, depth 2), batch 32, one torch thread per island, loopback only; the kill time "
        f"within a checkpoint interval is drawn with seed {s.seed}. Total wall time {seconds:.0f} s.",
    ]
    if quick:
        reading.append("- **Quick run** (one kill): a smoke test, not the recorded numbers.")
    md = (section_header(NAME, "Recovery after node loss") + table + "\nEvery kill (times after the SIGKILL):\n\n"
          + per_kill + "\n" + "\n".join(reading) + "\n")
    return md, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: ttl 4 s, one shard, one kill")
    ap.add_argument("--ttl", type=float, nargs="+", default=None, help="lease ttls to test (default 6 12, quick 4)")
    ap.add_argument("--settle", type=float, default=1.0, help="claim settle time (s)")
    ap.add_argument("--kills", type=int, default=None, help="kills per ttl (default 3, quick 1)")
    ap.add_argument("--shards", type=int, default=None, help="shards K (default 2, quick 1)")
    ap.add_argument("--every", type=int, default=50, help="checkpoint interval in steps")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--doc", type=Path, default=None,
                    help=f"markdown file for the section (default {BENCHMARKS_MD.name}; quick runs only print)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (island logs, events)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    q = args.quick
    s = Settings(ttls=args.ttl or ([4.0] if q else [6.0, 12.0]), settle=args.settle,
                 shards=args.shards or (1 if q else 2), kills=args.kills or (1 if q else 3), every=args.every,
                 seed=args.seed)
    if any(t <= s.settle for t in s.ttls) or s.kills < 1 or s.shards < 1:
        ap.error("need ttl > settle, --kills >= 1 and --shards >= 1")
    doc = args.doc if args.doc is not None else (None if q else BENCHMARKS_MD)
    root = Path(tempfile.mkdtemp(prefix="ddm-bench-recovery-"))
    rng = random.Random(s.seed)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    try:
        kills: list[Kill] = []
        for ttl in s.ttls:
            kills += one_run(s, ttl, root, rng, log)
        md, worst = report(s, kills, q, time.time() - t0)
        if doc is not None:
            write_section(doc, NAME, md)
        print(md)
        print(f"recovery median {statistics.median(k.recovery_s for k in kills):.1f}s, "
              f"max {max(k.recovery_s for k in kills):.1f}s")
        print_ratio("recovery max/(ttl+settle+5)", worst)
    finally:
        if args.keep:
            print(f"run directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
