"""The swarm layer: typed, owner-signed records on hivemind's DHT, and shard leases (no torch here).

`records` is imported eagerly (pure data); the hivemind-backed parts (`Swarm`, `ClaimManager`,
`Ed25519RecordValidator`) load on first use, because importing hivemind takes seconds.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Importing hivemind switches torch's process-wide tensor sharing strategy to "file_system" (in
# hivemind/utils/mpfuture.py), which starts a torch_shm_manager helper process and leaks /dev/shm
# files when a process is killed. Ask for torch's Linux default instead; the DHT needs only a few
# shared bytes and works the same. Effective only if hivemind is not imported yet; an explicit
# HIVEMIND_MEMORY_SHARING_STRATEGY in the environment wins.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

from ddm_node.swarm.records import (
    CheckpointRecord,
    Claim,
    PeerRecord,
    PlanRecord,
    ReplicaRecord,
    RouterRecord,
    StatsRecord,
)

_LAZY = {
    "Swarm": "ddm_node.swarm.dht",
    "Entry": "ddm_node.swarm.dht",
    "dht_key": "ddm_node.swarm.dht",
    "dht_time": "ddm_node.swarm.dht",
    "DEFAULT_TTL": "ddm_node.swarm.dht",
    "ClaimManager": "ddm_node.swarm.claims",
    "winner": "ddm_node.swarm.claims",
    "Ed25519RecordValidator": "ddm_node.swarm.validator",
    "owner_marker": "ddm_node.swarm.validator",
}

__all__ = [
    "CheckpointRecord",
    "Claim",
    "PeerRecord",
    "PlanRecord",
    "ReplicaRecord",
    "RouterRecord",
    "StatsRecord",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ddm_node.swarm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
