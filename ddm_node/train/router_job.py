"""The learned-router job: train on noised samples of every shard, write a signed router artifact."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ddm_node.core.config import RouterConfig, canonical_json, from_dict, to_dict
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.jsonsafe import load_file as load_json_file
from ddm_node.core.manifest import FileEntry, Manifest, commit_dir, fsync_write, seal, staging_dir, verify_artifact
from ddm_node.data.datasets import Dataset
from ddm_node.data.packing import plan_rows
from ddm_node.data.plan import Plan
from ddm_node.train.checkpoint import check_model_config
from ddm_node.train.limits import ArtifactRules
from router.learned import LearnedRouter, RouterNet, router_model_config, train_router

log = logging.getLogger(__name__)
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def plan_router_data(plan: Plan, dataset: Dataset | None = None, work_dir: str | Path | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """All training samples of the plan with their shard index as the label, their class labels and their text
    embeddings (from `dataset`, the data packs in `work_dir`, or the plan's dataset: `data.packing.plan_rows`)."""
    rows = plan_rows(plan, work_dir, dataset)
    cluster = [s.index for s in plan.shards for _ in s.ids]
    x = torch.from_numpy(np.concatenate([r.x for r in rows])).float()
    labeled = rows[0].y is not None and plan.cfg.model.num_classes > 0
    y = torch.from_numpy(np.concatenate([r.y for r in rows])).long() if labeled else None
    texted = rows[0].text is not None and bool(plan.cfg.model.text_dim)
    text = torch.from_numpy(np.concatenate([r.text for r in rows])).float() if texted else None
    return x, torch.tensor(cluster, dtype=torch.long), y, text


def train_plan_router(plan: Plan, out_dir: str | Path, steps: int | None = None, identity: Identity | None = None,
                      dataset: Dataset | None = None, on_step: Callable[[int, float], None] | None = None,
                      work_dir: str | Path | None = None) -> Path:
    """Train the learned router of `plan` and write it as a sealed artifact at `out_dir` (data: `plan_router_data`)."""
    cfg = plan.cfg.router
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    x, cluster, y, text = plan_router_data(plan, dataset, work_dir)
    c, h, _ = plan.shape
    experts = [s.index for s in plan.shards]
    router = train_router(x, cluster, y, plan.cfg.model.num_classes, h, c, experts, cfg, on_step=on_step, text=text)
    return write_router(out_dir, plan, router, cfg, identity)


def write_router(out_dir: str | Path, plan: Plan, router: LearnedRouter, cfg: RouterConfig,
                 identity: Identity | None = None) -> Path:
    """Seal a router artifact: model.safetensors + config.json (router config, image shape, expert ids)."""
    c, h, _ = plan.shape
    config = {"router": to_dict(cfg), "image_size": h, "channels": c, "num_classes": plan.cfg.model.num_classes,
              "experts": list(router.experts)}
    if router.net.backbone.text_dim:  # routers without text keep their config bytes
        config["text_dim"] = router.net.backbone.text_dim
    stage = staging_dir(out_dir)
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in router.net.state_dict().items()}
        save_file(weights, str(stage / MODEL_FILE))
        fsync_write(stage / CONFIG_FILE, canonical_json(config))
        manifest = Manifest(kind="router", run_id=plan.run_id, shard=-1, step=cfg.steps, config_hash="",
                            files={MODEL_FILE: FileEntry("", 0), CONFIG_FILE: FileEntry("", 0)})
        seal(stage, manifest, identity)
        return commit_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


MAX_IMAGE = 1024  # pixels per side, channels, classes and experts a router config may name (without a plan to compare)
MAX_CHANNELS = 64
MAX_CLASSES = 1 << 20
MAX_EXPERTS = 65536
MAX_TEXT_DIM = 1 << 16


def load_router(router_dir: str | Path, require_signature: bool = False, trusted_keys=None,
                rules: ArtifactRules | None = None) -> LearnedRouter:
    """Verify and load a router artifact into a LearnedRouter (eval mode, CPU).

    Its config.json is peer data: every number is range-checked, and with `rules` (the run's plan) the router's
    model config must be the plan's and its experts this run's shards, before the network is built."""
    router_dir = Path(router_dir)
    verify_artifact(router_dir, require_signature=require_signature, trusted_keys=trusted_keys)
    source = str(router_dir / CONFIG_FILE)
    try:
        config = load_json_file(router_dir / CONFIG_FILE, max_bytes=1 << 20, error=DDMError)  # peer data: bounded
        if not isinstance(config, dict) or not isinstance(config.get("experts"), list):
            raise DDMError(f"{source}: malformed router config (experts must be a list)")
        shards = rules.num_shards if rules is not None else MAX_EXPERTS
        experts = [_int_in(e, 0, shards - 1, f"{source}: expert") for e in config["experts"][:shards + 1]]
        if not experts or len(experts) > shards or len(set(experts)) != len(experts):
            raise DDMError(f"{source}: router experts must be 1 to {shards} distinct shards")
        cfg = from_dict(config["router"], RouterConfig, source=source, saved=True)
        model_cfg = router_model_config(cfg, _int_in(config["image_size"], 1, MAX_IMAGE, f"{source}: image_size"),
                                        _int_in(config["channels"], 1, MAX_CHANNELS, f"{source}: channels"),
                                        _int_in(config["num_classes"], 0, MAX_CLASSES, f"{source}: num_classes"),
                                        _int_in(config.get("text_dim", 0), 0, MAX_TEXT_DIM, f"{source}: text_dim"))
    except (KeyError, TypeError, ValueError) as exc:
        raise DDMError(f"{source}: malformed router config ({str(exc)[:200]})") from None
    if rules is not None:
        check_model_config(model_cfg.resolved(), rules.router, source)
    with torch.device("meta"):  # what the config asks for, counted without allocating it
        need = sum(t.numel() * t.element_size() for t in RouterNet(model_cfg, len(experts)).state_dict().values())
    weights = router_dir / MODEL_FILE
    if weights.is_file() and need > weights.stat().st_size:
        raise IntegrityError(f"{weights}: cannot load router weights (config.json describes {need} bytes of them, "
                             f"the file holds {weights.stat().st_size})")
    net = RouterNet(model_cfg, len(experts))
    try:
        net.load_state_dict(load_file(str(router_dir / MODEL_FILE)))
    except Exception as exc:  # shape mismatch or unreadable file
        reason = str(exc).splitlines()[0]
        raise IntegrityError(f"{router_dir / MODEL_FILE}: cannot load router weights ({reason})") from None
    return LearnedRouter(net.eval(), experts)


def _int_in(value: object, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DDMError(f"{what} must be an integer in [{low}, {high}], got {str(value)[:24]!r}")
    return value
