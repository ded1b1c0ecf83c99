"""Tiny artifacts for the protocol-only swarm: signed checkpoints (expert + state) and statistics in the real work-dir
layout and manifest format, holding a few random bytes instead of tensors, and the plan-like objects the island parts
read (`SimPlan`, `TinyRules`).

They travel through the real transfer code (manifest race, `fetch_artifact`, every byte hashed, every signature
checked); only the content check (a load through torch) is left out: there is nothing to load.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ddm_node.core.config import Config, SwarmConfig
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import FileEntry, Manifest, commit_dir, seal, staging_dir
from ddm_node.exchange.candidates import Candidate
from ddm_node.exchange.fetch import _SIGNED, Expected, check_announced
from ddm_node.train import checkpoint as ckpt
from ddm_node.transfer.download import fetch_artifact

PAYLOAD = "data.bin"
BUDGET = 10**12  # the simulated step budget: no shard finishes
MAX_TINY = 1 << 20  # what TinyRules allows an artifact to hold in all


@dataclass(frozen=True)
class TinyRules:
    """`exchange.fetch.Rules` for tiny artifacts: this run, at most MAX_TINY bytes (`steps`: the budget, for
    `DoneCheck`)."""

    run_id: str
    steps: int = BUDGET
    config_hash: str = "sim"

    def size_problem(self, m: Manifest) -> str | None:
        total = sum(e.size for e in m.files.values())
        return None if total <= MAX_TINY else f"{total} bytes, over the {MAX_TINY} a tiny artifact may hold"


@dataclass(frozen=True)
class ShardRef:
    index: int


@dataclass
class SimPlan:
    """What the island parts read of a plan: run id, shards, config (no packs, no router job, a budget never met)."""

    run_id: str
    num_shards: int
    swarm: SwarmConfig
    cfg: Config = field(init=False)
    packs: None = None

    def __post_init__(self) -> None:
        self.cfg = Config()
        self.cfg.train.steps = BUDGET
        self.cfg.swarm = self.swarm

    @property
    def shards(self) -> list[ShardRef]:
        return [ShardRef(k) for k in range(self.num_shards)]


def write_artifact(directory: Path, kind: str, run_id: str, shard: int, step: int, identity: Identity,
                   size: int) -> Manifest:
    """A sealed artifact of `size` random bytes in `directory` (which must exist)."""
    (directory / PAYLOAD).write_bytes(os.urandom(size))
    m = Manifest(kind, run_id, shard, step, "sim", {PAYLOAD: FileEntry("", 0)})
    return seal(directory, m, identity)


def write_checkpoint(work: Path, run_id: str, shard: int, step: int, identity: Identity, size: int) -> Path:
    """WORK/shard_k/step_s/{expert,state}, written atomically like a real checkpoint; the step dir."""
    final = ckpt.checkpoint_dir(work, shard, step)
    stage = staging_dir(final)
    for kind in (ckpt.EXPERT, ckpt.STATE):
        (stage / kind).mkdir()
        write_artifact(stage / kind, kind, run_id, shard, step, identity, size)
    return commit_dir(stage, final)


def write_stats(work: Path, run_id: str, shard: int, identity: Identity, size: int) -> Path:
    final = ckpt.stats_dir(work, shard)
    stage = staging_dir(final)
    write_artifact(stage, ckpt.STATS, run_id, shard, 0, identity, size)
    return commit_dir(stage, final)


def fetch_tiny(holders: list[str], manifest_id: str, dest: Path, expected: Expected) -> Manifest:
    """The announcement checked (the signed manifest from the holders, as announced), then every file fetched and
    verified; what `exchange.fetch.fetch_verified` does but for the content load."""
    m = check_announced(holders, manifest_id, expected, None)
    fetch_artifact(list(holders), manifest_id, dest, signed=_SIGNED.get(manifest_id))
    return m


def fetch_tiny_checkpoint(work: Path, shard: int, c: Candidate, rules: TinyRules) -> Path:
    """Both artifacts of a checkpoint candidate into WORK/shard_k/step_s, atomically (as `fetch_checkpoint`)."""
    final = ckpt.checkpoint_dir(work, shard, c.step)
    stage = staging_dir(final)
    try:
        for kind, manifest_id in zip((ckpt.EXPERT, ckpt.STATE), c.manifests):
            fetch_tiny(c.holders, manifest_id, stage / kind, Expected(kind, rules, shard, c.step))
        return commit_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
