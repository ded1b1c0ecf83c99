"""Sampling from a bundle and scoring the samples against the plan's held-out split."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddm_node.core.config import SampleConfig
from ddm_node.core.errors import DDMError
from ddm_node.core.manifest import write_atomic
from ddm_node.data.datasets import Dataset, load_dataset
from ddm_node.data.packing import EvalData, eval_data, read_eval_data, train_ids
from ddm_node.data.plan import Plan
from ddm_node.ensemble.bundle import Bundle
from ddm_node.ensemble.domain_classifier import DomainClassifier, get_domain_classifier
from ddm_node.ensemble.metrics import Scores, evaluate_features, features
from router.base import Cond
from router.sampler import sample

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """Generated images [N,C,H,W] in [-1,1], their class labels, and the cost of making them."""

    x: torch.Tensor
    y: torch.Tensor | None
    seconds: float
    expert_samples: int  # samples evaluated by experts, summed over steps
    router_calls: int
    router: str  # the router class that routed them


def bundle_eval_data(bundle: Bundle) -> EvalData:
    """What `eval` measures against: the bundle's held-out pack (verified against the plan), or else the plan's
    dataset on this box (the same arrays)."""
    if bundle.eval_pack is not None:
        return read_eval_data(bundle.eval_pack, bundle.plan)
    try:
        ds = load_dataset(bundle.plan.dataset)
    except DDMError as exc:
        raise DDMError(f"{exc}; the bundle has no held-out pack either (assemble it from a run whose plan has "
                       "data packs, or evaluate where the dataset is)") from None
    return eval_data(bundle.plan, ds)


def _eval_data(plan: Plan, dataset: Dataset | None, data: EvalData | None) -> EvalData:
    return data if data is not None else eval_data(plan, dataset if dataset is not None else load_dataset(plan.dataset))


def class_labels(plan: Plan, n: int, seed: int, dataset: Dataset | None = None,
                 data: EvalData | None = None) -> torch.Tensor | None:
    """n labels drawn (seeded) from the training split's class frequencies; None for unconditional runs."""
    if plan.cfg.model.num_classes == 0:
        return None
    if data is None:
        ds = dataset if dataset is not None else load_dataset(plan.dataset)
        labels = torch.from_numpy(ds.y[train_ids(plan)]).long()
    else:
        labels = torch.from_numpy(data.train_labels).long()
    pick = torch.randint(len(labels), (n,), generator=torch.Generator().manual_seed(seed + 1))
    return labels[pick]


def prompt_text(plan: Plan, prompts: list[str], n: int) -> torch.Tensor:
    """Pooled embeddings [n, D] of `prompts` by the plan's text encoder: sample i gets prompt i mod len(prompts)."""
    from ddm_node.data.text_encoder import embed_prompts

    emb = torch.from_numpy(embed_prompts(plan.cfg.text, prompts, plan.cfg.model.text_dim or 0))
    return emb[torch.arange(n) % len(prompts)]


def generate(bundle: Bundle, n: int, cfg: SampleConfig, seed: int = 0, batch: int = 256,
             dataset: Dataset | None = None, data: EvalData | None = None,
             prompts: list[str] | None = None) -> Samples:
    """Draw n samples from the bundle's ensemble with the ODE solver, seeded (class labels from `data`, else from
    `dataset` or the plan's dataset; with `prompts`, sample i follows prompt i mod len(prompts))."""
    if n < 1:
        raise DDMError(f"--n must be >= 1, got {n}")
    c, h, w = bundle.plan.shape
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, c, h, w), generator=gen)
    if data is None and dataset is None and bundle.eval_pack is not None and bundle.plan.cfg.model.num_classes:
        data = read_eval_data(bundle.eval_pack, bundle.plan)  # labels from the held-out pack: no dataset needed
    y = class_labels(bundle.plan, n, seed, dataset, data)
    text = prompt_text(bundle.plan, prompts, n) if prompts else None
    velocity = bundle.velocity(cfg)
    start = time.perf_counter()
    out = []
    for i in range(0, n, batch):
        yb = None if y is None else y[i:i + batch]
        if text is not None:
            yb = Cond(yb, text[i:i + batch])
        out.append(sample(velocity, noise[i:i + batch], cfg.steps, cfg.solver, yb))
    x = torch.cat(out)
    if not bundle.plan.dataset.startswith("latents:"):  # pixels live in [-1, 1]; latents are unbounded
        x = x.clamp(-1, 1)
    return Samples(x, y, time.perf_counter() - start, velocity.expert_samples, velocity.router_calls,
                   type(velocity.router).__name__)


def reference_split(plan: Plan, dataset: Dataset | None = None,
                    data: EvalData | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(held-out images, the domain classifier's training images and labels) of a plan: from `data`, else from
    `dataset` or the plan's dataset (fingerprint checked)."""
    if not plan.eval_ids:
        raise DDMError("the plan holds out no samples (data.holdout_fraction is 0); cannot evaluate")
    d = _eval_data(plan, dataset, data)
    y_train = torch.from_numpy(d.y_train).long() if d.y_train is not None else None
    return torch.from_numpy(d.reference).float(), torch.from_numpy(d.x_train).float(), y_train


def reference_features(plan: Plan, dataset: Dataset | None = None,
                       data: EvalData | None = None) -> tuple[DomainClassifier, np.ndarray]:
    """The plan's domain classifier and its features of the held-out split (what `score` measures against)."""
    ref, x_train, y_train = reference_split(plan, dataset, data)
    clf = get_domain_classifier(x_train, y_train, max(plan.num_classes, 1) if y_train is not None else 0,
                                plan.fingerprint)
    return clf, features(ref, clf, "reference")


def score(samples: torch.Tensor, plan: Plan, dataset: Dataset | None = None, seed: int = 0,
          data: EvalData | None = None) -> Scores:
    """FD_dom/KID/precision/recall of samples against the plan's held-out split (`data`, else from the dataset)."""
    clf, fr = reference_features(plan, dataset, data)
    return evaluate_features(features(samples, clf), fr, clf.hash, seed)


def save_grid(x: torch.Tensor, path: str | Path, ncol: int | None = None, scale: int = 4) -> Path:
    """Write images [N,C,H,W] in [-1,1] as one PNG grid (nearest-neighbour upscaled), atomically."""
    from io import BytesIO

    from PIL import Image

    n, c, h, w = x.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.zeros((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img[i]
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3])
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = BytesIO()
    pil.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())
    return Path(path)
