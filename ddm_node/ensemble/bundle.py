"""The ensemble bundle: write and load the published layout, and hand experts and a router to `router/`.

Layout (the shape of Bagel's Paris release):
    OUT/model_index.json            run id, dataset, experts present and missing, router kind
    OUT/plan.json                   the run's plan (sha256 == run id)
    OUT/expert_k/                   config.json, model.safetensors, manifest.json, manifest.sig
    OUT/expert_k/stats/             stats.safetensors + manifest (for the centroid router)
    OUT/router/                     config.json, model.safetensors + manifest (learned router, optional)
    OUT/eval_pack/                  the plan's held-out data pack + manifest (optional; `eval` without the dataset)

A latent run's index also names its VAE (`vae`: the plan's reference, data/vae_ref.py): where it is and the sha256 of
its files, not the weights themselves (see data/vae.py); `sample` and `eval` decode through it.

A distilled bundle (ensemble/distill.py) holds one student in place of the experts and the router:
    OUT/student/                    config.json, model.safetensors, manifest (index: "student", "distilled_from")
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
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
    MAX_INT,
    commit_dir,
    copy_artifact,
    staging_dir,
    verify_artifact,
    write_atomic,
)
from ddm_node.core.workdir import step_of
from ddm_node.data.pack import PACK_KIND, manifest_problem
from ddm_node.data.plan import Plan
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.limits import ArtifactRules, student_rules
from ddm_node.train.router_job import load_router
from router.base import Router
from router.centroid import CentroidRouter, ClusterStats
from router.ensemble import EnsembleVelocity, Expert, SoleRouter

log = logging.getLogger(__name__)
INDEX = "model_index.json"
EVAL_PACK = "eval_pack"
FORMAT = "ddm-ensemble/1"
RESERVED = frozenset({INDEX, "plan.json"})
MAX_SHARD = 65535
_CHILD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # starts with a letter or digit: never "." or ".."
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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
    objectives: dict[int, str] = field(default_factory=dict)  # what each model predicts (absent: the velocity)
    distilled_from: dict | None = None  # a distilled bundle: models holds its student alone (key 0), no router

    @property
    def eval_pack(self) -> Path | None:
        """The held-out data pack's directory when the bundle has one (verified against the plan when read)."""
        entry = self.index.get("eval_pack")
        return self.path / EVAL_PACK if isinstance(entry, dict) and self.plan.packs is not None else None

    def router(self, kind: RouterChoice = "auto") -> Router:
        """The router over the experts present: learned when present (or asked), else centroid; a student needs none."""
        if self.distilled_from is not None:
            return SoleRouter(0)
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
        experts = {k: Expert(m, m.cfg.num_classes, sample.cfg_scale, m.cfg.text_dim or 0, self.objectives.get(k, "velocity"))
                   for k, m in self.models.items()}
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
        if plan.vae is not None:
            index["vae"] = plan.vae.to_dict()
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


def _child(value: object, where: str) -> str:
    """A plain child directory name of the bundle: no `..`, no absolute path, no separator."""
    if not isinstance(value, str) or not _CHILD.match(value) or value in RESERVED:
        raise IntegrityError(f"{where}: dir must be a plain child directory name, got {str(value)[:60]!r}")
    return value


def _num(value: object, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise IntegrityError(f"{where} must be an integer in [{low}, {high}], got {str(value)[:24]!r}")
    return value


def _hex(value: object, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or not (_HEX64.match(value) or (allow_empty and value == "")):
        raise IntegrityError(f"{where} must be 64 hex characters, got {str(value)[:24]!r}")
    return value


@dataclass(frozen=True)
class ExpertEntry:
    """One expert of a bundle's index: shard k's expert artifact in `dir`, its stats in `dir/stats`."""

    shard: int
    dir: str
    step: int
    publisher: str
    manifest_id: str
    stats_manifest_id: str


@dataclass(frozen=True)
class BundleIndex:
    """A bundle's model_index.json, every field checked (`raw` is the document as read)."""

    run_id: str
    experts: tuple[ExpertEntry, ...]
    missing: tuple[int, ...]
    router_dir: str | None  # the learned router's directory, None for the centroid router
    router_manifest_id: str
    raw: dict
    eval_pack_id: str | None = None  # the held-out data pack's manifest (OUT/eval_pack), when the bundle has one
    student: ExpertEntry | None = None  # a distilled bundle's one model (shard 0, no stats), in place of the experts

    @classmethod
    def parse(cls, data: object, source: str) -> BundleIndex:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise IntegrityError(f"{source}: not a {FORMAT} index")
        experts, router = data.get("experts"), data.get("router")
        if not isinstance(experts, list) or len(experts) > MAX_SHARD + 1 or not isinstance(router, dict):
            raise IntegrityError(f"{source}: experts must be a list and router a mapping")
        entries = []
        for i, e in enumerate(experts):
            where = f"{source}: experts[{i}]"
            if not isinstance(e, dict):
                raise IntegrityError(f"{where} must be a mapping")
            entries.append(ExpertEntry(_num(e.get("shard"), f"{where}.shard", 0, MAX_SHARD), _child(e.get("dir"), where),
                                       _num(e.get("step"), f"{where}.step", 0, MAX_INT),
                                       _hex(e.get("publisher"), f"{where}.publisher", allow_empty=True),
                                       _hex(e.get("manifest_id"), f"{where}.manifest_id"),
                                       _hex(e.get("stats_manifest_id"), f"{where}.stats_manifest_id")))
        if len({e.shard for e in entries}) != len(entries) or len({e.dir for e in entries}) != len(entries):
            raise IntegrityError(f"{source}: two experts name the same shard or directory")
        missing = data.get("missing", [])
        if not isinstance(missing, list) or len(missing) > MAX_SHARD + 1:
            raise IntegrityError(f"{source}: missing must be a list of shards")
        missing = tuple(_num(k, f"{source}: missing[]", 0, MAX_SHARD) for k in missing)
        student = data.get("student")
        if student is not None:
            if entries or router.get("kind") != "none" or not isinstance(student, dict) or not isinstance(
                    data.get("distilled_from"), dict):
                raise IntegrityError(f"{source}: a distilled bundle lists its student alone (no experts, router kind "
                                     "none) and where it was distilled from")
            student = ExpertEntry(0, _child(student.get("dir"), f"{source}: student"),
                                  _num(student.get("step"), f"{source}: student.step", 0, MAX_INT),
                                  _hex(student.get("publisher"), f"{source}: student.publisher", allow_empty=True),
                                  _hex(student.get("manifest_id"), f"{source}: student.manifest_id"), "")
        elif router.get("kind") not in ROUTER_KINDS:
            raise IntegrityError(f"{source}: router kind must be one of {', '.join(ROUTER_KINDS)}")
        learned = router["kind"] == "learned"
        router_dir = _child(router.get("dir"), f"{source}: router") if learned else None
        if router_dir in {e.dir for e in entries}:
            raise IntegrityError(f"{source}: the router and an expert share directory {router_dir}")
        router_id = _hex(router.get("manifest_id"), f"{source}: router.manifest_id") if learned else ""
        pack = data.get("eval_pack")
        if pack is not None and (not isinstance(pack, dict) or pack.get("dir") != EVAL_PACK):
            raise IntegrityError(f"{source}: eval_pack must name the directory {EVAL_PACK}")
        pack_id = None if pack is None else _hex(pack.get("manifest_id"), f"{source}: eval_pack.manifest_id")
        return cls(_hex(data.get("run_id"), f"{source}: run_id"), tuple(entries), missing, router_dir, router_id, data,
                   pack_id, student)

    def check_plan(self, plan: Plan, source: str) -> None:
        """The index describes this plan's run: its shards, image shape and classes."""
        k = len(plan.shards)
        vae = plan.vae.to_dict() if plan.vae is not None else None
        for name, got, want in (("num_shards", self.raw.get("num_shards"), k), ("shape", self.raw.get("shape"),
                                list(plan.shape)), ("num_classes", self.raw.get("num_classes"), plan.num_classes),
                                ("vae", self.raw.get("vae"), vae)):
            if got != want:
                raise IntegrityError(f"{source}: {name} is {str(got)[:40]}, the plan says {want}")
        if any(k_ >= k for k_ in [e.shard for e in self.experts] + list(self.missing)):
            raise IntegrityError(f"{source}: names a shard beyond the plan's {k}")


def load_index(path: str | Path) -> BundleIndex:
    """The bundle's index, parsed and checked (bounded JSON; plain child directory names)."""
    p = Path(path) / INDEX
    if p.is_symlink():
        raise IntegrityError(f"{p}: a symlink, not the bundle's index")
    try:
        index = load_json(p.read_bytes(), str(p), max_bytes=16 << 20)  # bounded: depth, size, finite numbers
    except OSError as exc:
        raise DDMError(f"{p}: cannot read ({exc.strerror or exc}); is {path} an ensemble bundle?") from None
    except ValueError:
        raise IntegrityError(f"{p}: not valid JSON") from None
    return BundleIndex.parse(index, str(p))


def read_index(path: str | Path) -> dict:
    """The bundle's index as a document (checked as `load_index` does)."""
    return load_index(path).raw


def _bundle_plan(path: Path, index: BundleIndex) -> Plan:
    plan_path = path / "plan.json"
    if plan_path.is_symlink():
        raise IntegrityError(f"{plan_path}: a symlink, not the bundle's plan")
    try:
        raw = plan_path.read_bytes()
    except OSError:
        raise IntegrityError(f"{plan_path}: missing") from None
    if hashlib.sha256(raw).hexdigest() != index.run_id:
        raise IntegrityError(f"{plan_path}: sha256 does not match the run id in {INDEX}")
    plan = Plan.from_bytes(raw, str(plan_path))
    index.check_plan(plan, str(path / INDEX))
    return plan


def _artifact_dir(path: Path, rel: str) -> Path:
    """A listed artifact directory inside the bundle: a real directory (no symlink on the way) of plain files."""
    d, here = path / rel, path
    for part in Path(rel).parts:
        here = here / part
        if here.is_symlink():
            raise IntegrityError(f"{here}: a symlink; a bundle holds its artifacts itself")
    if not d.is_dir():
        raise IntegrityError(f"{d / MANIFEST}: missing")
    return d


def _listed(index: BundleIndex) -> list[tuple[str, str, int, str, int | None]]:
    """(directory, kind, shard, manifest id, step) of every artifact the index lists."""
    out = []
    if index.student is not None:
        out.append((index.student.dir, ckpt.EXPERT, 0, index.student.manifest_id, index.student.step))
    for e in index.experts:
        out.append((e.dir, ckpt.EXPERT, e.shard, e.manifest_id, e.step))
        out.append((f"{e.dir}/stats", ckpt.STATS, e.shard, e.stats_manifest_id, None))
    if index.router_dir is not None:
        out.append((index.router_dir, "router", -1, index.router_manifest_id, None))
    return out


def _verify_eval_pack(path: Path, index: BundleIndex, plan: Plan, require_signature: bool,
                      trusted_keys: Iterable[str] | None) -> None:
    """The held-out pack the index lists: signed, its files' hashes, and the plan's pack (data.pack rules)."""
    d = _artifact_dir(path, EVAL_PACK)
    m = verify_artifact(d, require_signature=require_signature, trusted_keys=trusted_keys)
    ref = plan.packs.eval if plan.packs is not None else None
    if ref is None:
        problem: str | None = "the plan has no held-out pack"
    elif (m.kind, m.run_id, m.id) != (PACK_KIND, index.run_id, index.eval_pack_id):
        problem = f"is a {m.kind} of run {m.run_id[:12]} ({m.id[:12]}), {INDEX} lists the held-out pack"
    else:
        problem = manifest_problem(m, ref)
    if problem is not None:
        raise IntegrityError(f"{d / MANIFEST}: {problem}")


def verify_bundle(path: str | Path, require_signature: bool = True, trusted_keys: Iterable[str] | None = None) -> dict:
    """Check the index, the plan hash, and exactly the artifacts the index lists: each one's signature and file
    hashes, and that it is the kind, shard, step and manifest its entry names, with the files and model config
    the plan allows. Nothing outside the bundle is read.

    Raises IntegrityError naming the first bad file. Returns the index.
    """
    path = Path(path)
    index = load_index(path)
    plan = _bundle_plan(path, index)
    plan_rules = ArtifactRules.for_plan(plan)
    if index.eval_pack_id is not None:
        _verify_eval_pack(path, index, plan, require_signature, trusted_keys)
    for rel, kind, shard, manifest_id, step in _listed(index):
        d = _artifact_dir(path, rel)
        m = verify_artifact(d, require_signature=require_signature, trusted_keys=trusted_keys)
        rules = _rules(d, index, plan, plan_rules) if kind == ckpt.EXPERT else plan_rules  # config.json verified
        got = (m.kind, m.run_id, m.shard, m.id, m.step if step is not None else None)
        if got != (kind, index.run_id, shard, manifest_id, step):
            raise IntegrityError(f"{d / MANIFEST}: is a {m.kind} of run {m.run_id[:12]} shard {m.shard} step "
                                 f"{m.step} ({m.id[:12]}), {INDEX} lists a {kind} of shard {shard}"
                                 + (f" step {step}" if step is not None else "") + f" ({manifest_id[:12]})")
        problem = rules.size_problem(m)
        if problem is not None:
            raise IntegrityError(f"{d / MANIFEST}: {problem}")
        for name in m.files:  # a signed pickle named *.safetensors is still not a bundle anyone can load
            if name.endswith(".safetensors"):
                ckpt.check_tensor_file(d / name)
        if kind == ckpt.EXPERT:
            ckpt.read_model_config(d, rules.model)
    return index.raw


def _rules(d: Path, index: BundleIndex, plan: Plan, plan_rules: ArtifactRules) -> ArtifactRules:
    """The rules for the expert artifact in `d`: the plan's, or a student's (its own size: `student_rules`)."""
    if index.student is None or d.name != index.student.dir:
        return plan_rules
    return student_rules(plan, ckpt.read_model_config(d), str(d / ckpt.CONFIG_FILE))


def load_bundle(path: str | Path, verify: bool = True, require_signature: bool = False) -> Bundle:
    """Load a bundle's experts, stats and learned router (verifying every file by default). Only what the index
    lists is read, and each expert's config must be the plan's before a model is built from it."""
    path = Path(path)
    if verify:
        verify_bundle(path, require_signature)
    index = load_index(path)
    plan = _bundle_plan(path, index)
    rules = ArtifactRules.for_plan(plan)
    models, stats, objectives = {}, {}, {}
    for e in index.experts + ((index.student,) if index.student is not None else ()):
        d = _artifact_dir(path, e.dir)
        models[e.shard] = ckpt.load_expert(d, verify=False, expected=_rules(d, index, plan, rules).model)
        objectives[e.shard] = ckpt.expert_objective(d)
        if e is not index.student:
            stats[e.shard] = ClusterStats.from_tensors(ckpt.read_stats(_artifact_dir(path, f"{e.dir}/stats"),
                                                                       verify=False))
    if not models:
        raise DDMError(f"{path}: bundle holds no experts")
    learned = None
    if index.router_dir is not None:
        learned = load_router(_artifact_dir(path, index.router_dir), require_signature=require_signature, rules=rules)
    return Bundle(path, plan, index.raw, models, stats, learned, list(index.missing), objectives,
                  index.raw["distilled_from"] if index.student is not None else None)
