"""The run plan: dataset fingerprint, held-out ids, K shards of train ids, the full run config, and (version 2)
the sha256 and size of every shard's data pack and of the held-out pack (data/pack.py, data/packing.py).

A plan file is canonical JSON; its sha256 is the run id, so a node that receives a plan from any peer
checks it against the run id it was given. Files that are not in canonical form are rejected, which
keeps `sha256(file bytes) == run_id` true for every plan that loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddm_node.core.config import Config, ModelConfig, TextConfig, canonical_json, from_dict, to_dict
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.jsonsafe import loads as load_json
from ddm_node.core.manifest import write_atomic
from ddm_node.data.datasets import Dataset, split_indices
from ddm_node.data.pack import PackRef
from ddm_node.data.partition import cluster, compute_features
from ddm_node.data.vae_ref import VaeRef

log = logging.getLogger(__name__)

PLAN_VERSION = 1  # a plan without packs (every island needs the dataset)
PACKS_VERSION = 2  # a plan with packs: islands without the dataset train from packs fetched from the swarm
PLAN_FILE = "plan.json"
MAX_PLAN_BYTES = 256 * 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = ("version", "dataset", "fingerprint", "shape", "num_classes", "n_samples", "eval_ids", "shards", "config")


@dataclass
class Shard:
    """One expert's data: sorted train sample ids and the cluster centroid in partition feature space."""

    index: int
    ids: list[int]
    centroid: list[float]


@dataclass(frozen=True)
class Packs:
    """The plan's data packs: one per shard, and the held-out split's (None when nothing is held out)."""

    shards: list[PackRef]
    eval: PackRef | None


@dataclass
class Plan:
    """Everything a node needs to train its shard, identical on every node (see `run_id`)."""

    version: int
    dataset: str
    fingerprint: str
    shape: list[int]  # [C, H, W]
    num_classes: int
    n_samples: int
    eval_ids: list[int]
    shards: list[Shard]
    config: dict  # config.to_dict(Config) of the full run config (train.steps = per-expert budget)
    packs: Packs | None = None  # version 2 only
    vae: VaeRef | None = None  # latents made by `ddm-node encode`: the VAE that decodes them (any version)

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes of the plan (what the file holds and the run id hashes). A plan without packs
        has no "packs" key, nor one without a VAE a "vae" key, so older plans keep their bytes and run ids."""
        data = dataclasses.asdict(self)
        if self.packs is None:
            del data["packs"]
        if self.vae is None:
            del data["vae"]
        else:
            data["vae"] = self.vae.to_dict()
        return canonical_json(data)

    @property
    def run_id(self) -> str:
        """sha256 hex of the canonical plan bytes."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def cfg(self) -> Config:
        """The run config as a validated Config."""
        return from_dict(self.config, Config, "plan config", saved=True)

    def save(self, directory: str | Path) -> Path:
        """Write `directory/plan.json` atomically; its bytes equal `to_bytes()`. Returns the path."""
        path = Path(directory) / PLAN_FILE
        write_atomic(path, self.to_bytes())
        return path

    def shard(self, k: int) -> Shard:
        """Shard number k; DDMError when out of range."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < len(self.shards):
            raise DDMError(f"shard {k} out of range (plan has {len(self.shards)} shards)")
        return self.shards[int(k)]

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "plan") -> Plan:
        """Parse and validate untrusted plan bytes; any defect is a one-line DDMError naming `source`."""
        if len(raw) > MAX_PLAN_BYTES:
            raise DDMError(f"{source}: plan too large ({len(raw)} bytes)")
        data = load_json(raw, f"{source}: plan", max_bytes=MAX_PLAN_BYTES, error=DDMError)
        if not isinstance(data, dict):
            raise DDMError(f"{source}: plan must be a JSON object")
        try:
            plan = _parse(data)
        except DDMError as exc:
            raise DDMError(f"{source}: {exc}") from None
        if plan.to_bytes() != raw:
            raise DDMError(f"{source}: plan is not in canonical form (edited by hand?); its run id would be ambiguous")
        return plan

    @classmethod
    def load(cls, path_or_dir: str | Path, expected_run_id: str | None = None) -> Plan:
        """Read a plan file (or DIR/plan.json); with `expected_run_id`, the file's sha256 must match it."""
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / PLAN_FILE
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DDMError(f"cannot read plan {path}: {exc.strerror or exc}") from None
        if expected_run_id is not None:
            if not isinstance(expected_run_id, str) or not _HEX64.match(expected_run_id):
                raise DDMError(f"run id must be 64 lowercase hex characters, got {expected_run_id!r}")
            got = hashlib.sha256(raw).hexdigest()
            if got != expected_run_id:
                raise IntegrityError(f"{path}: plan has run id {got[:16]}.., expected {expected_run_id[:16]}..")
        return cls.from_bytes(raw, str(path))


def make_plan(cfg: Config, ds: Dataset) -> Plan:
    """Split the dataset (cfg.data), cluster the train ids (cfg.partition) and build the plan."""
    cfg.validate()
    if cfg.data.dataset != ds.spec:
        raise DDMError(f"config data.dataset {cfg.data.dataset!r} does not match the dataset {ds.spec!r}")
    text_dim = 0 if ds.text is None else int(ds.text.shape[1])
    model = fit_model(cfg.model, ds.shape, ds.num_classes, text_dim)  # the plan's are concrete
    text = ds.text_info.to_config() if model.text_dim and ds.text_info is not None else TextConfig()
    cfg = dataclasses.replace(cfg, model=model, text=text)  # the plan names the text encoder for `sample --prompt`
    train_ids, eval_ids = split_indices(len(ds), cfg.data.holdout_fraction, cfg.data.split_seed)
    k = cfg.partition.experts
    feats = compute_features(ds, cfg.partition, train_ids)
    labels, centroids = cluster(feats, k, cfg.partition)
    shards = [Shard(index=c, ids=[int(i) for i in train_ids[labels == c]],
                    centroid=[float(v) for v in centroids[c]]) for c in range(k)]
    plan = Plan(version=PLAN_VERSION, dataset=ds.spec, fingerprint=ds.fingerprint(), shape=list(ds.shape),
                num_classes=ds.num_classes, n_samples=len(ds), eval_ids=[int(i) for i in eval_ids],
                shards=shards, config=to_dict(cfg), vae=ds.vae)
    log.info("plan %s: %d train / %d eval samples, shard sizes %s", plan.run_id[:12], len(train_ids),
             len(eval_ids), [len(s.ids) for s in shards])
    return plan


def check_dataset(plan: Plan, ds: Dataset) -> None:
    """DDMError unless `ds` is exactly the dataset the plan was made from."""
    got = ds.fingerprint()
    if got != plan.fingerprint:
        raise DDMError(f"dataset {ds.spec!r} has fingerprint {got[:16]}.. but the plan was made from "
                       f"{plan.dataset!r} with fingerprint {plan.fingerprint[:16]}..")


def fit_model(model: ModelConfig, shape: Sequence[int], num_classes: int, text_dim: int = 0) -> ModelConfig:
    """`model` with image size, channels, class count and text width taken from the data where unset (None). A
    value the config pins must agree with the data, or every island would fail later: DDMError naming the key."""
    c, h, w = (int(v) for v in shape)
    if h != w:
        raise DDMError(f"the dataset's images are {h}x{w}; the model needs square images")
    fit = dataclasses.replace(model, image_size=h if model.image_size is None else model.image_size,
                              channels=c if model.channels is None else model.channels,
                              num_classes=num_classes if model.num_classes is None else model.num_classes,
                              text_dim=text_dim if model.text_dim is None else model.text_dim)
    if fit.image_size != h:
        raise DDMError(_contradiction("model.image_size", fit.image_size, f"{h}x{w} images", h))
    if fit.channels != c:
        raise DDMError(_contradiction("model.channels", fit.channels, f"{c} channels", c))
    if fit.num_classes not in (0, num_classes):
        data = f"{num_classes} classes" if num_classes else "unlabeled images"
        raise DDMError(_contradiction("model.num_classes", fit.num_classes, data, num_classes,
                                      " or 0 (unconditional)" if num_classes else ""))
    if fit.text_dim not in (0, text_dim):
        data = f"{text_dim}-wide text embeddings" if text_dim else "data without text embeddings (ddm-node embed-text)"
        raise DDMError(_contradiction("model.text_dim", fit.text_dim, data, text_dim, " or 0 (no text)" if text_dim
                                      else ""))
    if h % fit.resolved().patch_size:
        raise DDMError(f"model.patch_size {fit.patch_size} does not divide the dataset's {h}x{w} images: "
                       f"leave it unset (0) to follow model.size, or set a divisor of {h}")
    return fit


def _contradiction(key: str, value: int, data: str, want: int, alt: str = "") -> str:
    return (f"{key} {value} contradicts the dataset's {data}: leave {key} unset to take it from the data, "
            f"or set it to {want}{alt} (--set {key}={want})")


# ------------------------------------------------------------------------------------------ validation


def _int(value: Any, where: str, lo: int = 0) -> int:
    if type(value) is not int or value < lo:
        raise DDMError(f"{where} must be an integer >= {lo}, got {value!r}")
    return value


def _ids(value: Any, n: int, where: str, allow_empty: bool) -> np.ndarray:
    """A strictly increasing list of sample ids in [0, n)."""
    if not isinstance(value, list) or any(type(v) is not int for v in value):
        raise DDMError(f"{where} must be a list of integers")
    if not value and not allow_empty:
        raise DDMError(f"{where} is empty")
    arr = np.asarray(value, dtype=np.int64) if value else np.zeros(0, np.int64)
    if len(arr) and (arr[0] < 0 or arr[-1] >= n or (np.diff(arr) <= 0).any()):
        raise DDMError(f"{where} must be strictly increasing ids in [0, {n})")
    return arr


def _parse(data: dict) -> Plan:
    version = data.get("version")
    if version not in (PLAN_VERSION, PACKS_VERSION) or type(version) is not int:
        raise DDMError(f"unsupported plan version {version!r} (this node reads {PLAN_VERSION} and {PACKS_VERSION})")
    fields = _FIELDS + (("packs",) if version == PACKS_VERSION else ())
    missing = [f for f in fields if f not in data]
    unknown = sorted(set(data) - set(fields) - {"vae"})
    if missing or unknown:
        raise DDMError(f"plan field {'missing: ' + missing[0] if missing else 'unknown: ' + unknown[0]}")
    if not isinstance(data["dataset"], str) or not data["dataset"]:
        raise DDMError("dataset must be a non-empty string")
    if not isinstance(data["fingerprint"], str) or not _HEX64.match(data["fingerprint"]):
        raise DDMError("fingerprint must be 64 lowercase hex characters")
    shape = data["shape"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise DDMError("shape must be a list [C, H, W]")
    for i, s in enumerate(shape):
        _int(s, f"shape[{i}]", 1)
    _int(data["num_classes"], "num_classes")
    n = _int(data["n_samples"], "n_samples", 1)
    seen = [_ids(data["eval_ids"], n, "eval_ids", allow_empty=True)]
    shards = data["shards"]
    if not isinstance(shards, list) or not shards:
        raise DDMError("shards must be a non-empty list")
    parsed: list[Shard] = []
    for i, s in enumerate(shards):
        parsed.append(_shard(s, i, n))
        seen.append(np.asarray(parsed[-1].ids, dtype=np.int64))
        if len(parsed[-1].centroid) != len(parsed[0].centroid):
            raise DDMError(f"shards[{i}].centroid has {len(parsed[-1].centroid)} values, shard 0 has "
                           f"{len(parsed[0].centroid)}")
    allids = np.concatenate(seen)
    if len(np.unique(allids)) != len(allids):
        raise DDMError("shards and eval_ids must be disjoint (a sample id appears twice)")
    if not isinstance(data["config"], dict):
        raise DDMError("config must be a mapping")
    cfg = from_dict(data["config"], Config, "config", saved=True)
    if fit_model(cfg.model, shape, data["num_classes"], cfg.model.text_dim or 0) != cfg.model:
        raise DDMError("config model.image_size, channels, num_classes and text_dim must be set in a plan")
    if bool(cfg.model.text_dim) != bool(cfg.text.encoder):
        raise DDMError("config text.encoder must name the text encoder exactly when model.text_dim > 0")
    if cfg.partition.experts != len(parsed):
        raise DDMError(f"config partition.experts {cfg.partition.experts} != {len(parsed)} shards")
    if cfg.data.dataset != data["dataset"]:
        raise DDMError(f"config data.dataset {cfg.data.dataset!r} != plan dataset {data['dataset']!r}")
    packs = _packs(data["packs"], len(parsed), bool(data["eval_ids"])) if version == PACKS_VERSION else None
    vae = VaeRef.parse(data["vae"], "vae") if "vae" in data else None
    if vae is not None and not data["dataset"].startswith("latents:"):
        raise DDMError("vae: only a latents: dataset has a VAE")
    return Plan(version=version, dataset=data["dataset"], fingerprint=data["fingerprint"], shape=shape,
                num_classes=data["num_classes"], n_samples=n, eval_ids=data["eval_ids"], shards=parsed,
                config=data["config"], packs=packs, vae=vae)


def _packs(value: Any, k: int, held_out: bool) -> Packs:
    """One pack per shard, and the held-out pack exactly when samples are held out."""
    if not isinstance(value, dict) or set(value) != {"shards", "eval"}:
        raise DDMError("packs must be an object with shards and eval")
    if not isinstance(value["shards"], list) or len(value["shards"]) != k:
        raise DDMError(f"packs.shards must list one pack per shard ({k})")
    shards = [PackRef.parse(v, f"packs.shards[{i}]") for i, v in enumerate(value["shards"])]
    if (value["eval"] is not None) != held_out:
        raise DDMError("packs.eval must be a pack exactly when eval_ids is not empty")
    return Packs(shards, PackRef.parse(value["eval"], "packs.eval") if held_out else None)


def _shard(value: Any, i: int, n: int) -> Shard:
    where = f"shards[{i}]"
    if not isinstance(value, dict) or set(value) != {"index", "ids", "centroid"}:
        raise DDMError(f"{where} must be an object with index, ids and centroid")
    if _int(value["index"], f"{where}.index") != i:
        raise DDMError(f"{where}.index is {value['index']}, expected {i}")
    _ids(value["ids"], n, f"{where}.ids", allow_empty=False)
    centroid = value["centroid"]
    if not isinstance(centroid, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in centroid):
        raise DDMError(f"{where}.centroid must be a list of finite numbers")
    return Shard(index=i, ids=value["ids"], centroid=centroid)
