"""A cluster's statistics from its own samples: Gaussian components per class, and a calibration temperature.

Components. The samples of each class (all samples when unlabelled) are split by k-means into
min(J, max(1, n // MIN_COMPONENT_SAMPLES)) groups, each summarised by its share, mean and diagonal variance,
and tagged with its class. The cluster's density is the mixture of all its components; its density given
class y is the mixture of the components tagged y. So p(x_t | k, y) is exact when each (cluster, class) is
Gaussian (or such a mixture), rather than p(x_t | k) taken as independent of y.

Temperature. Real images are not diagonal Gaussians: neighbouring pixels move together, so a diagonal
density counts the same evidence many times over and its posteriors are far too sure, more so the more
pixels there are (Fashion-MNIST, t = 0.1: 8% of routings wrong with p > 0.99). The cure is a temperature T(t)
dividing the log densities. Each expert fits it on its own data alone: its components are a classification
problem of the same kind as the router's (which k-means group and class does a noised sample come from), so
at each of CALIB_TIMES it noises its samples and picks the T that minimises the cross-entropy of
softmax_j(log w_j + log N_j(x_t) / T) against each sample's own component. The router divides every
cluster's log density by the sample-count weighted mean of the published T(t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from router.gaussian import component_log_density

MIN_COMPONENT_SAMPLES = 50  # samples per component, at least: fewer give variances too noisy to trust
CALIB_TIMES = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
CALIB_SAMPLES = 2000  # samples (drawn without replacement) the temperature is fitted on, per t ...
CALIB_WORK = 2e9  # ... fewer (down to 200) when samples x components x dimensions would pass this (latents)
TEMP_RANGE = (1.0, 1e4)  # T < 1 would sharpen a density that is already too sure; the fit only loosens it
SLACK_SE = 2.0  # a T counts as worse than the best one when its cross-entropy is this many standard errors above
_SEARCH_STEPS = 40  # golden-section steps on log T: the bracket shrinks to 0.618^40 of its width


@dataclass
class Components:
    """A cluster's mixture: weights [M] (sum 1), means and variances [M, D], classes [M] (None: unlabelled),
    and the component each of the fitted samples belongs to, `labels` [N]."""

    weights: Tensor
    means: Tensor
    variances: Tensor
    classes: Tensor | None
    labels: Tensor


def component_count(n: int, sub_centroids: int) -> int:
    """Components for a group of n samples: up to `sub_centroids`, each with MIN_COMPONENT_SAMPLES or more."""
    return min(sub_centroids, max(1, n // MIN_COMPONENT_SAMPLES))


def fit_components(flat: Tensor, sub_centroids: int, seed: int, var_floor: float,
                   y: Tensor | None = None) -> Components:
    """Components of float64 samples `flat` [N, D]: k-means within each class of `y` [N] (or within all)."""
    groups = [(None, torch.arange(flat.shape[0]))] if y is None else \
        [(int(c), (y == c).nonzero().reshape(-1)) for c in torch.unique(y).tolist()]
    weights, means, variances, classes = [], [], [], []
    labels = torch.empty(flat.shape[0], dtype=torch.long)
    n = flat.shape[0]
    for cls, idx in groups:
        members = flat[idx]
        sub = _kmeans_labels(members, component_count(len(idx), sub_centroids), seed)
        for j in torch.unique(sub).tolist():
            rows = members[sub == j]
            labels[idx[sub == j]] = len(weights)
            weights.append(rows.shape[0] / n)
            means.append(rows.mean(0))
            variances.append(rows.var(0, unbiased=False).clamp_min(var_floor))
            classes.append(-1 if cls is None else cls)
    return Components(torch.tensor(weights, dtype=torch.float64), torch.stack(means), torch.stack(variances),
                      None if y is None else torch.tensor(classes, dtype=torch.int64), labels)


def fit_temperature(flat: Tensor, comps: Components, seed: int) -> Tensor | None:
    """T at each of CALIB_TIMES [G], fitted on the samples `flat` their components came from (see the module
    docstring); None for a single component (nothing to calibrate against)."""
    if comps.weights.shape[0] < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    n = int(min(CALIB_SAMPLES, max(200, CALIB_WORK // comps.means.numel())))
    pick = torch.randperm(flat.shape[0], generator=gen)[:n]
    x0, target = flat[pick], comps.labels[pick]
    log_w = comps.weights.log()
    temps = []
    for t in CALIB_TIMES:
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        tt = torch.full((x0.shape[0],), t, dtype=torch.float64)
        dens = component_log_density((1 - t) * x0 + t * eps, tt, comps.means, comps.variances)
        temps.append(_best_temperature(dens, log_w, target))
    return torch.tensor(temps, dtype=torch.float64)


def _best_temperature(dens: Tensor, log_w: Tensor, target: Tensor) -> float:
    """The least T in TEMP_RANGE whose cross-entropy of softmax(log_w + dens / T) against `target` is within two
    standard errors of the least one: no correction the samples do not clearly ask for (at high t the pixels
    say little, the cross-entropy is nearly flat in T, and its minimum is noise)."""
    rows = torch.arange(dens.shape[0])

    def losses(log_t: float) -> Tensor:
        return -torch.log_softmax(log_w + dens / math.exp(log_t), dim=1)[rows, target]

    best = _golden_min(lambda u: float(losses(u).mean()), math.log(TEMP_RANGE[0]), math.log(TEMP_RANGE[1]))
    at_best = losses(best)

    def clearly_worse(log_t: float) -> bool:  # worse than the best T by over SLACK_SE standard errors
        diff = losses(log_t) - at_best
        return float(diff.mean()) > SLACK_SE * float(diff.std()) / math.sqrt(diff.shape[0])

    if not clearly_worse(0.0):
        return TEMP_RANGE[0]
    lo, hi = 0.0, best  # from T = 1 towards the best T the loss falls: bisect for where it stops being clearly worse
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if clearly_worse(mid) else (lo, mid)
    return math.exp(hi)


def _golden_min(f, lo: float, hi: float) -> float:
    """Argmin of a unimodal f on [lo, hi] by golden-section search (the cross-entropy of a tempered softmax is
    convex in 1 / T, so unimodal in log T)."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


def _kmeans_labels(flat: Tensor, j: int, seed: int) -> Tensor:
    """k-means labels [N] (all zeros for j = 1); deterministic for a seed."""
    if j == 1:
        return torch.zeros(flat.shape[0], dtype=torch.long)
    from sklearn.cluster import KMeans  # imported lazily: only J > 1 needs it

    km = KMeans(n_clusters=j, n_init=4, random_state=seed).fit(flat.numpy())
    return torch.as_tensor(km.labels_, dtype=torch.long)
