"""An island's life: join the swarm, get the plan, claim shards, train, publish, mirror, serve.

One `Island` per process, composed of small parts: the work loop here (claim -> train -> publish,
then the router job), a `LeaseKeeper` thread (lease, heartbeat, re-announce), a `Mirror` thread
(copies of other shards' newest training states), a `ShardJob` (training one claimed shard), a
`Publisher` (serve and announce) and an `Announcer` (records kept alive on the DHT). SIGTERM/SIGINT
stop training after the current step; the island then writes and announces a checkpoint, releases
its claim, serves until another peer holds that checkpoint (`Handoff`, bounded by the leave timeout; a
second signal cuts it short), and shuts down its gRPC server, DHT and p2pd before exiting 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from ddm_node import __version__
from ddm_node.core.errors import DDMError
from ddm_node.core.events import EventKind, EventLog
from ddm_node.core.manifest import write_atomic
from ddm_node.core.workdir import WorkDir
from ddm_node.data.datasets import Dataset
from ddm_node.data.packing import local_dataset
from ddm_node.data.plan import Plan
from ddm_node.exchange.announcer import Announcer
from ddm_node.exchange.done import DoneCheck
from ddm_node.exchange.fetch import RejectList
from ddm_node.exchange.peers import fetch_plan
from ddm_node.node.gate import ClaimGate
from ddm_node.node.handoff import Handoff
from ddm_node.node.lease import LeaseKeeper, Timing
from ddm_node.node.mirror import Mirror
from ddm_node.node.options import IslandOptions, swarm_config
from ddm_node.node.packs import PackKeeper, pack_sources
from ddm_node.node.peer_memory import PeerMemory
from ddm_node.node.progress import Progress
from ddm_node.node.publisher import Publisher
from ddm_node.node.shard_job import ShardJob, TrainSettings
from ddm_node.node.state import NodeState, Phase
from ddm_node.node.work import WorkLoop
from ddm_node.swarm.addresses import record_maddrs
from ddm_node.swarm.claims import ClaimManager
from ddm_node.swarm.dht import Swarm, dht_time
from ddm_node.swarm.own_addresses import reachability
from ddm_node.swarm.records import PeerRecord, PlanRecord
from ddm_node.train.limits import ArtifactRules
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
        self.loop: WorkLoop | None = None
        self.handoff: Handoff | None = None
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
            if self.stop.is_set():
                self.state.phase = Phase.LEAVING
                self.handoff.wait(self.timing.leave_timeout, abort=self.state.leave_now)
            return 0
        finally:
            self.shutdown()

    def start(self) -> None:
        """Join the DHT, serve gRPC, get the plan, announce what the work dir holds, start the threads."""
        try:
            self.work.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DDMError(f"--work-dir {self.work.root}: cannot create it ({exc.strerror or exc})") from None
        returning = self.work.plan.exists()  # this work dir was in the run before: a restart (node/gate.py)
        self.plan = self._local_plan()
        # The DHT first: hivemind forks its child, and a fork while gRPC's threads run can kill the child.
        o = self.opts
        self.swarm = Swarm(self.identity, self.plan.run_id if self.plan else o.run_id, initial_peers=o.initial_peers,
                           host=o.host, port=o.dht_port, announce_maddrs=o.dht_announce(),
                           identity_path=self.work.p2p_key, shielded=True, meter=self.state.meter)
        self.server = TransferServer(self.store, NodeInfoData(peer_id=self.swarm.peer_id, public_key=self.me,
                                                              version=__version__),
                                     host=o.host, port=o.grpc_port, meter=self.state.meter)
        self.grpc = o.grpc_announce(self.server.start())
        self.server.info.grpc_address = self.grpc
        ds = self._adopt_plan(self.plan or fetch_plan(self.swarm, self.opts.run_id, self.opts.plan_timeout, self.stop))
        # The first optimizer imports torch._dynamo (1.5 s of CPU idle, 5-8 s on a loaded box): pay it now,
        # not between claiming an orphaned shard and training it (bench.recovery measured that gap).
        import torch._dynamo  # noqa: F401
        self._compose(returning)
        if not self.cfg.trusted_keys:
            log.warning("open run: the plan lists no swarm.trusted_keys, so any peer can publish checkpoints for it "
                        "(set trusted_keys before partitioning to accept only your islands; docs/THREAT_MODEL.md)")
        self.publisher.local(len(self.plan.shards))  # what we hold is announced before we claim anything
        self.packs.start(ds, pack_sources(self.opts.plan_path))  # serve the data packs held here or made from ds
        self._write_announce_file()
        self.events.record(EventKind.START, grpc=self.grpc, peer_id=self.swarm.peer_id, run_id=self.plan.run_id,
                           maddrs=tuple(self.swarm.visible_maddrs()))  # the console's ready line
        self._spawn(self.keeper.run, "keeper")
        self._spawn(self.mirror.loop, "mirror")
        self._spawn(self.packs.loop, "packs")
        verdict = reachability(self.swarm.visible_maddrs(), self.grpc, self.opts.initial_peers)
        (log.info if verdict.ok else log.warning)(verdict.line)

    def _compose(self, returning: bool) -> None:
        """The island's parts, once the plan and the swarm settings are known."""
        trusted = list(self.cfg.trusted_keys) or None
        self.claims = ClaimManager(self.swarm, ttl=self.cfg.lease_ttl, settle=self.cfg.settle, grpc=self.grpc,
                                   trusted_keys=self.cfg.trusted_keys)
        rules = ArtifactRules.for_plan(self.plan)  # the files, sizes and configs peers' artifacts may have
        self.progress = Progress(self.plan, self.work, self.swarm, DoneCheck(rules, trusted, self.work.root),
                                 self.cfg.router_job)
        self.publisher = Publisher(self.store, self.announcer, self.work, self.me, self.grpc,
                                   self.plan.cfg.train.steps, trusted, self.events)
        self.mirror = Mirror(self.swarm, self.me, len(self.plan.shards), rules, self.cfg, self.work,
                             self.state, self.publisher, self.rejects, self.events)
        settings = TrainSettings(self.opts.device, self.opts.nproc_per_node or self.plan.cfg.train.nproc_per_node,
                                 self.identity, self.opts.identity_path)
        self.job = ShardJob(self.plan, rules, self.work, self.swarm, settings, self.state, self.publisher, self.mirror,
                            self.rejects, self.events, trusted)
        self.timing = Timing(self.cfg, self.opts.join_wait, self.opts.leave_timeout)
        self.packs = PackKeeper(self.plan, self.publisher, self.swarm, self.identity, self.cfg, self.state, self.rejects)
        memory = PeerMemory(self.work.peers)
        self.keeper = LeaseKeeper(self.swarm, self.claims, self.announcer, self.timing, self.state, self.events,
                                  self.me, self._heartbeat_record, self.opts.initial_peers, memory)
        expected = frozenset(memory.alive_at_exit() - {self.me}) if memory.loaded else None
        gate = ClaimGate(returning, expected, lambda: {p.public_key for p in self.swarm.peers()},
                         max_wait=self.timing.join_wait, blind_wait=self.cfg.lease_ttl)
        self.loop = WorkLoop(self.plan, self.work, self.identity, self.state, self.claims, self.progress, gate,
                             self.job, self.mirror, self.publisher, self.events, self.timing, self.packs)
        self.handoff = Handoff(self.swarm, self.announcer, self.progress.checks, self.me, rules, len(self.plan.shards),
                               self.events, lambda: self.swarm.announce(self._heartbeat_record(),
                                                                        ttl=self.timing.heartbeat_ttl))

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
        maddrs = record_maddrs(self.swarm.visible_maddrs(), self.swarm.peer_id)
        return PeerRecord(peer_id=self.swarm.peer_id, public_key=self.me, grpc=self.grpc, maddrs=maddrs,
                          version=__version__, heartbeat=dht_time(), state=self.state.phase.value,
                          shard=-1 if active is None else active, **self.state.live_fields())

    def _write_announce_file(self) -> None:
        if self.opts.announce_file is None:
            return
        info = {"peer_id": self.swarm.peer_id, "public_key": self.me, "maddrs": self.swarm.visible_maddrs(),
                "grpc": self.grpc, "run_id": self.plan.run_id, "pid": os.getpid()}
        write_atomic(self.opts.announce_file, json.dumps(info, indent=2).encode())

    # ------------------------------------------------------------------------------ the work

    def work_loop(self) -> None:
        """Claim and train shards until none is left, then the router job (node/work.py)."""
        self.loop.run()

    def _serve(self) -> None:
        """Keep serving and mirroring until stopped (or return at once with exit_when_done)."""
        self.state.phase = Phase.DISK_FULL if self.state.disk_full else Phase.SERVING
        log.info("island %s: %s; serving", self.me[:12], "disk full" if self.state.disk_full else "all shards done")
        if self.opts.exit_when_done:
            return
        while not self.stop.wait(1.0):
            pass


def run_island(opts: IslandOptions, early_stop: threading.Event | None = None,
               attach: Callable[[Island], None] | None = None) -> int:
    """`ddm-node start`: run an island in this process until SIGTERM/SIGINT (or `early_stop`, set by a signal
    that arrived while the CLI was still importing). `attach(island)` is called before it starts (observers:
    metrics, dashboard, console progress)."""
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    island = Island(opts)
    if attach is not None:
        attach(island)
    main_pid = os.getpid()

    def on_signal(signum, _frame):
        if os.getpid() != main_pid:  # hivemind's forked DHT process inherited this handler: die as it expects
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if island.stop.is_set():
            log.warning("signal %d again: leaving without waiting for a peer to hold our checkpoints", signum)
            island.state.leave_now.set()
            return
        log.warning("signal %d: finishing the step, checkpointing, handing over, leaving", signum)
        island.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if early_stop is not None and early_stop.is_set():
        log.warning("stopped before start-up finished")
        return 0
    return island.run()
