"""The checkpoint format: expert (EMA weights), training state and cluster statistics artifacts.

Layout (docs/ARCHITECTURE.md "Artifacts"):
    WORK/shard_{k:03d}/step_{s:08d}/expert/  model.safetensors (EMA as bf16), config.json (ModelConfig), manifest
    WORK/shard_{k:03d}/step_{s:08d}/state/   state.safetensors (model, EMA, optimizer, RNG), config.json
                                             ({"model": ModelConfig, "train": TrainConfig}), manifest
    WORK/shard_{k:03d}/stats/                stats.safetensors, manifest
The expert holds the inference weights, rounded to bf16: half the bytes to store and send, and a sampler loses
nothing it can measure; exact resume and takeover read the EMA from the state, which stays fp32 bit for bit.
A step directory is built whole in a staging directory and renamed into place once, so a crash leaves
only a dot-named temporary directory, which every reader here ignores. Tensors travel as safetensors
only: nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ddm_node.core.config import ModelConfig, TrainConfig, canonical_json, from_dict, to_dict
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.jsonsafe import load_file as load_json_file
from ddm_node.core.manifest import (
    MANIFEST,
    FileEntry,
    Manifest,
    commit_dir,
    read_manifest,
    seal,
    staging_dir,
    verify_artifact,
)
from ddm_node.core.model import DiT
from ddm_node.core.objective import OBJECTIVES
from ddm_node.core.workdir import STEP_RE, WorkDir, step_of
from ddm_node.train.state import check_extra
from ddm_node.train.trainer import Trainer

logger = logging.getLogger(__name__)

EXPERT, STATE, STATS = "expert", "state", "stats"
MODEL_FILE, STATE_FILE, STATS_FILE = "model.safetensors", "state.safetensors", "stats.safetensors"
CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 1 << 20  # a config.json inside an artifact (a few hundred bytes when we write it)
STALE_STAGING_S = 3600.0  # staging directories older than this are leftovers of a crash
INFERENCE_DTYPE = torch.bfloat16  # the floating tensors of an expert's model.safetensors


def shard_dir(work_dir: str | Path, shard: int) -> Path:
    """WORK/shard_{k:03d}."""
    return WorkDir(work_dir).shard(shard)


def checkpoint_dir(work_dir: str | Path, shard: int, step: int) -> Path:
    """WORK/shard_{k:03d}/step_{s:08d}."""
    return WorkDir(work_dir).step(shard, step)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file, fsynced (the enclosing staging directory is renamed into place later)."""
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as exc:  # its I/O errors are not OSErrors: a full disk must look like one
        for code in (errno.ENOSPC, errno.EDQUOT):
            if f"(os error {code})" in str(exc):
                raise OSError(code, os.strerror(code), str(path)) from None
        raise
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inference_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An expert's published weights: floating tensors rounded to `INFERENCE_DTYPE` (to nearest even), others kept."""
    return {k: v.detach().to(INFERENCE_DTYPE) if v.is_floating_point() else v for k, v in state.items()}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def check_tensor_file(path: str | Path) -> dict[str, list[int]]:
    """Names and shapes from a safetensors file's header alone (no tensor data is read, nothing is ever
    unpickled); IntegrityError when the file is not a safetensors file (a pickle named *.safetensors)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def _write_json(path: Path, data: dict) -> None:
    with open(path, "wb") as f:
        f.write(canonical_json(data))
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> dict:
    """A JSON object from an artifact's file (peer data: bounded in size and depth, numbers finite)."""
    data = load_json_file(path, max_bytes=MAX_CONFIG_BYTES, error=DDMError)
    if not isinstance(data, dict):
        raise DDMError(f"{path}: top level must be a mapping")
    return data


def _seal(directory: Path, kind: str, run_id: str, shard: int, step: int, config_hash: str, files: Iterable[str],
          identity: Identity | None, extra: dict) -> Manifest:
    manifest = Manifest(kind=kind, run_id=run_id, shard=shard, step=step, config_hash=config_hash,
                        files={name: FileEntry("", 0) for name in files}, extra=extra)
    try:
        return seal(directory, manifest, identity)
    except IntegrityError as exc:  # a bad run id or config hash from the caller, not a bad file
        raise DDMError(str(exc)) from None


def write_checkpoint(work_dir: str | Path, run_id: str, shard: int, trainer: Trainer, config_hash: str,
                     identity: Identity | None = None, extra: dict | None = None) -> Path:
    """Write WORK/shard_k/step_s/{expert,state}/ for the trainer's current step, atomically; returns the step dir.

    `extra` (small JSON, e.g. the loss) goes into both manifests; the state manifest also holds
    `trainer.extra_state()`, whose keys `extra` may not override.
    """
    step = trainer.step
    final = checkpoint_dir(work_dir, shard, step)
    train_extra = trainer.extra_state()
    user_extra = dict(extra or {})
    clash = sorted(set(user_extra) & set(train_extra))
    if clash:
        raise DDMError(f"checkpoint extra may not set trainer field '{clash[0]}'")
    model_cfg = to_dict(trainer.model_cfg)
    stage = staging_dir(final)
    try:
        expert, state = stage / EXPERT, stage / STATE
        expert.mkdir()
        state.mkdir()
        _save_tensors(inference_tensors(trainer.ema.state_dict()), expert / MODEL_FILE)
        _write_json(expert / CONFIG_FILE, model_cfg)
        _seal(expert, EXPERT, run_id, shard, step, config_hash, (MODEL_FILE, CONFIG_FILE), identity,
              {**user_extra, "step": step, "objective": trainer.train_cfg.objective})
        _save_tensors(trainer.state_tensors(), state / STATE_FILE)
        _write_json(state / CONFIG_FILE, {"model": model_cfg, "train": to_dict(trainer.train_cfg)})
        _seal(state, STATE, run_id, shard, step, config_hash, (STATE_FILE, CONFIG_FILE), identity,
              {**user_extra, **train_extra})
        commit_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    logger.info("checkpoint written: %s", final)
    return final


def list_checkpoints(work_dir: str | Path, shard: int) -> list[Path]:
    """Step directories of a shard, newest first (temporary and other directories are ignored)."""
    return WorkDir(work_dir).steps(shard)


def verify_checkpoint(step_dir: str | Path, require_signature: bool = False,
                      trusted_keys: Iterable[str] | None = None) -> tuple[Manifest, Manifest]:
    """Verify both artifacts of a step dir and that their manifests agree with its place; IntegrityError if not."""
    step_dir = Path(step_dir)
    if not STEP_RE.match(step_dir.name):
        raise IntegrityError(f"{step_dir}: not a step directory")
    step = step_of(step_dir)
    require = require_signature or bool(trusted_keys)
    manifests = []
    for kind in (EXPERT, STATE):
        manifest = verify_artifact(step_dir / kind, require_signature=require, trusted_keys=trusted_keys)
        if manifest.kind != kind or manifest.step != step:
            raise IntegrityError(f"{step_dir / kind}: manifest says kind {manifest.kind!r} step {manifest.step}, "
                                 f"expected {kind!r} step {step}")
        manifests.append(manifest)
    expert, state = manifests
    if (expert.run_id, expert.shard, expert.config_hash) != (state.run_id, state.shard, state.config_hash):
        raise IntegrityError(f"{step_dir}: expert and state manifests disagree on run, shard or config")
    return expert, state


def latest_checkpoint(work_dir: str | Path, shard: int, require_signature: bool = False,
                      trusted_keys: Iterable[str] | None = None) -> Path | None:
    """Newest step dir whose expert/ and state/ both verify; corrupt ones are logged and skipped.

    A non-empty `trusted_keys` implies `require_signature`.
    """
    for step_dir in list_checkpoints(work_dir, shard):
        try:
            expert, _ = verify_checkpoint(step_dir, require_signature, trusted_keys)
        except IntegrityError as exc:
            logger.warning("skipping checkpoint %s: %s", step_dir, exc)
            continue
        if expert.shard != shard:
            logger.warning("skipping checkpoint %s: manifest is for shard %d", step_dir, expert.shard)
            continue
        return step_dir
    return None


def _parse_model_cfg(data: object, source: str) -> ModelConfig:
    if not isinstance(data, dict):
        raise DDMError(f"{source}: model config must be a mapping")
    return from_dict(data, ModelConfig, source=source, saved=True).resolved()  # saved: older files lack text_dim


def load_state(state_dir: str | Path, trainer: Trainer, require_signature: bool = False,
               trusted_keys: Iterable[str] | None = None) -> int:
    """Verify a state artifact and load it into `trainer`; returns the step it resumes at."""
    state_dir = Path(state_dir)
    manifest = verify_artifact(state_dir, require_signature=require_signature or bool(trusted_keys),
                               trusted_keys=trusted_keys)
    saved_model, saved_train = check_state(state_dir, manifest)
    if saved_model != trainer.model_cfg:
        raise DDMError(f"{state_dir / CONFIG_FILE}: model config differs from this trainer's ({saved_model} vs "
                       f"{trainer.model_cfg})")
    if saved_train != trainer.train_cfg:
        logger.info("resuming with a training config that differs from the checkpoint's")
    trainer.load_state(_load_tensors(state_dir / STATE_FILE), manifest.extra)
    return trainer.step


def check_state(state_dir: str | Path, manifest: Manifest) -> tuple[ModelConfig, TrainConfig]:
    """A state artifact's metadata without its tensors: kind, step, every number of `extra` (type and range) and
    config.json; DDMError if any is bad, else the saved model and training configs. What a mirror can check
    before it keeps (and serves) a peer's state, and the first half of `load_state`."""
    state_dir = Path(state_dir)
    if manifest.kind != STATE:
        raise DDMError(f"{state_dir}: artifact kind is {manifest.kind!r}, expected 'state'")
    if manifest.extra.get("step") != manifest.step:
        raise DDMError(f"{state_dir}: state step {str(manifest.extra.get('step'))[:24]!r} != manifest step "
                       f"{manifest.step}")
    try:
        check_extra(manifest.extra, None)
    except DDMError as exc:
        raise DDMError(f"{state_dir}: {exc}") from None
    cfg_path = state_dir / CONFIG_FILE
    cfg = read_json(cfg_path)
    saved_model = _parse_model_cfg(cfg.get("model"), f"{cfg_path} (model)")
    if not isinstance(cfg.get("train"), dict):
        raise DDMError(f"{cfg_path}: 'train' must be a mapping")
    return saved_model, from_dict(cfg["train"], TrainConfig, source=f"{cfg_path} (train)")


def read_model_config(expert_dir: str | Path, expected: ModelConfig | None = None) -> ModelConfig:
    """An expert artifact's model config (config.json); DDMError unless it is `expected` (the run's), when given.
    Checked before any model is built from it: a peer's config could ask for any size of model."""
    cfg_path = Path(expert_dir) / CONFIG_FILE
    cfg = _parse_model_cfg(read_json(cfg_path), str(cfg_path))
    if expected is not None:
        check_model_config(cfg, expected, str(cfg_path))
    return cfg


def check_model_config(cfg: ModelConfig, expected: ModelConfig, source: str) -> None:
    """DDMError naming the fields in which a model config read from an artifact differs from the run's."""
    expected = expected.resolved()
    if cfg != expected:
        diff = [f.name for f in dataclasses.fields(ModelConfig) if getattr(cfg, f.name) != getattr(expected, f.name)]
        raise DDMError(f"{source}: model config differs from the plan's ({', '.join(diff)})")


def load_expert(expert_dir: str | Path, verify: bool = True, require_signature: bool = False,
                trusted_keys: Iterable[str] | None = None, expected: ModelConfig | None = None) -> DiT:
    """Build a DiT from an expert artifact's config.json and load its EMA weights (eval mode, no grads; bf16 weights
    are widened to the model's fp32, exactly).
    With `expected` (the plan's model config) a config.json that differs is refused before the model is built."""
    expert_dir = Path(expert_dir)
    if verify:
        manifest = verify_artifact(expert_dir, require_signature=require_signature or bool(trusted_keys),
                                   trusted_keys=trusted_keys)
        if manifest.kind != EXPERT:
            raise DDMError(f"{expert_dir}: artifact kind is {manifest.kind!r}, expected 'expert'")
    cfg = read_model_config(expert_dir, expected)
    cfg_path = expert_dir / CONFIG_FILE
    try:
        model = DiT(cfg)
    except ValueError as exc:
        raise DDMError(f"{cfg_path}: {exc}") from None
    weights = _load_tensors(expert_dir / MODEL_FILE)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise DDMError(f"{expert_dir / MODEL_FILE}: weights do not match config.json ({what})")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape or not weights[name].is_floating_point():
            raise DDMError(f"{expert_dir / MODEL_FILE}: '{name}' has shape {list(weights[name].shape)}, "
                           f"expected {list(shape)}")
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False)


def expert_objective(expert_dir: str | Path) -> str:
    """What an expert artifact's network predicts (`train.objective`), from its manifest's extra; experts written
    before the field existed predict the velocity. IntegrityError for anything but a known objective."""
    value = read_manifest(expert_dir).extra.get("objective", "velocity")
    if value not in OBJECTIVES:
        raise IntegrityError(f"{Path(expert_dir) / MANIFEST}: objective must be one of {', '.join(OBJECTIVES)}, "
                             f"got {str(value)[:24]!r}")
    return value


def stats_dir(work_dir: str | Path, shard: int) -> Path:
    """WORK/shard_{k:03d}/stats."""
    return WorkDir(work_dir).stats(shard)


def write_stats(work_dir: str | Path, run_id: str, shard: int, tensors: dict[str, torch.Tensor], config_hash: str,
                identity: Identity | None = None) -> Path:
    """Write the shard's cluster statistics artifact (kind "stats", step 0) atomically; returns its dir."""
    if not tensors or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise DDMError("stats must be a non-empty mapping of names to tensors")
    final = stats_dir(work_dir, shard)
    stage = staging_dir(final)
    try:
        _save_tensors(tensors, stage / STATS_FILE)
        _seal(stage, STATS, run_id, shard, 0, config_hash, (STATS_FILE,), identity, {})
        commit_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return final


def read_stats(stats_path: str | Path, verify: bool = True, require_signature: bool = False,
               trusted_keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a stats artifact (verified first unless `verify` is False)."""
    stats_path = Path(stats_path)
    if verify:
        manifest = verify_artifact(stats_path, require_signature=require_signature or bool(trusted_keys),
                                   trusted_keys=trusted_keys)
        if manifest.kind != STATS:
            raise DDMError(f"{stats_path}: artifact kind is {manifest.kind!r}, expected 'stats'")
    return _load_tensors(stats_path / STATS_FILE)


def _remove_dir(path: Path) -> None:
    # Rename first: a half-deleted directory must never look like a step directory.
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(work_dir: str | Path, shard: int, keep: int = 2) -> None:
    """Delete all but the `keep` newest step dirs, never the newest valid one; clear stale temp dirs."""
    if keep < 1:
        raise DDMError(f"prune keep must be >= 1, got {keep}")
    steps = list_checkpoints(work_dir, shard)
    kept = set(steps[:keep])
    if steps[keep:]:
        newest_valid = latest_checkpoint(work_dir, shard)
        if newest_valid is not None:
            kept.add(newest_valid)
    for step_dir in steps:
        if step_dir not in kept:
            logger.info("pruning checkpoint %s", step_dir)
            _remove_dir(step_dir)
    root = shard_dir(work_dir, shard)
    now = time.time()
    for p in root.iterdir() if root.is_dir() else ():
        leftover = p.name.startswith(".") and (".tmp-" in p.name or ".del-" in p.name or ".old-" in p.name)
        if leftover and p.is_dir() and now - p.stat().st_mtime > STALE_STAGING_S:
            logger.info("removing stale temporary directory %s", p)
            shutil.rmtree(p, ignore_errors=True)
