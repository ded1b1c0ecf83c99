"""The peers an island saw lately, kept in WORK/peers.json so that a restart knows who to wait for.

DHT records live in memory only; after a whole-swarm restart nothing in the swarm says which islands were
there. The lease keeper writes, every SAVE_PERIOD seconds, the public keys of the islands whose heartbeats it
saw (with when, and their multiaddrs, which are stable across restarts). A returning island reads it back:
the peers seen in the last moments of its previous life are the ones that may hold state it cannot see yet
(node/gate.py waits for them), and their addresses are worth dialing again (node/lease.py rejoin).

The file is our own but may be damaged (a crash mid-rename cannot tear it: it is written atomically; a disk
error or a hand edit can): a file that does not parse is ignored with a warning, as if there were none.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ddm_node.core.errors import DDMError
from ddm_node.core.jsonsafe import load_file
from ddm_node.core.manifest import write_atomic

log = logging.getLogger(__name__)
MAX_PEERS = 256  # peers remembered (the most recently seen)
MAX_BYTES = MAX_PEERS * 8 * 600 + 4096  # keys, times and up to 8 multiaddrs of at most ~512 characters each
SAVE_PERIOD = 15.0  # seconds between saves while the island runs
ALIVE_WINDOW = 60.0  # a peer seen this long before the last save counts as up when we stopped


@dataclass(frozen=True)
class Seen:
    """One remembered peer: when its heartbeat was last seen (wall clock) and where to dial it."""

    at: float
    maddrs: tuple[str, ...]


class PeerMemory:
    """Load and save WORK/peers.json (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.saved_at = 0.0
        self.peers: dict[str, Seen] = {}
        self.loaded = False  # a file was there and parsed: `alive_at_exit` is known (possibly empty)
        if self.path.exists():
            self._load()

    def alive_at_exit(self) -> set[str]:
        """Keys of the peers seen within ALIVE_WINDOW seconds of the last save: up when we stopped."""
        return {k for k, s in self.peers.items() if s.at >= self.saved_at - ALIVE_WINDOW}

    def maddrs(self) -> list[str]:
        return [m for s in self.peers.values() for m in s.maddrs]

    def save(self, seen: dict[str, Seen]) -> None:
        """Remember these peers (newest MAX_PEERS); a failed write is logged, never raised (a full disk)."""
        keep = dict(sorted(seen.items(), key=lambda kv: kv[1].at, reverse=True)[:MAX_PEERS])
        now = time.time()
        data = {"saved_at": now, "peers": {k: {"at": s.at, "maddrs": list(s.maddrs[:8])} for k, s in keep.items()}}
        try:
            write_atomic(self.path, json.dumps(data).encode())
            self.peers, self.saved_at = keep, now
        except OSError as exc:
            log.warning("could not write %s: %s", self.path, exc.strerror or exc)

    def _load(self) -> None:
        try:
            data = load_file(self.path, max_bytes=MAX_BYTES, error=DDMError)
            saved_at = data["saved_at"]
            peers = {k: Seen(float(v["at"]), tuple(str(m) for m in v["maddrs"][:8]))
                     for k, v in list(data["peers"].items())[:MAX_PEERS]
                     if isinstance(k, str) and len(k) == 64 and isinstance(v["maddrs"], list)}
            if not isinstance(saved_at, (int, float)):
                raise TypeError("saved_at is not a number")
        except (DDMError, KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("ignoring %s (not a peers file: %s)", self.path, exc)
            return
        self.saved_at, self.peers, self.loaded = float(saved_at), peers, True
