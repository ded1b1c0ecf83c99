"""Mixed objectives: what each `train.objective` regresses, its conversion to velocity, and its record in the expert
artifact and the bundle."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from ddm_node.core.config import TrainConfig, canonical_json, config_hash, load_config, to_dict
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.manifest import Manifest, read_manifest, seal
from ddm_node.core.objective import EDGE, OBJECTIVES, from_velocity, to_velocity, training_target
from ddm_node.data.datasets import load_dataset
from ddm_node.data.plan import Plan, make_plan
from ddm_node.ensemble.bundle import load_bundle, sources_from_work_dirs, write_bundle
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.expert import train_shard
from ddm_node.train.flow import flow_matching_loss, interpolate


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """One torch thread for this module (conftest.one_torch_thread)."""


def _draw(b: int = 32):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(b, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(b, 1, 4, 4, generator=g,
                                                                                    dtype=torch.float64)
    t = torch.linspace(EDGE, 1 - EDGE, b, dtype=torch.float64)
    return x0, eps, t, interpolate(x0, t, eps)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_round_trips_to_the_flows_velocity(objective):
    """An objective's own target (eps, x0 or eps - x0, from the draw itself) converts to the velocity eps - x0, and
    the velocity converts back to that target, at every t at least EDGE from the ends."""
    x0, eps, t, x_t = _draw()
    v = eps - x0
    target = training_target(objective, x0, eps)
    assert torch.allclose(to_velocity(objective, target, x_t, t), v, atol=1e-10)
    assert torch.allclose(from_velocity(objective, v, x_t, t), target, atol=1e-10)
    assert torch.equal(target, {"velocity": v, "epsilon": eps, "x0": x0}[objective])


def test_the_loss_regresses_the_objectives_target():
    x0, eps, t, _ = _draw()
    for objective, right in (("epsilon", eps), ("x0", x0), ("velocity", eps - x0)):
        model = lambda x, tt, y, right=right: right  # noqa: E731  (a model that predicts the target exactly)
        assert float(flow_matching_loss(model, x0, None, t, eps, objective)) == 0.0
        others = [o for o in OBJECTIVES if o != objective]
        assert all(float(flow_matching_loss(model, x0, None, t, eps, o)) > 0.1 for o in others)
    # with a teacher: the teacher's velocity in the objective's terms, not the data's
    teacher = lambda x, tt, y: torch.zeros_like(x)  # noqa: E731
    x_t = interpolate(x0, t, eps)
    assert float(flow_matching_loss(lambda x, tt, y: x_t, x0, None, t, eps, "epsilon", teacher)) == 0.0


def test_unknown_objective_is_a_one_line_config_error(tmp_path):
    with pytest.raises(DDMError, match="train.objective must be 'velocity', 'epsilon' or 'x0', got 'score'"):
        load_config(sets=["train.objective=score"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  objective: eps\n")
    with pytest.raises(DDMError, match=r"c.yaml: train.objective must be .* got 'eps'") as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_config_hash_of_a_velocity_run_is_what_it_was_before_the_field():
    """Runs made before train.objective existed keep their config hash (their checkpoints still match)."""
    old = {k: v for k, v in to_dict(TrainConfig()).items() if k != "objective"}
    assert config_hash(TrainConfig()) == hashlib.sha256(canonical_json(old)).hexdigest()
    assert config_hash(TrainConfig(objective="x0")) != config_hash(TrainConfig())


@pytest.fixture(scope="module")
def eps_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("eps")
    ds = load_dataset("digits")
    cfg = load_config(overrides={"model.hidden": 16, "model.depth": 1, "model.heads": 2, "model.patch_size": 4,
                                 "partition.experts": 2, "train.steps": 2, "train.batch_size": 8,
                                 "train.threads": 1, "train.objective": "epsilon"})
    make_plan(cfg, ds).save(root / "plan")
    plan = Plan.load(root / "plan")
    for k in range(2):
        train_shard(plan, k, root / "work", dataset=ds)
    return write_bundle(root / "bundle", plan, sources_from_work_dirs([root / "work"], range(2)))


def test_the_expert_records_its_objective_and_the_bundle_converts_it(eps_bundle, tmp_path):
    assert read_manifest(eps_bundle / "expert_0").extra["objective"] == "epsilon"
    bundle = load_bundle(eps_bundle)
    assert bundle.objectives == {0: "epsilon", 1: "epsilon"}
    x, t, y = torch.randn(6, 1, 8, 8), torch.full((6,), 0.4), torch.arange(6)
    v = bundle.velocity(bundle.plan.cfg.sample)
    with torch.no_grad():
        got = v.experts[0](x, t, y)
        raw = bundle.models[0](x, t, y)
    assert torch.allclose(got, (raw - x) / 0.6, atol=1e-5)  # v = (eps - x_t) / (1 - t)
    # an expert written before the field existed predicts the velocity; a bad value is refused in one line
    for extra, want in (({"step": 2}, "velocity"), ({"objective": "score"}, None)):
        d = tmp_path / f"e{len(extra)}{want}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({}))
        seal(d, Manifest("expert", "a" * 64, 0, 2, "", {"config.json": None}, extra=extra))
        if want is None:
            with pytest.raises(IntegrityError, match="objective must be one of velocity, epsilon, x0, got 'score'"):
                ckpt.expert_objective(d)
        else:
            assert ckpt.expert_objective(d) == want
