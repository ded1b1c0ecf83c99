"""`ddm-node distill`: a dense student regressing a tiny ensemble's velocity, resumed after a stop, read by sample
and eval like any bundle; bad bundles and flags are one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ddm_node.cli.main import main
from ddm_node.core.config import load_config
from ddm_node.core.errors import DDMError
from ddm_node.data.datasets import load_dataset
from ddm_node.data.plan import Plan, make_plan
from ddm_node.ensemble.bundle import load_bundle, sources_from_work_dirs, verify_bundle, write_bundle
from ddm_node.ensemble.distill import distill, student_config
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.expert import train_shard

TINY = {"model.hidden": 16, "model.depth": 1, "model.heads": 2, "model.patch_size": 4, "partition.experts": 2,
        "train.steps": 3, "train.batch_size": 16, "train.checkpoint_every": 2, "train.warmup_steps": 1,
        "train.threads": 1, "sample.steps": 2, "sample.solver": "euler"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """One torch thread for this module (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 2-expert digits bundle of 3 steps per expert (8x8 images, a 16-wide one-block DiT)."""
    root = tmp_path_factory.mktemp("teacher")
    ds = load_dataset("digits")
    make_plan(load_config(overrides=TINY), ds).save(root / "plan")
    plan = Plan.load(root / "plan")
    for k in range(2):
        train_shard(plan, k, root / "work", dataset=ds)
    return write_bundle(root / "bundle", plan, sources_from_work_dirs([root / "work"], range(2)))


def _student(teacher, steps: int, **kw):
    plan = load_bundle(teacher).plan
    return student_config(plan, steps, **kw), plan.cfg.sample


def test_distill_resumes_exactly_and_sample_eval_accept_the_student(teacher, tmp_path, capsys):
    cfg, sample = _student(teacher, 5)
    calls = []
    stopped = distill(load_bundle(teacher), tmp_path / "a", cfg, sample, device="cpu",
                      on_step=lambda s, loss: calls.append(s), should_stop=lambda: len(calls) >= 3)
    assert load_bundle(stopped).index["student"]["step"] == 3  # a stop between checkpoints still writes one
    calls.clear()
    out = distill(load_bundle(teacher), tmp_path / "a", cfg, sample, device="cpu", on_step=lambda s, loss: calls.append(s))
    assert calls == [4, 5]  # resumed at step 3
    whole = distill(load_bundle(teacher), tmp_path / "b", cfg, sample, device="cpu")
    a, b = load_bundle(out), load_bundle(whole)
    assert a.distilled_from == b.distilled_from and a.distilled_from["routing"] == "top1"
    for (name, p), q in zip(a.models[0].state_dict().items(), b.models[0].state_dict().values()):
        assert torch.equal(p, q), name  # the interrupted run resumed bit for bit
    assert sorted(p.name for p in out.glob("student-*")) == ["student-00000005"]  # older students are removed
    verify_bundle(out, require_signature=False)
    assert main(["sample", "--ensemble", str(out), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", "--ensemble", str(out), "--n", "8", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["experts"] == [0] and scores["fd_dom"] >= 0


def test_the_student_learns_the_teachers_velocity(teacher, tmp_path):
    """Trained on the teacher, the student's error against the teacher's velocity falls (the target is the teacher's,
    not the data's: a student of a different ensemble would not get closer)."""
    cfg, sample = _student(teacher, 1, sets=["train.lr=0.01", "train.batch_size=64"])
    bundle = load_bundle(teacher)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), 0.5)
    y = torch.arange(64) % 10
    want = bundle.velocity(sample)(x, t, y)

    def error(out):
        student = load_bundle(out).models[0]
        with torch.no_grad():
            return float(((student(x, t, y) - want) ** 2).mean())

    first = error(distill(load_bundle(teacher), tmp_path / "s", cfg, sample, device="cpu"))
    cfg.train.steps = 40
    assert error(distill(load_bundle(teacher), tmp_path / "s", cfg, sample, device="cpu")) < 0.7 * first


def test_student_size_flag_and_resume_guard(teacher, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["distill", "--ensemble", str(teacher), "--steps", "1", "--out", str(out), "--size", "router",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg, sample = _student(teacher, 1, size="router")
    student = load_bundle(out).models[0]
    assert (student.cfg.size, student.cfg.hidden, student.cfg.depth) == ("router", 64, 2)
    other = dict(vars(sample), routing="full")
    with pytest.raises(DDMError, match="another ensemble, routing or student config"):
        distill(load_bundle(teacher), tmp_path / "s", cfg, type(sample)(**other), device="cpu")
    with pytest.raises(DDMError, match="is the ensemble itself"):
        distill(load_bundle(teacher), teacher, cfg, sample, device="cpu")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_bundles_and_flags_are_one_line_errors(teacher, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["distill", "--ensemble", str(tmp_path / "nope"), "--steps", "1", "--out", out]) == 2
    assert "nope" in _one_line(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(teacher, broken)
    weights = broken / "expert_1" / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert main(["distill", "--ensemble", str(broken), "--steps", "1", "--out", out]) == 2
    assert "expert_1" in _one_line(capsys)
    assert main(["distill", "--ensemble", str(teacher), "--steps", "1", "--out", out,
                 "--set", "train.objective=score"]) == 2
    assert "train.objective must be 'velocity', 'epsilon' or 'x0', got 'score'" in _one_line(capsys)
    assert main(["distill", "--ensemble", str(teacher), "--steps", "1", "--out", out,
                 "--set", "model.num_classes=0"]) == 2
    assert "num_classes" in _one_line(capsys)
    assert not (tmp_path / "out").exists()
