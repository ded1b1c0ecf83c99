"""The core claim: the router-weighted ensemble of per-cluster flows is the marginal flow, exactly.

A Gaussian mixture stands in for a clustered dataset; every per-cluster velocity is known in closed
form, so the ensemble (CentroidRouter + EnsembleVelocity, routing "full") can be compared with a reference
computed here independently: scipy densities, Bayes' rule, and generic linear-Gaussian conditioning.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from ddm_node.core.objective import EDGE
from router.centroid import CentroidRouter, ClusterStats
from router.ensemble import EnsembleVelocity, Expert
from router.sampler import sample

D, K = 6, 4
WEIGHTS = np.array([0.1, 0.2, 0.3, 0.4])
TIMES = (0.05, 0.3, 0.7, 0.95)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """One torch thread for this module (conftest.one_torch_thread)."""


def _mixture():
    rng = np.random.default_rng(7)
    means = rng.uniform(-1.5, 1.5, size=(K, D))
    variances = rng.uniform(0.05, 0.6, size=(K, D))
    return means, variances


MEANS, VARS = _mixture()


# ---------- independent reference (numpy / scipy, float64) ----------


def ref_log_density(x: np.ndarray, t: float, mu: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """log density of x_t under component (mu, s2) via scipy: N((1-t) mu, (1-t)^2 diag(s2) + t^2 I)."""
    cov = np.diag((1 - t) ** 2 * s2 + t**2)
    return multivariate_normal(mean=(1 - t) * mu, cov=cov).logpdf(x)


def ref_posterior(x: np.ndarray, t: float, comps: list[int], weights: np.ndarray) -> np.ndarray:
    """p(component | x_t) by Bayes' rule over `comps` with prior `weights` (renormalized)."""
    w = weights / weights.sum()
    logj = np.stack([np.log(w[i]) + ref_log_density(x, t, MEANS[c], VARS[c]) for i, c in enumerate(comps)], axis=1)
    logj -= logj.max(axis=1, keepdims=True)
    p = np.exp(logj)
    return p / p.sum(axis=1, keepdims=True)


def ref_velocity_conditioning(x: np.ndarray, t: float, mu: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """E[eps - x0 | x_t = x] for x0 ~ N(mu, diag s2) by generic linear-Gaussian conditioning on z = (x0, eps)."""
    m_z = np.concatenate([mu, np.zeros(D)])
    cov_z = np.diag(np.concatenate([s2, np.ones(D)]))
    a = np.concatenate([(1 - t) * np.eye(D), t * np.eye(D)], axis=1)  # x_t = A z
    gain = cov_z @ a.T @ np.linalg.inv(a @ cov_z @ a.T)
    ez = m_z[None] + (x - (a @ m_z)[None]) @ gain.T  # [B, 2D]
    return ez[:, D:] - ez[:, :D]


def ref_velocity_score(x: np.ndarray, t: float, mu: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """Same velocity via the score: v = -(x + t grad log p_t(x)) / (1 - t), from Tweedie E[eps | x_t] = -t * score."""
    s = (1 - t) ** 2 * s2 + t**2
    score = -(x - (1 - t) * mu) / s
    return -(x + t * score) / (1 - t)


def ref_marginal_velocity(x: np.ndarray, t: float, comps: list[int], weights: np.ndarray) -> np.ndarray:
    post = ref_posterior(x, t, comps, weights)
    vs = np.stack([ref_velocity_conditioning(x, t, MEANS[c], VARS[c]) for c in comps], axis=1)
    return (post[:, :, None] * vs).sum(axis=1)


def ref_marginal_velocity_score(x: np.ndarray, t: float, comps: list[int], weights: np.ndarray) -> np.ndarray:
    """Marginal velocity from the mixture's own score (closed form), no per-component velocities involved."""
    post = ref_posterior(x, t, comps, weights)
    scores = np.stack([-(x - (1 - t) * MEANS[c]) / ((1 - t) ** 2 * VARS[c] + t**2) for c in comps], axis=1)
    score = (post[:, :, None] * scores).sum(axis=1)
    return -(x + t * score) / (1 - t)


# ---------- the system under test: analytic experts + CentroidRouter + EnsembleVelocity ----------


def analytic_expert(c: int, objective: str = "velocity"):
    """The exact prediction of component c under `objective`, in torch (diagonal closed form, written separately from
    the reference): E[eps - x0 | x_t] (velocity), E[eps | x_t] (epsilon) or E[x0 | x_t] (x0)."""
    mu = torch.tensor(MEANS[c])
    s2 = torch.tensor(VARS[c])

    def v(x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        tt = t.reshape(-1, 1).to(x.dtype)
        s = (1 - tt) ** 2 * s2 + tt**2
        r = x - (1 - tt) * mu
        e_eps = tt / s * r
        e_x0 = mu + (1 - tt) * s2 / s * r
        return {"velocity": e_eps - e_x0, "epsilon": e_eps, "x0": e_x0}[objective]

    return v


# A mixed ensemble (heterogeneous DDM): the experts predict different things; the ensemble weights velocities.
MIXED = ("epsilon", "x0", "velocity", "epsilon")


def mixed_experts(convert: bool = True) -> dict[int, Expert]:
    """Component c's analytic expert predicting MIXED[c], wrapped as the bundle wraps it (no conversion: `convert`
    False, what an ensemble that ignored the objectives would weight)."""
    return {c: Expert(analytic_expert(c, MIXED[c]), 0, objective=MIXED[c] if convert else "velocity")
            for c in range(K)}


def exact_stats(c: int, scale: int = 1000) -> ClusterStats:
    return ClusterStats(
        count=int(round(WEIGHTS[c] * scale)),
        sub_weights=torch.ones(1, dtype=torch.float64),
        sub_means=torch.tensor(MEANS[c])[None],
        sub_vars=torch.tensor(VARS[c])[None],
    )


def points(n: int = 64, seed: int = 0) -> np.ndarray:
    """Evaluation points spread over and around the mixture."""
    return np.random.default_rng(seed).normal(0.0, 1.5, size=(n, D))


def test_reference_closed_forms_agree():
    """The two independent per-component derivations and the two marginal derivations agree."""
    x = points()
    for t in TIMES:
        for c in range(K):
            a = ref_velocity_conditioning(x, t, MEANS[c], VARS[c])
            b = ref_velocity_score(x, t, MEANS[c], VARS[c])
            assert np.abs(a - b).max() < 1e-9
        a = ref_marginal_velocity(x, t, list(range(K)), WEIGHTS)
        b = ref_marginal_velocity_score(x, t, list(range(K)), WEIGHTS)
        assert np.abs(a - b).max() < 1e-9


def test_analytic_expert_matches_reference():
    x = points()
    for t in TIMES:
        for c in range(K):
            got = analytic_expert(c)(torch.tensor(x), torch.full((len(x),), t, dtype=torch.float64)).numpy()
            assert np.abs(got - ref_velocity_conditioning(x, t, MEANS[c], VARS[c])).max() < 1e-10


@pytest.mark.parametrize("t", TIMES)
def test_centroid_posterior_is_exact(t):
    router = CentroidRouter({c: exact_stats(c) for c in range(K)})
    x = points()
    got = router.log_probs(torch.tensor(x), t).exp().numpy()
    want = ref_posterior(x, t, list(range(K)), WEIGHTS)
    assert np.abs(got - want).max() < 1e-6
    # the posterior is far from trivial here, or the check would prove little
    assert want.max(axis=1).min() < 0.99 or t < 0.1


@pytest.mark.parametrize("t", TIMES)
def test_full_ensemble_is_the_marginal_velocity(t):
    router = CentroidRouter({c: exact_stats(c) for c in range(K)})
    ens = EnsembleVelocity({c: analytic_expert(c) for c in range(K)}, router, routing="full")
    x = points()
    got = ens(torch.tensor(x), t).numpy()
    want = ref_marginal_velocity(x, t, list(range(K)), WEIGHTS)
    assert np.abs(got - want).max() < 1e-5
    # the prior weights matter: an equal-weight mixture is measurably different
    uniform = ref_marginal_velocity(x, t, list(range(K)), np.ones(K))
    assert np.abs(uniform - want).max() > 1e-2
    assert ens.expert_calls == K and ens.router_calls == 1


@pytest.mark.parametrize("t", TIMES)
def test_mixed_objective_ensemble_is_the_marginal_velocity(t):
    """Experts that predict the noise, the data and the velocity, converted to velocity before the router weights
    them: still the exact marginal flow. Weighting their raw outputs is far from it."""
    router = CentroidRouter({c: exact_stats(c) for c in range(K)})
    x = points(seed=4)
    want = ref_marginal_velocity(x, t, list(range(K)), WEIGHTS)
    got = EnsembleVelocity(mixed_experts(), router, routing="full")(torch.tensor(x), t).numpy()
    assert np.abs(got - want).max() < 1e-5
    raw = EnsembleVelocity(mixed_experts(convert=False), router, routing="full")(torch.tensor(x), t).numpy()
    assert np.abs(raw - want).max() > 1e-1
    # top-1 routing follows the same argmax whatever the experts predict, and returns a velocity
    top1 = EnsembleVelocity(mixed_experts(), router, routing="top1")(torch.tensor(x), t).numpy()
    pick = ref_posterior(x, t, list(range(K)), WEIGHTS).argmax(1)
    own = np.stack([ref_velocity_conditioning(x, t, MEANS[c], VARS[c]) for c in range(K)], axis=1)
    assert np.abs(top1 - own[np.arange(len(x)), pick]).max() < 1e-5


def test_mixed_objectives_at_the_singular_ends_are_finite_and_bounded():
    """Epsilon at t = 1 and x0 at t = 0 carry no velocity; the conversion divides by at least EDGE there, so the
    ensemble stays finite (and exact again once t is EDGE away from the end)."""
    router = CentroidRouter({c: exact_stats(c) for c in range(K)})
    ens = EnsembleVelocity(mixed_experts(), router, routing="full")
    x = torch.tensor(points(seed=9))
    for t in (0.0, 1.0):
        assert torch.isfinite(ens(x, t)).all()
    for t in (EDGE, 1 - EDGE):
        want = ref_marginal_velocity(x.numpy(), t, list(range(K)), WEIGHTS)
        assert np.abs(ens(x, t).numpy() - want).max() < 1e-5


@pytest.mark.parametrize("t", TIMES)
def test_missing_experts_give_the_marginal_of_the_rest(t):
    """Experts {0, 2} only: the router renormalizes, giving the flow of the mixture of components 0 and 2."""
    router = CentroidRouter({c: exact_stats(c) for c in range(K)})
    ens = EnsembleVelocity({0: analytic_expert(0), 2: analytic_expert(2)}, router, routing="full")
    assert ens.router.experts == [0, 2]
    x = points(seed=3)
    got = ens(torch.tensor(x), torch.full((len(x),), t, dtype=torch.float64)).numpy()
    want = ref_marginal_velocity(x, t, [0, 2], WEIGHTS[[0, 2]])
    assert np.abs(got - want).max() < 1e-5
    full = ref_marginal_velocity(x, t, list(range(K)), WEIGHTS)
    assert np.abs(full - want).max() > 1e-2


def _two_component_cluster() -> ClusterStats:
    """Components 0 and 1 as one cluster with J = 2 sub-centroids."""
    w = WEIGHTS[[0, 1]]
    return ClusterStats(
        count=int(round(w.sum() * 1000)),
        sub_weights=torch.tensor(w / w.sum()),
        sub_means=torch.tensor(MEANS[[0, 1]]),
        sub_vars=torch.tensor(VARS[[0, 1]]),
    )


@pytest.mark.parametrize("t", TIMES)
def test_sub_centroid_cluster_posterior_is_exact(t):
    stats = {10: _two_component_cluster(), 20: exact_stats(2), 30: exact_stats(3)}
    router = CentroidRouter(stats)
    x = points(seed=5)
    got = router.log_probs(torch.tensor(x), t).exp().numpy()
    post = ref_posterior(x, t, list(range(K)), WEIGHTS)
    want = np.stack([post[:, 0] + post[:, 1], post[:, 2], post[:, 3]], axis=1)
    assert np.abs(got - want).max() < 1e-6
    # the moment-matched single Gaussian is not exact: sub-centroids carry information
    merged = CentroidRouter(stats, use_sub=False).log_probs(torch.tensor(x), t).exp().numpy()
    assert np.abs(merged - want).max() > 1e-3


def test_sub_centroid_ensemble_is_the_marginal_velocity():
    """A cluster expert that is itself the exact 2-component flow, routed with J = 2 stats: still the marginal."""
    w01 = WEIGHTS[[0, 1]] / WEIGHTS[[0, 1]].sum()
    stats = {10: _two_component_cluster(), 20: exact_stats(2), 30: exact_stats(3)}

    def cluster_expert(x, t, y=None):
        tt = float(t[0])
        want = ref_marginal_velocity(x.numpy(), tt, [0, 1], w01)
        return torch.tensor(want)

    ens = EnsembleVelocity({10: cluster_expert, 20: analytic_expert(2), 30: analytic_expert(3)}, CentroidRouter(stats), "full")
    x = points(seed=6)
    for t in TIMES:
        got = ens(torch.tensor(x), t).numpy()
        assert np.abs(got - ref_marginal_velocity(x, t, list(range(K)), WEIGHTS)).max() < 1e-5


@pytest.mark.parametrize("mixed", [False, True], ids=["velocity", "mixed"])
def test_sampling_the_full_ensemble_reproduces_the_mixture(mixed):
    """Heun, 100 steps, from noise: the samples' moments and component shares match the mixture's (also when the
    experts predict noise, data and velocity: the clamped ends cost nothing measurable)."""
    n = 2000
    router = CentroidRouter({c: exact_stats(c) for c in range(K)})
    experts = mixed_experts() if mixed else {c: analytic_expert(c) for c in range(K)}
    ens = EnsembleVelocity(experts, router, routing="full")
    noise = torch.randn(n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xs = sample(ens, noise, steps=100, solver="heun")
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    second = sum(WEIGHTS[c] * (np.diag(VARS[c]) + np.outer(MEANS[c], MEANS[c])) for c in range(K))
    cov = second - np.outer(mean, mean)
    got = xs.numpy()
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(got.mean(0) - mean) < 5 * se + 1e-3)
    assert np.abs(np.cov(got.T) - cov).max() < 0.12  # Monte-Carlo error of a 2000-sample covariance is about 0.04
    # each component's share: E_x[p(k | x)] at t = 0 equals its weight
    shares = router.log_probs(xs, 0.0).exp().mean(0).numpy()
    assert np.abs(shares - WEIGHTS).max() < 0.03
    assert ens.expert_samples == 2 * 100 * K * n


# ---------- per-(cluster, class) statistics: p(x_t | k, y), not p(x_t | k) ----------

C = 3
CLASS_N = np.array([[300, 100, 0], [50, 250, 200], [150, 150, 300]])  # samples per (cluster, class); (0, 2) empty
_rng = np.random.default_rng(11)
CLASS_MEANS = _rng.uniform(-1.5, 1.5, size=(3, C, D))
CLASS_VARS = _rng.uniform(0.05, 0.6, size=(3, C, D))


def class_stats(k: int, scale: int = 1) -> ClusterStats:
    """Cluster k as one diagonal Gaussian per class it holds, with its class histogram (the published form)."""
    n = CLASS_N[k] * scale
    present = [c for c in range(C) if n[c] > 0]
    return ClusterStats(
        count=int(n.sum()),
        sub_weights=torch.tensor(n[present] / n.sum()),
        sub_means=torch.tensor(CLASS_MEANS[k, present]),
        sub_vars=torch.tensor(CLASS_VARS[k, present]),
        class_counts=torch.tensor(n, dtype=torch.float64),
        sub_classes=torch.tensor(present, dtype=torch.int64),
    )


def ref_class_posterior(x: np.ndarray, t: float, y: int | None, naive: bool = False) -> np.ndarray:
    """p(k | x_t, y) by Bayes' rule over the (cluster, class) Gaussians (scipy): pi_k p(y | k) p(x_t | k, y), with
    p(y | k) add-half smoothed as published; p(x_t | k, y) = p(x_t | k) where the cluster has no sample of y.
    `naive`: p(x_t | k) in place of p(x_t | k, y) everywhere (x_t and y independent given k)."""
    n_k = CLASS_N.sum(1)
    logj = []
    for k in range(3):
        dens = np.stack([ref_log_density(x, t, CLASS_MEANS[k, c], CLASS_VARS[k, c]) for c in range(C)], axis=1)
        with np.errstate(divide="ignore"):
            log_px = np.logaddexp.reduce(dens + np.log(CLASS_N[k] / n_k[k]), axis=1)
        if y is None:
            logj.append(np.log(n_k[k] / n_k.sum()) + log_px)
            continue
        log_py = np.log((CLASS_N[k, y] + 0.5) / (n_k[k] + 0.5 * C))
        own = dens[:, y] if CLASS_N[k, y] > 0 and not naive else log_px
        logj.append(np.log(n_k[k] / n_k.sum()) + log_py + own)
    logj = np.stack(logj, axis=1)
    p = np.exp(logj - logj.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("t", TIMES)
def test_class_aware_posterior_is_exact_per_cluster_and_class(t):
    router = CentroidRouter({k: class_stats(k) for k in range(3)})
    x = points(seed=8)
    assert router.class_aware and not router.calibrated
    for y in range(C):
        got = router.log_probs(torch.tensor(x), t, torch.full((len(x),), y)).exp().numpy()
        want = ref_class_posterior(x, t, y)
        assert np.abs(got - want).max() < 1e-6
        if t < 0.9:  # x_t and y are not independent given k: the naive product is measurably wrong
            assert np.abs(ref_class_posterior(x, t, y, naive=True) - want).max() > 1e-2
    # no label, or the null class: the mixture over every component of each cluster
    uncond = ref_class_posterior(x, t, None)
    assert np.abs(router.log_probs(torch.tensor(x), t).exp().numpy() - uncond).max() < 1e-6
    null = router.log_probs(torch.tensor(x), t, torch.full((len(x),), C)).exp().numpy()
    assert np.abs(null - uncond).max() < 1e-6


def test_class_stats_fitted_on_gaussian_data_give_the_exact_posterior():
    """from_data on samples of the (cluster, class) Gaussians: the fitted router matches the exact posterior up
    to sampling error, and the temperature each cluster fits on its own data stays near 1 (nothing to correct)."""
    g = torch.Generator().manual_seed(3)
    stats = {}
    for k in range(3):
        xs, ys = [], []
        for c in range(C):
            n = int(CLASS_N[k, c]) * 8
            xs.append(torch.tensor(CLASS_MEANS[k, c]) + torch.tensor(CLASS_VARS[k, c]).sqrt()
                      * torch.randn(n, D, generator=g, dtype=torch.float64))
            ys.append(torch.full((n,), c))
        stats[k] = ClusterStats.from_data(torch.cat(xs), 1, seed=0, y=torch.cat(ys), num_classes=C)
        assert stats[k].sub_classes.tolist() == [c for c in range(C) if CLASS_N[k, c] > 0]
        assert float(stats[k].calib_temp.max()) < 1.25, stats[k].calib_temp
    router = CentroidRouter(stats)
    for t in (0.1, 0.5):
        for y in range(C):  # where it matters: noised samples of class y, from every cluster holding y
            x = np.concatenate([CLASS_MEANS[k, y] + np.sqrt(CLASS_VARS[k, y]) * np.random.default_rng(k).normal(
                size=(CLASS_N[k, y] // 5, D)) for k in range(3)])
            x = (1 - t) * x + t * np.random.default_rng(y).normal(size=x.shape)
            got = router.log_probs(torch.tensor(x), t, torch.full((len(x),), y)).exp().numpy()
            diff = np.abs(got - ref_class_posterior(x, t, y))
            assert diff.mean() < 0.01 and diff.max() < 0.25, (t, y, diff.mean(), diff.max())  # sampling error
