"""Sample-quality metrics: domain classifier (determinism, cache), FD_dom, KID, precision/recall.

The classifier is trained once per module on sklearn's digits (loaded directly, not through the
dataset loader). Everything runs single-threaded: on the shared 2-core machine multi-threaded BLAS
under load is an order of magnitude slower.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from ddm_node.core.errors import DDMError
from ddm_node.ensemble import domain_classifier
from ddm_node.ensemble.domain_classifier import DomainClassifier, get_domain_classifier, train_domain_classifier
from ddm_node.ensemble.metrics import (
    Scores,
    bootstrap_fd,
    evaluate,
    frechet_distance,
    kid,
    mmd2,
    precision_recall,
)

FINGERPRINT = "0123456789abcdef" * 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.int64)


@pytest.fixture(scope="module")
def clf(digits) -> DomainClassifier:
    x, y = digits
    return train_domain_classifier(x, y, 10, seed=0)


@pytest.fixture(scope="module")
def halves(digits) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = digits
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[: len(x) // 2]], x[perm[len(x) // 2:]]


@pytest.fixture(scope="module")
def scores(clf, halves) -> dict[str, Scores]:
    ref, other = halves
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    blurred = F.conv2d(F.pad(other, (1, 1, 1, 1), mode="replicate"), kernel[None, None])
    noise = torch.randn(other.shape, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    mean_image = ref.mean(0, keepdim=True).expand_as(other).contiguous()
    cases = {"real": other, "blur": blurred, "noise": noise, "mean": mean_image}
    return {name: evaluate(s, ref, clf, seed=0) for name, s in cases.items()}


# ---------------------------------------------------------------------------------------------------
# Classifier


def test_classifier_accuracy_and_features(clf, digits):
    x, _ = digits
    assert clf.accuracy >= 0.95
    assert not clf.pseudo_labels and clf.num_classes == 10
    assert len(clf.hash) == 64 and clf.hash == domain_classifier.weights_hash(clf.net)
    f = clf.features(x[:100], batch=32)
    assert f.shape == (100, clf.net.feature_dim) and 64 <= f.shape[1] <= 128
    assert np.allclose(f, clf.features(x[:100], batch=512), atol=1e-5)  # batching does not change features
    assert (f.std(0) > 0).all()  # no dead (constant) feature dimensions
    with pytest.raises(DDMError, match="shape"):
        clf.features(torch.zeros(4, 1, 16, 16))
    with pytest.raises(DDMError, match="NaN"):
        clf.features(torch.full((4, 1, 8, 8), float("nan")))


def test_training_is_deterministic_and_leaves_global_state(clf, digits, tmp_path):
    """A second training (through the empty cache, with 2 threads set outside) gives the same weights
    hash as the first (trained with 1); RNG state, flags and thread count are restored."""
    x, y = digits
    rng_before = torch.get_rng_state()
    det_before = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    try:
        again = get_domain_classifier(x, y, 10, FINGERPRINT, cache_dir=tmp_path)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert again.hash == clf.hash
    assert again.accuracy == clf.accuracy
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == det_before
    files = list(tmp_path.glob("domain-*.safetensors"))
    assert files == [domain_classifier.cache_path(tuple(x.shape), 10, True, FINGERPRINT, tmp_path)]
    assert files[0].name.startswith(f"domain-{FINGERPRINT[:16]}-")
    assert domain_classifier.load_classifier(files[0]).hash == clf.hash


def test_cache_hit_does_not_retrain_and_corruption_retrains(clf, digits, tmp_path, monkeypatch):
    x, y = digits
    path = domain_classifier.cache_path(tuple(x.shape), 10, True, FINGERPRINT, tmp_path)
    domain_classifier.save_classifier(clf, path)
    calls = []

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite a valid cache file")

    monkeypatch.setattr(domain_classifier, "train_domain_classifier", no_training)
    hit = get_domain_classifier(x, y, 10, FINGERPRINT, cache_dir=tmp_path)
    assert hit.hash == clf.hash and hit.accuracy == clf.accuracy
    assert np.allclose(hit.features(x[:50]), clf.features(x[:50]))

    def counted(*args, **kwargs):
        # stands in for a retraining, which test_training_is_deterministic... shows gives clf's weights
        calls.append(1)
        return clf

    monkeypatch.setattr(domain_classifier, "train_domain_classifier", counted)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # flip a bit in the tensor data: loads fine, hash no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(DDMError, match="does not match"):
        domain_classifier.load_classifier(path)
    fixed = get_domain_classifier(x, y, 10, FINGERPRINT, cache_dir=tmp_path)
    assert calls == [1] and fixed.hash == clf.hash
    assert domain_classifier.load_classifier(path).hash == clf.hash  # the retrained copy replaced the bad file

    path.write_bytes(path.read_bytes()[:1000])  # truncated: cannot be loaded at all
    with pytest.raises(DDMError, match="unreadable"):
        domain_classifier.load_classifier(path)
    assert get_domain_classifier(x, y, 10, FINGERPRINT, cache_dir=tmp_path).hash == clf.hash
    assert calls == [1, 1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_cache_location_and_bad_fingerprint(digits, tmp_path, monkeypatch):
    x, y = digits
    monkeypatch.setenv("DDM_CACHE_DIR", str(tmp_path / "env"))
    path = domain_classifier.cache_path(tuple(x.shape), 10, True, FINGERPRINT)
    assert path.parent == tmp_path / "env"
    assert path != domain_classifier.cache_path(tuple(x.shape), 10, False, FINGERPRINT)  # unlabeled: another recipe
    assert path != domain_classifier.cache_path(tuple(x.shape), 10, True, FINGERPRINT, seed=1)
    monkeypatch.delenv("DDM_CACHE_DIR")
    assert domain_classifier.default_cache_dir() == domain_classifier.Path.home() / ".cache" / "ddm-node"
    with pytest.raises(DDMError, match="fingerprint"):
        get_domain_classifier(x, y, 10, "../../etc", cache_dir=tmp_path)


def test_unlabeled_data_uses_pseudo_labels(digits, halves):
    x, _ = digits
    pseudo = train_domain_classifier(x, None, 0, seed=0, epochs=4)
    assert pseudo.pseudo_labels and pseudo.num_classes == domain_classifier.PSEUDO_CLUSTERS
    assert pseudo.accuracy > 0.7  # held-out accuracy on the cluster labels
    ref, other = halves
    real = evaluate(other, ref, pseudo)
    noise = evaluate(torch.rand(other.shape, generator=torch.Generator().manual_seed(2)) * 2 - 1, ref, pseudo)
    assert noise.fd_dom > 10 * real.fd_dom


def test_bad_training_input(digits):
    x, y = digits
    with pytest.raises(DDMError, match="labels"):
        train_domain_classifier(x, y[:10], 10)
    with pytest.raises(DDMError, match="labels"):
        train_domain_classifier(x, y, 5)
    with pytest.raises(DDMError, match="float tensor"):
        train_domain_classifier(x[:, 0], y, 10)


# ---------------------------------------------------------------------------------------------------
# Scores on digits


def test_fd_dom_separates_real_from_degraded(scores):
    real, blur, noise, mean = (scores[k].fd_dom for k in ("real", "blur", "noise", "mean"))
    assert real < 1.0
    assert blur > 5 * real
    assert noise > 10 * real and noise > 1.5 * blur
    assert mean > 2 * noise


def test_kid_near_zero_for_real_and_large_for_noise(scores):
    real, noise = scores["real"], scores["noise"]
    assert abs(real.kid) < 0.05 and abs(real.kid) < 2 * real.kid_std + 0.01
    assert noise.kid > 20 * max(abs(real.kid), 0.01)
    assert noise.kid - 5 * noise.kid_std > 0


def test_precision_recall_on_digits(scores):
    real, noise, mean = scores["real"], scores["noise"], scores["mean"]
    assert real.precision > 0.85 and real.recall > 0.85
    assert noise.precision < 0.6 and noise.precision < real.precision - 0.3
    assert mean.recall < 0.05  # a collapsed generator covers none of the real manifold


def test_scores_line(scores, clf):
    line = scores["real"].line()
    assert line.startswith("FD_dom ") and "FID" not in line
    assert f"classifier {clf.hash[:8]}..." in line and f"n={scores['real'].n}" in line
    assert "KID " in line and "±" in line and " P " in line and " R " in line


def test_evaluate_rejects_bad_samples(clf, halves):
    ref, _ = halves
    with pytest.raises(DDMError, match="shape"):
        evaluate(torch.zeros(10, 3, 8, 8), ref, clf)
    with pytest.raises(DDMError, match="at least 4"):
        evaluate(ref[:2], ref, clf)


# ---------------------------------------------------------------------------------------------------
# Metric functions on synthetic features


def test_frechet_identical_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 4)) @ rng.normal(size=(4, 4)) + 3.0
    assert frechet_distance(a, a) < 1e-8
    b = rng.normal(size=(20000, 4)) @ np.linalg.cholesky(np.cov(a, rowvar=False)).T + a.mean(0)
    assert frechet_distance(a, b) < 0.05 * np.trace(np.cov(a, rowvar=False))


def test_frechet_closed_form_1d_and_diagonal():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, size=(500, 1)), rng.normal(-0.5, 0.5, size=(300, 1))
    want = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    # these point sets have exactly diagonal sample covariance diag(2 s^2 / 3)
    def cross(mu, s):
        pts = np.array([[s[0], 0], [-s[0], 0], [0, s[1]], [0, -s[1]]], dtype=float)
        return pts + np.asarray(mu, dtype=float)
    p, q = cross([1.0, 2.0], [3.0, 1.0]), cross([0.0, -1.0], [1.0, 4.0])
    k = np.sqrt(2 / 3)
    want = 1.0 + 9.0 + (k * 3 - k * 1) ** 2 + (k * 1 - k * 4) ** 2
    assert frechet_distance(p, q) == pytest.approx(want, rel=1e-9)
    # population closed form for diagonal Gaussians, from large samples
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.0])
    a = rng.normal(size=(200000, 3)) * s1 + 1.0
    b = rng.normal(size=(200000, 3)) * s2
    assert frechet_distance(a, b) == pytest.approx(3.0 + ((s1 - s2) ** 2).sum(), rel=0.02)


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FD through the symmetric form tr (S1^1/2 S2 S1^1/2)^1/2, with eigh only (no sqrtm)."""
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum())


def test_frechet_general_covariance_and_singular():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.3
    assert frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-6)
    # a constant feature (zero variance): same value as without it
    a1, b1 = rng.normal(size=(50, 1)), rng.normal(2.0, 1.0, size=(40, 1))
    pad = lambda f: np.hstack([f, np.full((len(f), 1), 7.0)])  # noqa: E731
    assert frechet_distance(pad(a1), pad(b1)) == pytest.approx(frechet_distance(a1, b1), rel=1e-4)
    # fewer samples than dimensions: both covariances singular
    few_a, few_b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.5
    assert frechet_distance(few_a, few_b) == pytest.approx(_reference_fd(few_a, few_b), rel=1e-3)
    with pytest.raises(DDMError, match="dimensions differ"):
        frechet_distance(a, b[:, :3])
    with pytest.raises(DDMError, match="finite"):
        frechet_distance(np.full((5, 2), np.nan), b[:, :2])


def test_domain_net_sizes():
    for channels, size in ((1, 8), (1, 16), (1, 28), (3, 32)):
        net = domain_classifier.DomainNet(channels, size, 7)
        x = torch.rand(5, channels, size, size) * 2 - 1
        assert net(x).shape == (5, 7) and net.features(x).shape == (5, domain_classifier.FEATURE_DIM)


def test_kid_unbiased_and_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8))
    same, same_std = kid(a, b, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    shifted, shifted_std = kid(a, b + 1.0, subsets=20, subset_size=200)
    assert shifted > 10 * max(abs(same), same_std) and shifted > 5 * shifted_std
    assert kid(a, b, subsets=5, seed=1) == kid(a, b, subsets=5, seed=1)
    assert kid(a[:30], b, subsets=3)[0] == pytest.approx(kid(a[:30], b, subsets=3)[0])  # subsets shrink to n


def test_precision_recall_synthetic():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 5))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # real has two far-apart modes, fake only one: precision stays high, recall halves
    two = np.vstack([rng.normal(size=(200, 5)), rng.normal(size=(200, 5)) + 20.0])
    p, r = precision_recall(two, rng.normal(size=(200, 5)))
    assert p > 0.8 and 0.4 < r < 0.55
    with pytest.raises(DDMError, match="k must"):
        precision_recall(real, real, k=0)


class _Features(torch.nn.Module):
    """The domain classifier's features as a torch module: torchmetrics' `feature` argument."""

    def __init__(self, clf: DomainClassifier):
        super().__init__()
        self.clf = clf
        self.num_features = domain_classifier.FEATURE_DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.clf.features(x))


def test_fd_and_kid_match_torchmetrics_with_the_same_features(clf, halves):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    ref, other = halves[0][:400], halves[1][:400]
    blurred = (other + 0.3 * torch.randn(other.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    fr, fs = clf.features(ref), clf.features(blurred)
    fid = FrechetInceptionDistance(feature=_Features(clf))
    fid.update(ref, real=True)
    fid.update(blurred, real=False)
    assert frechet_distance(fr, fs) == pytest.approx(float(fid.compute()), rel=1e-5)
    # one subset of every row: torchmetrics' random subset is then a permutation, and MMD^2 is the full one
    tm_kid = KernelInceptionDistance(feature=_Features(clf), subsets=1, subset_size=len(ref))
    tm_kid.update(ref, real=True)
    tm_kid.update(blurred, real=False)
    assert mmd2(fr, fs) == pytest.approx(float(tm_kid.compute()[0]), rel=1e-5)


def test_kid_spread_includes_both_sides():
    """Subsets drawn with replacement from both sets: the std is the spread over independent reference and sample
    sets (a subset the size of each set without replacement would give the same value every time: std 0)."""
    rng = np.random.default_rng(5)
    fresh = [mmd2(rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 0.3) for _ in range(200)]
    a, b = rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 0.3
    value, std = kid(a, b, subsets=200, subset_size=100)
    assert 0.6 < std / np.std(fresh) < 1.6
    # duplicated rows are not counted as pairs: the bootstrap mean stays near the full-set estimate
    assert abs(value - mmd2(a, b)) < 0.3 * np.std(fresh)


def test_bootstrap_fd_is_paired():
    rng = np.random.default_rng(6)
    ref, s = rng.normal(size=(300, 4)), rng.normal(size=(200, 4))
    worse = s * 1.5
    draws = bootstrap_fd(ref, [s, s.copy(), worse], rounds=50, seed=1)
    assert draws.shape == (3, 50)
    assert np.array_equal(draws[0], draws[1])  # the same rows in every round
    assert (draws[2] > draws[0]).all()
    assert np.array_equal(draws, bootstrap_fd(ref, [s, s.copy(), worse], rounds=50, seed=1))
    with pytest.raises(DDMError, match="same number of rows"):
        bootstrap_fd(ref, [s, s[:100]])
