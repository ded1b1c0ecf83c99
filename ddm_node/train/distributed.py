"""DDP helpers for an island with several processes (one per GPU, or several CPU processes).

The trainer's random stream (data order, t, noise, label dropout) is drawn for the whole GLOBAL batch
on every rank from the same seeded CPU generator, and each rank keeps its own contiguous rows
(`rank_slice`). The global batch, the data order and the noise are therefore the same for any number
of processes, a checkpoint written by N processes resumes on M, and the only difference between
world sizes is the floating-point order of the gradient all-reduce.

Backends: NCCL for CUDA devices (one process per GPU, `cuda:LOCAL_RANK`), gloo for CPUs. Control
messages (stop flags, the checkpoint path to resume from) always go over a gloo group on CPU tensors,
so checking them never synchronises the GPU stream.

The self-test (a few DDP steps of a small DiT under torchrun) is `ddm_node.train.selftest`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ddm_node.core.errors import DDMError

logger = logging.getLogger(__name__)

# Collectives wait this long before failing (a rank writing a large checkpoint keeps the others waiting).
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" or "gloo"
    control: Any = None  # gloo process group for CPU control messages (None: the default group)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints and logs."""
        return self.rank == 0


def env_ranks() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from the variables torchrun sets, or None outside torchrun."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


def init_distributed(device: str | None = None, rank: int | None = None, world_size: int | None = None,
                     local_rank: int | None = None, init_method: str | None = None) -> tuple[DistContext, torch.device]:
    """Join the process group (ranks from torchrun's environment unless given) and pick this rank's device.

    `device` "auto"/None: CUDA when available (then `cuda:LOCAL_RANK` and NCCL), else the CPU (gloo).
    "cuda" also means `cuda:LOCAL_RANK`; an explicit "cuda:N" is only allowed with one process.
    """
    if rank is None or world_size is None:
        found = env_ranks()
        if found is None:
            raise DDMError("not started by torchrun: RANK and WORLD_SIZE are not set")
        rank, world_size, env_local = found
        local_rank = env_local if local_rank is None else local_rank
    local_rank = rank if local_rank is None else local_rank
    dev = _rank_device(device, local_rank, world_size)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: dict[str, Any] = dict(backend=backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
    if init_method is not None:
        kwargs["init_method"] = init_method
    if backend == "nccl":
        kwargs["device_id"] = dev  # binds the communicator to this rank's GPU at once
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # an older torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    control = dist.new_group(backend="gloo") if backend == "nccl" else None
    ctx = DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, control=control)
    logger.info("rank %d/%d joined the process group (%s, %s)", rank, world_size, backend, dev)
    return ctx, dev


def _rank_device(device: str | None, local_rank: int, world_size: int) -> torch.device:
    want = device if device not in (None, "", "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(want)
    except (RuntimeError, TypeError):
        raise DDMError(f"device {device!r}: unknown (use auto, cpu or cuda)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DDMError(f"device {device!r}: only cpu and cuda are supported with several processes")
    if not torch.cuda.is_available():
        raise DDMError(f"device {device!r} but CUDA is not available on this machine")
    if dev.index is not None:
        if world_size > 1:
            raise DDMError(f"device {device!r}: with several processes use 'cuda' (rank r takes cuda:LOCAL_RANK)")
        return dev
    if local_rank >= torch.cuda.device_count():
        raise DDMError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", local_rank)


def destroy_distributed(sync: bool = False) -> None:
    """Leave the process group (safe to call when none was joined).

    `sync` (the clean-exit path): first wait until every rank gets here. A rank that tears gloo down
    and exits while another still finishes its last work can make that one abort ("terminate called
    without an active exception"). Error paths leave without waiting: a dead peer would never come.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if sync and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """The contiguous rows of a batch of `n` that `rank` takes: sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DDMError(f"bad rank {rank} of world size {world_size}")
    if n < world_size:
        raise DDMError(f"a batch of {n} cannot be split over {world_size} processes (at least one sample each)")
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def any_rank(ctx: DistContext | None, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (a CPU all-reduce over the control group)."""
    if ctx is None or ctx.world_size == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.control)
    return bool(t.item())


def broadcast_object(ctx: DistContext | None, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (small picklable values only: paths, numbers)."""
    if ctx is None or ctx.world_size == 1:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


def barrier(ctx: DistContext | None) -> None:
    """Wait for every rank (over the control group; never touches the GPU)."""
    if ctx is not None and ctx.world_size > 1:
        dist.barrier(group=ctx.control)


def all_reduce_sum(ctx: DistContext | None, t: torch.Tensor) -> torch.Tensor:
    """In-place sum of `t` over the ranks on the main group (`t` on the rank's device)."""
    if ctx is not None and ctx.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
