"""`ddm-node assemble`: fetch the newest verified expert of every shard from the swarm and write a bundle.

Rules (docs/ASSEMBLE.md):
- Candidates of a shard are its checkpoint and replica records, grouped by (expert manifest id,
  announced step), newest step first. The holders of a manifest are every gRPC address that
  announces it for that shard, publishers before mirrors.
- A candidate's manifest is fetched first (small, checked against its id, signature and the run's
  trusted keys) and must agree with what was announced: kind "expert", this run, this shard, the
  announced step and this run's config hash. A disagreement is a lie (or a stale, reused record):
  it is logged and that candidate is never tried again. Then the files are fetched from any
  holder by sha256 and verified (transfer/client.py); on any failure the next-newest candidate is
  tried.
- The shard's statistics artifact (needed by the centroid router) comes from its stats records,
  or else from whatever the expert's holders list; it must be kind "stats" of this run and shard.
- Router: the newest router record whose artifact verifies (kind "router", this run) gives a learned
  router; without one the bundle uses the centroid router.
- Passes repeat every POLL seconds until every shard has a final checkpoint (step >= the plan's
  budget) and, when the plan has a router job, a router is fetched, or `--wait` runs out.
- Held-out data pack: when the plan has data packs, its held-out pack (the plan pins its sha256) comes from the
  peers announcing it (`exchange.packs`, verified against the plan) into OUT/eval_pack, so `eval` needs no dataset.
- Fewer than `--min-experts` experts: exit 2, nothing written. Otherwise `write_bundle` verifies
  everything again and writes the bundle atomically; missing shards are named on stderr and in
  model_index.json. Downloads collect in a hidden staging directory beside `--out`, removed at the end.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import Manifest
from ddm_node.data.packing import eval_slot, spec
from ddm_node.data.plan import Plan
from ddm_node.ensemble.bundle import INDEX, ExpertSource, write_bundle
from ddm_node.exchange.candidates import (
    Candidate,
    cap_listed,
    expert_candidates,
    publisher_first,
    router_candidates,
    stats_candidates,
)
from ddm_node.exchange.fetch import Expected, RejectedArtifact, RejectList, check_announced, describe, download
from ddm_node.exchange.packs import fetch_any, pack_candidates
from ddm_node.exchange.peers import fetch_plan, join_swarm
from ddm_node.swarm.dht import Swarm
from ddm_node.swarm.records import RecordKind
from ddm_node.train.expert import run_config_hash
from ddm_node.train.limits import ArtifactRules
from ddm_node.transfer.budget import SLOW, Budget
from ddm_node.transfer.client import NodeClient

log = logging.getLogger(__name__)

POLL = 2.0  # seconds between passes while waiting for unfinished shards
PLAN_TIMEOUT = 20.0  # seconds to wait for the plan at least (even with --wait 0)
LIST_HOLDERS = 8  # holders asked for a listing of a shard's statistics, at most


@dataclass
class Fetched:
    """An artifact in the staging area."""

    directory: Path
    manifest: Manifest
    holders: list[str]  # the addresses that announced it


@dataclass
class ShardProgress:
    expert: Fetched | None = None
    stats: Fetched | None = None
    reasons: list[str] = field(default_factory=list)  # why the newest candidates failed (last pass)


class Assembler:
    """Fetches and verifies a run's artifacts into `staging`, pass after pass."""

    def __init__(self, swarm: Swarm, plan: Plan, staging: Path, progress=None):
        self.swarm = swarm
        self.plan = plan
        self.run_id = plan.run_id
        cfg = plan.cfg
        self.target = cfg.train.steps
        self.router_job = cfg.swarm.router_job
        self.trusted = list(cfg.swarm.trusted_keys) or None
        self.config_hash = run_config_hash(plan)
        self.rules = ArtifactRules.for_plan(plan)  # files, sizes and model configs this run's artifacts may have
        self.staging = staging
        self.progress = progress  # rich.progress.Progress or None
        self.shards = {s.index: ShardProgress() for s in plan.shards}
        self.router: Fetched | None = None
        self.eval_pack: Path | None = None  # the held-out data pack, fetched (plans with data packs)
        self.lies = RejectList()  # candidates found false or unloadable: never again

    # -- passes -------------------------------------------------------------------------------

    def complete(self) -> bool:
        """Every shard has a final expert and its stats, and the router if the plan has a router job."""
        shards_done = all(p.expert is not None and p.stats is not None and p.expert.manifest.step >= self.target
                          for p in self.shards.values())
        pack_done = self.eval_pack is not None or self.plan.packs is None or self.plan.packs.eval is None
        return shards_done and pack_done and (self.router is not None or not self.router_job)

    def one_pass(self) -> None:
        for k, prog in self.shards.items():
            if prog.expert is None or prog.expert.manifest.step < self.target:
                self._update_expert(k, prog)
            if prog.expert is not None and prog.stats is None:
                self._update_stats(k, prog)
        if self.router is None:
            self._update_router()
        if self.eval_pack is None and self.plan.packs is not None and self.plan.packs.eval is not None:
            self._update_eval_pack()

    def _update_expert(self, k: int, prog: ShardProgress) -> None:
        cands = expert_candidates(self.swarm.checkpoints(k), self.swarm.replicas(k))
        have = prog.expert.manifest.step if prog.expert else -1
        reasons = []
        for c in cands:
            if c.step <= have:
                break  # sorted newest first: nothing newer than what we hold
            if c.key in self.lies:
                continue
            expect = Expected("expert", self.rules, k, c.step, self.config_hash)
            got, why = self._fetch(f"shard {k} expert step {c.step}", c, self.staging / f"expert_{k}", expect)
            if got is not None:
                prog.expert = got
                break
            reasons.append(f"step {c.step} ({c.manifest[:12]}): {why}")
        if not cands:
            reasons.append("no checkpoint or replica announced")
        prog.reasons = reasons if prog.expert is None else []

    def _update_stats(self, k: int, prog: ShardProgress) -> None:
        cands = stats_candidates(self.swarm.stats(k), self._listed_stats(k, prog.expert.holders),
                                 prefer=prog.expert.holders)
        reasons = []
        for c in cands:
            expect = Expected("stats", self.rules, k, None, self.config_hash)
            got, why = self._fetch(f"shard {k} stats", c, self.staging / f"stats_{k}", expect)
            if got is not None:
                prog.stats = got
                return
            reasons.append(f"stats {c.manifest[:12]}: {why}")
        prog.reasons = reasons or ["no statistics artifact announced or listed by the expert's holders"]

    def _update_router(self) -> None:
        for c in router_candidates(self.swarm.routers()):
            if c.key in self.lies:
                continue
            got, _ = self._fetch(f"router step {c.step}", c, self.staging / "router",
                                 Expected("router", self.rules, -1, c.step))
            if got is not None:
                self.router = got
                return

    def _update_eval_pack(self) -> None:
        """The held-out data pack from any peer announcing it, verified against the plan (`exchange.packs`)."""
        s = spec(self.plan, eval_slot(self.plan))
        records = [e.record for e in self.swarm.read(RecordKind.PACK, s.slot)]
        dest = self.staging / "eval_pack"
        m, _ = fetch_any(pack_candidates(records, s.ref.sha256), dest, self.run_id, s, self.trusted, self.lies)
        self.eval_pack = dest if m is not None else None

    def _listed_stats(self, k: int, holders: list[str]) -> list[tuple[str, str]]:
        """Stats artifacts the expert's holders list (a mirror holds them too), as (manifest, holder).

        A listing is a claim: at most LIST_HOLDERS holders are asked, all at once and for a connect timeout,
        the expert's publisher's addresses first and none remembered as slow; `cap_listed` then keeps a few
        entries per holder and none that failed before, so one lister cannot make assembly try thousands of
        fakes (each costs a manifest call)."""
        expert = self.shards[k].expert
        order = publisher_first(holders, expert.manifest.publisher) if expert is not None else list(holders)
        order = [h for h in order if h not in SLOW][:LIST_HOLDERS]

        def listing(h: str) -> list[tuple[str, str]]:
            try:
                with NodeClient(h, timeout=Budget.default().connect) as client:
                    refs = client.list_artifacts(self.run_id, "stats", k)
            except DDMError as exc:
                log.info("listing stats of shard %d at %s: %s", k, h, exc)
                return []
            wanted = (self.run_id, "stats", k)
            return [(ref.manifest_id, h) for ref in refs if (ref.run_id, ref.kind, ref.shard) == wanted]

        if not order:
            return []
        with ThreadPoolExecutor(max_workers=len(order), thread_name_prefix="ddm-list") as pool:
            listed = list(pool.map(listing, order))
        return cap_listed(pair for pairs in listed for pair in pairs)

    # -- one artifact -------------------------------------------------------------------------

    def _fetch(self, label: str, c: Candidate, dest: Path, expect: Expected) -> tuple[Fetched | None, str]:
        """The one verified fetch, loading the artifact as a bundle would; (None, why) on failure."""
        # One directory per manifest: a candidate that fails below never replaces one fetched earlier.
        dest = dest.with_name(f"{dest.name}-{c.manifest[:16]}")
        task = None
        try:
            m = check_announced(c.holders, c.manifest, expect, self.trusted)
            task = self._task(label, sum(e.size for e in m.files.values()))
            got = download(c.holders, c.manifest, dest, expect, self.trusted, content="load",
                           progress=None if task is None else lambda n: self.progress.advance(task, n))
        except Exception as exc:  # one candidate's boundary: whatever its data does, assembly goes on
            if isinstance(exc, RejectedArtifact):  # a lie, a stale record, or a valid signer's garbage
                self.lies.add(c.key, str(exc))
            if not isinstance(exc, DDMError) or isinstance(exc, RejectedArtifact):
                shutil.rmtree(dest, ignore_errors=True)
            why = describe(exc)
            who = ", ".join(sorted({k[:12] for k in c.announced_by if k})) or "a peer"
            log.warning("%s: %s announced manifest %s: %s", label, who, c.manifest[:16], why,
                        exc_info=None if isinstance(exc, DDMError) else exc)
            if task is not None:
                self.progress.update(task, description=f"{label} [red]failed[/]")
            return None, why
        if task is not None:
            self.progress.update(task, completed=sum(e.size for e in got.files.values()))
        return Fetched(dest, got, c.holders), ""

    def _task(self, label: str, total: int):
        return self.progress.add_task(label, total=total) if self.progress is not None else None


def _check_out(out: Path) -> None:
    """Refuse to replace anything at `out` but an earlier bundle (write_bundle swaps the directory)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DDMError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX).is_file():
        raise DDMError(f"--out {out} is a non-empty directory that is not a bundle; refusing to replace it")


def assemble(swarm: Swarm, plan: Plan, out: str | Path, min_experts: int = 1, wait: float = 0.0,
             console=None) -> Path:
    """Fetch the newest verified artifacts of `plan`'s run from the swarm and write the bundle at `out`.

    Raises DDMError, writing nothing, when fewer than `min_experts` experts verify.
    """
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    out = Path(out)
    _check_out(out)
    console = console or Console(stderr=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.parts-", dir=out.parent))
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console) as progress:
            job = Assembler(swarm, plan, staging, progress)
            deadline = time.monotonic() + max(0.0, wait)
            passes = 0
            while True:
                job.one_pass()
                passes += 1
                left = deadline - time.monotonic()
                if job.complete() or left <= 0:
                    break
                time.sleep(min(POLL, left))
        return _write(job, plan, out, min_experts, console, passes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(job: Assembler, plan: Plan, out: Path, min_experts: int, console, passes: int) -> Path:
    sources: dict[int, ExpertSource] = {}
    for k, prog in job.shards.items():
        if prog.expert is not None and prog.stats is not None:
            sources[k] = ExpertSource(k, prog.expert.directory, prog.stats.directory)
            step = prog.expert.manifest.step
            if step < job.target:
                console.print(f"[yellow]shard {k}: newest verified checkpoint is step {step} of {job.target} "
                              f"(not final)[/]")
        else:
            why = "; ".join(prog.reasons) or "no verified expert"
            console.print(f"[yellow]shard {k}: missing ({why})[/]")
    missing = [k for k in job.shards if k not in sources]
    if len(sources) < min_experts:
        raise DDMError(f"only {len(sources)} of {len(job.shards)} experts verified (missing shards {missing}) "
                       f"after {passes} pass(es); --min-experts is {min_experts}; nothing written to {out}")
    router_dir = job.router.directory if job.router is not None else None
    if router_dir is None and job.router_job:
        console.print("[yellow]no verified learned router; the bundle uses the centroid router[/]")
    if job.eval_pack is None and plan.packs is not None and plan.packs.eval is not None:
        console.print("[yellow]no verified held-out data pack; `eval` of this bundle needs the dataset[/]")
    write_bundle(out, plan, sources, router_dir, require_signature=True, trusted_keys=job.trusted,
                 eval_pack=job.eval_pack)
    router = f"learned (step {job.router.manifest.step})" if job.router is not None else "centroid"
    steps = ", ".join(f"{k}@{job.shards[k].expert.manifest.step}" for k in sorted(sources))
    console.print(f"bundle {out}: {len(sources)} of {len(job.shards)} experts (shard@step {steps}), "
                  f"router {router}" + (f", missing {missing}" if missing else ""))
    return out


def run_assemble(initial_peers: list[str], run_id: str, out: str | Path, identity: Identity | None = None,
                 min_experts: int = 1, wait: float = 0.0) -> int:
    """`ddm-node assemble`: join the run's swarm, fetch verified experts (and router), write the bundle."""
    _check_out(Path(out))
    started = time.monotonic()
    swarm = join_swarm(initial_peers, run_id, identity, wait=wait)
    try:
        wait = max(0.0, wait - (time.monotonic() - started))
        plan = fetch_plan(swarm, run_id, timeout=max(PLAN_TIMEOUT, wait))
        out = assemble(swarm, plan, out, min_experts=min_experts, wait=wait)
    finally:
        swarm.shutdown()
    print(out)
    return 0
