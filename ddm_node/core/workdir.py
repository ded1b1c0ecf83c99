"""The on-disk layout of an island's work directory, in one place.

    WORK/plan.json                      the run's plan (canonical bytes; sha256 = run id)
    WORK/events.jsonl                   the island's history (ddm_node/core/events.py)
    WORK/p2p.key                        the libp2p key: the node's peer id, the same after restarts (mode 0600)
    WORK/peers.json                     the peers seen lately: whom a restart waits for (node/peer_memory.py)
    WORK/shard_{k:03d}/step_{s:08d}/    a checkpoint: expert/ and state/ artifacts
    WORK/shard_{k:03d}/stats/           the shard's cluster statistics artifact
    WORK/router/                        the learned router artifact
    WORK/workers/shard_{k:03d}/         logs of a shard's DDP worker group
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ddm_node.core.errors import DDMError

STEP_RE = re.compile(r"^step_(\d{8})$")
MAX_STEP = 10**8


def _index(value: object, what: str, upper: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (upper is not None and value >= upper):
        raise DDMError(f"bad {what} {value!r}")
    return value


def step_of(step_dir: Path | None, default: int = -1) -> int:
    """The step a step directory holds (`default` for None); DDMError for a path that is not a step directory."""
    if step_dir is None:
        return default
    m = STEP_RE.match(Path(step_dir).name)
    if m is None:
        raise DDMError(f"{step_dir}: not a step directory")
    return int(m.group(1))


@dataclass(frozen=True)
class WorkDir:
    """Paths inside one work directory; creates nothing."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def p2p_key(self) -> Path:
        return self.root / "p2p.key"

    @property
    def peers(self) -> Path:
        return self.root / "peers.json"

    @property
    def router(self) -> Path:
        return self.root / "router"

    def shard(self, shard: int) -> Path:
        return self.root / f"shard_{_index(shard, 'shard index'):03d}"

    def step(self, shard: int, step: int) -> Path:
        return self.shard(shard) / f"step_{_index(step, 'checkpoint step', MAX_STEP):08d}"

    def stats(self, shard: int) -> Path:
        return self.shard(shard) / "stats"

    def workers(self, shard: int) -> Path:
        return self.root / "workers" / f"shard_{_index(shard, 'shard index'):03d}"

    def steps(self, shard: int) -> list[Path]:
        """The shard's step directories, newest first (temporary and other entries are ignored)."""
        root = self.shard(shard)
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found, key=lambda sp: sp[0], reverse=True)]

    def shards(self) -> list[int]:
        """Indices of the shard directories present."""
        out = []
        for p in self.root.glob("shard_*"):
            suffix = p.name[len("shard_"):]
            if p.is_dir() and suffix.isdigit():
                out.append(int(suffix))
        return sorted(out)
