"""`ddm-node demo`: a whole swarm on 127.0.0.1 in one command.

Four islands (processes, each in its own process group) train digits partitioned K=4. Once one of
them has published a checkpoint mid-shard, its whole process group is SIGKILLed; a replacement
island joins, and the orphaned shard is taken over (by whichever island is free first) from the
newest mirrored checkpoint. Then any peer assembles the ensemble, samples and evaluates it, and
`OUT/report.md` tells the story per shard from the islands' own event logs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddm_node.errors import DDMError

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
  ema_decay: 0.99
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
class Proc:
    name: str
    popen: subprocess.Popen
    work: Path
    log: Path
    killed: bool = False


@dataclass
class Demo:
    out: Path
    quick: bool
    procs: list[Proc] = field(default_factory=list)
    t0: float = field(default_factory=time.time)

    def say(self, msg: str) -> None:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]demo[/] {time.time() - self.t0:6.1f}s  {msg}")

    # -------------------------------------------------------------------------------- processes

    def cli(self, *args: str, capture: bool = True) -> str:
        """Run a ddm-node command as a user would (a subprocess of this Python)."""
        res = subprocess.run([sys.executable, "-m", "ddm_node.cli", *args], capture_output=True, text=True,
                             env=self.env())
        if res.returncode != 0:
            raise DDMError(f"ddm-node {args[0]} failed: {res.stderr.strip().splitlines()[-1] if res.stderr else ''}")
        return res.stdout

    def env(self) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS="1", HIVEMIND_MEMORY_SHARING_STRATEGY="file_descriptor")
        env.setdefault("DDM_CACHE_DIR", str(self.out / "cache"))
        return env

    def island(self, name: str, *args: str) -> Proc:
        work = self.out / "islands" / name
        work.mkdir(parents=True, exist_ok=True)
        log = work / "island.log"
        key = self.out / "keys" / f"{name}.key"
        if not key.exists():
            self.cli("keygen", "--out", str(key))
        cmd = [sys.executable, "-m", "ddm_node.cli", "-v", "start", *args, "--identity", str(key), "--work-dir",
               str(work), "--announce-file", str(work / "announce.json"), "--threads", "1"]
        with open(log, "ab") as f:
            popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        proc = Proc(name, popen, work, log)
        self.procs.append(proc)
        return proc

    def wait_announce(self, proc: Proc, timeout: float = 120) -> dict:
        path = proc.work / "announce.json"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            if proc.popen.poll() is not None:
                raise DDMError(f"island {proc.name} exited early; see {proc.log}")
            time.sleep(0.3)
        raise DDMError(f"island {proc.name} did not become ready in {timeout:.0f}s; see {proc.log}")

    def kill_group(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                self.kill_group(p, signal.SIGTERM)
        deadline = time.time() + 30
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill_group(p)
                p.popen.wait()
        for p in self.procs:  # SIGKILLed groups may leave a DHT child or p2pd: end the whole group
            self.kill_group(p)

    # -------------------------------------------------------------------------------- the story

    def events(self) -> list[dict]:
        out = []
        for p in self.procs:
            path = p.work / "events.jsonl"
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        out.append({**json.loads(line), "name": p.name})
                    except ValueError:
                        pass  # a line cut by SIGKILL
        return sorted(out, key=lambda e: e["t"])

    def run(self) -> int:
        steps, every, router_steps = (300, 50, 150) if self.quick else (1500, 100, 600)
        cfg = self.out / "demo.yaml"
        cfg.write_text(DEMO_CONFIG.format(steps=steps, every=every, router_steps=router_steps))
        run_id = self.cli("partition", "--config", str(cfg), "--out", str(self.out / "plan")).strip().splitlines()[-1]
        self.say(f"run {run_id[:16]}: digits in 4 shards, {steps} steps each")
        first = self.island("island1", "--plan", str(self.out / "plan"))
        maddr = self.wait_announce(first)["maddrs"][0]
        others = [self.island(f"island{i}", "--run", run_id, "--initial-peers", maddr) for i in (2, 3, 4)]
        for p in others:
            self.wait_announce(p)
        self.say("4 islands up; waiting for one to pass half of its shard")
        victim, shard, step = self.pick_victim(steps // 2)
        self.kill_group(victim)
        victim.killed = True
        victim.popen.wait()
        self.say(f"SIGKILL {victim.name} (whole process group) while training shard {shard} at step >= {step}")
        live = next(p for p in self.procs if not p.killed)
        alive_maddr = self.wait_announce(live)["maddrs"][0]
        repl = self.island("island5", "--run", run_id, "--initial-peers", alive_maddr)
        self.wait_announce(repl)
        self.say("replacement island5 joined; waiting for every shard and the router")
        self.wait_done(4, timeout=900)
        self.say("all shards done and the router trained; assembling from the swarm")
        bundle = self.out / "bundle"
        self.cli("assemble", "--initial-peers", alive_maddr, "--run", run_id, "--out", str(bundle), "--min-experts", "4")
        self.cli("verify", str(bundle))
        self.cli("sample", "--ensemble", str(bundle), "--n", "100", "--out", str(self.out / "samples.png"))
        scores = json.loads(self.cli("eval", "--ensemble", str(bundle), "--n", "500", "--json").strip().splitlines()[-1])
        self.stop_all()
        report = self.write_report(run_id, victim, shard, scores, steps)
        self.say(f"done in {time.time() - self.t0:.0f}s: FD_dom {scores['fd_dom']:.2f}; report at {report}")
        print(report)
        return 0

    def pick_victim(self, min_step: int, timeout: float = 600) -> tuple[Proc, int, int]:
        """The first island to announce a checkpoint of its shard at >= min_step (but not final)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for e in self.events():
                if e["event"] == "checkpoint" and e["step"] >= min_step:
                    proc = next(p for p in self.procs if p.name == e["name"])
                    done = any(x["event"] == "done" and x["shard"] == e["shard"] for x in self.events())
                    if not done and proc.popen.poll() is None:
                        return proc, e["shard"], e["step"]
            time.sleep(0.5)
        raise DDMError("no island reached half of its shard in time")

    def wait_done(self, k: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            ev = self.events()
            done = {e["shard"] for e in ev if e["event"] == "done"}
            if len(done) >= k and any(e["event"] == "router" for e in ev):
                return
            if all(p.popen.poll() is not None for p in self.procs):
                raise DDMError("every island exited before the run finished; see islands/*/island.log")
            time.sleep(1.0)
        raise DDMError(f"the run did not finish in {timeout:.0f}s; see {self.out}/islands/*/island.log")

    def write_report(self, run_id: str, victim: Proc, killed_shard: int, scores: dict, steps: int) -> Path:
        ev = self.events()
        lines = [f"# ddm-node demo report", "", f"Run `{run_id}`: digits, K=4, {steps} steps per expert, "
                 f"{len(self.procs)} islands on 127.0.0.1, total {time.time() - self.t0:.0f} s.", "",
                 f"**{victim.name} was killed** (SIGKILL of its process group) while training shard {killed_shard}.", "",
                 "| shard | islands that trained it | checkpoints (step by island) | resumed from | final step |",
                 "|---|---|---|---|---|"]
        for k in range(4):
            trained = list(dict.fromkeys(e["name"] for e in ev if e.get("shard") == k and e["event"] == "claim"))
            cps = ", ".join(f"{e['step']} ({e['name']})" for e in ev if e.get("shard") == k and e["event"] == "checkpoint")
            res = [f"step {e['step']} via {e['source']} (published by {e.get('publisher', '?')}) on {e['name']}"
                   for e in ev if e.get("shard") == k and e["event"] == "resume"]
            final = max((e["step"] for e in ev if e.get("shard") == k and e["event"] == "done"), default="-")
            lines.append(f"| {k} | {', '.join(trained)} | {cps} | {'; '.join(res) or 'fresh start'} | {final} |")
        killed_cps = [e["step"] for e in ev if e["event"] == "checkpoint" and e["name"] == victim.name
                      and e["shard"] == killed_shard]
        resumed = [e["step"] for e in ev if e["event"] == "resume" and e.get("shard") == killed_shard
                   and e["name"] != victim.name]
        lines += ["", f"Shard {killed_shard}: the killed island's last published checkpoint was step "
                  f"{max(killed_cps, default='-')}; the takeover resumed at step {max(resumed, default='-')}.", "",
                  "## Samples (top-1 routing, learned router)", "", "![samples](samples.png)", "",
                  "## Evaluation (500 samples vs the held-out split)", "",
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
        demo.stop_all()
