"""Checkpoint format: layout, exact resume through files, integrity and signature checks, pruning."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddm_node.core.config import ModelConfig, TrainConfig
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.identity import Identity
from ddm_node.core.manifest import read_manifest, seal, staging_dir, verify_artifact
from ddm_node.core.workdir import step_of
from ddm_node.train import checkpoint as ck
from ddm_node.train.checkpointer import Checkpointer, DiskFull, is_disk_full
from ddm_node.train.trainer import Trainer

RUN = "ab" * 32
HASH = "cd" * 32
MODEL = ModelConfig(size="tiny", image_size=8, channels=1, num_classes=10, class_dropout=0.2,
                    hidden=32, depth=2, heads=2)
TRAIN = TrainConfig(batch_size=16, lr=2e-3, warmup_steps=3, checkpoint_every=3, device="cpu", threads=1,
                    ema_decay=0.9, grad_accum=2, seed=5)


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def trainer(steps: int = 0) -> Trainer:
    x, y = data()
    t = Trainer(MODEL, TRAIN, x, y)
    t.run(steps)
    return t


def test_layout_and_expert_roundtrip(tmp_path):
    t = trainer(4)
    step_dir = ck.write_checkpoint(tmp_path, RUN, 2, t, HASH, extra={"loss": 0.5})
    assert step_dir == ck.checkpoint_dir(tmp_path, 2, 4) == tmp_path / "shard_002" / "step_00000004"
    listing = {kind: sorted(p.name for p in (step_dir / kind).iterdir()) for kind in ("expert", "state")}
    assert listing["expert"] == ["config.json", "manifest.json", "model.safetensors"]
    assert listing["state"] == ["config.json", "manifest.json", "state.safetensors"]
    expert_m = verify_artifact(step_dir / "expert", require_signature=False)
    state_m = verify_artifact(step_dir / "state", require_signature=False)
    got = (expert_m.kind, expert_m.run_id, expert_m.shard, expert_m.step, expert_m.config_hash)
    assert got == ("expert", RUN, 2, 4, HASH)
    assert state_m.kind == "state" and state_m.extra["loss"] == 0.5
    assert state_m.extra["step"] == 4 and state_m.extra["position"] == t.position
    cfg = json.loads((step_dir / "state" / "config.json").read_text())
    assert cfg["model"]["hidden"] == 32 and cfg["train"]["grad_accum"] == 2
    assert not [p for p in (tmp_path / "shard_002").iterdir() if p.name.startswith(".")]  # no staging left

    # The expert publishes the EMA as bf16 (half the bytes); loaded, it is those values widened to fp32, exactly.
    stored = load_file(str(step_dir / "expert" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    model = ck.load_expert(step_dir / "expert")
    assert not model.training and model.cfg == t.model_cfg
    ema = t.ema.state_dict()
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ema[k].to(torch.bfloat16).float()), k
        assert torch.allclose(v, ema[k], rtol=2 ** -8, atol=0), k  # bf16 keeps 8 significant bits
    assert not torch.equal(model.final.linear.weight, t.model.final.linear.weight.to(torch.bfloat16).float())
    x, y = data(4)
    tt = torch.full((4,), 0.3)
    out, exact = model(x, tt, y), t.ema(x, tt, y)
    assert (out - exact).abs().max() < 0.02 * exact.abs().max()  # sampling sees the same network
    # The training state keeps the EMA in fp32 bit for bit: resume and takeover stay exact.
    state = load_file(str(step_dir / "state" / "state.safetensors"))
    assert all(torch.equal(state[f"ema.{k}"], v) for k, v in ema.items())

    with pytest.raises(DDMError, match="may not set trainer field 'step'"):
        ck.write_checkpoint(tmp_path, RUN, 2, t, HASH, extra={"step": 1})
    with pytest.raises(DDMError, match="run_id"):
        ck.write_checkpoint(tmp_path, "not-hex", 3, t, HASH)
    assert ck.list_checkpoints(tmp_path, 3) == []


def test_resume_through_files_is_bit_exact(tmp_path):
    full = trainer(12)
    first = trainer(5)
    step_dir = ck.write_checkpoint(tmp_path, RUN, 0, first, HASH)
    first.run(9)  # training on does not change what was written
    x, y = data()
    second = Trainer(MODEL, TRAIN, x, y)
    assert ck.load_state(step_dir / "state", second) == 5
    second.run(12)
    a, b = full.state_tensors(), second.state_tensors()
    assert sorted(a) == sorted(b) and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.extra_state() == second.extra_state()


def test_corruption_falls_back_to_older_step(tmp_path):
    t = trainer(3)
    old = ck.write_checkpoint(tmp_path, RUN, 1, t, HASH)
    t.run(6)
    new = ck.write_checkpoint(tmp_path, RUN, 1, t, HASH)
    assert ck.list_checkpoints(tmp_path, 1) == [new, old]
    assert ck.latest_checkpoint(tmp_path, 1) == new

    state_file = new / "state" / "state.safetensors"
    good = state_file.read_bytes()
    state_file.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(IntegrityError, match="truncated"):
        verify_artifact(new / "state", require_signature=False)
    assert ck.latest_checkpoint(tmp_path, 1) == old

    state_file.write_bytes(good)
    assert ck.latest_checkpoint(tmp_path, 1) == new
    model_file = new / "expert" / "model.safetensors"
    raw = bytearray(model_file.read_bytes())
    raw[len(raw) - 5] ^= 0x01  # one byte altered, same size
    model_file.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256"):
        ck.load_expert(new / "expert")
    assert ck.latest_checkpoint(tmp_path, 1) == old

    (old / "state" / "manifest.json").unlink()
    assert ck.latest_checkpoint(tmp_path, 1) is None


def test_signed_checkpoints(tmp_path):
    me, other = Identity.generate(), Identity.generate()
    t = trainer(2)
    step_dir = ck.write_checkpoint(tmp_path, RUN, 0, t, HASH, identity=me)
    assert read_manifest(step_dir / "expert").publisher == me.public_hex
    assert ck.latest_checkpoint(tmp_path, 0, require_signature=True) == step_dir
    assert ck.latest_checkpoint(tmp_path, 0, require_signature=True, trusted_keys=[me.public_hex]) == step_dir
    assert ck.latest_checkpoint(tmp_path, 0, require_signature=True, trusted_keys=[other.public_hex]) is None
    ck.load_expert(step_dir / "expert", require_signature=True)
    with pytest.raises(IntegrityError, match="trusted"):
        ck.load_expert(step_dir / "expert", require_signature=True, trusted_keys=[other.public_hex])
    # an unsigned checkpoint does not count when signatures are required
    unsigned = tmp_path / "u"
    ck.write_checkpoint(unsigned, RUN, 0, t, HASH)
    assert ck.latest_checkpoint(unsigned, 0) is not None
    assert ck.latest_checkpoint(unsigned, 0, require_signature=True) is None
    # a signature over a manifest that was edited afterwards fails
    m_path = step_dir / "state" / "manifest.json"
    m_path.write_bytes(m_path.read_bytes().replace(b'"step":2', b'"step":3', 1))
    assert ck.latest_checkpoint(tmp_path, 0, require_signature=True) is None


def test_crash_leftover_staging_dir_is_ignored(tmp_path):
    t = trainer(2)
    good = ck.write_checkpoint(tmp_path, RUN, 0, t, HASH)
    stage = staging_dir(ck.checkpoint_dir(tmp_path, 0, 7))  # a crash after staging began
    (stage / "expert").mkdir()
    save_file(t.ema.state_dict(), str(stage / "expert" / "model.safetensors"))
    (tmp_path / "shard_000" / "step_junk").mkdir()
    assert ck.list_checkpoints(tmp_path, 0) == [good]
    assert ck.latest_checkpoint(tmp_path, 0) == good
    # a step dir that is complete on disk but lacks its state artifact does not count
    half = ck.checkpoint_dir(tmp_path, 0, 9)
    shutil.copytree(good / "expert", half / "expert")
    assert ck.list_checkpoints(tmp_path, 0)[0] == half
    assert ck.latest_checkpoint(tmp_path, 0) == good
    # a step dir whose manifests name another step does not count either
    moved = ck.checkpoint_dir(tmp_path, 0, 8)
    shutil.copytree(good, moved)
    assert ck.latest_checkpoint(tmp_path, 0) == good


def test_bad_state_file_raises(tmp_path):
    t = trainer(2)
    step_dir = ck.write_checkpoint(tmp_path, RUN, 0, t, HASH)
    state = step_dir / "state"
    tensors = load_file(str(state / "state.safetensors"))
    del tensors["ema.final.linear.weight"]
    save_file(tensors, str(state / "state.safetensors"))
    seal(state, read_manifest(state))  # re-sealed: hashes match, content is still wrong
    with pytest.raises(DDMError, match="missing tensor 'ema.final.linear.weight'"):
        ck.load_state(state, trainer())
    # a model config that does not match the trainer
    other = Trainer(dataclasses.replace(MODEL, hidden=64, heads=4), TRAIN, *data())
    good = ck.write_checkpoint(tmp_path / "b", RUN, 0, t, HASH)
    with pytest.raises(DDMError, match="model config differs"):
        ck.load_state(good / "state", other)
    # a broken config.json in an expert gives a one-line error naming the file
    cfg_path = good / "expert" / "config.json"
    cfg_path.write_text(json.dumps({"size": "tiny", "hidden": "big"}))
    seal(good / "expert", read_manifest(good / "expert"))
    with pytest.raises(DDMError, match=r"config\.json.*hidden must be an integer"):
        ck.load_expert(good / "expert")
    with pytest.raises(DDMError, match="kind is 'state'"):
        ck.load_expert(good / "state")


def test_stats_roundtrip(tmp_path):
    me = Identity.generate()
    stats = {"count": torch.tensor([40.0]), "mean": torch.randn(64), "var": torch.rand(64),
             "sub_means": torch.randn(4, 64)}
    d = ck.write_stats(tmp_path, RUN, 3, stats, HASH, identity=me)
    assert d == tmp_path / "shard_003" / "stats"
    assert read_manifest(d).kind == "stats"
    got = ck.read_stats(d, require_signature=True, trusted_keys=[me.public_hex])
    assert sorted(got) == sorted(stats) and all(torch.equal(got[k], stats[k]) for k in stats)
    f = d / "stats.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(IntegrityError):
        ck.read_stats(d)
    with pytest.raises(DDMError):
        ck.write_stats(tmp_path, RUN, 3, {}, HASH)


def test_prune_keeps_newest_valid(tmp_path):
    t = trainer(0)
    dirs = []
    for _ in range(4):
        t.run(t.step + 1)
        dirs.append(ck.write_checkpoint(tmp_path, RUN, 0, t, HASH))
    # newest is corrupt: keep=1 keeps it (newest) and the newest valid one
    (dirs[3] / "expert" / "model.safetensors").write_bytes(b"garbage")
    stale = staging_dir(ck.checkpoint_dir(tmp_path, 0, 99))
    os.utime(stale, (0, 0))
    fresh_stage = staging_dir(ck.checkpoint_dir(tmp_path, 0, 98))
    ck.prune_checkpoints(tmp_path, 0, keep=1)
    assert ck.list_checkpoints(tmp_path, 0) == [dirs[3], dirs[2]]
    assert not stale.exists() and fresh_stage.exists()  # a recent staging dir may belong to a live writer
    ck.prune_checkpoints(tmp_path, 0, keep=2)
    assert ck.list_checkpoints(tmp_path, 0) == [dirs[3], dirs[2]]
    with pytest.raises(DDMError):
        ck.prune_checkpoints(tmp_path, 0, keep=0)


def test_checkpointer_keeps_two_then_one_after_a_full_disk(tmp_path, monkeypatch):
    t = trainer(0)
    saver = Checkpointer(tmp_path, RUN, 0, HASH)
    for _ in range(3):
        t.run(t.step + 1)
        saver.write(t)
    assert [step_of(d) for d in ck.list_checkpoints(tmp_path, 0)] == [3, 2] and saver.newest_step == 3

    # the next write does not fit while two are kept: prune to the newest, retry once, keep one from now on
    real = ck.write_checkpoint
    full = {"left": 1}

    def write(*args, **kwargs):
        if full["left"] > 0:
            full["left"] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(ck, "write_checkpoint", write)
    t.run(4)
    assert saver.write(t) == ck.checkpoint_dir(tmp_path, 0, 4) and saver.keep == 1
    assert [step_of(d) for d in ck.list_checkpoints(tmp_path, 0)] == [4]
    t.run(5)
    saver.write(t)
    assert [step_of(d) for d in ck.list_checkpoints(tmp_path, 0)] == [5]

    # full even with one kept: DiskFull, and the newest checkpoint stays intact
    full["left"] = 2
    t.run(6)
    with pytest.raises(DiskFull, match="step 6 does not fit"):
        saver.write(t)
    assert ck.list_checkpoints(tmp_path, 0) == [ck.latest_checkpoint(tmp_path, 0)] == [saver.newest]
    assert is_disk_full(OSError(errno.EDQUOT, "quota")) and not is_disk_full(OSError(errno.EACCES, "denied"))


def test_the_plans_rules_hold_an_expert_to_its_bf16_size(tmp_path):
    """Issue 10's size rules follow the format: a written expert fits; the same EMA in fp32 is refused."""
    from ddm_node.core.config import load_config
    from ddm_node.core.manifest import FileEntry, Manifest
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.train.limits import MARGIN, ArtifactRules

    ds = load_dataset("digits")
    cfg = load_config(overrides={"partition.experts": 1, "model.hidden": 192, "model.depth": 4, "model.heads": 2})
    plan = make_plan(cfg, ds)
    rules = ArtifactRules.for_plan(plan)
    t = Trainer(plan.cfg.model, TRAIN, *data())
    step_dir = ck.write_checkpoint(tmp_path, plan.run_id, 0, t, rules.config_hash)
    written = read_manifest(step_dir / "expert")
    assert rules.size_problem(written) is None
    limit = rules.files["expert"]["model.safetensors"]
    n_values = sum(v.numel() for v in t.ema.state_dict().values())
    assert written.files["model.safetensors"].size <= limit <= 2 * n_values + MARGIN
    save_file({k: v.contiguous() for k, v in t.ema.state_dict().items()}, str(tmp_path / "fp32.safetensors"))
    fp32 = (tmp_path / "fp32.safetensors").stat().st_size
    as_fp32 = Manifest("expert", plan.run_id, 0, 0, rules.config_hash,
                       {**written.files, "model.safetensors": FileEntry("0" * 64, fp32)})
    assert "model.safetensors declares" in rules.size_problem(as_fp32)
