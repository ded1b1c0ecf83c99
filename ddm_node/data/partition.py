"""Partition: features -> k-means -> K clusters, one per expert.

Features (data/features.py) are a PCA of the flattened pixels, or encoder embeddings (the paper uses DINOv2;
`ddm-node features` computes them into an .npy file, or the dataset ships its own `features` array), streamed
in chunks. Clustering follows the paper: on large data, a fine k-means first, then the fine centroids,
weighted by their sizes, are consolidated into K coarse clusters by a second k-means; every sample takes the
coarse cluster of its fine cluster. Small data is clustered directly into K.

Auto rule (partition.fine_clusters = 0): consolidate only when N >= AUTO_MIN_SAMPLES (4096), with
fine = min(max(8K, sqrt(N)), N // 50, MAX_AUTO_FINE): at least 8 fine clusters per coarse one, about sqrt(N) of
them (1000 for a million samples), and about 50 samples or more per fine cluster. sklearn's digits (1617 train
samples) therefore gets plain k-means. An explicit fine_clusters > 0 always consolidates and must be > K and <= N.
The fine pass is exact k-means (Lloyd) below MINIBATCH_MIN_SAMPLES samples and mini-batch k-means above.

Every result is deterministic for a seed, and clusters are numbered by their smallest member index so
the numbering does not depend on k-means internals. No cluster is ever empty.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np

from ddm_node.core.config import PartitionConfig
from ddm_node.core.errors import DDMError
from ddm_node.data.datasets import Dataset
from ddm_node.data.features import Rows, array_rows, npy_rows, project

log = logging.getLogger(__name__)

AUTO_MIN_SAMPLES = 4096
MAX_AUTO_FINE = 4096
MINIBATCH_MIN_SAMPLES = 50_000  # the fine pass switches to mini-batch k-means from here on
MINIBATCH_EPOCHS = 10  # passes over the data at most (it stops earlier when the centres settle)
N_INIT_FINE = 2  # the fine pass is the expensive one; many clusters make restarts matter little
N_INIT = 8  # plain k-means and the cheap weighted consolidation


def compute_features(ds: Dataset, cfg: PartitionConfig, ids) -> np.ndarray:
    """float32 [len(ids), F] features of the samples `ids` (see data/features.py): PCA of pixels, or encoder
    features (the dataset's own, or an .npy file) projected by PCA when wider than cfg.pca_dim."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise DDMError("partition: need a non-empty 1-D list of sample ids")
    if ids.min() < 0 or ids.max() >= len(ds):
        raise DDMError(f"partition: sample ids out of range for {len(ds)} samples")
    t0 = time.perf_counter()
    order = np.argsort(ids, kind="stable")  # rows are read in file order, returned in the caller's order
    rows = feature_rows(ds, cfg)
    feats = project(rows, ids[order], cfg.pca_dim, cfg.seed, always=cfg.features == "pca")
    out = np.empty_like(feats)
    out[order] = feats
    log.info("partition: %s features %d x %d -> %d dims in %.1f s", cfg.features, len(ids), rows.dim, out.shape[1],
             time.perf_counter() - t0)
    return out


def feature_rows(ds: Dataset, cfg: PartitionConfig) -> Rows:
    """The partition's feature source for `ds`: pixels, the dataset's features, or the .npy file (one row each)."""
    if cfg.features == "pca":
        return array_rows(ds.x, f"dataset {ds.spec!r}")
    if cfg.features == "dataset":
        if ds.features is None:
            raise DDMError(f"partition.features is 'dataset' but {ds.spec!r} has no 'features' array")
        return array_rows(ds.features, f"dataset {ds.spec!r} features")
    if cfg.features != "npy":
        raise DDMError(f"partition.features must be 'pca', 'dataset' or 'npy', got {cfg.features!r}")
    rows = npy_rows(Path(cfg.features_path).expanduser())
    if rows.n != len(ds):
        raise DDMError(f"{rows.where}: {rows.n} feature rows but the dataset {ds.spec!r} has {len(ds)} samples "
                       "(one row per sample, in dataset order)")
    return rows


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
    fine = min(max(8 * k, math.isqrt(n)), n // 50, MAX_AUTO_FINE)
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
    t0 = time.perf_counter()
    if fine:
        fine_labels, fine_centers = _sample_kmeans(feats, fine, cfg.seed, N_INIT_FINE)
        counts = np.bincount(fine_labels, minlength=fine).astype(np.float64)
        used = np.flatnonzero(counts)
        if len(used) >= k:
            coarse_of_used, _ = _kmeans(fine_centers[used], k, cfg.seed, N_INIT, weights=counts[used])
            coarse_of_fine = np.zeros(fine, np.int64)
            coarse_of_fine[used] = coarse_of_used
            labels = coarse_of_fine[fine_labels]
        else:  # degenerate data (many duplicates): fall back to k-means on the samples
            labels, _ = _sample_kmeans(feats, k, cfg.seed, N_INIT)
        log.info("partition: %d samples -> %d fine clusters -> %d shards in %.1f s", n, fine, k, time.perf_counter() - t0)
    else:
        labels, _ = _sample_kmeans(feats, k, cfg.seed, N_INIT)
        log.info("partition: %d samples -> %d shards (plain k-means) in %.1f s", n, k, time.perf_counter() - t0)
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


def _sample_kmeans(x: np.ndarray, k: int, seed: int, n_init: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the samples themselves: exact below MINIBATCH_MIN_SAMPLES, mini-batch above."""
    if len(x) >= MINIBATCH_MIN_SAMPLES:
        return _minibatch_kmeans(x, k, seed)
    return _kmeans(x, k, seed, n_init)


def _minibatch_kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mini-batch k-means for the fine pass on large data: batches of at least 8 samples per centre."""
    from sklearn.cluster import MiniBatchKMeans

    batch = min(len(x), max(8192, 8 * k))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Number of distinct clusters")
        km = MiniBatchKMeans(n_clusters=k, batch_size=batch, n_init=N_INIT_FINE, max_iter=MINIBATCH_EPOCHS,
                             random_state=seed).fit(x)
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
