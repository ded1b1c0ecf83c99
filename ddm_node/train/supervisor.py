"""The daemon's side of multi-process training: launch the worker group with torchrun and supervise it.

`train_shard_distributed` is the drop-in for `train_shard` when an island has several processes
(GPUs). It runs

    python -m torch.distributed.run --standalone --nproc-per-node N -m ddm_node.train.worker ...

in its own session (process group) and, while it runs:
- announces checkpoints: rank 0 writes step dirs atomically into the work dir; every `poll` seconds the
  supervisor looks at the newest step dir name and, when it is new and verifies, calls `on_checkpoint`
  (the daemon then registers and announces it). No other channel between the daemon and the workers.
- stops it: when `should_stop()` turns true (SIGTERM to the daemon, lost lease), it SIGTERMs the group;
  torchrun forwards the signal, every rank stops after the same step and rank 0 writes a final
  checkpoint. After `stop_timeout` seconds the group and the workers' own sessions are SIGKILLed.
- relays live progress: rank 0 writes its step and losses to a small file (train/progress_file.py), read at
  each poll and handed to `on_losses`.
- restarts it: a group that exits with an error (a crashed or killed rank) is started again and
  resumes from the newest valid checkpoint. Restarts are bounded: `max_restarts` consecutive failures
  without a new checkpoint raise a DDMError naming the exit code and the log. A worker's DDMError
  (bad data, divergence) is reported at once, not retried.
Worker output goes to WORK/workers/shard_KKK/worker.log.

The data order does not depend on the number of processes, so a shard may resume on any number of
processes (or in one process with `train_shard`) from any other's checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.events import EventKind
from ddm_node.core.manifest import write_atomic
from ddm_node.core.workdir import WorkDir, step_of
from ddm_node.data.plan import Plan
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.checkpointer import DiskFull
from ddm_node.train.progress_file import PROGRESS_FILE, ProgressReader

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 300.0  # a large model's final checkpoint (model, EMA, Adam: 16 bytes/param) must fit
MAX_RESTARTS = 3
LOG_TAIL_LINES = 8
EventHook = Callable[[EventKind, dict], None]  # on_event(kind, fields)


def resolve_nproc(flag: int | None, node_config: str | Path | None = None) -> int | None:
    """This node's process count: the `--nproc-per-node` flag, else `train.nproc_per_node` of the node's
    `--config` file when it sets one, else None (the daemon then uses the plan's value, default 1)."""
    if flag is not None:
        if isinstance(flag, bool) or not isinstance(flag, int) or flag < 1:
            raise DDMError(f"--nproc-per-node must be a positive integer, got {flag!r}")
        return flag
    if node_config is None:
        return None
    import yaml

    from ddm_node.core.config import load_config

    cfg = load_config(node_config)  # full validation, file-named errors
    raw = yaml.safe_load(Path(node_config).read_text()) or {}
    train = raw.get("train") if isinstance(raw, dict) else None
    return cfg.train.nproc_per_node if isinstance(train, dict) and "nproc_per_node" in train else None


def check_devices(nproc: int, device: str | None) -> None:
    """DDMError unless `nproc` processes can run on `device` here (one GPU each on CUDA)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise DDMError(f"nproc_per_node must be a positive integer, got {nproc!r}")
    if device not in (None, "", "auto", "cpu", "cuda"):
        raise DDMError(f"device {device!r}: with several processes use auto, cpu or cuda "
                       "(rank r takes cuda:LOCAL_RANK)")
    if device == "cuda" or (device in (None, "", "auto") and torch.cuda.is_available()):
        have = torch.cuda.device_count()
        if nproc > have:
            raise DDMError(f"--nproc-per-node {nproc} but this machine has {have} CUDA device(s)")


@dataclass
class RestartPolicy:
    """Allows `max_restarts` consecutive failures that made no new checkpoint; progress resets the count."""

    max_restarts: int = MAX_RESTARTS
    failures: int = 0

    def allow(self, progressed: bool) -> bool:
        """Record one failed run of the group; True when another start is allowed."""
        self.failures = 0 if progressed else self.failures + 1
        return progressed or self.failures <= self.max_restarts


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing or the process gone: the workers' watchdogs end them
        return []


class WorkerGroup:
    """torchrun and its workers: torchrun leads its own session, each worker leads another (torchrun's doing)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path):
        self.cmd, self.env, self.log_path = cmd, env, log_path
        self.popen: subprocess.Popen | None = None

    def start(self) -> int:
        """Start torchrun in a session of its own, output appended to the log; returns its pid."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as f:
            f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.cmd)}\n".encode())
            f.flush()
            self.popen = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                          env=self.env, start_new_session=True)
        return self.popen.pid

    @property
    def pid(self) -> int:
        """torchrun's pid, which is also its session's and process group's id."""
        return self.popen.pid

    def poll(self) -> int | None:
        """torchrun's exit code, None while it runs."""
        return self.popen.poll()

    def stop(self, timeout: float) -> int:
        """SIGTERM the group (torchrun forwards it to every rank), wait, then SIGKILL everything left."""
        self._signal_group(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker group %d did not stop within %.0fs: killing it", self.pid, timeout)
            return self.kill()

    def kill(self) -> int:
        """SIGKILL torchrun's session and every worker's session."""
        workers = _descendants(self.pid)
        self._signal_group(signal.SIGKILL)
        for pid in workers:
            for fn in (os.killpg, os.kill):
                try:
                    fn(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        return self.popen.wait()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


class Supervisor:
    """Runs one shard's worker group to its target; see the module docstring."""

    def __init__(self, plan: Plan, shard: int, work_dir: Path, nproc: int, identity_path: Path | None,
                 steps: int | None, device: str | None, on_checkpoint: Callable[[Path], None] | None,
                 should_stop: Callable[[], bool] | None, on_event: EventHook | None, max_restarts: int,
                 stop_timeout: float, poll: float, on_start: Callable[[int], None] | None = None,
                 on_losses: Callable[[int, list[float]], None] | None = None):
        device = device or plan.cfg.train.device  # as train_shard: the flag, else the run config
        check_devices(nproc, device)
        self.plan, self.shard, self.work_dir, self.nproc = plan, shard, Path(work_dir), nproc
        self.identity_path = Path(identity_path) if identity_path is not None else None
        self.target = plan.cfg.train.steps if steps is None else steps
        self.device = device or "auto"
        self.on_checkpoint, self.should_stop, self.on_event = on_checkpoint, should_stop, on_event
        self.on_start, self.on_losses = on_start, on_losses
        self.policy = RestartPolicy(max_restarts)
        self.stop_timeout, self.poll = stop_timeout, poll
        self.dir = WorkDir(self.work_dir).workers(shard)
        self.log_path = self.dir / "worker.log"
        self.error_file = self.dir / "error.txt"
        self.progress = ProgressReader(self.dir / PROGRESS_FILE)
        self.announced = step_of(ckpt.latest_checkpoint(self.work_dir, shard))

    # ------------------------------------------------------------------------------ helpers
    def _event(self, kind: EventKind, **fields) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, fields)
            except Exception as exc:  # an event log problem must not stop training
                log.warning("event %s: %s", kind.value, exc)

    def _plan_file(self) -> Path:
        path = self.dir / "plan.json"
        raw = self.plan.to_bytes()
        if not path.is_file() or path.read_bytes() != raw:
            write_atomic(path, raw)
        return path

    def _worker_error(self) -> DDMError:
        """The DDMError a worker reported (same type for a full disk, which the daemon handles apart)."""
        text = self.error_file.read_text(errors="replace").strip()
        try:
            data = json.loads(text)
            kind, message = str(data["type"]), str(data["message"])
        except (ValueError, KeyError, TypeError):
            kind, message = "DDMError", text
        return DiskFull(message) if kind == "DiskFull" else DDMError(f"shard {self.shard}: {message}")

    def command(self) -> list[str]:
        """The torchrun command line of this shard's worker group (`ddm_node.train.worker` on every rank)."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(self.nproc),
               "--monitor-interval", "0.5", "-m", "ddm_node.train.worker",
               "--plan", str(self._plan_file()), "--run-id", self.plan.run_id, "--shard", str(self.shard),
               "--work-dir", str(self.work_dir), "--steps", str(self.target), "--device", self.device,
               "--parent-pid", str(os.getpid()), "--error-file", str(self.error_file),
               "--progress-file", str(self.dir / PROGRESS_FILE)]
        if self.identity_path is not None:
            cmd += ["--identity", str(self.identity_path)]
        return cmd

    def environment(self) -> dict[str, str]:
        """The daemon's environment, set up for the workers (import path, threads, loopback, unbuffered logs)."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the workers import this very ddm_node
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // self.nproc))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: rank-to-rank traffic stays on loopback
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(int(self.stop_timeout))  # torchrun's grace after SIGTERM
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def announce_new(self) -> None:
        """Hand the newest step dir to `on_checkpoint` once it is newer than the last one and verifies."""
        found = ckpt.list_checkpoints(self.work_dir, self.shard)
        if not found or step_of(found[0]) <= self.announced:
            return
        newest = found[0]
        try:
            ckpt.verify_checkpoint(newest, require_signature=self.identity_path is not None)
        except (IntegrityError, OSError) as exc:  # pruned meanwhile, or damaged: the next one will do
            log.warning("shard %d: not announcing %s: %s", self.shard, newest, exc)
            return
        self.announced = step_of(newest)
        if self.on_checkpoint is not None:
            self.on_checkpoint(newest)

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> Path | None:
        """Start the group, again after a crash, until the target, a stop request or too many failures."""
        attempt = 0
        while True:
            latest = ckpt.latest_checkpoint(self.work_dir, self.shard)
            if step_of(latest) >= self.target or (self.should_stop is not None and self.should_stop()):
                return latest
            attempt += 1
            start_step = step_of(latest)
            group = self._start(attempt, max(start_step, 0))
            stopped = self._watch(group)
            code, newest = self._exited(group, attempt, stopped)
            if stopped or (code == 0 and not self.error_file.is_file()):
                return ckpt.latest_checkpoint(self.work_dir, self.shard)
            self._failed(code, start_step, newest)

    def _start(self, attempt: int, resume_step: int) -> WorkerGroup:
        self.error_file.unlink(missing_ok=True)
        group = WorkerGroup(self.command(), self.environment(), self.log_path)
        pid = group.start()
        log.info("shard %d: worker group %d started (%d processes, attempt %d, resuming at step %d)",
                 self.shard, pid, self.nproc, attempt, resume_step)
        self._event(EventKind.WORKERS_START, pid=pid, nproc=self.nproc, attempt=attempt, resume_step=resume_step)
        if self.on_start is not None:
            self.on_start(resume_step)
        return group

    def _exited(self, group: WorkerGroup, attempt: int, stopped: bool) -> tuple[int | None, int]:
        """Announce what the group left and record its exit; returns its exit code and the newest step (-1: none)."""
        code = group.poll()
        self.announce_new()
        self._relay_progress()
        newest = step_of(ckpt.latest_checkpoint(self.work_dir, self.shard))
        self._event(EventKind.WORKERS_EXIT, pid=group.pid, code=code, attempt=attempt, step=max(newest, 0),
                    stopped=stopped)
        return code, newest

    def _failed(self, code: int | None, start_step: int, newest: int) -> None:
        """A failed group: raise the worker's own error, or DDMError when restarts ran out; else wait a little."""
        if self.error_file.is_file():
            raise self._worker_error()
        if not self.policy.allow(progressed=newest > start_step):
            raise DDMError(f"shard {self.shard}: the worker group failed {self.policy.failures} times in a row "
                           f"without a new checkpoint (last exit code {code}); see {self.log_path}: "
                           f"{_log_tail(self.log_path)}")
        log.warning("shard %d: worker group exited with code %s at step %d; restarting from the last checkpoint",
                    self.shard, code, max(newest, 0))
        self._event(EventKind.WORKERS_RESTART, code=code, step=max(newest, 0), failures=self.policy.failures)
        time.sleep(min(float(self.policy.failures), 5.0))  # back off a little: a crash may repeat at once

    def _relay_progress(self) -> None:
        got = self.progress.read() if self.on_losses is not None else None
        if got is not None:
            self.on_losses(*got)

    def _watch(self, group: WorkerGroup) -> bool:
        """Poll until the group exits; returns True when it was stopped on request."""
        try:
            while group.poll() is None:
                self.announce_new()
                self._relay_progress()
                if self.should_stop is not None and self.should_stop():
                    log.info("shard %d: stopping the worker group (rank 0 writes a final checkpoint)", self.shard)
                    group.stop(self.stop_timeout)
                    return True
                time.sleep(self.poll)
            return False
        except BaseException:  # the daemon itself is failing: never leave the workers behind
            if group.poll() is None:
                group.stop(min(self.stop_timeout, 30.0))
            raise


def train_shard_distributed(plan: Plan, shard: int, work_dir: str | Path, nproc: int,
                            identity_path: str | Path | None = None, steps: int | None = None,
                            device: str | None = None, on_checkpoint: Callable[[Path], None] | None = None,
                            should_stop: Callable[[], bool] | None = None, on_event: EventHook | None = None,
                            max_restarts: int = MAX_RESTARTS, stop_timeout: float = STOP_TIMEOUT_S,
                            poll: float = 0.5, on_start: Callable[[int], None] | None = None,
                            on_losses: Callable[[int, list[float]], None] | None = None) -> Path | None:
    """Train shard `shard` with `nproc` DDP processes (torchrun) up to `steps` (default: the plan's budget).

    Same contract as `train_shard`: resumes from the newest valid local checkpoint, calls
    `on_checkpoint(step_dir)` for new checkpoints, stops (with a final checkpoint) when `should_stop()`,
    returns the newest checkpoint directory. `on_event(kind, fields)` hears EventKind.WORKERS_START,
    WORKERS_EXIT and WORKERS_RESTART (a str enum: each equals its value, e.g. "workers_start");
    `on_start(step)` is called with the step each started group resumes at; `on_losses(step, losses)` with rank
    0's progress (about once a second).
    Checkpoints are signed with the key file `identity_path` (unsigned without one).
    """
    sup = Supervisor(plan, shard, Path(work_dir), nproc, identity_path, steps, device, on_checkpoint, should_stop,
                     on_event, max_restarts, stop_timeout, poll, on_start, on_losses)
    return sup.run()
