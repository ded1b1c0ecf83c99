"""The announcer: puts a node's typed records on the DHT and keeps them there.

Records are soft state (they expire), so every record announced is remembered, one per (kind, shard),
and put again before it expires. The kind and shard come from the record itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ddm_node.core.errors import DDMError
from ddm_node.swarm.dht import Swarm
from ddm_node.swarm.records import RecordKind

log = logging.getLogger(__name__)


def slot(record) -> tuple[RecordKind, int | None]:
    """(kind, shard) of a record: the key it is stored under, and what replaces it."""
    kind = type(record).KIND
    return kind, record.shard if kind.per_shard else None


class Announcer:
    """Announces typed records and re-announces them; thread-safe."""

    def __init__(self, swarm: Swarm, ttl: float):
        self.swarm = swarm
        self.ttl = ttl
        self._records: dict[tuple[RecordKind, int | None], object] = {}
        self._lock = threading.Lock()

    def announce(self, record) -> bool:
        """Put a record now (replacing ours of the same kind and shard) and remember it for re-announcement."""
        kind, shard = slot(record)
        with self._lock:
            self._records[(kind, shard)] = record
        try:
            return self.swarm.announce(record, ttl=self.ttl)
        except DDMError as exc:
            log.warning("announce %s/%s failed: %s", kind.value, shard, exc)
            return False

    def current(self, kind: RecordKind, shard: int | None = None):
        """Our remembered record of a kind and shard, or None."""
        with self._lock:
            return self._records.get((kind, shard))

    def forget(self, kind: RecordKind, shard: int | None = None, when: Callable[[object], bool] | None = None) -> None:
        """Stop re-announcing our record of a kind and shard (it then expires); with `when`, only if it holds."""
        with self._lock:
            record = self._records.get((kind, shard))
            if record is not None and (when is None or when(record)):
                del self._records[(kind, shard)]

    def reannounce(self) -> None:
        """Put every remembered record again (a failure is logged; the next round tries again)."""
        with self._lock:
            items = list(self._records.items())
        for (kind, shard), record in items:
            try:
                self.swarm.announce(record, ttl=self.ttl)
            except Exception as exc:
                log.warning("re-announce %s/%s failed: %s", kind.value, shard, exc)
