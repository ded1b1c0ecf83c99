"""One rank of an island's DDP training of one shard; started by torchrun, supervised by the daemon.

    python -m torch.distributed.run --standalone --nproc-per-node N -m ddm_node.train.worker \\
        --plan PLAN --run-id RUN --shard K --work-dir WORK [--identity KEY] [--steps S] [--device D]

This module only sets the process up (arguments, process group, watchdog, signals); the training is
`ddm_node.train.expert.train_shard`, the same loop as in one process: every rank loads the shard and
resumes from the step dir rank 0 picked (the newest valid local checkpoint), then trains with DDP.
Rank 0 writes the stats artifact and every checkpoint; the daemon notices new step dirs and announces
them (`ddm_node.train.supervisor`). SIGTERM (sent by the daemon, forwarded by torchrun) stops every
rank after the same step, and rank 0 writes a final checkpoint.

Exit codes: 0 done or stopped; 2 a DDMError (its type and one-line message also go to --error-file as
JSON, so the supervisor raises it instead of restarting); anything else is a crash and the group is
restarted.
A watchdog ends the rank if torchrun or the daemon (--parent-pid) disappears, so a killed daemon never
leaves training processes behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import write_atomic
from ddm_node.data.plan import Plan
from ddm_node.train.distributed import destroy_distributed, init_distributed
from ddm_node.train.expert import train_shard
from ddm_node.train.progress_file import ProgressWriter

log = logging.getLogger("ddm_node.train.worker")
EXIT_DDM_ERROR = 2
EXIT_ORPHANED = 3
WATCHDOG_PERIOD_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's command line (built by `ddm_node.train.supervisor.Supervisor.command`)."""
    p = argparse.ArgumentParser(prog="ddm_node.train.worker", description=__doc__.splitlines()[0])
    p.add_argument("--plan", required=True, help="plan.json")
    p.add_argument("--run-id", required=True, help="the plan file must have this sha256")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--identity", help="Ed25519 key file that signs the checkpoints")
    p.add_argument("--steps", type=int, help="train up to this step (default: the plan's budget)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (rank r uses cuda:LOCAL_RANK)")
    p.add_argument("--parent-pid", type=int, help="the daemon's pid: exit when it is gone")
    p.add_argument("--error-file", help="write a DDMError's message here")
    p.add_argument("--progress-file", help="rank 0 writes its live step and losses here (about once a second)")
    return p.parse_args(argv)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def start_watchdog(parent_pid: int | None) -> None:
    """End this process at once when torchrun (our parent) or the daemon is gone."""
    launcher = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD_S)
            if os.getppid() != launcher or (parent_pid is not None and not _alive(parent_pid)):
                log.error("the launcher or the daemon is gone: exiting")
                logging.shutdown()
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Run one rank; returns the exit code (see the module docstring)."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum, _frame):
        if not stop.is_set():
            log.warning("signal %d: stopping after this step; rank 0 writes a checkpoint", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    start_watchdog(args.parent_pid)
    try:
        return _run(args, stop)
    except DDMError as exc:
        log.error("%s", exc)
        if args.error_file:  # the supervisor raises the same kind of error in the daemon
            write_atomic(args.error_file, json.dumps({"type": type(exc).__name__, "message": str(exc)}).encode())
        return EXIT_DDM_ERROR


def _run(args: argparse.Namespace, stop: threading.Event) -> int:
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    plan = Plan.load(args.plan, expected_run_id=args.run_id)
    identity = Identity.load(args.identity) if args.identity else None
    ctx, device = init_distributed(args.device)
    ok = False
    try:
        progress = ProgressWriter(Path(args.progress_file)) if ctx.is_main and args.progress_file else None
        out = train_shard(plan, args.shard, Path(args.work_dir), steps=args.steps, identity=identity,
                          should_stop=stop.is_set, device=str(device), dist=ctx, on_losses=progress)
        if ctx.is_main:
            log.info("shard %d: rank 0 done, newest checkpoint %s", args.shard, out)
        ok = True
    finally:
        destroy_distributed(sync=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
