"""Bounded record storage for a node's hivemind DHT child: caps per key and per node (`install`).

hivemind keeps every record it is asked to store (`DHTLocalStorage`, unbounded) and answers a lookup
of a key with all of that key's records in ONE p2pd message, which p2pd caps at 4 MiB
(`DEFAULT_MAX_MSG_SIZE` in hivemind/p2p/p2p_daemon_bindings/control.py). Free identities turned both
into attacks: about 1,100 valid 4 KiB records under one key pushed its answer over the limit, so every
lookup of the key failed everywhere (claims, checkpoints and leases of that key vanished), and
records under arbitrary keys grew a node's memory without end. `BoundedStorage` replaces hivemind's
storage in the DHT child (and a `NoCache` its cache) and admits records under two caps:

- Per key at most `subkeys` records (MAX_SUBKEYS = 256). Every record counts as a full slot of
  SLOT_BYTES = 4,255 B, the most one can take packed in hivemind's dictionary: the owner subkey
  (72 characters + 2 B header = 74 B), the value (4,096 B cap + 72 B signature suffix + 3 B header =
  4,171 B), the expiration (9 B) and the entry's list header (1 B). So a key's answer is at most
  256 x 4,255 B + 32 B of dictionary header = 1.04 MiB, plus at most 20 neighbours (~1.2 KiB): about
  a quarter of p2pd's 4 MiB, so even three keys in one message fit.
- Per node at most `entries` records (MAX_ENTRIES = 16,384): at most 16,384 x 4,255 B = 66.5 MiB of
  record bytes whatever peers send (86 MiB of Python heap measured in the worst case, one record per
  key); a run uses 4(K+1)+3 keys (claim, checkpoint, replica and stats per shard and the router's claim
  slot K; peers, router, plan) with a few records each.

A record that would exceed a cap is refused, never one already stored: a holder's renewal replaces
its own record (same subkey) and always fits, so a flood cannot push out records that are there.
Records of `protected` owners (the run's trusted keys T, see `Swarm.protect`) pass the per-key cap
(one per trusted key per key: a key answers with at most 256 + |T| records) and exceed the node cap
by at most MAX_PROTECTED = 4,096 records, so a node holds at most 20,480 records (83 MiB of record
bytes, about 110 MiB of heap). What a flood of free identities can still do: fill a key (256
identities) or a node (16,384 records) so that NEW untrusted writers are refused on the nodes it
reached, until its records expire (at most 24 h); see docs/THREAT_MODEL.md.

Three hivemind behaviours that let one peer decide what others read are closed here as well:
- hivemind's cache (`protocol.cache`) accepts whole dictionaries from any peer (`in_cache` stores) and
  answers lookups from them instead of the storage when they expire later, so one peer could replace,
  as other nodes serve it, a key's records with its own. Our reads always traverse the DHT
  (`latest=True`) and gain nothing from a cache: it is replaced by one that stores nothing.
- A lookup merges other peers' answers INTO the dictionary object its own storage returned, past every
  cap; `get` and `items` therefore hand out copies, so the storage changes only through `store`.
- A lookup ended at the first answer claiming to expire "never" (`_harden_lookups`).
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from typing import Any

from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.utils.timed_storage import TimedStorage, ValueWithExpiration, get_dht_time

from ddm_node.swarm.validator import SUFFIX_LEN, owner_of_subkey

logger = logging.getLogger(__name__)

MAX_SUBKEYS = 256  # records per key (see the module docstring for the arithmetic)
MAX_ENTRIES = 16384  # records per node
MAX_PROTECTED = 4096  # more records per node, for protected owners (the run's trusted keys) only
SLOT_BYTES = 4255  # the largest record as packed in a dictionary: 74 + 4,171 + 9 + 1 bytes
PURGE_INTERVAL = 1.0  # seconds between full purges of expired records while the node is full
_MAX_RAW_VALUE = 4096 + SUFFIX_LEN  # the validator's value cap, signature included
_MAX_SUBKEY = 72  # len("[owner:<64 hex>]"), the only subkey our validator admits


@dataclass(frozen=True)
class StorageLimits:
    """The caps `BoundedStorage` enforces (tests shrink them)."""

    subkeys: int = MAX_SUBKEYS
    entries: int = MAX_ENTRIES
    protected: int = MAX_PROTECTED  # records of protected owners admitted past `entries`

    def __post_init__(self) -> None:
        if self.subkeys < 1 or self.entries < 1 or self.protected < 0:
            raise ValueError(f"storage limits must be positive, got {self}")


def _copy(d: DictionaryDHTValue) -> DictionaryDHTValue:
    """A plain dictionary with the same entries (entries and heap entries are immutable, so shared)."""
    out = DictionaryDHTValue()
    with d.freeze():
        out.data = dict(d.data)
    out.key_to_heap = {k: d.key_to_heap[k] for k in out.data if k in d.key_to_heap}
    out.expiration_heap = list(out.key_to_heap.values())
    heapq.heapify(out.expiration_heap)
    out.latest_expiration_time = d.latest_expiration_time
    return out


def _compact(storage: TimedStorage) -> None:
    """Drop stale heap entries: every replacement pushes one, and they would only leave at their expiration
    (a peer renewing one record every second with a 24 h expiration would grow the heap by 86,400 a day)."""
    if len(storage.expiration_heap) > 2 * len(storage.key_to_heap) + 64:
        storage.expiration_heap = list(storage.key_to_heap.values())
        heapq.heapify(storage.expiration_heap)


class _BoundedDict(DictionaryDHTValue):
    """One key's records inside `BoundedStorage`; counts its entries into the storage's total.

    Never leaves the storage (`BoundedStorage.get`/`items` copy it), so no peer data is merged into it
    except through `store`, and msgpack never meets this subclass.
    """

    def __init__(self, owner: BoundedStorage):
        super().__init__()
        self._owner = owner
        self.attached = True  # False once the storage dropped this key: its entries no longer count

    def _remove_outdated(self) -> None:
        before = len(self.data)
        super()._remove_outdated()
        if self.attached and len(self.data) != before:
            self._owner.entries -= before - len(self.data)

    def __delitem__(self, key: Any) -> None:
        present = key in self.key_to_heap
        super().__delitem__(key)
        if present and self.attached:
            self._owner.entries -= 1

    def store(self, key: Any, value: Any, expiration_time: float) -> bool:
        if not math.isfinite(expiration_time) or expiration_time < get_dht_time():
            return False
        if not isinstance(value, bytes) or len(value) > _MAX_RAW_VALUE:
            return False
        if not isinstance(key, str) or len(key) > _MAX_SUBKEY:
            return False
        self._remove_outdated()
        current = self.data.get(key)
        if current is not None:
            # A replacement must expire later. Checked here because hivemind's TimedStorage.store, given an
            # earlier expiration, refuses the value yet re-points the entry's expiry at that earlier time: a
            # replayed superseded record would make the current one vanish early.
            if expiration_time <= current.expiration_time:
                return False
            stored = super().store(key, value, expiration_time)
        else:
            if not self._owner.admit(self, key):
                return False
            stored = super().store(key, value, expiration_time)
            if stored and self.attached:
                self._owner.entries += 1
        _compact(self)
        return stored


class BoundedStorage(DHTLocalStorage):
    """hivemind's DHT storage with caps per key and per node (see the module docstring)."""

    def __init__(self, limits: StorageLimits = StorageLimits()):
        super().__init__()
        self.limits = limits
        self.entries = 0  # records in attached dictionaries, expired ones until purged
        self.protected: frozenset[str] = frozenset()  # owners admitted past the caps (the run's trusted keys)
        self.refused = 0  # records refused by a cap (diagnostics, tests)
        self._purged_at = float("-inf")

    # -- admission ------------------------------------------------------------------------------

    def admit(self, d: _BoundedDict, subkey: str) -> bool:
        """Room for a new record `subkey` in `d`? Protected owners pass the per-key cap, and the node cap up to
        `limits.protected` records more."""
        protected = owner_of_subkey(subkey) in self.protected
        if not protected and len(d.data) >= self.limits.subkeys:
            return self._refuse("a key holds %d records", len(d.data))
        cap = self.limits.entries + (self.limits.protected if protected else 0)
        if self.entries >= cap:
            now = get_dht_time()
            if now - self._purged_at >= PURGE_INTERVAL:  # a full purge walks every key: not at every refusal
                self._purged_at = now
                self._purge()
            if self.entries >= cap:
                return self._refuse("the node holds %d records", self.entries)
        return True

    def _refuse(self, why: str, n: int) -> bool:
        self.refused += 1
        if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
            logger.warning("DHT storage refused a record: " + why + " (%d refused so far)", n, self.refused)
        return False

    def _purge(self) -> None:
        """Drop expired records everywhere, so the count is exact before refusing one."""
        self._remove_outdated()
        for item in self.data.values():
            if isinstance(item.value, _BoundedDict):
                item.value._remove_outdated()

    # -- hivemind's interface -------------------------------------------------------------------

    def store(self, key: DHTID, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        if subkey is not None:
            return self.store_subkey(key, subkey, value, expiration_time)
        if isinstance(value, DictionaryDHTValue):  # a whole dictionary (hivemind's cache path): record by record
            with value.freeze():
                items = list(value.data.items())
            results = [self.store_subkey(key, sk, item.value, item.expiration_time) for sk, item in items]
            return bool(results) and all(results)
        return False  # a plain value: our validator admits none, and one would replace a key's records

    def store_subkey(self, key: DHTID, subkey: Any, value: Any, expiration_time: float) -> bool:
        self._remove_outdated()
        previous = self.data.get(key)
        if previous is None:
            d = _BoundedDict(self)
            if not d.store(subkey, value, expiration_time):
                d.attached = False
                return False
            stored = super(DHTLocalStorage, self).store(key, d, d.latest_expiration_time)
            _compact(self)
            return stored
        d = previous.value
        if not isinstance(d, _BoundedDict):
            return False
        stored = d.store(subkey, value, expiration_time)
        if stored and expiration_time > previous.expiration_time:
            super(DHTLocalStorage, self).store(key, d, expiration_time)  # the key lives as long as its newest record
            _compact(self)
        return stored

    def get(self, key: DHTID) -> ValueWithExpiration | None:
        item = super().get(key)
        if item is not None and isinstance(item.value, DictionaryDHTValue):
            return ValueWithExpiration(_copy(item.value), item.expiration_time)
        return item

    def items(self):
        return ((key, ValueWithExpiration(_copy(item.value), item.expiration_time)
                 if isinstance(item.value, DictionaryDHTValue) else item) for key, item in list(super().items()))

    def _remove_outdated(self) -> None:
        now = get_dht_time()
        heap = self.expiration_heap
        while not self.frozen and heap and (heap[0].expiration_time < now or len(self.data) > self.maxsize):
            entry = heapq.heappop(heap)
            if self.key_to_heap.get(entry.key) == entry:
                item = self.data.pop(entry.key)
                del self.key_to_heap[entry.key]
                self._detach(item.value)

    def __delitem__(self, key: DHTID) -> None:
        item = self.data.get(key)
        super().__delitem__(key)
        if item is not None and key not in self.data:
            self._detach(item.value)

    def _detach(self, value: Any) -> None:
        if isinstance(value, _BoundedDict) and value.attached:
            value.attached = False
            self.entries -= len(value.data)

    def record_count(self) -> int:
        """Records stored now (expired ones purged first)."""
        self._purge()
        return self.entries


class NoCache(DHTLocalStorage):
    """hivemind's node cache, disabled: it stores nothing (see the module docstring)."""

    def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        return False

    def store_subkey(self, key: Any, subkey: Any, value: Any, expiration_time: float) -> bool:
        return False


# hivemind.DHT options that stop the node from filling caches (ours and others'): nothing is cached after
# a lookup or a store, no cache entry is refreshed, and no lookup result is pushed to other nodes' caches.
NO_CACHE_OPTIONS = dict(cache_locally=False, cache_nearest=0, cache_on_store=False, cache_refresh_before_expiry=0)


def _harden_lookups() -> None:
    """Make a lookup's answer count only as new as its newest record (in this process: the DHT child).

    hivemind stops a lookup as soon as an answer's expiration reaches what it asked for, and a dictionary's
    answer carries an expiration of its own that nothing checks. Our reads ask for the newest value
    (`latest=True`: infinity), so one peer answering first with its own record and an infinite expiration
    ended the lookup with only its answer merged: readers that hold no copy of the key (status, assemble,
    most nodes of a large swarm) saw that peer's records instead of everyone's. Here a dictionary counts as
    expiring with its latest record (each checked by the validator: finite, at most 24 h ahead), so a
    `latest` lookup always asks every node it finds.
    """
    from hivemind.dht import node as hivemind_node

    state = hivemind_node._SearchState
    if getattr(state.add_candidate, "_ddm_hardened", False):
        return
    original = state.add_candidate

    def add_candidate(self: Any, candidate: Any, source_node_id: Any) -> Any:
        if candidate is not None and isinstance(candidate.value, DictionaryDHTValue):
            with candidate.value.freeze():
                latest = max((e.expiration_time for e in candidate.value.data.values()), default=float("-inf"))
            if not candidate.expiration_time <= latest:  # later than its newest record, or NaN
                candidate = ValueWithExpiration(candidate.value, latest)
        return original(self, candidate, source_node_id)

    add_candidate._ddm_hardened = True  # type: ignore[attr-defined]
    state.add_candidate = add_candidate


async def install(_dht: Any, node: Any, limits: StorageLimits) -> int:
    """Runs in the DHT child (`hivemind.DHT.run_coroutine`): swap in `BoundedStorage` and `NoCache`, moving
    over whatever was stored since the node started (no await in between: nothing can slip past), and
    harden lookups (`_harden_lookups`). Returns the number of records moved."""
    _harden_lookups()
    protocol = node.protocol
    old, new = protocol.storage, BoundedStorage(limits)
    moved = 0
    for key, item in list(old.items()):
        if isinstance(item.value, DictionaryDHTValue):
            with item.value.freeze():
                entries = list(item.value.data.items())
            moved += sum(new.store_subkey(key, sk, e.value, e.expiration_time) for sk, e in entries)
    protocol.storage = new
    protocol.cache = NoCache()
    return moved


async def protect(_dht: Any, node: Any, owners: frozenset[str]) -> int:
    """Runs in the DHT child: admit these owners' records past the caps (the run's trusted keys)."""
    storage = node.protocol.storage
    if not isinstance(storage, BoundedStorage):
        raise RuntimeError("the DHT child has no bounded storage installed")
    storage.protected = frozenset(owners)
    return len(storage.protected)


async def storage_stats(_dht: Any, node: Any, key: str | None = None) -> dict:
    """Runs in the DHT child: records stored, refused, and (with `key`) that key's record count."""
    storage = node.protocol.storage
    out = {"bounded": isinstance(storage, BoundedStorage), "cache": len(node.protocol.cache)}
    if isinstance(storage, BoundedStorage):
        out.update(entries=storage.record_count(), refused=storage.refused)
    else:
        out["entries"] = sum(len(i.value) for _, i in storage.items() if isinstance(i.value, DictionaryDHTValue))
    if key is not None:
        item = storage.get(DHTID.generate(source=key))
        out["key_records"] = len(item.value) if item is not None and isinstance(item.value, DictionaryDHTValue) else 0
    return out
