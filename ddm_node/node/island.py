"""An island's life: join the swarm, get the plan, claim shards, train, publish, mirror, serve.

One `Island` per process, composed of small parts: the work loop here (claim -> train -> publish,
then the router job), a `LeaseKeeper` thread (lease, heartbeat, re-announce), a `Mirror` thread
(copies of other shards' newest training states), a `ShardJob` (training one claimed shard), a
`Publisher` (serve and announce) and an `Announcer` (records kept alive on the DHT). SIGTERM/SIGINT
stop training after the current step; the island then writes and announces a checkpoint, releases
its claim, and shuts down its gRPC server, DHT and p2pd before exiting 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

from ddm_node import __version__
from ddm_node.core.errors import DDMError
from ddm_node.core.events import EventKind, EventLog
from ddm_node.core.manifest import write_atomic
from ddm_node.core.placement import rendezvous
from ddm_node.core.workdir import WorkDir
from ddm_node.data.datasets import Dataset
from ddm_node.data.packing import local_dataset
from ddm_node.data.plan import Plan
from ddm_node.exchange.announcer import Announcer
from ddm_node.exchange.fetch import AnnouncementCheck, RejectList
from ddm_node.exchange.peers import fetch_plan
from ddm_node.node.lease import LeaseKeeper, Timing
from ddm_node.node.mirror import Mirror
from ddm_node.node.options import IslandOptions, swarm_config
from ddm_node.node.packs import PackKeeper, pack_sources
from ddm_node.node.progress import Progress
from ddm_node.node.publisher import Publisher
from ddm_node.node.shard_job import ShardJob, TrainSettings
from ddm_node.node.state import NodeState, Phase
from ddm_node.swarm.claims import ClaimManager
from ddm_node.swarm.dht import Swarm, dht_time
from ddm_node.swarm.records import PeerRecord, PlanRecord
from ddm_node.train.router_job import train_plan_router
from ddm_node.transfer.server import TransferServer
from ddm_node.transfer.store import ArtifactStore, NodeInfoData

log = logging.getLogger(__name__)
REJECTS_FILE = "rejects.json"  # WORK/rejects.json: the island's persisted reject list


class Island:
    """One island (a node): see the module docstring. `start`, `work`, `shutdown`; `run` does all three."""

    def __init__(self, opts: IslandOptions):
        self.opts = opts
        self.identity = opts.identity
        self.me = self.identity.public_hex
        self.work = WorkDir(opts.work_dir)
        self.state = NodeState()
        self.events = EventLog(self.work.events, self.me[:12])
        self.store = ArtifactStore()
        # checkpoints found bad in themselves: never fetched or loaded again, in this process or after a restart
        self.rejects = RejectList(self.work.root / REJECTS_FILE)
        self.swarm: Swarm | None = None
        self.server: TransferServer | None = None
        self.claims: ClaimManager | None = None
        self.plan: Plan | None = None
        self.cfg = None  # the run's SwarmConfig with this node's overrides, once the plan is known
        self.grpc = ""
        # the parts, composed once the plan is known (see _compose)
        self.announcer: Announcer | None = None
        self.publisher: Publisher | None = None
        self.mirror: Mirror | None = None
        self.job: ShardJob | None = None
        self.timing: Timing | None = None
        self.keeper: LeaseKeeper | None = None
        self.progress: Progress | None = None
        self.packs: PackKeeper | None = None  # the run's data packs (node/packs.py)
        self._threads: list[threading.Thread] = []

    @property
    def stop(self) -> threading.Event:
        """Set by a signal: finish the step, checkpoint, leave."""
        return self.state.stop

    @property
    def work_dir(self) -> Path:
        return self.work.root

    # ------------------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Run until stopped (or until everything is done with exit_when_done). Returns the exit code."""
        try:
            try:
                self.start()
            except DDMError:
                if self.stop.is_set():  # a signal during start-up (e.g. while waiting for the plan): leave quietly
                    return 0
                raise
            self.work_loop()
            if not self.stop.is_set():
                self._serve()
            return 0
        finally:
            self.shutdown()

    def start(self) -> None:
        """Join the DHT, serve gRPC, get the plan, announce what the work dir holds, start the threads."""
        try:
            self.work.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DDMError(f"--work-dir {self.work.root}: cannot create it ({exc.strerror or exc})") from None
        self.plan = self._local_plan()
        # The DHT first: hivemind forks its child, and a fork while gRPC's threads run can kill the child.
        self.swarm = Swarm(self.identity, self.plan.run_id if self.plan else self.opts.run_id,
                           initial_peers=self.opts.initial_peers, host=self.opts.host, port=self.opts.dht_port,
                           announce_host=self.opts.announce_host)
        self.server = TransferServer(self.store, NodeInfoData(peer_id=self.swarm.peer_id, public_key=self.me,
                                                              version=__version__),
                                     host=self.opts.host, port=self.opts.grpc_port)
        self.grpc = self.server.start()
        if self.opts.announce_host:
            self.grpc = f"{self.opts.announce_host}:{self.grpc.rsplit(':', 1)[1]}"
        self.server.info.grpc_address = self.grpc
        ds = self._adopt_plan(self.plan or fetch_plan(self.swarm, self.opts.run_id, self.opts.plan_timeout, self.stop))
        # The first optimizer imports torch._dynamo (1.5 s of CPU idle, 5-8 s on a loaded box): pay it now,
        # not between claiming an orphaned shard and training it (bench.recovery measured that gap).
        import torch._dynamo  # noqa: F401
        self._compose()
        if not self.cfg.trusted_keys:
            log.warning("open run: the plan lists no swarm.trusted_keys, so any peer can publish checkpoints for it "
                        "(set trusted_keys before partitioning to accept only your islands; docs/THREAT_MODEL.md)")
        self.publisher.local(len(self.plan.shards))
        self.packs.start(ds, pack_sources(self.opts.plan_path))  # serve the data packs held here or made from ds
        self._write_announce_file()
        self.events.record(EventKind.START, grpc=self.grpc, peer_id=self.swarm.peer_id)
        self._spawn(self.keeper.run, "keeper")
        self._spawn(self.mirror.loop, "mirror")
        self._spawn(self.packs.loop, "packs")
        log.info("island %s ready: grpc %s, run %s", self.me[:12], self.grpc, self.plan.run_id[:12])

    def _compose(self) -> None:
        """The island's parts, once the plan and the swarm settings are known."""
        trusted = list(self.cfg.trusted_keys) or None
        self.claims = ClaimManager(self.swarm, ttl=self.cfg.lease_ttl, settle=self.cfg.settle, grpc=self.grpc,
                                   trusted_keys=self.cfg.trusted_keys)
        self.progress = Progress(self.plan, self.work, self.swarm, AnnouncementCheck(trusted), self.cfg.router_job)
        self.publisher = Publisher(self.store, self.announcer, self.work, self.me, self.grpc,
                                   self.plan.cfg.train.steps, trusted, self.events)
        self.mirror = Mirror(self.swarm, self.me, len(self.plan.shards), self.plan.run_id, self.cfg, self.work,
                             self.state, self.publisher, self.rejects, self.events)
        settings = TrainSettings(self.opts.device, self.opts.nproc_per_node or self.plan.cfg.train.nproc_per_node,
                                 self.identity, self.opts.identity_path)
        self.job = ShardJob(self.plan, self.work, self.swarm, settings, self.state, self.publisher, self.mirror,
                            self.rejects, self.events, trusted)
        self.timing = Timing(self.cfg)
        self.packs = PackKeeper(self.plan, self.publisher, self.swarm, self.identity, self.cfg, self.state, self.rejects)
        self.keeper = LeaseKeeper(self.swarm, self.claims, self.announcer, self.timing, self.state, self.events,
                                  self.me, self._heartbeat_record, self.opts.initial_peers)

    def shutdown(self) -> None:
        """Stop background threads, release any claim, stop the gRPC server, the DHT and p2pd."""
        self.stop.set()
        log.info("shutting down: joining threads")
        for t in self._threads:
            t.join(timeout=10)
        log.info("shutting down: releasing claims")
        for shard in self.claims.held() if self.claims is not None else ():
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

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ------------------------------------------------------------------------------ plan and records

    def _local_plan(self) -> Plan | None:
        """The plan from --plan or the work dir's copy (checked against --run), else None (ask the swarm)."""
        if self.opts.plan_path is not None:
            return Plan.load(self.opts.plan_path)
        if self.work.plan.exists():
            return Plan.load(self.work.plan, expected_run_id=self.opts.run_id)
        return None

    def _adopt_plan(self, plan: Plan) -> Dataset | None:
        """Check the plan against the local dataset (returned; None: not here) and our config; keep, serve, announce."""
        dataset = local_dataset(plan)  # a clear error before writing anything; None: the plan's packs bring it
        self.plan = plan
        self.cfg = swarm_config(plan, self.opts.swarm_overrides, self.opts.config_source)
        self.server.info.run_ids = [plan.run_id]
        raw = plan.to_bytes()
        if not self.work.plan.exists():
            write_atomic(self.work.plan, raw)
        self.store.register_plan(raw)
        self.announcer = Announcer(self.swarm, self.cfg.announce_ttl)
        self.announcer.announce(PlanRecord(plan.run_id, self.grpc))
        return dataset

    def _heartbeat_record(self) -> PeerRecord:
        active = self.state.active
        return PeerRecord(peer_id=self.swarm.peer_id, public_key=self.me, grpc=self.grpc,
                          maddrs=tuple(self.swarm.visible_maddrs()[:8]), version=__version__, heartbeat=dht_time(),
                          state=self.state.phase.value, shard=-1 if active is None else active)

    def _write_announce_file(self) -> None:
        if self.opts.announce_file is None:
            return
        info = {"peer_id": self.swarm.peer_id, "public_key": self.me, "maddrs": self.swarm.visible_maddrs(),
                "grpc": self.grpc, "run_id": self.plan.run_id, "pid": os.getpid()}
        write_atomic(self.opts.announce_file, json.dumps(info, indent=2).encode())

    # ------------------------------------------------------------------------------ the work

    def work_loop(self) -> None:
        """Claim and train shards until none is left, then the router job."""
        while not self.stop.is_set() and not self.state.disk_full:
            pending = self.progress.pending()
            if not pending:
                if self.progress.router_done() or self._router_job():
                    return
                continue
            for shard in rendezvous(self.me, pending):
                if self.stop.is_set():
                    return
                if self._claim(shard):
                    self._train(shard)
                    break
            else:
                self.state.phase = Phase.WAITING
                self.stop.wait(self.timing.claim_retry)

    def _held_by_other(self, slot: int) -> bool:
        owner = self.claims.owner(slot)
        return owner is not None and owner.public_key != self.me

    def _claim(self, shard: int) -> bool:
        """Claim a shard unless another island holds it."""
        if self._held_by_other(shard) or not self.claims.try_claim(shard):
            return False
        self.events.record(EventKind.CLAIM, shard=shard)
        return True

    def _train(self, shard: int) -> None:
        self.state.active, self.state.phase = shard, Phase.TRAINING
        self.state.trained.add(shard)
        self.state.lease_lost.clear()
        self.mirror.pause(shard)
        try:
            if self.packs.ensure([shard], self.timing.claim_retry):  # its data pack, when the dataset is not here
                self.job.run(shard)
        finally:
            self.state.active = None
            if not self.state.disk_full:
                self.mirror.resume(shard)
            if not self.state.lease_lost.is_set():
                self.claims.release(shard)
            self.state.phase = Phase.IDLE

    def _router_job(self) -> bool:
        """Claim the router job (claim slot K) and train it; False when someone else holds it."""
        slot = len(self.plan.shards)
        if self._held_by_other(slot):
            self.state.phase = Phase.WAITING
            self.stop.wait(2.0)
            return False
        if not self.claims.try_claim(slot):
            return False
        self.state.active, self.state.phase = slot, Phase.ROUTER
        try:
            if not self.packs.ensure(range(slot), self.timing.claim_retry):  # it learns from every shard's pack
                return False
            out = train_plan_router(self.plan, self.work.router, identity=self.identity, work_dir=self.work.root)
            self.publisher.router(out)
            self.events.record(EventKind.ROUTER, steps=self.plan.cfg.router.steps)
            return True
        finally:
            self.state.active, self.state.phase = None, Phase.IDLE
            self.claims.release(slot)

    def _serve(self) -> None:
        """Keep serving and mirroring until stopped (or return at once with exit_when_done)."""
        self.state.phase = Phase.DISK_FULL if self.state.disk_full else Phase.SERVING
        log.info("island %s: %s; serving", self.me[:12], "disk full" if self.state.disk_full else "all shards done")
        if self.opts.exit_when_done:
            return
        while not self.stop.wait(1.0):
            pass


def run_island(opts: IslandOptions, early_stop: threading.Event | None = None) -> int:
    """`ddm-node start`: run an island in this process until SIGTERM/SIGINT (or `early_stop`, set by a signal
    that arrived while the CLI was still importing)."""
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    island = Island(opts)
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
