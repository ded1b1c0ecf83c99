"""Shared by the data-pack tests: a small labeled npz dataset, a packed plan of it, and a byte flipper."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddm_node.core.config import load_config
from ddm_node.data import pack as packmod
from ddm_node.data.datasets import load_dataset
from ddm_node.data.packing import write_plan_packs
from ddm_node.data.plan import make_plan

TINY = {"model.hidden": 32, "model.depth": 2, "model.heads": 2, "train.steps": 8, "train.batch_size": 16,
        "train.checkpoint_every": 4, "train.warmup_steps": 2, "router.steps": 4, "router.batch_size": 32}


def write_npz(path: Path, n: int = 240, size: int = 16, classes: int = 3, seed: int = 0) -> Path:
    """A small labeled npz dataset with per-sample features: class c is a bright band at rows 5c..5c+4, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = (rng.random((n, size, size)) * 60).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 5 * c:5 * c + 4] += 180
    features = rng.normal(size=(n, 6)).astype(np.float32)
    np.savez(path, x=x, y=y, features=features)
    return path


def make_packed(tmp_path: Path, monkeypatch) -> tuple:
    """(plan, dataset, plan dir, npz path): a 3-shard plan of a 16x16 npz dataset, its packs under tmp/plan/packs
    (16 KiB chunks: several per shard)."""
    monkeypatch.setattr(packmod, "CHUNK_BYTES", 16 << 10)
    data = write_npz(tmp_path / "data.npz")
    cfg = load_config(overrides={**TINY, "data.dataset": f"npz:{data}", "partition.experts": 3})
    ds = load_dataset(cfg.data.dataset)
    plan = write_plan_packs(make_plan(cfg, ds), ds, tmp_path / "plan")
    plan.save(tmp_path / "plan")
    return plan, ds, tmp_path / "plan", data


def flip(path: Path, offset: int) -> None:
    """Flip one bit of a file's byte at `offset`."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


