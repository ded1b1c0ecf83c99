"""Datasets describe themselves (issue 14): image size, channels and class count come from the dataset unless the
config pins them; a pin that contradicts the data is one line naming the key. `--set KEY=VALUE` overrides any
config key, typed and validated like the YAML."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from ddm_node.cli import main
from ddm_node.core.config import load_config, parse_set
from ddm_node.core.errors import DDMError
from ddm_node.data.plan import Plan

# the smallest model and run that still trains: three steps
TINY = [f"--set={kv}" for kv in ("model.hidden=32", "model.depth=1", "model.heads=2", "train.steps=3",
                                 "train.batch_size=8", "train.checkpoint_every=3", "train.warmup_steps=1",
                                 "train.device=cpu", "train.threads=1")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import sklearn.cluster  # noqa: F401  (threadpoolctl limits only the libraries already loaded)
    import sklearn.decomposition  # noqa: F401

    with threadpool_limits(limits=1):
        yield


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


def write_npz(path, n: int, channels: int, size: int, classes: int, seed: int = 0, width: int | None = None) -> str:
    """Random uint8 images [n, C, H, W] ([n, H, W] for one channel) and, with classes > 0, labels covering all."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, channels, size, width or size), dtype=np.uint8)
    arrays = {"x": x[:, 0] if channels == 1 else x}
    if classes:
        arrays["y"] = rng.permutation(np.arange(n) % classes)
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.mark.parametrize("channels, size, classes", [(1, 16, 0), (3, 28, 0), (1, 12, 3), (3, 8, 100), (1, 7, 0)],
                         ids=["gray 16x16 unlabeled", "rgb 28x28 unlabeled", "gray 12x12 3 classes",
                              "rgb 8x8 100 classes", "gray 7x7 (odd: patch 1)"])
def test_partition_without_config_fits_the_data_and_the_plan_trains(tmp_path, capsys, channels, size, classes):
    from ddm_node.train.checkpoint import load_expert
    from ddm_node.train.expert import train_shard

    spec = write_npz(tmp_path / "d.npz", 240, channels, size, classes)
    assert main(["partition", "--dataset", spec, "--experts", "2", *TINY, "--out", str(tmp_path / "plan")]) == 0
    plan = Plan.load(tmp_path / "plan")
    assert plan.shape == [channels, size, size] and plan.num_classes == classes
    m = plan.cfg.model  # the model's data fields come from the plan's data, nothing else set them
    assert (m.image_size, m.channels, m.num_classes) == (size, channels, classes)
    step_dir = train_shard(plan, 0, tmp_path / "work", device="cpu")
    assert step_dir.name == "step_00000003"
    expert = load_expert(step_dir / "expert")
    cfg = expert.cfg
    assert (cfg.image_size, cfg.channels, cfg.num_classes) == (size, channels, classes)
    assert size % cfg.patch_size == 0
    y = torch.zeros(2, dtype=torch.long) if classes else None
    with torch.no_grad():
        v = expert(torch.zeros(2, channels, size, size), torch.rand(2), y)
    assert v.shape == (2, channels, size, size)


def test_digits_default_still_8x8_10_classes(tmp_path, capsys):
    assert main(["partition", "--out", str(tmp_path / "plan")]) == 0
    m = Plan.load(tmp_path / "plan").cfg.model
    assert (m.image_size, m.channels, m.num_classes) == (8, 1, 10)


@pytest.mark.parametrize("flags, needle", [
    (["--set", "model.image_size=8"], "model.image_size 8 contradicts the dataset's 16x16 images"),
    (["--set", "model.channels=3"], "model.channels 3 contradicts the dataset's 1 channels"),
    (["--set", "model.num_classes=10"], "model.num_classes 10 contradicts the dataset's 3 classes"),
    (["--set", "model.patch_size=3"], "model.patch_size 3 does not divide the dataset's 16x16 images"),
], ids=["image_size", "channels", "num_classes", "patch_size"])
def test_pin_contradicting_the_data_is_one_line_naming_the_key(tmp_path, capsys, flags, needle):
    spec = write_npz(tmp_path / "d.npz", 60, 1, 16, 3)
    out = tmp_path / "plan"
    assert main(["partition", "--dataset", spec, *flags, "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("ddm-node partition: error: ") and needle in line, line
    key = flags[1].split("=")[0]
    if key != "model.patch_size":
        assert f"--set {key}=" in line, line  # the flag that fixes it
    assert not out.exists()


def test_other_contradictions(tmp_path, capsys):
    unlabeled = write_npz(tmp_path / "u.npz", 60, 1, 16, 0)
    assert main(["partition", "--dataset", unlabeled, "--set", "model.num_classes=10", "--out", str(tmp_path / "p")]) == 2
    assert "model.num_classes 10 contradicts the dataset's unlabeled images" in one_line(capsys.readouterr().err)
    wide = write_npz(tmp_path / "w.npz", 60, 1, 8, 0, width=12)
    assert main(["partition", "--dataset", wide, "--out", str(tmp_path / "p")]) == 2
    assert "the dataset's images are 8x12; the model needs square images" in one_line(capsys.readouterr().err)
    # a config file's pin is overridden by --set ... =null (back to "from the data")
    cfg = tmp_path / "pinned.yaml"
    cfg.write_text("model: {image_size: 8, channels: 1}\n")
    assert main(["partition", "--config", str(cfg), "--dataset", unlabeled, "--out", str(tmp_path / "p")]) == 2
    assert "model.image_size 8 contradicts" in one_line(capsys.readouterr().err)
    assert main(["partition", "--config", str(cfg), "--dataset", unlabeled, "--set", "model.image_size=null",
                 "--out", str(tmp_path / "p")]) == 0
    assert Plan.load(tmp_path / "p").cfg.model.image_size == 16


# ------------------------------------------------------------------------------------------------ --set


def test_parse_set_types_values_like_the_yaml():
    assert parse_set("train.steps=7") == ("train.steps", 7)
    assert parse_set("train.lr=0.5") == ("train.lr", 0.5)
    assert parse_set("train.lr=1e-3") == ("train.lr", 0.001)  # YAML 1.1 would read a string
    assert parse_set("train.lr=2") == ("train.lr", 2.0) and isinstance(parse_set("train.lr=2")[1], float)
    assert parse_set("train.bf16=false") == ("train.bf16", False)
    assert parse_set("train.betas=[0.8, 0.9]") == ("train.betas", (0.8, 0.9))
    assert parse_set("sample.solver=euler") == ("sample.solver", "euler")
    assert parse_set("model.image_size=null") == ("model.image_size", None)
    assert parse_set("data.dataset=npz:/data/x.npz") == ("data.dataset", "npz:/data/x.npz")
    assert parse_set("swarm.trusted_keys=[]") == ("swarm.trusted_keys", [])
    for text, needle in [("train", "expected SECTION.KEY=VALUE"), ("train.steps", "expected SECTION.KEY=VALUE"),
                         ("=3", "expected SECTION.KEY=VALUE"), ("train.steps=1.5", "train.steps must be an integer"),
                         ("train.steps=null", "train.steps must be an integer"),
                         ("sample.solver=rk4", "sample.solver must be 'euler' or 'heun'"),
                         ("train.bf16=yes please", "train.bf16 must be true or false"),
                         ("train.stepz=1", "unknown key 'stepz' in train"), ("trian.steps=1", "unknown section 'trian'"),
                         ("train.betas=[1", "invalid value")]:
        with pytest.raises(DDMError, match="^--set ") as err:
            parse_set(text)
        assert needle in str(err.value), (text, str(err.value))


def test_set_applies_last_and_is_validated_with_the_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {steps: 5, lr: 0.1}\n")
    got = load_config(cfg, {"train.steps": 7}, ["train.steps=9", "partition.experts=3"])
    assert (got.train.steps, got.train.lr, got.partition.experts) == (9, 0.1, 3)
    with pytest.raises(DDMError, match=r"with --set: swarm.settle must be in \[0, lease_ttl\)"):
        load_config(cfg, sets=["swarm.settle=100"])  # ranges across fields are checked on the whole config


def test_partition_records_set_values_in_the_plan(tmp_path, capsys):
    assert main(["partition", "--set", "train.steps=11", "--set", "partition.experts=3", "--set", "model.size=small",
                 "--out", str(tmp_path / "plan")]) == 0
    cfg = Plan.load(tmp_path / "plan").cfg
    assert (cfg.train.steps, cfg.partition.experts, cfg.model.size) == (11, 3, "small")


def test_start_set_changes_this_nodes_timing_only(tmp_path, capsys):
    from ddm_node.cli.main import build_parser
    from ddm_node.cli.start import island_options

    assert main(["keygen", "--out", str(tmp_path / "key.pem")]) == 0
    base = ["start", "--plan", str(tmp_path / "plan"), "--work-dir", str(tmp_path / "w"),
            "--identity", str(tmp_path / "key.pem")]
    opts = island_options(build_parser().parse_args([*base, "--set", "swarm.heartbeat=2", "--set",
                                                     "train.nproc_per_node=1"]))
    assert opts.swarm_overrides == {"heartbeat": 2.0} and opts.nproc_per_node == 1
    assert "with --set" in opts.config_source


def test_trainer_refuses_a_model_not_fitted_to_data():
    from ddm_node.core.config import Config
    from ddm_node.train.trainer import Trainer

    with pytest.raises(DDMError, match="model.image_size, channels and num_classes are unset"):
        Trainer(Config().model, Config().train, torch.zeros(4, 1, 8, 8), None, device="cpu")
