"""The image autoencoder of a latent run: which VAE made the latents (`VaeRef`), loading it with diffusers, and moving
between images in [-1, 1] and the latents the experts are trained on.

    latents = (vae.encode(images).latent_dist.mode() - shift_factor) * scaling_factor
    images  = vae.decode(latents / scaling_factor + shift_factor).sample, clamped to [-1, 1]

`scaling_factor` and `shift_factor` come from the VAE's config (SD: 0.18215 and none; SD3/FLUX set both). A VAE is a
diffusers `AutoencoderKL` in a `save_pretrained` directory (config.json + diffusion_pytorch_model.safetensors, or .bin)
or on the hub: `owner/name`, or `owner/name/subfolder` for a pipeline's VAE (stabilityai/stable-diffusion-2-1/vae). A
hub id is resolved to its snapshot in the local Hugging Face cache (downloaded unless HF_HUB_OFFLINE=1).

The reference records the VAE's source (hub id and snapshot revision, or the resolved directory), its scaling and
shift, and the sha256 of config.json and the weight file: a plan and a bundle carry the reference, never the weights
(a VAE is someone else's published artifact, often larger than the experts, and its licence is not ours to
redistribute), so every stage that decodes checks that the files it found are the ones that made the latents.

diffusers is an optional dependency: `pip install 'ddm-node[latent]'`; it is imported only where a VAE is loaded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import hash_file
from ddm_node.data.vae_ref import CONFIG_FILE, FILE_NAME, VaeRef

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ddm-node[latent]' (diffusers)"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers' preference order
_REVISION = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class Vae:
    """A loaded AutoencoderKL, where it came from and the sha256 of its files."""

    source: str
    revision: str | None
    directory: Path
    files: dict[str, str]
    model: object  # diffusers.AutoencoderKL in eval mode

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def shift_factor(self) -> float | None:
        shift = getattr(self.model.config, "shift_factor", None)
        return None if shift is None else float(shift)

    @property
    def in_channels(self) -> int:
        return int(self.model.config.in_channels)

    @property
    def factor(self) -> int:
        """How much smaller than the image a latent is on each side."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    def ref(self, channels: int, image_size: int) -> VaeRef:
        return VaeRef(self.source, self.revision, self.scaling_factor, self.shift_factor, dict(self.files), channels,
                      image_size)

    def encode(self, images):
        """Latents (float32, on the CPU) of images [B, in_channels, H, W] in [-1, 1]: the posterior mean, scaled."""
        import torch

        device = next(self.model.parameters()).device
        with torch.inference_mode():
            z = self.model.encode(images.to(device, torch.float32)).latent_dist.mode()
        return ((z - (self.shift_factor or 0.0)) * self.scaling_factor).float().cpu()

    def decode(self, latents, ref: VaeRef, batch: int = 64):
        """Images [N, ref.channels, H, W] in [-1, 1] (float32, CPU) of scaled latents [N, C, h, w], in batches.
        Grayscale datasets encoded through an RGB VAE come back as the mean of the decoded channels."""
        import torch

        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for i in range(0, len(latents), batch):
                z = latents[i:i + batch].to(device, torch.float32) / self.scaling_factor + (self.shift_factor or 0.0)
                x = self.model.decode(z).sample.float().clamp(-1, 1)
                if x.shape[1] != ref.channels:
                    x = x.mean(dim=1, keepdim=True)
                out.append(x.cpu())
        return torch.cat(out)


def load_vae(name: str, device: str = "cpu") -> Vae:
    """Load an AutoencoderKL from a directory or a hub id (module docstring); DDMError when it cannot."""
    directory, source, revision = resolve(name)
    files = vae_files(directory)
    return Vae(source, revision, directory, files, _load_model(directory, files, device))


def open_vae(ref: VaeRef, override: str | None = None, device: str = "cpu") -> Vae:
    """The VAE a reference names (or `override`, a directory holding the same files), its files checked against the
    reference's sha256 and its scaling against the reference's: a mismatch is a one-line error."""
    if override is not None:
        directory = Path(override).expanduser().resolve()
        if not directory.is_dir():
            raise DDMError(f"--vae {override}: no such directory")
        source, revision = ref.source, ref.revision
    else:
        where = Path(ref.source)
        if where.is_absolute() and not where.is_dir():
            raise DDMError(f"the VAE that made these latents, {ref.source}, is not there (moved? pass --vae DIR)")
        directory, source, revision = resolve(ref.source, ref.revision)
    files = vae_files(directory)
    if set(files) != set(ref.files) or files != ref.files:
        bad = sorted(k for k in set(files) | set(ref.files) if files.get(k) != ref.files.get(k))
        raise DDMError(f"VAE {directory} is not the one that made these latents: {bad[0]} has sha256 "
                       f"{files.get(bad[0], 'absent')[:12]}, the plan records {ref.files.get(bad[0], 'absent')[:12]}")
    vae = Vae(source, revision, directory, files, _load_model(directory, files, device))
    if (vae.scaling_factor, vae.shift_factor) != (ref.scaling_factor, ref.shift_factor):
        raise DDMError(f"VAE {directory}: scaling {vae.scaling_factor}/shift {vae.shift_factor} differ from the "
                       f"reference's {ref.scaling_factor}/{ref.shift_factor}")
    return vae


def resolve(name: str, revision: str | None = None) -> tuple[Path, str, str | None]:
    """(directory, source, revision) of a VAE name: an existing directory (resolved), else a hub id whose snapshot
    is fetched into (or found in) the Hugging Face cache."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve(), str(local.resolve()), None
    parts = name.split("/")
    if name.startswith(("/", ".", "~")) or len(parts) < 2 or not all(FILE_NAME.match(p) for p in parts):
        raise DDMError(f"VAE {name!r}: no such directory, and not a hub id (owner/name[/subfolder])")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    prefix = f"{sub}/" if sub else ""
    try:
        from huggingface_hub import snapshot_download

        for weights in WEIGHT_FILES:  # the safetensors file when the repo has one: never both
            snap = Path(snapshot_download(repo, revision=revision, allow_patterns=[f"{prefix}{CONFIG_FILE}",
                                                                                   f"{prefix}{weights}"]))
            if (snap / prefix / weights).is_file():
                break
    except ImportError:
        raise DDMError(f"a hub VAE needs huggingface_hub: {INSTALL_HINT}") from None
    except Exception as exc:  # noqa: BLE001  (hub errors are many types; all of them are one line here)
        raise DDMError(f"VAE {name!r}: cannot get it from the hub ({_first_line(exc)})") from None
    return snap / sub if sub else snap, name, snap.name if _REVISION.match(snap.name) else revision


def vae_files(directory: Path) -> dict[str, str]:
    """sha256 of config.json and of the weight file diffusers loads from `directory` (safetensors first)."""
    if not (directory / CONFIG_FILE).is_file():
        raise DDMError(f"VAE {directory}: no {CONFIG_FILE} (a diffusers save_pretrained directory?)")
    weights = next((n for n in WEIGHT_FILES if (directory / n).is_file()), None)
    if weights is None:
        raise DDMError(f"VAE {directory}: no weight file ({' or '.join(WEIGHT_FILES)})")
    return {n: hash_file(directory / n)[0].hexdigest() for n in (CONFIG_FILE, weights)}


def _load_model(directory: Path, files: dict[str, str], device: str):
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as df_logging
    except ImportError:
        raise DDMError(f"latents need the diffusers library: {INSTALL_HINT}") from None
    from ddm_node.data.encoder import _device  # the one device-name parser of this folder

    df_logging.set_verbosity_error()
    try:
        model = AutoencoderKL.from_pretrained(directory, use_safetensors=WEIGHT_FILES[0] in files)
    except Exception as exc:  # noqa: BLE001  (a bad config or weights file: any error, one line)
        raise DDMError(f"VAE {directory}: cannot load it as a diffusers AutoencoderKL ({_first_line(exc)})") from None
    return model.eval().to(_device(device))


def to_vae_input(x: np.ndarray, in_channels: int, size: int):
    """Images [B, C, H, W] in [-1, 1] as the VAE's input: grayscale repeated to RGB, resized (bicubic, antialiased)
    to size x size."""
    import torch
    import torch.nn.functional as F

    px = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if px.shape[1] != in_channels:
        px = px.expand(-1, in_channels, -1, -1)
    if px.shape[-1] != size or px.shape[-2] != size:
        px = F.interpolate(px, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return px.clamp(-1, 1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
