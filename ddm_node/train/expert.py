"""Train one shard's expert from a plan: data selection, stats artifact, resume, periodic checkpoints.

This is the whole of an island's training work, in one loop for one process and for every rank of a
DDP group: the daemon calls `train_shard` with hooks for announcing checkpoints and for stopping on a
signal, `ddm-node train-expert` calls it alone, and each torchrun worker (`ddm_node.train.worker`)
calls it with its `DistContext`. With several ranks, rank 0 writes the stats artifact and every
checkpoint and picks the checkpoint that every rank resumes from; a stop request on any rank stops
all of them after the same step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddm_node.core.config import config_hash
from ddm_node.core.identity import Identity
from ddm_node.core.workdir import WorkDir
from ddm_node.data.datasets import Dataset
from ddm_node.data.packing import shard_rows
from ddm_node.data.plan import Plan
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.checkpointer import Checkpointer
from ddm_node.train.distributed import DistContext, any_rank, broadcast_object
from ddm_node.train.trainer import Trainer
from router.stats import ClusterStats

log = logging.getLogger(__name__)


@dataclass
class ShardData:
    """A shard's training samples as tensors."""

    x: torch.Tensor
    y: torch.Tensor | None
    latent: bool = False  # latents are not limited to [-1, 1] (datasets spec latents:PATH)
    text: torch.Tensor | None = None  # pooled text embeddings [N, D] of a text-conditioned run


def shard_data(plan: Plan, shard: int, dataset: Dataset | None = None, work_dir: str | Path | None = None) -> ShardData:
    """The shard's samples: from `dataset`, or from the shard's verified data pack in `work_dir` when the plan has
    packs and it is there, else from the plan's dataset (fingerprint checked): `data.packing.shard_rows`."""
    rows = shard_rows(plan, shard, work_dir, dataset)
    x = torch.from_numpy(np.ascontiguousarray(rows.x)).float()
    y = torch.from_numpy(rows.y).long() if rows.y is not None and plan.cfg.model.num_classes > 0 else None
    text = torch.from_numpy(np.ascontiguousarray(rows.text)).float() if rows.text is not None else None
    return ShardData(x, y, latent=rows.latent, text=text)


def run_config_hash(plan: Plan) -> str:
    """Hash of the model and training config that every checkpoint of this run records."""
    cfg = plan.cfg
    return config_hash(cfg.model) + config_hash(cfg.train)[:16]


def ensure_stats(plan: Plan, shard: int, work_dir: Path, data: ShardData, identity: Identity | None) -> Path:
    """Write the shard's cluster-statistics artifact once (it does not change with training)."""
    stats_dir = WorkDir(work_dir).stats(shard)
    if stats_dir.exists():
        try:
            ckpt.read_stats(stats_dir, verify=True)
            return stats_dir
        except Exception as exc:  # a damaged copy is rewritten from the data, never trusted
            log.warning("rewriting damaged stats artifact %s: %s", stats_dir, exc)
    stats = ClusterStats.from_data(data.x, sub_centroids=plan.cfg.partition.sub_centroids, seed=plan.cfg.partition.seed,
                                   y=data.y, num_classes=plan.cfg.model.num_classes if data.y is not None else 0)
    return ckpt.write_stats(work_dir, plan.run_id, shard, stats.to_tensors(), run_config_hash(plan), identity)


def _is_main(dist: DistContext | None) -> bool:
    return dist is None or dist.is_main


def _resume(trainer: Trainer, work_dir: Path, shard: int, resume_from: Path | None,
            dist: DistContext | None) -> Path | None:
    """Load the state rank 0 picked (`resume_from`, else the newest valid local checkpoint's) on every rank.

    Rank 0 alone looks at the work dir and broadcasts its pick, so that every rank resumes from the same
    step dir. Returns the newest valid local step dir (None if there is none).
    """
    picked = None
    if _is_main(dist):
        latest = ckpt.latest_checkpoint(work_dir, shard)
        state_dir = resume_from or (latest / ckpt.STATE if latest is not None else None)
        picked = tuple(str(p) if p is not None else None for p in (latest, state_dir))
    latest, state_dir = (Path(p) if p else None for p in broadcast_object(dist, picked))
    if state_dir is not None:
        ckpt.load_state(state_dir, trainer)
        if _is_main(dist):
            log.info("shard %d: resumed at step %d from %s on %d process(es)", shard, trainer.step, state_dir,
                     trainer.world_size)
    return latest


def _stop_check(should_stop: Callable[[], bool] | None, dist: DistContext | None) -> Callable[[], bool] | None:
    """`should_stop` for the trainer. With DDP every rank must stop after the same step, so each step the
    ranks' flags are all-reduced (a CPU collective on the control group): a stop on any rank stops all."""
    if dist is None:
        return should_stop
    return lambda: any_rank(dist, should_stop is not None and should_stop())


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
    dist: DistContext | None = None,
    on_losses: Callable[[int, list[float]], None] | None = None,
) -> Path | None:
    """Train shard `shard` of `plan` up to `steps` (default: the plan's budget), checkpointing into `work_dir`.

    Resumes from `resume_from` (a state artifact directory) or the newest valid local checkpoint.
    `on_start(step)` is called once the trainer is built and resumed, right before the first step;
    `on_losses(step, losses)` whenever training losses are read back (live progress; see `Trainer.run`).
    `dist`: this process's rank in a DDP group (None: one process); rank 0 then writes the stats and the
    checkpoints and alone calls `on_checkpoint`, and `should_stop()` on any rank stops every rank.
    Returns the newest checkpoint directory (None if nothing was trained or written), the same on every rank.
    """
    cfg = plan.cfg
    work_dir = Path(work_dir)
    target = cfg.train.steps if steps is None else steps
    data = shard_data(plan, shard, dataset, work_dir)
    if _is_main(dist):
        ensure_stats(plan, shard, work_dir, data, identity)
    trainer = Trainer(cfg.model, cfg.train, data.x, data.y, device=device, dist=dist, check_range=not data.latent,
                      text=data.text)
    saver = Checkpointer(work_dir, plan.run_id, shard, run_config_hash(plan), identity)
    return train_loop(trainer, saver, target, resume_from=resume_from, on_step=on_step, on_checkpoint=on_checkpoint,
                      should_stop=should_stop, on_start=on_start, dist=dist, on_losses=on_losses)


def train_loop(
    trainer: Trainer,
    saver: Checkpointer,
    target: int,
    resume_from: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_start: Callable[[int], None] | None = None,
    dist: DistContext | None = None,
    on_losses: Callable[[int, list[float]], None] | None = None,
) -> Path | None:
    """The one training loop around a built `trainer`: resume (`resume_from`, else the newest valid checkpoint in
    the saver's work dir), train to step `target` with periodic checkpoints, and checkpoint where it stopped (the
    budget, or `should_stop`). An expert's shard (`train_shard`) and a distilled student (ensemble/distill.py) both
    train here. Returns the newest checkpoint directory (None if nothing was trained or written), the same on every
    rank."""
    main = _is_main(dist)
    latest = _resume(trainer, saver.work_dir, saver.shard, resume_from, dist)
    if trainer.step >= target:
        return latest

    def checkpoint(step: int) -> None:
        if main:  # the other ranks go on; their next collective waits for rank 0
            path = saver.write(trainer)
            if on_checkpoint is not None:
                on_checkpoint(path)

    if on_start is not None:
        on_start(trainer.step)
    reached = trainer.run(target, on_step=on_step, on_checkpoint=checkpoint,
                          should_stop=_stop_check(should_stop, dist), on_losses=on_losses)
    if main and saver.newest_step != reached:
        checkpoint(reached)  # a stop between periodic checkpoints, or a budget off the checkpoint grid
    # Every rank returns rank 0's newest step dir; waiting for it also holds the others until that is written.
    newest = broadcast_object(dist, str(saver.newest) if saver.newest is not None else None)
    return Path(newest) if newest is not None else latest
