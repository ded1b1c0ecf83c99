"""Assembly over the protocol-only swarm: the real `clients.assemble.Assembler` pass (expert candidates from checkpoint
and replica records, statistics from stats records and holders' listings, the router key), with tiny artifacts: its
one fetch checks the announcement (the signed manifest, raced over the holders) and downloads and verifies the bytes,
but loads nothing."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bench.protocol.artifacts import SimPlan, TinyRules, fetch_tiny
from ddm_node.clients.assemble import Assembler, Fetched, ShardProgress
from ddm_node.core.errors import DDMError
from ddm_node.exchange.candidates import Candidate
from ddm_node.exchange.fetch import Expected, RejectedArtifact, RejectList, describe
from ddm_node.swarm.dht import Swarm


@dataclass
class AssemblyResult:
    seconds: float
    experts: int  # shards with a verified expert and statistics after one pass
    manifest_fetches: int  # announcements checked (one signed manifest raced over a candidate's holders each)
    dht_gets: int
    failures: list[str]


class SimAssembler(Assembler):
    """`Assembler` over a `SimPlan` (see the module docstring); counts the manifests it fetched."""

    def __init__(self, swarm: Swarm, plan: SimPlan, staging: Path):  # not super().__init__: it reads a real plan
        self.swarm, self.plan, self.run_id, self.staging, self.progress = swarm, plan, plan.run_id, staging, None
        self.target, self.router_job, self.trusted = plan.cfg.train.steps, False, None
        self.config_hash, self.rules = None, TinyRules(plan.run_id)
        self.shards = {s.index: ShardProgress() for s in plan.shards}
        self.router, self.eval_pack, self.lies = None, None, RejectList()
        self.manifest_fetches = 0
        self.failures: list[str] = []

    def _fetch(self, label: str, c: Candidate, dest: Path, expect: Expected) -> tuple[Fetched | None, str]:
        dest = dest.with_name(f"{dest.name}-{c.manifest[:16]}")
        self.manifest_fetches += 1
        try:
            m = fetch_tiny(c.holders, c.manifest, dest, expect)
        except Exception as exc:  # one candidate's boundary, as in Assembler._fetch
            if isinstance(exc, RejectedArtifact):
                self.lies.add(c.key, str(exc))
            shutil.rmtree(dest, ignore_errors=True)
            self.failures.append(f"{label}: {describe(exc)}")
            return None, describe(exc)
        return Fetched(dest, m, c.holders), ""


def assemble_once(swarm, plan: SimPlan, staging: Path) -> AssemblyResult:
    """One assembly pass over every shard, timed; `swarm` is a `MeteredSwarm` (its gets are counted)."""
    staging.mkdir(parents=True, exist_ok=True)
    gets_before = sum(t.gets for t in swarm.traffic.snapshot().values())
    job = SimAssembler(swarm, plan, staging)
    t = time.perf_counter()
    try:
        job.one_pass()
    except DDMError as exc:
        job.failures.append(str(exc))
    seconds = time.perf_counter() - t
    done = sum(1 for p in job.shards.values() if p.expert is not None and p.stats is not None)
    gets = sum(t.gets for t in swarm.traffic.snapshot().values()) - gets_before
    shutil.rmtree(staging, ignore_errors=True)
    return AssemblyResult(seconds, done, job.manifest_fetches, gets, job.failures)
