"""Cluster statistics (issue 11): the temperature each expert fits on its own data, the per-class components'
file form (old files still load; hostile ones are one-line errors), their size rule, and the learned router's
patch and FLOP share."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddm_node.core.config import Config, ModelConfig, RouterConfig, from_dict, load_config, to_dict
from ddm_node.core.errors import DDMError
from ddm_node.core.model import flops_per_image
from router.centroid import CentroidRouter, ClusterStats
from router.fit import CALIB_TIMES, MIN_COMPONENT_SAMPLES, component_count
from router.learned import RouterNet, router_flops_per_image, router_model_config, router_patch, training_share
from router.stats import max_components


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """One torch thread for this module (conftest.one_torch_thread)."""


def _copied_pixels(copies: int, n: int = 600, seed: int = 0):
    """Two clusters of two classes each in 2 latent dimensions, every dimension repeated `copies` times as pixels:
    a diagonal density counts each piece of evidence `copies` times (what neighbouring pixels do in images)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[[0.0, 0.0], [0.9, 0.0]], [[0.0, 0.9], [0.9, 0.9]]])  # [cluster, class, 2]
    xs, ys, ks = [], [], []
    for k in range(2):
        for c in range(2):
            z = centres[k, c] + 0.35 * torch.randn(n, 2, generator=g)
            xs.append(z.repeat_interleave(copies, dim=1) + 0.01 * torch.randn(n, 2 * copies, generator=g))
            ys.append(torch.full((n,), c))
            ks.append(torch.full((n,), k))
    return torch.cat(xs).double(), torch.cat(ys), torch.cat(ks)


def _gap(router: CentroidRouter, x, y, k, t: float) -> float:
    """Mean confidence minus accuracy of the router's top-1 on x noised at t."""
    xt = (1 - t) * x + t * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    conf, top = router.log_probs(xt, t, y).exp().max(1)
    return float(conf.mean()) - float((top == k).double().mean())


def test_temperature_fit_undoes_counted_twice_evidence():
    """Pixels copied 8 times: each cluster's own-data fit finds T near 8 at low noise and near 1 at high noise, and
    the calibrated router's confidence matches its accuracy where the uncalibrated one is far too sure."""
    x, y, k = _copied_pixels(8)
    stats = {i: ClusterStats.from_data(x[k == i], 1, y=y[k == i], num_classes=2) for i in range(2)}
    temps = stats[0].calib_temp
    assert stats[0].calib_t.tolist() == list(CALIB_TIMES)
    assert 5.0 < float(temps[0]) < 11.0, temps  # t = 0.05: the copies are still nearly equal
    assert float(temps[-1]) < 2.0, temps  # t = 0.95: the noise, independent per pixel, dominates
    calibrated = CentroidRouter(stats)
    plain = CentroidRouter({i: dataclasses.replace(s, calib_t=None, calib_temp=None) for i, s in stats.items()})
    assert calibrated.calibrated and not plain.calibrated
    for t in (0.1, 0.3):  # about 0.09 and 0.025 here
        assert _gap(plain, x, y, k, t) > 0.07
        assert abs(_gap(calibrated, x, y, k, t)) < 0.04
    # without copies there is nothing to correct
    x1, y1, k1 = _copied_pixels(1)
    one = ClusterStats.from_data(x1[k1 == 0], 1, y=y1[k1 == 0], num_classes=2)
    assert float(one.calib_temp.max()) < 1.3, one.calib_temp


def test_router_temperature_is_the_count_weighted_mean_of_the_clusters():
    x, y, k = _copied_pixels(4, n=200)
    a = ClusterStats.from_data(x[k == 0], 1, y=y[k == 0], num_classes=2)
    b = dataclasses.replace(ClusterStats.from_data(x[k == 1][:300], 1, y=y[k == 1][:300], num_classes=2),
                            calib_t=torch.tensor([0.0, 1.0], dtype=torch.float64),
                            calib_temp=torch.tensor([3.0, 1.0], dtype=torch.float64))
    router = CentroidRouter({0: a, 1: b})
    t = torch.tensor([0.05, 0.5], dtype=torch.float64)
    want_b = torch.tensor([2.9, 2.0], dtype=torch.float64)  # linear between (0, 3) and (1, 1)
    want_a = torch.tensor([float(a.calib_temp[0]), float((a.calib_temp[4] + a.calib_temp[5]) / 2)], dtype=torch.float64)
    assert torch.allclose(router.temperature(t), (400 * want_a + 300 * want_b) / 700)
    old = dataclasses.replace(b, calib_t=None, calib_temp=None)  # a cluster without a curve does not count
    assert torch.allclose(CentroidRouter({0: a, 1: old}).temperature(t), want_a)


def test_component_count_and_its_bound():
    assert [component_count(n, 4) for n in (1, 49, 50, 120, 199, 200, 10_000)] == [1, 1, 1, 2, 3, 4, 4]
    g = torch.Generator().manual_seed(0)
    for n, classes in ((130, 3), (400, 2), (1000, 10), (90, 0)):
        x = torch.randn(n, 3, generator=g)
        y = torch.randint(0, classes, (n,), generator=g) if classes else None
        s = ClusterStats.from_data(x, 4, y=y, num_classes=classes, calibrate=False)
        assert s.sub_weights.shape[0] <= max_components(4, classes, n)
        if classes:  # every component is one class's, and each class's components weigh its share
            for c in range(classes):
                share = float(s.sub_weights[s.sub_classes == c].sum())
                assert abs(share - float((y == c).sum()) / n) < 1e-12
    assert MIN_COMPONENT_SAMPLES == 50


def _stats() -> dict[str, torch.Tensor]:
    x, y, k = _copied_pixels(2, n=120)
    return ClusterStats.from_data(x[k == 0], 2, y=y[k == 0], num_classes=3).to_tensors()


def test_stats_with_classes_and_temperature_round_trip_and_old_files_load():
    d = _stats()
    back = ClusterStats.from_tensors(st_load(st_save(d)))
    for name in ("sub_classes", "calib_t", "calib_temp", "class_counts", "sub_means"):
        assert torch.equal(back.to_tensors()[name], d[name])
    old = {n: v for n, v in d.items() if n not in ("sub_classes", "calib_t", "calib_temp")}
    s = ClusterStats.from_tensors(st_load(st_save(old)))  # a file from before issue 11
    assert s.sub_classes is None and s.calib_t is None and CentroidRouter({0: s}).class_aware


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(sub_classes=d["sub_classes"][:1]), "'sub_classes' must be 4 integers"),
    (lambda d: d.update(sub_classes=d["sub_classes"].double()), "'sub_classes' must be integers"),
    (lambda d: d.update(sub_classes=d["sub_classes"] + 5), r"classes in \[0, 3\)"),
    (lambda d: d.update(sub_classes=torch.zeros_like(d["sub_classes"])), "weigh that class's share"),
    (lambda d: d.pop("class_counts"), "'sub_classes' needs 'class_counts'"),
    (lambda d: d.pop("calib_temp"), "come together"),
    (lambda d: d.update(calib_t=d["calib_t"].flip(0)), "must increase within"),
    (lambda d: d.update(calib_temp=d["calib_temp"] * float("nan")), "finite numbers"),
    (lambda d: d.update(calib_temp=d["calib_temp"] * 1e9), r"'calib_temp' must be in \[1, 10000\]"),
    (lambda d: d.update(calib_t=torch.linspace(0, 1, 100, dtype=torch.float64),
                        calib_temp=torch.ones(100, dtype=torch.float64)), "1 to 64 finite numbers"),
    (lambda d: d.update(calib_temp=d["calib_temp"][:3]), "10 times, 'calib_temp' 3 values"),
    (lambda d: d.update(sub_means=d["sub_means"] * 1e12), "means must be within"),
    (lambda d: d.update(sub_vars=d["sub_vars"] * 1e-20), "variances in"),
    (lambda d: d.update({"x" * 5000: torch.zeros(1)}), "unknown tensor 'xxxxxxxx"),
])
def test_hostile_stats_are_one_line_errors(change, message):
    d = _stats()
    assert d["sub_classes"].shape == (4,)  # two classes, two components each
    change(d)
    with pytest.raises(DDMError, match=message) as err:
        ClusterStats.from_tensors(d)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


def test_stats_size_rule_covers_what_an_expert_writes(tmp_path):
    """ArtifactRules' stats limit is at least the stats file of the plan's largest shard, and not wildly more."""
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import make_plan
    from ddm_node.train.limits import MARGIN, ArtifactRules
    from ddm_node.train.router_job import plan_router_data

    plan = make_plan(load_config(overrides={"partition.experts": 2}), load_dataset("digits"))
    x, cluster, y, _ = plan_router_data(plan)
    big = max(range(2), key=lambda i: int((cluster == i).sum()))
    stats = ClusterStats.from_data(x[cluster == big], 4, y=y[cluster == big], num_classes=10)
    size = len(st_save(stats.to_tensors()))
    allowed = ArtifactRules.for_plan(plan).files["stats"]["stats.safetensors"] - MARGIN  # the tensors' share
    assert size <= allowed + 4096 and allowed < 4 * size  # 4 KiB: the file's header (names, shapes)


# ---------- the learned router's patch and FLOP share ----------


def test_router_patch_comes_from_max_patch():
    assert [router_patch(RouterConfig(), s) for s in (8, 28, 32, 7)] == [8, 14, 16, 7]
    assert router_patch(RouterConfig(max_patch=4), 28) == 4 and router_patch(RouterConfig(max_patch=5), 28) == 4
    assert router_patch(RouterConfig(max_patch=0), 28) == 0  # the size's own patch:
    assert router_model_config(RouterConfig(max_patch=0), 28, 1, 10).resolved().patch_size == 4
    net = RouterNet(router_model_config(RouterConfig(), 28, 1, 10), 4)
    assert net.backbone.grid == 2  # four tokens
    with pytest.raises(DDMError, match="router.max_patch must be >= 0"):
        load_config(overrides={"router.max_patch": -1})
    with pytest.raises(DDMError, match="router.max_patch must be >= 0"):
        router_patch(RouterConfig(max_patch=-2), 28)


def test_saved_configs_without_max_patch_keep_the_old_patch():
    """A plan or router artifact written before the field existed means the size's own patch (max_patch 0), so
    its routers still load; a new config gets the default."""
    saved = to_dict(load_config())
    assert saved["router"]["max_patch"] == 16
    del saved["router"]["max_patch"]
    assert from_dict(saved, Config, "plan", saved=True).router.max_patch == 0
    assert from_dict(saved, Config, "config").router.max_patch == 16
    router = dict(saved["router"])
    assert from_dict(router, RouterConfig, "router config.json", saved=True).max_patch == 0


def _counted_flops(net: torch.nn.Module, cfg: ModelConfig) -> float:
    """Forward FLOPs of one image by torch's counter (matmuls; attention is not counted by it on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
    return float(counter.get_total_flops())


@pytest.mark.parametrize("image, patch", [(8, 8), (8, 4), (28, 14), (28, 4)])
def test_router_flop_count_matches_torchs_counter(image, patch):
    cfg = ModelConfig(size="router", image_size=image, channels=1, num_classes=10, patch_size=patch).resolved()
    n = (image // patch) ** 2
    attention = cfg.depth * 4 * n * n * cfg.hidden
    counted = _counted_flops(RouterNet(cfg, 8), cfg) + attention
    assert abs(router_flops_per_image(cfg, 8) / counted - 1) < 0.03


def test_learned_router_is_at_most_five_percent_of_the_training_flops():
    """bench.quality's settings: digits (tiny DiT, patch 2, 8x8, 1600 monolith steps x 64) and Fashion-MNIST (tiny,
    patch 4, 28x28, 2400 x 64), router 800 steps x 128; the ensemble's experts together see the monolith's images."""
    for image, patch, budget in ((8, 2, 1600), (28, 4, 2400)):
        expert = flops_per_image(ModelConfig(size="tiny", image_size=image, channels=1, num_classes=10,
                                             patch_size=patch)) * budget * 64
        for max_patch, low, high in ((16, 0.0, 0.05), (0, 0.10, 1.0)):  # now; the size's own patch (before)
            rcfg = router_model_config(RouterConfig(max_patch=max_patch), image, 1, 10)
            share = training_share(router_flops_per_image(rcfg, 8) * 800 * 128, expert)
            assert low < share < high, (image, max_patch, share)
