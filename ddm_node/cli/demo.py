"""`ddm-node demo`: a whole swarm on 127.0.0.1 in one command.

Four islands (processes, each in its own process group) train digits partitioned K=4. Once one of
them has published a checkpoint mid-shard, its whole process group is SIGKILLed; a replacement
island joins, and the orphaned shard is taken over (by whichever island is free first) from the
newest mirrored checkpoint. Then any peer assembles the ensemble, samples and evaluates it, and
`OUT/report.md` tells the story per shard from the islands' own event logs.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddm_node.cli.localnet import IslandProc, LocalNet, all_done
from ddm_node.core.errors import DDMError
from ddm_node.core.events import Event, EventKind

DEMO_CONFIG = """\
# ddm-node demo: digits, K=4, small enough for a 2-core CPU in a few minutes.
partition:
  experts: 4
model:
  size: tiny
  hidden: 64
  depth: 3
train:
  steps: {steps}
  batch_size: 64
  lr: 0.002
  t_sampling: uniform
  checkpoint_every: {every}
  warmup_steps: 20
router:
  steps: {router_steps}
  batch_size: 128
sample:
  steps: 24
swarm:
  lease_ttl: 8
  settle: 1
  mirror_interval: 1
  heartbeat: 1
  announce_ttl: 60
"""


@dataclass
class Demo:
    out: Path
    quick: bool
    t0: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.net = LocalNet(self.out)

    def say(self, msg: str) -> None:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]demo[/] {time.time() - self.t0:6.1f}s  {msg}")

    def run(self) -> int:
        steps, every, router_steps = (200, 40, 100) if self.quick else (1000, 100, 400)
        net = self.net
        run_id = net.partition(DEMO_CONFIG.format(steps=steps, every=every, router_steps=router_steps), "plan")
        self.say(f"run {run_id[:16]}: digits in 4 shards, {steps} steps each")
        first = net.start("island1", "--plan", str(self.out / "plan"))
        maddr = net.wait_ready(first)["maddrs"][0]
        others = [net.start(f"island{i}", "--run", run_id, "--initial-peers", maddr) for i in (2, 3, 4)]
        for p in others:
            net.wait_ready(p)
        self.say("4 islands up; waiting for one to pass half of its shard and another to mirror it")
        victim, shard, step = net.wait_for(lambda ev: self.victim(ev, steps // 2), 600, "an island half-way, mirrored")
        net.kill(victim)
        self.say(f"SIGKILL {victim.name} (whole process group) while training shard {shard} at step >= {step}")
        alive_maddr = net.wait_ready(next(p for p in net.procs if not p.killed))["maddrs"][0]
        net.wait_ready(net.start("island5", "--run", run_id, "--initial-peers", alive_maddr))
        self.say("replacement island5 joined; waiting for every shard and the router")
        net.wait_for(all_done(4), 900, "every shard and the router")
        self.say("all shards done and the router trained; assembling from the swarm")
        bundle = self.out / "bundle"
        net.cli("assemble", "--initial-peers", alive_maddr, "--run", run_id, "--out", str(bundle), "--min-experts", "4")
        net.cli("verify", str(bundle))
        net.cli("sample", "--ensemble", str(bundle), "--n", "100", "--out", str(self.out / "samples.png"))
        n_eval = 200 if self.quick else 500  # the quick demo's eval is a sanity check, not a measurement
        scores = json.loads(net.cli("eval", "--ensemble", str(bundle), "--n", str(n_eval), "--json").strip().splitlines()[-1])
        net.stop_all()
        report = self.write_report(run_id, victim, shard, scores, steps)
        self.say(f"done in {time.time() - self.t0:.0f}s: FD_dom {scores['fd_dom']:.2f}; report at {report}")
        print(report)
        return 0

    def victim(self, events: list[Event], min_step: int) -> tuple[IslandProc, int, int] | None:
        """The first live island with a checkpoint at >= min_step of a shard not yet done that another island
        has mirrored at >= min_step: only then does the takeover resume rather than start over."""
        done = {e.shard for e in events if e.kind is EventKind.DONE}
        for e in events:
            if e.kind is EventKind.CHECKPOINT and e.step >= min_step and e.shard not in done:
                mirrored = any(m.kind is EventKind.MIRROR and m.shard == e.shard and m.name != e.name
                               and (m.step or 0) >= min_step for m in events)
                proc = next(p for p in self.net.procs if p.name == e.name)
                if mirrored and proc.alive:
                    return proc, e.shard, e.step
        return None

    def write_report(self, run_id: str, victim: IslandProc, killed_shard: int, scores: dict, steps: int) -> Path:
        ev = self.net.events()
        lines = ["# ddm-node demo report", "", f"Run `{run_id}`: digits, K=4, {steps} steps per expert, "
                 f"{len(self.net.procs)} islands on 127.0.0.1, total {time.time() - self.t0:.0f} s.", "",
                 f"**{victim.name} was killed** (SIGKILL of its process group) while training shard {killed_shard}.", "",
                 "| shard | islands that trained it | checkpoints (step by island) | resumed from | final step |",
                 "|---|---|---|---|---|"]
        for k in range(4):
            of_k = [e for e in ev if e.shard == k]
            trained = list(dict.fromkeys(e.name for e in of_k if e.kind is EventKind.CLAIM))
            cps = ", ".join(f"{e.step} ({e.name})" for e in of_k if e.kind is EventKind.CHECKPOINT)
            res = [f"step {e.step} via {e.source} (published by {'?' if e.publisher is None else e.publisher}) "
                   f"on {e.name}" for e in of_k if e.kind is EventKind.RESUME]
            final = max((e.step for e in of_k if e.kind is EventKind.DONE), default="-")
            lines.append(f"| {k} | {', '.join(trained)} | {cps} | {'; '.join(res) or 'fresh start'} | {final} |")
        killed_cps = [e.step for e in ev if e.kind is EventKind.CHECKPOINT and e.name == victim.name
                      and e.shard == killed_shard]
        resumed = [e.step for e in ev if e.kind is EventKind.RESUME and e.shard == killed_shard
                   and e.name != victim.name]
        lines += ["", f"Shard {killed_shard}: the killed island's last published checkpoint was step "
                  f"{max(killed_cps, default='-')}; the takeover resumed at step {max(resumed, default='-')}.", "",
                  "## Samples (top-1 routing, learned router)", "", "![samples](samples.png)", "",
                  f"## Evaluation ({scores['n']} samples vs the held-out split)", "",
                  f"FD_dom {scores['fd_dom']:.2f}, KID {scores['kid']:.4f} ± {scores['kid_std']:.4f}, "
                  f"precision {scores['precision']:.2f}, recall {scores['recall']:.2f} "
                  f"(domain classifier {scores['classifier_hash'][:12]}; FD_dom is not FID).", "",
                  "Island logs: `islands/*/island.log`; events: `islands/*/events.jsonl`.", ""]
        path = self.out / "report.md"
        path.write_text("\n".join(lines))
        return path


def run_demo(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (out / "report.md").exists() and not (out / "demo.yaml").exists():
            raise DDMError(f"--out {out} exists and is not a previous demo directory; choose an empty one")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    demo = Demo(out, args.quick)
    try:
        return demo.run()
    finally:
        demo.net.stop_all()
