"""Partition: features -> k-means -> K clusters, one per expert.

Features are a PCA of the flattened pixels (the paper uses DINOv2 embeddings; a dataset may ship its own
in its `features` array). Clustering follows the paper: on large data, a fine k-means first, then the
fine centroids, weighted by their sizes, are consolidated into K coarse clusters by a second k-means;
every sample takes the coarse cluster of its fine cluster. Small data is clustered directly into K.

Auto rule (partition.fine_clusters = 0): consolidate only when N >= AUTO_MIN_SAMPLES (4096), with
fine = min(max(8K, 64), N // 50), i.e. at least 8 fine clusters per coarse one and about 50 samples or
more per fine cluster. sklearn's digits (1617 train samples) therefore gets plain k-means.
An explicit fine_clusters > 0 always consolidates and must be > K and <= N.

Every result is deterministic for a seed, and clusters are numbered by their smallest member index so
the numbering does not depend on k-means internals. No cluster is ever empty.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ddm_node.core.config import PartitionConfig
from ddm_node.core.errors import DDMError
from ddm_node.data.datasets import Dataset

log = logging.getLogger(__name__)

AUTO_MIN_SAMPLES = 4096
N_INIT_FINE = 2  # the fine pass is the expensive one; many clusters make restarts matter little
N_INIT = 8  # plain k-means and the cheap weighted consolidation


def compute_features(ds: Dataset, cfg: PartitionConfig, ids) -> np.ndarray:
    """float32 [len(ids), F] features of the samples `ids`: PCA of pixels, or the dataset's own features."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise DDMError("partition: need a non-empty 1-D list of sample ids")
    if ids.min() < 0 or ids.max() >= len(ds):
        raise DDMError(f"partition: sample ids out of range for {len(ds)} samples")
    if cfg.features == "dataset":
        if ds.features is None:
            raise DDMError(f"partition.features is 'dataset' but {ds.spec!r} has no 'features' array")
        return np.ascontiguousarray(ds.features[ids], dtype=np.float32)
    if cfg.features != "pca":
        raise DDMError(f"partition.features must be 'pca' or 'dataset', got {cfg.features!r}")
    from sklearn.decomposition import PCA

    flat = ds.x[ids].reshape(len(ids), -1).astype(np.float64)
    dim = min(cfg.pca_dim, len(ids), flat.shape[1])
    if len(ids) < 2:  # PCA needs two samples; a single point is its own cluster anyway
        return np.zeros((len(ids), dim), np.float32)
    feats = PCA(n_components=dim, random_state=cfg.seed).fit_transform(flat)
    return np.ascontiguousarray(feats, dtype=np.float32)


def fine_cluster_count(n: int, k: int, cfg: PartitionConfig) -> int:
    """Number of fine clusters to consolidate into k, or 0 for plain k-means (see the module docstring)."""
    if cfg.fine_clusters > 0:
        if cfg.fine_clusters <= k:
            raise DDMError(f"partition.fine_clusters ({cfg.fine_clusters}) must be greater than "
                           f"partition.experts ({k}), or 0 for auto")
        if cfg.fine_clusters > n:
            raise DDMError(f"partition.fine_clusters ({cfg.fine_clusters}) exceeds the {n} samples")
        return cfg.fine_clusters
    if n < AUTO_MIN_SAMPLES:
        return 0
    fine = min(max(8 * k, 64), n // 50)
    return fine if fine > k else 0


def cluster(features: np.ndarray, k: int, cfg: PartitionConfig) -> tuple[np.ndarray, np.ndarray]:
    """k-means of `features` [N, F] into k non-empty clusters: (labels int64 [N], centroids float64 [k, F])."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or not np.isfinite(feats).all():
        raise DDMError("partition: features must be a finite [N, F] array")
    n = len(feats)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DDMError(f"partition.experts must be a positive integer, got {k!r}")
    if k > n:
        raise DDMError(f"partition.experts ({k}) exceeds the {n} training samples; every shard needs one")
    fine = fine_cluster_count(n, k, cfg)
    if fine:
        fine_labels, fine_centers = _kmeans(feats, fine, cfg.seed, N_INIT_FINE)
        counts = np.bincount(fine_labels, minlength=fine).astype(np.float64)
        used = np.flatnonzero(counts)
        if len(used) >= k:
            coarse_of_used, _ = _kmeans(fine_centers[used], k, cfg.seed, N_INIT, weights=counts[used])
            coarse_of_fine = np.zeros(fine, np.int64)
            coarse_of_fine[used] = coarse_of_used
            labels = coarse_of_fine[fine_labels]
        else:  # degenerate data (many duplicates): fall back to k-means on the samples
            labels, _ = _kmeans(feats, k, cfg.seed, N_INIT)
        log.info("partition: %d samples -> %d fine clusters -> %d shards", n, fine, k)
    else:
        labels, _ = _kmeans(feats, k, cfg.seed, N_INIT)
        log.info("partition: %d samples -> %d shards (plain k-means)", n, k)
    labels = _canonical_order(_fill_empty(labels, feats, k), k)
    centroids = np.stack([feats[labels == c].mean(axis=0) for c in range(k)])
    return labels, centroids


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int,
            weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        # duplicates can leave fewer distinct clusters than k; _fill_empty repairs that deterministically
        warnings.filterwarnings("ignore", message="Number of distinct clusters")
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x, sample_weight=weights)
    return km.labels_.astype(np.int64), km.cluster_centers_


def _fill_empty(labels: np.ndarray, feats: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the sample farthest from the centroid of the largest cluster."""
    labels = labels.copy()
    for c in range(k):
        counts = np.bincount(labels, minlength=k)
        if counts[c]:
            continue
        big = int(np.argmax(counts))
        members = np.flatnonzero(labels == big)
        dist = ((feats[members] - feats[members].mean(axis=0)) ** 2).sum(axis=1)
        labels[members[int(np.argmax(dist))]] = c
    return labels


def _canonical_order(labels: np.ndarray, k: int) -> np.ndarray:
    """Renumber clusters by the first sample index in each, so equal partitions get equal numbers."""
    _, first = np.unique(labels, return_index=True)
    order = np.unique(labels)[np.argsort(first)]
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(len(order))
    return remap[labels]
