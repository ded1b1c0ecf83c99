"""Centroid router: p(k | x_t, t) from published cluster statistics alone, no training.

Each cluster k is modelled in the diffusion space (pixels in [-1, 1], flattened to D) as a mixture of
J diagonal Gaussians with weights w_kj, means mu_kj and variances var_kj. Under the forward process
x_t = (1 - t) x0 + t eps, each component becomes N((1 - t) mu_kj, (1 - t)^2 var_kj + t^2), so

    log p(k | x_t, t) = log pi_k + logsumexp_j [log w_kj + log N(x_t; (1-t) mu_kj, (1-t)^2 var_kj + t^2)] - Z

with pi_k the cluster's share of the samples. Exact when the clusters really are such mixtures.

Class-conditional sampling: when every cluster also publishes its class histogram, the router uses
p(k | x_t, t, y) proportional to pi_k p(y | k) p(x_t | k, t) (x_t and y taken as independent given k, the
naive-Bayes step; p(y | k) with add-half smoothing). Without that term a top-1 sample of class y is often
handed, at high noise where p(x_t | k) is flat, to an expert whose cluster holds no images of y.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ddm_node.core.errors import DDMError

log = logging.getLogger(__name__)
VAR_FLOOR = 1e-4  # a constant pixel would otherwise give a zero variance and an infinite density
_TENSOR_KEYS = ("count", "sub_weights", "sub_means", "sub_vars")
_DERIVED_KEYS = ("mean", "var")
_OPTIONAL_KEYS = ("class_counts",)
CLASS_SMOOTHING = 0.5  # add-half (Jeffreys) counts in p(y | k): a class absent from a cluster is unlikely, not impossible
_CHUNK_ELEMENTS = 1 << 22  # bounds the [b, M, D] float64 temporaries to about 32 MiB


@dataclass
class ClusterStats:
    """Statistics of one cluster in the diffusion space: a J-component diagonal Gaussian mixture.

    `sub_weights` [J] sums to 1; `sub_means` and `sub_vars` are [J, D]. J = 1 is the plain centroid.
    `class_counts` [C] (optional) counts the cluster's samples per class and sums to `count`.
    Construction validates shapes and values and raises DDMError on anything malformed.
    """

    count: int
    sub_weights: Tensor
    sub_means: Tensor
    sub_vars: Tensor
    class_counts: Tensor | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def dim(self) -> int:
        return int(self.sub_means.shape[1])

    @property
    def mean(self) -> Tensor:
        """Whole-cluster mean [D] of the mixture."""
        return (self.sub_weights[:, None] * self.sub_means).sum(0)

    @property
    def var(self) -> Tensor:
        """Whole-cluster diagonal variance [D] of the mixture (law of total variance)."""
        second = (self.sub_weights[:, None] * (self.sub_vars + self.sub_means**2)).sum(0)
        return (second - self.mean**2).clamp_min(VAR_FLOOR)

    def merged(self) -> ClusterStats:
        """The moment-matched single Gaussian (J = 1) of this cluster."""
        return ClusterStats(self.count, self.sub_weights.new_ones(1), self.mean[None], self.var[None], self.class_counts)

    @classmethod
    def from_data(
        cls, x: Tensor, sub_centroids: int = 1, seed: int = 0, var_floor: float = VAR_FLOOR,
        y: Tensor | None = None, num_classes: int = 0,
    ) -> ClusterStats:
        """Statistics of samples `x` [N, ...] (flattened to [N, D]); k-means for J = sub_centroids > 1.

        With labels `y` [N] and `num_classes` > 0 the class histogram is kept too (class-aware routing)."""
        if x.ndim < 2 or x.shape[0] < 1:
            raise DDMError(f"cluster data must be [N, ...] with N >= 1, got shape {tuple(x.shape)}")
        if sub_centroids < 1:
            raise DDMError(f"sub_centroids must be >= 1, got {sub_centroids}")
        flat = x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()
        if not torch.isfinite(flat).all():
            raise DDMError("cluster data contains NaN or infinite values")
        n = flat.shape[0]
        labels = _kmeans_labels(flat, min(sub_centroids, n), seed)
        weights, means, variances = [], [], []
        for j in range(int(labels.max()) + 1):
            members = flat[labels == j]
            if members.shape[0] == 0:
                continue
            weights.append(members.shape[0] / n)
            means.append(members.mean(0))
            variances.append(members.var(0, unbiased=False).clamp_min(var_floor))
        class_counts = None
        if y is not None and num_classes > 0:
            y = torch.as_tensor(y).reshape(-1).long().cpu()
            if y.shape[0] != n or (y < 0).any() or (y >= num_classes).any():
                raise DDMError(f"cluster labels must be {n} integers in [0, {num_classes}), got shape "
                               f"{tuple(y.shape)}")
            class_counts = torch.bincount(y, minlength=num_classes).to(torch.float64)
        return cls(
            count=n,
            sub_weights=torch.tensor(weights, dtype=torch.float64),
            sub_means=torch.stack(means),
            sub_vars=torch.stack(variances),
            class_counts=class_counts,
        )

    def to_tensors(self) -> dict[str, Tensor]:
        """Plain tensors for a safetensors file: the mixture plus the derived mean and var."""
        out = {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "sub_weights": self.sub_weights.contiguous(),
            "sub_means": self.sub_means.contiguous(),
            "sub_vars": self.sub_vars.contiguous(),
            "mean": self.mean.contiguous(),
            "var": self.var.contiguous(),
        }
        if self.class_counts is not None:
            out["class_counts"] = self.class_counts.contiguous()
        return out

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor]) -> ClusterStats:
        """Inverse of `to_tensors`; rejects missing or unknown keys, bad shapes and non-finite values."""
        if not isinstance(d, dict):
            raise DDMError(f"cluster stats must be a mapping of tensors, got {type(d).__name__}")
        missing = [k for k in _TENSOR_KEYS if k not in d]
        if missing:
            raise DDMError(f"cluster stats: missing tensor '{missing[0]}'")
        unknown = sorted(set(d) - set(_TENSOR_KEYS) - set(_DERIVED_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            raise DDMError(f"cluster stats: unknown tensor '{unknown[0]}'")
        for k, v in d.items():
            if not isinstance(v, Tensor):
                raise DDMError(f"cluster stats: '{k}' is not a tensor")
        count = d["count"]
        if count.numel() != 1 or count.is_floating_point() or count.is_complex():
            raise DDMError(f"cluster stats: 'count' must be one integer, got shape {tuple(count.shape)} {count.dtype}")
        stats = cls(
            count=int(count.reshape(()).item()),
            sub_weights=_as_float(d["sub_weights"], "sub_weights"),
            sub_means=_as_float(d["sub_means"], "sub_means"),
            sub_vars=_as_float(d["sub_vars"], "sub_vars"),
            class_counts=_as_float(d["class_counts"], "class_counts") if "class_counts" in d else None,
        )
        for k in _DERIVED_KEYS:
            if k in d and tuple(d[k].shape) != (stats.dim,):
                raise DDMError(f"cluster stats: '{k}' must have shape ({stats.dim},), got {tuple(d[k].shape)}")
        return stats


def _as_float(v: Tensor, name: str) -> Tensor:
    if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
        raise DDMError(f"cluster stats: '{name}' must be a real tensor, got {v.dtype}")
    return v.detach().to(torch.float64).cpu()


def _validate(s: ClusterStats) -> None:
    """Shapes [J], [J, D], [J, D]; finite; weights >= 0 summing to 1; variances > 0; count >= 1."""
    if isinstance(s.count, bool) or not isinstance(s.count, int) or s.count < 1:
        raise DDMError(f"cluster stats: count must be an integer >= 1, got {s.count!r}")
    for name in ("sub_weights", "sub_means", "sub_vars"):
        v = getattr(s, name)
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise DDMError(f"cluster stats: '{name}' must be a floating-point tensor")
        if not torch.isfinite(v).all():
            raise DDMError(f"cluster stats: '{name}' contains NaN or infinite values")
    w, mu, var = s.sub_weights, s.sub_means, s.sub_vars
    if w.ndim != 1 or w.shape[0] < 1:
        raise DDMError(f"cluster stats: 'sub_weights' must have shape (J,) with J >= 1, got {tuple(w.shape)}")
    j = w.shape[0]
    if mu.ndim != 2 or mu.shape[0] != j or mu.shape[1] < 1:
        raise DDMError(f"cluster stats: 'sub_means' must have shape ({j}, D), got {tuple(mu.shape)}")
    if tuple(var.shape) != tuple(mu.shape):
        raise DDMError(f"cluster stats: 'sub_vars' must have shape {tuple(mu.shape)}, got {tuple(var.shape)}")
    if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-4:
        raise DDMError(f"cluster stats: 'sub_weights' must be >= 0 and sum to 1, sum is {float(w.sum()):.6g}")
    if (var <= 0).any():
        raise DDMError("cluster stats: 'sub_vars' must be > 0")
    c = s.class_counts
    if c is not None:
        if not isinstance(c, Tensor) or not c.is_floating_point() or c.ndim != 1 or c.shape[0] < 1:
            raise DDMError("cluster stats: 'class_counts' must be a floating-point tensor of shape (C,)")
        if not torch.isfinite(c).all() or (c < 0).any() or (c != c.round()).any():
            raise DDMError("cluster stats: 'class_counts' must be whole numbers >= 0")
        if int(c.sum()) != s.count:
            raise DDMError(f"cluster stats: 'class_counts' sum to {int(c.sum())}, not the count {s.count}")


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


def _kmeans_labels(flat: Tensor, j: int, seed: int) -> Tensor:
    """k-means labels [N] (all zeros for j = 1); deterministic for a seed."""
    if j == 1:
        return torch.zeros(flat.shape[0], dtype=torch.long)
    from sklearn.cluster import KMeans  # imported lazily: only J > 1 needs it

    km = KMeans(n_clusters=j, n_init=4, random_state=seed).fit(flat.numpy())
    return torch.as_tensor(km.labels_, dtype=torch.long)


def broadcast_t(t: Tensor | float, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """t as a [batch] tensor; accepts a float, a 0-d tensor, a [1] tensor or a [batch] tensor."""
    t = torch.as_tensor(t, dtype=dtype, device=device)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(()).expand(batch).clone()
    if t.ndim != 1 or t.shape[0] != batch:
        raise DDMError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


def _component_log_density(x: Tensor, t: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """log N(x; (1-t) mu_m, (1-t)^2 var_m + t^2) for every component m: [b, M]."""
    a = (1.0 - t)[:, None, None]
    var = a**2 * variances[None] + (t**2)[:, None, None]  # [b, M, D]
    diff = x[:, None, :] - a * means[None]
    return -0.5 * ((diff**2 / var) + var.log()).sum(-1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


class CentroidRouter:
    """p(k | x_t, t) from per-cluster Gaussian mixtures; `experts` are the sorted shard ids."""

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
        # all components stacked: owner[m] is the position of component m's cluster in `experts`
        self._owner = torch.cat([torch.full((s.sub_weights.shape[0],), i) for i, s in enumerate(comps)])
        self._log_w = torch.cat([s.sub_weights.to(torch.float64).log() for s in comps])
        self._log_w = self._log_w + (counts / counts.sum()).log()[self._owner]
        self._means = torch.cat([s.sub_means.to(torch.float64) for s in comps])
        self._vars = torch.cat([s.sub_vars.to(torch.float64) for s in comps])
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._log_py_k = _class_log_likelihood([stats[k] for k in self.experts])  # [K, C] or None

    @property
    def class_aware(self) -> bool:
        """Whether every cluster published its class histogram (so `y` enters the posterior)."""
        return self._log_py_k is not None

    def log_probs(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Normalized log p(k | x_t, t[, y]) [B, len(experts)] in x's dtype.

        `y` counts when the stats are class-aware; a label outside [0, C) (the null class of
        classifier-free guidance) or no `y` gives the unconditional posterior."""
        b = x.shape[0]
        flat = x.detach().reshape(b, -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise DDMError(f"centroid router: x has {flat.shape[1]} values per sample, the stats have {self.dim}")
        tt = broadcast_t(t, b, torch.float64, x.device).detach()
        owner, log_w, means, variances = self._on(x.device)
        comp = torch.cat([_component_log_density(flat[s], tt[s], means, variances) for s in self._chunks(b)])
        joint = comp + log_w  # [B, M]
        k = len(self.experts)
        per_cluster = torch.stack([torch.logsumexp(joint[:, owner == i], dim=1) for i in range(k)], dim=1)
        if y is not None and self._log_py_k is not None:
            per_cluster = per_cluster + self._class_term(y, b, x.device)
        out = per_cluster - torch.logsumexp(per_cluster, dim=1, keepdim=True)
        return out.to(x.dtype if x.is_floating_point() else torch.float32)

    def _class_term(self, y: Tensor, b: int, device: torch.device) -> Tensor:
        """log p(y | k) [B, K]; zero for labels outside [0, C) (unconditional samples)."""
        yy = torch.as_tensor(y, device=device).reshape(-1).long()
        if yy.shape[0] != b:
            raise DDMError(f"centroid router: y has {yy.shape[0]} labels for {b} samples")
        table = self._log_py_k.to(device)
        known = (yy >= 0) & (yy < table.shape[1])
        term = table[:, yy.clamp(0, table.shape[1] - 1)].T  # [B, K]
        return torch.where(known[:, None], term, torch.zeros_like(term))

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The stacked component tensors on `device` (cached: sampling calls this every step)."""
        if device not in self._cache:
            self._cache[device] = tuple(v.to(device) for v in (self._owner, self._log_w, self._means, self._vars))
        return self._cache[device]

    def _chunks(self, b: int) -> list[slice]:
        step = max(1, _CHUNK_ELEMENTS // max(1, self._means.numel()))
        return [slice(i, min(b, i + step)) for i in range(0, b, step)]

    def subset(self, ids: Iterable[int]) -> CentroidRouter:
        """A router over `ids` only, renormalized: the exact posterior of the data without the other clusters."""
        ids = sorted({int(i) for i in ids})
        if not ids:
            raise DDMError("router subset is empty")
        unknown = [i for i in ids if i not in self.stats]
        if unknown:
            raise DDMError(f"router has no expert {unknown[0]} (it knows {self.experts})")
        return CentroidRouter({i: self.stats[i] for i in ids}, use_sub=self.use_sub)
