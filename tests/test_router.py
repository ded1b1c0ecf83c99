"""Routing mechanics: top-k grouping, subsets, CFG inside experts, the learned router, stats I/O, samplers."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddm_node.core.config import RouterConfig
from ddm_node.core.errors import DDMError
from router.centroid import CentroidRouter, ClusterStats
from router.ensemble import EnsembleVelocity, Expert
from router.learned import LearnedRouter, RouterNet, router_model_config, train_router
from router.sampler import sample

SHAPE = (1, 2, 2)  # tiny "images": D = 4
IDS = [3, 5, 8, 11]  # shard ids need not be contiguous


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """One torch thread for this module (conftest.one_torch_thread)."""


class RecordingExpert:
    """v_k(x, t, y) = (k + 1) x + k + t (+ 0.5 y when labels are given); records every call's batch size."""

    def __init__(self, k: int):
        self.k = k
        self.batches: list[int] = []
        self.labels: list[torch.Tensor | None] = []

    def __call__(self, x, t, y=None):
        self.batches.append(x.shape[0])
        self.labels.append(y)
        v = (self.k + 1) * x + self.k + t.reshape(-1, 1, 1, 1)
        if y is not None:
            v = v + 0.5 * y.reshape(-1, 1, 1, 1).to(x.dtype)
        return v


def _router() -> CentroidRouter:
    g = torch.Generator().manual_seed(0)
    stats = {}
    for i, k in enumerate(IDS):
        stats[k] = ClusterStats(
            count=10 * (i + 1),
            sub_weights=torch.tensor([0.25, 0.75], dtype=torch.float64),
            sub_means=torch.randn(2, 4, generator=g, dtype=torch.float64),
            sub_vars=0.1 + torch.rand(2, 4, generator=g, dtype=torch.float64),
        )
    return CentroidRouter(stats)


def _batch(b: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _experts() -> dict[int, RecordingExpert]:
    return {k: RecordingExpert(k) for k in IDS}


def _expected(x, t, y=None):
    """Each expert's velocity on the whole batch, stacked [K, B, ...] in IDS order (fresh recorders)."""
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    return torch.stack([RecordingExpert(k)(x, tt, y) for k in IDS])


# ---------- ensemble routing ----------


def test_top1_groups_by_expert_and_follows_the_argmax():
    router, experts, x, t = _router(), _experts(), _batch(), 0.4
    ens = EnsembleVelocity(experts, router, routing="top1")
    out = ens(x, t)
    choice = router.log_probs(x, t).argmax(1)
    assert len(set(choice.tolist())) >= 2, "the check needs several experts in play"
    want = _expected(x, t)[choice, torch.arange(x.shape[0])]
    assert torch.equal(out, want)
    for i, k in enumerate(IDS):
        n = int((choice == i).sum())
        assert experts[k].batches == ([n] if n else [])  # at most one call, on exactly its samples
    assert ens.expert_samples == x.shape[0] and ens.router_calls == 1
    assert ens.expert_calls == len(set(choice.tolist()))


def test_top2_is_the_renormalized_two_expert_mix():
    router, experts, x, t = _router(), _experts(), _batch(), 0.6
    ens = EnsembleVelocity(experts, router, routing="top2")
    out = ens(x, t)
    p = router.log_probs(x, t).exp()
    top_p, top_i = p.topk(2, dim=1)
    w = top_p / top_p.sum(1, keepdim=True)
    v = _expected(x, t)
    rows = torch.arange(x.shape[0])
    want = w[:, :1, None, None] * v[top_i[:, 0], rows] + w[:, 1:, None, None] * v[top_i[:, 1], rows]
    assert torch.allclose(out, want, atol=1e-12)
    assert all(len(e.batches) <= 1 for e in experts.values())
    assert ens.expert_samples == 2 * x.shape[0]
    # "topk" with top_k=2 is the same thing
    assert torch.allclose(EnsembleVelocity(_experts(), router, routing="topk", top_k=2)(x, t), out, atol=1e-12)


def test_full_is_the_weighted_sum_and_topk_with_all_experts_equals_it():
    router, x, t = _router(), _batch(), torch.full((64,), 0.5, dtype=torch.float64)
    full = EnsembleVelocity(_experts(), router, routing="full")(x, t)
    p = router.log_probs(x, t).exp()
    want = (p.T[:, :, None, None, None] * _expected(x, 0.5)).sum(0)
    assert torch.allclose(full, want, atol=1e-12)
    topk = EnsembleVelocity(_experts(), router, routing="topk", top_k=10)(x, t)  # clamped to 4
    assert torch.allclose(topk, full, atol=1e-12)


def test_full_with_one_expert_is_that_expert():
    x = _batch()
    for routing in ("full", "top1", "top2"):
        ens = EnsembleVelocity({5: RecordingExpert(5)}, _router(), routing=routing)
        assert ens.router.experts == [5]
        assert torch.equal(ens(x, 0.3), _expected(x, 0.3)[IDS.index(5)])


def test_per_sample_times_and_labels_reach_the_chosen_expert():
    router, experts, x = _router(), _experts(), _batch(16)
    t = torch.linspace(0.1, 0.9, 16, dtype=torch.float64)
    y = torch.arange(16) % 3
    out = EnsembleVelocity(experts, router, routing="top1")(x, t, y)
    choice = router.log_probs(x, t).argmax(1)
    for b in range(16):
        k = IDS[int(choice[b])]
        want = RecordingExpert(k)(x[b : b + 1], t[b : b + 1], y[b : b + 1])
        assert torch.equal(out[b : b + 1], want)


def test_subset_renormalizes_over_present_experts():
    router, x, t = _router(), _batch(), 0.35
    lp = router.log_probs(x, t)
    sub = router.subset([11, 3])
    assert sub.experts == [3, 11]
    cols = [IDS.index(3), IDS.index(11)]
    want = lp[:, cols] - torch.logsumexp(lp[:, cols], dim=1, keepdim=True)
    assert torch.allclose(sub.log_probs(x, t), want, atol=1e-12)
    # an ensemble with missing experts uses exactly that subset
    ens = EnsembleVelocity({3: RecordingExpert(3), 11: RecordingExpert(11)}, router, routing="full")
    p = want.exp()
    v = _expected(x, t)
    assert torch.allclose(ens(x, t), p[:, :1, None, None] * v[cols[0]] + p[:, 1:, None, None] * v[cols[1]], atol=1e-12)
    with pytest.raises(DDMError, match="no expert 4"):
        router.subset([3, 4])
    with pytest.raises(DDMError, match="not known to the router"):
        EnsembleVelocity({4: RecordingExpert(4)}, router)
    with pytest.raises(DDMError, match="routing"):
        EnsembleVelocity({3: RecordingExpert(3)}, router, routing="top3")


def test_centroid_router_rejects_bad_input():
    router = _router()
    with pytest.raises(DDMError, match="values per sample"):
        router.log_probs(torch.zeros(2, 5, dtype=torch.float64), 0.5)
    with pytest.raises(DDMError, match="t must be"):
        router.log_probs(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(DDMError, match="at least one"):
        CentroidRouter({})
    probs = router.log_probs(torch.zeros(3, 4, dtype=torch.float32), 1.0)
    assert probs.dtype == torch.float32
    # at t = 1 every cluster looks the same: the posterior is the count prior
    assert torch.allclose(probs.exp(), torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(3, 4), atol=1e-6)


# ---------- classifier-free guidance inside the expert ----------


class LabelledModel:
    """v(x, t, y) = x * (y + 1) + t: any y-dependence will do; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        return x * (y.to(x.dtype) + 1).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1)


def test_cfg_math():
    x, t, nc = _batch(6), 0.25, 4
    y = torch.tensor([0, 1, 2, 3, 4, 2])  # 4 is the null class
    raw = LabelledModel()
    tt = torch.full((6,), t, dtype=torch.float64)
    v_c = raw(x, tt, y)
    v_u = raw(x, tt, torch.full((6,), nc))
    m = LabelledModel()
    assert torch.equal(Expert(m, nc, cfg_scale=1.0)(x, t, y), v_c)
    assert torch.equal(Expert(m, nc, cfg_scale=3.0)(x, t, None), v_u)
    m.calls = 0
    guided = Expert(m, nc, cfg_scale=3.0)
    got = guided(x, t, y)
    assert m.calls == 1  # conditional and unconditional passes batched together
    assert guided.forward_samples == 6 + 5  # the null-labelled sample is not doubled
    assert torch.allclose(got, v_u + 3.0 * (v_c - v_u), atol=1e-12)
    assert torch.equal(got[4], v_u[4])  # a null-labelled sample stays unconditional
    all_null = torch.full((6,), nc)
    assert torch.equal(Expert(m, nc, cfg_scale=3.0)(x, t, all_null), v_u)
    assert torch.equal(Expert(m, 0, cfg_scale=3.0)(x, t, y), raw(x, tt, torch.zeros(6, dtype=torch.long)))


# ---------- learned router ----------


def _toy_clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8x8 images: cluster 0 bright on top, cluster 1 bright at the bottom; random class labels."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(2, (n,), generator=g)
    top = torch.where(cluster[:, None, None, None] == 0, 0.7, -0.7)
    img = torch.cat([top.expand(n, 1, 4, 8), -top.expand(n, 1, 4, 8)], dim=2)
    img = (img + 0.2 * torch.randn(n, 1, 8, 8, generator=g)).clamp(-1, 1)
    return img, cluster * 7 + 2, torch.randint(3, (n,), generator=g)  # shard ids 2 and 9


def test_learned_router_learns_the_clusters():
    x, cluster, y = _toy_clusters(256, seed=0)
    cfg = RouterConfig(steps=80, batch_size=32, lr=2e-3, size="router", seed=0)
    router = train_router(x, cluster, y, 3, 8, 1, [2, 9], cfg)
    assert router.experts == [2, 9]
    xt_, ct, yt = _toy_clusters(200, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        xt = 0.9 * xt_ + 0.1 * torch.randn(xt_.shape, generator=g)
        for labels in (yt, None):
            pred = torch.tensor(router.experts)[router.log_probs(xt, 0.1, labels).argmax(1)]
            assert (pred == ct).float().mean() > 0.95
        sub = router.subset([9])
        assert torch.allclose(sub.log_probs(xt, 0.1), torch.zeros(200, 1))


def test_learned_router_is_deterministic():
    x, cluster, y = _toy_clusters(64, seed=0)
    cfg = RouterConfig(steps=3, batch_size=8, size="router", seed=5)
    losses: list[float] = []
    a = train_router(x, cluster, y, 3, 8, 1, [2, 9], cfg, on_step=lambda s, loss: losses.append(loss))
    b = train_router(x, cluster, y, 3, 8, 1, [2, 9], cfg)
    c = train_router(x, cluster, y, 3, 8, 1, [2, 9], RouterConfig(steps=3, batch_size=8, size="router", seed=6))
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_learned_router_subset_and_bad_input():
    net = RouterNet(router_model_config(RouterConfig(size="router"), 8, 1, 3), 3)
    with torch.no_grad():
        net.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    router = LearnedRouter(net, [4, 1, 7])  # logits ordered as given
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        lp = router.log_probs(x, 0.5)
        sub = router.subset([7, 4])
        assert sub.experts == [4, 7]
        want = lp[:, [0, 2]] - torch.logsumexp(lp[:, [0, 2]], dim=1, keepdim=True)
        assert torch.allclose(sub.log_probs(x, 0.5), want, atol=1e-6)
    with pytest.raises(DDMError, match="no expert 2"):
        router.subset([2])
    with pytest.raises(DDMError, match="outputs"):
        LearnedRouter(net, [1, 2])
    xs, cl, ys = _toy_clusters(8, seed=0)
    cfg = RouterConfig(steps=1, batch_size=4, size="router")
    with pytest.raises(DDMError, match="not one of the experts"):
        train_router(xs, cl, ys, 3, 8, 1, [2, 3], cfg)
    with pytest.raises(DDMError, match="router data must be"):
        train_router(xs, cl, ys, 3, 16, 1, [2, 9], cfg)


# ---------- cluster statistics ----------


def test_cluster_stats_from_data_and_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(160, 1, 3, 3, generator=g) * 0.3 - 0.5,
                   torch.randn(240, 1, 3, 3, generator=g) * 0.2 + 0.5])
    one = ClusterStats.from_data(x)
    flat = x.reshape(400, -1).double()
    assert one.count == 400 and one.sub_means.shape == (1, 9) and one.calib_t is None  # one component: no fit
    assert torch.allclose(one.mean, flat.mean(0)) and torch.allclose(one.var, flat.var(0, unbiased=False))
    three = ClusterStats.from_data(x, sub_centroids=3, seed=0)
    assert three.sub_means.shape == (3, 9) and abs(float(three.sub_weights.sum()) - 1) < 1e-12
    assert three.calib_temp.shape == three.calib_t.shape == (10,)
    # the mixture's moments are the data's moments (law of total variance; no variance hit the floor here)
    assert torch.allclose(three.mean, flat.mean(0)) and torch.allclose(three.var, flat.var(0, unbiased=False))
    assert torch.equal(ClusterStats.from_data(x, 3, seed=0).sub_means, three.sub_means)
    back = ClusterStats.from_tensors(st_load(st_save(three.to_tensors())))
    assert back.count == 400
    for name in ("sub_weights", "sub_means", "sub_vars", "calib_t", "calib_temp"):
        assert torch.equal(getattr(back, name), getattr(three, name))
    # at least 50 samples per component: 120 samples allow 2 of the 3 asked for
    assert ClusterStats.from_data(x[:120], sub_centroids=3).sub_means.shape == (2, 9)
    constant = ClusterStats.from_data(torch.zeros(5, 4))
    assert torch.all(constant.sub_vars >= 1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("sub_vars"), "missing tensor 'sub_vars'"),
        (lambda d: d.update(extra=torch.zeros(1)), "unknown tensor 'extra'"),
        (lambda d: d.update(sub_means=d["sub_means"][0]), "'sub_means' must have shape"),
        (lambda d: d.update(sub_vars=d["sub_vars"][:, :3]), "'sub_vars' must have shape"),
        (lambda d: d.update(sub_weights=torch.tensor([0.5, 0.2], dtype=torch.float64)), "sum to 1"),
        (lambda d: d.update(sub_means=d["sub_means"].clone().fill_(float("nan"))), "NaN"),
        (lambda d: d.update(sub_vars=-d["sub_vars"]), "must be > 0"),
        (lambda d: d.update(count=torch.tensor([1.5])), "'count' must be one integer"),
        (lambda d: d.update(count=torch.tensor([0])), "count must be an integer >= 1"),
        (lambda d: d.update(mean=torch.zeros(2)), "'mean' must have shape"),
    ],
)
def test_cluster_stats_rejects_bad_tensors(change, message):
    d = ClusterStats.from_data(torch.randn(100, 4, generator=torch.Generator().manual_seed(0)), 2).to_tensors()
    change(d)
    with pytest.raises(DDMError, match=message):
        ClusterStats.from_tensors(d)


def _labelled_clusters():
    """Three clusters of 4-pixel images with known class histograms (labels drawn independently of x)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 4, generator=g) * 0.3 + m for n, m in ((50, -0.6), (30, 0.0), (20, 0.6))]
    hist = [(40, 10, 0), (0, 15, 15), (5, 0, 15)]  # per cluster: counts of classes 0, 1, 2
    ys = [torch.tensor([c for c, n in enumerate(h) for _ in range(n)]) for h in hist]
    return {k: ClusterStats.from_data(x, y=y, num_classes=3) for k, (x, y) in enumerate(zip(xs, ys))}, hist


def test_class_aware_centroid_router_is_bayes_with_the_class_histogram():
    stats, hist = _labelled_clusters()
    r = CentroidRouter(stats)
    assert r.class_aware and ClusterStats.from_tensors(st_load(st_save(stats[1].to_tensors()))).class_counts.tolist() \
        == [0.0, 15.0, 15.0]
    assert stats[1].sub_classes.tolist() == [1, 2]  # one component per class the cluster holds
    plain = CentroidRouter({k: ClusterStats.from_data(torch.zeros(1, 4) + k, 1) for k in range(2)})
    assert not plain.class_aware
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9, 0.99])
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    smoothed = torch.tensor(hist, dtype=torch.float64) + 0.5
    log_py_k = (smoothed / smoothed.sum(1, keepdim=True)).log()  # [K, C]
    # statistics from before per-class components (no sub_classes, no temperature) still load and route the old
    # way: x_t and y taken as independent given k
    old = {k: ClusterStats.from_tensors(s.merged().to_tensors()) for k, s in stats.items()}
    before = CentroidRouter(old)
    assert before.class_aware and not before.calibrated
    expect = before.log_probs(x, t).double() + log_py_k[:, y].T
    expect = expect - torch.logsumexp(expect, 1, keepdim=True)
    assert torch.allclose(before.log_probs(x, t, y).double(), expect, atol=1e-6)
    # near t = 1 the pixels say nothing: the posterior is p(k | y), e.g. class 0 is never routed to cluster 1
    for router in (r, before):
        far = router.log_probs(torch.randn(1, 4), 1.0 - 1e-6, torch.tensor([0])).exp()[0]
        assert float(far[1]) < 0.02 and float(far[0]) > 0.85
        # the null class (index C) and no labels are the unconditional posterior
        assert torch.allclose(router.log_probs(x, t, torch.full((6,), 3)), router.log_probs(x, t))
        assert torch.allclose(router.subset([0, 2]).log_probs(x, t, y).exp().sum(1), torch.ones(6, dtype=torch.float32))


def test_class_histograms_must_all_be_there_and_agree():
    stats, _ = _labelled_clusters()
    stats[2] = ClusterStats.from_data(torch.zeros(3, 4))  # no histogram: routing falls back to pixels only
    assert not CentroidRouter(stats).class_aware
    with pytest.raises(DDMError, match="y has 2 labels for 3 samples"):
        CentroidRouter(_labelled_clusters()[0]).log_probs(torch.zeros(3, 4), 0.5, torch.tensor([0, 1]))
    with pytest.raises(DDMError, match=r"cluster labels must be 2 integers in \[0, 3\)"):
        ClusterStats.from_data(torch.zeros(2, 4), y=torch.tensor([0, 3]), num_classes=3)


@pytest.mark.parametrize(
    "counts, message",
    [
        (torch.tensor([10.0, 9.0]), "sum to 19, not the count 20"),
        (torch.tensor([21.0, -1.0]), "whole numbers >= 0"),
        (torch.tensor([10.5, 9.5]), "whole numbers >= 0"),
        (torch.tensor([[20.0]]), "shape \\(C,\\)"),
        (torch.tensor([float("nan"), 20.0]), "whole numbers >= 0"),
    ],
)
def test_cluster_stats_rejects_bad_class_counts(counts, message):
    d = ClusterStats.from_data(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), 1).to_tensors()
    d["class_counts"] = counts.double()
    with pytest.raises(DDMError, match=message):
        ClusterStats.from_tensors(d)


# ---------- samplers ----------


def test_euler_and_heun_on_a_linear_field():
    """dx/dt = a x from t = 1 to 0: x(0) = x(1) exp(-a); the discrete solutions are known exactly too."""
    a, n = 1.3, 20
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    exact = x1 * math.exp(-a)
    h = -1.0 / n
    field = lambda x, t, y: a * x  # noqa: E731
    euler = sample(field, x1, n, solver="euler")
    heun = sample(field, x1, n, solver="heun")
    assert torch.allclose(euler, x1 * (1 + a * h) ** n, rtol=1e-12)
    assert torch.allclose(heun, x1 * (1 + a * h + (a * h) ** 2 / 2) ** n, rtol=1e-12)
    err_e, err_h = (euler - exact).abs().max(), (heun - exact).abs().max()
    assert err_h < err_e / 10
    # orders: halving the step halves Euler's error and quarters Heun's
    err_e2 = (sample(field, x1, 2 * n, solver="euler") - exact).abs().max()
    err_h2 = (sample(field, x1, 2 * n, solver="heun") - exact).abs().max()
    assert 1.8 < err_e / err_e2 < 2.2 and 3.6 < err_h / err_h2 < 4.4


def test_sampler_time_grid_labels_and_errors():
    seen: list[tuple[torch.Tensor, object]] = []

    def field(x, t, y):
        seen.append((t.clone(), y))
        return torch.ones_like(x) * t.reshape(-1, 1)  # dx/dt = t: x(t_end) = x(1) - (1 - t_end^2) / 2

    x1 = torch.zeros(3, 2)
    y = torch.tensor([0, 1, 2])
    out = sample(field, x1, 4, solver="heun", y=y, t_end=0.2)
    assert torch.allclose(out, torch.full((3, 2), -(1 - 0.04) / 2))  # the trapezoid rule is exact here
    assert len(seen) == 8 and seen[0][0].shape == (3,) and seen[0][1] is y
    assert torch.allclose(torch.stack([s[0][0] for s in seen[::2]]), torch.tensor([1.0, 0.8, 0.6, 0.4]))
    with pytest.raises(DDMError, match="solver"):
        sample(field, x1, 4, solver="rk4")
    with pytest.raises(DDMError, match="steps"):
        sample(field, x1, 0)
    with pytest.raises(DDMError, match="t_end"):
        sample(field, x1, 4, t_end=1.0)


def test_top1_sampling_cost_is_one_expert_pass_per_sample():
    router, experts = _router(), _experts()
    ens = EnsembleVelocity(experts, router, routing="top1")
    out = sample(ens, _batch(32), steps=5, solver="heun")
    assert torch.isfinite(out).all()
    assert ens.expert_samples == 2 * 5 * 32 and ens.router_calls == 10
    assert all(len(e.batches) <= 10 for e in experts.values())
