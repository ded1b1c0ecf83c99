"""A latent run's VAE in an export: the hook for the bundle's VAE reference.

A latent bundle's index may carry `"vae"`: the reference `ddm-node encode` records (source: a hub id or a local
directory, revision, scaling_factor, shift_factor, and the sha256 of config.json and the weight file). A bundle never
holds the VAE's weights, so an export copies them only from a local directory whose files still match the reference
(`vae/`, loaded by the pipeline as an AutoencoderKL); a hub VAE is named in the model card and passed at load time
(`from_pretrained(OUT, vae=AutoencoderKL.from_pretrained(source), trust_remote_code=True)`).
The index is untrusted input: every field used here is checked.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ddm_node.core.errors import IntegrityError
from ddm_node.core.manifest import sha256_file

MAX_SOURCE = 4096
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class VaeLink:
    """The bundle's VAE reference, as far as an export uses it."""

    source: str
    revision: str | None
    scaling_factor: float
    shift_factor: float | None
    files: dict[str, str]  # file name -> sha256

    @property
    def local(self) -> Path | None:
        """The source directory when it is one on this machine holding the referenced files."""
        path = Path(self.source)
        return path if path.is_absolute() and all((path / name).is_file() for name in self.files) else None

    def write(self, folder: Path) -> list[str | None]:
        """Copy a local VAE whose files match the reference into `folder`; the model_index.json entry."""
        src = self.local
        if src is None:
            return [None, None]
        folder.mkdir()
        for name, digest in sorted(self.files.items()):
            shutil.copyfile(src / name, folder / name)
            if sha256_file(folder / name).sha256 != digest:
                raise IntegrityError(f"{src / name}: sha256 differs from the VAE the bundle's latents were made with")
        return ["diffusers", "AutoencoderKL"]


def vae_link(index: dict, where: str) -> VaeLink | None:
    """The index's `vae` reference (None for a pixel run); IntegrityError naming the field for a malformed one."""
    ref = index.get("vae")
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise IntegrityError(f"{where}: vae must be a mapping")
    source, revision, files = ref.get("source"), ref.get("revision"), ref.get("files")
    scaling, shift = ref.get("scaling_factor"), ref.get("shift_factor")
    if not isinstance(source, str) or not 0 < len(source) <= MAX_SOURCE:
        raise IntegrityError(f"{where}: vae.source must be a non-empty string of at most {MAX_SOURCE} characters")
    if revision is not None and not (isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision)):
        raise IntegrityError(f"{where}: vae.revision must be null or a 40-character commit hash")
    if not isinstance(files, dict) or not 1 <= len(files) <= 4 or not all(
            isinstance(k, str) and _FILE.match(k) and isinstance(v, str) and _HEX64.match(v) for k, v in files.items()):
        raise IntegrityError(f"{where}: vae.files must map file names to sha256 hex digests")
    if not _finite(scaling) or scaling <= 0 or (shift is not None and not _finite(shift)):
        raise IntegrityError(f"{where}: vae.scaling_factor must be a positive number and shift_factor a number or null")
    return VaeLink(source, revision, float(scaling), None if shift is None else float(shift), dict(files))


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
