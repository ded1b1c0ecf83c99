"""Partition at scale (issue 14): features streamed from .npy files in chunks, PCA beyond memory, mini-batch k-means
with fine clusters consolidated into K, and `partition --features npy:PATH`."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from ddm_node.cli import main
from ddm_node.core.config import Config, DataConfig, PartitionConfig
from ddm_node.core.errors import DDMError
from ddm_node.data import features, partition
from ddm_node.data.datasets import Dataset, load_dataset
from ddm_node.data.features import npy_rows, project, write_npy
from ddm_node.data.partition import compute_features
from ddm_node.data.plan import Plan, make_plan


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import sklearn.cluster  # noqa: F401  (threadpoolctl limits only the libraries already loaded)
    import sklearn.decomposition  # noqa: F401

    with threadpool_limits(limits=1):
        yield


def blob_features(n: int, dim: int, blobs: int, seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, dim] features from `blobs` well-separated Gaussian blobs, and each row's blob."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (blobs, dim))
    blob = rng.integers(0, blobs, n)
    return (centres[blob] + rng.normal(0, noise, (n, dim))).astype(np.float32), blob


def noise_images(path, n: int, seed: int = 1) -> str:
    """Unlabeled 4x4 images of pure noise: any structure a partition finds must come from the features."""
    np.savez(path, x=np.random.default_rng(seed).integers(0, 256, (n, 4, 4), dtype=np.uint8))
    return f"npz:{path}"


# ------------------------------------------------------------------------------------------ the .npy reader


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<f2"])
def test_npy_rows_reads_chunks_like_np_load(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(features, "CHUNK_ROWS", 7)  # many spans, some holding no selected id
    a = np.random.default_rng(0).normal(size=(100, 5)).astype(dtype)
    np.save(tmp_path / "f.npy", a)
    rows = npy_rows(tmp_path / "f.npy")
    assert (rows.n, rows.dim) == (100, 5)
    for ids in (np.arange(100), np.array([0, 1, 2, 50, 99]), np.array([3, 3, 40]), np.arange(0, 100, 13)):
        np.testing.assert_array_equal(rows.gather(ids), a[ids].astype(np.float32))
        assert all(len(b) <= 7 for b in rows.select(ids))


@pytest.mark.parametrize("make, needle", [
    (lambda p: np.save(p, np.zeros((4, 3), np.int32)), "must be C-ordered float16/32/64"),
    (lambda p: np.save(p, np.asfortranarray(np.zeros((4, 3), np.float32))), "Fortran order"),
    (lambda p: np.save(p, np.zeros((4, 3, 2), np.float32)), "must be a non-empty [N, F] array"),
    (lambda p: np.save(p, np.zeros((0, 3), np.float32)), "must be a non-empty [N, F] array"),
    (lambda p: p.write_bytes(b"not an npy file at all"), "not a readable .npy array"),
    (lambda p: (np.save(p, np.zeros((40, 3), np.float32)), p.write_bytes(p.read_bytes()[:-8])), "truncated"),
], ids=["int", "fortran", "3-d", "empty", "garbage", "truncated"])
def test_npy_rows_rejects_bad_files(tmp_path, make, needle):
    path = tmp_path / "f.npy"
    make(path)
    with pytest.raises(DDMError, match="^" + str(path)) as err:
        npy_rows(path)
    assert needle in str(err.value)


def test_nan_rows_are_named(tmp_path):
    a = np.zeros((30, 2), np.float32)
    a[17, 1] = np.nan
    np.save(tmp_path / "f.npy", a)
    with pytest.raises(DDMError, match=r"rows 0..29 hold NaN"):
        npy_rows(tmp_path / "f.npy").gather(np.arange(30))


def test_write_npy_is_streamed_and_atomic(tmp_path):
    path = tmp_path / "out.npy"
    write_npy(path, 5, 2, iter([np.ones((2, 2)), np.zeros((3, 2))]))
    np.testing.assert_array_equal(np.load(path), np.r_[np.ones((2, 2)), np.zeros((3, 2))].astype(np.float32))
    before = path.read_bytes()
    with pytest.raises(DDMError, match="4 rows written, 5 expected"):
        write_npy(path, 5, 2, iter([np.ones((4, 2))]))

    def failing():
        yield np.ones((2, 2))
        raise DDMError("encoder broke")

    with pytest.raises(DDMError, match="encoder broke"):
        write_npy(path, 5, 2, failing())
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.npy"]  # no temp file left


# ------------------------------------------------------------------------------------------------ PCA


def _principal_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the column spaces of a and b (1: same subspace)."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def test_streamed_pca_matches_exact_pca(tmp_path, monkeypatch):
    """Beyond IN_MEMORY_FLOATS the PCA is fitted from a streamed covariance of a sample of rows, then applied in
    chunks: it finds the exact PCA's subspace, and its features keep the exact features' geometry."""
    rng = np.random.default_rng(3)
    loadings = rng.normal(size=(6, 40)) * np.array([9, 7, 5, 4, 3, 2.5])[:, None]  # 6 strong directions + noise
    a = (rng.normal(size=(3000, 6)) @ loadings + rng.normal(0, 0.3, (3000, 40)) + 50.0).astype(np.float32)
    np.save(tmp_path / "f.npy", a)
    rows, ids = npy_rows(tmp_path / "f.npy"), np.arange(3000)
    exact = project(rows, ids, 6, seed=0, always=True)
    monkeypatch.setattr(features, "IN_MEMORY_FLOATS", 0)
    monkeypatch.setattr(features, "CHUNK_ROWS", 256)
    monkeypatch.setattr(features, "PCA_FIT_ROWS", 3000)  # fitted on every row: the exact PCA, signs included
    streamed = project(rows, ids, 6, seed=0, always=True)
    assert streamed.shape == (3000, 6) and streamed.dtype == np.float32
    np.testing.assert_allclose(streamed, exact, atol=1e-4 * np.abs(exact).max())
    monkeypatch.setattr(features, "PCA_FIT_ROWS", 600)  # fitted on a sample: the same subspace up to sampling error
    sampled = project(rows, ids, 6, seed=0, always=True)
    assert _principal_cosines(exact, sampled).min() > 0.99
    d_exact = np.linalg.norm(exact[:200, None] - exact[None, :200], axis=-1)
    d_sampled = np.linalg.norm(sampled[:200, None] - sampled[None, :200], axis=-1)
    assert np.abs(d_exact - d_sampled).max() < 0.02 * d_exact.max()
    np.testing.assert_array_equal(sampled, project(rows, ids, 6, seed=0, always=True))  # deterministic


def test_encoder_features_narrower_than_pca_dim_are_used_as_they_are(tmp_path):
    a = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", a)
    ids = np.array([1, 4, 9])
    np.testing.assert_array_equal(project(npy_rows(tmp_path / "f.npy"), ids, 32, 0, always=False), a[ids])
    assert project(npy_rows(tmp_path / "f.npy"), ids, 4, 0, always=False).shape == (3, 3)  # wider: PCA (3 samples)


# --------------------------------------------------------------------------------- partition from features


def test_partition_with_npy_features_follows_the_features(tmp_path, capsys):
    """Noise images, blob features wider than pca_dim: each shard is one blob, so the features drove the split."""
    feats, blob = blob_features(2000, 96, 6)
    np.save(tmp_path / "f.npy", feats)
    spec = noise_images(tmp_path / "d.npz", 2000)
    out = tmp_path / "plan"
    assert main(["partition", "--dataset", spec, "--features", f"npy:{tmp_path / 'f.npy'}", "--experts", "6",
                 "--set", "partition.pca_dim=8", "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.cfg.partition.features == "npy" and plan.cfg.partition.features_path == str(tmp_path / "f.npy")
    assert len(plan.shards[0].centroid) == 8  # centroids in the projected space
    assert sorted(len(set(blob[s.ids].tolist())) for s in plan.shards) == [1] * 6
    assert len({int(blob[s.ids[0]]) for s in plan.shards}) == 6
    # the pixels alone split the blobs
    assert main(["partition", "--dataset", spec, "--experts", "6", "--out", str(tmp_path / "pixels")]) == 0
    pixels = Plan.load(tmp_path / "pixels")
    assert max(len(set(blob[s.ids].tolist())) for s in pixels.shards) > 1


def test_features_file_must_have_one_row_per_sample(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.zeros((99, 4), np.float32))
    spec = noise_images(tmp_path / "d.npz", 100)
    out = tmp_path / "plan"
    assert main(["partition", "--dataset", spec, "--features", f"npy:{tmp_path / 'f.npy'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "99 feature rows but the dataset" in err and "has 100 samples" in err, err
    assert not out.exists()
    assert main(["partition", "--features", "npy:", "--out", str(out)]) == 2
    assert "--features must be pca, dataset, npy:PATH" in capsys.readouterr().err


def test_minibatch_fine_pass_consolidates_into_k(tmp_path, monkeypatch):
    """Above MINIBATCH_MIN_SAMPLES the fine pass is mini-batch k-means into ~sqrt(N) clusters, consolidated by a
    weighted k-means of the fine centres; with blobs, every shard is still exactly one blob."""
    monkeypatch.setattr(partition, "MINIBATCH_MIN_SAMPLES", 1000)
    calls, real = [], partition._minibatch_kmeans

    def spy(x, k, seed):
        calls.append((len(x), k))
        return real(x, k, seed)

    monkeypatch.setattr(partition, "_minibatch_kmeans", spy)
    feats, blob = blob_features(6000, 48, 8, seed=2)
    np.save(tmp_path / "f.npy", feats)
    spec = noise_images(tmp_path / "d.npz", 6000)
    cfg = Config(data=DataConfig(dataset=spec, holdout_fraction=0.0),
                 partition=PartitionConfig(experts=8, features="npy", features_path=str(tmp_path / "f.npy")))
    plan = make_plan(cfg, load_dataset(spec))
    assert calls == [(6000, 77)]  # isqrt(6000) fine clusters from mini-batch k-means
    assert sorted(len(set(blob[s.ids].tolist())) for s in plan.shards) == [1] * 8
    assert make_plan(cfg, load_dataset(spec)).run_id == plan.run_id  # deterministic


def test_dataset_features_wider_than_pca_dim_are_projected():
    digits = load_dataset("digits")
    wide = np.random.default_rng(0).normal(size=(len(digits), 50)).astype(np.float32)
    ds = Dataset("digits", digits.x, digits.y, wide, 10)
    f = compute_features(ds, PartitionConfig(features="dataset", pca_dim=16), np.arange(0, 1797, 2))
    assert f.shape == (899, 16)
    ids = np.array([9, 3, 5])  # any order: rows come back in the caller's order
    np.testing.assert_array_equal(compute_features(ds, PartitionConfig(features="dataset", pca_dim=64), ids), wide[ids])
