"""Routers p(k | x_t, t) and ensemble sampling over in-memory experts. Pure math: no files, no network."""

from router.centroid import CentroidRouter, ClusterStats
from router.ensemble import EnsembleVelocity, Expert
from router.learned import LearnedRouter, RouterNet, train_router
from router.sampler import sample

__all__ = [
    "CentroidRouter",
    "ClusterStats",
    "EnsembleVelocity",
    "Expert",
    "LearnedRouter",
    "RouterNet",
    "sample",
    "train_router",
]
