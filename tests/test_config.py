"""Config loading: strict keys, typed values, one-line errors naming the field and the file."""

from pathlib import Path

import pytest

from ddm_node.core.config import Config, config_hash, load_config, to_dict
from ddm_node.core.errors import DDMError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.resolved().hidden > 0


@pytest.mark.parametrize("name", ["fashion-mnist.yaml", "mnist.yaml", "latent-b2.yaml", "latent-xl2.yaml"])
def test_paper_settings_in_the_larger_configs(name):
    """Logit-normal t and the power EMA (whose length scales with the run); only 8x8 digits keep uniform t."""
    train = load_config(CONFIGS / name).train
    assert (train.t_sampling, train.ema) == ("logit_normal", "power")


def test_default_yaml_matches_code_defaults():
    assert to_dict(load_config(CONFIGS / "default.yaml")) == to_dict(Config())


def test_overrides_and_int_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n"), {"train.steps": 7, "partition.experts": 3})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.partition.experts == 3


@pytest.mark.parametrize(
    "text, needle",
    [
        ("train:\n  stepz: 3\n", "unknown config key 'train.stepz'"),
        ("trian:\n  steps: 3\n", "unknown config key 'trian'"),
        ("train:\n  steps: three\n", "train.steps must be an integer"),
        ("train:\n  steps: 1.5\n", "train.steps must be an integer"),
        ("train:\n  bf16: 1\n", "train.bf16 must be true or false"),
        ("train:\n  betas: [0.9]\n", "train.betas must be a list of 2"),
        ("train: 5\n", "train must be a mapping"),
        ("train:\n  warmup_fraction: 1.5\n", "train.warmup_fraction must be in [0, 1)"),
        ("train:\n  ema: box\n", "train.ema"),
        ("train:\n  ema_std: 0\n", "train.ema_std must be in (0, 0.28)"),
        ("sample:\n  routing: top3\n", "sample.routing"),
        ("model:\n  size: huge\n", "model.size: unknown size 'huge'"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("train: [\n", "invalid YAML"),
    ],
)
def test_bad_config_is_one_line_naming_field_and_file(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(DDMError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert needle in msg
    assert "\n" not in msg
    if "top level" not in needle and "YAML" not in needle:
        assert str(path) in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(DDMError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_changes_with_values():
    a, b = Config(), Config()
    b.train.steps += 1
    assert config_hash(a) == config_hash(Config()) != config_hash(b)


def test_every_routing_and_router_choice_has_an_implementation():
    from ddm_node.core.config import RouterChoice, Routing, choices
    from ddm_node.ensemble.bundle import ROUTER_KINDS
    from router.ensemble import ROUTINGS

    assert set(ROUTINGS) == set(choices(Routing))
    assert set(ROUTER_KINDS) | {"auto"} == set(choices(RouterChoice))
