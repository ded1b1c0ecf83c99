"""A latent run's VAE in an export.

A latent bundle's plan carries the VAE reference `ddm-node encode` recorded (`data.vae_ref.VaeRef`: a hub id or a
local directory, revision, scaling and shift, the sha256 of config.json and the weight file), checked against the
bundle's index when the bundle loads. A bundle never holds the VAE's weights, so an export copies them only from a
local directory whose files still hash as recorded (`vae/`, loaded by the pipeline as an AutoencoderKL); a hub VAE is
named in the model card and passed at load time
(`from_pretrained(OUT, vae=AutoencoderKL.from_pretrained(source), trust_remote_code=True)`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ddm_node.core.errors import IntegrityError
from ddm_node.core.manifest import sha256_file
from ddm_node.data.vae_ref import VaeRef


def local_vae(ref: VaeRef) -> Path | None:
    """The reference's source directory when it is one on this machine holding the referenced files."""
    path = Path(ref.source)
    return path if path.is_absolute() and all((path / name).is_file() for name in ref.files) else None


def write_vae(ref: VaeRef, folder: Path) -> list[str | None]:
    """Copy a local VAE whose files match the reference into `folder`; the model_index.json entry."""
    src = local_vae(ref)
    if src is None:
        return [None, None]
    folder.mkdir()
    for name, digest in sorted(ref.files.items()):
        shutil.copyfile(src / name, folder / name)
        if sha256_file(folder / name).sha256 != digest:
            raise IntegrityError(f"{src / name}: sha256 differs from the VAE the bundle's latents were made with")
    return ["diffusers", "AutoencoderKL"]
