"""What an island is doing right now: shared by the work loop (which writes it), the lease keeper, the mirror
and the heartbeat (which read it)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum


class Phase(str, Enum):
    """An island's phase, published in its peer record."""

    STARTING = "starting"
    TRAINING = "training"
    ROUTER = "router"
    WAITING = "waiting"
    IDLE = "idle"
    SERVING = "serving"
    DISK_FULL = "disk_full"
    LEAVING = "leaving"  # stopped: handing its checkpoints over, then gone (peers neither wait for it nor rank it)

    def __str__(self) -> str:  # the value in f-strings and DHT keys, as on Python 3.12
        return self.value

@dataclass
class NodeState:
    """The island's live state. `stop` is set by a signal (finish the step, checkpoint, hand over, leave); `lease_lost` by
    the lease keeper when another island owns the shard being trained."""

    stop: threading.Event = field(default_factory=threading.Event)
    leave_now: threading.Event = field(default_factory=threading.Event)  # a second signal: skip the hand-off
    lease_lost: threading.Event = field(default_factory=threading.Event)
    phase: Phase = Phase.STARTING
    active: int | None = None  # the claim slot being worked on: a shard, or K for the router job
    trained: set[int] = field(default_factory=set)  # shards this island has trained (it does not mirror those)
    disk_full: bool = False  # a checkpoint did not fit: serve what we have, train and mirror nothing more

    def should_stop_training(self) -> bool:
        return self.stop.is_set() or self.lease_lost.is_set()
