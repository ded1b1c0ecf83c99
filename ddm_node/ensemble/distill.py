"""Distillation: one dense student trained to regress an ensemble bundle's velocity (the paper's distillation).

The teacher is the bundle's `EnsembleVelocity` (its experts, each converted to velocity, and its router) with the
routing chosen here, without classifier-free guidance: the trainer draws labels and drops them to the null class
(`model.class_dropout`) as for any expert, and the teacher is asked for the velocity under the same label, so the
student learns the conditional and the unconditional velocity and guidance works on it at sampling time.
The samples are the bundle's training data (`EvalData.x_train`: every training sample up to 65,536, from the
held-out pack or the plan's dataset; never the held-out split), noised at t as the trainer draws it.

Training is the one loop (`train.expert.train_loop`, the `Trainer` with a teacher), checkpointed into
OUT/train/shard_000/ like an expert and resumed from the newest valid checkpoint there. Its manifests name the
teacher's run and shard 0 but carry the distillation's own config hash (the student's model config and the
`distilled_from` record), so no island takes a student for shard 0's expert and a resume refuses another teacher.
OUT is then a distilled bundle (ensemble/bundle.py): the teacher's plan and held-out pack, the student in
OUT/student/ and `distilled_from` in model_index.json; `sample` and `eval` read it like any bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ddm_node.core.config import Config, SampleConfig, canonical_json, config_hash, load_config
from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import copy_artifact, read_manifest, write_atomic
from ddm_node.data.plan import Plan
from ddm_node.ensemble.bundle import EVAL_PACK, FORMAT, INDEX, Bundle, load_index
from ddm_node.ensemble.generate import bundle_eval_data
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.checkpointer import Checkpointer
from ddm_node.train.expert import train_loop
from ddm_node.train.limits import student_rules
from ddm_node.train.trainer import Trainer, resolve_device

log = logging.getLogger(__name__)

STUDENT = "student-{step:08d}"  # one directory per step written: the index switches from one to the next at once
TRAIN_DIR = "train"  # OUT/train: the student's checkpoints (a work dir with shard 0)


def student_config(plan: Plan, steps: int, size: str | None = None, config: str | Path | None = None,
                   sets: Sequence[str] = ()) -> Config:
    """The student's config: the plan's, with the velocity objective, `config` (a YAML file) and `sets` applied,
    `steps` steps, and with `size` a named model size of its own (the experts' width, depth and patch dropped).
    DDMError when it is not a model the bundle can hold (`student_rules`)."""
    plan_cfg = plan.cfg
    base = dataclasses.replace(plan_cfg, train=dataclasses.replace(plan_cfg.train, objective="velocity"))
    cfg = load_config(config, {"train.steps": steps}, sets, base=base)
    if size is not None:
        cfg.model = dataclasses.replace(cfg.model, size=size, hidden=0, depth=0, heads=0, patch_size=0)
    cfg.validate()
    student_rules(plan, cfg.model.resolved(), "the student's config")
    return cfg


def distilled_from(bundle: Bundle, sample: SampleConfig, data: str) -> dict:
    """What the student is distilled from: the teacher's run and index (whose sha256 covers every expert and router
    manifest), the experts and the routing asked of it, and where the samples came from."""
    kind = "learned" if sample.router == "learned" or (sample.router == "auto" and bundle.learned) else "centroid"
    return {"run_id": bundle.plan.run_id, "index_sha256": hashlib.sha256((bundle.path / INDEX).read_bytes()).hexdigest(),
            "experts": sorted(bundle.models), "router": kind, "routing": sample.routing, "top_k": sample.top_k,
            "cfg_scale": 1.0, "data": data}


def _teacher(bundle: Bundle, sample: SampleConfig, device: torch.device) -> Callable:
    """The ensemble's velocity on `device` (no guidance: the label the trainer drew is the one asked for)."""
    for model in bundle.models.values():
        model.to(device)
    if bundle.learned is not None:
        bundle.learned.net.to(device)
    return bundle.velocity(dataclasses.replace(sample, cfg_scale=1.0))


def _check_out(out: Path, ensemble: Path, identity_hash: str, run_id: str) -> None:
    """OUT is new, or a distillation of the same teacher into the same student; never the teacher or a bundle."""
    if out.resolve() == ensemble.resolve():
        raise DDMError(f"--out {out} is the ensemble itself; choose a new directory for the student")
    if (out / INDEX).exists() and load_index(out).student is None:
        raise DDMError(f"--out {out} holds an ensemble bundle, not a distillation; choose a new directory")
    latest = ckpt.latest_checkpoint(out / TRAIN_DIR, 0)
    if latest is not None:
        m = read_manifest(latest / ckpt.EXPERT)
        if (m.run_id, m.config_hash) != (run_id, identity_hash):
            raise DDMError(f"{latest}: a distillation of another ensemble, routing or student config; resume it with "
                           f"the same flags, or choose a new --out")


def distill(bundle: Bundle, out: str | Path, cfg: Config, sample: SampleConfig,
            identity: Identity | None = None, device: str | None = None,
            on_step: Callable[[int, float], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Path:
    """Distill a loaded ensemble `bundle` (`load_bundle`) into a student trained with `cfg` (`student_config`;
    `cfg.train.steps` steps in all, resumed from OUT/train) under the routing of `sample`; writes and returns the
    bundle OUT."""
    ensemble, out = bundle.path, Path(out)
    if bundle.distilled_from is not None:
        raise DDMError(f"{ensemble} is a distilled bundle already; distill from the ensemble it came from")
    if bundle.plan.cfg.model.text_dim:
        raise DDMError(f"{ensemble} is text-conditioned; distilling text-conditioned ensembles is not supported yet")
    student_rules(bundle.plan, cfg.model.resolved(), "the student's config")
    data = bundle_eval_data(bundle)
    record = distilled_from(bundle, sample, "eval_pack" if bundle.eval_pack is not None else "dataset")
    identity_hash = config_hash(cfg.model) + hashlib.sha256(canonical_json(record)).hexdigest()[:16]
    _check_out(out, ensemble, identity_hash, bundle.plan.run_id)
    x = torch.from_numpy(data.x_train).float()
    y = torch.from_numpy(data.y_train).long() if data.y_train is not None and cfg.model.num_classes else None
    latent = bundle.plan.dataset.startswith("latents:")
    teacher = _teacher(bundle, sample, resolve_device(device if device is not None else cfg.train.device))
    trainer = Trainer(cfg.model, cfg.train, x, y, device=device, check_range=not latent, teacher=teacher)
    saver = Checkpointer(out / TRAIN_DIR, bundle.plan.run_id, 0, identity_hash, identity)
    log.info("distilling %s (%d experts, %s routing) into a %s student on %d samples", ensemble, len(bundle.models),
             sample.routing, cfg.model.size, len(x))
    step_dir = train_loop(trainer, saver, cfg.train.steps, on_step=on_step, should_stop=should_stop)
    if step_dir is None:
        raise DDMError(f"nothing to distill: train.steps is {cfg.train.steps}")
    return write_student_bundle(out, bundle, step_dir / ckpt.EXPERT, record)


def write_student_bundle(out: Path, bundle: Bundle, expert_dir: Path, record: dict) -> Path:
    """OUT/student-STEP (the expert artifact), the teacher's plan and held-out pack, then model_index.json (atomic),
    then older students go: a reader sees the previous complete bundle or this one."""
    m = ckpt.verify_checkpoint(expert_dir.parent)[0]
    name = STUDENT.format(step=m.step)
    copy_artifact(expert_dir, out / name)
    write_atomic(out / "plan.json", bundle.plan.to_bytes())  # the same bytes every time
    index = {"format": FORMAT, "run_id": bundle.plan.run_id, "dataset": bundle.plan.dataset,
             "fingerprint": bundle.plan.fingerprint, "shape": list(bundle.plan.shape),
             "num_classes": bundle.plan.num_classes, "num_shards": len(bundle.plan.shards), "experts": [],
             "missing": [], "router": {"kind": "none", "dir": None},
             "student": {"dir": name, "step": m.step, "publisher": m.publisher, "manifest_id": m.id},
             "distilled_from": record}
    if bundle.eval_pack is not None:
        index["eval_pack"] = bundle.index["eval_pack"]
        if not (out / EVAL_PACK).is_dir() or read_manifest(out / EVAL_PACK).id != index["eval_pack"]["manifest_id"]:
            copy_artifact(bundle.eval_pack, out / EVAL_PACK)
    write_atomic(out / INDEX, json.dumps(index, indent=2, sort_keys=True).encode())
    for old in out.glob(STUDENT.split("{")[0] + "*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log.info("distilled bundle written: %s (student at step %d)", out, m.step)
    return out
