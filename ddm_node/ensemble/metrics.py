"""Sample-quality metrics in the features of a small domain classifier (no Inception weights).

The classifier, its training and its cache are in `domain_classifier`; see there why the Frechet
distance here is called FD_dom, never FID.

- `frechet_distance`, `kid` (unbiased MMD^2, cubic polynomial kernel) and `precision_recall`
  (Kynkaanniemi et al. 2019, k-NN manifolds) work on any feature arrays.
- `evaluate` puts them together into a `Scores` record with a one-line summary.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from ddm_node.core.errors import DDMError
from ddm_node.ensemble.domain_classifier import DomainClassifier, check_images

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Metrics on features


def _check_features(f: np.ndarray, what: str, min_rows: int = 2) -> np.ndarray:
    f = np.asarray(f)
    if f.ndim != 2 or f.shape[0] < min_rows or f.shape[1] < 1:
        raise DDMError(f"{what}: expected a feature array [N>={min_rows}, D], got shape {f.shape}")
    if not np.issubdtype(f.dtype, np.number) or not np.isfinite(f).all():
        raise DDMError(f"{what}: features must be finite numbers")
    return f.astype(np.float64, copy=False)


def _check_pair(f1: np.ndarray, f2: np.ndarray, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    f1, f2 = _check_features(f1, "first features", min_rows), _check_features(f2, "second features", min_rows)
    if f1.shape[1] != f2.shape[1]:
        raise DDMError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    return f1, f2


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N1,D], [N2,D].

    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). The matrix root comes from scipy.linalg.sqrtm; when it
    is not finite (singular covariances) both covariances get a small ridge, and when it is inaccurate or
    has a large imaginary part, tr (S1 S2)^(1/2) is taken from the eigenvalues of S1 S2 instead (they
    are real and non-negative in exact arithmetic since S1 S2 is similar to a PSD matrix).
    """
    f1, f2 = _check_pair(f1, f2)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1 = np.atleast_2d(np.cov(f1, rowvar=False))
    s2 = np.atleast_2d(np.cov(f2, rowvar=False))
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2)))


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((s1 @ s2)^(1/2)) for covariance matrices, robust to singular and ill-conditioned input."""
    prod = s1 @ s2
    scale = max(np.trace(s1), np.trace(s2), 1e-12)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular input is handled below
        root = scipy.linalg.sqrtm(prod)
        if not np.isfinite(root).all():
            ridge = np.eye(len(s1)) * 1e-6 * scale / len(s1)
            prod = (s1 + ridge) @ (s2 + ridge)
            root = scipy.linalg.sqrtm(prod)
    ok = np.isfinite(root).all()
    if ok:
        err = np.linalg.norm(root @ root - prod) / max(np.linalg.norm(prod), 1e-300)
        imag = np.abs(np.imag(np.diagonal(root))).max() if np.iscomplexobj(root) else 0.0
        ok = err < 1e-4 and imag < 1e-3 * scale
    if ok:
        return float(np.real(np.trace(root)))
    log.debug("sqrtm inaccurate; using eigenvalues of S1 S2")
    eig = np.linalg.eigvals(s1 @ s2)
    return float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 50, subset_size: int = 500,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception-style distance: unbiased MMD^2 with k(a,b) = (a.b/D + 1)^3, mean and std over subsets.

    Each subset draws `subset_size` rows (fewer if a set is smaller) from each set without replacement.
    """
    f1, f2 = _check_pair(f1, f2)
    if subsets < 1 or subset_size < 2:
        raise DDMError(f"kid: need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    m = min(subset_size, len(f1), len(f2))
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        a = f1[rng.choice(len(f1), m, replace=False)]
        b = f2[rng.choice(len(f2), m, replace=False)]
        off = m * (m - 1)
        kaa, kbb, kab = _cubic_kernel(a, a, d), _cubic_kernel(b, b, d), _cubic_kernel(a, b, d)
        values[i] = ((kaa.sum() - np.trace(kaa)) / off + (kbb.sum() - np.trace(kbb)) / off
                     - 2.0 * kab.mean())
    return float(values.mean()), float(values.std())


def _cubic_kernel(a: np.ndarray, b: np.ndarray, d: int) -> np.ndarray:
    k = a @ b.T
    k /= d
    k += 1.0
    return k * k * k  # much faster than k ** 3


def _kth_radius(f: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (the row itself is at distance 0)."""
    out = np.empty(len(f))
    for i in range(0, len(f), block):
        d = _pairwise(f[i:i + block], f)
        out[i:i + block] = np.partition(d, k, axis=1)[:, k]
    return out


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.clip(sq, 0.0, None))


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, block: int = 1024) -> float:
    """Fraction of `queries` inside at least one ball (manifold point, its k-NN radius)."""
    inside = 0
    for i in range(0, len(queries), block):
        d = _pairwise(queries[i:i + block], manifold)
        inside += int((d <= radii[None, :]).any(1).sum())
    return inside / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls in feature space.

    Precision: fraction of fake samples inside the real manifold (union of balls around real points
    with radius = distance to their k-th nearest real neighbour). Recall: the same with roles swapped.
    """
    if k < 1:
        raise DDMError(f"precision_recall: k must be at least 1, got {k}")
    real, fake = _check_pair(real, fake, min_rows=k + 1)
    precision = _coverage(real, _kth_radius(real, k), fake)
    recall = _coverage(fake, _kth_radius(fake, k), real)
    return precision, recall


# ----------------------------------------------------------------------------------------------------
# Scores


@dataclass
class Scores:
    """Sample-quality scores against a reference set, in the features of one domain classifier."""

    fd_dom: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    n: int
    classifier_hash: str

    def line(self) -> str:
        """One line, e.g. `FD_dom 12.3  KID 0.0040±0.0010  P 0.71  R 0.64  (n=1000, classifier 3f2a9c1b...)`."""
        fd = f"{self.fd_dom:.1f}" if self.fd_dom >= 10 else f"{self.fd_dom:.2f}"
        return (f"FD_dom {fd}  KID {self.kid:.4f}±{self.kid_std:.4f}  P {self.precision:.2f}  "
                f"R {self.recall:.2f}  (n={self.n}, classifier {self.classifier_hash[:8]}...)")


def evaluate(samples: torch.Tensor, reference: torch.Tensor, clf: DomainClassifier, seed: int = 0) -> Scores:
    """FD_dom, KID and precision/recall of `samples` against `reference` images, both [N,C,H,W] in [-1,1]."""
    samples = check_images(samples, "samples", clf.input_shape)
    reference = check_images(reference, "reference", clf.input_shape)
    if len(samples) < 4 or len(reference) < 4:
        raise DDMError(f"evaluate: need at least 4 samples and 4 reference images, got {len(samples)}, "
                       f"{len(reference)}")
    fs, fr = clf.features(samples), clf.features(reference)
    if min(len(fs), len(fr)) < fs.shape[1]:
        log.warning("FD_dom with %d samples in %d dimensions is strongly biased upwards; use more samples",
                    min(len(fs), len(fr)), fs.shape[1])
    k_mean, k_std = kid(fr, fs, seed=seed)
    precision, recall = precision_recall(fr, fs)
    return Scores(fd_dom=frechet_distance(fr, fs), kid=k_mean, kid_std=k_std, precision=precision, recall=recall,
                  n=len(samples), classifier_hash=clf.hash)
