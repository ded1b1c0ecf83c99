"""Writing a shard's checkpoints during training: write, prune, and what to do when the disk is full.

The format itself is `ddm_node.train.checkpoint`; this module is the policy around it. Two step dirs
are kept so that a checkpoint damaged on disk still leaves a valid one to resume from. When a write
does not fit, the newest valid checkpoint alone is kept from then on and the write is tried once more;
if even that fails, `DiskFull` ends the shard's training cleanly (the daemon gives the shard back and
keeps serving the checkpoint it has).
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.core.workdir import step_of
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.trainer import Trainer

log = logging.getLogger(__name__)

KEEP = 2  # step dirs kept while the disk has room
KEEP_WHEN_FULL = 1  # after a full disk: only the newest valid one


class DiskFull(DDMError):
    """A checkpoint does not fit on the work dir's filesystem, even after pruning to the newest one."""


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full filesystem or an exhausted quota."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Checkpointer:
    """Writes one shard's checkpoints into a work dir and prunes the older ones."""

    def __init__(self, work_dir: str | Path, run_id: str, shard: int, config_hash: str,
                 identity: Identity | None = None):
        """Checkpoints of shard `shard` of run `run_id`, sealed with `config_hash`, signed by `identity` if given."""
        self.work_dir, self.run_id, self.shard = Path(work_dir), run_id, shard
        self.config_hash, self.identity = config_hash, identity
        self.keep = KEEP
        self.newest: Path | None = None  # the last step dir this checkpointer wrote

    @property
    def newest_step(self) -> int:
        """The step of the last checkpoint written here (-1 before the first)."""
        return step_of(self.newest)

    def write(self, trainer: Trainer) -> Path:
        """Write the trainer's current step, then prune; returns the step dir. DiskFull if it cannot fit."""
        path = self._write_or_make_room(trainer)
        ckpt.prune_checkpoints(self.work_dir, self.shard, keep=self.keep)
        self.newest = path
        return path

    def _write(self, trainer: Trainer) -> Path:
        return ckpt.write_checkpoint(self.work_dir, self.run_id, self.shard, trainer, self.config_hash, self.identity)

    def _write_or_make_room(self, trainer: Trainer) -> Path:
        try:
            return self._write(trainer)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            # The failed write left nothing behind (its staging dir is gone). Keep only the newest valid
            # checkpoint from now on and try once more; if that does not fit either, give up cleanly.
            log.error("disk full writing shard %d step %d in %s (%s); keeping only the newest checkpoint "
                      "and retrying", self.shard, trainer.step, self.work_dir, exc.strerror)
        self.keep = KEEP_WHEN_FULL
        ckpt.prune_checkpoints(self.work_dir, self.shard, keep=self.keep)
        try:
            return self._write(trainer)
        except OSError as again:
            if not is_disk_full(again):
                raise
            raise DiskFull(f"disk full: shard {self.shard} step {trainer.step} does not fit in {self.work_dir} "
                           f"even with only the newest checkpoint kept ({again.strerror})") from None
