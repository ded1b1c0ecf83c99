"""Placement by rendezvous (highest-random-weight) hashing: a stable order of items per key, no coordination."""

from __future__ import annotations

import hashlib


def rendezvous(key: str, items: list) -> list:
    """Items (shards or peer keys) ordered by the highest-random-weight hash with `key`: a stable order per key."""
    return sorted(items, key=lambda i: hashlib.sha256(f"{key}/{i}".encode()).digest(), reverse=True)
