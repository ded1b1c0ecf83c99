"""`ddm-node encode`: a dataset's images through a VAE into a `latents:DIR` dataset.

DIR holds x.npy (float32 [N, C, h, w], memory-mappable), y.npy (int64 labels) and features.npy (float32 [N, F]) when
the dataset has them, and vae.json (which VAE, its scaling and shift, sha256 of its files, the source dataset's spec
and fingerprint). Images go in as the VAE wants them: grayscale repeated to the VAE's three channels (any other
channel mismatch is an error), and resized (bicubic, antialiased) to `size`, by default the image size rounded up to
a multiple of the VAE's downsampling factor (Fashion-MNIST's 28 stays 28 for a factor of 2 or 4, becomes 32 for SD's
8). The latent of an image is the posterior mean (no sampling noise), so an encode is reproducible.

Writing is atomic and resumable: everything is written into `.DIR.partial/` beside DIR, with progress.json saying
how many rows of x.npy are written (flushed first) and for which dataset, VAE and size; a rerun with the same inputs
continues there, any other input starts over; the finished directory is renamed to DIR. An interrupted encode never
leaves a half dataset at DIR, and an existing DIR is never replaced: a rerun that finds DIR encoded from the same
dataset, VAE and size does nothing, a DIR holding anything else is an error.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm_node.core.errors import DDMError
from ddm_node.core.jsonsafe import load_file
from ddm_node.core.manifest import commit_dir, write_atomic
from ddm_node.data.datasets import Dataset
from ddm_node.data.vae import Vae, to_vae_input
from ddm_node.data.vae_ref import VAE_JSON, VaeJson, read_vae_json

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


@dataclass(frozen=True)
class EncodedLatents:
    """What `encode_latents` did: where, how many rows, the latent shape, and the rows found already written."""

    path: Path
    n: int
    shape: tuple[int, int, int]
    resumed_at: int  # rows a previous run had written (0: a fresh start)
    already: bool = False  # DIR already held these latents: nothing was done


def encode_size(vae: Vae, image_size: int, size: int | None) -> int:
    """The side images are encoded at: `size` when given (a multiple of the VAE's factor), else the image size
    rounded up to one."""
    f = vae.factor
    if size is None:
        return -(-image_size // f) * f
    if size < f or size % f:
        raise DDMError(f"--size {size} must be a multiple of the VAE's downsampling factor {f}")
    return size


def encode_latents(ds: Dataset, vae: Vae, out: str | Path, batch: int = 64, size: int | None = None,
                   on_batch: Callable[[int], None] | None = None) -> EncodedLatents:
    """Encode every image of `ds` into the latents directory `out` (module docstring); `on_batch(rows done)`."""
    out = Path(out)
    c, h, w = ds.shape
    if ds.latent:
        raise DDMError(f"dataset {ds.spec!r} already holds latents; encode images")
    if c != vae.in_channels and not (c == 1 and vae.in_channels == 3):
        raise DDMError(f"VAE {vae.source} takes {vae.in_channels}-channel images; dataset {ds.spec!r} has {c}")
    if h != w:
        raise DDMError(f"dataset {ds.spec!r} has {h}x{w} images; encode needs square images")
    if batch < 1:
        raise DDMError(f"--batch must be >= 1, got {batch}")
    side = encode_size(vae, h, size)
    meta = VaeJson(vae.ref(c, side), ds.spec, ds.fingerprint())
    done = _existing(out, meta)
    if done is not None:
        return done
    stage = out.with_name(f".{out.name}.partial")
    key = {"vae": meta.to_dict(), "n": len(ds)}
    start = _resume_point(stage, key)
    shape = (vae.model.config.latent_channels, side // vae.factor, side // vae.factor)
    x = np.lib.format.open_memmap(stage / "x.npy", mode="r+" if start else "w+", dtype=np.float32,
                                  shape=(len(ds), *shape))
    if x.shape != (len(ds), *shape):
        raise DDMError(f"{stage / 'x.npy'}: shape {x.shape} is not {(len(ds), *shape)}; delete {stage}")
    for a in range(start, len(ds), batch):
        z = vae.encode(to_vae_input(ds.x[a:a + batch], vae.in_channels, side)).numpy()
        if z.shape[1:] != shape or not np.isfinite(z).all():
            raise DDMError(f"VAE {vae.source} gave latents of shape {z.shape[1:]} (expected {shape}) or non-finite "
                           f"values for images {a}..{a + len(z) - 1}")
        x[a:a + len(z)] = z
        x.flush()  # rows on disk before progress counts them
        write_atomic(stage / PROGRESS, json.dumps(key | {"done": a + len(z)}).encode())
        if on_batch is not None:
            on_batch(a + len(z))
    del x
    _finish(stage, out, ds, meta)
    return EncodedLatents(out, len(ds), shape, start)


def _existing(out: Path, meta: VaeJson) -> EncodedLatents | None:
    """An EncodedLatents for `out` when it already holds these latents; DDMError when it holds anything else."""
    if not out.exists():
        return None
    try:
        found = read_vae_json(out) if out.is_dir() else None
    except DDMError:
        found = None
    if found is None or found.to_dict() != meta.to_dict() or not (out / "x.npy").is_file():
        raise DDMError(f"{out} exists and does not hold latents of {meta.dataset} by this VAE at size "
                       f"{meta.vae.image_size}; remove it or choose another --out")
    shape = np.load(out / "x.npy", mmap_mode="r").shape
    log.info("%s already holds these latents; nothing to do", out)
    return EncodedLatents(out, shape[0], tuple(shape[1:]), shape[0], already=True)


def _resume_point(stage: Path, key: dict) -> int:
    """Rows already written to stage/x.npy by an earlier run with the same inputs (0 after starting over)."""
    if stage.is_dir():
        try:
            progress = load_file(stage / PROGRESS, max_bytes=64 * 1024, error=DDMError)
        except DDMError:
            progress = None
        if isinstance(progress, dict) and {k: progress.get(k) for k in key} == key and (stage / "x.npy").is_file():
            done = progress.get("done")
            if type(done) is int and 0 < done <= key["n"]:
                log.info("resuming the encode in %s at row %d of %d", stage, done, key["n"])
                return done
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return 0


def _finish(stage: Path, out: Path, ds: Dataset, meta: VaeJson) -> None:
    """Labels, features, vae.json; x.npy fsynced; then the staging directory becomes `out`."""
    for name, array in (("y.npy", ds.y), ("features.npy", ds.features)):
        if array is not None:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(array))
            write_atomic(stage / name, buf.getvalue())
    fd = os.open(stage / "x.npy", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    (stage / PROGRESS).unlink()
    write_atomic(stage / VAE_JSON, json.dumps(meta.to_dict(), indent=2, sort_keys=True).encode())
    commit_dir(stage, out)
