"""The domain classifier whose features the sample-quality metrics (`metrics`) are measured in.

Inception weights are not available offline (and too slow on a CPU), so the Frechet distance is
measured in the penultimate features of a small CNN trained on the dataset itself. It is called
FD_dom, never FID: its values are only comparable between runs that use the same classifier, which
is why every score carries the sha256 of the classifier's weights.

- `train_domain_classifier` trains the CNN deterministically for a seed (CPU), on labels, or on
  k-means pseudo-labels when the dataset has none.
- `get_domain_classifier` caches it as safetensors under a name made of the dataset fingerprint and
  a hash of the training recipe; a cached file is used only if it loads and its weights hash matches
  the one recorded in it, otherwise it is retrained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ddm_node.core.config import canonical_json
from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import write_atomic

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
FEATURE_DIM = 64
WIDTHS = (16, 32, 64)
PSEUDO_CLUSTERS = 20
PSEUDO_PCA_DIM = 32
HOLDOUT_FRACTION = 0.15
BATCH_SIZE = 64
LEARNING_RATE = 5e-3
TARGET_STEPS = 300  # auto epochs: about this many optimizer steps, 2..40 epochs
MIN_SIZE, MAX_SIZE = 8, 64
_FINGERPRINT_RE = re.compile(r"^[A-Za-z0-9]{16,}$")


# ----------------------------------------------------------------------------------------------------
# The network


class DomainNet(nn.Module):
    """A small CNN for [C,H,W] images in [-1,1] (8x8 up to 32x32 and a bit beyond).

    Three 3x3 conv stages (GroupNorm, ReLU) pooled to a fixed 4x4 then 2x2 grid, so the same layout serves
    every image size; `features` is the 64-d penultimate layer before its ReLU (no dead, constant
    dimensions, so covariances stay full rank), `forward` the class logits.
    """

    def __init__(self, channels: int, image_size: int, num_classes: int, feature_dim: int = FEATURE_DIM,
                 widths: tuple[int, int, int] = WIDTHS):
        super().__init__()
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        self.feature_dim, self.widths = feature_dim, tuple(widths)
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(channels, w1, 3, padding=1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        # GroupNorm (per sample, so features never depend on the batch): ~98.5% vs ~97% held out on digits
        self.norm1, self.norm2, self.norm3 = nn.GroupNorm(4, w1), nn.GroupNorm(4, w2), nn.GroupNorm(4, w3)
        self.fc = nn.Linear(w3 * 2 * 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        # Fixed after training so features have unit RMS on the training data; part of the weights hash.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate pre-activation features, times the stored scale (unit RMS on the training data)."""
        return self._penultimate(x) * self.feature_scale

    def _penultimate(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        if h.shape[-1] > 16:  # large images: shrink early so the later convs stay cheap
            h = F.max_pool2d(h, 2)
        h = F.relu(self.norm2(self.conv2(h)))
        h = F.adaptive_avg_pool2d(h, 4)
        h = F.relu(self.norm3(self.conv3(h)))
        h = F.adaptive_avg_pool2d(h, 2)
        return self.fc(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self._penultimate(x)))


# ----------------------------------------------------------------------------------------------------
# The trained classifier


def weights_hash(net: nn.Module) -> str:
    """sha256 of the network's weights serialized by safetensors (no metadata): the classifier's identity."""
    return hashlib.sha256(st_save(_state(net))).hexdigest()


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}


@dataclass
class DomainClassifier:
    """A trained DomainNet, the sha256 of its weights and its held-out accuracy at training time."""

    net: DomainNet
    hash: str
    accuracy: float
    pseudo_labels: bool = False  # True: trained on k-means clusters (the dataset has no labels)
    num_classes: int = 0

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.net.channels, self.net.image_size, self.net.image_size)

    def features(self, x: torch.Tensor, batch: int = 512) -> np.ndarray:
        """Penultimate features [N, D] (float64) of images [N,C,H,W] in [-1,1]; eval mode, no grad.

        Values are clamped to [-1,1] first, as saving an image would, so out-of-range samples are
        judged as the images they would become.
        """
        x = check_images(x, "images", self.input_shape)
        out = []
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(x), batch):
                    chunk = x[i:i + batch].to(torch.float32).clamp(-1.0, 1.0)
                    out.append(self.net.features(chunk).to(torch.float64).numpy())
        finally:
            self.net.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, self.net.feature_dim))


def check_images(x: torch.Tensor, what: str, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`x` detached on the CPU if it is a finite float batch [N,C,H,W] of square images the classifier takes
    (of `shape` when given); else DDMError naming `what`."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise DDMError(f"{what}: expected a float tensor [N,C,H,W], got {_describe(x)}")
    if x.shape[-1] != x.shape[-2] or not MIN_SIZE <= x.shape[-1] <= MAX_SIZE:
        raise DDMError(f"{what}: images must be square, {MIN_SIZE}..{MAX_SIZE} pixels, got {tuple(x.shape[1:])}")
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise DDMError(f"{what}: shape {tuple(x.shape[1:])} does not match the classifier's {shape}")
    if len(x) and not torch.isfinite(x).all():
        raise DDMError(f"{what}: contains NaN or infinite values")
    return x.detach().cpu()


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed torch, force deterministic kernels and one intra-op thread inside the block; restore all after.

    One thread because CPU kernels split reductions by thread count: with 2 threads the weights (and so
    the hash) differ from those trained with 1. Pinned, the hash depends only on the torch build and CPU.
    The digits classifier trains in about 4 s on one core, and it is cached.
    """
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


def auto_epochs(n_train: int) -> int:
    """Epochs for about TARGET_STEPS optimizer steps, between 2 and 40."""
    steps_per_epoch = max(1, math.ceil(n_train / BATCH_SIZE))
    return int(min(40, max(2, math.ceil(TARGET_STEPS / steps_per_epoch))))


def pseudo_labels(x: torch.Tensor, seed: int = 0, clusters: int = PSEUDO_CLUSTERS) -> np.ndarray:
    """k-means cluster ids (seeded) of the images' PCA features: labels for an unlabeled dataset."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    flat = x.reshape(len(x), -1).to(torch.float64).numpy()
    k = min(clusters, len(flat))
    dim = min(PSEUDO_PCA_DIM, flat.shape[1], len(flat))
    feats = PCA(n_components=dim, random_state=seed).fit_transform(flat)
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(feats).astype(np.int64)


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(n, generator=g)
    n_hold = min(5000, max(1, round(HOLDOUT_FRACTION * n)))
    return perm[n_hold:], perm[:n_hold]


def _check_labels(x: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> None:
    if len(x) < 20:
        raise DDMError(f"training images: need at least 20, got {len(x)}")
    if y is None:
        return
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x) or y.is_floating_point():
        raise DDMError(f"labels: expected an integer tensor [{len(x)}], got {_describe(y)}")
    if num_classes < 2:
        raise DDMError(f"num_classes must be at least 2, got {num_classes}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DDMError(f"labels: values must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")


def train_domain_classifier(x: torch.Tensor, y: torch.Tensor | None, num_classes: int, seed: int = 0,
                            epochs: int | None = None) -> DomainClassifier:
    """Train a DomainNet on images x [N,C,H,W] in [-1,1] and labels y [N] (deterministic for a seed).

    With `y=None` the labels are k-means pseudo-labels (PCA features, PSEUDO_CLUSTERS clusters, seeded)
    and `num_classes` is ignored. A held-out HOLDOUT_FRACTION of the images measures accuracy.
    `epochs=None` picks about TARGET_STEPS optimizer steps (`auto_epochs`).
    """
    x = check_images(x, "training images")
    _check_labels(x, y, num_classes)
    pseudo = y is None
    if pseudo:
        labels = torch.from_numpy(pseudo_labels(x, seed))
        num_classes = int(labels.max()) + 1
        log.info("domain classifier: no labels, training on %d k-means pseudo-label clusters", num_classes)
    else:
        labels = y.detach().cpu().to(torch.int64)
    x = x.to(torch.float32).contiguous()
    train_idx, hold_idx = _split(len(x), seed)
    epochs = auto_epochs(len(train_idx)) if epochs is None else int(epochs)
    if epochs < 1:
        raise DDMError(f"epochs must be at least 1, got {epochs}")
    with _deterministic(seed):
        net = DomainNet(x.shape[1], x.shape[-1], num_classes)
        _fit(net, x[train_idx], labels[train_idx], epochs, seed)
        net.eval()
        _set_feature_scale(net, x[train_idx])
        accuracy = _accuracy(net, x[hold_idx], labels[hold_idx])
    digest = weights_hash(net)
    log.info("domain classifier %s: held-out accuracy %.3f (%d epochs, %d images)", digest[:8], accuracy,
             epochs, len(train_idx))
    return DomainClassifier(net=net, hash=digest, accuracy=accuracy, pseudo_labels=pseudo,
                            num_classes=num_classes)


def _fit(net: DomainNet, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / BATCH_SIZE)
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH_SIZE):
            idx = perm[i:i + BATCH_SIZE]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def _set_feature_scale(net: DomainNet, x: torch.Tensor) -> None:
    """Scale features to unit average variance on the training images, so FD_dom/KID have a stable range."""
    with torch.no_grad():
        f = torch.cat([net._penultimate(x[i:i + 512]) for i in range(0, len(x), 512)]).to(torch.float64)
        spread = float(f.var(0).mean().sqrt())
        net.feature_scale.fill_(1.0 / max(spread, 1e-6))


def _accuracy(net: DomainNet, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([net(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred == y).to(torch.float64).mean())


# ----------------------------------------------------------------------------------------------------
# Cache


def recipe_hash(shape: tuple[int, ...], num_classes: int, labeled: bool, seed: int, epochs: int | None) -> str:
    """First 12 hex chars of the sha256 of everything that decides the trained weights except the data."""
    recipe = {
        "version": RECIPE_VERSION, "shape": list(shape), "num_classes": num_classes if labeled else 0,
        "labeled": labeled, "seed": seed, "epochs": epochs, "feature_dim": FEATURE_DIM,
        "widths": list(WIDTHS), "batch": BATCH_SIZE, "lr": LEARNING_RATE, "holdout": HOLDOUT_FRACTION,
        "target_steps": TARGET_STEPS, "pseudo": [PSEUDO_CLUSTERS, PSEUDO_PCA_DIM] if not labeled else None,
    }
    return hashlib.sha256(canonical_json(recipe)).hexdigest()[:12]


def default_cache_dir() -> Path:
    """$DDM_CACHE_DIR, else ~/.cache/ddm-node."""
    env = os.environ.get("DDM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "ddm-node"


def cache_path(x_shape: tuple[int, ...], num_classes: int, labeled: bool, fingerprint: str,
               cache_dir: str | Path | None = None, seed: int = 0, epochs: int | None = None) -> Path:
    """Where `get_domain_classifier` keeps the classifier for this data and recipe."""
    if not isinstance(fingerprint, str) or not _FINGERPRINT_RE.match(fingerprint):
        raise DDMError(f"dataset fingerprint must be at least 16 letters/digits, got {fingerprint!r}")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    recipe = recipe_hash(tuple(x_shape), num_classes, labeled, seed, epochs)
    return folder / f"domain-{fingerprint[:16]}-{recipe}.safetensors"


def save_classifier(clf: DomainClassifier, path: str | Path) -> None:
    """Write the classifier atomically: weights plus metadata (hash, accuracy, shape) in one safetensors file."""
    meta = {
        "hash": clf.hash, "accuracy": repr(clf.accuracy), "pseudo_labels": str(clf.pseudo_labels),
        "channels": str(clf.net.channels), "image_size": str(clf.net.image_size),
        "num_classes": str(clf.net.num_classes), "feature_dim": str(clf.net.feature_dim),
        "widths": ",".join(str(w) for w in clf.net.widths),
        "recipe_version": str(RECIPE_VERSION),
    }
    write_atomic(path, st_save(_state(clf.net), metadata=meta))


def load_classifier(path: str | Path) -> DomainClassifier:
    """Load a cached classifier; raise DDMError if it cannot be parsed or its weights hash mismatches."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        meta = _read_metadata(raw)
        tensors = st_load(raw)
        channels, size, classes, dim = (int(meta[k]) for k in ("channels", "image_size", "num_classes",
                                                                 "feature_dim"))
        widths = tuple(int(w) for w in meta["widths"].split(","))
        if not (1 <= channels <= 16 and MIN_SIZE <= size <= MAX_SIZE and 2 <= classes <= 100_000
                and 1 <= dim <= 4096 and len(widths) == 3 and all(4 <= w <= 1024 and w % 4 == 0 for w in widths)):
            raise ValueError("architecture out of range")
        net = DomainNet(channels, size, classes, dim, widths)
        net.load_state_dict(tensors, strict=True)
        clf = DomainClassifier(net=net.eval(), hash=meta["hash"], accuracy=float(meta["accuracy"]),
                               pseudo_labels=meta["pseudo_labels"] == "True", num_classes=net.num_classes)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, SafetensorError) as exc:
        raise DDMError(f"{path}: unreadable domain classifier ({str(exc).splitlines()[0][:200]})") from None
    actual = weights_hash(net)
    if actual != clf.hash:
        raise DDMError(f"{path}: weights hash {actual[:12]} does not match the recorded {clf.hash[:12]}")
    return clf


def _read_metadata(raw: bytes) -> dict[str, str]:
    if len(raw) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(raw[:8], "little")
    if n > min(len(raw) - 8, 1 << 20):
        raise ValueError("bad header length")
    header = json.loads(raw[8:8 + n])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta


def get_domain_classifier(x_train: torch.Tensor, y_train: torch.Tensor | None, num_classes: int,
                          fingerprint: str, cache_dir: str | Path | None = None, seed: int = 0,
                          epochs: int | None = None) -> DomainClassifier:
    """The domain classifier for a dataset: from the cache when a valid copy exists, else trained and cached.

    The cache file is `domain-<fingerprint[:16]>-<recipe hash>.safetensors` in `cache_dir`, $DDM_CACHE_DIR
    or ~/.cache/ddm-node. A file that fails to load, whose recorded hash does not match its weights, or
    whose input shape does not fit `x_train`, is retrained and overwritten (never trusted).
    """
    x_train = check_images(x_train, "training images")
    path = cache_path(tuple(x_train.shape), num_classes, y_train is not None, fingerprint, cache_dir, seed, epochs)
    if path.exists():
        try:
            clf = load_classifier(path)
            if clf.input_shape != tuple(x_train.shape[1:]):
                raise DDMError(f"{path}: input shape {clf.input_shape} does not fit the data")
            log.info("domain classifier %s from cache %s", clf.hash[:8], path)
            return clf
        except DDMError as exc:
            log.warning("%s; retraining", exc)
    clf = train_domain_classifier(x_train, y_train, num_classes, seed=seed, epochs=epochs)
    try:
        save_classifier(clf, path)
    except OSError as exc:  # an unwritable cache costs a retraining next time, not this result
        log.warning("cannot cache the domain classifier at %s (%s)", path, exc.strerror or exc)
    return clf
