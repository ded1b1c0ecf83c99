"""What an island is doing right now: shared by the work loop (which writes it), the lease keeper, the mirror
and the heartbeat (which read it)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum

from ddm_node.core.live import LiveProgress
from ddm_node.core.meter import Meter
from ddm_node.swarm.records import MAX_ETA, MAX_LOSS, MAX_RATE


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
    live: LiveProgress | None = None  # the shard being trained: step, loss, rate (set by ShardJob)
    meter: Meter = field(default_factory=Meter)  # counters the parts bump; read by the metrics exporter

    def live_fields(self) -> dict:
        """The live training fields of the island's peer record (empty when it trains no shard)."""
        live = self.live
        if live is None:
            return {}
        s = live.stats()

        def clamp(value: float | None, hi: float) -> float | None:  # readers reject values past the bounds
            return None if value is None else min(max(value, 0.0), hi)

        return {"step": s.step, "images_per_s": clamp(s.images_per_s, MAX_RATE), "loss": clamp(s.loss, MAX_LOSS),
                "eta": clamp(s.eta_s, MAX_ETA)}

    def should_stop_training(self) -> bool:
        return self.stop.is_set() or self.lease_lost.is_set()
