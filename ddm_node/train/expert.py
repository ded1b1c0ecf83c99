"""Train one shard's expert from a plan: data selection, stats artifact, resume, periodic checkpoints.

This is the whole of an island's training work; the daemon calls `train_shard` with hooks for
announcing checkpoints and for stopping on a signal, and `ddm-node train-expert` calls it alone.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ddm_node.core.config import config_hash
from ddm_node.data.datasets import Dataset, load_dataset
from ddm_node.data.plan import Plan, check_dataset
from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.trainer import Trainer
from router.centroid import ClusterStats

log = logging.getLogger(__name__)


@dataclass
class ShardData:
    """A shard's training samples as tensors."""

    x: torch.Tensor
    y: torch.Tensor | None
    latent: bool = False  # latents are not limited to [-1, 1] (datasets spec latents:PATH)


class DiskFull(DDMError):
    """A checkpoint does not fit on the work dir's filesystem, even after pruning to the newest one."""


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full filesystem or an exhausted quota."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def shard_data(plan: Plan, shard: int, dataset: Dataset | None = None) -> ShardData:
    """Load the plan's dataset (checking its fingerprint) and select the shard's samples."""
    ids = plan.shard(shard).ids
    ds = dataset if dataset is not None else load_dataset(plan.dataset)
    check_dataset(plan, ds)
    x = torch.from_numpy(ds.x[ids]).float()
    y = torch.from_numpy(ds.y[ids]).long() if ds.y is not None and plan.cfg.model.num_classes > 0 else None
    return ShardData(x, y, latent=ds.latent)


def run_config_hash(plan: Plan) -> str:
    """Hash of the model and training config that every checkpoint of this run records."""
    cfg = plan.cfg
    return config_hash(cfg.model) + config_hash(cfg.train)[:16]


def ensure_stats(plan: Plan, shard: int, work_dir: Path, data: ShardData, identity: Identity | None) -> Path:
    """Write the shard's cluster-statistics artifact once (it does not change with training)."""
    stats_dir = work_dir / f"shard_{shard:03d}" / "stats"
    if stats_dir.exists():
        try:
            ckpt.read_stats(stats_dir, verify=True)
            return stats_dir
        except Exception as exc:  # a damaged copy is rewritten from the data, never trusted
            log.warning("rewriting damaged stats artifact %s: %s", stats_dir, exc)
    stats = ClusterStats.from_data(data.x, sub_centroids=plan.cfg.partition.sub_centroids, seed=plan.cfg.partition.seed,
                                   y=data.y, num_classes=plan.cfg.model.num_classes if data.y is not None else 0)
    return ckpt.write_stats(work_dir, plan.run_id, shard, stats.to_tensors(), run_config_hash(plan), identity)


def train_shard(
    plan: Plan,
    shard: int,
    work_dir: str | Path,
    steps: int | None = None,
    identity: Identity | None = None,
    resume_from: Path | None = None,
    dataset: Dataset | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Path | None:
    """Train shard `shard` of `plan` up to `steps` (default: the plan's budget), checkpointing into `work_dir`.

    Resumes from `resume_from` (a state artifact directory) or the newest valid local checkpoint.
    `on_start(step)` is called once the trainer is built and resumed, right before the first step.
    Returns the newest checkpoint directory (None if nothing was trained or written).
    """
    cfg = plan.cfg
    work_dir = Path(work_dir)
    target = cfg.train.steps if steps is None else steps
    data = shard_data(plan, shard, dataset)
    ensure_stats(plan, shard, work_dir, data, identity)
    trainer = Trainer(cfg.model, cfg.train, data.x, data.y, device=device, check_range=not data.latent)
    latest = ckpt.latest_checkpoint(work_dir, shard)
    state_dir = resume_from or (latest / "state" if latest else None)
    if state_dir is not None:
        step = ckpt.load_state(state_dir, trainer)
        log.info("shard %d: resumed at step %d from %s", shard, step, state_dir)
    if trainer.step >= target:
        return latest
    chash = run_config_hash(plan)
    written: list[Path] = []
    keep = 2

    def checkpoint(step: int) -> None:
        nonlocal keep
        try:
            path = ckpt.write_checkpoint(work_dir, plan.run_id, shard, trainer, chash, identity)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            # The failed write left nothing behind (its staging dir is gone). Keep only the newest valid
            # checkpoint from now on and try once more; if that does not fit either, give up cleanly.
            log.error("disk full writing shard %d step %d in %s (%s); keeping only the newest checkpoint "
                      "and retrying", shard, step, work_dir, exc.strerror)
            keep = 1
            ckpt.prune_checkpoints(work_dir, shard, keep=1)
            try:
                path = ckpt.write_checkpoint(work_dir, plan.run_id, shard, trainer, chash, identity)
            except OSError as again:
                if not is_disk_full(again):
                    raise
                raise DiskFull(f"disk full: shard {shard} step {step} does not fit in {work_dir} even with only "
                               f"the newest checkpoint kept ({again.strerror})") from None
        ckpt.prune_checkpoints(work_dir, shard, keep=keep)
        written.append(path)
        if on_checkpoint:
            on_checkpoint(path)

    if on_start is not None:
        on_start(trainer.step)
    reached = trainer.run(target, on_step=on_step, on_checkpoint=checkpoint, should_stop=should_stop)
    if not written or not written[-1].name.endswith(f"{reached:08d}"):
        checkpoint(reached)
    return written[-1]
