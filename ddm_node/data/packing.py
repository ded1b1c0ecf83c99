"""A plan's data packs: which rows each holds, writing them from the dataset, and reading a shard's training data
or the evaluation data from a pack or from the dataset (the same arrays either way).

Slots: slot k < K is shard k's pack (part "rows": ids, x, y when labeled, the dataset's features when it has
them, text when the model conditions on text); slot K is the held-out pack (part "heldout": the held-out
samples; "domain": the training samples the domain classifier of `eval` learns from, all of them up to DOMAIN_CAP,
else a seeded choice; "train": every training label in plan order, for drawing class labels). Packs live under a
directory named by their sha256: PLAN_DIR/packs/<sha256>/ after `partition`, WORK/packs/<sha256>/ on an island.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import commit_dir
from ddm_node.data.datasets import Dataset, load_dataset, spec_path
from ddm_node.data.pack import Column, PackRef, PackSpec, PartSpec, Take, read_pack, write_pack
from ddm_node.data.plan import PACKS_VERSION, Packs, Plan, check_dataset

log = logging.getLogger(__name__)
PACKS_DIR = "packs"
DOMAIN_CAP = 65536  # training samples the domain classifier learns from, at most (every one of mnist's 63,000)
SHARD_KIND, EVAL_KIND = "shard", "eval"


@dataclass
class Rows:
    """A shard's training samples: images [N,C,H,W] float32 and labels int64 [N] (None: unlabeled)."""

    x: np.ndarray
    y: np.ndarray | None
    latent: bool
    text: np.ndarray | None = None  # float32 [N, D] pooled text embeddings of a text-conditioned run


@dataclass
class EvalData:
    """What `eval` needs: held-out images, the domain classifier's training images and labels, and every training
    label (class labels for sampling are drawn from them); labels are None for unlabeled data."""

    reference: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray | None
    train_labels: np.ndarray | None


# ------------------------------------------------------------------------------------------ which rows


def eval_slot(plan: Plan) -> int:
    """The held-out pack's slot: K (shards are 0..K-1)."""
    return len(plan.shards)


def pack_slots(plan: Plan) -> list[int]:
    """Every slot the plan has a pack for (none for a version-1 plan)."""
    if plan.packs is None:
        return []
    return list(range(len(plan.shards))) + ([eval_slot(plan)] if plan.packs.eval is not None else [])


def pack_ref(plan: Plan, slot: int) -> PackRef:
    """The plan's pack of a slot; DDMError when it has none."""
    if plan.packs is None or not 0 <= slot <= len(plan.shards) or (slot == eval_slot(plan) and not plan.packs.eval):
        raise DDMError(f"the plan has no data pack for slot {slot}")
    return plan.packs.eval if slot == eval_slot(plan) else plan.packs.shards[slot]


def train_ids(plan: Plan) -> np.ndarray:
    """Every training id, shard after shard (the order evaluation has always used)."""
    return np.concatenate([np.asarray(s.ids, dtype=np.int64) for s in plan.shards])


def domain_ids(plan: Plan) -> np.ndarray:
    """The training ids the domain classifier learns from: all of them up to DOMAIN_CAP, else a seeded choice."""
    ids = train_ids(plan)
    if len(ids) <= DOMAIN_CAP:
        return ids
    pick = np.random.default_rng(plan.cfg.data.split_seed).choice(len(ids), DOMAIN_CAP, replace=False)
    return ids[np.sort(pick)]


def _labeled(plan: Plan) -> bool:
    return plan.num_classes > 0


def _text_dim(plan: Plan) -> int:
    return plan.cfg.model.text_dim or 0


def spec(plan: Plan, slot: int, ref: PackRef | None = None) -> PackSpec:
    """What the pack of `slot` must be, from the plan (`ref`: the plan's own unless given)."""
    c, h, w = plan.shape
    image, ids, label = Column("float32", (c, h, w)), Column("int64", ()), Column("int64", ())
    rows = {"ids": ids, "x": image} | ({"y": label} if _labeled(plan) else {})
    if slot < len(plan.shards):
        shard = np.asarray(plan.shards[slot].ids, dtype=np.int64)
        text = {"text": Column("float32", (_text_dim(plan),))} if _text_dim(plan) else {}
        parts = {"rows": PartSpec(len(shard), rows | {"features": Column("float32", None)} | text,
                                  frozenset({"features"}), shard)}
        kind = SHARD_KIND
    else:
        held, domain = np.asarray(plan.eval_ids, dtype=np.int64), domain_ids(plan)
        parts = {"heldout": PartSpec(len(held), rows, ids=held), "domain": PartSpec(len(domain), rows, ids=domain)}
        if _labeled(plan):
            parts["train"] = PartSpec(len(train_ids(plan)), {"y": label})
        kind = EVAL_KIND
    return PackSpec(ref or pack_ref(plan, slot), kind, slot, plan.fingerprint, parts, plan.num_classes,
                    bounded=not plan.dataset.startswith("latents:"), where=f"{kind} pack {slot}")


# ------------------------------------------------------------------------------------------ writing


def build_pack(plan: Plan, ds: Dataset, slot: int, dest: str | Path) -> PackRef:
    """Write the pack of `slot` from the dataset at `dest`; its ref (equal to the plan's for the plan's data)."""
    def columns(ids: np.ndarray, features: bool = False) -> dict:
        out = {"ids": ids, "x": Take(ds.x, ids)}
        if ds.y is not None:
            out["y"] = Take(ds.y, ids)
        if features and ds.features is not None:
            out["features"] = Take(ds.features, ids)
        if features and _text_dim(plan) and ds.text is not None:
            out["text"] = Take(ds.text, ids)
        return out

    if slot < len(plan.shards):
        parts = {"rows": columns(np.asarray(plan.shards[slot].ids, dtype=np.int64), features=True)}
        kind = SHARD_KIND
    else:
        parts = {"heldout": columns(np.asarray(plan.eval_ids, dtype=np.int64)), "domain": columns(domain_ids(plan))}
        if ds.y is not None:
            parts["train"] = {"y": Take(ds.y, train_ids(plan))}
        kind = EVAL_KIND
    return write_pack(dest, kind, slot, plan.fingerprint, parts)


def write_plan_packs(plan: Plan, ds: Dataset, out_dir: str | Path) -> Plan:
    """Write every pack of the plan's dataset under OUT/packs/ and return the plan (version 2) that records them.

    A version-2 plan's packs are rewritten and must come out as the plan records them (the dataset is checked)."""
    check_dataset(plan, ds)
    root = Path(out_dir) / PACKS_DIR
    refs = []
    slots = list(range(len(plan.shards))) + ([eval_slot(plan)] if plan.eval_ids else [])
    for slot in slots:
        stage = root / f".building-{slot}"
        ref = build_pack(plan, ds, slot, stage)
        if plan.packs is not None and ref != pack_ref(plan, slot):
            raise DDMError(f"pack of slot {slot} comes out as {ref.sha256[:12]} from {ds.spec!r}, the plan records "
                           f"{pack_ref(plan, slot).sha256[:12]}")
        commit_dir(stage, root / ref.sha256)
        refs.append(ref)
    k = len(plan.shards)
    packs = Packs(refs[:k], refs[k] if len(refs) > k else None)
    log.info("%d data packs written under %s (%d bytes)", len(refs), root, sum(r.size for r in refs))
    return dataclasses.replace(plan, version=PACKS_VERSION, packs=packs)


# ------------------------------------------------------------------------------------------ reading


def pack_path(root: str | Path, ref: PackRef) -> Path:
    """Where a pack lives under a packs directory (content-addressed)."""
    return Path(root) / PACKS_DIR / ref.sha256


def local_dataset(plan: Plan) -> Dataset | None:
    """The plan's dataset when this box has it (fingerprint checked). None when it is absent (no file at its path,
    or a built-in dataset that does not load here) and the plan's packs bring the data. A dataset that is here but
    is not the plan's, or any absence without packs, is the one-line error it always was."""
    path = spec_path(plan.dataset)
    if plan.packs is not None and path is not None and not path.exists():
        log.info("dataset %s is not on this box; shards come from the swarm's data packs", plan.dataset)
        return None
    try:
        ds = load_dataset(plan.dataset)
    except DDMError as exc:
        if plan.packs is None or path is not None:
            raise
        log.info("dataset not used here (%s); shards come from the swarm's data packs", exc)
        return None
    check_dataset(plan, ds)
    return ds


def shard_rows(plan: Plan, shard: int, work_dir: str | Path | None = None, dataset: Dataset | None = None) -> Rows:
    """A shard's samples: from `dataset` when given, else from the verified pack in WORK/packs when the plan has
    packs and it is there, else from the plan's dataset (fingerprint checked)."""
    latent = plan.dataset.startswith("latents:")
    plan.shard(shard)
    if dataset is None and plan.packs is not None and work_dir is not None:
        path = pack_path(work_dir, pack_ref(plan, shard))
        if path.is_dir():
            cols = read_pack(path, spec(plan, shard))["rows"]
            return Rows(cols["x"], cols.get("y"), latent, cols.get("text"))
    ds = dataset if dataset is not None else _dataset(plan, f"and WORK/packs holds no pack of shard {shard}")
    check_dataset(plan, ds)
    ids = plan.shards[shard].ids
    text = ds.text[ids] if ds.text is not None and _text_dim(plan) else None
    return Rows(np.asarray(ds.x[ids]), ds.y[ids] if ds.y is not None else None, ds.latent, text)


def plan_rows(plan: Plan, work_dir: str | Path | None = None, dataset: Dataset | None = None) -> list[Rows]:
    """Every shard's samples (the router job's data): from the packs in WORK/packs when all are there, else
    from the dataset (loaded once)."""
    here = plan.packs is not None and work_dir is not None and all(
        pack_path(work_dir, ref).is_dir() for ref in plan.packs.shards)
    if dataset is None and not here:
        dataset = _dataset(plan, "and WORK/packs does not hold every shard's pack")
    return [shard_rows(plan, s.index, work_dir, dataset) for s in plan.shards]


def eval_data(plan: Plan, ds: Dataset) -> EvalData:
    """Evaluation data from the plan's dataset (fingerprint checked): the held-out pack's arrays, exactly."""
    check_dataset(plan, ds)
    dom, labels = domain_ids(plan), ds.y[train_ids(plan)] if ds.y is not None else None
    return EvalData(np.asarray(ds.x[plan.eval_ids]), np.asarray(ds.x[dom]),
                    ds.y[dom] if ds.y is not None else None, labels)


def read_eval_data(directory: str | Path, plan: Plan) -> EvalData:
    """Evaluation data from a held-out pack directory, verified against the plan."""
    parts = read_pack(directory, spec(plan, eval_slot(plan)))
    held, dom = parts["heldout"], parts["domain"]
    return EvalData(held["x"], dom["x"], dom.get("y"), parts["train"]["y"] if "train" in parts else None)


def _dataset(plan: Plan, hint: str) -> Dataset:
    try:
        return load_dataset(plan.dataset)
    except DDMError as exc:
        raise DDMError(f"{exc} ({hint})" if plan.packs is not None else str(exc)) from None
