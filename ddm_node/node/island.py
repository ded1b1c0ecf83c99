"""An island's life: join the swarm, get the plan, claim shards, train, publish, mirror, serve.

One `Island` per process. Three threads: the main thread does the work (claim -> train -> publish,
then the router job), a keeper renews the lease, heartbeats and re-announces, and a mirror keeps
copies of other shards' newest training states. SIGTERM/SIGINT stop training after the current
step; the island then writes and announces a checkpoint, releases its claim, and shuts down its
gRPC server, DHT and p2pd before exiting 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddm_node import __version__
from ddm_node.core.config import Config, SwarmConfig, from_dict, load_config, to_dict
from ddm_node.data.datasets import load_dataset
from ddm_node.data.plan import Plan, check_dataset
from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import read_manifest, write_atomic
from ddm_node.node.mirror import Mirror, RejectedCheckpoint, fetch_checkpoint, newest_remote
from ddm_node.swarm.claims import ClaimManager
from ddm_node.swarm.dht import Swarm, dht_time
from ddm_node.swarm.records import CheckpointRecord, PeerRecord, PlanRecord, ReplicaRecord, RouterRecord, StatsRecord
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.expert import DiskFull, is_disk_full, train_shard
from ddm_node.train.router_job import train_plan_router
from ddm_node.train.supervisor import resolve_nproc, train_shard_distributed
from ddm_node.transfer.client import NodeClient, PeerError
from ddm_node.transfer.server import TransferServer
from ddm_node.transfer.store import ArtifactStore, NodeInfoData

log = logging.getLogger(__name__)
ROUTER_DIR = "router"
REJOIN_PERIOD = 5.0  # seconds between looks for peers missing from the DHT routing table (a healed partition)


@dataclass
class IslandOptions:
    """Everything `ddm-node start` decides before the island runs."""

    identity: Identity
    work_dir: Path
    plan_path: Path | None = None
    run_id: str | None = None
    initial_peers: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    grpc_port: int = 0
    dht_port: int = 0
    announce_file: Path | None = None
    announce_host: str | None = None  # the address peers dial when host is a wildcard like 0.0.0.0
    swarm_overrides: dict = field(default_factory=dict)  # a --config file's swarm section (timing only)
    config_source: str = "swarm config"  # where swarm_overrides came from, named in errors
    device: str | None = None
    exit_when_done: bool = False
    plan_timeout: float = 60.0
    nproc_per_node: int | None = None  # None: the plan's train.nproc_per_node (default 1)
    identity_path: Path | None = None  # the key file, for worker processes that sign checkpoints


def rendezvous(key: str, items: list) -> list:
    """Items (shards or peer keys) ordered by the highest-random-weight hash with `key`: a stable order per key."""
    return sorted(items, key=lambda i: hashlib.sha256(f"{key}/{i}".encode()).digest(), reverse=True)


class Island:
    """One island (a node): see the module docstring."""

    def __init__(self, opts: IslandOptions):
        self.opts = opts
        self.identity = opts.identity
        self.me = self.identity.public_hex
        self.work_dir = opts.work_dir
        self.stop = threading.Event()  # set by a signal: finish the step, checkpoint, leave
        self.lease_lost = threading.Event()  # set by the keeper: another island now owns our shard
        self.active: int | None = None  # shard being trained
        self.trained: set[int] = set()  # shards this island has trained (it does not mirror those)
        self.state = "starting"
        self.store = ArtifactStore()
        self.server: TransferServer | None = None
        self.swarm: Swarm | None = None
        self.claims: ClaimManager | None = None
        self.plan: Plan | None = None
        self.cfg: SwarmConfig | None = None
        self.grpc = ""
        self._announced: dict[tuple[str, int | None], object] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.mirror: Mirror | None = None
        self._peer_maddrs: dict[str, tuple[float, list[str]]] = {}  # peer id -> (last seen, maddrs), see _keeper
        self.disk_full = False  # a checkpoint did not fit: serve what we have, train and mirror nothing more
        # (expert id, state id, announced step) of checkpoints found bad in themselves: never fetched again
        self.rejected: set[tuple[str, str, int]] = set()
        self._verified: dict[tuple[str, int, int], tuple[bool, float | None]] = {}  # see _announcement_holds

    # ------------------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Run until stopped (or until everything is done with exit_when_done). Returns the exit code."""
        try:
            try:
                self._start_services()
            except DDMError:
                if self.stop.is_set():  # a signal during start-up (e.g. while waiting for the plan): leave quietly
                    return 0
                raise
            self._work()
            if not self.stop.is_set():
                self._serve()
            return 0
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop background threads, release any claim, stop the gRPC server, the DHT and p2pd."""
        self.stop.set()
        log.info("shutting down: joining threads")
        for t in self._threads:
            t.join(timeout=10)
        log.info("shutting down: releasing claims")
        if self.claims is not None:
            for shard in self.claims.held():
                try:
                    self.claims.release(shard)
                except Exception as exc:  # the DHT may already be unreachable; the lease then expires
                    log.warning("could not release shard %d: %s", shard, exc)
        log.info("shutting down: gRPC server and DHT")
        if self.server is not None:
            self.server.stop(grace=1.0)
            self.server = None
        if self.swarm is not None:
            self.swarm.shutdown()
            self.swarm = None
        log.info("shut down")

    def _start_services(self) -> None:
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DDMError(f"--work-dir {self.work_dir}: cannot create it ({exc.strerror or exc})") from None
        run_id = self._local_plan_id()
        # The DHT first: hivemind forks its child, and a fork while gRPC's threads run can kill the child.
        self.swarm = Swarm(self.identity, run_id or self.opts.run_id, initial_peers=self.opts.initial_peers,
                           host=self.opts.host, port=self.opts.dht_port, announce_host=self.opts.announce_host)
        self.server = TransferServer(self.store, NodeInfoData(peer_id=self.swarm.peer_id, public_key=self.me,
                                                              version=__version__),
                                     host=self.opts.host, port=self.opts.grpc_port)
        self.grpc = self.server.start()
        if self.opts.announce_host:
            self.grpc = f"{self.opts.announce_host}:{self.grpc.rsplit(':', 1)[1]}"
        self.server.info.grpc_address = self.grpc
        self.plan = self._get_plan()
        self.server.info.run_ids = [self.plan.run_id]
        self.cfg = self._swarm_config()
        # The first optimizer imports torch._dynamo (1.5 s of CPU idle, 5-8 s on a loaded box): pay it now,
        # not between claiming an orphaned shard and training it (bench.recovery measured that gap).
        import torch._dynamo  # noqa: F401
        self.claims = ClaimManager(self.swarm, ttl=self.cfg.lease_ttl, settle=self.cfg.settle, grpc=self.grpc,
                                   trusted_keys=self.cfg.trusted_keys)
        self.mirror = Mirror(self)
        self._register_local()
        self._write_announce_file()
        self.event("start", grpc=self.grpc, peer_id=self.swarm.peer_id)
        self._spawn(self._keeper, "keeper")
        self._spawn(self.mirror.loop, "mirror")
        log.info("island %s ready: grpc %s, run %s", self.me[:12], self.grpc, self.plan.run_id[:12])

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ------------------------------------------------------------------------------ plan

    def _local_plan_id(self) -> str | None:
        if self.opts.plan_path is not None:
            plan = Plan.load(self.opts.plan_path)
            self.plan = plan
            return plan.run_id
        saved = self.work_dir / "plan.json"
        if saved.exists():
            self.plan = Plan.load(saved, expected_run_id=self.opts.run_id)
            return self.plan.run_id
        return None

    def _get_plan(self) -> Plan:
        """The plan from the file given, the work dir, or any peer serving the run (checked against the id)."""
        plan = self.plan or self._fetch_plan(self.opts.run_id)
        check_dataset(plan, load_dataset(plan.dataset))  # a clear error (before writing anything), never other data
        self.plan = plan
        self.cfg = self._swarm_config()  # a node config at odds with the plan fails here, before anything is written
        raw = plan.to_bytes()
        if not (self.work_dir / "plan.json").exists():
            write_atomic(self.work_dir / "plan.json", raw)
        self.store.register_plan(raw)
        self._announce("plan", None, PlanRecord(plan.run_id, self.grpc))
        return plan

    def _fetch_plan(self, run_id: str) -> Plan:
        deadline = time.time() + self.opts.plan_timeout
        while not self.stop.is_set():
            for holder in self.swarm.plan_holders(run_id):
                try:
                    with NodeClient(holder.grpc, timeout=10) as client:
                        return Plan.from_bytes(client.get_plan(run_id), source=f"plan from {holder.grpc}")
                except DDMError as exc:
                    log.warning("plan from %s rejected: %s", holder.grpc, exc)
            if time.time() > deadline:
                break
            time.sleep(1.0)
        raise DDMError(f"no peer serves the plan of run {run_id} (waited {self.opts.plan_timeout:.0f}s)")

    def _swarm_config(self) -> SwarmConfig:
        values = to_dict(self.plan.cfg.swarm)
        override = dict(self.opts.swarm_overrides)
        source = self.opts.config_source
        if "trusted_keys" in override and override["trusted_keys"] != values["trusted_keys"]:
            raise DDMError(f"{source}: swarm.trusted_keys comes from the plan; a node config may not change it")
        # validated as a whole run config, so ranges that relate fields (settle < lease_ttl) see the plan's values
        return from_dict({**to_dict(self.plan.cfg), "swarm": {**values, **override}}, Config, source=source).swarm

    @property
    def budget(self) -> int:
        return self.plan.cfg.train.steps

    def event(self, kind: str, **fields) -> None:
        """Append one JSON line to WORK/events.jsonl: the island's history, read by the demo report."""
        line = json.dumps({"t": round(time.time(), 3), "event": kind, "island": self.me[:12], **fields})
        try:
            with self._lock, open(self.work_dir / "events.jsonl", "a") as f:
                f.write(line + "\n")
        except OSError as exc:  # a full disk must not end the island over a log line
            log.warning("could not record event %s: %s", kind, exc)

    # ------------------------------------------------------------------------------ announcements

    def _announce(self, kind: str, shard: int | None, record) -> None:
        """Put a record now and remember it for periodic re-announcement."""
        with self._lock:
            self._announced[(kind, shard)] = record
        ttl = self.cfg.announce_ttl if self.cfg else 120.0
        try:
            self.swarm.put(kind, shard, record, ttl=ttl)
        except DDMError as exc:
            log.warning("announce %s/%s failed: %s", kind, shard, exc)

    def _reannounce(self) -> None:
        with self._lock:
            items = list(self._announced.items())
        for (kind, shard), record in items:
            try:
                self.swarm.put(kind, shard, record, ttl=self.cfg.announce_ttl)
            except Exception as exc:
                log.warning("re-announce %s/%s failed: %s", kind, shard, exc)

    def _heartbeat(self) -> None:
        rec = PeerRecord(peer_id=self.swarm.peer_id, public_key=self.me, grpc=self.grpc,
                         maddrs=tuple(self.swarm.visible_maddrs()[:8]), version=__version__, heartbeat=dht_time(),
                         state=self.state, shard=-1 if self.active is None else self.active)
        self.swarm.heartbeat(rec, ttl=max(3 * self.cfg.heartbeat, 10.0))

    def _keeper(self) -> None:
        """Renew the lease every ttl/3, heartbeat, and re-announce records before they expire."""
        period = min(self.cfg.lease_ttl / 3, self.cfg.heartbeat)
        last_announce = last_rejoin = time.monotonic()
        rejoining = None
        while not self.stop.wait(period):
            try:
                shard = self.active
                if shard is not None and shard in self.claims.held() and not self.claims.renew(shard):
                    log.warning("lost the lease on shard %d; stopping its training", shard)
                    self.event("lease_lost", shard=shard)
                    self.lease_lost.set()
                self._heartbeat()
                if rejoining is not None and rejoining.done():
                    if rejoining.exception() is not None:
                        log.warning("rejoining the DHT failed: %s", rejoining.exception())
                    elif rejoining.result():
                        log.info("rejoined %d DHT peers missing from the routing table", rejoining.result())
                        self.event("rejoined", peers=rejoining.result())
                        last_announce = 0.0  # hand the peers we found our records now
                    rejoining = None
                if time.monotonic() - last_announce > self.cfg.announce_ttl / 3:
                    self._reannounce()
                    last_announce = time.monotonic()
                if rejoining is None and time.monotonic() - last_rejoin > REJOIN_PERIOD:
                    rejoining, last_rejoin = self.swarm.rejoin(self._known_maddrs()), time.monotonic()
            except Exception as exc:  # keep the keeper alive through transient DHT errors
                log.warning("keeper: %s", exc)

    def _known_maddrs(self) -> list[str]:
        """The initial peers and every peer seen in the last 10 minutes (for `Swarm.rejoin` after a partition)."""
        now = time.monotonic()
        for rec in self.swarm.peers():
            if rec.public_key != self.me:
                self._peer_maddrs[rec.peer_id] = (now, list(rec.maddrs))
        self._peer_maddrs = {k: v for k, v in self._peer_maddrs.items() if now - v[0] < 600}
        return list(self.opts.initial_peers) + [m for _, maddrs in self._peer_maddrs.values() for m in maddrs]

    # ------------------------------------------------------------------------------ publishing

    def publish_checkpoint(self, step_dir: Path, shard: int, mirrored_from: str | None = None) -> None:
        """Serve a verified step dir and announce it (ours as a checkpoint, others' as a replica)."""
        expert = self.store.register(step_dir / ckpt.EXPERT, trusted_keys=self.cfg.trusted_keys or None)
        state = self.store.register(step_dir / ckpt.STATE, trusted_keys=self.cfg.trusted_keys or None)
        if mirrored_from is None:
            self.event("checkpoint", shard=shard, step=expert.step)
            self._announce("ckpt", shard, CheckpointRecord(shard, expert.step, expert.id, state.id, self.me, self.grpc,
                                                           final=expert.step >= self.budget))
        else:
            self._announce("replica", shard, ReplicaRecord(shard, expert.step, expert.id, state.id, mirrored_from,
                                                           self.me, self.grpc))
        self.publish_stats(shard)
        self._sweep_store()

    def publish_stats(self, shard: int) -> None:
        stats = ckpt.stats_dir(self.work_dir, shard)
        if stats.is_dir() and (self._announced.get(("stats", shard)) is None):
            m = self.store.register(stats, trusted_keys=self.cfg.trusted_keys or None)
            self._announce("stats", shard, StatsRecord(shard, m.id, self.grpc))

    def _sweep_store(self) -> None:
        """Stop serving artifacts whose directories were pruned."""
        for ref in self.store.list():
            stored = self.store.manifest(ref.manifest_id)
            if stored is not None and not Path(stored.directory).is_dir():
                self.store.unregister(ref.manifest_id)

    def _register_local(self) -> None:
        """Serve and announce what this work dir already holds (after a restart)."""
        for shard in range(len(self.plan.shards)):
            step_dir = ckpt.latest_checkpoint(self.work_dir, shard, require_signature=True,
                                              trusted_keys=self.cfg.trusted_keys or None)
            if step_dir is None:
                continue
            publisher = ckpt.verify_checkpoint(step_dir, require_signature=True)[0].publisher
            self.publish_checkpoint(step_dir, shard, mirrored_from=None if publisher == self.me else publisher)
        router = self.work_dir / ROUTER_DIR
        if router.is_dir():
            try:
                self._publish_router(router)
            except DDMError as exc:
                log.warning("not serving local router %s: %s", router, exc)

    def _publish_router(self, router_dir: Path) -> None:
        m = self.store.register(router_dir, trusted_keys=self.cfg.trusted_keys or None)
        self._announce("router", None, RouterRecord(m.id, m.step, self.grpc, self.me))

    def _write_announce_file(self) -> None:
        if self.opts.announce_file is None:
            return
        info = {"peer_id": self.swarm.peer_id, "public_key": self.me, "maddrs": self.swarm.visible_maddrs(),
                "grpc": self.grpc, "run_id": self.plan.run_id, "pid": os.getpid()}
        write_atomic(self.opts.announce_file, json.dumps(info, indent=2).encode())

    # ------------------------------------------------------------------------------ the work

    def shard_done(self, shard: int) -> bool:
        """True when we hold a final checkpoint of the shard, or a peer announces one whose signed manifest
        says so (a DHT record alone proves nothing: any peer can write one)."""
        local = ckpt.latest_checkpoint(self.work_dir, shard)
        if local is not None and int(local.name.split("_")[1]) >= self.budget:
            return True
        return any(r.final and r.step >= self.budget and self._announcement_holds(r.expert_manifest, r.grpc, "expert",
                                                                                   shard, r.step)
                   for r in self.swarm.checkpoints(shard))

    def router_done(self) -> bool:
        return (not self.cfg.router_job or (self.work_dir / ROUTER_DIR).is_dir()
                or any(self._announcement_holds(r.manifest, r.grpc, "router", -1, r.step) for r in self.swarm.routers()))

    def _announcement_holds(self, manifest_id: str, holder: str, kind: str, shard: int, step: int) -> bool:
        """The signed manifest behind a record is the announced kind, run, shard and step (and trusted, when the
        run lists keys). Verdicts are cached; an unreachable holder is asked again after a while."""
        key = (manifest_id, shard, step)
        verdict = self._verified.get(key)
        if verdict is not None and (verdict[1] is None or time.monotonic() < verdict[1]):
            return verdict[0]
        try:
            with NodeClient(holder, timeout=10) as client:
                m = client.get_manifest(manifest_id, self.cfg.trusted_keys or None)[0]
            ok = (m.kind, m.run_id, m.shard, m.step) == (kind, self.plan.run_id, shard, step)
            why = "" if ok else f"it is a {m.kind} of run {m.run_id[:12]} shard {m.shard} step {m.step}"
            verdict = (ok, None)
        except PeerError as exc:  # unreachable or gone: not a lie, ask again later
            why, verdict = str(exc), (False, time.monotonic() + 30.0)
        except DDMError as exc:  # bad signature, untrusted publisher, malformed: the record is false
            why, verdict = str(exc), (False, None)
        if not verdict[0]:
            log.warning("not counting %s %s announced as shard %d step %d: %s", kind, manifest_id[:12], shard, step, why)
        self._verified[key] = verdict
        return verdict[0]

    def _work(self) -> None:
        """Claim and train shards until none is left, then the router job."""
        k = len(self.plan.shards)
        while not self.stop.is_set() and not self.disk_full:
            pending = [s for s in range(k) if not self.shard_done(s)]
            if not pending:
                if self.router_done() or self._router_job():
                    return
                continue
            for shard in rendezvous(self.me, pending):
                if self.stop.is_set():
                    return
                owner = self.claims.owner(shard)
                if owner is not None and owner.public_key != self.me:
                    continue
                if self.claims.try_claim(shard):
                    self.event("claim", shard=shard)
                    self._train(shard)
                    break
            else:
                self.state = "waiting"
                self.stop.wait(min(2.0, self.cfg.lease_ttl / 4))

    def _train(self, shard: int) -> None:
        self.active, self.state = shard, "training"
        self.trained.add(shard)
        self.lease_lost.clear()
        self.mirror.pause(shard)
        try:
            self._resume_from_swarm(shard)
            if self.stop.is_set() or self.lease_lost.is_set():
                return
            resumed = ckpt.latest_checkpoint(self.work_dir, shard)
            try:
                nproc = self.opts.nproc_per_node or self.plan.cfg.train.nproc_per_node
                hooks = dict(device=self.opts.device, on_checkpoint=lambda d: self.publish_checkpoint(d, shard),
                             should_stop=lambda: self.stop.is_set() or self.lease_lost.is_set())
                if nproc > 1:  # a DDP worker group under torchrun, supervised (ddm_node/train/supervisor.py)
                    train_shard_distributed(self.plan, shard, self.work_dir, nproc,
                                            identity_path=self.opts.identity_path,
                                            on_event=lambda kind, fields: self.event(kind, shard=shard, **fields),
                                            on_start=lambda step: self.event("train", shard=shard, step=step),
                                            **hooks)
                else:
                    train_shard(self.plan, shard, self.work_dir, identity=self.identity,
                                on_start=lambda step: self.event("train", shard=shard, step=step), **hooks)
            except (DiskFull, OSError) as exc:
                if not isinstance(exc, DiskFull) and not is_disk_full(exc):
                    raise
                self._on_disk_full(shard, exc)
                return
            except DDMError as exc:
                if not self._discard_unloadable(shard, resumed, exc):
                    raise
                return
            self.publish_stats(shard)
            latest = ckpt.latest_checkpoint(self.work_dir, shard)
            if latest is not None and int(latest.name.split("_")[1]) >= self.budget:
                self.event("done", shard=shard, step=self.budget)
        finally:
            self.active = None
            if not self.disk_full:
                self.mirror.resume(shard)
            if not self.lease_lost.is_set():
                self.claims.release(shard)
            self.state = "idle"

    def _on_disk_full(self, shard: int, exc: BaseException) -> None:
        """A checkpoint did not fit even after pruning: stop training and mirroring, give the shard back (another
        island resumes it from our newest checkpoint, which stays intact and served), keep serving. A restart
        after space was freed resumes normal work."""
        newest = ckpt.latest_checkpoint(self.work_dir, shard)
        step = int(newest.name.split("_")[1]) if newest else None
        log.error("DISK FULL in %s: %s; shard %d goes back to the swarm, newest checkpoint (step %s) is still "
                  "served; this island stops training and mirroring until restarted with more space",
                  self.work_dir, exc, shard, step)
        self.disk_full = True
        for s in range(len(self.plan.shards)):
            self.mirror.pause(s)
        self.event("disk_full", shard=shard, step=step, error=str(exc)[:200])

    def _discard_unloadable(self, shard: int, resumed: Path | None, exc: DDMError) -> bool:
        """A peer's checkpoint that verified but does not load (a valid signer's garbage) must not end the
        island: remember it, stop serving it, delete it and give the shard back (the next claim resumes
        from something else). False when the failure is not about such a checkpoint."""
        if resumed is None or ckpt.latest_checkpoint(self.work_dir, shard) != resumed:
            return False  # training wrote a checkpoint of ours after resuming: the failure is elsewhere
        try:
            expert, state = ckpt.verify_checkpoint(resumed)
        except DDMError:
            return False
        if expert.publisher == self.me:
            return False
        self.rejected.add((expert.id, state.id, expert.step))
        log.warning("shard %d: checkpoint step %d by %s verified but does not load (%s); discarding it",
                    shard, expert.step, expert.publisher[:12], exc)
        self.event("rejected", shard=shard, step=expert.step, publisher=expert.publisher[:12], reason=str(exc))
        with self._lock:
            rec = self._announced.get(("replica", shard))
            if rec is not None and rec.expert_manifest == expert.id:
                del self._announced[("replica", shard)]
        self.store.unregister(expert.id)
        self.store.unregister(state.id)
        doomed = resumed.with_name(f".{resumed.name}.rejected-{os.getpid()}")
        os.rename(resumed, doomed)  # first, so a half-deleted directory never looks like a checkpoint
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _resume_from_swarm(self, shard: int) -> None:
        """Fetch the newest verified checkpoint of the shard from the swarm when it is newer than ours."""
        local = ckpt.latest_checkpoint(self.work_dir, shard)
        local_step = int(local.name.split("_")[1]) if local else -1
        best = newest_remote(self.swarm, shard, exclude_key=None)
        for step, expert_id, state_id, holders, publisher in best:
            if step <= local_step:
                break
            if (expert_id, state_id, step) in self.rejected:
                continue
            try:
                step_dir = fetch_checkpoint(self.work_dir, shard, step, expert_id, state_id, holders,
                                            self.plan.run_id, self.cfg.trusted_keys)
                publisher = read_manifest(step_dir / ckpt.EXPERT).publisher  # signed, not the announcer's word
                log.info("shard %d: resuming from step %d fetched from %s", shard, step, holders)
                self.event("resume", shard=shard, step=step, source="swarm", publisher=publisher[:12],
                           holders=list(holders))
                self.publish_checkpoint(step_dir, shard, mirrored_from=publisher if publisher != self.me else None)
                return
            except DDMError as exc:
                if isinstance(exc, RejectedCheckpoint):
                    self.rejected.add((expert_id, state_id, step))
                log.warning("shard %d: checkpoint at step %d unusable: %s", shard, step, exc)
        if local:
            log.info("shard %d: resuming from local step %d", shard, local_step)
            publisher = ckpt.verify_checkpoint(local)[0].publisher
            self.event("resume", shard=shard, step=local_step, source="local mirror" if publisher != self.me else "local",
                       publisher=publisher[:12])

    def _router_job(self) -> bool:
        """Claim the router job (claim slot K) and train it; False when someone else holds it."""
        slot = len(self.plan.shards)
        owner = self.claims.owner(slot)
        if owner is not None and owner.public_key != self.me:
            self.state = "waiting"
            self.stop.wait(2.0)
            return False
        if not self.claims.try_claim(slot):
            return False
        self.active, self.state = slot, "router"
        try:
            out = train_plan_router(self.plan, self.work_dir / ROUTER_DIR, identity=self.identity)
            self._publish_router(out)
            self.event("router", steps=self.plan.cfg.router.steps)
            return True
        finally:
            self.active, self.state = None, "idle"
            self.claims.release(slot)

    def _serve(self) -> None:
        """Keep serving and mirroring until stopped (or return at once with exit_when_done)."""
        self.state = "disk_full" if self.disk_full else "serving"
        log.info("island %s: %s; serving", self.me[:12], "disk full" if self.disk_full else "all shards done")
        if self.opts.exit_when_done:
            return
        while not self.stop.wait(1.0):
            pass


# ---------------------------------------------------------------------------------- entry point


def island_options(args) -> IslandOptions:
    """IslandOptions from parsed `ddm-node start` arguments (bad input -> DDMError)."""
    overrides = {}
    if args.config:
        import yaml

        load_config(args.config)  # full validation with file-named errors
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        overrides = raw.get("swarm", {}) or {}
    for maddr in args.initial_peers:
        if not maddr.startswith("/") or "/p2p/" not in maddr:
            raise DDMError(f"--initial-peers: {maddr!r} is not a multiaddr like /ip4/1.2.3.4/tcp/31337/p2p/PEER_ID")
    if args.host in ("0.0.0.0", "::") and not args.announce_host:
        raise DDMError(f"--host {args.host} listens everywhere but peers need one address to dial: "
                       "give --announce-host ADDRESS (and --dht-port)")
    if args.run_id is not None and (len(args.run_id) != 64 or any(c not in "0123456789abcdef" for c in args.run_id)):
        raise DDMError(f"--run: {args.run_id!r} is not a run id (64 hex characters printed by ddm-node partition)")
    return IslandOptions(
        identity=Identity.load(args.identity), work_dir=Path(args.work_dir),
        plan_path=Path(args.plan) if args.plan else None, run_id=args.run_id, initial_peers=list(args.initial_peers),
        host=args.host, grpc_port=args.grpc_port, dht_port=args.dht_port,
        announce_file=Path(args.announce_file) if args.announce_file else None,
        announce_host=args.announce_host, swarm_overrides=overrides, config_source=args.config or "swarm config",
        device=args.device, exit_when_done=args.exit_when_done, identity_path=Path(args.identity),
        nproc_per_node=resolve_nproc(getattr(args, "nproc_per_node", None), args.config))


def run_island(args, early_stop: threading.Event | None = None) -> int:
    """`ddm-node start`: run an island in this process until SIGTERM/SIGINT (or `early_stop`, set by a signal
    that arrived while the CLI was still importing)."""
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    if args.threads:
        torch.set_num_threads(args.threads)
    island = Island(island_options(args))

    main_pid = os.getpid()

    def on_signal(signum, _frame):
        if os.getpid() != main_pid:  # hivemind's forked DHT process inherited this handler: die as it expects
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.warning("signal %d: finishing the step, checkpointing, leaving", signum)
        island.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if early_stop is not None and early_stop.is_set():
        log.warning("stopped before start-up finished")
        return 0
    return island.run()


