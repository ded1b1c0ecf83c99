"""Partition features, streamed in row chunks so that memory stays bounded for millions of samples.

Feature sources (partition.features):
- ``pca``: the flattened pixels (or latents) of the dataset, projected by PCA to partition.pca_dim;
- ``dataset``: the dataset's own ``features`` array;
- ``npy``: partition.features_path, a float .npy [N, F] with one row per dataset sample (`ddm-node features`
  writes one). It is read with positioned reads, CHUNK_ROWS rows at a time, never mapped or loaded whole, so the
  process holds a few chunks however large the file is (the page cache aside).

Encoder features (dataset, npy) wider than pca_dim are projected to pca_dim too; narrower ones are used as they
are. The PCA is sklearn's exact PCA while the selected rows fit IN_MEMORY_FLOATS values (every dataset that
fits in memory: digits, MNIST); beyond that it is the eigenbasis of the covariance of at most PCA_FIT_ROWS rows
(a seeded sample, accumulated chunk by chunk in float64), applied chunk by chunk: a million 768-d vectors (3 GB)
are never in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import write_atomic

CHUNK_ROWS = 16384  # rows per read: 48 MiB of 768-d float32
IN_MEMORY_FLOATS = 1 << 26  # 64 Mi values (512 MiB as float64): exact in-memory PCA up to this size
PCA_FIT_ROWS = 100_000  # rows whose covariance fits the streamed PCA


@dataclass(frozen=True)
class Rows:
    """An [n, dim] matrix read as float32 row ranges `read(a, b)`; `where` names it in errors."""

    n: int
    dim: int
    read: Callable[[int, int], np.ndarray]
    where: str

    def select(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        """float32 rows of the sorted `ids`, in order: one block per span of at most CHUNK_ROWS rows."""
        start = 0
        while start < len(ids):
            first = int(ids[start])
            stop = int(np.searchsorted(ids, first + CHUNK_ROWS, side="left"))
            sel = ids[start:stop]
            block = self.read(first, int(sel[-1]) + 1)
            if not np.isfinite(block).all():
                raise DDMError(f"{self.where}: rows {first}..{int(sel[-1])} hold NaN or infinite values")
            yield block[sel - first]
            start = stop

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), dim]: the rows `ids` (sorted) in memory."""
        out = np.empty((len(ids), self.dim), np.float32)
        i = 0
        for block in self.select(ids):
            out[i:i + len(block)] = block
            i += len(block)
        return out


def array_rows(array: np.ndarray, where: str) -> Rows:
    """Rows of an array (in memory or memory-mapped) flattened to [N, -1]."""
    flat = array.reshape(len(array), -1)
    return Rows(len(flat), flat.shape[1], lambda a, b: np.asarray(flat[a:b], dtype=np.float32), where)


def npy_rows(path: str | Path) -> Rows:
    """Rows of a float .npy file [N, F], read in chunks with positioned reads (header checked here)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        size = path.stat().st_size
    except FileNotFoundError:
        raise DDMError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DDMError(f"{path}: not a readable .npy array ({exc})") from None
    if len(shape) != 2 or 0 in shape:
        raise DDMError(f"{path}: features must be a non-empty [N, F] array, got shape {shape}")
    if dtype.kind != "f" or fortran:
        raise DDMError(f"{path}: features must be C-ordered float16/32/64, got {dtype}{' (Fortran order)' * fortran}")
    n, dim = (int(v) for v in shape)
    row_bytes = dim * dtype.itemsize
    if size < offset + n * row_bytes:
        raise DDMError(f"{path}: truncated: {size} bytes, the header says {n} x {dim} {dtype}")

    def read(a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, dim), dtype)
        with open(path, "rb") as f:
            f.seek(offset + a * row_bytes)
            got = f.readinto(memoryview(out).cast("B"))
        if got != out.nbytes:
            raise DDMError(f"{path}: file shrank while reading rows {a}..{b - 1}")
        return out.astype(np.float32, copy=False)

    return Rows(n, dim, read, str(path))


def project(rows: Rows, ids: np.ndarray, dim: int, seed: int, always: bool) -> np.ndarray:
    """float32 [len(ids), d]: the rows `ids` (sorted) projected by PCA to d = min(dim, F, len(ids)) components;
    with `always` False, rows of at most `dim` values are returned as they are."""
    if not always and rows.dim <= dim:
        return rows.gather(ids)
    d = min(dim, rows.dim, len(ids))
    if len(ids) < 2:  # PCA needs two samples; a single point is its own cluster anyway
        return np.zeros((len(ids), d), np.float32)
    if len(ids) * rows.dim <= IN_MEMORY_FLOATS:
        from sklearn.decomposition import PCA

        feats = PCA(n_components=d, random_state=seed).fit_transform(rows.gather(ids).astype(np.float64))
        return np.ascontiguousarray(feats, dtype=np.float32)
    mean, basis = streamed_pca(rows, ids, d, seed)
    out = np.empty((len(ids), d), np.float32)
    i = 0
    for block in rows.select(ids):
        out[i:i + len(block)] = (block - mean) @ basis
        i += len(block)
    return out


def streamed_pca(rows: Rows, ids: np.ndarray, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean float32 [F], basis float32 [F, d]): the top-d principal axes of at most PCA_FIT_ROWS of the rows
    `ids` (a seeded sample), from their covariance accumulated chunk by chunk in float64."""
    fit = ids if len(ids) <= PCA_FIT_ROWS else np.sort(np.random.default_rng(seed).choice(ids, PCA_FIT_ROWS, False))
    shift = total = gram = None
    for block in rows.select(fit):
        b = block.astype(np.float64)
        if shift is None:  # sums around a rough mean keep the covariance free of cancellation
            shift, total, gram = b.mean(axis=0), np.zeros(rows.dim), np.zeros((rows.dim, rows.dim))
        b -= shift
        total += b.sum(axis=0)
        gram += b.T @ b
    mean = total / len(fit)
    _, vecs = np.linalg.eigh(gram / len(fit) - np.outer(mean, mean))
    basis = vecs[:, ::-1][:, :d]
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(d)])  # sklearn's sign rule: deterministic axes
    basis = basis * np.where(signs == 0, 1.0, signs)
    return (mean + shift).astype(np.float32), np.ascontiguousarray(basis, dtype=np.float32)


def write_npy(path: str | Path, n: int, dim: int, blocks: Iterable[np.ndarray]) -> Path:
    """Write float32 [n, dim] from row blocks as an .npy file, streamed and atomic (temp file, fsync, rename):
    a failure, or blocks that do not add up to n rows, leaves `path` as it was."""
    import io

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})

    def chunks() -> Iterator[bytes]:
        yield head.getvalue()
        rows = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype="<f4")
            if block.ndim != 2 or block.shape[1] != dim:
                raise DDMError(f"{path}: a block of shape {block.shape} does not fit [{n}, {dim}]")
            rows += len(block)
            yield block.tobytes()
        if rows != n:
            raise DDMError(f"{path}: {rows} rows written, {n} expected")

    write_atomic(path, chunks())
    return Path(path)
