"""Which VAE made a latent dataset (`VaeRef`), and the `vae.json` that `ddm-node encode` writes beside the latents.

No torch or diffusers here: the latents loader (datasets.py) and the plan parse references; data/vae.py loads VAEs.
A reference is untrusted input wherever it is read (a plan from a peer, a bundle's index, a file), so `parse` checks
every field and bounds every string.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ddm_node.core.errors import DDMError
from ddm_node.core.jsonsafe import load_file

VAE_JSON = "vae.json"
VAE_FORMAT = "ddm-vae/1"
CONFIG_FILE = "config.json"
MAX_SOURCE = 4096
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REVISION = re.compile(r"^[0-9a-f]{40}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF_KEYS = ("source", "revision", "scaling_factor", "shift_factor", "files", "channels", "image_size")


@dataclass(frozen=True)
class VaeRef:
    """Which VAE made a latent dataset and how: the plan and the bundle record this (never the weights)."""

    source: str  # a hub id (owner/name[/subfolder]) or an absolute directory
    revision: str | None  # the hub snapshot's commit for a hub id; None for a directory
    scaling_factor: float
    shift_factor: float | None
    files: dict[str, str] = field(hash=False)  # config.json and the weight file -> sha256
    channels: int  # the dataset's image channels: decoded images are converted back to these
    image_size: int  # the size the images were encoded at (decoded images have it)

    def to_dict(self) -> dict:
        return {"source": self.source, "revision": self.revision, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor, "files": dict(sorted(self.files.items())),
                "channels": self.channels, "image_size": self.image_size}

    @classmethod
    def parse(cls, value: object, where: str) -> VaeRef:
        """A reference from untrusted JSON (a plan, an index, vae.json); DDMError naming `where` for any defect."""
        if not isinstance(value, dict) or set(value) != set(_REF_KEYS):
            raise DDMError(f"{where}: a VAE reference needs exactly the keys {', '.join(_REF_KEYS)}")
        source, revision, files = value["source"], value["revision"], value["files"]
        if not isinstance(source, str) or not 0 < len(source) <= MAX_SOURCE:
            raise DDMError(f"{where}: source must be a non-empty string of at most {MAX_SOURCE} characters")
        if revision is not None and not (isinstance(revision, str) and _REVISION.match(revision)):
            raise DDMError(f"{where}: revision must be null or a 40-character commit hash")
        if not isinstance(files, dict) or CONFIG_FILE not in files or not 2 <= len(files) <= 4 or not all(
                isinstance(k, str) and FILE_NAME.match(k) and isinstance(v, str) and _HEX64.match(v)
                for k, v in files.items()):
            raise DDMError(f"{where}: files must map {CONFIG_FILE} and the weight file to sha256 hex digests")
        scaling, shift = value["scaling_factor"], value["shift_factor"]
        if not _finite(scaling) or scaling <= 0 or (shift is not None and not _finite(shift)):
            raise DDMError(f"{where}: scaling_factor must be a positive number and shift_factor a number or null")
        channels, size = value["channels"], value["image_size"]
        if type(channels) is not int or not 1 <= channels <= 4 or type(size) is not int or not 1 <= size <= 65536:
            raise DDMError(f"{where}: channels must be 1..4 and image_size 1..65536")
        return cls(source, revision, float(scaling), None if shift is None else float(shift), dict(files), channels,
                   size)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)




@dataclass(frozen=True)
class VaeJson:
    """DIR/vae.json of a latents directory: the reference, and the dataset the latents were encoded from."""

    vae: VaeRef
    dataset: str  # the source dataset's spec
    fingerprint: str  # the source dataset's fingerprint

    def to_dict(self) -> dict:
        return {"format": VAE_FORMAT, "vae": self.vae.to_dict(), "dataset": self.dataset,
                "fingerprint": self.fingerprint}


def read_vae_json(directory: Path) -> VaeJson | None:
    """DIR/vae.json when there is one (None otherwise); a malformed file is a one-line DDMError."""
    path = Path(directory) / VAE_JSON
    if not path.is_file():
        return None
    doc = load_file(path, max_bytes=64 * 1024, error=DDMError)
    if not isinstance(doc, dict) or doc.get("format") != VAE_FORMAT:
        raise DDMError(f"{path}: not a {VAE_FORMAT} file")
    dataset, fingerprint = doc.get("dataset"), doc.get("fingerprint")
    if not isinstance(dataset, str) or not 0 < len(dataset) <= MAX_SOURCE or not isinstance(fingerprint, str) \
            or not _HEX64.match(fingerprint):
        raise DDMError(f"{path}: dataset must be a spec and fingerprint 64 hex characters")
    return VaeJson(VaeRef.parse(doc.get("vae"), str(path)), dataset, fingerprint)
