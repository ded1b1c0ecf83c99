"""A cluster's published statistics: what the centroid router knows of an expert's data, and their file form.

Each cluster is a mixture of M diagonal Gaussians in the diffusion space (pixels in [-1, 1] or latents,
flattened to D): weights `sub_weights` [M] (summing to 1), `sub_means` and `sub_vars` [M, D]. With labels the
cluster also publishes its class histogram `class_counts` [C] and the class of every component `sub_classes`
[M], so that p(x_t | k, y) is the mixture of the components of class y (router/fit.py). `calib_t` and
`calib_temp` [G] are the calibration temperature T(t) the expert fitted on its own data.

Older artifacts lack `sub_classes` (class-aware routing then takes x_t and y as independent given k) or the
temperature (T = 1); both still load. Everything read from a file is peer data: shapes, finiteness and ranges
are checked, and anything else is a one-line DDMError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ddm_node.core.errors import DDMError
from router.fit import CALIB_TIMES, MIN_COMPONENT_SAMPLES, TEMP_RANGE, Components, fit_components, fit_temperature

VAR_FLOOR = 1e-4  # a constant pixel would otherwise give a zero variance and an infinite density
MAX_ABS_MEAN = 1e4  # pixels are in [-1, 1] and latents within a few tens: larger means are not statistics
VAR_RANGE = (1e-12, 1e8)
MAX_CALIB_POINTS = 64
_TENSOR_KEYS = ("count", "sub_weights", "sub_means", "sub_vars")
_DERIVED_KEYS = ("mean", "var")
_OPTIONAL_KEYS = ("class_counts", "sub_classes", "calib_t", "calib_temp")


@dataclass
class ClusterStats:
    """Statistics of one cluster (see the module docstring). Construction validates shapes and values and
    raises DDMError on anything malformed."""

    count: int
    sub_weights: Tensor
    sub_means: Tensor
    sub_vars: Tensor
    class_counts: Tensor | None = None
    sub_classes: Tensor | None = None
    calib_t: Tensor | None = None
    calib_temp: Tensor | None = None

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
        """The moment-matched single Gaussian of this cluster (no class components, no temperature)."""
        return ClusterStats(self.count, self.sub_weights.new_ones(1), self.mean[None], self.var[None], self.class_counts)

    @classmethod
    def from_data(
        cls, x: Tensor, sub_centroids: int = 1, seed: int = 0, var_floor: float = VAR_FLOOR,
        y: Tensor | None = None, num_classes: int = 0, calibrate: bool = True,
    ) -> ClusterStats:
        """Statistics of samples `x` [N, ...] (flattened to [N, D]): components by k-means (router/fit.py), per
        class when labels `y` [N] and `num_classes` > 0 are given, and (`calibrate`) the temperature."""
        if x.ndim < 2 or x.shape[0] < 1:
            raise DDMError(f"cluster data must be [N, ...] with N >= 1, got shape {tuple(x.shape)}")
        if sub_centroids < 1:
            raise DDMError(f"sub_centroids must be >= 1, got {sub_centroids}")
        flat = x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()
        if not torch.isfinite(flat).all():
            raise DDMError("cluster data contains NaN or infinite values")
        n = flat.shape[0]
        labels = None
        if y is not None and num_classes > 0:
            labels = torch.as_tensor(y).reshape(-1).long().cpu()
            if labels.shape[0] != n or (labels < 0).any() or (labels >= num_classes).any():
                raise DDMError(f"cluster labels must be {n} integers in [0, {num_classes}), got shape "
                               f"{tuple(labels.shape)}")
        comps = fit_components(flat, sub_centroids, seed, var_floor, labels)
        temps = fit_temperature(flat, comps, seed) if calibrate else None
        return cls.from_components(n, comps, labels, num_classes, temps)

    @classmethod
    def from_components(cls, n: int, comps: Components, labels: Tensor | None, num_classes: int,
                        temps: Tensor | None) -> ClusterStats:
        """Stats of n samples from their fitted components, labels (None: unlabelled) and temperatures."""
        return cls(
            count=n, sub_weights=comps.weights, sub_means=comps.means, sub_vars=comps.variances,
            class_counts=None if labels is None else torch.bincount(labels, minlength=num_classes).to(torch.float64),
            sub_classes=comps.classes,
            calib_t=None if temps is None else torch.tensor(CALIB_TIMES, dtype=torch.float64),
            calib_temp=temps,
        )

    def to_tensors(self) -> dict[str, Tensor]:
        """Plain tensors for a safetensors file: the mixture, the derived mean and var, and what is set of the
        class histogram, component classes and temperature."""
        out = {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "sub_weights": self.sub_weights.contiguous(),
            "sub_means": self.sub_means.contiguous(),
            "sub_vars": self.sub_vars.contiguous(),
            "mean": self.mean.contiguous(),
            "var": self.var.contiguous(),
        }
        for name in _OPTIONAL_KEYS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.contiguous()
        return out

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor]) -> ClusterStats:
        """Inverse of `to_tensors`; rejects missing or unknown keys, bad shapes, non-finite and out-of-range values."""
        if not isinstance(d, dict):
            raise DDMError(f"cluster stats must be a mapping of tensors, got {type(d).__name__}")
        missing = [k for k in _TENSOR_KEYS if k not in d]
        if missing:
            raise DDMError(f"cluster stats: missing tensor '{missing[0]}'")
        unknown = sorted(set(d) - set(_TENSOR_KEYS) - set(_DERIVED_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            raise DDMError(f"cluster stats: unknown tensor '{str(unknown[0])[:40]}'")
        for k, v in d.items():
            if not isinstance(v, Tensor):
                raise DDMError(f"cluster stats: '{k}' is not a tensor")
        count = d["count"]
        if count.numel() != 1 or count.is_floating_point() or count.is_complex():
            raise DDMError(f"cluster stats: 'count' must be one integer, got shape {tuple(count.shape)} {count.dtype}")
        sub_classes = d.get("sub_classes")
        if sub_classes is not None and (sub_classes.is_floating_point() or sub_classes.is_complex()
                                        or sub_classes.dtype == torch.bool):
            raise DDMError(f"cluster stats: 'sub_classes' must be integers, got {sub_classes.dtype}")
        stats = cls(
            count=int(count.reshape(()).item()),
            sub_weights=_as_float(d["sub_weights"], "sub_weights"),
            sub_means=_as_float(d["sub_means"], "sub_means"),
            sub_vars=_as_float(d["sub_vars"], "sub_vars"),
            class_counts=_as_float(d["class_counts"], "class_counts") if "class_counts" in d else None,
            sub_classes=None if sub_classes is None else sub_classes.detach().to(torch.int64).cpu(),
            calib_t=_as_float(d["calib_t"], "calib_t") if "calib_t" in d else None,
            calib_temp=_as_float(d["calib_temp"], "calib_temp") if "calib_temp" in d else None,
        )
        for k in _DERIVED_KEYS:
            if k in d and tuple(d[k].shape) != (stats.dim,):
                raise DDMError(f"cluster stats: '{k}' must have shape ({stats.dim},), got {tuple(d[k].shape)}")
        return stats


def max_components(sub_centroids: int, num_classes: int, samples: int) -> int:
    """The most components `ClusterStats.from_data` gives a cluster of `samples` samples: up to `sub_centroids`
    per class (one group when unlabelled), each of MIN_COMPONENT_SAMPLES or more, and at least one per class."""
    groups = max(1, num_classes)
    return max(1, min(sub_centroids * groups, groups + samples // MIN_COMPONENT_SAMPLES))


def max_values(dim: int, sub_centroids: int, num_classes: int, samples: int) -> int:
    """The most numbers (8 bytes each) a stats file of this shape holds: count, the components (weight, mean,
    variance, class), the derived mean and variance, the class histogram and the temperature curve."""
    m = max_components(sub_centroids, num_classes, samples)
    return 1 + m * (2 * dim + 2) + 2 * dim + num_classes + 2 * MAX_CALIB_POINTS


def _as_float(v: Tensor, name: str) -> Tensor:
    if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
        raise DDMError(f"cluster stats: '{name}' must be a real tensor, got {v.dtype}")
    return v.detach().to(torch.float64).cpu()


def _validate(s: ClusterStats) -> None:
    """Shapes [M], [M, D], [M, D]; finite and in range; weights >= 0 summing to 1; count >= 1; then the
    optional class histogram, component classes and temperature."""
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
        raise DDMError(f"cluster stats: 'sub_weights' must have shape (M,) with M >= 1, got {tuple(w.shape)}")
    m = w.shape[0]
    if mu.ndim != 2 or mu.shape[0] != m or mu.shape[1] < 1:
        raise DDMError(f"cluster stats: 'sub_means' must have shape ({m}, D), got {tuple(mu.shape)}")
    if tuple(var.shape) != tuple(mu.shape):
        raise DDMError(f"cluster stats: 'sub_vars' must have shape {tuple(mu.shape)}, got {tuple(var.shape)}")
    if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-4:
        raise DDMError(f"cluster stats: 'sub_weights' must be >= 0 and sum to 1, sum is {float(w.sum()):.6g}")
    if (var <= 0).any():
        raise DDMError("cluster stats: 'sub_vars' must be > 0")
    if float(mu.abs().max()) > MAX_ABS_MEAN or float(var.min()) < VAR_RANGE[0] or float(var.max()) > VAR_RANGE[1]:
        raise DDMError(f"cluster stats: means must be within +-{MAX_ABS_MEAN:g} and variances in "
                       f"[{VAR_RANGE[0]:g}, {VAR_RANGE[1]:g}]")
    _validate_classes(s)
    _validate_calibration(s)


def _validate_classes(s: ClusterStats) -> None:
    """class_counts [C]: whole numbers summing to count; sub_classes [M] (needs class_counts): each component's
    class, whose total weight is that class's share of the count."""
    c = s.class_counts
    if c is not None:
        if not isinstance(c, Tensor) or not c.is_floating_point() or c.ndim != 1 or c.shape[0] < 1:
            raise DDMError("cluster stats: 'class_counts' must be a floating-point tensor of shape (C,)")
        if not torch.isfinite(c).all() or (c < 0).any() or (c != c.round()).any():
            raise DDMError("cluster stats: 'class_counts' must be whole numbers >= 0")
        if int(c.sum()) != s.count:
            raise DDMError(f"cluster stats: 'class_counts' sum to {int(c.sum())}, not the count {s.count}")
    k = s.sub_classes
    if k is None:
        return
    m = s.sub_weights.shape[0]
    if c is None:
        raise DDMError("cluster stats: 'sub_classes' needs 'class_counts'")
    if not isinstance(k, Tensor) or k.dtype != torch.int64 or tuple(k.shape) != (m,):
        raise DDMError(f"cluster stats: 'sub_classes' must be {m} integers (one per component)")
    if (k < 0).any() or (k >= c.shape[0]).any():
        raise DDMError(f"cluster stats: 'sub_classes' must be classes in [0, {c.shape[0]})")
    share = torch.zeros_like(c).index_add_(0, k, s.sub_weights)
    if (share - c / s.count).abs().max() > 1e-6:
        raise DDMError("cluster stats: the components of each class must weigh that class's share of "
                       "'class_counts'")


def _validate_calibration(s: ClusterStats) -> None:
    """calib_t and calib_temp: both or neither, [G] with 1 <= G <= MAX_CALIB_POINTS, times increasing in [0, 1],
    temperatures in TEMP_RANGE."""
    ts, temps = s.calib_t, s.calib_temp
    if ts is None and temps is None:
        return
    if ts is None or temps is None:
        raise DDMError("cluster stats: 'calib_t' and 'calib_temp' come together")
    for name, v in (("calib_t", ts), ("calib_temp", temps)):
        if not isinstance(v, Tensor) or not v.is_floating_point() or v.ndim != 1 or \
                not 1 <= v.shape[0] <= MAX_CALIB_POINTS or not torch.isfinite(v).all():
            raise DDMError(f"cluster stats: '{name}' must be 1 to {MAX_CALIB_POINTS} finite numbers")
    if ts.shape != temps.shape:
        raise DDMError(f"cluster stats: 'calib_t' has {ts.shape[0]} times, 'calib_temp' {temps.shape[0]} values")
    if (ts < 0).any() or (ts > 1).any() or (ts[1:] <= ts[:-1]).any():
        raise DDMError("cluster stats: 'calib_t' must increase within [0, 1]")
    low, high = TEMP_RANGE
    if (temps < low * (1 - 1e-9)).any() or (temps > high * (1 + 1e-9)).any():
        raise DDMError(f"cluster stats: 'calib_temp' must be in [{low:g}, {high:g}]")
