"""A dataset's per-sample text: pooled text embeddings stored beside the data, and what made them.

A `latents:DIR` dataset directory may hold `text.npy` (float32 [N, D], one pooled embedding per sample, in the order
of x.npy) and `text.json` (`TextInfo`: the encoder's name, the sha256 over its files, the captions file's sha256,
the token length, D and N). `ddm-node embed-text` writes both (data/text_encoder.py); `make_plan` copies the info
into the plan's `text` config section, so `sample --prompt` embeds prompts with the same encoder and refuses a
different one. Token sequences with a mask are not stored: the models condition on the pooled vector only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ddm_node.core.config import TextConfig, canonical_json
from ddm_node.core.errors import DDMError
from ddm_node.core.jsonsafe import load_file as load_json_file
from ddm_node.core.manifest import write_atomic

TEXT_FILE, INFO_FILE = "text.npy", "text.json"
FORMAT = "ddm-text/1"
MAX_TEXT_DIM = 1 << 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TextInfo:
    """What text.json says about text.npy."""

    encoder: str  # hub id or directory
    sha256: str  # over every file of the encoder (`encoder_sha256`)
    captions_sha256: str
    max_length: int
    dim: int
    count: int

    def to_config(self) -> TextConfig:
        """The plan's record of the encoder."""
        return TextConfig(encoder=self.encoder, sha256=self.sha256, captions_sha256=self.captions_sha256,
                          max_length=self.max_length)

    @classmethod
    def parse(cls, data: object, where: str) -> TextInfo:
        """A TextInfo from text.json's object; DDMError naming `where` for anything else."""
        fields = {"format", "encoder", "sha256", "captions_sha256", "max_length", "dim", "count"}
        if not isinstance(data, dict) or set(data) != fields or data["format"] != FORMAT:
            raise DDMError(f"{where}: expected a {FORMAT} object with {', '.join(sorted(fields - {'format'}))}")
        if not isinstance(data["encoder"], str) or not data["encoder"]:
            raise DDMError(f"{where}: encoder must be a non-empty string")
        for key in ("sha256", "captions_sha256"):
            if not isinstance(data[key], str) or not _HEX64.match(data[key]):
                raise DDMError(f"{where}: {key} must be 64 lowercase hex characters")
        for key, high in (("max_length", 1 << 20), ("dim", MAX_TEXT_DIM), ("count", 1 << 40)):
            if type(data[key]) is not int or not 1 <= data[key] <= high:
                raise DDMError(f"{where}: {key} must be an integer in [1, {high}], got {data[key]!r}")
        return cls(**{k: v for k, v in data.items() if k != "format"})


def check_text(text: np.ndarray, n: int, where: str) -> None:
    """DDMError unless `text` is finite float32 [n, D]: one pooled embedding per sample."""
    if not isinstance(text, np.ndarray) or text.dtype != np.float32 or text.ndim != 2 or text.shape[1] < 1:
        raise DDMError(f"{where}: text embeddings must be float32 [N, D]")
    if len(text) != n:
        raise DDMError(f"{where}: {len(text)} text embeddings for {n} samples (one per sample, in order)")
    if not np.isfinite(text).all():
        raise DDMError(f"{where}: text embeddings hold NaN or infinite values")


def load_text(directory: Path, n: int) -> tuple[np.ndarray | None, TextInfo | None]:
    """A dataset directory's text embeddings and their info, (None, None) when it has no text.npy."""
    path, info_path = directory / TEXT_FILE, directory / INFO_FILE
    if not path.is_file():
        return None, None
    if not info_path.is_file():
        raise DDMError(f"{directory}: has {TEXT_FILE} but no {INFO_FILE} naming its encoder (ddm-node embed-text)")
    info = TextInfo.parse(load_json_file(info_path, max_bytes=1 << 16, error=DDMError), str(info_path))
    try:
        text = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DDMError(f"{path}: not a readable .npy array without pickled objects ({exc})") from None
    check_text(text, n, str(path))
    if text.shape != (info.count, info.dim):
        raise DDMError(f"{path}: shape {text.shape} but {INFO_FILE} says [{info.count}, {info.dim}]")
    return np.ascontiguousarray(text), info


def write_text(directory: str | Path, text: np.ndarray, info: TextInfo) -> Path:
    """Write text.npy, then text.json (both atomically) into `directory`; returns text.npy's path."""
    check_text(text, info.count, str(directory))
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(text, dtype=np.float32), allow_pickle=False)
    out = Path(directory)
    write_atomic(out / TEXT_FILE, buf.getvalue())
    write_atomic(out / INFO_FILE, canonical_json({"format": FORMAT, **asdict(info)}))
    return out / TEXT_FILE


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encoder_sha256(directory: Path) -> str:
    """sha256 over every file of an encoder directory (weights, config, tokenizer), each named by its relative path:
    the same encoder on any box gives the same value, a retrained or different tokenizer a different one."""
    h = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise DDMError(f"encoder {directory}: the directory holds no files")
    for p in files:
        h.update(f"{p.relative_to(directory).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def read_captions(path: str | Path) -> tuple[list[str], str]:
    """One caption per line (UTF-8; a trailing newline ends the last one) and the file's sha256."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DDMError(f"cannot read captions {path}: {exc.strerror or exc}") from None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DDMError(f"{path}: captions are not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not lines:
        raise DDMError(f"{path}: no captions (one per line, one per sample)")
    return lines, hashlib.sha256(raw).hexdigest()
