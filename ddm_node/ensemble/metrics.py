"""Sample-quality metrics in the features of a small domain classifier (no Inception weights).

The classifier, its training and its cache are in `domain_classifier`; see there why the Frechet
distance here is called FD_dom, never FID.

- `frechet_distance`, `kid` (unbiased MMD^2, cubic polynomial kernel) and `precision_recall`
  (Kynkaanniemi et al. 2019, k-NN manifolds) work on any feature arrays.
- `evaluate` puts them together into a `Scores` record with a one-line summary; `bootstrap_fd` gives paired
  bootstrap draws of FD for confidence intervals of ratios between sample sets.
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
    return _fd(_moments(f1), _moments(f2))


def _moments(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _fd(m1: tuple[np.ndarray, np.ndarray], m2: tuple[np.ndarray, np.ndarray]) -> float:
    (mu1, s1), (mu2, s2) = m1, m2
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


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception-style distance: MMD^2 with k(a,b) = (a.b/D + 1)^3, mean and std over subsets.

    Each subset draws `subset_size` rows (at most the set's size) from EACH set with replacement (a bootstrap),
    so the std includes the noise of the reference set as well as the samples'. Within a set, pairs of draws of
    the same row are left out of the average like the diagonal of the unbiased estimator, so duplicates add no
    bias.
    """
    f1, f2 = _check_pair(f1, f2)
    if subsets < 1 or subset_size < 2:
        raise DDMError(f"kid: need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        ia = rng.integers(len(f1), size=min(subset_size, len(f1)))
        ib = rng.integers(len(f2), size=min(subset_size, len(f2)))
        values[i] = mmd2(f1[ia], f2[ib], ia, ib, d)
    return float(values.mean()), float(values.std())


def mmd2(a: np.ndarray, b: np.ndarray, ia: np.ndarray | None = None, ib: np.ndarray | None = None,
         d: int | None = None) -> float:
    """Unbiased MMD^2 of rows `a` and `b` under the cubic kernel (torchmetrics' KID on one subset). `ia`/`ib`:
    the source row of each draw; within-set pairs of the same source row are excluded (None: only i == j)."""
    d = d or a.shape[1]
    within = 0.0
    for x, idx in ((a, ia), (b, ib)):
        k = _cubic_kernel(x, x, d)
        same = np.eye(len(x), dtype=bool) if idx is None else idx[:, None] == idx[None, :]
        within += (k.sum() - k[same].sum()) / (same.size - same.sum())
    return float(within - 2.0 * _cubic_kernel(a, b, d).mean())


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


def features(images: torch.Tensor, clf: DomainClassifier, what: str = "samples") -> np.ndarray:
    """The domain classifier's features of images [N,C,H,W] in [-1,1] (N >= 4)."""
    images = check_images(images, what, clf.input_shape)
    if len(images) < 4:
        raise DDMError(f"evaluate: need at least 4 {what} images, got {len(images)}")
    return clf.features(images)


def evaluate(samples: torch.Tensor, reference: torch.Tensor, clf: DomainClassifier, seed: int = 0) -> Scores:
    """FD_dom, KID and precision/recall of `samples` against `reference` images, both [N,C,H,W] in [-1,1]."""
    return evaluate_features(features(samples, clf), features(reference, clf, "reference"), clf.hash, seed)


def evaluate_features(fs: np.ndarray, fr: np.ndarray, classifier_hash: str, seed: int = 0) -> Scores:
    """`evaluate` on features already computed (samples `fs`, reference `fr`)."""
    if min(len(fs), len(fr)) < fs.shape[1]:
        log.warning("FD_dom with %d samples in %d dimensions is strongly biased upwards; use more samples",
                    min(len(fs), len(fr)), fs.shape[1])
    k_mean, k_std = kid(fr, fs, seed=seed)
    precision, recall = precision_recall(fr, fs)
    return Scores(fd_dom=frechet_distance(fr, fs), kid=k_mean, kid_std=k_std, precision=precision, recall=recall,
                  n=len(fs), classifier_hash=classifier_hash)


def bootstrap_fd(reference: np.ndarray, samples: list[np.ndarray], rounds: int = 200, seed: int = 0) -> np.ndarray:
    """FD of each sample set against `reference` under `rounds` paired bootstrap draws: [len(samples), rounds].

    Each round redraws the reference rows and the sample rows with replacement, with the SAME row indices for
    every sample set (sets made from the same noise and labels are paired row by row), so a ratio of two sets'
    FDs within a round carries their shared noise once.
    """
    reference = _check_features(reference, "reference features")
    sets = [_check_pair(reference, s)[1] for s in samples]
    if len({len(s) for s in sets}) > 1:
        raise DDMError("bootstrap_fd: paired sample sets must have the same number of rows")
    if rounds < 1:
        raise DDMError(f"bootstrap_fd: rounds must be >= 1, got {rounds}")
    rng = np.random.default_rng(seed)
    out = np.empty((len(sets), rounds))
    n = len(sets[0]) if sets else 0
    for r in range(rounds):
        ref = _moments(reference[rng.integers(len(reference), size=len(reference))])
        pick = rng.integers(n, size=n) if n else None
        for i, s in enumerate(sets):
            out[i, r] = _fd(ref, _moments(s[pick]))
    return out
