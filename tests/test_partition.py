"""Partitioning (features, k-means, fine -> coarse consolidation) and the plan file / run id."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from ddm_node.core.config import Config, DataConfig, ModelConfig, PartitionConfig, canonical_json
from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.data import partition
from ddm_node.data.datasets import Dataset, load_dataset, split_indices
from ddm_node.data.partition import cluster, compute_features, fine_cluster_count
from ddm_node.data.plan import PLAN_FILE, Plan, Shard, check_dataset, make_plan


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """k-means/PCA threads spin against each other on a shared 2-core machine; one thread is far faster."""
    import sklearn.cluster  # noqa: F401  (threadpoolctl limits only the libraries already loaded)
    import sklearn.decomposition  # noqa: F401

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_plan(digits) -> Plan:
    return make_plan(Config(), digits)


def _wcss(feats: np.ndarray, labels: np.ndarray) -> float:
    """Within-cluster sum of squared distances to the cluster means."""
    return float(sum(((feats[labels == c] - feats[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


# ------------------------------------------------------------------------------------------- features


def test_pca_features_shape_and_clipping(digits):
    ids = np.arange(0, 1797, 3)
    f = compute_features(digits, PartitionConfig(pca_dim=16), ids)
    assert f.shape == (len(ids), 16) and f.dtype == np.float32
    assert compute_features(digits, PartitionConfig(pca_dim=500), ids).shape == (len(ids), 64)  # 8x8 pixels
    assert compute_features(digits, PartitionConfig(pca_dim=32), ids[:5]).shape == (5, 5)  # 5 samples
    np.testing.assert_array_equal(f, compute_features(digits, PartitionConfig(pca_dim=16), ids))


def test_dataset_features(digits):
    feats = np.arange(1797 * 2, dtype=np.float32).reshape(1797, 2)
    ds = Dataset("digits", digits.x, digits.y, feats, 10)
    ids = np.array([4, 7, 100])
    np.testing.assert_array_equal(compute_features(ds, PartitionConfig(features="dataset"), ids), feats[ids])
    with pytest.raises(DDMError, match="no 'features' array"):
        compute_features(digits, PartitionConfig(features="dataset"), ids)
    with pytest.raises(DDMError, match="out of range"):
        compute_features(digits, PartitionConfig(), [0, 1797])


# --------------------------------------------------------------------------------------------- cluster


def test_cluster_digits_deterministic_nonempty_ordered(digits):
    cfg = PartitionConfig(experts=4, seed=0)
    train, _ = split_indices(len(digits), 0.1, 0)
    feats = compute_features(digits, cfg, train)
    assert fine_cluster_count(len(feats), 4, cfg) == 0  # small data: plain k-means
    labels, centroids = cluster(feats, 4, cfg)
    again, _ = cluster(feats, 4, cfg)
    assert np.array_equal(labels, again)
    assert labels.shape == (len(train),) and set(labels.tolist()) == {0, 1, 2, 3}
    _, first = np.unique(labels, return_index=True)
    assert (np.diff(first) > 0).all() and labels[0] == 0  # numbered by first member
    assert centroids.shape == (4, feats.shape[1])
    np.testing.assert_allclose(centroids[2], feats[labels == 2].mean(0), rtol=1e-5, atol=1e-6)


def test_digits_clusters_beat_random_partition(digits):
    cfg = PartitionConfig(experts=4, seed=0)
    train, _ = split_indices(len(digits), 0.1, 0)
    feats = compute_features(digits, cfg, train).astype(np.float64)
    labels, _ = cluster(feats, 4, cfg)
    random_labels = np.random.default_rng(0).permutation(labels)  # same shard sizes
    assert _wcss(feats, labels) < 0.85 * _wcss(feats, random_labels)
    # clusters also group digit classes: the majority class of a shard is far above the 10% of chance
    y = digits.y[train]
    purity = sum(np.bincount(y[labels == c]).max() for c in range(4)) / len(y)
    assert purity > 0.3


def test_cluster_errors_and_degenerate_data():
    with pytest.raises(DDMError, match="exceeds the 3 training samples"):
        cluster(np.zeros((3, 2)), 4, PartitionConfig())
    labels, _ = cluster(np.zeros((10, 3)), 3, PartitionConfig())  # all duplicates: still no empty shard
    assert sorted(np.bincount(labels, minlength=3) > 0) == [True, True, True]
    with pytest.raises(DDMError, match="must be greater than partition.experts"):
        fine_cluster_count(10_000, 8, PartitionConfig(fine_clusters=8))
    with pytest.raises(DDMError, match="exceeds the 50 samples"):
        fine_cluster_count(50, 2, PartitionConfig(fine_clusters=60))
    # auto: about sqrt(N) fine clusters (at least 8 per shard, about 50 samples or more each, at most 4096)
    assert fine_cluster_count(100_000, 8, PartitionConfig()) == 316
    assert fine_cluster_count(1_000_000, 8, PartitionConfig()) == 1000
    assert fine_cluster_count(4096, 8, PartitionConfig()) == 64 == fine_cluster_count(4096, 4, PartitionConfig())
    assert fine_cluster_count(10**8, 8, PartitionConfig()) == 4096
    assert fine_cluster_count(4000, 8, PartitionConfig()) == 0


def test_explicit_fine_clusters_on_small_data(digits):
    cfg = PartitionConfig(experts=4, fine_clusters=40)
    feats = compute_features(digits, cfg, np.arange(len(digits)))
    labels, _ = cluster(feats, 4, cfg)
    assert np.bincount(labels, minlength=4).min() > 0


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> tuple[str, np.ndarray]:
    """5000 4x4 images drawn from 8 well-separated Gaussian blobs, saved as npz (labels = blob)."""
    rng = np.random.default_rng(7)
    centers = rng.uniform(-0.7, 0.7, size=(8, 16))
    blob = rng.integers(0, 8, 5000)
    x = np.clip(centers[blob] + rng.normal(0, 0.04, size=(5000, 16)), -1, 1).astype(np.float32)
    path = tmp_path_factory.mktemp("blobs") / "blobs.npz"
    np.savez(path, x=x.reshape(5000, 1, 4, 4), y=blob)
    return f"npz:{path}", blob


def test_fine_to_coarse_consolidation(blobs, monkeypatch):
    spec, blob = blobs
    ds = load_dataset(spec)
    calls = []
    real = partition._kmeans

    def spy(x, k, seed, n_init, weights=None):
        calls.append((len(x), k, weights))
        return real(x, k, seed, n_init, weights)

    monkeypatch.setattr(partition, "_kmeans", spy)
    cfg = Config(data=DataConfig(dataset=spec), partition=PartitionConfig(experts=8, pca_dim=8),
                 model=ModelConfig(image_size=4, channels=1, num_classes=8))
    plan = make_plan(cfg, ds)
    n_train = 5000 - 500
    assert [(n, k) for n, k, _ in calls] == [(n_train, 67), (67, 8)]  # fine pass (sqrt(4500)), then consolidation
    assert calls[0][2] is None and calls[1][2].sum() == n_train  # coarse pass weighted by fine sizes
    assert sum(len(s.ids) for s in plan.shards) == n_train
    for s in plan.shards:  # each shard is exactly one blob
        assert len(set(blob[s.ids].tolist())) == 1
    assert len({int(blob[s.ids[0]]) for s in plan.shards}) == 8


# ------------------------------------------------------------------------------------------------ plan


def test_make_plan_shards(digits, digits_plan):
    plan = digits_plan
    cfg = Config()
    train, held = split_indices(len(digits), cfg.data.holdout_fraction, cfg.data.split_seed)
    assert plan.eval_ids == held.tolist()
    ids = np.concatenate([s.ids for s in plan.shards])
    assert np.array_equal(np.sort(ids), train)  # shards cover the train ids, disjoint
    assert len(plan.shards) == cfg.partition.experts
    assert all(s.ids == sorted(s.ids) and s.ids for s in plan.shards)
    assert [s.index for s in plan.shards] == list(range(4))
    assert plan.shape == [1, 8, 8] and plan.num_classes == 10 and plan.n_samples == 1797
    assert plan.fingerprint == digits.fingerprint() and plan.dataset == "digits"
    # the defaults leave the model's data fields unset; the plan takes them from digits: 8x8, 1 channel, 10 classes
    assert cfg.model.image_size is None and cfg.model.channels is None and cfg.model.num_classes is None
    assert plan.cfg == dataclasses.replace(cfg, model=ModelConfig(image_size=8, channels=1, num_classes=10, text_dim=0)).validate()
    assert make_plan(Config(), digits).run_id == plan.run_id  # deterministic
    other = make_plan(Config(partition=PartitionConfig(seed=1)), digits)
    assert other.run_id != plan.run_id


def test_plan_save_load_round_trip(digits_plan, tmp_path):
    path = digits_plan.save(tmp_path)
    assert path == tmp_path / PLAN_FILE
    raw = path.read_bytes()
    assert raw == digits_plan.to_bytes()
    assert hashlib.sha256(raw).hexdigest() == digits_plan.run_id
    loaded = Plan.load(tmp_path, expected_run_id=digits_plan.run_id)
    assert loaded == digits_plan and loaded.run_id == digits_plan.run_id
    assert Plan.load(path) == digits_plan
    assert [p.name for p in tmp_path.iterdir()] == [PLAN_FILE]  # no temp files left behind


def test_tampered_plan_fails_expected_run_id(digits_plan, tmp_path):
    data = json.loads(digits_plan.to_bytes())
    data["shards"][0]["ids"].pop()  # still a well-formed plan, just a different one
    (tmp_path / PLAN_FILE).write_bytes(canonical_json(data))
    with pytest.raises(IntegrityError, match="expected"):
        Plan.load(tmp_path, expected_run_id=digits_plan.run_id)
    assert Plan.load(tmp_path).run_id != digits_plan.run_id
    with pytest.raises(DDMError, match="64 lowercase hex"):
        Plan.load(tmp_path, expected_run_id="abc")
    with pytest.raises(DDMError, match="cannot read plan"):
        Plan.load(tmp_path / "nothing")


def _mutated(plan: Plan, change) -> bytes:
    data = json.loads(plan.to_bytes())
    change(data)
    return canonical_json(data)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["shards"][1].update(ids=sorted(d["shards"][1]["ids"] + d["shards"][0]["ids"][:1])), "disjoint"),
    (lambda d: d["shards"][1].update(ids=sorted(d["shards"][1]["ids"] + d["eval_ids"][-1:])), "disjoint"),
    (lambda d: d["shards"][3]["ids"].append(1797), r"strictly increasing ids in \[0, 1797\)"),
    (lambda d: d["shards"][0]["ids"].reverse(), "strictly increasing"),
    (lambda d: d["shards"][0].update(ids=[]), "empty"),
    (lambda d: d["shards"][0].update(ids=[True]), "list of integers"),
    (lambda d: d["shards"][2].update(index=5), "index is 5, expected 2"),
    (lambda d: d["shards"][0].update(centroid=[float("nan")] * len(d["shards"][0]["centroid"])), "finite"),
    (lambda d: d["shards"][0]["centroid"].pop(), "centroid has"),
    (lambda d: d.update(shards=[]), "non-empty list"),
    (lambda d: d.update(fingerprint="xyz"), "fingerprint"),
    (lambda d: d.update(version=3), "unsupported plan version"),
    (lambda d: d.update(version=2), "plan field missing: packs"),  # version 2 records the data packs
    (lambda d: d.update(packs=None), "plan field unknown: packs"),  # version 1 has none
    (lambda d: d.update(extra=1), "unknown: extra"),
    (lambda d: d.pop("eval_ids"), "missing: eval_ids"),
    (lambda d: d.update(shape=[1, 8]), "shape"),
    (lambda d: d.update(n_samples="1797"), "n_samples"),
    (lambda d: d["config"]["train"].update(bogus=1), "unknown config key 'train.bogus'"),
    (lambda d: d["config"]["partition"].update(experts=5), "experts 5 != 4 shards"),
    (lambda d: d["config"]["data"].update(dataset="mnist"), "data.dataset"),
])
def test_plan_rejects_malformed(digits_plan, change, message):
    raw = _mutated(digits_plan, change)
    with pytest.raises(DDMError, match=message) as err:
        Plan.from_bytes(raw, "peer plan")
    assert str(err.value).startswith("peer plan: ") and "\n" not in str(err.value)


def test_plan_rejects_non_json_and_non_canonical(digits_plan):
    with pytest.raises(DDMError, match="not valid JSON"):
        Plan.from_bytes(b"\xff{", "p")
    with pytest.raises(DDMError, match="JSON object"):
        Plan.from_bytes(b"[]", "p")
    pretty = json.dumps(json.loads(digits_plan.to_bytes()), indent=1).encode()
    with pytest.raises(DDMError, match="canonical"):
        Plan.from_bytes(pretty, "p")


def test_shard_lookup(digits_plan):
    assert digits_plan.shard(2) is digits_plan.shards[2]
    assert isinstance(digits_plan.shard(0), Shard)
    for bad in (4, -1, True):
        with pytest.raises(DDMError, match=r"shard .* out of range \(plan has 4 shards\)"):
            digits_plan.shard(bad)


def test_check_dataset(digits, digits_plan):
    check_dataset(digits_plan, digits)
    x = digits.x.copy()
    x[5] = -x[5]
    other = Dataset("digits", x, digits.y, None, 10)
    with pytest.raises(DDMError, match="fingerprint") as err:
        check_dataset(digits_plan, other)
    assert other.fingerprint()[:16] in str(err.value) and digits_plan.fingerprint[:16] in str(err.value)


def test_make_plan_checks_config_against_dataset(digits):
    with pytest.raises(DDMError, match="does not match the dataset"):
        make_plan(Config(data=DataConfig(dataset="fashion-mnist")), digits)
    with pytest.raises(DDMError, match="image_size 28"):
        make_plan(Config(model=ModelConfig(image_size=28)), digits)
    with pytest.raises(DDMError, match="channels"):
        make_plan(Config(model=ModelConfig(channels=3)), digits)
    with pytest.raises(DDMError, match="num_classes"):
        make_plan(Config(model=ModelConfig(num_classes=7)), digits)
    unconditional = make_plan(Config(model=ModelConfig(num_classes=0), partition=PartitionConfig(experts=2)), digits)
    assert len(unconditional.shards) == 2
    with pytest.raises(DDMError, match="exceeds"):
        tiny = Dataset("digits", digits.x[:3], None, None, 0)
        make_plan(Config(model=ModelConfig(num_classes=0)), tiny)


def test_plan_cfg_round_trips_through_file(digits_plan, tmp_path):
    digits_plan.save(tmp_path)
    cfg = Plan.load(tmp_path).cfg
    assert cfg == digits_plan.cfg and dataclasses.asdict(cfg)["train"]["steps"] == Config().train.steps
