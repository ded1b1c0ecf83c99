"""Image features from a pretrained encoder (DINOv2, CLIP or any vision model transformers loads), for partitioning.

`encode_dataset` runs the encoder over a dataset in batches and streams float32 [N, F] rows into an .npy file
that `ddm-node partition --features npy:PATH` reads (data/features.py). The encoder is a local directory
written by `save_pretrained` or a hub id (which transformers downloads unless it is cached or
HF_HUB_OFFLINE=1 forbids it). Images in [-1, 1] become [0, 1], grayscale is repeated to the encoder's three
channels, resized (bicubic, antialiased) to the encoder's input size (the image processor's crop size when
the encoder ships one, else the model config's image_size), and normalised with the processor's mean and std
(else CLIP's for CLIP models, ImageNet's for others). The feature of an image is the model's image
embedding: CLIP's projected image features, or the pooled output (DINOv2: the layer-normed CLS token).

transformers is an optional dependency: `pip install 'ddm-node[features]'`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm_node.core.errors import DDMError
from ddm_node.data.datasets import Dataset
from ddm_node.data.features import write_npy

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ddm-node[features]' (transformers)"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Encoder:
    """A loaded encoder and how it wants its input."""

    name: str
    model: object  # a transformers PreTrainedModel in eval mode
    model_type: str
    size: int  # input height = width
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Encoded:
    """What `encode_dataset` wrote."""

    path: Path
    n: int
    dim: int
    model_type: str


def load_encoder(name: str, device: str = "cpu") -> Encoder:
    """Load `name` (a save_pretrained directory or a hub id) with transformers; DDMError when it cannot."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise DDMError(f"ddm-node features needs the transformers library: {INSTALL_HINT}") from None
    local = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not local.is_dir():
        raise DDMError(f"encoder {name!r}: no such directory (a save_pretrained directory or a hub id)")
    name = str(local) if local.is_dir() else name
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        model = transformers.AutoModel.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise DDMError(f"cannot load encoder {name!r}: {_first_line(exc)}") from None
    vision = getattr(config, "vision_config", None) or config
    size, channels = int(getattr(vision, "image_size", 224)), int(getattr(vision, "num_channels", 3))
    clip = "clip" in config.model_type
    mean, std = (CLIP_MEAN, CLIP_STD) if clip else (IMAGENET_MEAN, IMAGENET_STD)
    try:  # the checkpoint's own preprocessing, when it ships a processor config
        proc = transformers.AutoImageProcessor.from_pretrained(name)
        crop = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
        size = int(crop.get("height", crop.get("shortest_edge", size))) if isinstance(crop, dict) else size
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        log.info("encoder %s: no image processor (%s); using %s statistics", name, _first_line(exc),
                 "CLIP" if clip else "ImageNet")
    model.eval().to(_device(device))
    return Encoder(name, model, config.model_type, size, channels, mean, std)


def encode_dataset(ds: Dataset, encoder: Encoder, out: str | Path, batch_size: int = 64,
                   on_batch: Callable[[int], None] | None = None) -> Encoded:
    """Encode every image of `ds` and write float32 [N, F] to `out` (.npy, atomically); `on_batch(done)`."""
    if ds.latent:
        raise DDMError(f"dataset {ds.spec!r} holds latents; an image encoder needs the decoded images")
    c = ds.shape[0]
    if c != encoder.channels and not (c == 1 and encoder.channels == 3):
        raise DDMError(f"encoder {encoder.name!r} takes {encoder.channels}-channel images; "
                       f"the dataset {ds.spec!r} has {c} channels")
    if batch_size < 1:
        raise DDMError(f"--batch-size must be >= 1, got {batch_size}")
    first = _embed_batch(encoder, ds.x[:1])
    dim = first.shape[1]

    def blocks() -> Iterator[np.ndarray]:
        for start in range(0, len(ds), batch_size):
            block = _embed_batch(encoder, ds.x[start:start + batch_size])
            if not np.isfinite(block).all():
                raise DDMError(f"encoder {encoder.name!r} gave NaN or infinite features for images {start}.."
                               f"{start + len(block) - 1}")
            yield block
            if on_batch is not None:
                on_batch(min(start + batch_size, len(ds)))

    path = write_npy(out, len(ds), dim, blocks())
    return Encoded(path, len(ds), dim, encoder.model_type)


def _embed_batch(encoder: Encoder, x: np.ndarray) -> np.ndarray:
    """float32 [B, F] image embeddings of images x [B, C, H, W] in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    model = encoder.model
    device = next(model.parameters()).device
    px = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device) + 1) / 2
    if px.shape[1] != encoder.channels:  # grayscale -> the encoder's RGB
        px = px.expand(-1, encoder.channels, -1, -1)
    if px.shape[-1] != encoder.size:
        px = F.interpolate(px, size=(encoder.size, encoder.size), mode="bicubic", antialias=True, align_corners=False)
    px = px.clamp(0, 1)
    mean = torch.tensor(encoder.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(encoder.std, device=device).view(1, -1, 1, 1)
    px = (px - mean) / std
    with torch.inference_mode():
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=px)
        else:
            out = model(pixel_values=px)
    if not isinstance(out, torch.Tensor):
        pooled = getattr(out, "pooler_output", None)
        out = pooled if pooled is not None else out.last_hidden_state[:, 0]
    return out.float().reshape(len(px), -1).cpu().numpy()


def _device(device: str):
    import torch

    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise DDMError(f"--device {device!r}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
