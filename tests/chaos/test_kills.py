"""Scenario 1: random SIGKILLs of islands' process groups during training, checkpoint writes and transfers.

Four islands train two shards on 127.0.0.1 (the other two mirror and wait). Each round waits until
at least three islands are up, picks a phase and a victim with the seeded RNG and kills the victim's
whole process group (daemon, DHT child, p2pd):
- training: a training island, at a random moment after its first checkpoint since its claim;
- checkpoint: a training island while its checkpoint staging directory exists (the write is in flight);
- transfer: while an island downloads a mirror copy (a staging directory of a shard it does not train
  exists): the downloader, or (seeded coin) the holder that trains and serves that shard.
The victim is restarted at once (same key and work dir, joining through the live islands); whoever
resumes the shard first (another island from its mirror copy, or the restarted victim from its own
disk) is the takeover. At the end every shard must complete, and every step directory in every work
dir must verify (partial writes and downloads exist only as dot-named staging dirs).

Steps lost per kill, from the events.jsonl timeline:
    published  = last step the victim announced for its shard before the kill
    resumed    = step the takeover started training from (its `train`/`resume` event)
    tail       = steps the victim trained past `published`: the full interval when it died writing the
                 next checkpoint, else estimated from its checkpoint rate (<= interval)
    lost       = (published - resumed) + tail
`published - resumed` is 0 whenever a live mirror held the newest checkpoint at kill time; a kill that
lands before the mirror copied it is counted as a mirror-lag kill and its loss reported, not hidden.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ddm_node.core.config import load_config
from ddm_node.cli.localnet import IslandProc, LocalNet, all_done
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.trainer import Trainer

from .harness import (checkpoint_steps, island_log_tail, live_maddr, maddr, scan_work_dirs, training_now,
                      verified_copy)

pytestmark = pytest.mark.multiproc

TTL, EVERY, K, ISLANDS = 4.0, 40, 2, 4
PHASES = ("training", "checkpoint", "transfer")
CONFIG = """
partition: {{experts: {k}}}
model: {{hidden: 32, depth: 2, heads: 2}}
train: {{steps: {steps}, batch_size: 32, checkpoint_every: {every}, warmup_steps: 5}}
swarm: {{lease_ttl: {ttl}, settle: 1, mirror_interval: 0.5, heartbeat: 1, announce_ttl: 60, router_job: false}}
"""


def calibrate_steps_per_s() -> float:
    """Training steps per second of the test model on one thread here, now (the machine is shared)."""
    torch.set_num_threads(1)
    cfg = load_config(overrides={"model.hidden": 32, "model.depth": 2, "model.heads": 2, "train.batch_size": 32})
    x = torch.rand(256, 1, 8, 8) * 2 - 1
    trainer = Trainer(cfg.model, cfg.train, x, torch.randint(0, 10, (256,)))
    trainer.train_step()
    t = time.perf_counter()
    for _ in range(15):
        trainer.train_step()
    return 15 / (time.perf_counter() - t)


@dataclass
class Kill:
    round: int
    phase: str
    victim: str
    t: float
    shard: int | None = None  # the shard the victim trained, if any
    published: int | None = None
    mirrored: int | None = None  # newest verified copy on another live island at kill time
    staged_step: int | None = None  # a checkpoint being written at kill time
    download: str = ""  # what the victim was downloading
    takeover: str = ""
    takeover_s: float | None = None
    resumed: int | None = None
    tail: float = 0.0

    @property
    def mirror_lag(self) -> bool:
        """Another island took over and no live mirror held the newest published checkpoint at kill time."""
        return (self.published is not None and self.takeover != self.victim
                and (self.mirrored or 0) < self.published)

    @property
    def lost(self) -> float:
        if self.shard is None:
            return 0.0
        return max(0, (self.published or 0) - (self.resumed or 0)) + self.tail

    def line(self) -> str:
        if self.shard is None:
            return f"round {self.round} [{self.phase}] {self.victim} (training nothing) {self.download}: 0 steps lost"
        return (f"round {self.round} [{self.phase}] {self.victim} shard {self.shard}: published {self.published}, "
                f"mirror had {self.mirrored}, {self.takeover} resumed at {self.resumed} after {self.takeover_s:.1f} s, "
                f"tail {self.tail:.0f}{' (write in flight)' if self.staged_step else ' (est.)'} -> lost {self.lost:.0f}"
                + (" [MIRROR LAG]" if self.mirror_lag else "") + (f"; killed {self.download}" if self.download else ""))


def staging(work: Path, shard: int, old: frozenset = frozenset()) -> list[Path]:
    """Staging dirs of step dirs being written or downloaded now (not in `old`: leftovers of earlier kills)."""
    d = ckpt.shard_dir(work, shard)
    try:
        return [d / n for n in os.listdir(d) if n.startswith(".step_") and ".tmp-" in n and d / n not in old]
    except FileNotFoundError:
        return []


def all_staging(net: LocalNet) -> frozenset:
    return frozenset(p for proc in net.procs for s in range(K) for p in staging(proc.work, s))


def ready(net: LocalNet) -> list[IslandProc]:
    latest = {p.name: p for p in net.procs}  # a restarted island replaces its earlier process
    return [p for p in latest.values() if p.alive and p.announce()]


def resumed_step(events: list[dict], name: str, shard: int, after: float) -> int | None:
    for kind in ("train", "resume"):  # `train` carries the step training starts at; `resume` where it came from
        e = next((e for e in events if e["event"] == kind and e["name"] == name and e["shard"] == shard
                  and e["t"] >= after), None)
        if e is not None:
            return e["step"]
    return None


class Rounds:
    def __init__(self, net: LocalNet, run_id: str, rng, report):
        self.net, self.run_id, self.rng, self.report = net, run_id, rng, report
        self.kills: list[Kill] = []

    def pick_training(self, deadline: float) -> tuple[IslandProc, int] | None:
        """A live, ready island that trains a shard and has checkpointed it since its claim."""
        while time.time() < deadline:
            ev = self.net.events()
            procs = {p.name: p for p in ready(self.net)}
            now = training_now(ev, set(procs))
            ok = []
            for name, shard in sorted(now.items()):
                claim_t = max(e["t"] for e in ev if e["event"] == "claim" and e["name"] == name and e["shard"] == shard)
                if any(t > claim_t for t, _ in checkpoint_steps(ev, name, shard)):
                    ok.append((procs[name], shard))
            if ok:
                return self.rng.choice(ok)
            if all(any(e["event"] == "done" and e["shard"] == s for e in ev) for s in range(K)):
                return None
            time.sleep(0.2)
        return None

    def kill(self, rnd: int, phase: str) -> Kill | None:
        deadline = time.time() + 60
        old = all_staging(self.net)
        if phase == "transfer":
            return self._kill_downloader(rnd, deadline, old)
        picked = self.pick_training(deadline)
        if picked is None:
            return None
        proc, shard = picked
        staged = None
        if phase == "checkpoint":
            until = time.time() + 20
            while time.time() < until and not staged:
                staged = staging(proc.work, shard, old)
                if not staged:
                    time.sleep(0.005)
            if not staged:
                phase = "checkpoint (write not caught: killed while training)"
        else:
            ev = self.net.events()
            steps = checkpoint_steps(ev, proc.name, shard)
            gap = steps[-1][0] - steps[-2][0] if len(steps) > 1 else 1.0
            time.sleep(self.rng.uniform(0, gap))
        return self._do_kill(rnd, phase, proc, shard, staged)

    def _kill_downloader(self, rnd: int, deadline: float, old: frozenset) -> Kill | None:
        """Kill an island while it has a mirror download (a staging dir of a shard it does not train) open."""
        while time.time() < deadline:
            procs = ready(self.net)
            now = training_now(self.net.events(), {p.name for p in procs})
            for proc in self.rng.sample(procs, len(procs)):
                for shard in range(K):
                    if now.get(proc.name) == shard:
                        continue
                    staged = staging(proc.work, shard, old)
                    if not staged:
                        continue
                    what = f"shard {shard} {staged[0].name.split('.tmp-')[0].lstrip('.')}"
                    holder = next((p for p in procs if now.get(p.name) == shard), None)
                    if holder is not None and self.rng.random() < 0.5:
                        kill = self._do_kill(rnd, "transfer (holder)", holder, shard, None)
                        kill.download = f"while serving {what} to {proc.name}"
                    else:
                        kill = self._do_kill(rnd, "transfer (downloader)", proc, now.get(proc.name), None)
                        kill.download = f"while downloading {what}"
                    return kill
            time.sleep(0.005)
        return None

    def _do_kill(self, rnd: int, phase: str, proc: IslandProc, shard: int | None, staged) -> Kill:
        os.killpg(proc.popen.pid, signal.SIGKILL)
        t = time.time()
        proc.killed = True
        proc.popen.wait()
        kill = Kill(rnd, phase, proc.name, t, shard)
        self.restart(proc.name)
        if shard is None:
            return kill
        ev = [e for e in self.net.events() if e["t"] <= t]
        claimed = max(e["t"] for e in ev if e["event"] == "claim" and e["name"] == proc.name and e["shard"] == shard)
        steps = [(ct, cs) for ct, cs in checkpoint_steps(ev, proc.name, shard) if ct >= claimed]
        started = resumed_step(ev, proc.name, shard, claimed)  # no checkpoint yet: its starting point counts
        last_t, kill.published = steps[-1] if steps else (None, started)
        if last_t is None:
            last_t = next((e["t"] for e in ev if e["event"] in ("train", "resume") and e["name"] == proc.name
                           and e["shard"] == shard and e["t"] >= claimed), t)
        others = [p for p in ready(self.net) if p.name != proc.name and p.alive]
        copies = [s for p in others for s in [int(d.name.split("_")[1]) for d in ckpt.list_checkpoints(p.work, shard)]
                  if verified_copy(p.work, shard, s)]
        kill.mirrored = max(copies, default=None)
        if staged:
            kill.staged_step = int(staged[0].name.split(".tmp-")[0].split("_")[1])
            kill.tail = float(kill.staged_step - (kill.published or 0))
        else:  # time since the last checkpoint at the swarm's recent checkpoint rate, capped at the interval
            gaps = sorted(b[0] - a[0] for name in {e["name"] for e in ev} for s in range(K)
                          for a, b in zip(checkpoint_steps(ev, name, s)[-4:], checkpoint_steps(ev, name, s)[-3:]))
            gap = gaps[len(gaps) // 2] if gaps else 1.0
            kill.tail = min(float(EVERY), EVERY * (t - last_t) / max(1e-3, gap))
        return kill

    def recover(self, kill: Kill) -> None:
        """Wait for the takeover to resume the victim's shard, then restart the victim (same key, same work dir)."""
        deadline = time.time() + 120
        while kill.shard is not None:
            ev = self.net.events()
            claim = next((e for e in ev if e["event"] == "claim" and e["shard"] == kill.shard and e["t"] > kill.t), None)
            if claim is not None:
                step = resumed_step(ev, claim["name"], kill.shard, claim["t"])
                if step is not None:
                    kill.takeover, kill.resumed, kill.takeover_s = claim["name"], step, claim["t"] - kill.t
                    break
            assert time.time() < deadline, f"no takeover of shard {kill.shard} after killing {kill.victim}"
            time.sleep(0.2)
        self.report.note(kill.line())

    def restart(self, name: str) -> None:
        """Start the island again with its key and work dir, joining through every live island."""
        peers = [maddr(p.announce()) for p in ready(self.net) if p.name != name]
        self.net.start(name, "--run", self.run_id, "--initial-peers", *(peers or [live_maddr(self.net, (name,))]))

    def wait_ready(self, count: int, timeout: float = 120) -> None:
        """At least `count` islands up (a victim restarted in the previous round may still be starting)."""
        deadline = time.time() + timeout
        while len(ready(self.net)) < count:
            assert time.time() < deadline, "a restarted island did not come back"
            time.sleep(0.3)


def run_kill_rounds(net: LocalNet, rng, report, phases: list[str]) -> None:
    rate = calibrate_steps_per_s()
    # The first island trains alone while the others start (about 15 s here), then two trainers share the
    # cores with the mirrors. The budget keeps both shards training through every round (about 10 s each).
    budget = min(400 * len(phases), max(400, int(0.6 * rate * (20 + 10 * len(phases))) // EVERY * EVERY))
    run_id = net.partition(CONFIG.format(k=K, steps=budget, every=EVERY, ttl=TTL))
    first = net.start("i1", "--plan", str(net.root / "plan"))
    boot = net.wait_ready(first)["maddrs"][0]
    for p in [net.start(f"i{i}", "--run", run_id, "--initial-peers", boot) for i in range(2, ISLANDS + 1)]:
        net.wait_ready(p)
    rounds = Rounds(net, run_id, rng, report)
    report.note(f"calibrated {rate:.0f} steps/s on one thread; budget {budget} steps per shard, "
                f"checkpoint every {EVERY}, lease ttl {TTL:.0f} s, phases {phases}")
    t0 = time.time()
    for i, phase in enumerate(phases, 1):
        rounds.wait_ready(ISLANDS - 1)
        kill = rounds.kill(i, phase)
        if kill is None:
            report.note(f"round {i} [{phase}]: no victim before the shards finished; rounds end here")
            break
        rounds.kills.append(kill)
        rounds.recover(kill)
    kills = rounds.kills
    ev = net.wait_for(all_done(K, router=False), 400, f"all {K} shards done")
    done_s = time.time() - t0
    codes = net.stop_all()
    scan = scan_work_dirs(sorted({p.work for p in net.procs}))
    leftovers = sum(f.stat().st_size for p in {p.work for p in net.procs} for f in p.glob("shard_*/.*/**/*")
                    if f.is_file())
    skipped = sum(island_log_tail(p, 10**6).count("skipping checkpoint") for p in {p.name: p for p in net.procs}.values())
    training_kills = [k for k in kills if k.shard is not None]
    report.add(rounds=len(kills), kills=len(kills), phases=[k.phase.split(" ")[0] for k in kills],
               experts_completed=len({e["shard"] for e in ev if e["event"] == "done"}), budget=budget,
               steps_lost=[round(k.lost) for k in training_kills], steps_lost_total=round(sum(k.lost for k in kills)),
               mirror_lag_kills=sum(k.mirror_lag for k in training_kills), step_dirs_verified=scan.step_dirs,
               staging_leftovers=scan.staging_left, part_files=scan.part_files, bytes_lost=leftovers,
               rounds_and_completion_s=round(done_s))
    assert len(kills) >= min(2, len(phases)), "fewer than two kills happened: the budget ran out too early"
    assert not scan.bad, scan.bad
    assert skipped == 0, f"{skipped} corrupt step dirs were seen by islands"
    for k in training_kills:
        assert k.published is not None and k.resumed is not None
        assert k.tail <= EVERY
        if not k.mirror_lag:
            assert k.resumed >= k.published, k.line()
            assert k.lost <= EVERY, k.line()
    assert all(code == 0 for code in codes.values()), f"an island (latest run of each) did not exit 0: {codes}"


def test_random_kills_short(net, report, rng):
    run_kill_rounds(net, rng, report, rng.sample(PHASES, 3))


@pytest.mark.slow
def test_random_kills_long(net, report, rng):
    run_kill_rounds(net, rng, report, [rng.choice(PHASES) for _ in range(8)])
