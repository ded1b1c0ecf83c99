"""Centroid router: p(k | x_t, t[, y]) from published cluster statistics alone, no training.

Each cluster k is a mixture of diagonal Gaussians with weights w_kj, means mu_kj and variances var_kj
(router/stats.py). Under the forward process x_t = (1 - t) x0 + t eps each component becomes
N((1 - t) mu_kj, (1 - t)^2 var_kj + t^2), so with pi_k the cluster's share of the samples

    log p(k | x_t, t)    = log pi_k + log p(x_t | k) / T(t) - Z,     p(x_t | k) = sum_j w_kj N_kj(x_t)
    log p(k | x_t, t, y) = log pi_k + log p(y | k) + log p(x_t | k, y) / T(t) - Z

where p(x_t | k, y) is the mixture of the cluster's components of class y (weights renormalized), and
p(y | k) comes from the class histogram with add-half smoothing. With T = 1 both are exact when each
(cluster, class) really is such a mixture (tests/test_router_exact.py). T(t) is the calibration temperature
the experts fitted on their own data (router/fit.py), averaged over the clusters weighted by their counts.

A cluster whose statistics predate per-class components (or that holds no sample of y) falls back to
p(x_t | k, y) = p(x_t | k), the naive-Bayes step. Without y (or with the null class of classifier-free
guidance, or when a cluster lacks a class histogram) the posterior is the unconditional one.

Text: the statistics are of pixels (or latents) and labels only, so this router cannot see a prompt. In a
text-conditioned run it routes on x_t (and y) alone and ignores the text of a `Cond`: at high noise it hands a
sample to the clusters in proportion to their size, not to the one whose captions match the prompt, and the
expert it picks still follows the prompt. The learned router sees the text (router/learned.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from ddm_node.core.errors import DDMError
from router.base import Cond, Conditioning
from router.gaussian import broadcast_t, component_log_density, interp
from router.stats import VAR_FLOOR, ClusterStats

__all__ = ["CLASS_SMOOTHING", "VAR_FLOOR", "CentroidRouter", "ClusterStats", "broadcast_t"]

log = logging.getLogger(__name__)
CLASS_SMOOTHING = 0.5  # add-half (Jeffreys) counts in p(y | k): a class absent from a cluster is unlikely, not impossible


def _class_log_likelihood(stats: list[ClusterStats]) -> Tensor | None:
    """log p(y | k) [K, C] with add-half smoothing, or None unless every cluster has a histogram of one length."""
    counts = [s.class_counts for s in stats]
    if any(c is None for c in counts) or len({c.shape[0] for c in counts}) != 1:
        if any(c is not None for c in counts):
            log.warning("centroid router: class histograms are missing or of different lengths across clusters; "
                        "routing from pixels only")
        return None
    c = torch.stack([x.to(torch.float64) for x in counts]) + CLASS_SMOOTHING
    return c.log() - c.sum(1, keepdim=True).log()


class CentroidRouter:
    """p(k | x_t, t[, y]) from per-cluster Gaussian mixtures; `experts` are the sorted shard ids."""

    def __init__(self, stats: dict[int, ClusterStats], use_sub: bool = True):
        if not stats:
            raise DDMError("centroid router needs at least one cluster")
        dims = {s.dim for s in stats.values()}
        if len(dims) != 1:
            raise DDMError(f"centroid router: clusters disagree on the dimension: {sorted(dims)}")
        self.stats = dict(stats)
        self.use_sub = use_sub
        self.experts: list[int] = sorted(int(k) for k in stats)
        self.dim = dims.pop()
        comps = [stats[k] if use_sub else stats[k].merged() for k in self.experts]
        counts = torch.tensor([float(s.count) for s in comps], dtype=torch.float64)
        self._log_pi = (counts / counts.sum()).log()  # [K]
        # all components stacked: owner[m] is the position of component m's cluster in `experts`
        self._owner = torch.cat([torch.full((s.sub_weights.shape[0],), i) for i, s in enumerate(comps)])
        self._log_w = torch.cat([s.sub_weights.to(torch.float64).log() for s in comps])  # within the cluster
        self._means = torch.cat([s.sub_means.to(torch.float64) for s in comps])
        self._vars = torch.cat([s.sub_vars.to(torch.float64) for s in comps])
        self._log_py_k = _class_log_likelihood(comps)  # [K, C] or None
        self._classes, self._log_class_w = self._class_components(comps)
        self._curves = [(s.calib_t, s.calib_temp, float(s.count)) for s in comps if s.calib_t is not None]
        self._cache: dict[torch.device, tuple[Tensor, ...]] = {}

    def _class_components(self, comps: list[ClusterStats]) -> tuple[Tensor | None, Tensor | None]:
        """Each component's class [M] (-1: untagged) and log of each class's weight in each cluster [K, C]
        (-inf where the cluster has no component of the class: the naive fallback); None unless class-aware."""
        if self._log_py_k is None or all(s.sub_classes is None for s in comps):
            return None, None
        classes = torch.cat([s.sub_classes if s.sub_classes is not None else torch.full_like(s.sub_weights, -1,
                             dtype=torch.int64) for s in comps])
        weight = torch.zeros(len(comps), self._log_py_k.shape[1], dtype=torch.float64)
        tagged = classes >= 0
        weight.index_put_((self._owner[tagged], classes[tagged]), self._log_w[tagged].exp(), accumulate=True)
        return classes, weight.log()

    @property
    def class_aware(self) -> bool:
        """Whether every cluster published its class histogram (so `y` enters the posterior)."""
        return self._log_py_k is not None

    @property
    def calibrated(self) -> bool:
        """Whether any cluster published a calibration temperature (else T = 1)."""
        return bool(self._curves)

    def temperature(self, t: Tensor) -> Tensor:
        """T(t) [B] for times t [B] (float64): the clusters' curves averaged with their counts as weights."""
        if not self._curves:
            return torch.ones_like(t)
        total = sum(n for _, _, n in self._curves)
        return sum(n * interp(t, ts.to(t.device), temps.to(t.device)) for ts, temps, n in self._curves) / total

    def log_probs(self, x: Tensor, t: Tensor | float, y: Conditioning = None) -> Tensor:
        """Normalized log p(k | x_t, t[, y]) [B, len(experts)] in x's dtype.

        `y` counts when the stats are class-aware; a label outside [0, C) (the null class of
        classifier-free guidance) or no `y` gives the unconditional posterior. Text in a `Cond` is ignored."""
        y = Cond.of(y).y
        b = x.shape[0]
        flat = x.detach().reshape(b, -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise DDMError(f"centroid router: x has {flat.shape[1]} values per sample, the stats have {self.dim}")
        tt = broadcast_t(t, b, torch.float64, x.device).detach()
        owner, log_w, means, variances, log_pi = self._on(x.device)
        joint = component_log_density(flat, tt, means, variances) + log_w  # [B, M]
        log_px = self._per_cluster(joint, owner)  # log p(x_t | k) [B, K]
        out = log_pi + log_px / self.temperature(tt)[:, None]
        if y is not None and self._log_py_k is not None:
            yy = torch.as_tensor(y, device=x.device).reshape(-1).long()
            if yy.shape[0] != b:
                raise DDMError(f"centroid router: y has {yy.shape[0]} labels for {b} samples")
            known = (yy >= 0) & (yy < self._log_py_k.shape[1])
            safe = yy.clamp(0, self._log_py_k.shape[1] - 1)
            aware = log_pi + self._log_py_k.to(x.device)[:, safe].T
            aware = aware + self._class_log_px(joint, owner, safe, log_px) / self.temperature(tt)[:, None]
            out = torch.where(known[:, None], aware, out)
        out = out - torch.logsumexp(out, dim=1, keepdim=True)
        return out.to(x.dtype if x.is_floating_point() else torch.float32)

    def _per_cluster(self, joint: Tensor, owner: Tensor) -> Tensor:
        """logsumexp of `joint` [B, M] over each cluster's components: [B, K]."""
        return torch.stack([torch.logsumexp(joint[:, owner == i], dim=1) for i in range(len(self.experts))], dim=1)

    def _class_log_px(self, joint: Tensor, owner: Tensor, y: Tensor, log_px: Tensor) -> Tensor:
        """log p(x_t | k, y) [B, K]: the mixture of cluster k's components of class y, or p(x_t | k) where the
        cluster has none (untagged statistics, or no sample of y)."""
        if self._classes is None:
            return log_px
        classes, log_class_w = self._classes.to(joint.device), self._log_class_w.to(joint.device)
        mine = classes[None, :] == y[:, None]  # [B, M]
        within = self._per_cluster(joint.masked_fill(~mine, float("-inf")), owner) - log_class_w[:, y].T
        return torch.where(torch.isfinite(log_class_w[:, y].T), within, log_px)

    def export_tensors(self) -> dict[str, Tensor]:
        """What `log_probs` computes from (for `ddm-node export`): log_pi [K], owner [M], log_w [M], means and
        variances [M, D]; when class-aware log_py_k [K, C], and with per-class components classes [M] and log_class_w
        [K, C]; when calibrated, T(t) as one curve (curve_t, curve_temp) through the union of the clusters' points (the
        count-weighted mean of piecewise-linear curves is piecewise linear there, so it is exact)."""
        out = {"log_pi": self._log_pi, "owner": self._owner.long(), "log_w": self._log_w, "means": self._means,
               "variances": self._vars}
        if self._log_py_k is not None:
            out["log_py_k"] = self._log_py_k
        if self._classes is not None:
            out["classes"], out["log_class_w"] = self._classes.long(), self._log_class_w
        if self._curves:
            ts = torch.unique(torch.cat([c[0].reshape(-1).to(torch.float64) for c in self._curves]))
            out["curve_t"], out["curve_temp"] = ts, self.temperature(ts)
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def _on(self, device: torch.device) -> tuple[Tensor, ...]:
        """The stacked component tensors on `device` (cached: sampling calls this every step)."""
        if device not in self._cache:
            self._cache[device] = tuple(v.to(device) for v in (self._owner, self._log_w, self._means, self._vars,
                                                               self._log_pi))
        return self._cache[device]

    def subset(self, ids: Iterable[int]) -> CentroidRouter:
        """A router over `ids` only, renormalized: the exact posterior of the data without the other clusters."""
        ids = sorted({int(i) for i in ids})
        if not ids:
            raise DDMError("router subset is empty")
        unknown = [i for i in ids if i not in self.stats]
        if unknown:
            raise DDMError(f"router has no expert {unknown[0]} (it knows {self.experts})")
        return CentroidRouter({i: self.stats[i] for i in ids}, use_sub=self.use_sub)
