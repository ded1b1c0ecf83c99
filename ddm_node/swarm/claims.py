"""Shard leases on a DHT without compare-and-swap.

Protocol (`ClaimManager.try_claim`): read the shard's claims -> if another peer holds a live claim,
give up -> write our own claim (claimed_at = now, expiration = now + ttl) -> wait `settle` seconds
so concurrent writers become visible -> re-read -> the deterministic `winner` (earliest claimed_at,
then smallest public key) keeps the shard; everyone else writes `released=True` and backs off.
The holder calls `renew` about every ttl/3 (same claimed_at, new expiration); when a partition
heals and an older claim shows up, `renew` returns False and the newer holder retreats.

Guarantee: every peer that sees the same set of claims picks the same winner; two holders of one
shard can only coexist while they cannot see each other (or within one settle window), and then
the cost is wasted work, never corruption (the newest verified checkpoint wins downstream).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from ddm_node.core.errors import DDMError
from ddm_node.swarm.dht import Swarm, dht_time
from ddm_node.swarm.records import Claim, RecordKind

logger = logging.getLogger(__name__)

EXPIRY_STEP = 1e-3  # a rewrite must expire strictly later than what it replaces (hivemind rule)


def winner(claims: Iterable[Claim], now: float) -> Claim | None:
    """The owner among live claims at `now`: earliest claimed_at, ties broken by smaller public key.

    Pure and order-independent, so all peers that see the same claims agree.
    """
    live = [c for c in claims if c.live(now)]
    if not live:
        return None
    return min(live, key=lambda c: (c.claimed_at, c.public_key, c.peer_id))


class ClaimManager:
    """Claims, renews and releases shard leases for the node behind `swarm`.

    With `trusted_keys`, only claims by those keys (and our own) count.

    `grpc` is the address written into our claims (where the claimant serves), "" if none.
    Thread-safe; each method does blocking DHT calls (try_claim also sleeps `settle` seconds).
    """

    def __init__(self, swarm: Swarm, ttl: float = 30.0, settle: float = 2.0, *, grpc: str = "",
                 trusted_keys: Iterable[str] = ()):
        if not ttl > 0 or settle < 0 or settle >= ttl:
            raise DDMError(f"claim ttl must be > 0 and settle in [0, ttl), got ttl={ttl} settle={settle}")
        self.swarm = swarm
        self.ttl = float(ttl)
        self.settle = float(settle)
        self.release_ttl = max(1.0, self.settle)
        self.grpc = grpc
        self._me = swarm.public_key
        # A run that lists its publishers ignores everyone else's claims: an unlisted key's work would be
        # discarded anyway, so its claims must not keep listed islands off a shard (claim squatting).
        self._trusted = frozenset(trusted_keys)
        if self._trusted:
            # ... and this node's DHT storage admits their records even when a flood of free identities filled
            # a key or the node (swarm/storage.py), so the listed islands can still claim and announce.
            try:
                swarm.protect(self._trusted)
            except Exception as exc:  # best effort: without it, the caps apply to everyone alike
                logger.warning("could not protect the trusted keys' DHT records: %s", exc)
        self._held: dict[int, Claim] = {}
        self._last_expiration: dict[int, float] = {}
        self._lock = threading.Lock()

    # -- public API -----------------------------------------------------------------------------

    def try_claim(self, shard: int) -> bool:
        """Try to become the shard's holder; True if we hold it after the settle re-read."""
        claims = self._claims(shard)
        now = dht_time()  # after the read, which can take the DHT's whole timeout
        if any(c.public_key != self._me and c.live(now) for c in claims):
            return False
        own = [c for c in claims if c.public_key == self._me and c.live(now)]
        claimed_at = own[0].claimed_at if own else now  # a restart with our key keeps its seniority
        # The re-read decides, not the store's status: hivemind reports only the last replica's
        # answer, so a store can read False yet have landed on other replicas (and vice versa).
        mine, _ = self._write(shard, claimed_at, released=False, expiration=now + self.ttl, seen=claims)
        if self.settle:
            time.sleep(self.settle)
        best = winner(self._claims(shard), dht_time())
        if best is not None and best.public_key == self._me:
            with self._lock:
                self._held[shard] = mine
            logger.debug("claimed shard %d", shard)  # the island logs its claim event
            return True
        logger.info("lost the race for shard %d to %s", shard, best.public_key[:12] if best else "nobody visible")
        self.release(shard)
        return False

    def renew(self, shard: int) -> bool:
        """Extend our lease (same claimed_at, expiration now + ttl); False when we no longer hold it.

        False when we hold no lease here, when it already expired (someone may have taken over),
        or when another peer's live claim wins, e.g. an older claim after a partition healed;
        in the last case our claim is released. A failed DHT write alone keeps True while the
        current lease runs (the next renew retries). Never raises for a slow DHT: the new expiration
        is taken after the read (a read can take the DHT's whole timeout, longer than a lease), and
        a lease that ran out during the read is lost, not renewed from a stale clock.
        """
        with self._lock:
            held = self._held.get(shard)
        if held is None or held.expires_at <= dht_time():
            self._forget(shard)
            return False
        claims = self._claims(shard)
        now = dht_time()
        if held.expires_at <= now:
            logger.warning("the lease on shard %d ran out while its claims were read; giving it up", shard)
            self._forget(shard)
            return False
        others = [c for c in claims if c.public_key != self._me]
        best = winner([*others, held], now)
        if best is None or best.public_key != self._me:
            logger.warning("shard %d is now held by %s; retreating", shard, best.public_key[:12] if best else "?")
            self.release(shard)
            return False
        renewed, stored = self._write(
            shard, held.claimed_at, released=False, expiration=now + self.ttl, seen=claims
        )
        with self._lock:
            self._held[shard] = renewed if stored else held
        if not stored:
            logger.warning("DHT did not confirm renewing shard %d; lease runs until %.1f", shard, held.expires_at)
        return True

    def release(self, shard: int) -> None:
        """Give the shard up now: write `released=True` (hivemind cannot delete) expiring after our claim."""
        self._forget(shard)
        claims = self._claims(shard)
        now = dht_time()
        own = [c for c in claims if c.public_key == self._me]
        with self._lock:
            last = self._last_expiration.get(shard)
        if own and all(c.released for c in own):
            return  # already released
        if not own and (last is None or last <= now):
            return  # nothing of ours is stored, or it has expired: nothing to release
        claimed_at = own[0].claimed_at if own else now
        _, stored = self._write(shard, claimed_at, released=True, expiration=now + self.release_ttl, seen=claims)
        if not stored:
            logger.warning("the DHT did not confirm releasing shard %d; it frees when the lease expires", shard)

    def owner(self, shard: int) -> Claim | None:
        """The current holder of `shard` among live claims, or None."""
        return winner(self._claims(shard), dht_time())

    def held(self) -> list[int]:
        """Shards this manager currently believes it holds (renew to confirm)."""
        with self._lock:
            return sorted(self._held)

    # -- internals ------------------------------------------------------------------------------

    def _claims(self, shard: int) -> list[Claim]:
        claims = self.swarm.claims(shard)
        if not self._trusted:
            return claims
        return [c for c in claims if c.public_key in self._trusted or c.public_key == self._me]

    def _forget(self, shard: int) -> None:
        # _last_expiration stays: a later write must still expire after what we stored before.
        with self._lock:
            self._held.pop(shard, None)

    def _write(
        self, shard: int, claimed_at: float, *, released: bool, expiration: float, seen: list[Claim]
    ) -> tuple[Claim, bool]:
        """Store our claim record; return it and the DHT's store status.

        The expiration is pushed past anything of ours that may be stored, because hivemind keeps
        the record with the later expiration. The floor is raised even when the store reports
        False, since the record may still have reached some replicas.
        """
        with self._lock:
            floor = self._last_expiration.get(shard, 0.0)
        floor = max([floor] + [c.expires_at for c in seen if c.public_key == self._me])
        expiration = max(expiration, floor + EXPIRY_STEP)
        claim = Claim(
            shard=shard,
            peer_id=self.swarm.peer_id,
            public_key=self._me,
            grpc=self.grpc,
            claimed_at=claimed_at,
            released=released,
            expires_at=expiration,
        )
        with self._lock:
            self._last_expiration[shard] = max(expiration, self._last_expiration.get(shard, 0.0))
        try:
            stored = self.swarm.put(RecordKind.CLAIM, shard, claim, expiration=expiration)
        except DDMError as exc:  # e.g. an expiration no longer in the future: a failed write, never an exception
            logger.warning("could not write our claim on shard %d: %s", shard, exc)
            stored = False
        return claim, stored
