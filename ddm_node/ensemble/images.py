"""Images from a latent bundle: its samples and its evaluation data decoded through the VAE its plan names.

`eval` of a latent run scores decoded images on both sides: the reference is the held-out split's latents decoded
through the same VAE (not the original images), and the domain classifier learns from decoded training latents. FD
then measures the generator alone: the VAE's own reconstruction error is on both sides and cancels, where original
images on one side would add it to every score. Decoded images wider than the domain classifier takes (64 pixels)
are scored downsampled to 64 x 64 (area average); the PNG of `sample` keeps the full size. At most DOMAIN_DECODE
training latents are decoded for the classifier (a fixed seeded choice), which bounds the decoding cost of a large run.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ddm_node.core.errors import DDMError
from ddm_node.data.packing import EvalData
from ddm_node.data.vae import Vae, open_vae
from ddm_node.ensemble.bundle import Bundle
from ddm_node.ensemble.domain_classifier import MAX_SIZE

log = logging.getLogger(__name__)

DOMAIN_DECODE = 8192


def bundle_vae(bundle: Bundle, override: str | None = None, device: str = "auto") -> Vae | None:
    """The VAE of a latent bundle (its files checked against the plan's reference), or None for a pixel bundle."""
    ref = bundle.plan.vae
    if ref is None:
        if override is not None:
            raise DDMError(f"--vae: {bundle.path} records no VAE (its dataset {bundle.plan.dataset} was not made "
                           "by ddm-node encode)")
        if bundle.plan.dataset.startswith("latents:"):
            log.warning("%s records no VAE: its samples are raw latents, not images", bundle.path)
        return None
    return open_vae(ref, override, device)


def to_images(vae: Vae | None, bundle: Bundle, x: torch.Tensor) -> torch.Tensor:
    """Samples as images in [-1, 1]: decoded for a latent bundle, as they are otherwise."""
    return x if vae is None else vae.decode(x, bundle.plan.vae)


def for_scoring(x: torch.Tensor) -> torch.Tensor:
    """Images the domain classifier takes: wider than MAX_SIZE are averaged down to MAX_SIZE."""
    if x.shape[-1] <= MAX_SIZE:
        return x
    return F.interpolate(x, size=(MAX_SIZE, MAX_SIZE), mode="area").clamp(-1, 1)


def scored_images(vae: Vae | None, bundle: Bundle, x: torch.Tensor) -> torch.Tensor:
    """Samples as `score` takes them: decoded and sized for the domain classifier (a pixel bundle's as they are)."""
    return x if vae is None else for_scoring(to_images(vae, bundle, x))


def image_eval_data(vae: Vae | None, bundle: Bundle, data: EvalData) -> EvalData:
    """The evaluation data as images (module docstring); a pixel bundle's as it is. The choice of training latents
    is fixed (seed 0), so the cached domain classifier of a run is always the same one."""
    if vae is None:
        return data
    dom = np.arange(len(data.x_train))
    if len(dom) > DOMAIN_DECODE:
        dom = np.sort(np.random.default_rng(0).choice(dom, DOMAIN_DECODE, replace=False))
    log.info("decoding %d held-out and %d training latents through the VAE for scoring", len(data.reference),
             len(dom))

    def decoded(latents: np.ndarray) -> np.ndarray:
        return for_scoring(to_images(vae, bundle, torch.from_numpy(np.asarray(latents, np.float32)))).numpy()

    return EvalData(decoded(data.reference), decoded(data.x_train[dom]),
                    data.y_train[dom] if data.y_train is not None else None, data.train_labels)
