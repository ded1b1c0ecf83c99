"""Data packs (issue 14, item 1): a plan's packs are content-addressed and recorded in the plan; a shard trains
from its pack alone (no dataset on the box); the held-out pack evaluates; the verified fetch of a pack over gRPC
takes an honest copy and rejects a tampered one with a one-line reason, before or after downloading it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddm_node.core.config import load_config
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import MANIFEST, read_manifest
from ddm_node.core.meter import Count, Meter
from ddm_node.data.datasets import load_dataset
from ddm_node.data.pack import PACK_INDEX, parse_safetensors, read_pack, seal_pack
from ddm_node.data.packing import (
    eval_data,
    eval_slot,
    local_dataset,
    pack_path,
    plan_rows,
    read_eval_data,
    shard_rows,
    spec,
    write_plan_packs,
)
from ddm_node.data.plan import PACKS_VERSION, PLAN_VERSION, Plan, make_plan
from ddm_node.exchange.candidates import FAILED_LISTINGS
from ddm_node.exchange.fetch import RejectList
from ddm_node.exchange.packs import fetch_any, pack_candidates
from ddm_node.swarm.records import PackRecord
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.expert import train_shard
from ddm_node.transfer.server import TransferServer
from ddm_node.transfer.store import ArtifactStore, NodeInfoData
from tests.pack_data import TINY, flip, make_packed, write_npz

HONEST, EVIL = Identity.generate(), Identity.generate()


@pytest.fixture
def packed(tmp_path, monkeypatch):
    return make_packed(tmp_path, monkeypatch)


def test_plan_records_packs_that_rebuild_identically_and_read_back_as_the_dataset(packed, tmp_path):
    plan, ds, root, _ = packed
    assert plan.version == PACKS_VERSION and len(plan.packs.shards) == 3 and plan.packs.eval is not None
    loaded = Plan.load(root)
    assert loaded.packs == plan.packs and loaded.run_id == plan.run_id
    for slot, ref in enumerate([*plan.packs.shards, plan.packs.eval]):
        path = pack_path(root, ref)
        assert hashlib.sha256((path / PACK_INDEX).read_bytes()).hexdigest() == ref.sha256
        assert sum(f.stat().st_size for f in path.iterdir()) == ref.size
        assert len(list(path.glob("*.safetensors"))) > 1 or slot == eval_slot(plan)  # chunked at 16 KiB
    # the same data makes the same packs: any node with the dataset can rebuild and match the plan
    assert write_plan_packs(plan, ds, tmp_path / "again").packs == plan.packs
    for k in range(3):
        a, b = shard_rows(plan, k, root), shard_rows(plan, k, None, ds)
        assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and len(a.x) == len(plan.shards[k].ids)
    got, want = read_eval_data(pack_path(root, plan.packs.eval), plan), eval_data(plan, ds)
    for name in ("reference", "x_train", "y_train", "train_labels"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert len(plan_rows(plan, root)) == 3


def test_version_one_plans_keep_their_bytes_and_run_id():
    plan = make_plan(load_config(overrides=TINY), load_dataset("digits"))
    assert plan.version == PLAN_VERSION and plan.packs is None and b'"packs"' not in plan.to_bytes()
    assert Plan.from_bytes(plan.to_bytes()).run_id == plan.run_id


def test_an_island_uses_the_dataset_when_it_is_here_and_packs_only_when_it_is_absent(packed, tmp_path):
    plan, ds, _, data = packed
    assert local_dataset(plan).fingerprint() == plan.fingerprint
    old = dataclasses.replace(plan, version=PLAN_VERSION, packs=None)
    write_npz(data, seed=1)  # another dataset at the plan's path: an error, packs or not
    for p in (plan, old):
        with pytest.raises(DDMError, match="fingerprint"):
            local_dataset(p)
    data.unlink()
    assert local_dataset(plan) is None  # absent: the packs bring the data
    with pytest.raises(DDMError, match="no such file"):
        local_dataset(old)  # absent and no packs: the one-line error it always was


def test_a_shard_trains_from_its_pack_without_the_dataset(packed, tmp_path):
    plan, _, root, data = packed
    work = tmp_path / "work"
    shutil.copytree(pack_path(root, plan.packs.shards[1]), pack_path(work, plan.packs.shards[1]))
    data.rename(data.with_suffix(".gone"))  # the dataset is not on this box
    with pytest.raises(DDMError, match="no such file.*WORK/packs holds no pack of shard 0"):
        train_shard(plan, 0, work, identity=HONEST)
    assert train_shard(plan, 1, work, identity=HONEST) is not None
    assert ckpt.latest_checkpoint(work, 1) is not None


@pytest.mark.parametrize("tamper, reason", [
    (lambda p: flip(p / "rows_00001.safetensors", -5), "rows_00001.safetensors does not match its sha256"),
    (lambda p: flip(p / PACK_INDEX, 40), "pack.json has sha256"),
    (lambda p: (p / "rows_00000.safetensors").unlink(), "rows_00000.safetensors: cannot read"),
])
def test_a_tampered_pack_is_rejected_with_one_line_and_not_trained_on(packed, tmp_path, tamper, reason):
    plan, _, root, data = packed
    work = tmp_path / "work"
    dest = pack_path(work, plan.packs.shards[0])
    shutil.copytree(pack_path(root, plan.packs.shards[0]), dest)
    tamper(dest)
    data.rename(data.with_suffix(".gone"))
    with pytest.raises(IntegrityError, match=reason) as err:
        train_shard(plan, 0, work, identity=HONEST)
    assert "\n" not in str(err.value)
    assert ckpt.latest_checkpoint(work, 0) is None and not ckpt.stats_dir(work, 0).exists()


def test_pack_parsing_is_bounded_by_the_plan(packed, tmp_path):
    plan, _, root, _ = packed
    src = pack_path(root, plan.packs.shards[0])
    # another shard's genuine pack is not this shard's: the plan's sha256 decides
    with pytest.raises(IntegrityError, match="pack.json has sha256"):
        read_pack(src, spec(plan, 1))
    # a pack.json that hashes right but is read under a plan naming other ids or sizes
    wrong = spec(plan, 0, ref=type(plan.packs.shards[0])(plan.packs.shards[0].sha256, plan.packs.shards[0].size + 1))
    with pytest.raises(IntegrityError, match="the plan says"):
        read_pack(src, wrong)
    # safetensors headers: lengths, offsets and dtypes are checked before any tensor is built
    raw = (src / "rows_00000.safetensors").read_bytes()
    for bad, why in [(raw[:7], "too short"), ((1 << 40).to_bytes(8, "little") + raw[8:], "header of"),
                     (raw + b"\0", "bytes after the last tensor"), (raw[:-4], "does not fit its offsets"),
                     (raw.replace(b'"I64"', b'"I32"', 1), "bad header entry")]:
        with pytest.raises(IntegrityError, match=why):
            parse_safetensors(bad, "chunk")


# ------------------------------------------------------------------------------------------ over gRPC


@pytest.fixture
def served(packed, tmp_path):
    """Shard 0's pack sealed by HONEST and a tampered one (a chunk altered, re-signed) by EVIL, each served by its
    own gRPC server; yields (plan, honest record, evil record, the honest server's meter)."""
    plan, _, root, _ = packed
    FAILED_LISTINGS.clear()
    ref = plan.packs.shards[0]
    records, servers, meter = [], [], Meter()
    for who, tamper in ((HONEST, None), (EVIL, lambda p: flip(p / "rows_00000.safetensors", -9))):
        d = tmp_path / f"served-{who.public_hex[:6]}" / ref.sha256
        shutil.copytree(pack_path(root, ref), d)
        if tamper:
            tamper(d)
        m = seal_pack(d, plan.run_id, 0, ref, who)
        store = ArtifactStore()
        store.register(d)
        server = TransferServer(store, NodeInfoData("p", who.public_hex), meter=None if tamper else meter)
        servers.append(server)
        records.append(PackRecord(0, ref.sha256, m.id, m.publisher, who.public_hex, server.start()))
    try:
        yield plan, records[0], records[1], meter
    finally:
        for s in servers:
            s.stop(0)


def test_the_verified_fetch_takes_an_honest_pack_and_rejects_a_tampered_one(served, tmp_path):
    plan, honest, evil, meter = served
    s, rejects = spec(plan, 0), RejectList()
    dest = tmp_path / "island" / "packs" / s.ref.sha256
    # the tampered copy alone: downloaded (its manifest is signed), then refused against the plan, never kept
    m, reasons = fetch_any(pack_candidates([evil], s.ref.sha256), dest, plan.run_id, s, None, rejects)
    assert m is None and not dest.exists() and len(rejects) == 1
    assert len(reasons) == 1 and "\n" not in reasons[0] and "does not match its sha256" in reasons[0], reasons
    # both: the rejected one is not tried again, the honest one verifies and lands in place
    m, reasons = fetch_any(pack_candidates([evil, honest], s.ref.sha256), dest, plan.run_id, s, None, rejects)
    assert m is not None and m.publisher == HONEST.public_hex and not reasons
    assert read_manifest(dest).id == honest.manifest
    read_pack(dest, s, keep=False)
    # it travelled zstd-packed (fp32 pixels of 256 levels: 0.53 of its size), and is stored as the plan hashes it
    served_bytes = meter.snapshot().counts[(Count.BYTES_SERVED, "")]
    assert served_bytes < 0.75 * s.ref.size, (served_bytes, s.ref.size)


def test_a_pack_whose_manifest_contradicts_the_plan_is_refused_before_download(served, tmp_path, caplog):
    plan, honest, _, _ = served
    s = spec(plan, 1)  # shard 1's pack, announced with shard 0's artifact
    lie = PackRecord(1, s.ref.sha256, honest.manifest, honest.publisher, EVIL.public_hex, honest.grpc)
    dest = tmp_path / "island" / "packs" / s.ref.sha256
    caplog.set_level(logging.INFO, logger="ddm_node.transfer.download")
    m, reasons = fetch_any(pack_candidates([lie], s.ref.sha256), dest, plan.run_id, s, None, RejectList())
    assert m is None and not dest.exists() and not any(dest.parent.glob("*")), list(dest.parent.glob("*"))
    assert not [r for r in caplog.records if "fetched artifact" in r.getMessage()]  # no file was downloaded
    assert "shard is 0, expected 1" in reasons[0] and "\n" not in reasons[0]


def test_pack_records_are_checked():
    good = PackRecord(3, "a" * 64, "b" * 64, "c" * 64, "d" * 64, "127.0.0.1:5000")
    assert PackRecord.from_value(good.to_value()) == good
    for field, value in [("pack", "xyz"), ("shard", -1), ("grpc", "no port"), ("holder", 7)]:
        with pytest.raises(DDMError, match=f"bad pack record: {field}"):
            PackRecord.from_value({**good.to_value(), field: value})


# ------------------------------------------------------------------------------------------ the CLI


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddm_node.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))


def test_cli_partition_writes_packs_and_pack_adds_them_to_an_old_plan(tmp_path):
    data = write_npz(tmp_path / "data.npz", n=120)
    common = ["--dataset", f"npz:{data}", "--experts", "2", "--steps", "10"]
    res = _cli("partition", *common, "--out", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    plan = Plan.load(tmp_path / "a")
    assert plan.version == PACKS_VERSION and res.stdout.strip() == plan.run_id
    assert {p.name for p in (tmp_path / "a" / "packs").iterdir()} == {r.sha256 for r in [*plan.packs.shards,
                                                                                            plan.packs.eval]}
    res = _cli("partition", *common, "--no-packs", "--out", str(tmp_path / "b"))
    old = Plan.load(tmp_path / "b")
    assert res.returncode == 0 and old.version == PLAN_VERSION and not (tmp_path / "b" / "packs").exists()
    res = _cli("pack", "--plan", str(tmp_path / "b"))
    assert res.returncode == 0, res.stderr
    new = Plan.load(tmp_path / "b")
    assert new.packs == plan.packs and res.stdout.strip() == new.run_id != old.run_id
    assert Plan.load(tmp_path / "b" / f"plan-{old.run_id[:12]}.json").run_id == old.run_id  # the old one is kept
    res = _cli("pack", "--plan", str(tmp_path / "b"))  # again: the same packs, the same run
    assert res.returncode == 0 and res.stdout.strip() == new.run_id
    data.rename(tmp_path / "moved.npz")
    res = _cli("pack", "--plan", str(tmp_path / "b"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no such file" in res.stderr
    json.loads((tmp_path / "a" / "plan.json").read_text())  # still plain JSON
    assert MANIFEST not in {f.name for f in (tmp_path / "a" / "packs" / plan.packs.eval.sha256).iterdir()}
