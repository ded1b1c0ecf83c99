"""A swarm of islands as processes on 127.0.0.1: used by the demo, the multi-process tests and benchmarks.

Each island is `ddm-node start` in its own process group (start_new_session), so killing the
group takes its DHT child and p2pd with it. Islands write `events.jsonl` in their work dirs;
`events()` merges them into one timeline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ddm_node.core.errors import DDMError
from ddm_node.core.events import Event, EventKind, read_events
from ddm_node.core.workdir import WorkDir


@dataclass
class IslandProc:
    """A running (or finished) island process."""

    name: str
    popen: subprocess.Popen
    work: Path
    log: Path
    killed: bool = False

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def announce(self) -> dict | None:
        path = self.work / "announce.json"
        return json.loads(path.read_text()) if path.exists() else None


@dataclass
class LocalNet:
    """Islands, keys and plans under one directory."""

    root: Path
    threads: int = 1
    procs: list[IslandProc] = field(default_factory=list)

    def env(self) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), HIVEMIND_MEMORY_SHARING_STRATEGY="file_descriptor")
        env.setdefault("DDM_CACHE_DIR", str(self.root / "cache"))
        return env

    def cli(self, *args: str, cwd: Path | None = None) -> str:
        """Run a ddm-node command in a subprocess (in `cwd`); DDMError with its last stderr line on failure."""
        res = subprocess.run([sys.executable, "-m", "ddm_node.cli", *args], capture_output=True, text=True,
                             env=self.env(), cwd=cwd)
        if res.returncode != 0:
            last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
            raise DDMError(f"ddm-node {args[0]} failed: {last}")
        return res.stdout

    def partition(self, config_text: str, name: str = "plan") -> str:
        """Write a config, partition, return the run id."""
        cfg = self.root / f"{name}.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(config_text)
        return self.cli("partition", "--config", str(cfg), "--out", str(self.root / name)).strip().splitlines()[-1]

    def key(self, name: str) -> Path:
        key = self.root / "keys" / f"{name}.key"
        if not key.exists():
            self.cli("keygen", "--out", str(key))
        return key

    def start(self, name: str, *args: str, wrap: Sequence[str] = (), work: Path | None = None,
              cwd: Path | None = None) -> IslandProc:
        """Start `ddm-node start ARGS` as island `name` in its own process group.

        `wrap` prefixes the command (e.g. `ip netns exec NS`, which execs: the pid stays the island's);
        `work` puts the work dir elsewhere (e.g. on a small tmpfs) while the log stays under the root;
        `cwd` is the island's working directory (a relative dataset path in the plan resolves there).
        """
        log = self.root / "islands" / name / "island.log"
        work = work or log.parent
        work.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        (work / "announce.json").unlink(missing_ok=True)
        cmd = [*wrap, sys.executable, "-m", "ddm_node.cli", "start", *args, "--identity", str(self.key(name)),
               "--work-dir", str(work), "--announce-file", str(work / "announce.json"), "--threads", str(self.threads)]
        with open(log, "ab") as f:
            popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
                                     cwd=cwd)
        proc = IslandProc(name, popen, work, log)
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc: IslandProc, timeout: float = 120) -> dict:
        """The island's announce file once written; DDMError if it exits or times out first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = proc.announce()
            if info:
                return info
            if not proc.alive:
                raise DDMError(f"island {proc.name} exited early (code {proc.popen.returncode}); see {proc.log}")
            time.sleep(0.3)
        raise DDMError(f"island {proc.name} not ready after {timeout:.0f}s; see {proc.log}")

    def kill(self, proc: IslandProc, sig: int = signal.SIGKILL) -> None:
        """Signal the island's whole process group (its DHT child and p2pd included)."""
        try:
            os.killpg(proc.popen.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            proc.killed = True
            proc.popen.wait()

    def stop_all(self, timeout: float = 30) -> dict[str, int]:
        """SIGTERM every live island (its main process, as `kill PID` would), wait, then SIGKILL stragglers and
        leftover group members. Returns exit codes."""
        for p in self.procs:
            if p.alive:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill(p)
        for p in self.procs:  # a SIGKILLed island's DHT child or p2pd may outlive it
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return {p.name: p.popen.returncode for p in self.procs}

    def events(self) -> list[Event]:
        """Every island's events.jsonl merged by time, each event named after its island (lines cut by SIGKILL
        are skipped)."""
        out: list[Event] = []
        for p in {p.name: p for p in self.procs}.values():
            out += read_events(WorkDir(p.work).events, name=p.name)
        return sorted(out, key=lambda e: e.t)

    def wait_for(self, predicate: Callable[[list[Event]], object], timeout: float, what: str):
        """Poll the event timeline until `predicate(events)` is truthy; returns its value."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate(self.events())
            if value:
                return value
            if self.procs and not any(p.alive for p in self.procs):
                raise DDMError(f"every island exited while waiting for {what}; logs under {self.root}/islands")
            time.sleep(0.3)
        raise DDMError(f"timed out after {timeout:.0f}s waiting for {what}; logs under {self.root}/islands")


def all_done(k: int, router: bool = True) -> Callable[[list[Event]], list[Event] | None]:
    """Predicate: every shard has a `done` event (and the router one, when asked); returns the events."""

    def check(events: list[Event]) -> list[Event] | None:
        done = {e.shard for e in events if e.kind is EventKind.DONE}
        finished = len(done) >= k and (not router or any(e.kind is EventKind.ROUTER for e in events))
        return events if finished else None

    return check
