"""The ensemble bundle: write and load the published layout, and hand experts and a router to `router/`.

Layout (the shape of Bagel's Paris release):
    OUT/model_index.json            run id, dataset, experts present and missing, router kind
    OUT/plan.json                   the run's plan (sha256 == run id)
    OUT/expert_k/                   config.json, model.safetensors, manifest.json, manifest.sig
    OUT/expert_k/stats/             stats.safetensors + manifest (for the centroid router)
    OUT/router/                     config.json, model.safetensors + manifest (learned router, optional)
    OUT/eval_pack/                  the plan's held-out data pack + manifest (optional; `eval` without the dataset)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddm_node.core.config import RouterChoice, SampleConfig
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.jsonsafe import loads as load_json
from ddm_node.core.manifest import (
    MANIFEST,
    commit_dir,
    copy_artifact,
    read_manifest,
    staging_dir,
    verify_artifact,
    write_atomic,
)
from ddm_node.core.workdir import step_of
from ddm_node.data.plan import Plan
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.router_job import load_router
from router.base import Router
from router.centroid import CentroidRouter, ClusterStats
from router.ensemble import EnsembleVelocity, Expert

log = logging.getLogger(__name__)
INDEX = "model_index.json"
EVAL_PACK = "eval_pack"
FORMAT = "ddm-ensemble/1"


@dataclass
class ExpertSource:
    """Where one shard's expert comes from: an expert artifact and the shard's stats artifact."""

    shard: int
    expert_dir: Path
    stats_dir: Path


@dataclass
class Bundle:
    """A loaded ensemble: experts (EMA DiTs) by shard, routers, the plan and the index."""

    path: Path
    plan: Plan
    index: dict
    models: dict[int, torch.nn.Module]
    stats: dict[int, ClusterStats]
    learned: Router | None = None  # a LearnedRouter when the bundle has one
    missing: list[int] = field(default_factory=list)

    @property
    def eval_pack(self) -> Path | None:
        """The held-out data pack's directory when the bundle has one (verified against the plan when read)."""
        entry = self.index.get("eval_pack")
        return self.path / EVAL_PACK if isinstance(entry, dict) and self.plan.packs is not None else None

    def router(self, kind: RouterChoice = "auto") -> Router:
        """The router over the experts present: learned when present (or asked), else centroid."""
        if kind == "auto":
            kind = "learned" if self.learned is not None else "centroid"
        return ROUTER_KINDS[kind](self, sorted(self.models))

    def _learned(self, present: list[int]) -> Router:
        if self.learned is None:
            raise DDMError(f"{self.path}: bundle has no learned router")
        return self.learned.subset(present)

    def _centroid(self, present: list[int]) -> Router:
        return CentroidRouter({k: self.stats[k] for k in present})

    def velocity(self, sample: SampleConfig) -> EnsembleVelocity:
        experts = {k: Expert(m, m.cfg.num_classes, sample.cfg_scale) for k, m in self.models.items()}
        return EnsembleVelocity(experts, self.router(sample.router), routing=sample.routing, top_k=sample.top_k)


# router kind -> how a bundle builds it over the experts present ("auto" picks one of these)
ROUTER_KINDS: dict[str, Callable[[Bundle, list[int]], Router]] = {
    "learned": Bundle._learned,
    "centroid": Bundle._centroid,
}


def sources_from_work_dirs(dirs: Iterable[str | Path], shards: Iterable[int]) -> dict[int, ExpertSource]:
    """For each shard, the newest valid checkpoint found in any of the work dirs (highest step wins)."""
    found: dict[int, tuple[int, ExpertSource]] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise DDMError(f"expert directory {d} does not exist")
        for k in shards:
            step_dir = ckpt.latest_checkpoint(d, k)
            stats = ckpt.stats_dir(d, k)
            if step_dir is None or not stats.is_dir():
                continue
            step = step_of(step_dir)
            if k not in found or step > found[k][0]:
                found[k] = (step, ExpertSource(k, step_dir / ckpt.EXPERT, stats))
    return {k: src for k, (_, src) in found.items()}


def write_bundle(out: str | Path, plan: Plan, sources: dict[int, ExpertSource], router_dir: Path | None = None,
                 require_signature: bool = False, trusted_keys: Iterable[str] | None = None,
                 eval_pack: Path | None = None) -> Path:
    """Verify every source artifact and write the bundle atomically (staging directory, then rename). `eval_pack`:
    the plan's held-out data pack (a verified pack artifact), copied in so that `eval` needs no dataset."""
    out = Path(out)
    if not sources:
        raise DDMError("no expert checkpoint found for any shard; nothing to bundle")
    stage = staging_dir(out)
    try:
        experts, missing = [], []
        for shard in plan.shards:
            k = shard.index
            src = sources.get(k)
            if src is None:
                missing.append(k)
                continue
            m = verify_artifact(src.expert_dir, require_signature=require_signature, trusted_keys=trusted_keys)
            s = verify_artifact(src.stats_dir, require_signature=require_signature, trusted_keys=trusted_keys)
            for man, what in ((m, "expert"), (s, "stats")):
                if man.run_id != plan.run_id or man.shard != k or man.kind != what:
                    raise IntegrityError(f"{src.expert_dir if what == 'expert' else src.stats_dir}: "
                                         f"manifest is {man.kind} of run {man.run_id[:12]} shard {man.shard}, "
                                         f"expected {what} of run {plan.run_id[:12]} shard {k}")
            copy_artifact(src.expert_dir, stage / f"expert_{k}")
            copy_artifact(src.stats_dir, stage / f"expert_{k}" / "stats")
            experts.append({"shard": k, "dir": f"expert_{k}", "step": m.step, "publisher": m.publisher,
                            "manifest_id": m.id, "stats_manifest_id": s.id})
        router = {"kind": "centroid", "dir": None}
        if router_dir is not None:
            r = verify_artifact(router_dir, require_signature=require_signature, trusted_keys=trusted_keys)
            if r.run_id != plan.run_id or r.kind != "router":
                raise IntegrityError(f"{router_dir}: not a router of run {plan.run_id[:12]}")
            copy_artifact(router_dir, stage / "router")
            router = {"kind": "learned", "dir": "router", "publisher": r.publisher, "manifest_id": r.id}
        if eval_pack is not None:
            p = verify_artifact(eval_pack, require_signature=require_signature, trusted_keys=trusted_keys)
            if p.run_id != plan.run_id or p.kind != "pack" or plan.packs is None or p.config_hash != getattr(
                    plan.packs.eval, "sha256", None):
                raise IntegrityError(f"{eval_pack}: not the held-out pack of run {plan.run_id[:12]}")
            copy_artifact(eval_pack, stage / EVAL_PACK)
        (stage / "plan.json").write_bytes(plan.to_bytes())
        index = {"format": FORMAT, "run_id": plan.run_id, "dataset": plan.dataset, "fingerprint": plan.fingerprint,
                 "shape": list(plan.shape), "num_classes": plan.num_classes, "num_shards": len(plan.shards),
                 "experts": experts, "missing": missing, "router": router}
        if eval_pack is not None:
            index["eval_pack"] = {"dir": EVAL_PACK, "sha256": plan.packs.eval.sha256, "manifest_id": p.id}
        write_atomic(stage / INDEX, json.dumps(index, indent=2, sort_keys=True).encode())
        commit_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if missing:
        log.warning("bundle %s is missing shards %s", out, missing)
    return out


def read_index(path: str | Path) -> dict:
    p = Path(path) / INDEX
    try:
        index = load_json(p.read_bytes(), str(p), max_bytes=16 << 20)  # bounded: depth, size, finite numbers
    except OSError as exc:
        raise DDMError(f"{p}: cannot read ({exc.strerror or exc}); is {path} an ensemble bundle?") from None
    except ValueError:
        raise IntegrityError(f"{p}: not valid JSON") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise IntegrityError(f"{p}: not a {FORMAT} index")
    return index


def bundle_artifacts(path: str | Path) -> list[Path]:
    """Every artifact directory inside a bundle (expert_k, expert_k/stats, router)."""
    path = Path(path)
    return sorted(p.parent for p in path.rglob(MANIFEST))


def verify_bundle(path: str | Path, require_signature: bool = True, trusted_keys: Iterable[str] | None = None) -> dict:
    """Check the index, the plan hash, and every artifact's signature and file hashes.

    Raises IntegrityError naming the first bad file. Returns the index.
    """
    path = Path(path)
    index = read_index(path)
    plan_path = path / "plan.json"
    try:
        raw = plan_path.read_bytes()
    except OSError:
        raise IntegrityError(f"{plan_path}: missing") from None
    if hashlib.sha256(raw).hexdigest() != index.get("run_id"):
        raise IntegrityError(f"{plan_path}: sha256 does not match the run id in {INDEX}")
    listed = {e["dir"] for e in index.get("experts", [])} | {f"{e['dir']}/stats" for e in index.get("experts", [])}
    if index.get("router", {}).get("dir"):
        listed.add(index["router"]["dir"])
    if index.get("eval_pack"):
        listed.add(EVAL_PACK)
    for d in sorted(listed):
        if not (path / d / MANIFEST).is_file():
            raise IntegrityError(f"{path / d / MANIFEST}: missing")
    for art in bundle_artifacts(path):
        m = verify_artifact(art, require_signature=require_signature, trusted_keys=trusted_keys)
        if m.run_id != index["run_id"]:
            raise IntegrityError(f"{art / MANIFEST}: belongs to run {m.run_id[:12]}, not {index['run_id'][:12]}")
        for name in m.files:  # a signed pickle named *.safetensors is still not a bundle anyone can load
            if name.endswith(".safetensors"):
                ckpt.check_tensor_file(art / name)
    for e in index.get("experts", []):
        if read_manifest(path / e["dir"]).id != e["manifest_id"]:
            raise IntegrityError(f"{path / e['dir'] / MANIFEST}: not the manifest {INDEX} names")
    return index


def load_bundle(path: str | Path, verify: bool = True, require_signature: bool = False) -> Bundle:
    """Load a bundle's experts, stats and learned router (verifying every file by default)."""
    path = Path(path)
    index = verify_bundle(path, require_signature) if verify else read_index(path)
    plan = Plan.load(path / "plan.json", expected_run_id=index["run_id"])
    models, stats = {}, {}
    for e in index["experts"]:
        k = int(e["shard"])
        models[k] = ckpt.load_expert(path / e["dir"], verify=False)
        stats[k] = ClusterStats.from_tensors(ckpt.read_stats(path / e["dir"] / "stats", verify=False))
    if not models:
        raise DDMError(f"{path}: bundle holds no experts")
    learned = None
    if index.get("router", {}).get("kind") == "learned":
        learned = load_router(path / index["router"]["dir"], require_signature=require_signature)
    return Bundle(path, plan, index, models, stats, learned, [int(k) for k in index.get("missing", [])])


