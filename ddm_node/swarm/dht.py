"""`Swarm`: one hivemind DHT per node, with typed, owner-bound records under run-namespaced keys.

Keys (hivemind hashes them; the text only has to be the same on every peer):

    ddm/{run_id}/peers             PeerRecord        one per node (heartbeat)
    ddm/{run_id}/claim/{shard}     Claim             leases, see claims.py
    ddm/{run_id}/ckpt/{shard}      CheckpointRecord  checkpoints published by the trainer
    ddm/{run_id}/replica/{shard}   ReplicaRecord     mirrors holding a checkpoint
    ddm/{run_id}/stats/{shard}     StatsRecord       cluster statistics artifact
    ddm/{run_id}/router            RouterRecord      learned router artifacts
    ddm/plan/{run_id}              PlanRecord        peers serving the plan file

Every node writes exactly one subkey per key: its owner marker `[owner:<public key hex>]`, signed
by `Ed25519RecordValidator`. A node's newer record replaces its own older one and nobody else's.
Readers parse every subkey with the record's `from_value`, and also require that the record names
its subkey's owner where it has an owner field (a peer cannot announce a checkpoint "by" someone
else) and the key's shard. Anything else is skipped with a warning; getters never raise on garbage.

What a node stores for others is bounded (swarm/storage.py, installed when the Swarm starts): at most
256 records per key, so one key's answer stays near 1 MiB, far under p2pd's 4 MiB message limit, and
at most 16,384 records per node; hivemind's cache is off. The validator admits only signed, owned,
well-formed typed records (swarm/validator.py). Readers keep only addresses this node may dial: those at hosts of
the swarm (swarm/addresses.py, applied by keys.py's `DialFilter`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import hivemind

from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.core.meter import Meter, Timer, timed
from ddm_node.swarm.addresses import SwarmHosts, maddr_host
from ddm_node.swarm.dht_process import DHTChild
from ddm_node.swarm.keys import (  # noqa: F401 (dht_key, dht_time, Entry and KINDS are this module's API too)
    HEX64,
    KINDS,
    DialFilter,
    Entry,
    check_run_id,
    dht_key,
    dht_time,
    encode,
    parse_entry,
)
from ddm_node.swarm.own_addresses import check_initial_peers
from ddm_node.swarm.records import (
    CheckpointRecord,
    Claim,
    PeerRecord,
    PlanRecord,
    RecordKind,
    ReplicaRecord,
    RouterRecord,
    StatsRecord,
)
from ddm_node.swarm.storage import NO_CACHE_OPTIONS, StorageLimits, install, protect, storage_stats
from ddm_node.swarm.validator import MAX_TTL, Ed25519RecordValidator

logger = logging.getLogger(__name__)

DEFAULT_TTL = 120.0  # announcements; the daemon re-announces well before this runs out
RPC_TIMEOUT = 30.0  # seconds to wait for one DHT get/store
LOUD_SKIPS = 3  # records skipped per read that are logged as warnings (the rest at debug, then one summary)


class Swarm:
    """One node's DHT membership: typed writes under its own owner subkey, validated reads.

    `Swarm(identity, run_id, initial_peers=[...], host="127.0.0.1", port=0)` starts a hivemind DHT
    child process (and its p2pd); `shutdown()` stops both. Nothing global is registered: the caller
    owns the lifetime (use it as a context manager, or call shutdown in a finally).
    Calls are thread-safe (one lock around the pipe to the DHT process).
    """

    def __init__(
        self,
        identity: Identity,
        run_id: str,
        *,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1", port: int = 0,
        announce_maddrs: Sequence[str] | None = None,
        identity_path: Path | None = None,
        shielded: bool = False,
        client_mode: bool = False,
        limits: StorageLimits | None = None,
        meter: Meter | None = None,
        validator: Ed25519RecordValidator | None = None,
    ):
        """`announce_maddrs`: the DHT addresses peers should dial, if not those we listen on (swarm/own_addresses.py).
        `identity_path`: a libp2p key file (written on first use): the same peer id and multiaddrs after restarts.
        `shielded`: the DHT child leaves our process group and dies with us (swarm/dht_process.py; main thread
        only). `client_mode`: a reader that joins through others but accepts no connections and never enters
        routing tables (status, assemble). `limits`: the storage caps (default: swarm/storage.py's). `meter`:
        observes the latency of every DHT get and store (Timer.DHT_CALL). `validator`: the DHT's record validator
        (default: `identity`'s; one that signs for several keys lets several islands share this DHT, bench.protocol)."""
        self.identity, self.run_id, self.public_key = identity, check_run_id(run_id), identity.public_hex
        self.meter, self.validator = meter, validator or Ed25519RecordValidator(identity)
        self.marker = self.validator.local_marker
        self._lock, self._closed = threading.Lock(), True  # open once the child runs
        initial_peers = check_initial_peers(initial_peers)
        self._child = _start_child(host, port, shielded=shielded, identity_path=identity_path,
                                   initial_peers=initial_peers or None, client_mode=client_mode,
                                   announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
                                   record_validators=[self.validator])
        self._dht, self._closed = self._child.dht, False
        self._dialable = DialFilter(SwarmHosts(  # which record addresses this node dials
            partial(self._call_future, lambda: self._dht.run_coroutine(_connected_hosts, return_future=True)),
            [host, *(maddr_host(m) or "" for m in [*(announce_maddrs or ()), *initial_peers])]), self.public_key)
        try:
            self._peer_id = self._call(lambda: self._dht.peer_id).to_base58()
            self._call_future(lambda: self._dht.run_coroutine(partial(install, limits=limits or StorageLimits()),
                                                              return_future=True))
        except Exception as exc:
            self.shutdown()
            raise DDMError(f"the DHT on {host}:{port} started but does not answer: {exc}") from None

    # -- lifetime -------------------------------------------------------------------------------

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dht(self) -> hivemind.DHT:
        """The underlying hivemind DHT (diagnostics and tests; writes should go through `put`)."""
        return self._dht

    @property
    def dht_pid(self) -> int | None:
        """Pid of the DHT child process (p2pd is its child)."""
        return self._dht.pid

    def shutdown(self) -> None:
        """Stop the DHT child and its p2pd; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._child.shutdown()

    def protect(self, owners: Iterable[str]) -> None:
        """Admit these owners' records (the run's trusted keys) into this node's DHT storage even when a
        key or the node is full (swarm/storage.py), so a flood of free identities cannot keep them out."""
        keys = frozenset(owners)
        if not all(isinstance(k, str) and HEX64.match(k) for k in keys):
            raise DDMError("protected owners must be 64-hex public keys")
        self._call_future(lambda: self._dht.run_coroutine(partial(protect, owners=keys), return_future=True))

    def storage_stats(self, kind: str | None = None, shard: int | None = None) -> dict:
        """What this node's DHT storage holds: records stored and refused (and, given a kind, that key's
        record count). Diagnostics and tests."""
        key = dht_key(self.run_id, kind, shard) if kind is not None else None
        return self._call_future(lambda: self._dht.run_coroutine(partial(storage_stats, key=key), return_future=True))

    # -- identity and addresses -----------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        """This node's libp2p peer id (base58)."""
        return self._peer_id

    def visible_maddrs(self) -> list[str]:
        """Multiaddrs other peers can use as `initial_peers` (each ends in /p2p/<peer id>). Through a future: hivemind's
        blocking call never returned when the DHT child died mid-call, and held the pipe lock."""
        return [str(m) for m in self._call_future(lambda: self._dht.run_coroutine(_visible_maddrs, return_future=True))]

    @staticmethod
    def now() -> float:
        return dht_time()

    # -- generic write/read ---------------------------------------------------------------------

    def key(self, kind: str, shard: int | None = None, run_id: str | None = None) -> str:
        return dht_key(run_id or self.run_id, kind, shard)

    def put(
        self,
        kind: str,
        shard: int | None,
        record: Any,
        ttl: float = DEFAULT_TTL,
        *,
        expiration: float | None = None,
    ) -> bool:
        """Store `record` under our own subkey of the `kind` key; True if the DHT accepted it.

        Raises DDMError for a record readers would skip (wrong type, shard, owner, size, fields),
        so a bug shows up at the writer. `expiration` (absolute DHT time) overrides `ttl`.
        """
        key, value = encode(kind, shard, record, self.run_id, self.public_key)
        now = dht_time()
        if expiration is None:
            if not 0 < ttl <= MAX_TTL:
                raise DDMError(f"DHT ttl must be in (0, {MAX_TTL:.0f}] seconds, got {ttl}")
            expiration = now + ttl
        elif not now < expiration <= now + MAX_TTL:
            raise DDMError(f"DHT expiration must be in the future and within {MAX_TTL:.0f} s")
        self._ensure_open()
        try:
            ok = bool(
                self._call_future(
                    lambda: self._dht.store(key, value, expiration, subkey=self.marker, return_future=True), "store"
                )
            )
        except Exception as exc:
            logger.warning("DHT store of %s failed: %s", key, exc)
            return False
        if not ok:
            logger.debug("DHT store of %s was rejected (a newer record of ours is stored?)", key)
        return ok

    def read(self, kind: str, shard: int | None = None, run_id: str | None = None) -> list[Entry]:
        """All valid records under a key, sorted by owner; invalid ones are logged and skipped."""
        key = dht_key(run_id or self.run_id, kind, shard)  # DDMError for an unknown kind
        self._ensure_open()
        try:
            found = self._call_future(lambda: self._dht.get(key, latest=True, return_future=True), "get")
        except Exception as exc:
            logger.warning("DHT get of %s failed: %s", key, exc)
            return []
        return _entries(kind, key, shard, found, self._dialable)

    def read_many(self, kind: str, shards: Iterable[int]) -> dict[int, list[Entry]]:
        """`read` of several shards' keys of one kind in ONE DHT traversal (hivemind's get_many: each peer on the way
        answers for all the keys it holds), where a get per key costs a traversal each (~bucket-size peers asked)."""
        keys = {dht_key(self.run_id, kind, s): s for s in shards}
        self._ensure_open()
        try:
            found = self._call_future(lambda: self._dht.run_coroutine(partial(_get_many, keys=list(keys)),
                                                                      return_future=True), "get") if keys else {}
        except Exception as exc:
            logger.warning("DHT get of %d %s keys failed: %s", len(keys), kind, exc)
            found = {}
        return {s: _entries(kind, key, s, found.get(key), self._dialable) for key, s in keys.items()}

    # -- typed readers --------------------------------------------------------------------------

    def peers(self) -> list[PeerRecord]:
        return [e.record for e in self.read(RecordKind.PEERS)]

    def claims(self, shard: int) -> list[Claim]:
        """Every valid claim record on `shard`, live or released (expires_at = DHT expiration)."""
        return [e.record for e in self.read(RecordKind.CLAIM, shard)]

    def checkpoints(self, shard: int) -> list[CheckpointRecord]:
        return [e.record for e in self.read(RecordKind.CKPT, shard)]

    def replicas(self, shard: int) -> list[ReplicaRecord]:
        return [e.record for e in self.read(RecordKind.REPLICA, shard)]

    def stats(self, shard: int) -> list[StatsRecord]:
        return [e.record for e in self.read(RecordKind.STATS, shard)]

    def routers(self) -> list[RouterRecord]:
        return [e.record for e in self.read(RecordKind.ROUTER)]

    def plan_holders(self, run_id: str | None = None) -> list[PlanRecord]:
        return [e.record for e in self.read(RecordKind.PLAN, run_id=run_id or self.run_id)]

    # -- typed writers --------------------------------------------------------------------------

    def announce(self, record: Any, ttl: float = DEFAULT_TTL) -> bool:
        """Put a typed record (a heartbeat, checkpoint, replica, ...) under the key its type names."""
        kind = type(record).KIND
        return self.put(kind, record.shard if kind.per_shard else None, record, ttl)

    # -- reconnecting ---------------------------------------------------------------------------

    def rejoin(self, maddrs: Iterable[str], limit: int = 8) -> Any:
        """Ping, in the background, up to `limit` peers (multiaddrs ending in /p2p/<id>) missing from our
        routing table (why: `_rejoin`). A future of the number that answered, or None when none to try."""
        addrs = [m for m in dict.fromkeys(maddrs) if isinstance(m, str) and "/p2p/" in m]
        return self._call(lambda: self._dht.run_coroutine(partial(_rejoin, maddrs=addrs, limit=limit),
                                                          return_future=True)) if addrs else None

    # -- plumbing -------------------------------------------------------------------------------

    def _ensure_open(self, running: bool = False) -> None:
        """DDMError when shut down or (`running`) when the DHT child died: put/read then give False/[] at once."""
        if self._closed:
            raise DDMError("the swarm's DHT is shut down")
        if running:
            self._child.check()

    def _call(self, fn: Any) -> Any:
        """Run a blocking DHT call with the pipe lock held (hivemind's pipe is not thread-safe)."""
        with self._lock:
            self._ensure_open(running=True)
            return fn()

    def _call_future(self, fn: Any, op: str = "other") -> Any:
        """Send a request under the lock, wait for its MPFuture outside it (calls overlap; a dead DHT child
        ends the wait at once)."""
        with timed(self.meter, Timer.DHT_CALL, op):
            with self._lock:
                self._ensure_open(running=True)
                future = fn()
            return self._child.result(future, RPC_TIMEOUT)


def _entries(kind: str, key: str, shard: int | None, found: Any, dialable: DialFilter) -> list[Entry]:
    """The valid records of one key's lookup result, sorted by owner, with only addresses this node may dial;
    anything else is skipped (a few warnings, then debug lines and one summary)."""
    if found is None:
        return []
    if not isinstance(found.value, dict):
        logger.warning("DHT key %s holds a plain value, not owned records; skipped", key)
        return []
    entries, skipped, spec = [], 0, KINDS[RecordKind(kind)]

    def skip(message: str, *args: Any) -> None:  # a flood of bad records logs a few lines, not one each
        nonlocal skipped
        skipped += 1
        (logger.warning if skipped <= LOUD_SKIPS else logger.debug)(message, *args)

    for subkey, item in found.value.items():
        entry = parse_entry(kind, spec, key, shard, subkey, item, skip)
        entry = dialable(kind, entry) if entry is not None else None
        if entry is not None:
            entries.append(entry)
    if skipped > LOUD_SKIPS:
        logger.warning("skipped %d records under %s in all (%d read)", skipped, key, len(entries))
    entries.sort(key=lambda e: e.owner)
    return entries


async def _get_many(_dht: hivemind.DHT, node: Any, keys: list[str]) -> dict:
    """Runs in the DHT process: the newest value of every key, found in one traversal (`Swarm.read_many`)."""
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))


def _start_child(host: str, port: int, **kwargs: Any) -> DHTChild:
    """The DHT child process listening on host:port (DDMError naming the address when hivemind fails)."""
    try:
        return DHTChild(host_maddrs=[f"/ip4/{host}/tcp/{port}"], **kwargs, **NO_CACHE_OPTIONS)
    except Exception as exc:  # hivemind raises assorted errors (bad maddr, unreachable peers)
        raise DDMError(f"cannot start the DHT on {host}:{port}: {exc}".splitlines()[0]) from None


async def _visible_maddrs(_dht: hivemind.DHT, node: Any) -> list[Any]:
    """Runs in the DHT process: this node's visible multiaddrs (hivemind's `get_visible_maddrs`, as a coroutine)."""
    return await node.get_visible_maddrs()


async def _connected_hosts(_dht: hivemind.DHT, node: Any) -> list[str]:
    """Runs in the DHT process (for `SwarmHosts`): the remote hosts of p2pd's connections (what the
    handshakes proved, not what peers say) and this node's own visible addresses."""
    maddrs = [str(a) for peer in await node.p2p.list_peers() for a in peer.addrs]
    maddrs += [str(a) for a in await node.p2p.get_visible_maddrs()]
    return [h for h in (maddr_host(m) for m in maddrs) if h]


async def _rejoin(_dht: hivemind.DHT, node: Any, maddrs: list[str], limit: int) -> int:
    """Runs in the DHT process (see `Swarm.rejoin`): connect to and ping missing peers; how many answered."""
    # hivemind drops a peer from its routing table after one unanswered request and never looks for it
    # again, so after a partition heals both sides stay apart (each reads only its own stale records) until
    # somebody calls. A ping that is answered puts the peer back on both sides, and hivemind then hands the
    # new peer the records it should store.
    import asyncio
    import random

    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    table = node.protocol.routing_table
    if len(table.peer_id_to_uid) >= node.protocol.bucket_size:
        return 0
    missing: dict[Any, list[Any]] = {}
    for text in maddrs:
        try:
            addr = Multiaddr(text)
            peer = PeerID.from_base58(addr["p2p"])
            missing.setdefault(peer, []).append(addr.decapsulate(Multiaddr(f"/p2p/{addr['p2p']}")))
        except Exception:
            continue
    peers = [p for p in missing if p != node.peer_id and p not in table.peer_id_to_uid]
    peers = random.sample(peers, min(limit, len(peers)))

    async def ping(peer: Any) -> bool:
        try:
            await node.p2p._client.connect(peer, missing[peer])  # re-adds the address if p2pd forgot it
        except Exception:
            pass  # the ping below decides
        return await node.protocol.call_ping(peer) is not None

    answered = sum(await asyncio.gather(*(ping(p) for p in peers))) if peers else 0
    if answered:
        logger.info("rejoined %d of %d peers missing from the DHT routing table", answered, len(peers))
        await node.find_nearest_nodes([node.node_id])  # refill the routing table through them
    return answered
